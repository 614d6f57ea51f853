//! The nested real-KVM tier: relive on a KVM that behaves like production.
//!
//! These machines' own KVM is `kvm_pvm` (shared/PLATFORM.md), which differs
//! from a production host's. QEMU's TCG emulates AMD SVM with nested paging,
//! so a Linux L1 started under `qemu-system-x86_64 -accel tcg -cpu max` loads
//! `kvm.ko` and `kvm-amd.ko` and offers a /dev/kvm backed by (emulated)
//! hardware virtualization: kvm-amd, as on an AMD production host. This test
//! builds that L1 and runs relive's own end-to-end tests inside it, unchanged:
//!
//! 1. `scripts/nested/build-l1.sh` packs an initramfs: busybox, the KVM
//!    modules of Debian's cloud kernel (the same package as the L1 kernel,
//!    fetched by `scripts/fetch-linux-kernel.sh`), the `relive-vmm` binary,
//!    the test binaries named in [`SCENARIOS`] (built by this `cargo test`,
//!    found beside this test's own executable), their shared libraries, and
//!    an `/init` written here;
//! 2. QEMU boots Debian's cloud kernel with it, one emulated CPU, 2 GiB, under
//!    a hard time limit ([`L1_TIMEOUT`]); an L1 whose serial ports stay
//!    silent for [`L1_SILENCE`] (its `/init` prints a liveness line every
//!    10 s) is wedged, and the test asks QEMU's monitor where its CPU is;
//! 3. `/init` mounts what the tests need (proc, sys, devtmpfs, a tmpfs /tmp,
//!    cgroup2), loads the modules, and runs each scenario with
//!    `RELIVE_REQUIRE_KVM=1`; everything a scenario prints, and one line
//!    `RESULT <scenario> rc=<status> secs=<seconds>` after it, goes to the
//!    L1's second serial port, which QEMU writes to a file the host reads
//!    (the first carries the L1 kernel's console);
//! 4. the host asserts that every scenario ran and passed, and prints each
//!    one's time.
//!
//! L1 boots of one CPU each share the work. One runs relive's `restore`
//! and `vmm` test binaries. One runs Debian's cloud kernel as the L2 guest
//! (`tests/nested/linux.sh`): to userspace (every CPU online, no ACPI
//! error, `poweroff` and `reboot` as relive's typed exits), and checkpointed in
//! userspace, killed and restored three ways (a full image cold, an
//! incremental layer cold, a full image into a standby), each going on
//! counting from the image with no reboot and no clocksource or lockup
//! warning; the same with two vCPUs needs an L1 of two CPUs and is ignored
//! by default (see its test).
//!
//! A third L1 boot runs a container app
//! ([`container_apps_run_log_fail_over_and_reseed_on_kvm_amd_nested_under_qemu`]):
//! an image built here from Debian's busybox-static by `relive image build`
//! runs as an `image:` VM of a supervised fleet, and the scenario
//! `tests/nested/container.sh` checks its logs, its restore after a kill,
//! its RNG reseed and clock step after restores, and its typed app exit.
//!
//! For debugging, `RELIVE_NESTED_L1_APPEND` adds to the L1 kernel's command
//! line, and `RELIVE_NESTED_SCRIPT=FILE` runs the shell script FILE
//! (executable; `/bin/relive-vmm` is there, and the files listed in
//! `RELIVE_NESTED_FILES=A:B:..` too) as the only scenario in an L1 of
//! `RELIVE_NESTED_SMP` CPUs (default 1), and the test prints what it said.
//!
//! Without QEMU, busybox or the kernel modules, the test skips with the
//! reason, or fails under `RELIVE_REQUIRE_KVM=1` (CI), whose setup
//! (`scripts/setup.sh`) installs them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{env_flag, repo_root, temp_dir, ChildGuard};

/// The L1 run, start to power-off, at most.
const L1_TIMEOUT: Duration = Duration::from_secs(540);

