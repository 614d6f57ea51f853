//! Supervisor benchmark of `relive`: how fast a supervised VM runs again
//! after it fails, and what supervising a fleet costs the host.
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench failover
//! ```
//!
//! It drives the real binaries, `target/release/relive` and
//! `target/release/relive-vmm` (found next to this bench's own executable),
//! through the `relive` CLI, and is not a timed test: it prints figures, with
//! the project's targets beside them, and exits 0 whether or not they are met.
//! Where `/dev/kvm` cannot be used it prints why and exits 0 (1 when
//! `RELIVE_REQUIRE_KVM=1`). Every process it starts is stopped at the end (by
//! pid) and its state directories are removed.
//!
//! # 1. Failover time
//!
//! For each kind of failure (the VMM killed with SIGKILL, the pid taken from
//! `relive show VM --json`; a guest panic, `relive-vmm ctl SOCKET agent panic`)
//! and with and without a hot standby (`standby: true|false`), a fresh
//! `relive up` supervises one VM (bundled guest, 64 MiB, `relive.hb_ms=100`)
//! with a policy that makes the failures alternate between the two targets:
//!
//! - `ready_grace: 500ms`, `checkpoint_interval: 1s`, `failure_window: 3s`,
//!   `max_failures: 1000` (never `failed`), `restart_backoff: 0s`;
//! - a failure while the VM runs from a boot image (or its first boot) is a
//!   *first failure*: restore the latest **consistency** image;
//! - the next failure comes well within `failure_window` of that consistency
//!   restore: a *second failure*, restored from the (warm) **boot** image;
//! - before each failure the bench waits for the steady state: the VM
//!   `running`, its standby `ready` (with `standby: true`), and a consistency
//!   image taken *since the last restore* (`last_checkpoint` changed). That
//!   checkpoint also makes the images trusted again after a boot fallback, so
//!   the next failure is a first failure again.
//!
//! Each failover's target is read from the supervisor's events, not assumed;
//! N failovers (`RELIVE_BENCH_RUNS`, default 20) are kept per target. The
//! figures of one failover, from `relive events --json -n 1000`:
//!
//! - *detected -> running*: the `restored` event's `durations.total_ms`, the
//!   supervisor's own clock from the moment its VM task saw the failure to
//!   the guest running again (the figure the targets are about);
//! - *restore*: its `durations.restore_ms` (choosing and verifying the image,
//!   restoring it into the standby or a new VMM, opening the agent watch,
//!   recording the pid); *decide* (`durations.detect_ms`): detection to the
//!   start of the restore;
//!
//! and, from the bench's clock:
//!
//! - *trigger -> vCPUs running*: CLOCK_MONOTONIC just before the kill (or
//!   before spawning `relive-vmm ctl ... agent panic`) to the new VMM's own
//!   `vcpus_started_monotonic_ns` (`relive-vmm ctl SOCKET status --json`).
//!   It adds what the supervisor's figure cannot see: the kernel ending the
//!   process, the supervisor's task waking up (for a panic: the guest
//!   reacting to the agent line), and stops at the vCPUs, before the
//!   supervisor's own bookkeeping after the restore.
//!
//! # 2. Baseline: the raw restore of the same images
//!
//! After the last failover batch its supervisor and VMMs are stopped and the
//! bench restores that VM's images itself, N times each after one warm-up:
//! the consistency image `ImageStore::latest_good()` picks (what the
//! supervisor restores on a first failure: usually an incremental layer,
//! which the VMM merges with its chain before restoring), the newest full
//! consistency image when that is another one, and the boot image:
//! - *cold*: spawn `relive-vmm restore --image IMG` -> `vcpus_started_monotonic_ns`
//!   (as `cargo bench --bench restore` measures it);
//! - *standby*: a `relive-vmm standby` built beforehand, then the `restore`
//!   request's round trip on its control socket (and the VMM's own
//!   `restore_us`);
//! - the supervisor's other steps on their own: choosing the image
//!   (`ImageStore::open` + `latest_good`/`boot_image`), a `watch` right after
//!   the restore, writing the pid record.
//!
//! The table shows each failover median over the raw cold restore median of
//! the image its target restores.
//!
//! # 3. The supervisor's cost for a fleet
//!
//! `relive up` with 50 VMs of 64 MiB (bundled guest, `relive.hb_ms=100`,
//! `checkpoint_interval: 5s`, `standby: false` so that 50 more VMMs do not
//! crowd a 2-core, 24 GiB machine): once all 50 are `running` and each has
//! taken a checkpoint, the bench sits idle for `RELIVE_BENCH_FLEET_SECS`
//! (default 30) and reads `utime + stime` of the supervisor (and of the 50
//! VMMs, for context) from `/proc/PID/stat` before and after, and the
//! supervisor's `VmRSS` every second.
//!
//! Output: the table, the targets with a verdict each, where the time goes,
//! the fleet figures, and one line `BENCH failover {json}`.
//!
//! # 4. Failover at size
//!
//! One VM of 2 GiB whose guest touched T MiB at start
//! (`relive.touch_mib`; T = 16, the baseline in the same run, then 512 and
//! 1536), with and without a standby, policy `checkpoint_interval: 2s`,
//! `heartbeat_timeout: 1s`, `ready_grace: 5s` (the guest's boot touches
//! the memory), `failure_window: 5s` (every failure is a first failure: the
//! bench waits 5.5 s after each restore, then for a checkpoint taken since
//! and its verdict). `RELIVE_BENCH_SIZE_RUNS` (default 10)
//! kills of the VMM per (T, standby), each measured as in section 1. Prints
//! medians and p90s, failover(1536) / failover(16) per standby against the
//! target 1.5, and `BENCH failover-at-size {json}`.
//!
//! # 5. The checkpointing fleet
//!
//! 10 VMs of 1 GiB, checkpointed every 5 s, whose guests touched T MiB
//! (16, the baseline, then 512) and rewrite 64 pages of a 16 MiB hot set at
//! every heartbeat (`relive.dirty_pages`, `relive.dirty_mib`): CPU of the
//! supervisor and of the VMMs (split into the vCPU threads, the image-store
//! thread, and everything outside the vCPUs: checkpoint writers, event
//! loops) over `RELIVE_BENCH_CKPT_SECS` (default 60) once the fleet is past
//! its first checkpoints, with the checkpoints' mean time and pause from
//! `/metrics`, and `BENCH checkpointing-fleet {json}`.
//!
//! # 6. Failover across hosts (cluster mode)
//!
//! Three hosts (network namespaces on a bridge, a cgroup each, as in
//! `tests/cluster.rs`) share a three-member etcd; `lease_ttl: 3s`,
//! `keepalive_interval: 500ms`, `request_timeout: 500ms`, `fence_margin:
//! 1s`, `failover_grace: 500ms`, `replicas: 1`, `checkpoint_interval: 1s`.
//!
//! - *Host death*: one VM (64 MiB); `RELIVE_BENCH_CLUSTER_RUNS` (default 10)
//!   times its owner host is killed whole (`cgroup.kill`) once a checkpoint
//!   since its last restore was replicated, and the host that takes it
//!   over gives the split from its events: *detection* (the kill to its
//!   `owner-lost` event: the lease expiring, seen through the watch),
//!   *acquisition* (to `taken-over`: the grace and the owner transaction)
//!   and *restore* (to `restored`); the killed host's supervisor then
//!   starts again, empty, and joins. The replication lag of the image
//!   before each kill (`relive_replication_lag_seconds`: checkpoint report
//!   to manifest in etcd) is printed too.
//! - *etcd load*: 50 VMs of 64 MiB (`checkpoint_interval: 5s`) spread over
//!   the three hosts (started together: the VMs go to whichever claims
//!   first); once every VM runs and was replicated, the gRPC messages the
//!   etcd members received (`grpc_server_msg_received_total` on their
//!   `/metrics`, by method) over `RELIVE_BENCH_FLEET_SECS` (default 30) per
//!   second, and the 50 VMs' replication lags.
//!
//! Needs root, `ip`, cgroup2 and etcd (it says why it skips otherwise).
//!
//! `RELIVE_BENCH_SECTIONS=kinds,size,checkpointing,cluster` chooses
//! sections (1-3 are `kinds`); all run by default.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relive_control::{ClientError, ControlClient, Request, Response};
use relive_testkit::bins::{beside_exe, newer_source_than};
use relive_testkit::{
    env_count, kvm_usable, load_average, ns_to_ms, tail, verdict, Summary, TempDir,
};
#[path = "failover/cluster.rs"]
mod cluster;
use relive_vmm::vm::monotonic_ns;
use serde_json::{json, Value};

/// Errors of a bench are reported as text.
type Result<T> = std::result::Result<T, String>;

