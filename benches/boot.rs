//! Boot benchmark of `relive-vmm`: how fast a fresh VMM process gets the
//! bundled guest to say `ready`, and how much memory the VMM itself costs.
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench boot
//! ```
//!
//! It drives the real binary, `target/release/relive-vmm` (found next to this
//! bench's own executable), and is not a timed test: it prints figures, with
//! the project's targets beside them, and exits 0 whether or not they are met.
//! Where `/dev/kvm` cannot be used it prints why and exits 0 (1 when
//! `RELIVE_REQUIRE_KVM=1`).
//!
//! Each of N runs (`RELIVE_BENCH_RUNS`, default 20, after one discarded
//! warm-up run) does:
//! 1. *Baseline*: spawn `relive-vmm --version` and wait for it: the bare cost of
//!    starting the binary, measured in the same run so that figures read as
//!    ratios on any machine.
//! 2. *Ready latency*: read CLOCK_MONOTONIC, spawn
//!    `relive-vmm run --mem-mib 128 --control <tmp>/ctl.sock --console <tmp>/console.log`,
//!    poll `status` on the control socket until `agent.ready_monotonic_ns` is
//!    set (the VMM stamps it with the same host-wide clock when the guest says
//!    `ready`), and take the difference.
//! 3. *Memory*: after ~300 ms of heartbeats, read `VmRSS` (and its
//!    `RssAnon`/`RssFile`/`RssShmem` split) from `/proc/<pid>/status` and
//!    `guest_resident_bytes` from `status`; the VMM's overhead is the
//!    difference. `guest_resident_bytes` comes from mincore(2), which also
//!    counts guest pages that are only mapped to the shared zero page (and so
//!    not in VmRSS), so the bench also prints the exact figure from
//!    `/proc/<pid>/smaps`: the RSS of every mapping except guest memory.
//! 4. *Exits*: vCPU exits per second of heartbeat time, from `ready` to the
//!    last heartbeat (exits are expensive on nested KVM: ~35 µs each here).
//! 5. `shutdown` on the control socket, then reap the process. A VMM that
//!    outlives its run is killed: no process is left behind.
//!
//! Output: a small table, where the last run's RSS goes, and one final line
//! `BENCH boot {json}` with every figure, for scripts.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use relive_control::{error_chain, ControlClient, ExitReason, Request, Response, VmStatus};
use relive_testkit::bins::{beside_exe, newer_source_than};
use relive_testkit::{env_count, host_note, kvm_usable, ns_to_ms, tail, verdict, Summary, TempDir};
use relive_vmm::vm::monotonic_ns;

/// Errors of a bench are reported as text.
type Result<T> = std::result::Result<T, String>;

/// Runs when `RELIVE_BENCH_RUNS` is not set.
const DEFAULT_RUNS: usize = 20;
/// Guest memory of every run.
const MEM_MIB: u64 = 128;
/// Target: median spawn -> ready.
const READY_TARGET_MS: f64 = 50.0;
/// Target: VMM overhead (VmRSS - guest resident), every run.
const OVERHEAD_TARGET_MIB: f64 = 5.0;
/// Heartbeat time between `ready` and the memory reading.
const HEARTBEAT_WINDOW: Duration = Duration::from_millis(300);
/// Longest wait for `ready` before the run counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the VMM to exit after `shutdown`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two control-socket polls (short: it bounds the error of the
/// socket-up figure; a poll costs the VMM a few microseconds).
const POLL_INTERVAL: Duration = Duration::from_micros(250);