/// An L1 whose serial ports stay silent this long is wedged: its `/init`
/// prints a liveness line every 10 s whatever the scenario does. The test
/// then asks QEMU's monitor where the emulated CPU is and stops the run.
const L1_SILENCE: Duration = Duration::from_secs(60);

/// The test binaries run inside L1, each a scenario: `(name, test target,
/// arguments)`. The target's binary is `target/<profile>/deps/<target>-<hash>`.
const SCENARIOS: &[(&str, &str, &[&str])] = &[
    // Every restore path of the bundled guest: cold, into a standby, through
    // an incremental chain, the boot images, limits and corrupt images.
    ("restore", "restore", &["--test-threads=1"]),
    // Booting, the devices, the agent channel, typed exits, the control socket.
    ("vmm", "vmm", &["--test-threads=1"]),
    // Not `faults`: its guests touch hundreds of MiB, which takes 7.5 minutes
    // of emulated L2 time here (measured); the tier's budget is 10 minutes.
];

/// The L2 Linux guest's `/init`: report the online CPUs, then power off or
/// reboot as its command line says (`relive.test=reboot`).
const L2_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "L2-USERSPACE cpus=$(cat /sys/devices/system/cpu/online) nproc=$(nproc)"
if grep -q relive.test=ticks /proc/cmdline; then
    i=0
    while true; do
        i=$((i + 1))
        echo "tick $i uptime $(cut -d' ' -f1 /proc/uptime)"
        sleep 1
    done
fi
if grep -q relive.test=reboot /proc/cmdline; then reboot -f; else poweroff -f; fi
"#;

/// Why this machine cannot run the tier, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !qemu.is_ok_and(|s| s.success()) {
        return Some("qemu-system-x86_64 cannot run (install qemu-system-x86)".into());
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("/bin/busybox is missing (install busybox-static)".into());
    }
    let linux = repo_root().join(".cache/linux");
    for file in ["vmlinuz", "modules/kvm.ko", "modules/kvm-amd.ko"] {
        if !linux.join(file).is_file() {
            return Some(format!(
                "{} is missing (run scripts/fetch-linux-kernel.sh)",
                linux.join(file).display()
            ));
        }
    }
    None
}

/// The newest `target/<profile>/deps/<target>-<hash>` executable.
fn test_binary(target: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of this test");
    let deps = exe.parent().expect("target/<profile>/deps");
    let prefix = format!("{target}-");
    let newest = std::fs::read_dir(deps)
        .expect("the deps directory")
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name[prefix.len()..].chars().all(|c| c.is_ascii_hexdigit())
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    match newest {
        Some((_, path)) => path,
        None => panic!(
            "no test binary {prefix}* in {}: `cargo test` builds every test target first",
            deps.display()
        ),
    }
}

/// A scenario inside L1: its name, its binary's file name in /bin, arguments.
type Scenario<'a> = (&'a str, String, &'a [&'a str]);