/// Failovers per (kind, target, standby) when `RELIVE_BENCH_RUNS` is not set.
const DEFAULT_RUNS: usize = 20;
/// Seconds of fleet sampling when `RELIVE_BENCH_FLEET_SECS` is not set.
const DEFAULT_FLEET_SECS: u64 = 30;
/// Guest memory of the failover batches' and the 50-VM fleet's VMs.
const MEM_MIB: u64 = 64;
/// Their bundled guest's command line: a heartbeat every 100 ms.
const CMDLINE: &str = "relive.hb_ms=100";
/// Guest memory of the at-size failovers (section 4).
const SIZE_MEM_MIB: u64 = 2048;
/// Touched memory of the at-size failovers, MiB: the baseline first.
const SIZE_TOUCHED: [u64; 3] = [16, 512, 1536];
/// Failovers per (size, standby) when `RELIVE_BENCH_SIZE_RUNS` is not set.
const DEFAULT_SIZE_RUNS: usize = 10;
/// Wait after each at-size failover: past `failure_window`.
const SIZE_GAP: Duration = Duration::from_millis(5500);
/// Target: failover(largest) / failover(smallest), medians.
const SIZE_RATIO_TARGET: f64 = 1.5;
/// The checkpointing fleet (section 5): VMs, guest memory, touched memory
/// (the baseline first), pages the guest rewrites per heartbeat.
const CKPT_VMS: usize = 10;
const CKPT_MEM_MIB: u64 = 1024;
const CKPT_TOUCHED: [u64; 2] = [16, 512];
const CKPT_DIRTY_PAGES: u64 = 64;
/// The hot set those pages are rewritten in (round robin), MiB: no larger
/// than the smallest touched size, so both sizes rewrite the same set.
const CKPT_HOT_MIB: u64 = 16;
/// Wait once every VM has its first checkpoint, before sampling: the first
/// full images (boot and consistency) are verified in the background then,
/// a cost paid once per VM, not per checkpoint.
const CKPT_WARMUP: Duration = Duration::from_secs(30);
/// Seconds of sampling per touched size when `RELIVE_BENCH_CKPT_SECS` is not set.
const DEFAULT_CKPT_SECS: u64 = 60;
/// Host deaths in section 6.
const DEFAULT_CLUSTER_RUNS: usize = 10;
/// The VM of the failover batches.
const VM: &str = "failover-bench";
/// VMs of the fleet measurement.
const FLEET_VMS: usize = 50;
/// Target: median detected -> running of a killed VMM, with a standby.
const STANDBY_TARGET_MS: f64 = 5.0;
/// Target: median detected -> running of a killed VMM, without a standby.
const COLD_TARGET_MS: f64 = 15.0;
/// Target: the supervisor's CPU for the fleet, percent of one core.
const CPU_TARGET_PERCENT: f64 = 5.0;
/// The policy of the failover batches (see the module docs).
const BATCH_POLICY: [(&str, &str); 7] = [
    ("checkpoint_interval", "1s"),
    ("heartbeat_timeout", "2s"),
    ("ready_grace", "500ms"),
    ("failure_window", "3s"),
    ("max_failures", "1000"),
    ("restart_backoff", "0s"),
    ("warm_boot_image", "true"),
];
/// The policy of the fleet measurement.
const FLEET_POLICY: [(&str, &str); 7] = [
    ("checkpoint_interval", "5s"),
    ("heartbeat_timeout", "2s"),
    ("ready_grace", "10s"),
    ("failure_window", "60s"),
    ("max_failures", "3"),
    ("restart_backoff", "0s"),
    ("warm_boot_image", "true"),
];
/// The policy of the at-size failovers: `ready_grace` covers the guest's
/// boot (touching 1.5 GiB takes seconds); every failure is a first failure
/// (the bench waits [`SIZE_GAP`] after each restore, past the window).
const SIZE_POLICY: [(&str, &str); 7] = [
    ("checkpoint_interval", "2s"),
    ("heartbeat_timeout", "1s"),
    ("ready_grace", "5s"),
    ("failure_window", "5s"),
    ("max_failures", "1000"),
    ("restart_backoff", "0s"),
    ("warm_boot_image", "true"),
];
/// Events the supervisor keeps in memory (`relive events -n` reads at most these).
const EVENT_RING: usize = 1000;
/// Longest wait for `relive up` to serve its API.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the steady state before a failure.
const STEADY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a failover to be recorded after its trigger.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for the 50-VM fleet to be running and checkpointing.
const FLEET_TIMEOUT: Duration = Duration::from_secs(300);
/// Pause after a trigger before the first look at the events (the failover
/// itself takes milliseconds; polling sooner would compete with it).
const SETTLE: Duration = Duration::from_millis(50);
/// Pause between two polls of the API.
const POLL: Duration = Duration::from_millis(25);
/// Longest wait for one answer on a VMM control socket.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for a process to go away after SIGKILL or `shutdown`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failover bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    if let Err(reason) = kvm_usable() {
        if std::env::var("RELIVE_REQUIRE_KVM").as_deref() == Ok("1") {
            return Err(format!("{reason} (and RELIVE_REQUIRE_KVM=1)"));
        }
        println!("failover bench: skipped: {reason}");
        return Ok(());
    }
    let bins = binaries()?;
    let runs = env_count("RELIVE_BENCH_RUNS", DEFAULT_RUNS)?;
    let fleet_secs = env_count("RELIVE_BENCH_FLEET_SECS", DEFAULT_FLEET_SECS as usize)? as u64;
    for bin in [&bins.relive, &bins.vmm] {
        if let Some(newer) = newer_source_than(bin) {
            eprintln!(
                "failover bench: warning: {} is newer than {}: figures are for an old build; \
                 run `cargo build --release --workspace` first",
                newer.display(),
                bin.display()
            );
        }
    }
    let sections = Sections::from_env()?;
    let scratch = TempDir::create("relive-bench-failover")
        .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    println!("relive supervisor failover benchmark");
    println!("  binaries {} and relive-vmm", bins.relive.display());
    println!(
        "  sections {} (RELIVE_BENCH_SECTIONS to choose)",
        sections.names()
    );
    println!("  scratch  {}", scratch.path().display());
    println!("  host     {}", host_note());
    if sections.kinds {
        failover_by_kind(&bins, &scratch, runs, fleet_secs)?;
    }
    if sections.size {
        let runs = env_count("RELIVE_BENCH_SIZE_RUNS", DEFAULT_SIZE_RUNS)?;
        failover_at_size(&bins, &scratch, runs)?;
    }
    if sections.checkpointing {
        let secs = env_count("RELIVE_BENCH_CKPT_SECS", DEFAULT_CKPT_SECS as usize)? as u64;
        checkpointing_fleet(&bins, &scratch, secs)?;
    }
    if sections.cluster {
        let runs = env_count("RELIVE_BENCH_CLUSTER_RUNS", DEFAULT_CLUSTER_RUNS)?;
        cluster::failover_across_hosts(&bins, &scratch, runs, fleet_secs)?;
    }
    Ok(())
}

/// Which parts of the bench run: `RELIVE_BENCH_SECTIONS`, a comma-separated
/// list of `kinds` (sections 1 to 3), `size` (4) and `checkpointing` (5);
/// all by default.
struct Sections {
    kinds: bool,
    size: bool,
    checkpointing: bool,
    cluster: bool,
}

impl Sections {
    const ALL: [&'static str; 4] = ["kinds", "size", "checkpointing", "cluster"];

    fn from_env() -> Result<Sections> {
        let Ok(list) = std::env::var("RELIVE_BENCH_SECTIONS") else {
            return Ok(Sections {
                kinds: true,
                size: true,
                checkpointing: true,
                cluster: true,
            });
        };
        let names: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        if let Some(bad) = names.iter().find(|n| !Self::ALL.contains(n)) {
            return Err(format!(
                "RELIVE_BENCH_SECTIONS names {bad:?}: the sections are {}",
                Self::ALL.join(", ")
            ));
        }
        Ok(Sections {
            kinds: names.contains(&"kinds"),
            size: names.contains(&"size"),
            checkpointing: names.contains(&"checkpointing"),
            cluster: names.contains(&"cluster"),
        })
    }

    fn names(&self) -> String {
        Self::ALL
            .iter()
            .zip([self.kinds, self.size, self.checkpointing, self.cluster])
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Sections 1 to 3: failover by kind of failure, target and standby, the raw
/// restores of the same images, the 50-VM fleet.
fn failover_by_kind(bins: &Bins, scratch: &TempDir, runs: usize, fleet_secs: u64) -> Result<()> {
    let started = Instant::now();
    println!();
    println!("1-3. failover by kind, target and standby; the 50-VM fleet");
    println!("  guest    bundled, {MEM_MIB} MiB, 1 vCPU, cmdline {CMDLINE:?}");
    println!(
        "  runs     {runs} failovers per (kind, target, standby) (RELIVE_BENCH_RUNS to change)"
    );
    println!("  policy   {}", policy_note(&BATCH_POLICY));
    println!();

    let mut batches = Vec::new();
    let mut baseline = None;
    // As root the VMMs run jailed (the supervisor's default); the cost of
    // the jail is the killed batches again, unjailed, in the same run.
    let mut plan = vec![
        (Kind::Killed, true, true),
        (Kind::Panic, true, true),
        (Kind::Killed, false, true),
        (Kind::Panic, false, true),
    ];
    if is_root() {
        plan.insert(1, (Kind::Killed, true, false));
        plan.insert(4, (Kind::Killed, false, false));
    }
    for (i, &(kind, standby, jail)) in plan.iter().enumerate() {
        let dir = scratch.join(format!(
            "{}-{}-{}",
            kind.label(),
            standby_label(standby),
            jail_label(jail)
        ));
        let t = Instant::now();
        print!(
            "  batch {}/{}: {}, standby {}, {} ... ",
            i + 1,
            plan.len(),
            kind.label(),
            standby_label(standby),
            jail_label(jail)
        );
        let _ = std::io::stdout().flush();
        let shape = Shape {
            jail,
            ..Shape::batch(standby)
        };
        let mut sup = Supervisor::start(
            bins,
            &dir,
            &shape.yaml("one VM; each failure lands on a known target"),
        )?;
        let mut batch = run_batch(
            &sup,
            bins,
            kind,
            standby,
            runs,
            &Target::ALL,
            Duration::ZERO,
        )
        .map_err(|e| format!("{} (standby {standby}): {e}", kind.label()))?;
        batch.jailed = jail && is_root();
        let images = if i + 1 == plan.len() {
            Some(baseline_images(&sup)?)
        } else {
            None
        };
        sup.stop()?;
        println!(
            "{} failovers in {:.0} s{}",
            batch.attempts,
            t.elapsed().as_secs_f64(),
            if batch.discarded.is_empty() {
                String::new()
            } else {
                format!(", {} discarded", batch.discarded.len())
            }
        );
        if let Some(images) = images {
            print!("  baseline: raw restores of the same images ... ");
            let _ = std::io::stdout().flush();
            let t = Instant::now();
            baseline = Some(raw_baseline(bins, &dir.join("baseline"), &images, runs)?);
            println!("done in {:.0} s", t.elapsed().as_secs_f64());
        }
        sup.remove_state();
        batches.push(batch);
    }

    print!("  fleet: {FLEET_VMS} VMs ... ");
    let _ = std::io::stdout().flush();
    let t = Instant::now();
    let fleet = fleet_overhead(
        bins,
        &scratch.join("fleet"),
        &Shape::fleet(),
        Duration::ZERO,
        fleet_secs,
    )?;
    println!("done in {:.0} s", t.elapsed().as_secs_f64());

    let baseline = baseline.ok_or("no baseline was measured")?;
    report(runs, &batches, &baseline, &fleet, started.elapsed());
    Ok(())
}

/// Section 4: a killed VMM of a 2 GiB VM whose guest touched 16, 512 and
/// 1536 MiB, with and without a standby, through the supervisor.
fn failover_at_size(bins: &Bins, scratch: &TempDir, runs: usize) -> Result<()> {
    let started = Instant::now();
    println!();
    println!(
        "4. failover at size: one VM of {SIZE_MEM_MIB} MiB, its guest touched T MiB, VMM killed"
    );
    println!("  runs     {runs} failovers per (T, standby) (RELIVE_BENCH_SIZE_RUNS to change)");
    println!("  policy   {}", policy_note(&SIZE_POLICY));
    println!();
    let mut rows: Vec<(u64, Batch)> = Vec::new();
    for touched in SIZE_TOUCHED {
        for standby in [true, false] {
            let dir = scratch.join(format!("size-{touched}-{}", standby_label(standby)));
            let t = Instant::now();
            print!(
                "  T {touched:>4} MiB, standby {:<3} ... ",
                standby_label(standby)
            );
            let _ = std::io::stdout().flush();
            let mut sup = Supervisor::start(
                bins,
                &dir,
                &Shape::at_size(touched, standby).yaml("failover at size"),
            )?;
            let batch = run_batch(
                &sup,
                bins,
                Kind::Killed,
                standby,
                runs,
                &[Target::Consistency],
                SIZE_GAP,
            )
            .map_err(|e| format!("touched {touched} MiB (standby {standby}): {e}"))?;
            let unverified = sup
                .events()?
                .iter()
                .filter(|e| e["reason"] == "image-unverified")
                .count();
            sup.stop()?;
            sup.remove_state();
            println!(
                "{} failovers in {:.0} s{}{}",
                batch.attempts,
                t.elapsed().as_secs_f64(),
                if batch.discarded.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} discarded: {:?}",
                        batch.discarded.len(),
                        batch.discarded
                    )
                },
                if unverified > 0 {
                    format!(", {unverified} restores of an image not yet verified")
                } else {
                    String::new()
                }
            );
            rows.push((touched, batch));
        }
    }