const MIB: f64 = (1u64 << 20) as f64;

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    if let Err(reason) = kvm_usable() {
        if std::env::var("RELIVE_REQUIRE_KVM").as_deref() == Ok("1") {
            return Err(format!("{reason} (and RELIVE_REQUIRE_KVM=1)"));
        }
        println!("boot bench: skipped: {reason}");
        return Ok(());
    }
    let vmm = beside_exe("relive-vmm")?;
    let runs = env_count("RELIVE_BENCH_RUNS", DEFAULT_RUNS)?;
    if let Some(newer) = newer_source_than(&vmm) {
        eprintln!(
            "boot bench: warning: {} is newer than {}: figures are for an old build; \
             run `cargo build --release --workspace` first",
            newer.display(),
            vmm.display()
        );
    }
    let cmdline = format!("relive.hb_ms={}", relive_images::guest::DEFAULT_HB_MS);
    println!("relive-vmm boot benchmark");
    println!("  binary  {}", vmm.display());
    println!("  guest   bundled, cmdline {cmdline:?} (default), {MEM_MIB} MiB, 1 vCPU");
    println!("  runs    {runs} (+1 warm-up discarded; RELIVE_BENCH_RUNS to change)");
    println!("  host    {}", host_note());

    let scratch = TempDir::create("relive-bench-boot")
        .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    baseline_run(&vmm)?;
    vm_run(&vmm, &scratch.join("warm-up"), false).map_err(|e| format!("warm-up run: {e}"))?;
    // As root, each run also boots a jailed VMM (`--jail 65534:65534`, what
    // the supervisor starts as root), interleaved so both see the same host.
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let jail = unsafe { libc::geteuid() } == 0;
    if !jail {
        println!("  note    not root: the jailed runs are left out");
    }
    let mut baselines = Vec::with_capacity(runs);
    let mut vms = Vec::with_capacity(runs);
    let mut jailed = Vec::with_capacity(runs);
    for i in 0..runs {
        baselines.push(baseline_run(&vmm)?);
        let run = vm_run(&vmm, &scratch.join(format!("run-{i}")), false)
            .map_err(|e| format!("run {}/{runs}: {e}", i + 1))?;
        vms.push(run);
        if jail {
            let run = vm_run(&vmm, &scratch.join(format!("jailed-{i}")), true)
                .map_err(|e| format!("jailed run {}/{runs}: {e}", i + 1))?;
            jailed.push(run);
        }
    }
    report(runs, &baselines, &vms);
    if jail {
        report_jail(&vms, &jailed);
    }
    Ok(())
}

/// The jail's cost: ready latency and the VMM's own memory, jailed against
/// unjailed runs of the same bench.
fn report_jail(vms: &[VmRun], jailed: &[VmRun]) {
    let ready = |runs: &[VmRun]| Summary::of(&runs.iter().map(|r| r.ready_ms).collect::<Vec<_>>());
    let overhead = |runs: &[VmRun]| {
        Summary::of(&runs.iter().map(VmRun::overhead).collect::<Vec<_>>()).map(|s| s.scaled(MIB))
    };
    println!();
    println!("jailed (--jail 65534:65534) against unjailed, same runs:");
    if let (Some(free), Some(jail)) = (ready(vms), ready(jailed)) {
        println!(
            "  spawn -> ready       {:.2} / {:.2} ms jailed, {:.2} / {:.2} ms unjailed (median / p90): {:+.2} ms, ratio {:.2}",
            jail.median,
            jail.p90,
            free.median,
            free.p90,
            jail.median - free.median,
            jail.median / free.median
        );
    }
    if let (Some(free), Some(jail)) = (overhead(vms), overhead(jailed)) {
        println!(
            "  VMM overhead (RSS)   {:.2} MiB jailed, {:.2} MiB unjailed (median)",
            jail.median, free.median
        );
    }
    println!(
        "BENCH boot-jail {}",
        serde_json::json!({
            "ready_ms_jailed": ready(jailed).map(|s| s.median),
            "ready_ms_jailed_p90": ready(jailed).map(|s| s.p90),
            "ready_ms_unjailed": ready(vms).map(|s| s.median),
            "ready_ms_unjailed_p90": ready(vms).map(|s| s.p90),
        })
    );
}

/// A child VMM that is killed and reaped if it is still running when dropped.
struct Vmm {
    child: Child,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Spawn + wait of `relive-vmm --version`, in ms.
fn baseline_run(vmm: &Path) -> Result<f64> {
    let mut cmd = Command::new(vmm);
    cmd.arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = monotonic_ns();
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {} --version: {e}", vmm.display()))?;
    let end = monotonic_ns();
    if !status.success() {
        return Err(format!("{} --version failed: {status}", vmm.display()));
    }
    Ok(ns_to_ms(end.saturating_sub(start)))
}

/// Figures of one VM run.
struct VmRun {
    /// Spawn -> the guest's `ready`, ms.
    ready_ms: f64,
    /// Spawn -> the control socket accepts a connection, ms (to one poll).
    socket_ms: f64,
    /// vCPU exits counted at the first `status` that saw `ready`.
    exits_at_ready: u64,
    /// vCPU exits per second from `ready` to the last heartbeat.
    exits_per_s: f64,
    /// `guest_resident_bytes` from `status`.
    guest_resident: u64,
    /// `/proc/<pid>/status` fields, bytes.
    proc: ProcMemory,
    /// RSS by mapping kind, from `/proc/<pid>/smaps`.
    smaps: Option<Smaps>,
}

impl VmRun {
    /// VmRSS - guest_resident_bytes, the overhead as the VMM reports it.
    fn overhead(&self) -> f64 {
        self.proc.vm_rss as f64 - self.guest_resident as f64
    }