/// The L1's `/init`: mounts, modules, then each scenario, reporting on ttyS1.
fn init_script(scenarios: &[Scenario<'_>]) -> String {
    let mut script = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+cpu +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
exec 3>/dev/ttyS1
say() { echo "$*" >&3; }
up() { cut -d' ' -f1 /proc/uptime; }
# Liveness on the L1 console: the host tells a wedged L1 (silent) from a
# slow scenario by these lines, and the last ones say what ran.
(
    n=0
    while sleep 10; do
        n=$((n + 1))
        echo "L1 alive: up $(up) s, load $(cut -d' ' -f1-4 /proc/loadavg)" >/dev/ttyS0
        [ $((n % 3)) -eq 0 ] && top -b -n 1 | head -12 >/dev/ttyS0
    done
) &
say "L1 up at $(up) s: $(uname -r), $(nproc) CPU, $(grep MemTotal /proc/meminfo)"
for m in irqbypass kvm kvm-amd; do
    insmod /lib/relive-modules/$m.ko || say "insmod $m failed"
done
if [ -c /dev/kvm ]; then
    say "RESULT kvm rc=0 secs=$(up)"
else
    say "RESULT kvm rc=1 secs=$(up)"
    dmesg | tail -20 >&3
fi
export RELIVE_VMM_BIN=/bin/relive-vmm RELIVE_REQUIRE_KVM=1 TMPDIR=/tmp RUST_BACKTRACE=1
"#,
    );
    for (name, binary, args) in scenarios {
        script.push_str(&format!(
            "start=$(up)\nsay \"BEGIN {name}\"\n/bin/{binary} {} >&3 2>&3\nrc=$?\nsay \"RESULT {name} rc=$rc secs=$(awk -v a=$start -v b=$(up) 'BEGIN {{ printf \"%.1f\", b - a }}')\"\n",
            args.join(" ")
        ));
    }
    script.push_str("say \"DONE at $(up) s\"\npoweroff -f\n");
    script
}

/// One L1 run at a time: each is a QEMU of one or two emulated CPUs.
static L1: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What one L1 run reported.
struct L1Report {
    /// Everything the scenarios said on ttyS1.
    report: String,
    /// The L1 kernel's console.
    console: String,
}

impl L1Report {
    /// The status and seconds of scenario `name`.
    fn result(&self, name: &str) -> Option<(i32, String)> {
        self.report.lines().find_map(|l| {
            let rest = l.strip_prefix(&format!("RESULT {name} rc="))?;
            let (rc, secs) = rest.split_once(" secs=")?;
            Some((rc.parse().ok()?, secs.trim().to_string()))
        })
    }

    fn context(&self) -> String {
        let tail: Vec<&str> = self.console.lines().collect();
        format!(
            "--- L1 results (ttyS1) ---\n{}\n--- L1 console, last 40 lines ---\n{}",
            self.report,
            tail[tail.len().saturating_sub(40)..].join("\n")
        )
    }