    fn samples(b: &Batch) -> &[Sample] {
        b.samples
            .get(&Target::Consistency)
            .map_or(&[][..], Vec::as_slice)
    }
    let total = |b: &Batch| samples(b).iter().map(|s| s.total_ms).collect::<Vec<_>>();
    let trig = |b: &Batch| {
        samples(b)
            .iter()
            .filter_map(|s| s.trigger_ms)
            .collect::<Vec<_>>()
    };
    println!();
    println!(
        "  {:>10} {:>7} {:>3}  {:>17} {:>17} {:>17}  {:>9}  paths",
        "touched", "standby", "n", "detected->running", "restore", "trigger->vCPUs", "target"
    );
    println!(
        "  {:>10} {:>7} {:>3}  {:>17} {:>17} {:>17}  {:>9}",
        "MiB", "", "", "ms median / p90", "ms median / p90", "ms median / p90", "(median)"
    );
    let mut json_rows = Vec::new();
    let mut met = serde_json::Map::new();
    for (touched, b) in &rows {
        let target = row_target(Kind::Killed, b.standby);
        println!(
            "  {touched:>10} {:>7} {:>3}  {:>17} {:>17} {:>17}  {:>9}  {}",
            standby_label(b.standby),
            samples(b).len(),
            cell(&total(b)),
            cell(&samples(b).iter().map(|s| s.restore_ms).collect::<Vec<_>>()),
            cell(&trig(b)),
            target.map_or("-".into(), |t| format!("< {t} ms")),
            counts_text(&counts(samples(b).iter().map(|s| s.path.as_str()))),
        );
        if let (Some(t), Some(m)) = (target, median(&total(b))) {
            met.insert(
                format!("touched_{touched}_standby_{}", b.standby),
                (m < t).into(),
            );
        }
        json_rows.push(json!({
            "touched_mib": touched,
            "standby": b.standby,
            "detected_to_running_ms": summary_json(&total(b)),
            "trigger_to_vcpus_ms": summary_json(&trig(b)),
            "paths": counts(samples(b).iter().map(|s| s.path.as_str())),
            "images": counts(samples(b).iter().map(|s| s.image.as_str())),
            "discarded": b.discarded.len(),
        }));
    }
    println!();
    println!("  targets");
    for standby in [true, false] {
        let of = |t: u64| {
            rows.iter()
                .find(|(touched, b)| *touched == t && b.standby == standby)
                .and_then(|(_, b)| median(&total(b)))
        };
        let (small, large) = (SIZE_TOUCHED[0], SIZE_TOUCHED[SIZE_TOUCHED.len() - 1]);
        if let (Some(a), Some(z)) = (of(small), of(large)) {
            let ratio = z / a;
            let ok = ratio <= SIZE_RATIO_TARGET;
            println!(
                "    standby {:<3} failover({large}) / failover({small}) {ratio:>5.2}  <= {SIZE_RATIO_TARGET}: {}",
                standby_label(standby),
                verdict(ok)
            );
            met.insert(format!("ratio_standby_{standby}"), ok.into());
        }
    }
    for (key, ok) in &met {
        if key.starts_with("touched_") {
            println!(
                "    {key:<32} median under its target: {}",
                verdict(ok.as_bool() == Some(true))
            );
        }
    }
    println!(
        "  section 4 took {:.0} s; load average {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    let line = json!({
        "runs": runs,
        "mem_mib": SIZE_MEM_MIB,
        "policy": SIZE_POLICY.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        "rows": json_rows,
        "targets": {
            "killed_standby_median_ms": STANDBY_TARGET_MS,
            "killed_cold_median_ms": COLD_TARGET_MS,
            "ratio_largest_over_smallest": SIZE_RATIO_TARGET,
        },
        "targets_met": met,
    });
    println!();
    println!("BENCH failover-at-size {line}");
    Ok(())
}

/// Section 5: what checkpointing costs a fleet of 10 VMs of 1 GiB, each
/// checkpointed every 5 s, as their guests' touched memory grows from 16 MiB
/// (the baseline, in the same run) to 512 MiB.
fn checkpointing_fleet(bins: &Bins, scratch: &TempDir, secs: u64) -> Result<()> {
    let started = Instant::now();
    println!();
    println!(
        "5. checkpointing fleet: {CKPT_VMS} VMs of {CKPT_MEM_MIB} MiB, guest touched T MiB and \
         rewrites {CKPT_DIRTY_PAGES} pages of its first {CKPT_HOT_MIB} MiB per heartbeat"
    );
    println!(
        "  policy   {}, standby false, keep_images 3",
        policy_note(&FLEET_POLICY)
    );
    println!(
        "  window   {secs} s per T, from {} s after every VM has a checkpoint (RELIVE_BENCH_CKPT_SECS to change)",
        CKPT_WARMUP.as_secs()
    );
    println!();
    let mut figures = Vec::new();
    for touched in CKPT_TOUCHED {
        print!("  T {touched:>4} MiB ... ");
        let _ = std::io::stdout().flush();
        let t = Instant::now();
        let f = fleet_overhead(
            bins,
            &scratch.join(format!("checkpointing-{touched}")),
            &Shape::checkpointing(touched),
            CKPT_WARMUP,
            secs,
        )?;
        println!("done in {:.0} s", t.elapsed().as_secs_f64());
        figures.push((touched, f));
    }
    println!();
    println!(
        "  {:>7}  {:>10} {:>10} {:>10} {:>10} {:>10}  {:>6} {:>6} {:>10} {:>9}  {:>8}",
        "touched",
        "supervisor",
        "VMMs",
        "of which",
        "of which",
        "VMMs'",
        "ckpts",
        "failed",
        "ckpt mean",
        "paused",
        "failures"
    );
    println!(
        "  {:>7}  {:>10} {:>10} {:>10} {:>10} {:>10}  {:>6} {:>6} {:>10} {:>9}  {:>8}",
        "MiB", "CPU %", "CPU %", "vCPUs %", "store %", "own %", "", "", "ms", "mean ms", ""
    );
    let own = |f: &FleetFigures| f.vmm_cpu_percent - f.vcpu_cpu_percent;
    let mean_ms = |total_s: f64, n: f64| if n > 0.0 { total_s / n * 1e3 } else { f64::NAN };
    for (touched, f) in &figures {
        println!(
            "  {touched:>7}  {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}  {:>6.0} {:>6.0} {:>10.1} {:>9.2}  {:>8}",
            f.supervisor_cpu_percent,
            f.vmm_cpu_percent,
            f.vcpu_cpu_percent,
            f.image_store_cpu_percent,
            own(f),
            f.checkpoints,
            f.checkpoints_failed,
            mean_ms(f.checkpoint_seconds, f.checkpoints),
            mean_ms(f.checkpoint_paused_seconds, f.checkpoints),
            f.failures,
        );
    }
    println!(
        "  CPU in percent of one core over the window, all {CKPT_VMS} VMMs together; `own` is the VMMs'\n  \
         CPU outside the vCPU threads (checkpoint writers, image store, event loops, control)."
    );
    if let [(t0, base), .., (t1, big)] = &figures[..] {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        };
        println!(
            "  ratios T={t1} / T={t0}: supervisor CPU {}, VMMs' own CPU {}, image store CPU {}, checkpoint mean {}",
            ratio(big.supervisor_cpu_percent, base.supervisor_cpu_percent),
            ratio(own(big), own(base)),
            ratio(big.image_store_cpu_percent, base.image_store_cpu_percent),
            ratio(
                mean_ms(big.checkpoint_seconds, big.checkpoints),
                mean_ms(base.checkpoint_seconds, base.checkpoints)
            ),
        );
    }
    println!(
        "  section 5 took {:.0} s; load average {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let rows: Vec<Value> = figures
        .iter()
        .map(|(touched, f)| {
            json!({
                "touched_mib": touched,
                "window_s": r2(f.window_s),
                "supervisor_cpu_percent": r2(f.supervisor_cpu_percent),
                "vmm_cpu_percent_sum": r2(f.vmm_cpu_percent),
                "vcpu_cpu_percent_sum": r2(f.vcpu_cpu_percent),
                "image_store_cpu_percent_sum": r2(f.image_store_cpu_percent),
                "vmm_own_cpu_percent_sum": r2(own(f)),
                "vmm_rss_mib_sum": r2(f.vmm_rss_mib),
                "checkpoints": f.checkpoints,
                "checkpoints_failed": f.checkpoints_failed,
                "checkpoint_mean_ms": r2(mean_ms(f.checkpoint_seconds, f.checkpoints)),
                "paused_mean_ms": r2(mean_ms(f.checkpoint_paused_seconds, f.checkpoints)),
                "failures": f.failures,
                "running_after": f.running_after,
            })
        })
        .collect();
    let line = json!({
        "vms": CKPT_VMS,
        "mem_mib": CKPT_MEM_MIB,
        "dirty_pages_per_heartbeat": CKPT_DIRTY_PAGES,
        "hot_set_mib": CKPT_HOT_MIB,
        "rows": rows,
    });
    println!();
    println!("BENCH checkpointing-fleet {line}");
    Ok(())
}

// ---------------------------------------------------------------------------
// What is measured
// ---------------------------------------------------------------------------

/// How the bench makes a VM fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// SIGKILL to the VMM process.
    Killed,
    /// `agent panic`: the guest panics (pvpanic), the VMM exits with `panic`.
    Panic,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Killed => "vmm-killed",
            Kind::Panic => "guest-panic",
        }
    }

    /// The failure reason the supervisor should report.
    fn reason(self) -> &'static str {
        match self {
            Kind::Killed => "vmm-killed",
            Kind::Panic => "panic",
        }
    }
}

/// What a failover restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Consistency,
    Boot,
}