    /// RSS of every mapping but guest memory (exact).
    fn overhead_smaps(&self) -> Option<f64> {
        let smaps = self.smaps.as_ref()?;
        smaps.guest_found.then(|| {
            smaps
                .kinds
                .iter()
                .filter(|(k, _)| *k != Kind::Guest)
                .map(|(_, u)| u.rss as f64)
                .sum()
        })
    }
}

/// One VMM booted to `ready` (jailed with `jail`: its figures are then the
/// jailed VMM's, the child of the process spawned).
fn vm_run(vmm: &Path, dir: &Path, jail: bool) -> Result<VmRun> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let socket = dir.join("ctl.sock");
    let console = dir.join("console.log");
    let stderr_path = dir.join("vmm.stderr");
    let stderr = File::create(&stderr_path)
        .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
    let mut cmd = Command::new(vmm);
    cmd.arg("run")
        .arg("--mem-mib")
        .arg(MEM_MIB.to_string())
        .arg("--control")
        .arg(&socket)
        .arg("--console")
        .arg(&console)
        .env_remove("RELIVE_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    if jail {
        cmd.args(["--jail", "65534:65534"]);
    }

    let spawn_ns = monotonic_ns();
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm.display()))?;
    let mut vm = Vmm { child };
    let mut pid = vm.child.id();
    let failed = |vm: &mut Vmm, what: String| {
        let _ = vm.child.kill();
        let _ = vm.child.wait();
        format!(
            "{what}\n  VMM stderr:\n{}\n  console:\n{}",
            tail(&stderr_path),
            tail(&console)
        )
    };

    let deadline = Instant::now() + READY_TIMEOUT;
    let (mut client, socket_ns) = loop {
        if let Ok(Some(status)) = vm.child.try_wait() {
            return Err(failed(&mut vm, format!("the VMM exited early ({status})")));
        }
        if let Ok(client) = ControlClient::connect(&socket) {
            break (client, monotonic_ns());
        }
        if Instant::now() > deadline {
            return Err(failed(
                &mut vm,
                format!("the control socket did not come up within {READY_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    let (at_ready, ready_ns) = loop {
        let status = match status(&mut client) {
            Ok(s) => s,
            Err(e) => return Err(failed(&mut vm, e)),
        };
        if let Some(ns) = status.agent.ready_monotonic_ns {
            break (status, ns);
        }
        if Instant::now() > deadline {
            return Err(failed(
                &mut vm,
                format!("the guest did not say ready within {READY_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    if jail {
        // The jailed VMM is the spawned process's child; it names itself.
        pid = at_ready.pid;
    }
    if at_ready.pid != pid {
        return Err(failed(
            &mut vm,
            format!("status reports pid {}, spawned {pid}", at_ready.pid),
        ));
    }
    if ready_ns < spawn_ns {
        return Err(failed(
            &mut vm,
            "ready_monotonic_ns precedes the spawn: not CLOCK_MONOTONIC?".into(),
        ));
    }

    std::thread::sleep(HEARTBEAT_WINDOW);
    let after = match status(&mut client) {
        Ok(s) => s,
        Err(e) => return Err(failed(&mut vm, e)),
    };
    let proc = match ProcMemory::read(pid) {
        Ok(p) => p,
        Err(e) => return Err(failed(&mut vm, e)),
    };
    let smaps = Smaps::read(pid, MEM_MIB << 20);
    let exits_per_s = heartbeat_exit_rate(&at_ready, &after);

    match client.request(&Request::Shutdown) {
        Ok(Response::Ok) => {}
        Ok(other) => return Err(failed(&mut vm, format!("shutdown answered {other:?}"))),
        Err(e) => return Err(failed(&mut vm, format!("shutdown: {}", error_chain(&e)))),
    }
    drop(client);
    let exited = Instant::now() + EXIT_TIMEOUT;
    let code = loop {
        match vm.child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if Instant::now() < exited => std::thread::sleep(POLL_INTERVAL),
            Ok(None) => {
                return Err(failed(
                    &mut vm,
                    format!("the VMM did not exit within {EXIT_TIMEOUT:?} of shutdown"),
                ))
            }
            Err(e) => return Err(failed(&mut vm, format!("cannot reap the VMM: {e}"))),
        }
    };
    if code != Some(ExitReason::Shutdown.status()) {
        return Err(failed(
            &mut vm,
            format!(
                "the VMM exited with {code:?} after shutdown, expected {}",
                ExitReason::Shutdown.status()
            ),
        ));
    }

    Ok(VmRun {
        ready_ms: ns_to_ms(ready_ns - spawn_ns),
        socket_ms: ns_to_ms(socket_ns.saturating_sub(spawn_ns)),
        exits_at_ready: at_ready.vcpu_exits,
        exits_per_s,
        guest_resident: after.guest_resident_bytes,
        proc,
        smaps,
    })
}

/// vCPU exits per second between the guest's `ready` and its last heartbeat.
///
/// Both ends are guest lines (each one exit), placed on the VMM's uptime clock
/// with the line ages of `status`, so the figure does not depend on how many
/// heartbeats a fixed window happens to catch. Falls back to the plain window
/// between the two `status` calls when no heartbeat came.
fn heartbeat_exit_rate(at_ready: &VmStatus, after: &VmStatus) -> f64 {
    let exits = after.vcpu_exits.saturating_sub(at_ready.vcpu_exits) as f64;
    let ready_at = at_ready
        .agent
        .last_line_age_ms
        .map(|age| at_ready.uptime_ms.saturating_sub(age));
    let last_hb_at = after
        .agent
        .last_heartbeat_age_ms
        .map(|age| after.uptime_ms.saturating_sub(age));
    let span_ms = match (ready_at, last_hb_at) {
        (Some(ready), Some(hb)) if hb > ready => hb - ready,
        _ => after.uptime_ms.saturating_sub(at_ready.uptime_ms),
    };
    if span_ms == 0 {
        return 0.0;
    }
    exits * 1000.0 / span_ms as f64
}

fn status(client: &mut ControlClient) -> Result<VmStatus> {
    match client.request(&Request::Status) {
        Ok(Response::Status(status)) => Ok(*status),
        Ok(other) => Err(format!("status answered {other:?}")),
        Err(e) => Err(format!("status: {}", error_chain(&e))),
    }
}

/// Memory fields of `/proc/<pid>/status`, in bytes.
struct ProcMemory {
    vm_rss: u64,
    rss_anon: Option<u64>,
    rss_file: Option<u64>,
    rss_shmem: Option<u64>,
    threads: Option<u64>,
}

impl ProcMemory {
    fn read(pid: u32) -> Result<ProcMemory> {
        let path = format!("/proc/{pid}/status");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        };
        let kib = |name: &str| field(name).map(|v| v * 1024);
        Ok(ProcMemory {
            vm_rss: kib("VmRSS").ok_or_else(|| format!("{path} has no VmRSS"))?,
            rss_anon: kib("RssAnon"),
            rss_file: kib("RssFile"),
            rss_shmem: kib("RssShmem"),
            threads: field("Threads"),
        })
    }
}

/// What a mapping of the VMM holds, by a simple reading of `/proc/<pid>/smaps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Guest,
    Binary,
    Libraries,
    Heap,
    ThreadStacks,
    OtherAnon,
    MainStack,
    Kvm,
    Other,
}

impl Kind {
    const ALL: [Kind; 9] = [
        Kind::Binary,
        Kind::Libraries,
        Kind::Heap,
        Kind::ThreadStacks,
        Kind::OtherAnon,
        Kind::MainStack,
        Kind::Kvm,
        Kind::Other,
        Kind::Guest,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::Guest => "guest memory (the mem-mib anonymous map)",
            Kind::Binary => "relive-vmm binary (text, rodata, data)",
            Kind::Libraries => "shared libraries (libc, ld.so, libgcc_s)",
            Kind::Heap => "[heap] (main malloc arena)",
            Kind::ThreadStacks => "anonymous 2 MiB maps (thread stacks)",
            Kind::OtherAnon => "other anonymous (thread arenas, TLS, bss)",
            Kind::MainStack => "[stack] (main thread)",
            Kind::Kvm => "KVM maps (kvm_run of each vCPU)",
            Kind::Other => "other ([vdso], [vvar], ...)",
        }
    }

    fn of(path: &str, size: u64, guest_size: u64) -> Kind {
        match path {
            "" if size == guest_size => Kind::Guest,
            "" if size == 2 << 20 => Kind::ThreadStacks,
            "" => Kind::OtherAnon,
            "[heap]" => Kind::Heap,
            "[stack]" => Kind::MainStack,
            p if p.starts_with("anon_inode:kvm") => Kind::Kvm,
            p if p.ends_with("/relive-vmm") => Kind::Binary,
            p if p.contains(".so") => Kind::Libraries,
            _ => Kind::Other,
        }
    }
}

/// RSS and PSS, bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    rss: u64,
    pss: u64,
}

/// A VMM's RSS by mapping kind.
struct Smaps {
    kinds: Vec<(Kind, Usage)>,
    guest_found: bool,
}

impl Smaps {
    fn read(pid: u32, guest_size: u64) -> Option<Smaps> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
        let mut kinds: Vec<(Kind, Usage)> =
            Kind::ALL.iter().map(|k| (*k, Usage::default())).collect();
        let mut guest_found = false;
        let mut current = Kind::Other;
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            if let Some((start, end)) = first.split_once('-') {
                if let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
                {
                    // address perms offset dev inode [path]
                    let path = words.nth(4).unwrap_or("");
                    current = Kind::of(path, end.saturating_sub(start), guest_size);
                    guest_found |= current == Kind::Guest;
                    continue;
                }
            }
            let kib = words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024;
            let slot = kinds.iter_mut().find(|(k, _)| *k == current);
            if let Some((_, usage)) = slot {
                match first {
                    "Rss:" => usage.rss += kib,
                    "Pss:" => usage.pss += kib,
                    _ => {}
                }
            }
        }
        Some(Smaps { kinds, guest_found })
    }
}