    /// Asserts that every scenario passed, printing each one's time.
    fn assert_passed(&self, label: &str, scenarios: &[Scenario<'_>]) {
        let mut failed = Vec::new();
        for (name, _, _) in scenarios {
            match self.result(name) {
                Some((0, secs)) => eprintln!("nested tier ({label}): {name} passed in {secs} s"),
                Some((rc, secs)) => failed.push(format!("{name} failed (status {rc}, {secs} s)")),
                None => failed.push(format!("{name} did not finish")),
            }
        }
        assert!(
            failed.is_empty(),
            "{}\n{}",
            failed.join("; "),
            self.context()
        );
    }
}

/// Boots an L1 of `smp` emulated CPUs with `files` in /bin, runs
/// `scenarios` in it, and returns what it reported (asserting that it powered
/// off in time and had a /dev/kvm).
fn run_l1(label: &str, smp: u8, scenarios: &[Scenario<'_>], files: &[PathBuf]) -> L1Report {
    let _one_at_a_time = L1.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir();
    let init = dir.join("init");
    std::fs::write(&init, init_script(scenarios)).unwrap();
    let cpio = dir.join("l1.cpio");
    let mut build = Command::new(repo_root().join("scripts/nested/build-l1.sh"));
    build
        .arg(&cpio)
        .arg(&init)
        .arg(common::vmm_bin())
        .args(files);
    let built = common::run_with_timeout(&mut build, Duration::from_secs(120));
    assert_eq!(built.code, Some(0), "building the L1 initramfs: {built:?}");

    let console = dir.join("l1-console.log");
    let results = dir.join("l1-results.log");
    let monitor = dir.join("qemu-monitor.sock");
    let started = Instant::now();
    let mut qemu = ChildGuard::spawn(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max", "-m", "2048"])
            .args(["-smp", &smp.to_string()])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", results.display()))
            .arg("-kernel")
            .arg(repo_root().join(".cache/linux/vmlinuz"))
            .arg("-initrd")
            .arg(&cpio)
            .arg("-append")
            .arg(l1_cmdline())
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let ended = wait_l1(&mut qemu, &[&console, &results], &monitor);
    let elapsed = started.elapsed();
    let report = L1Report {
        report: std::fs::read_to_string(&results).unwrap_or_default(),
        console: std::fs::read_to_string(&console).unwrap_or_default(),
    };
    match ended {
        L1End::PoweredOff => {}
        L1End::TimedOut => panic!(
            "L1 ({label}) did not power off within {L1_TIMEOUT:?}\n{}",
            report.context()
        ),
        L1End::Silent(dump) => panic!(
            "L1 ({label}) went silent for {L1_SILENCE:?} after {:.1?} (no liveness line: the \
             emulated machine stopped)\n{}\n--- QEMU monitor ---\n{dump}",
            elapsed - L1_SILENCE,
            report.context()
        ),
    }
    assert_eq!(
        report.result("kvm").map(|r| r.0),
        Some(0),
        "L1 ({label}) has no /dev/kvm after loading kvm-amd\n{}",
        report.context()
    );
    eprintln!(
        "nested tier ({label}): L1 of {smp} CPU ran {elapsed:.1?} in all; /dev/kvm (kvm-amd) after {} s of L1 uptime",
        report.result("kvm").map(|r| r.1).unwrap_or_default()
    );
    report
}

/// The L1 kernel's command line: `RELIVE_NESTED_L1_APPEND` adds to it
/// (for experiments on the emulated machine, e.g. its idle and timer modes).
fn l1_cmdline() -> String {
    let mut cmdline = String::from("console=ttyS0 panic=-1 quiet");
    if let Ok(extra) = std::env::var("RELIVE_NESTED_L1_APPEND") {
        cmdline.push(' ');
        cmdline.push_str(&extra);
    }
    cmdline
}

/// How an L1 run ended.
enum L1End {
    PoweredOff,
    TimedOut,
    /// Its serial ports were silent for [`L1_SILENCE`]; what QEMU's monitor
    /// said of its CPU then.
    Silent(String),
}

/// Waits for the L1 to power off, at most [`L1_TIMEOUT`], watching that
/// its serial `logs` keep growing.
fn wait_l1(qemu: &mut ChildGuard, logs: &[&Path], monitor: &Path) -> L1End {
    let started = Instant::now();
    let mut last_len = 0;
    let mut last_change = started;
    loop {
        if qemu.try_wait().is_some() {
            return L1End::PoweredOff;
        }
        let len: u64 = logs
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        if len != last_len {
            last_len = len;
            last_change = Instant::now();
        }
        if last_change.elapsed() >= L1_SILENCE {
            return L1End::Silent(monitor_dump(monitor));
        }
        if started.elapsed() >= L1_TIMEOUT {
            return L1End::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where the L1's emulated CPU is, asked of QEMU's human monitor three
/// times a second apart (a CPU spinning in one place shows the same `RIP`;
/// in guest mode the registers are the L2's).
fn monitor_dump(monitor: &Path) -> String {
    use std::io::{Read, Write};
    let mut stream = match std::os::unix::net::UnixStream::connect(monitor) {
        Ok(stream) => stream,
        Err(e) => return format!("cannot connect to {}: {e}", monitor.display()),
    };
    stream
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    for _ in 0..3 {
        let asked = stream.write_all(b"info status\ninfo cpus\ninfo registers\nx/6i $pc\n");
        if let Err(e) = asked {
            out.extend_from_slice(format!("\n(monitor write failed: {e})\n").as_bytes());
            break;
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    }
    // The monitor's line editing writes escape sequences; keep the text.
    String::from_utf8_lossy(&out)
        .replace("\u{1b}[D", "")
        .replace("\u{1b}[K", "")
        .replace('\r', "")
}

/// Whether the tier can run here; prints why not (or fails under
/// `RELIVE_REQUIRE_KVM=1`).
fn tier_available() -> bool {
    match missing_prerequisite() {
        None => true,
        Some(reason) => {
            assert!(
                !env_flag("RELIVE_REQUIRE_KVM"),
                "the nested tier cannot run: {reason}, and RELIVE_REQUIRE_KVM=1 forbids skipping"
            );
            eprintln!("skipping the nested real-KVM tier: {reason}");
            false
        }
    }
}

#[test]
fn relive_passes_its_restore_and_vmm_tests_on_kvm_amd_nested_under_qemu() {
    if !tier_available() {
        return;
    }
    if let Some(path) = std::env::var_os("RELIVE_NESTED_SCRIPT").map(PathBuf::from) {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let scenarios = [("script", file, &[][..])];
        // Extra files for the script: RELIVE_NESTED_FILES=path:path...
        let mut files = vec![path];
        if let Some(extra) = std::env::var_os("RELIVE_NESTED_FILES") {
            files.extend(std::env::split_paths(&extra));
        }
        // RELIVE_NESTED_SMP=N: an L1 of N CPUs (default 1).
        let smp = std::env::var("RELIVE_NESTED_SMP")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let report = run_l1("script", smp, &scenarios, &files);
        eprintln!("{}", report.context());
        report.assert_passed("script", &scenarios);
        return;
    }
    let binaries: Vec<PathBuf> = SCENARIOS.iter().map(|(_, t, _)| test_binary(t)).collect();
    let scenarios: Vec<Scenario<'_>> = SCENARIOS
        .iter()
        .zip(&binaries)
        .map(|((name, _, args), bin)| {
            let file = bin.file_name().unwrap().to_string_lossy().into_owned();
            (*name, file, *args)
        })
        .collect();
    run_l1("relive tests", 1, &scenarios, &binaries).assert_passed("relive tests", &scenarios);
}

/// Runs `tests/nested/linux.sh` (Debian's cloud kernel as the L2 guest)
/// in an L1 of `smp` CPUs and asserts that it passed.
fn linux_scenario(smp: u8) {
    let dir = temp_dir();
    let l2_init = dir.join("l2-init");
    std::fs::write(&l2_init, L2_INIT).unwrap();
    let l2_cpio = dir.join("l2.cpio");
    let mut build = Command::new(repo_root().join("scripts/nested/build-l1.sh"));
    build.arg("--no-modules").arg(&l2_cpio).arg(&l2_init);
    let built = common::run_with_timeout(&mut build, Duration::from_secs(120));
    assert_eq!(built.code, Some(0), "building the L2 initramfs: {built:?}");
    let files = [
        l2_cpio,
        repo_root().join(".cache/linux/vmlinux"),
        repo_root().join(".cache/linux/vmlinuz"),
        repo_root().join("tests/nested/linux.sh"),
    ];
    let scenarios = [("linux", "linux.sh".to_string(), &[][..])];
    let label = format!("linux, {smp} L1 CPU");
    let report = run_l1(&label, smp, &scenarios, &files);
    for line in report.report.lines().filter(|l| l.starts_with("linux ")) {
        eprintln!("nested tier ({label}): {line}");
    }
    report.assert_passed(&label, &scenarios);
}

#[test]
fn linux_guests_reach_userspace_power_off_as_a_typed_exit_and_restore_where_they_were() {
    if !tier_available() || std::env::var_os("RELIVE_NESTED_SCRIPT").is_some() {
        return;
    }
    // One L1 CPU: one vCPU (relive-vmm allows no more vCPUs than cores).
    linux_scenario(1);
}

/// Not in the default run (`cargo test --test nested -- --ignored` runs it):
/// the same on two L1 CPUs, so that a guest of two vCPUs fits. An L1 of two
/// CPUs under QEMU 7.2's TCG now and then wedges for good (QEMU idle, no L1
/// timer firing), seen in about one run in five with two L1 CPUs (with
/// multi-threaded and with single-threaded TCG), and in every run where an
/// L2 Linux rebooted without `reboot=k` (it then spins in a real-mode BIOS
/// restart a microVM has no firmware for: see `tests/nested/linux.sh`); an
/// L1 of one CPU never did. Until that is understood, a wedge would fail CI
/// after [`L1_TIMEOUT`] for reasons outside relive.
#[test]
#[ignore = "a two-CPU L1 under TCG wedges now and then; run with --ignored"]
fn linux_guests_get_both_cpus_of_two_and_restore_where_they_were() {
    if !tier_available() || std::env::var_os("RELIVE_NESTED_SCRIPT").is_some() {
        return;
    }
    linux_scenario(2);
}

/// The container test's app (`/app.sh` in its image): counts in `/counter`
/// (a file in the initramfs, so in guest memory), each second one line with
/// the count, 8 bytes of `/dev/urandom` and the guest's clock, on stdout
/// (to `relive logs`) and on the console (which keeps every run's lines);
/// `SIGUSR1` makes it exit 3, `SIGUSR2` exit 0.
const CONTAINER_APP: &str = r#"#!/bin/sh
trap 'echo "app: failing on purpose"; exit 3' USR1
trap 'echo "app: done"; exit 0' USR2
echo "greeting $GREETING"
n=$(cat /counter 2>/dev/null || echo 0)
echo "app: starting at count $n"
while true; do
    n=$((n + 1))
    echo $n >/counter
    line="count $n rand $(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n') time $(date +%s)"
    echo "$line"
    echo "$line" >/dev/console
    sleep 1
done
"#;

/// In the default run. Its L1 "stopped for good" in 2 of 10 runs of an
/// earlier session; 24 runs since the L1 prints a liveness line and the
/// test stops a silent L1 after [`L1_SILENCE`] with QEMU's monitor's view
/// of its CPU showed no stop, and found two defects (both fixed): a VMM
/// ended by its seccomp filter when glibc opened a file on a vCPU thread,
/// and this scenario reading a half-written console line.
#[test]
fn container_apps_run_log_fail_over_and_reseed_on_kvm_amd_nested_under_qemu() {
    if !tier_available() || std::env::var_os("RELIVE_NESTED_SCRIPT").is_some() {
        return;
    }
    let dir = temp_dir();
    // The image: Debian's static busybox and the app, as a root directory.
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "head", "od", "tr", "date", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
    std::fs::write(root.join("app.sh"), CONTAINER_APP).unwrap();
    std::fs::set_permissions(
        root.join("app.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let relive = relive_testkit::bins::beside_exe("relive").unwrap();
    let cpio = dir.join("app.cpio");
    let started = Instant::now();
    let built = common::run_with_timeout(
        Command::new(&relive)
            .args(["image", "build"])
            .arg(&root)
            .arg("-o")
            .arg(&cpio)
            .args([
                "--entrypoint",
                r#"["/bin/sh", "/app.sh"]"#,
                "--env",
                "PATH=/bin",
            ]),
        Duration::from_secs(60),
    );
    assert_eq!(built.code, Some(0), "relive image build: {built:?}");
    eprintln!(
        "nested tier (container): busybox image built in {:.2?}: {} bytes",
        started.elapsed(),
        std::fs::metadata(&cpio).unwrap().len()
    );
    let files = [
        cpio,
        repo_root().join(".cache/linux/vmlinux"),
        relive,
        repo_root().join("tests/nested/container.sh"),
    ];
    let scenarios = [("container", "container.sh".to_string(), &[][..])];
    let report = run_l1("container", 1, &scenarios, &files);
    for line in report
        .report
        .lines()
        .filter(|l| l.starts_with("container: "))
    {
        eprintln!("nested tier (container): {line}");
    }
    report.assert_passed("container", &scenarios);
}