impl Target {
    const ALL: [Target; 2] = [Target::Consistency, Target::Boot];

    fn label(self) -> &'static str {
        match self {
            Target::Consistency => "consistency",
            Target::Boot => "boot",
        }
    }
}

fn jail_label(jail: bool) -> &'static str {
    if jail {
        "jailed"
    } else {
        "unjailed"
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn standby_label(standby: bool) -> &'static str {
    if standby {
        "yes"
    } else {
        "no"
    }
}

/// One failover, as the supervisor's events and the new VMM report it.
#[derive(Debug, Clone)]
struct Sample {
    /// `durations.total_ms`: detected -> running.
    total_ms: f64,
    /// `durations.restore_ms`.
    restore_ms: f64,
    /// `durations.detect_ms`: detected -> restore started.
    decide_ms: f64,
    /// Trigger -> the new VMM's vCPUs running (bench clock).
    trigger_ms: Option<f64>,
    /// Trigger -> the failed VMM process gone (its pidfd readable; bench clock).
    gone_ms: Option<f64>,
    /// `standby` or `cold`.
    path: String,
    /// The failure reason the supervisor reported.
    reason: String,
    /// The restored image's kind: `full`, `merged` (a full image merged from
    /// a chain), `layer` (an incremental image: merged while restoring), `boot`.
    image: String,
}

/// One batch: one supervisor, one kind of failure, standby or not.
struct Batch {
    kind: Kind,
    standby: bool,
    /// The VMMs ran jailed.
    jailed: bool,
    samples: BTreeMap<Target, Vec<Sample>>,
    /// Failovers that could not be attributed to the bench's trigger alone.
    discarded: Vec<String>,
    /// Failures the bench caused.
    attempts: usize,
    /// Failure events in the supervisor's log (more than `attempts`: someone
    /// else made this VM fail too).
    failures_seen: usize,
}

impl Batch {
    /// The failure's name, `-unjailed` added when a root bench ran the VMMs
    /// unjailed (the jail's baseline).
    fn label(&self) -> String {
        if self.jailed || !is_root() {
            self.kind.label().to_string()
        } else {
            format!("{}-unjailed", self.kind.label())
        }
    }
}