/// Width of the label column of the table.
const LABEL: usize = 38;

fn row(label: &str, unit: &str, digits: usize, s: Option<Summary>, target: &str) {
    match s {
        Some(s) => println!(
            "  {label:<LABEL$} {unit:>4} {:>9.digits$} {:>9.digits$} {:>9.digits$} {:>9.digits$}   {target}",
            s.median, s.p90, s.min, s.max
        ),
        None => println!("  {label:<LABEL$} {unit:>4} {:>9}   (not available)", "-"),
    }
}

fn report(runs: usize, baselines: &[f64], vms: &[VmRun]) {
    let ready = Summary::of(&vms.iter().map(|r| r.ready_ms).collect::<Vec<f64>>());
    let socket = Summary::of(&vms.iter().map(|r| r.socket_ms).collect::<Vec<f64>>());
    let baseline = Summary::of(baselines);
    let overhead =
        Summary::of(&vms.iter().map(VmRun::overhead).collect::<Vec<f64>>()).map(|s| s.scaled(MIB));
    let overhead_smaps = Summary::of(
        &vms.iter()
            .filter_map(VmRun::overhead_smaps)
            .collect::<Vec<f64>>(),
    )
    .map(|s| s.scaled(MIB));
    let guest = Summary::of(
        &vms.iter()
            .map(|r| r.guest_resident as f64)
            .collect::<Vec<f64>>(),
    )
    .map(|s| s.scaled(MIB));
    let vm_rss = Summary::of(
        &vms.iter()
            .map(|r| r.proc.vm_rss as f64)
            .collect::<Vec<f64>>(),
    )
    .map(|s| s.scaled(MIB));
    let split = |f: fn(&ProcMemory) -> Option<u64>| {
        Summary::of(
            &vms.iter()
                .filter_map(|r| f(&r.proc))
                .map(|b| b as f64)
                .collect::<Vec<f64>>(),
        )
        .map(|s| s.scaled(MIB))
    };
    let rss_anon = split(|p| p.rss_anon);
    let rss_file = split(|p| p.rss_file);
    let rss_shmem = split(|p| p.rss_shmem);
    let threads = Summary::of(
        &vms.iter()
            .filter_map(|r| r.proc.threads)
            .map(|t| t as f64)
            .collect::<Vec<f64>>(),
    );
    let exits_at_ready = Summary::of(
        &vms.iter()
            .map(|r| r.exits_at_ready as f64)
            .collect::<Vec<f64>>(),
    );
    let exits_per_s = Summary::of(&vms.iter().map(|r| r.exits_per_s).collect::<Vec<f64>>());
    let ratio = match (ready, baseline) {
        (Some(r), Some(b)) if b.median > 0.0 => Some(r.median / b.median),
        _ => None,
    };
    let ready_ok = ready.is_some_and(|s| s.median < READY_TARGET_MS);
    let overhead_ok = overhead.is_some_and(|s| s.max < OVERHEAD_TARGET_MIB);

    println!();
    println!(
        "  {:<LABEL$} {:>4} {:>9} {:>9} {:>9} {:>9}   target",
        "", "", "median", "p90", "min", "max"
    );
    let ready_target = format!("median < {READY_TARGET_MS} ms: {}", verdict(ready_ok));
    row("spawn -> guest ready", "ms", 2, ready, &ready_target);
    row("spawn -> control socket up", "ms", 2, socket, "");
    row("baseline: spawn+wait `--version`", "ms", 2, baseline, "");
    match ratio {
        Some(x) => println!(
            "  {:<LABEL$} {:>4} {x:>9.1}",
            "ready / baseline (medians)", "x"
        ),
        None => println!(
            "  {:<LABEL$} {:>4} {:>9}",
            "ready / baseline (medians)", "x", "-"
        ),
    }
    let overhead_target = format!(
        "every run < {OVERHEAD_TARGET_MIB} MiB: {}",
        verdict(overhead_ok)
    );
    row(
        "VMM overhead (VmRSS - guest)",
        "MiB",
        2,
        overhead,
        &overhead_target,
    );
    row(
        "VMM overhead (smaps: non-guest RSS)",
        "MiB",
        2,
        overhead_smaps,
        "",
    );
    row("guest resident (status)", "MiB", 2, guest, "");
    row("VmRSS", "MiB", 2, vm_rss, "");
    row("  RssAnon (guest, heap, stacks)", "MiB", 2, rss_anon, "");
    row("  RssFile (binary, libraries)", "MiB", 2, rss_file, "");
    row("  RssShmem", "MiB", 2, rss_shmem, "");
    row("VMM threads", "", 0, threads, "");
    row("vCPU exits until ready", "", 0, exits_at_ready, "");
    row("vCPU exits/s (heartbeat time)", "/s", 1, exits_per_s, "");

    let last = vms.last().and_then(|r| r.smaps.as_ref());
    if let Some(smaps) = last {
        println!();
        println!(
            "  where the VMM's RSS goes (last run, /proc/<pid>/smaps)        Rss KiB   Pss KiB"
        );
        for (kind, usage) in &smaps.kinds {
            if usage.rss > 0 || *kind == Kind::Guest {
                println!(
                    "    {:<58} {:>9} {:>9}",
                    kind.label(),
                    usage.rss / 1024,
                    usage.pss / 1024
                );
            }
        }
    }

    let json = |s: Option<Summary>, digits| s.map_or(serde_json::Value::Null, |s| s.json(digits));
    let line = serde_json::json!({
        "runs": runs,
        "mem_mib": MEM_MIB,
        "ready_ms": json(ready, 3),
        "control_socket_ms": json(socket, 3),
        "baseline_version_ms": json(baseline, 3),
        "ready_over_baseline": ratio.map(|x| (x * 100.0).round() / 100.0),
        "vmm_overhead_mib": json(overhead, 3),
        "vmm_overhead_smaps_mib": json(overhead_smaps, 3),
        "guest_resident_mib": json(guest, 3),
        "vm_rss_mib": json(vm_rss, 3),
        "rss_anon_mib": json(rss_anon, 3),
        "rss_file_mib": json(rss_file, 3),
        "rss_shmem_mib": json(rss_shmem, 3),
        "threads": json(threads, 0),
        "vcpu_exits_until_ready": json(exits_at_ready, 0),
        "vcpu_exits_per_s": json(exits_per_s, 1),
        "targets": {
            "ready_median_ms": READY_TARGET_MS,
            "vmm_overhead_max_mib": OVERHEAD_TARGET_MIB,
        },
        "ready_target_met": ready_ok,
        "overhead_target_met": overhead_ok,
    });
    println!();
    println!("BENCH boot {line}");
}
