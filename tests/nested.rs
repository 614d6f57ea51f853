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
//!    a hard time limit ([`L1_TIMEOUT`]);
//! 3. `/init` mounts what the tests need (proc, sys, devtmpfs, a tmpfs /tmp,
//!    cgroup2), loads the modules, and runs each scenario with
//!    `RELIVE_REQUIRE_KVM=1`; everything a scenario prints, and one line
//!    `RESULT <scenario> rc=<status> secs=<seconds>` after it, goes to the
//!    L1's second serial port, which QEMU writes to a file the host reads
//!    (the first carries the L1 kernel's console);
//! 4. the host asserts that every scenario ran and passed, and prints each
//!    one's time.
//!
//! For debugging, `RELIVE_NESTED_SCRIPT=FILE` runs the shell script FILE
//! (executable; `/bin/relive-vmm` is there) as the only scenario, and the
//! test prints what it said.
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

#[test]
fn relive_passes_its_restore_tests_on_kvm_amd_nested_under_qemu() {
    if let Some(reason) = missing_prerequisite() {
        assert!(
            !env_flag("RELIVE_REQUIRE_KVM"),
            "the nested tier cannot run: {reason}, and RELIVE_REQUIRE_KVM=1 forbids skipping"
        );
        eprintln!("skipping the nested real-KVM tier: {reason}");
        return;
    }
    let dir = temp_dir();
    let script = std::env::var_os("RELIVE_NESTED_SCRIPT").map(PathBuf::from);
    let (binaries, scenarios): (Vec<PathBuf>, Vec<Scenario<'_>>) = match &script {
        Some(path) => {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            (vec![path.clone()], vec![("script", file, &[][..])])
        }
        None => {
            let binaries: Vec<PathBuf> = SCENARIOS.iter().map(|(_, t, _)| test_binary(t)).collect();
            let scenarios = SCENARIOS
                .iter()
                .zip(&binaries)
                .map(|((name, _, args), bin)| {
                    let file = bin.file_name().unwrap().to_string_lossy().into_owned();
                    (*name, file, *args)
                })
                .collect();
            (binaries, scenarios)
        }
    };
    let init = dir.join("init");
    std::fs::write(&init, init_script(&scenarios)).unwrap();
    let cpio = dir.join("l1.cpio");
    let mut build = Command::new(repo_root().join("scripts/nested/build-l1.sh"));
    build.arg(&cpio).arg(&init).arg(common::vmm_bin());
    build.args(&binaries);
    let built = common::run_with_timeout(&mut build, Duration::from_secs(120));
    assert_eq!(built.code, Some(0), "building the L1 initramfs: {built:?}");

    let console = dir.join("l1-console.log");
    let results = dir.join("l1-results.log");
    let started = Instant::now();
    let mut qemu = ChildGuard::spawn(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "2048"])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", results.display()))
            .arg("-kernel")
            .arg(repo_root().join(".cache/linux/vmlinuz"))
            .arg("-initrd")
            .arg(&cpio)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let status = qemu.wait_timeout(L1_TIMEOUT);
    let elapsed = started.elapsed();
    let report = std::fs::read_to_string(&results).unwrap_or_default();
    let console_text = std::fs::read_to_string(&console).unwrap_or_default();
    let context = || {
        let tail: Vec<&str> = console_text.lines().collect();
        format!(
            "--- L1 results (ttyS1) ---\n{report}\n--- L1 console, last 40 lines ---\n{}",
            tail[tail.len().saturating_sub(40)..].join("\n")
        )
    };
    assert!(
        status.is_some(),
        "L1 did not power off within {L1_TIMEOUT:?}\n{}",
        context()
    );
    let result_of = |name: &str| -> Option<(i32, String)> {
        report.lines().find_map(|l| {
            let rest = l.strip_prefix(&format!("RESULT {name} rc="))?;
            let (rc, secs) = rest.split_once(" secs=")?;
            Some((rc.parse().ok()?, secs.trim().to_string()))
        })
    };
    assert_eq!(
        result_of("kvm").map(|r| r.0),
        Some(0),
        "L1 has no /dev/kvm after loading kvm-amd\n{}",
        context()
    );
    eprintln!(
        "nested tier: L1 ran {elapsed:.1?} in all; /dev/kvm (kvm-amd) after {} s of L1 uptime",
        result_of("kvm").map(|r| r.1).unwrap_or_default()
    );
    if script.is_some() {
        eprintln!("{}", context());
    }
    let mut failed = Vec::new();
    for (name, _, _) in &scenarios {
        match result_of(name) {
            Some((0, secs)) => eprintln!("nested tier: {name} passed in {secs} s"),
            Some((rc, secs)) => failed.push(format!("{name} failed (status {rc}, {secs} s)")),
            None => failed.push(format!("{name} did not finish")),
        }
    }
    assert!(failed.is_empty(), "{}\n{}", failed.join("; "), context());
}