/// A fresh supervisor for one VM, then failures until each target has `runs`.
fn run_batch(
    sup: &Supervisor,
    bins: &Bins,
    kind: Kind,
    standby: bool,
    runs: usize,
    targets: &[Target],
    gap: Duration,
) -> Result<Batch> {
    let mut batch = Batch {
        kind,
        standby,
        jailed: false,
        samples: BTreeMap::new(),
        discarded: Vec::new(),
        attempts: 0,
        failures_seen: 0,
    };
    let max_attempts = runs * 4 + 10;
    let have = |b: &Batch, t: Target| b.samples.get(&t).map_or(0, Vec::len);
    // The last checkpoint as of the last restore: the next failure waits for a newer one.
    let mut reference: Option<String> = None;
    while targets.iter().any(|&t| have(&batch, t) < runs) {
        if batch.attempts >= max_attempts {
            return Err(format!(
                "{} failures did not give {runs} failovers to each target: {:?} (discarded: {:?})",
                batch.attempts,
                targets
                    .iter()
                    .map(|&t| (t.label(), have(&batch, t)))
                    .collect::<Vec<_>>(),
                batch.discarded
            ));
        }
        let view = wait_steady(sup, standby, reference.as_deref())?;
        let before = sup.events()?.len();
        if before + 20 > EVENT_RING {
            return Err(format!(
                "the supervisor's event ring ({EVENT_RING}) is nearly full: too many events for one batch"
            ));
        }
        let pidfd = view["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .and_then(pidfd_open);
        let trigger_unix_ms = unix_ms();
        let trigger_ns = trigger(sup, bins, kind, &view)?;
        batch.attempts += 1;
        let gone_ns = pidfd.and_then(|fd| wait_readable(&fd, FAILOVER_TIMEOUT));
        std::thread::sleep(SETTLE);
        let outcome = wait_failover(sup, before, trigger_unix_ms)?;
        std::thread::sleep(gap);
        let after = sup.show(VM)?;
        reference = after["last_checkpoint"].as_str().map(str::to_string);
        let (failure, restored) = match outcome {
            Outcome::Done { failure, restored } => (failure, restored),
            Outcome::Disturbed(why) => {
                batch.discarded.push(why);
                continue;
            }
        };
        let detail = restored["detail"].as_str().unwrap_or("");
        let target = if detail.ends_with("restored boot") {
            Target::Boot
        } else if detail.ends_with("restored consistency") {
            Target::Consistency
        } else {
            batch
                .discarded
                .push(format!("unexpected restore: {restored}"));
            continue;
        };
        let durations = &restored["durations"];
        let ms = |key: &str| {
            durations[key]
                .as_f64()
                .ok_or_else(|| format!("restored event without durations.{key}: {restored}"))
        };
        let image_id = restored["image_id"].as_str().unwrap_or("");
        let sample = Sample {
            total_ms: ms("total_ms")?,
            restore_ms: ms("restore_ms")?,
            decide_ms: ms("detect_ms")?,
            trigger_ms: vcpus_started_after(bins, &view, &after, trigger_ns),
            gone_ms: gone_ns.map(|t| ns_to_ms(t.saturating_sub(trigger_ns))),
            path: restored["path"].as_str().unwrap_or("?").to_string(),
            reason: failure["reason"].as_str().unwrap_or("?").to_string(),
            image: image_kind(sup, image_id),
        };
        let kept = batch.samples.entry(target).or_default();
        if kept.len() < runs {
            kept.push(sample);
        }
    }
    batch.failures_seen = sup.events()?.iter().filter(|e| is_failure(e)).count();
    Ok(batch)
}

/// Waits until the VM runs, its standby is ready (when it has one) and a
/// checkpoint newer than `reference` exists, which has its background
/// verdict (so a failover trusts it: the steady state of a VM whose
/// checkpoints are further apart than their verification takes); returns
/// `relive show VM`.
fn wait_steady(sup: &Supervisor, standby: bool, reference: Option<&str>) -> Result<Value> {
    let deadline = Instant::now() + STEADY_TIMEOUT;
    loop {
        let view = sup.show(VM)?;
        let checkpoint = view["last_checkpoint"].as_str();
        let steady = view["state"] == "running"
            && view["pid"].is_u64()
            && view["socket"].is_string()
            && (!standby || view["standby"] == "ready")
            && checkpoint.is_some()
            && checkpoint != reference
            && checkpoint.is_some_and(|id| sup.has_verdict(id));
        if steady {
            return Ok(view);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the VM was not steady (running, standby ready, a checkpoint since the last \
                 restore) within {STEADY_TIMEOUT:?}: {view}\n  supervisor log:\n{}",
                tail(&sup.dir.join("up.log"))
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Makes the VM fail; returns CLOCK_MONOTONIC just before.
fn trigger(sup: &Supervisor, bins: &Bins, kind: Kind, view: &Value) -> Result<u64> {
    match kind {
        Kind::Killed => {
            let pid = view["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| format!("no VMM pid in {view}"))?;
            if !is_our_vmm(pid, &sup.dir) {
                return Err(format!(
                    "pid {pid} is not a relive-vmm of this bench: not killing it"
                ));
            }
            let at = monotonic_ns();
            kill9(pid).map_err(|e| format!("kill -9 {pid}: {e}"))?;
            Ok(at)
        }
        Kind::Panic => {
            let socket = view["socket"]
                .as_str()
                .ok_or_else(|| format!("no VMM socket in {view}"))?;
            let at = monotonic_ns();
            let out = Command::new(&bins.vmm)
                .args(["ctl", socket, "agent", "panic"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run relive-vmm ctl: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "relive-vmm ctl {socket} agent panic: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(at)
        }
    }
}

enum Outcome {
    /// One failure event and the `restored` event that ended it.
    Done { failure: Value, restored: Value },
    /// Something else happened as well (another failure, a failed restore).
    Disturbed(String),
}

fn is_failure(e: &Value) -> bool {
    e["from"] != e["to"]
        && (e["to"]
            .as_str()
            .is_some_and(|s| s.starts_with("restoring-"))
            || e["to"] == "failed")
        && e["from"] != "starting"
        && !e["from"]
            .as_str()
            .is_some_and(|s| s.starts_with("restoring-"))
}

/// Waits for the events after the first `before` to show the failover.
fn wait_failover(sup: &Supervisor, before: usize, trigger_unix_ms: u64) -> Result<Outcome> {
    let deadline = Instant::now() + FAILOVER_TIMEOUT;
    loop {
        let events = sup.events()?;
        let new = &events[before.min(events.len())..];
        let failures: Vec<&Value> = new.iter().filter(|e| is_failure(e)).collect();
        let gave_up = new
            .iter()
            .any(|e| e["to"] == "failed" || e["reason"] == "start-failed");
        let restored: Vec<&Value> = new.iter().filter(|e| e["reason"] == "restored").collect();
        let summary = || {
            new.iter()
                .map(|e| {
                    format!(
                        "{} -> {} ({})",
                        e["from"].as_str().unwrap_or("?"),
                        e["to"].as_str().unwrap_or("?"),
                        e["reason"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        if failures.len() > 1 || restored.len() > 1 || gave_up {
            return Ok(Outcome::Disturbed(summary()));
        }
        if let (Some(failure), Some(restored)) = (failures.first(), restored.first()) {
            // Event times have millisecond resolution.
            if failure["unix_ms"].as_u64().unwrap_or(0) + 1 < trigger_unix_ms {
                return Ok(Outcome::Disturbed(format!(
                    "a failure before the trigger: {}",
                    summary()
                )));
            }
            return Ok(Outcome::Done {
                failure: (*failure).clone(),
                restored: (*restored).clone(),
            });
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no failover recorded within {FAILOVER_TIMEOUT:?} of the trigger; new events: [{}]\n  supervisor log:\n{}",
                summary(),
                tail(&sup.dir.join("up.log"))
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// Trigger -> the new VMM's `vcpus_started_monotonic_ns`, when the VM has a
/// new VMM that answers.
fn vcpus_started_after(bins: &Bins, before: &Value, after: &Value, trigger_ns: u64) -> Option<f64> {
    if after["pid"] == before["pid"] || after["state"] != "running" {
        return None;
    }
    let socket = after["socket"].as_str()?;
    let out = Command::new(&bins.vmm)
        .args(["ctl", socket, "status", "--json"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let status: Value = serde_json::from_slice(&out.stdout).ok()?;
    let started = status["vcpus_started_monotonic_ns"].as_u64()?;
    (started > trigger_ns).then(|| ns_to_ms(started - trigger_ns))
}

/// The kind of image `id` of the batch VM, from `relive images VM --json`.
fn image_kind(sup: &Supervisor, id: &str) -> String {
    if id.is_empty() {
        return "recipe".into();
    }
    let Ok(images) = sup.json(&["images", VM]) else {
        return "?".into();
    };
    let Some(image) = images
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["id"] == id)
    else {
        return "gone".into();
    };
    match image["kind"]["kind"].as_str() {
        Some("incremental") => "layer".into(),
        Some("full") if !image["merged_from"].is_null() => "merged".into(),
        Some(kind) => kind.into(),
        None => "?".into(),
    }
}

/// The images of the last batch's VM the baseline restores (besides the
/// consistency image the supervisor would pick, found once it is stopped).
struct BaselineImages {
    /// The newest full consistency image.
    full: (PathBuf, String),
    boot: (PathBuf, String),
}

/// The newest full consistency image and the boot image, from `relive images`.
fn baseline_images(sup: &Supervisor) -> Result<BaselineImages> {
    let images = sup.json(&["images", VM])?;
    let list = images.as_array().ok_or("`relive images` gave no list")?;
    let newest = |kind: &str| {
        list.iter()
            .filter(|i| i["status"]["status"] == "ok" || i["status"] == "ok")
            .filter(|i| i["kind"]["kind"] == kind)
            .max_by_key(|i| i["created_unix_ms"].as_u64().unwrap_or(0))
            .and_then(|i| {
                Some((
                    PathBuf::from(i["path"].as_str()?),
                    i["id"].as_str()?.to_string(),
                ))
            })
            .ok_or_else(|| format!("no {kind} image among {images}"))
    };
    Ok(BaselineImages {
        full: newest("full")?,
        boot: newest("boot")?,
    })
}

/// Raw restores of one image, by the bench itself.
struct RawRestores {
    /// Spawn of `relive-vmm restore` -> vCPUs running.
    cold_ms: Vec<f64>,
    /// The `restore` request's round trip on a ready standby.
    standby_ms: Vec<f64>,
    /// The standby VMM's own `restore_us`.
    standby_vmm_ms: Vec<f64>,
    /// Right after the standby restore: connect, `watch`, its `ok` (what
    /// the supervisor does before it counts the VM as running).
    watch_ms: Vec<f64>,
    /// Writing and renaming a small JSON file beside the images (what the
    /// supervisor does to record the new pid).
    persist_ms: Vec<f64>,
    /// Choosing the image as the supervisor does before a restore: open the
    /// VM's image store, then `latest_good()` (every candidate verified,
    /// memory included) or `boot_image()`.
    choose_ms: Vec<f64>,
}

/// One image restored raw.
struct BaselineRow {
    /// `consistency` (what `latest_good` picks, as the supervisor would),
    /// `consistency-full`, or `boot`.
    label: &'static str,
    image_id: String,
    /// `layer`, `full`, `merged` or `boot`.
    image_kind: String,
    raw: RawRestores,
}

struct Baseline {
    rows: Vec<BaselineRow>,
}

impl Baseline {
    /// The raw restore of the image a failover to `target` restores.
    fn of(&self, target: Target) -> Option<&RawRestores> {
        let label = match target {
            Target::Consistency => "consistency",
            Target::Boot => "boot",
        };
        self.rows.iter().find(|r| r.label == label).map(|r| &r.raw)
    }
}

/// Raw restores of the image the supervisor would restore for a first
/// failure now (`latest_good`: usually a layer, merged while restoring), of
/// the newest full consistency image when that differs, and of the boot image.
fn raw_baseline(bins: &Bins, dir: &Path, images: &BaselineImages, runs: usize) -> Result<Baseline> {
    use relive_images::format::ImageKind;
    use relive_images::store::ImageStore;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let store_dir = images
        .boot
        .0
        .parent()
        .ok_or("the boot image has no directory")?;
    // Timed first: restoring a layer below merges it into a new, newer full image.
    let choose_consistency = choose_image(store_dir, Target::Consistency, runs)?;
    let choose_boot = choose_image(store_dir, Target::Boot, runs)?;
    let store = ImageStore::open(store_dir, usize::MAX)
        .map_err(|e| format!("{}: {e}", store_dir.display()))?;
    let latest = store
        .latest_good()
        .map_err(|e| format!("{}: {e}", store_dir.display()))?
        .image
        .ok_or_else(|| format!("no good consistency image in {}", store_dir.display()))?;
    let latest_kind = match latest.kind() {
        ImageKind::Incremental { .. } => "layer".to_string(),
        ImageKind::Full if latest.header().merged_from.is_some() => "merged".to_string(),
        other => other.name().to_string(),
    };
    let latest_path = latest.path().to_path_buf();
    let latest_id = latest.id().to_string();
    drop(latest);

    let mut rows = Vec::new();
    let mut raw = raw_restores(bins, dir, &latest_path, runs)?;
    raw.choose_ms = choose_consistency;
    rows.push(BaselineRow {
        label: "consistency",
        image_id: latest_id.clone(),
        image_kind: latest_kind,
        raw,
    });
    if images.full.1 != latest_id {
        rows.push(BaselineRow {
            label: "consistency-full",
            image_id: images.full.1.clone(),
            image_kind: "full".into(),
            raw: raw_restores(bins, dir, &images.full.0, runs)?,
        });
    }
    let mut raw = raw_restores(bins, dir, &images.boot.0, runs)?;
    raw.choose_ms = choose_boot;
    rows.push(BaselineRow {
        label: "boot",
        image_id: images.boot.1.clone(),
        image_kind: "boot".into(),
        raw,
    });
    Ok(Baseline { rows })
}

/// `runs` timings (after one warm-up) of what the supervisor does to pick the
/// image of a restore to `target` (`ImageStore::open`, then `latest_good` or
/// `boot_image`), with the image directory in the page cache.
fn choose_image(dir: &Path, target: Target, runs: usize) -> Result<Vec<f64>> {
    use relive_images::store::ImageStore;
    let mut times = Vec::with_capacity(runs);
    for i in 0..=runs {
        let t = Instant::now();
        let store = ImageStore::open(dir, 3).map_err(|e| format!("{}: {e}", dir.display()))?;
        let selection = match target {
            Target::Consistency => store.latest_good(),
            Target::Boot => store.boot_image(),
        }
        .map_err(|e| format!("{}: {e}", dir.display()))?;
        let elapsed = t.elapsed();
        if selection.image.is_none() {
            return Err(format!("no {} image in {}", target.label(), dir.display()));
        }
        if i > 0 {
            times.push(elapsed.as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

/// One discarded, then `runs` cold and standby restores of `image`.
fn raw_restores(bins: &Bins, dir: &Path, image: &Path, runs: usize) -> Result<RawRestores> {
    let mut figures = RawRestores {
        cold_ms: Vec::with_capacity(runs),
        standby_ms: Vec::with_capacity(runs),
        standby_vmm_ms: Vec::with_capacity(runs),
        watch_ms: Vec::with_capacity(runs),
        persist_ms: Vec::with_capacity(runs),
        choose_ms: Vec::new(),
    };
    let image_arg = image.as_os_str();
    for i in 0..=runs {
        let spawn_ns = monotonic_ns();
        let mut vm = Vmm::start(
            &bins.vmm,
            dir,
            &format!("cold-{i}"),
            &["restore".as_ref(), "--image".as_ref(), image_arg],
        )?;
        let started = match vm.conn.request(&Request::Status) {
            Ok(Response::Status(s)) => s.vcpus_started_monotonic_ns,
            other => return Err(vm.failed(format!("status answered {other:?}"))),
        };
        vm.shutdown()?;

        let mem = MEM_MIB.to_string();
        let mut standby = Vmm::start(
            &bins.vmm,
            dir,
            &format!("standby-{i}"),
            &[
                "standby".as_ref(),
                "--mem-mib".as_ref(),
                mem.as_ref(),
                "--vcpus".as_ref(),
                "1".as_ref(),
            ],
        )?;
        match standby.conn.request(&Request::Status) {
            Ok(Response::Status(_)) => {}
            other => return Err(standby.failed(format!("standby status answered {other:?}"))),
        }
        let t = Instant::now();
        let reply = standby.conn.request(&Request::Restore {
            image: image.display().to_string(),
        });
        let round_trip = t.elapsed();
        let report = match reply {
            Ok(Response::Restored(r)) => r,
            other => return Err(standby.failed(format!("restore answered {other:?}"))),
        };
        let t = Instant::now();
        let watch = connect(&standby.socket).and_then(ControlClient::watch);
        let watch_time = t.elapsed();
        if let Err(e) = watch {
            return Err(standby.failed(format!("watch: {e}")));
        }
        standby.shutdown()?;
        let t = Instant::now();
        persist_like_the_supervisor(dir, i)?;
        let persist_time = t.elapsed();
        if i == 0 {
            continue; // warm-up
        }
        figures
            .cold_ms
            .push(ns_to_ms(started.saturating_sub(spawn_ns)));
        figures.standby_ms.push(round_trip.as_secs_f64() * 1e3);
        figures.standby_vmm_ms.push(report.restore_us as f64 / 1e3);
        figures.watch_ms.push(watch_time.as_secs_f64() * 1e3);
        figures.persist_ms.push(persist_time.as_secs_f64() * 1e3);
    }
    Ok(figures)
}

/// Writes a pid record the way the supervisor does (its A/B record,
/// `DIR/vmm.record.a|b`).
fn persist_like_the_supervisor(dir: &Path, i: usize) -> Result<()> {
    let record = json!({
        "pid": 100_000 + i,
        "socket": dir.join("vmm-a.sock"),
        "standby_pid": null,
        "standby_socket": null,
    });
    serde_json::to_vec_pretty(&record)
        .map_err(std::io::Error::other)
        .and_then(|bytes| relive_supervisor::record::Record::new(dir, "vmm.record").write(&bytes))
        .map_err(|e| format!("cannot write the record in {}: {e}", dir.display()))
}

/// What supervising a fleet costs, sampled over a window in its steady state.
struct FleetFigures {
    vms: usize,
    window_s: f64,
    startup_s: f64,
    supervisor_cpu_percent: f64,
    supervisor_rss_mib: f64,
    supervisor_rss_max_mib: f64,
    /// All the VMMs' CPU together, percent of one core.
    vmm_cpu_percent: f64,
    /// Of that, their vCPU threads' (the guests and their exits).
    vcpu_cpu_percent: f64,
    /// Of that, their image-store threads' (verification, merges, retention).
    image_store_cpu_percent: f64,
    vmm_rss_mib: f64,
    vmm_pids_gone: usize,
    checkpoints: f64,
    checkpoints_failed: f64,
    /// Checkpoint time (request to image committed) summed over the window, s.
    checkpoint_seconds: f64,
    /// Time the guests were paused for checkpoints, summed over the window, s.
    checkpoint_paused_seconds: f64,
    failures: usize,
    running_after: usize,
}

/// CPU ticks of one VMM: the whole process, its vCPU threads, its
/// image-store thread (threads found by name; one that ended is in the
/// process's figure only).
#[derive(Debug, Clone, Copy, Default)]
struct VmmTicks {
    total: u64,
    vcpus: u64,
    image_store: u64,
}

fn vmm_ticks(pid: u32) -> Result<VmmTicks> {
    let mut t = VmmTicks {
        total: cpu_ticks(&format!("/proc/{pid}/stat"))?,
        ..VmmTicks::default()
    };
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("/proc/{pid}/task: {e}"))?;
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let ticks = || cpu_ticks(&dir.join("stat").to_string_lossy()).unwrap_or(0);
        match name.trim() {
            n if n.starts_with("vcpu") => t.vcpus += ticks(),
            "image-store" => t.image_store += ticks(),
            _ => {}
        }
    }
    Ok(t)
}

/// Runs `shape` until every VM is running with a checkpoint, waits
/// `warmup` more (the first full images' background verification), then
/// samples for `secs`.
fn fleet_overhead(
    bins: &Bins,
    dir: &Path,
    shape: &Shape,
    warmup: Duration,
    secs: u64,
) -> Result<FleetFigures> {
    let t0 = Instant::now();
    let mut sup = Supervisor::start(
        bins,
        dir,
        &shape.yaml(&format!("the supervisor's cost for {} VMs", shape.vms)),
    )?;
    let sup_pid = sup.pid().ok_or("the supervisor has no pid")?;
    let all = |vms: &[Value], check: &dyn Fn(&Value) -> bool| {
        vms.len() == shape.vms && vms.iter().all(check)
    };
    let running = |v: &Value| v["state"] == "running" && v["pid"].is_u64();
    wait_fleet(&sup, "running", |vms| all(vms, &running))?;
    let startup_s = t0.elapsed().as_secs_f64();
    // Past ready_grace, checkpoints under way: the steady state of a fleet.
    wait_fleet(&sup, "running with a checkpoint each", |vms| {
        all(vms, &|v| running(v) && v["last_checkpoint"].is_string())
    })?;
    std::thread::sleep(warmup);

    let vms = sup.status()?;
    let pids: Vec<u32> = vms
        .iter()
        .filter_map(|v| v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect();
    let failures_before = sup.events()?.iter().filter(|e| is_failure(e)).count();
    let before = checkpoint_counts(&sup)?;
    let sup_cpu0 = cpu_ticks(&format!("/proc/{sup_pid}/stat"))?;
    let vmm_cpu0: BTreeMap<u32, VmmTicks> = pids
        .iter()
        .filter_map(|&p| Some((p, vmm_ticks(p).ok()?)))
        .collect();
    let start = Instant::now();
    let window = Duration::from_secs(secs);
    let mut rss_max = vm_rss_kib(sup_pid)?;
    while start.elapsed() < window {
        std::thread::sleep(Duration::from_secs(1).min(window.saturating_sub(start.elapsed())));
        rss_max = rss_max.max(vm_rss_kib(sup_pid)?);
    }
    let sup_cpu1 = cpu_ticks(&format!("/proc/{sup_pid}/stat"))?;
    let elapsed = start.elapsed().as_secs_f64();
    let rss = vm_rss_kib(sup_pid)?;
    let mut vmm = VmmTicks::default();
    let mut vmm_rss = 0;
    let mut gone = 0;
    for (&pid, t0) in &vmm_cpu0 {
        match (vmm_ticks(pid), vm_rss_kib(pid)) {
            (Ok(t1), Ok(r)) => {
                vmm.total += t1.total.saturating_sub(t0.total);
                vmm.vcpus += t1.vcpus.saturating_sub(t0.vcpus);
                vmm.image_store += t1.image_store.saturating_sub(t0.image_store);
                vmm_rss += r;
            }
            _ => gone += 1,
        }
    }
    gone += pids.len() - vmm_cpu0.len();
    let after = checkpoint_counts(&sup)?;
    let failures = sup
        .events()?
        .iter()
        .filter(|e| is_failure(e))
        .count()
        .saturating_sub(failures_before);
    let running_after = sup.status()?.iter().filter(|v| running(v)).count();
    sup.stop()?;
    sup.remove_state();

    let hz = clock_ticks_per_second();
    let percent = |ticks: u64| ticks as f64 / hz / elapsed * 100.0;
    Ok(FleetFigures {
        vms: shape.vms,
        window_s: elapsed,
        startup_s,
        supervisor_cpu_percent: percent(sup_cpu1.saturating_sub(sup_cpu0)),
        supervisor_rss_mib: rss as f64 / 1024.0,
        supervisor_rss_max_mib: rss_max as f64 / 1024.0,
        vmm_cpu_percent: percent(vmm.total),
        vcpu_cpu_percent: percent(vmm.vcpus),
        image_store_cpu_percent: percent(vmm.image_store),
        vmm_rss_mib: vmm_rss as f64 / 1024.0,
        vmm_pids_gone: gone,
        checkpoints: after.taken - before.taken,
        checkpoints_failed: after.failed - before.failed,
        checkpoint_seconds: after.seconds - before.seconds,
        checkpoint_paused_seconds: after.paused_seconds - before.paused_seconds,
        failures,
        running_after,
    })
}

fn wait_fleet(sup: &Supervisor, what: &str, done: impl Fn(&[Value]) -> bool) -> Result<()> {
    let deadline = Instant::now() + FLEET_TIMEOUT;
    loop {
        let vms = sup.status()?;
        if done(&vms) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let states: BTreeMap<String, usize> = vms.iter().fold(BTreeMap::new(), |mut m, v| {
                *m.entry(v["state"].as_str().unwrap_or("?").to_string())
                    .or_default() += 1;
                m
            });
            return Err(format!(
                "the fleet was not {what} within {FLEET_TIMEOUT:?}: {states:?}\n  supervisor log:\n{}",
                tail(&sup.dir.join("up.log"))
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Checkpoint figures summed over the fleet, from `/metrics`.
struct CheckpointCounts {
    taken: f64,
    failed: f64,
    seconds: f64,
    paused_seconds: f64,
}

fn checkpoint_counts(sup: &Supervisor) -> Result<CheckpointCounts> {
    let text = sup.cli(&["metrics"])?;
    let sum = |name: &str, label: Option<&str>| {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter(|l| label.is_none_or(|label| l.contains(label)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    Ok(CheckpointCounts {
        taken: sum("relive_checkpoint_duration_seconds_count", None),
        failed: sum("relive_checkpoints_failed_total", None),
        seconds: sum("relive_checkpoint_duration_seconds_sum", None),
        paused_seconds: sum(
            "relive_vm_paused_seconds_total",
            Some("reason=\"checkpoint\""),
        ),
    })
}

// ---------------------------------------------------------------------------
// Fleet files
// ---------------------------------------------------------------------------

/// The VMs of one fleet file: how many, how big, what the guest does, and
/// the policy they all run under.
struct Shape {
    vms: usize,
    mem_mib: u64,
    cmdline: String,
    policy: &'static [(&'static str, &'static str)],
    standby: bool,
    /// Whether the VMMs run jailed (the default as root); `false` writes
    /// `jail: false`.
    jail: bool,
}

impl Shape {
    /// The failover batches' one VM.
    fn batch(standby: bool) -> Shape {
        Shape {
            vms: 1,
            mem_mib: MEM_MIB,
            cmdline: CMDLINE.into(),
            policy: &BATCH_POLICY,
            standby,
            jail: true,
        }
    }

    /// The 50-VM fleet.
    fn fleet() -> Shape {
        Shape {
            vms: FLEET_VMS,
            policy: &FLEET_POLICY,
            ..Shape::batch(false)
        }
    }

    /// One VM of 2 GiB whose guest touched `touched` MiB.
    fn at_size(touched: u64, standby: bool) -> Shape {
        Shape {
            vms: 1,
            mem_mib: SIZE_MEM_MIB,
            cmdline: format!("{CMDLINE} relive.touch_mib={touched}"),
            policy: &SIZE_POLICY,
            standby,
            jail: true,
        }
    }

    /// The checkpointing fleet: its guests touched `touched` MiB and keep
    /// rewriting some of it.
    fn checkpointing(touched: u64) -> Shape {
        Shape {
            vms: CKPT_VMS,
            mem_mib: CKPT_MEM_MIB,
            cmdline: format!(
                "{CMDLINE} relive.touch_mib={touched} relive.dirty_pages={CKPT_DIRTY_PAGES} relive.dirty_mib={CKPT_HOT_MIB}"
            ),
            policy: &FLEET_POLICY,
            standby: false,
            jail: true,
        }
    }

    /// The fleet file: one VM named [`VM`], or `fleet-NN` for several.
    fn yaml(&self, comment: &str) -> String {
        let mut text = format!("# relive failover bench: {comment}\nstate_dir: ./state\n");
        if !self.jail {
            text.push_str("jail: false\n");
        }
        text.push_str("defaults:\n");
        for (key, value) in self.policy {
            text.push_str(&format!("  {key}: {value}\n"));
        }
        text.push_str(&format!(
            "  standby: {}\n  keep_images: 3\nvms:\n",
            self.standby
        ));
        for i in 1..=self.vms {
            let name = if self.vms == 1 {
                VM.to_string()
            } else {
                format!("fleet-{i:02}")
            };
            text.push_str(&format!(
                "  - name: {name}\n    kernel: bundled\n    cmdline: \"{}\"\n    memory_mib: {}\n",
                self.cmdline, self.mem_mib
            ));
        }
        text
    }
}

fn policy_note(policy: &[(&str, &str)]) -> String {
    policy
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

struct Bins {
    relive: PathBuf,
    vmm: PathBuf,
}

/// `target/release/{relive,relive-vmm}`, beside this bench.
fn binaries() -> Result<Bins> {
    Ok(Bins {
        relive: beside_exe("relive")?,
        vmm: beside_exe("relive-vmm")?,
    })
}

/// A `relive up` of the bench, driven through the `relive` CLI. Dropping it
/// (or [`Supervisor::stop`]) kills the supervisor and every VMM it started,
/// by pid.
struct Supervisor {
    child: Option<Child>,
    dir: PathBuf,
    api: PathBuf,
    relive: PathBuf,
}

impl Supervisor {
    /// Whether the bench VM's image `id` has its verdict file.
    fn has_verdict(&self, id: &str) -> bool {
        let images = self.dir.join("state").join(VM).join("images");
        std::fs::read_dir(&images).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.ends_with(&format!("-{id}.verdict"))
            })
        })
    }

    /// Writes `DIR/fleet.yaml` and runs `relive up` on it (output to
    /// `DIR/up.log`) until its API answers.
    fn start(bins: &Bins, dir: &Path, yaml: &str) -> Result<Supervisor> {
        Self::start_on(bins, dir, yaml, None)
    }

    /// [`start`](Self::start) inside `host` (its network namespace and
    /// cgroup), for the cluster section.
    fn start_on(
        bins: &Bins,
        dir: &Path,
        yaml: &str,
        host: Option<&relive_testkit::hosts::Host>,
    ) -> Result<Supervisor> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let fleet = dir.join("fleet.yaml");
        std::fs::write(&fleet, yaml)
            .map_err(|e| format!("cannot write {}: {e}", fleet.display()))?;
        let log_path = dir.join("up.log");
        let log = File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let mut command = Command::new(&bins.relive);
        if let Some(host) = host {
            host.place(&mut command);
        }
        let child = command
            .arg("up")
            .arg(&fleet)
            .arg("--vmm-bin")
            .arg(&bins.vmm)
            .current_dir(dir)
            // `relive up` records its API address for the CLI under
            // $XDG_RUNTIME_DIR: keep that in the scratch directory.
            .env("XDG_RUNTIME_DIR", dir)
            .env_remove("RELIVE_LOG")
            .env_remove("RELIVE_API")
            .env_remove("RELIVE_TOKEN")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bins.relive.display()))?;
        let mut sup = Supervisor {
            child: Some(child),
            dir: dir.to_path_buf(),
            api: dir.join("state").join("api.sock"),
            relive: bins.relive.clone(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if sup.api.exists() && sup.cli(&["status"]).is_ok() {
                return Ok(sup);
            }
            let exited = sup.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                return Err(format!(
                    "`relive up` did not serve its API ({}):\n{}",
                    exited.map_or(format!("not within {START_TIMEOUT:?}"), |s| s.to_string()),
                    tail(&log_path)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `relive --api SOCKET --json ARGS`: its stdout.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.relive)
            .arg("--api")
            .arg(&self.api)
            .arg("--json")
            .args(args)
            .env_remove("RELIVE_TOKEN")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.relive.display()))?;
        if out.status.success() {
            String::from_utf8(out.stdout).map_err(|e| format!("relive {}: {e}", args.join(" ")))
        } else {
            Err(format!(
                "`relive {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let text = self.cli(args)?;
        serde_json::from_str(&text).map_err(|e| format!("relive {}: {e}: {text}", args.join(" ")))
    }

    fn show(&self, vm: &str) -> Result<Value> {
        self.json(&["show", vm])
    }

    fn status(&self) -> Result<Vec<Value>> {
        match self.json(&["status"])? {
            Value::Array(vms) => Ok(vms),
            other => Err(format!("relive status: not a list: {other}")),
        }
    }

    /// `relive events --json -n 1000`: every event the supervisor keeps, oldest first.
    fn events(&self) -> Result<Vec<Value>> {
        let n = EVENT_RING.to_string();
        self.cli(&["events", "-n", &n])?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("relive events: {e}: {l}")))
            .collect()
    }

    /// Kills the supervisor, then every VMM it started (the pids of
    /// `relive status --json`, and any `relive-vmm` whose command line names
    /// this supervisor's directory, such as a standby being started), and
    /// waits for them to go.
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let mut pids: Vec<u32> = self
            .status()
            .unwrap_or_default()
            .iter()
            .flat_map(|v| [v["pid"].as_u64(), v["standby_pid"].as_u64()])
            .flatten()
            .filter_map(|p| u32::try_from(p).ok())
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        pids.extend(vmms_under(&self.dir));
        pids.sort_unstable();
        pids.dedup();
        for &pid in &pids {
            if is_our_vmm(pid, &self.dir) {
                let _ = kill9(pid);
            }
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            let left: Vec<u32> = pids
                .iter()
                .copied()
                .filter(|&p| relive_testkit::pid_alive(p))
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "VMM processes {left:?} did not end within {EXIT_TIMEOUT:?} of SIGKILL"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes the supervisor's state directory (images, sockets, logs).
    fn remove_state(&self) {
        let _ = std::fs::remove_dir_all(self.dir.join("state"));
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.stop();
        self.remove_state();
    }
}

/// `relive-vmm` processes whose command line names `dir`.
fn vmms_under(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| is_our_vmm(pid, dir))
        .collect()
}

/// Whether `pid` is a `relive-vmm` started for `dir` (its arguments name it).
fn is_our_vmm(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    let is_vmm = args
        .next()
        .is_some_and(|argv0| String::from_utf8_lossy(argv0).ends_with("relive-vmm"));
    let dir = dir.to_string_lossy();
    is_vmm && args.any(|a| String::from_utf8_lossy(a).contains(&*dir))
}

fn kill9(pid: u32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; the
    // pid was checked to be one of this bench's VMMs just before.
    if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A pidfd for `pid`: readable once the process has ended.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    let fd = RawFd::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until `fd` is readable; CLOCK_MONOTONIC then.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> Option<u64> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout_ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid, writable pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout_ms) };
    (ready == 1).then(monotonic_ns)
}

/// utime + stime of a process (all its threads), in clock ticks.
/// `utime + stime` from a `/proc/.../stat` file.
fn cpu_ticks(stat: &str) -> Result<u64> {
    let path = stat;
    let stat = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| format!("{path}: no field {}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// VmRSS of a process, KiB.
fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/status has no VmRSS"))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a configuration value and touches no memory of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// A client of `socket` whose answers have a deadline.
fn connect(socket: &Path) -> std::result::Result<ControlClient, ClientError> {
    ControlClient::connect(socket).map(|c| c.with_timeout(Some(REPLY_TIMEOUT)))
}

/// A VMM the bench runs itself (baseline), killed and reaped on drop.
struct Vmm {
    child: Child,
    conn: ControlClient,
    socket: PathBuf,
    log: PathBuf,
}

impl Vmm {
    /// Spawns `relive-vmm ARGS --control DIR/NAME.sock --console DIR/console.log`
    /// (stderr to DIR/NAME.log) and connects as soon as the socket exists.
    fn start(vmm: &Path, dir: &Path, name: &str, args: &[&std::ffi::OsStr]) -> Result<Vmm> {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let stderr =
            File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let mut child = Command::new(vmm)
            .args(args)
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(dir.join("console.log"))
            .env_remove("RELIVE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", vmm.display()))?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Ok(conn) = connect(&socket) {
                return Ok(Vmm {
                    child,
                    conn,
                    socket,
                    log,
                });
            }
            let early = child.try_wait().ok().flatten();
            if early.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "relive-vmm {:?} did not serve its control socket ({}):\n{}",
                    args,
                    early.map_or("still running".to_string(), |s| s.to_string()),
                    tail(&log)
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// An error message with the VMM's log; kills the VMM.
    fn failed(&mut self, what: String) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("{what}\n  VMM log:\n{}", tail(&self.log))
    }

    /// `shutdown`, then reap.
    fn shutdown(mut self) -> Result<()> {
        match self.conn.request(&Request::Shutdown) {
            Ok(Response::Ok) => {}
            other => return Err(self.failed(format!("shutdown answered {other:?}"))),
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(None) => {
                    return Err(self.failed(format!(
                        "the VMM did not exit within {EXIT_TIMEOUT:?} of shutdown"
                    )))
                }
                Err(e) => return Err(self.failed(format!("cannot reap the VMM: {e}"))),
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

/// The host, with its load at the start (other work skews the figures).
fn host_note() -> String {
    format!(
        "{}, load average {} at start",
        relive_testkit::host_note(),
        load_average()
    )
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn summary_json(values: &[f64]) -> Value {
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    Summary::of(values).map_or(Value::Null, |s| {
        json!({ "median": r(s.median), "p90": r(s.p90), "min": r(s.min), "max": r(s.max), "n": values.len() })
    })
}

/// `median / p90`, or `-`.
fn cell(values: &[f64]) -> String {
    Summary::of(values).map_or("-".into(), |s| format!("{:.2} / {:.2}", s.median, s.p90))
}

fn median(values: &[f64]) -> Option<f64> {
    Summary::of(values).map(|s| s.median)
}

/// The target of a row, if the project sets one (killed VMMs only).
fn row_target(kind: Kind, standby: bool) -> Option<f64> {
    match (kind, standby) {
        (Kind::Killed, true) => Some(STANDBY_TARGET_MS),
        (Kind::Killed, false) => Some(COLD_TARGET_MS),
        (Kind::Panic, _) => None,
    }
}

/// How often each value occurs, as `value n, value n`.
fn counts<'a>(values: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    values.fold(BTreeMap::new(), |mut m, v| {
        *m.entry(v.to_string()).or_default() += 1;
        m
    })
}

/// Per reported failure reason: how many, and their median detected -> running.
fn by_reason(samples: &[Sample]) -> BTreeMap<String, (usize, f64)> {
    let mut groups: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in samples {
        groups.entry(s.reason.clone()).or_default().push(s.total_ms);
    }
    groups
        .into_iter()
        .filter_map(|(reason, v)| Some((reason, (v.len(), median(&v)?))))
        .collect()
}

fn counts_text(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(
    runs: usize,
    batches: &[Batch],
    baseline: &Baseline,
    fleet: &FleetFigures,
    wall: Duration,
) {
    struct Row<'a> {
        batch: &'a Batch,
        target: Target,
        samples: &'a [Sample],
    }
    let rows: Vec<Row> = batches
        .iter()
        .flat_map(|b| {
            Target::ALL.map(|t| Row {
                batch: b,
                target: t,
                samples: b.samples.get(&t).map_or(&[][..], Vec::as_slice),
            })
        })
        .collect();
    let col = |r: &Row, f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<f64> {
        r.samples.iter().filter_map(f).collect()
    };
    let total = |r: &Row| col(r, &|s| Some(s.total_ms));
    let restore = |r: &Row| col(r, &|s| Some(s.restore_ms));
    let decide = |r: &Row| col(r, &|s| Some(s.decide_ms));
    let trig = |r: &Row| col(r, &|s| s.trigger_ms);
    let gone = |r: &Row| col(r, &|s| s.gone_ms);
    let after_gone = |r: &Row| col(r, &|s| Some(s.trigger_ms? - s.gone_ms?));
    let raw_cold = |t: Target| baseline.of(t).and_then(|b| median(&b.cold_ms));

    println!();
    println!(
        "  {:<15} {:<11} {:>7} {:>3}  {:>17} {:>15} {:>17}  {:>9} {:>9}  {:>9}",
        "failure",
        "target",
        "standby",
        "n",
        "detected->running",
        "restore",
        "trigger->vCPUs",
        "raw cold",
        "failover/",
        "target"
    );
    println!(
        "  {:<15} {:<11} {:>7} {:>3}  {:>17} {:>15} {:>17}  {:>9} {:>9}  {:>9}",
        "",
        "",
        "",
        "",
        "ms median / p90",
        "ms median / p90",
        "ms median / p90",
        "ms median",
        "raw cold",
        "(median)"
    );
    for r in &rows {
        let ratio = match (median(&total(r)), raw_cold(r.target)) {
            (Some(f), Some(raw)) if raw > 0.0 => format!("{:.2}", f / raw),
            _ => "-".into(),
        };
        println!(
            "  {:<15} {:<11} {:>7} {:>3}  {:>17} {:>15} {:>17}  {:>9} {:>9}  {:>9}",
            r.batch.label(),
            r.target.label(),
            standby_label(r.batch.standby),
            r.samples.len(),
            cell(&total(r)),
            cell(&restore(r)),
            cell(&trig(r)),
            raw_cold(r.target).map_or("-".into(), |m| format!("{m:.2}")),
            ratio,
            row_target(r.batch.kind, r.batch.standby).map_or("-".into(), |t| format!("< {t} ms")),
        );
    }

    println!();
    println!(
        "  baseline: the bench restores the last batch's images itself ({runs} runs, 1 warm-up);\n  \
         `consistency` is the image `latest_good()` picks, as the supervisor would"
    );
    for b in &baseline.rows {
        let raw = &b.raw;
        println!(
            "    {:<16} cold restore spawn->vCPUs {} ms; standby restore round trip {} ms \
             (VMM's own {} ms)   {} image {}",
            b.label,
            cell(&raw.cold_ms),
            cell(&raw.standby_ms),
            cell(&raw.standby_vmm_ms),
            b.image_kind,
            b.image_id,
        );
        println!(
            "    {:<16} the supervisor's other steps, done alone: choosing the image {} ms, \
             watch after restore {} ms, pid record {} ms",
            "",
            cell(&raw.choose_ms),
            cell(&raw.watch_ms),
            cell(&raw.persist_ms),
        );
    }

    println!();
    println!("  targets (median detected->running of a killed VMM)");
    let mut met = serde_json::Map::new();
    for r in &rows {
        let Some(target) = row_target(r.batch.kind, r.batch.standby) else {
            continue;
        };
        if let Some(m) = median(&total(r)) {
            let ok = m < target;
            println!(
                "    {:<11} standby {:<3} {:<11} {m:>7.2} ms  < {target} ms: {}",
                r.batch.label(),
                standby_label(r.batch.standby),
                r.target.label(),
                verdict(ok)
            );
            met.insert(
                format!(
                    "{}_{}_standby_{}",
                    r.batch.label(),
                    r.target.label(),
                    r.batch.standby
                ),
                ok.into(),
            );
        }
    }
    let cpu_ok = fleet.supervisor_cpu_percent < CPU_TARGET_PERCENT;
    println!(
        "    supervisor CPU, {} VMs      {:>7.2} %   < {CPU_TARGET_PERCENT} % of one core: {}",
        fleet.vms,
        fleet.supervisor_cpu_percent,
        verdict(cpu_ok)
    );
    met.insert("fleet_supervisor_cpu".into(), cpu_ok.into());

    println!();
    println!(
        "  where the time goes (medians, ms): trigger -> old VMM gone -> [supervisor wakes,\n  \
         decide = detected -> restore started, restore] -> new vCPUs running"
    );
    let m2 = |v: Vec<f64>| median(&v).map_or("-".into(), |m| format!("{m:.2}"));
    for r in &rows {
        println!(
            "    {:<11} {:<11} standby {:<3} gone {:>6} gone->vCPUs {:>6} decide {:>5} restore {:>6}  \
             path [{}]  image [{}]  reported reason: n, detected->running median [{}]",
            r.batch.label(),
            r.target.label(),
            standby_label(r.batch.standby),
            m2(gone(r)),
            m2(after_gone(r)),
            m2(decide(r)),
            m2(restore(r)),
            counts_text(&counts(r.samples.iter().map(|s| s.path.as_str()))),
            counts_text(&counts(r.samples.iter().map(|s| s.image.as_str()))),
            by_reason(r.samples)
                .iter()
                .map(|(reason, (n, m))| format!("{reason} {n}: {m:.2} ms"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    for b in batches {
        let foreign = b.failures_seen.saturating_sub(b.attempts);
        if !b.discarded.is_empty() || foreign > 0 {
            println!(
                "    {} standby {}: {} failovers discarded, {} failures the bench did not cause: {:?}",
                b.label(),
                standby_label(b.standby),
                b.discarded.len(),
                foreign,
                b.discarded
            );
        }
        let wrong: usize = b
            .samples
            .values()
            .flatten()
            .filter(|s| s.reason != b.kind.reason())
            .count();
        if wrong > 0 {
            println!(
                "    {} standby {}: the supervisor reported {wrong} of these failures with another reason than `{}`",
                b.label(),
                standby_label(b.standby),
                b.kind.reason()
            );
        }
    }
    println!(
        "    gone: the old VMM's pidfd readable (for a panic: spawning `relive-vmm ctl`, the guest\n    \
         panicking, the VMM exiting). gone->vCPUs: the supervisor noticing the exit (not in its\n    \
         own figures), deciding, choosing and verifying the image, and the restore up to the new\n    \
         vCPUs. restore = choosing and verifying the image + restoring it (standby: one `restore`\n    \
         request; cold: a new relive-vmm process, until its control socket answers) + opening\n    \
         the agent watch + recording the pid."
    );

    println!();
    println!(
        "  fleet: {} VMs of {MEM_MIB} MiB, bundled guest, checkpoint_interval 5s, standby: false \
         (no standbys: 50 more VMMs would crowd this 2-core host)",
        fleet.vms
    );
    println!(
        "    all running after {:.1} s; sampled {:.1} s once every VM had a checkpoint",
        fleet.startup_s, fleet.window_s
    );
    println!(
        "    supervisor   CPU {:>6.2} % of one core (target < {CPU_TARGET_PERCENT} %: {}), RSS {:.1} MiB (max {:.1} MiB)",
        fleet.supervisor_cpu_percent,
        verdict(cpu_ok),
        fleet.supervisor_rss_mib,
        fleet.supervisor_rss_max_mib
    );
    println!(
        "    {} VMMs      CPU {:>6.2} % of one core together ({:.2} % each), RSS {:.1} MiB together (context)",
        fleet.vms,
        fleet.vmm_cpu_percent,
        fleet.vmm_cpu_percent / fleet.vms as f64,
        fleet.vmm_rss_mib
    );
    println!(
        "    during the window: {:.0} checkpoints ({:.0} failed), {} failures, {}/{} VMs running at the end{}",
        fleet.checkpoints,
        fleet.checkpoints_failed,
        fleet.failures,
        fleet.running_after,
        fleet.vms,
        if fleet.vmm_pids_gone > 0 {
            format!(
                "; {} VMM pids went away (their CPU is not counted)",
                fleet.vmm_pids_gone
            )
        } else {
            String::new()
        }
    );
    println!();
    println!(
        "  whole run {:.0} s; load average at the end {}",
        wall.as_secs_f64(),
        load_average()
    );

    let rows_json: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "failure": r.batch.label(),
                "target": r.target.label(),
                "standby": r.batch.standby,
                "jailed": r.batch.jailed,
                "detected_to_running_ms": summary_json(&total(r)),
                "restore_ms": summary_json(&restore(r)),
                "decide_ms": summary_json(&decide(r)),
                "trigger_to_vcpus_ms": summary_json(&trig(r)),
                "trigger_to_vmm_gone_ms": summary_json(&gone(r)),
                "vmm_gone_to_vcpus_ms": summary_json(&after_gone(r)),
                "paths": counts(r.samples.iter().map(|s| s.path.as_str())),
                "images": counts(r.samples.iter().map(|s| s.image.as_str())),
                "reported_reasons": counts(r.samples.iter().map(|s| s.reason.as_str())),
                "detected_to_running_median_ms_by_reason": by_reason(r.samples)
                    .into_iter()
                    .map(|(reason, (_, m))| (reason, Value::from((m * 1000.0).round() / 1000.0)))
                    .collect::<serde_json::Map<_, _>>(),
                "target_median_ms": row_target(r.batch.kind, r.batch.standby),
                "over_raw_cold_restore": match (median(&total(r)), raw_cold(r.target)) {
                    (Some(f), Some(raw)) if raw > 0.0 => Some((f / raw * 1000.0).round() / 1000.0),
                    _ => None,
                },
            })
        })
        .collect();
    let baseline_json: serde_json::Map<String, Value> = baseline
        .rows
        .iter()
        .map(|b| {
            let raw = &b.raw;
            let v = json!({
                "image_id": b.image_id,
                "image_kind": b.image_kind,
                "cold_restore_vcpus_ms": summary_json(&raw.cold_ms),
                "standby_restore_round_trip_ms": summary_json(&raw.standby_ms),
                "standby_restore_vmm_ms": summary_json(&raw.standby_vmm_ms),
                "choose_image_ms": summary_json(&raw.choose_ms),
                "watch_after_restore_ms": summary_json(&raw.watch_ms),
                "pid_record_ms": summary_json(&raw.persist_ms),
            });
            (b.label.to_string(), v)
        })
        .collect();
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let line = json!({
        "runs": runs,
        "mem_mib": MEM_MIB,
        "cmdline": CMDLINE,
        "policy": BATCH_POLICY.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        "rows": rows_json,
        "baseline": baseline_json,
        "discarded": batches.iter().map(|b| b.discarded.len()).sum::<usize>(),
        "fleet": {
            "vms": fleet.vms,
            "mem_mib": MEM_MIB,
            "checkpoint_interval_s": 5,
            "standby": false,
            "window_s": r2(fleet.window_s),
            "startup_s": r2(fleet.startup_s),
            "supervisor_cpu_percent": r2(fleet.supervisor_cpu_percent),
            "supervisor_rss_mib": r2(fleet.supervisor_rss_mib),
            "supervisor_rss_max_mib": r2(fleet.supervisor_rss_max_mib),
            "vmm_cpu_percent_sum": r2(fleet.vmm_cpu_percent),
            "vmm_rss_mib_sum": r2(fleet.vmm_rss_mib),
            "checkpoints": fleet.checkpoints,
            "checkpoints_failed": fleet.checkpoints_failed,
            "failures": fleet.failures,
            "running_after": fleet.running_after,
        },
        "targets": {
            "killed_standby_median_ms": STANDBY_TARGET_MS,
            "killed_cold_median_ms": COLD_TARGET_MS,
            "supervisor_cpu_percent": CPU_TARGET_PERCENT,
        },
        "targets_met": met,
        "wall_s": r2(wall.as_secs_f64()),
    });
    println!();
    println!("BENCH failover {line}");
}
