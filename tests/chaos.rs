//! The chaos soak: a supervised fleet driven through a seeded random
//! sequence of the faults an on-call engineer's worst day brings, with the
//! supervisor's promises checked all along and once it has settled.
//!
//! ```text
//! cargo test --test chaos -- --nocapture          # 2 minutes, part of the suite
//! scripts/chaos.sh 600 [SEED]                     # the 10-minute soak (release build)
//! ```
//!
//! `RELIVE_CHAOS_SECS` sets the length and `RELIVE_CHAOS_SEED` replays a run
//! (the seed is printed first). The fleet: 4 VMs on the bundled guest, 2 with
//! a standby, `checkpoint_interval: 1s`, `heartbeat_timeout: 1s`,
//! `failure_window: 20s`, `max_failures: 3`, `keep_images: 3`, heartbeats
//! every 100 ms, its state directory on a tmpfs of its own (so that the disk
//! can be filled without touching the host's).
//!
//! # Faults
//!
//! kill -9 of an active VMM (also while no supervisor runs) and of a standby;
//! guest panic, triple fault, reset and hang; forced failovers to the
//! consistency and the boot image; kill -9 of the supervisor (restarted after
//! a moment); SIGSTOP of an active VMM for 3 s; a full disk for 10 s (at
//! least once per run); `relive start` of a failed VM.
//!
//! # Invariants
//!
//! Checked while it runs:
//! - the supervisor never panics, and its API answers every call while it runs;
//! - at most one active and one standby VMM per VM (a third process may
//!   exist for an instant while one is replaced, never for 3 s);
//! - every injected failure is detected with its reason; a hang or a stall
//!   within `heartbeat_timeout` + one heartbeat interval (+ 250 ms for the
//!   supervisor's tick and the event's own write) of its start;
//! - a consistency restore continues the guest's counter from its image; a
//!   boot restore starts it afresh;
//! - each VM's image directory stays within `keep_images` chains plus the
//!   boot image, the in-use image and the chain being written.
//!
//! Checked once settled:
//! - every VM is `running` or `failed`, and `failed` exactly when a model of
//!   the README's policy (failures within `failure_window`, the last restore)
//!   says so; every decision to restore the boot image after a recent
//!   consistency restore was taken;
//! - `events.jsonl` holds every event, in order, with no gap (the disk-full
//!   period included); each VM's transitions chain (`from` is the previous
//!   `to`, or `starting` under a new supervisor); the metrics of the current
//!   supervisor match its events (failures by reason, restores by image and
//!   path);
//! - each VM's VMM processes are exactly its `pid` and `standby_pid`;
//! - no temporary files are left.
//!
//! It prints the seed, the fault counts, and the failover times (`total_ms`)
//! by restore path and by the fault that caused them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers fail a test by panicking

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fleet::{
    cmdline, heartbeat_of, is_alive, kill9, signal, unix_ms, wait_for, Fleet, STEP,
};
use common::{require_kvm, run_vmm, Heartbeat};
use relive_testkit::Summary;
use serde_json::Value;

/// The soak's length when `RELIVE_CHAOS_SECS` is not set.
const DEFAULT_SECS: u64 = 120;

const VMS: [&str; 4] = ["c-1", "c-2", "sb-1", "sb-2"];
const HB_MS: u64 = 100;
const HEARTBEAT_TIMEOUT_MS: u64 = 1000;
const READY_GRACE_MS: u64 = 1000;
const FAILURE_WINDOW_MS: u64 = 20_000;
const MAX_FAILURES: usize = 3;
const KEEP_IMAGES: usize = 3;
/// Layers a VMM writes before it merges a chain (`relive_vmm::vm::MERGE_AFTER_LAYERS`).
const MERGE_AFTER_LAYERS: usize = 4;
/// Beyond `heartbeat_timeout` + one heartbeat interval: the supervisor's
/// 50 ms tick, killing the stalled VMM and writing the event.
const DETECTION_ALLOWANCE_MS: u64 = 250;
/// How long an injected failure may take to show as an event.
const EXPECT_WITHIN: Duration = Duration::from_secs(15);
const STALL: Duration = Duration::from_secs(3);
const DISK_FULL: Duration = Duration::from_secs(10);
const TMPFS_SIZE: &str = "size=256m";
const POLL: Duration = Duration::from_millis(200);

/// Failure reasons, as events and metrics name them.
const FAILURE_REASONS: [&str; 11] = [
    "vmm-killed",
    "vmm-error",
    "panic",
    "triple-fault",
    "reset",
    "poweroff",
    "kvm-error",
    "heartbeat-timeout",
    "control-lost",
    "control-timeout",
    "start-failed",
];

fn fleet_yaml(state: &Path) -> String {
    let mut yaml = format!(
        "state_dir: {}\ndefaults:\n  checkpoint_interval: 1s\n  heartbeat_timeout: {HEARTBEAT_TIMEOUT_MS}ms\n  \
         ready_grace: {READY_GRACE_MS}ms\n  failure_window: {FAILURE_WINDOW_MS}ms\n  max_failures: {MAX_FAILURES}\n  \
         keep_images: {KEEP_IMAGES}\n  warm_boot_image: true\n  control_timeout: 3s\n  standby_timeout: 1s\nvms:\n",
        state.display()
    );
    for vm in VMS {
        yaml.push_str(&format!(
            "  - name: {vm}\n    kernel: bundled\n    cmdline: \"relive.hb_ms={HB_MS}\"\n    memory_mib: 64\n    \
             policy:\n      standby: {}\n",
            vm.starts_with("sb")
        ));
    }
    yaml
}

// ---------------------------------------------------------------------------
// Randomness, faults
// ---------------------------------------------------------------------------

/// SplitMix64: enough for a reproducible fault sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Fault {
    KillActive,
    KillActiveUnsupervised,
    KillStandby,
    Panic,
    Crash,
    Reset,
    Hang,
    Stall,
    FailoverConsistency,
    FailoverBoot,
    KillSupervisor,
    DiskFull,
    Start,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillActive => "kill -9 active VMM",
            Fault::KillActiveUnsupervised => "kill -9 active VMM, no supervisor",
            Fault::KillStandby => "kill -9 standby VMM",
            Fault::Panic => "guest panic",
            Fault::Crash => "guest triple fault",
            Fault::Reset => "guest reset",
            Fault::Hang => "guest hang",
            Fault::Stall => "SIGSTOP active VMM 3 s",
            Fault::FailoverConsistency => "failover --to consistency",
            Fault::FailoverBoot => "failover --to boot",
            Fault::KillSupervisor => "kill -9 supervisor",
            Fault::DiskFull => "disk full 10 s",
            Fault::Start => "relive start (failed VM)",
        }
    }

    /// The failure reason the fault must be detected as.
    fn reason(self) -> Option<&'static str> {
        match self {
            Fault::KillActive | Fault::KillActiveUnsupervised => Some("vmm-killed"),
            Fault::Panic => Some("panic"),
            Fault::Crash => Some("triple-fault"),
            Fault::Reset => Some("reset"),
            Fault::Hang | Fault::Stall => Some("heartbeat-timeout"),
            _ => None,
        }
    }

    /// Faults that stop the guest's heartbeats: detected on time.
    fn is_stall(self) -> bool {
        matches!(self, Fault::Hang | Fault::Stall)
    }
}

/// A fault whose detection is awaited.
struct Expected {
    fault: Fault,
    at_ms: u64,
    deadline: Instant,
}

// ---------------------------------------------------------------------------
// The tmpfs the fleet's state lives on
// ---------------------------------------------------------------------------

/// A tmpfs mounted over `dir`, lazily unmounted on drop (the VMMs may still
/// hold files open for an instant).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Result<Tmpfs, String> {
        use std::ffi::CString;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let target = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let fstype = CString::new("tmpfs").unwrap();
        let data = CString::new(TMPFS_SIZE).unwrap();
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; MNT_DETACH only unmounts.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Fills the filesystem of `dir` with a file until it refuses more.
fn fill_disk(filler: &Path) -> u64 {
    let mut file = std::fs::File::create(filler).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    written
}

// ---------------------------------------------------------------------------
// Events, read from events.jsonl as they are written
// ---------------------------------------------------------------------------

#[derive(Default)]
struct EventTail {
    offset: u64,
    partial: Vec<u8>,
    events: Vec<Value>,
    fragments: usize,
}

impl EventTail {
    /// Reads the lines appended since the last call; returns how many events came.
    fn poll(&mut self, path: &Path) -> usize {
        let Ok(mut file) = std::fs::File::open(path) else {
            return 0;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return 0;
        }
        let mut buf = Vec::new();
        if file.read_to_end(&mut buf).is_err() {
            return 0;
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let before = self.events.len();
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]).into_owned();
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v["seq"].is_u64() => self.events.push(v),
                _ => self.fragments += 1,
            }
        }
        self.events.len() - before
    }
}

/// An event of a failure (its reason is a failure reason: only the
/// supervisor's failure handling records those; while `failed`, from and to
/// are both `failed`).
fn is_failure(event: &Value) -> bool {
    FAILURE_REASONS.contains(&event["reason"].as_str().unwrap_or(""))
}

fn ms(event: &Value) -> u64 {
    event["unix_ms"].as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------

/// A restore whose guest is yet to be seen running.
struct ToVerify {
    vm: String,
    boot: bool,
    image_hb: Option<Heartbeat>,
    restored_ms: u64,
    before_seq: Option<u64>,
}

struct Soak {
    fleet: Fleet,
    rng: Rng,
    tail: EventTail,
    /// Whether the supervisor runs, and since when (unix ms).
    supervisor_since: Option<u64>,
    restart_supervisor_at: Option<Instant>,
    expected: HashMap<String, Expected>,
    /// Stopped VMMs to continue: (pid, when).
    stopped: Vec<(u32, Instant)>,
    disk_full_until: Option<Instant>,
    /// Until then events.jsonl may lag behind (a full disk): restores are
    /// verified only once it has caught up.
    events_lag_until: Option<Instant>,
    disk_fulls: usize,
    can_fill_disk: bool,
    faults: BTreeMap<Fault, usize>,
    /// The last fault injected per VM: (fault, unix ms), to attribute failovers.
    last_fault: HashMap<String, (Fault, u64)>,
    verify: Vec<ToVerify>,
    verified: BTreeMap<&'static str, usize>,
    detections: Vec<(Fault, f64)>,
    failovers: BTreeMap<(String, String), Vec<f64>>,
    /// VMs over their process limit, since when.
    crowded: HashMap<String, Instant>,
    max_images: BTreeMap<String, usize>,
    last_seq_seen: HashMap<String, u64>,
    violations: Vec<String>,
    api_calls: usize,
}

impl Soak {
    fn state(&self) -> &Path {
        &self.fleet.state
    }

    fn violation(&mut self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.violations.push(what);
    }

    /// Starts a supervisor; its metrics count what happens from now on
    /// (adoptions and restores before its API answers included).
    fn start_supervisor(&mut self) {
        let since = unix_ms();
        self.fleet.start_supervisor();
        self.supervisor_since = Some(since);
    }

    fn supervisor_up(&self) -> bool {
        self.supervisor_since.is_some()
    }

    /// `relive status --json`, which must answer while the supervisor runs.
    fn views(&mut self) -> Option<BTreeMap<String, Value>> {
        if !self.supervisor_up() {
            return None;
        }
        self.api_calls += 1;
        let out = self.fleet.relive(&["status", "--json"]);
        if out.code != Some(0) {
            self.violation(format!("the API did not answer `status`: {out:?}"));
            return None;
        }
        let list: Value = serde_json::from_str(out.stdout.trim()).ok()?;
        Some(
            list.as_array()?
                .iter()
                .map(|v| (v["name"].as_str().unwrap_or("").to_string(), v.clone()))
                .collect(),
        )
    }

    fn vmm_pids(&self, vm: &str) -> BTreeSet<u32> {
        let dir = format!("{}/", self.state().join(vm).display());
        common::fleet::vmms_of(self.state())
            .into_iter()
            .filter(|pid| cmdline(*pid).contains(&dir))
            .collect()
    }

    fn record_fault(&mut self, fault: Fault, vm: Option<&str>) {
        *self.faults.entry(fault).or_default() += 1;
        let now = unix_ms();
        if let Some(vm) = vm {
            self.last_fault.insert(vm.to_string(), (fault, now));
            if fault.reason().is_some() {
                self.expected.insert(
                    vm.to_string(),
                    Expected {
                        fault,
                        at_ms: now,
                        deadline: Instant::now() + EXPECT_WITHIN,
                    },
                );
            }
        }
        eprintln!(
            "[{now}] fault: {}{}",
            fault.name(),
            vm.map(|v| format!(" on {v}")).unwrap_or_default()
        );
    }

    /// Injects one fault chosen at random among those that apply now.
    fn inject(&mut self, views: &BTreeMap<String, Value>, run_end: Instant) {
        let now_ms = unix_ms();
        let settled = |v: &Value| {
            v["state"] == "running"
                && v["pid"].is_u64()
                && now_ms.saturating_sub(v["since_unix_ms"].as_u64().unwrap_or(now_ms))
                    > READY_GRACE_MS + 500
        };
        let free: Vec<String> = views
            .iter()
            .filter(|(name, v)| settled(v) && !self.expected.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        let failed: Vec<String> = views
            .iter()
            .filter(|(_, v)| v["state"] == "failed")
            .map(|(name, _)| name.clone())
            .collect();
        let with_standby: Vec<String> = views
            .iter()
            .filter(|(_, v)| v["standby_pid"].is_u64())
            .map(|(name, _)| name.clone())
            .collect();
        if let Some(vm) = self.rng.pick(&failed).cloned() {
            self.record_fault(Fault::Start, Some(&vm));
            let out = self.fleet.relive(&["start", &vm]);
            eprintln!("  relive start {vm}: {}", out.stdout.trim());
            return;
        }
        // At least one full disk per run, in its middle.
        let left = run_end.saturating_duration_since(Instant::now());
        if self.can_fill_disk && self.disk_fulls == 0 && left < Duration::from_secs(60) {
            return self.fill_disk();
        }
        let mut choices: Vec<(Fault, u64)> = vec![(Fault::KillSupervisor, 1)];
        if self.disk_full_until.is_none() && self.can_fill_disk {
            choices.push((Fault::DiskFull, 1));
        }
        if !free.is_empty() {
            choices.extend([
                (Fault::KillActive, 4),
                (Fault::Panic, 2),
                (Fault::Crash, 2),
                (Fault::Reset, 2),
                (Fault::Hang, 2),
                (Fault::Stall, 2),
                (Fault::FailoverConsistency, 2),
                (Fault::FailoverBoot, 1),
            ]);
        }
        if !with_standby.is_empty() {
            choices.push((Fault::KillStandby, 2));
        }
        let total: u64 = choices.iter().map(|(_, w)| w).sum();
        let mut roll = self.rng.below(total);
        let fault = choices
            .iter()
            .find(|(_, w)| {
                let hit = roll < *w;
                roll = roll.saturating_sub(*w);
                hit
            })
            .map(|(f, _)| *f)
            .unwrap();
        let vm = match fault {
            Fault::KillStandby => self.rng.pick(&with_standby).cloned(),
            Fault::KillSupervisor | Fault::DiskFull => None,
            _ => self.rng.pick(&free).cloned(),
        };
        let view = vm.as_ref().and_then(|vm| views.get(vm));
        match fault {
            Fault::KillSupervisor => {
                if !self.expected.is_empty() {
                    return; // stalls and hangs are judged under one supervisor
                }
                self.record_fault(fault, None);
                self.fleet.kill_supervisor();
                self.check_panics();
                self.supervisor_since = None;
                let down = Duration::from_millis(500 + self.rng.below(1500));
                self.restart_supervisor_at = Some(Instant::now() + down);
                // Sometimes a VMM dies while nobody watches.
                if self.rng.below(2) == 0 {
                    if let Some(vm) = self.rng.pick(&free).cloned() {
                        if let Some(pid) = views[&vm]["pid"].as_u64() {
                            self.record_fault(Fault::KillActiveUnsupervised, Some(&vm));
                            kill9(pid as u32);
                        }
                    }
                }
            }
            Fault::DiskFull => self.fill_disk(),
            Fault::KillActive | Fault::Stall => {
                let (Some(vm), Some(pid)) = (vm, view.and_then(|v| v["pid"].as_u64())) else {
                    return;
                };
                let pid = pid as u32;
                if !common::fleet::is_vmm_of(pid, self.state()) {
                    return;
                }
                self.record_fault(fault, Some(&vm));
                if fault == Fault::KillActive {
                    kill9(pid);
                } else {
                    signal(pid, libc::SIGSTOP);
                    self.stopped.push((pid, Instant::now() + STALL));
                }
            }
            Fault::KillStandby => {
                let (Some(vm), Some(pid)) = (vm, view.and_then(|v| v["standby_pid"].as_u64()))
                else {
                    return;
                };
                if common::fleet::is_vmm_of(pid as u32, self.state()) {
                    self.record_fault(fault, Some(&vm));
                    kill9(pid as u32);
                }
            }
            Fault::Panic | Fault::Crash | Fault::Reset | Fault::Hang => {
                let (Some(vm), Some(socket)) = (vm, view.and_then(|v| v["socket"].as_str())) else {
                    return;
                };
                let cmd = match fault {
                    Fault::Panic => "panic",
                    Fault::Crash => "crash",
                    Fault::Reset => "reset",
                    _ => "hang",
                };
                self.record_fault(fault, Some(&vm));
                let out = run_vmm(["ctl", socket, "agent", cmd]);
                if out.code != Some(0) {
                    // The VM failed over meanwhile: nothing was injected.
                    eprintln!("  agent {cmd} not delivered: {}", out.stderr.trim());
                    self.expected.remove(&vm);
                }
            }
            Fault::FailoverConsistency | Fault::FailoverBoot => {
                let Some(vm) = vm else { return };
                let to = if fault == Fault::FailoverBoot {
                    "boot"
                } else {
                    "consistency"
                };
                self.record_fault(fault, Some(&vm));
                let out = self.fleet.relive(&["failover", &vm, "--to", to]);
                eprintln!(
                    "  failover {vm} --to {to}: {} {}",
                    out.stdout.trim(),
                    out.stderr.trim()
                );
            }
            Fault::KillActiveUnsupervised | Fault::Start => unreachable!("not drawn"),
        }
    }

    fn fill_disk(&mut self) {
        self.record_fault(Fault::DiskFull, None);
        self.disk_fulls += 1;
        let filled = fill_disk(&self.state().join("filler"));
        eprintln!("  filled the disk with {} MiB", filled >> 20);
        self.disk_full_until = Some(Instant::now() + DISK_FULL);
        self.events_lag_until = Some(Instant::now() + DISK_FULL + Duration::from_secs(3));
    }

    /// Ends what has run its time: stalls, the full disk, the supervisor's absence.
    fn housekeeping(&mut self) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .stopped
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|(pid, _)| *pid)
            .collect();
        self.stopped.retain(|(_, at)| *at > now);
        for pid in due {
            if is_alive(pid) {
                signal(pid, libc::SIGCONT);
            }
        }
        if self.disk_full_until.is_some_and(|t| t <= now) {
            let _ = std::fs::remove_file(self.state().join("filler"));
            self.disk_full_until = None;
        }
        if self.restart_supervisor_at.is_some_and(|t| t <= now) {
            self.restart_supervisor_at = None;
            self.start_supervisor();
        }
    }

    /// Reads new events: resolves expectations, measures detections,
    /// queues restores to verify.
    fn on_events(&mut self, views: Option<&BTreeMap<String, Value>>) {
        let from = self.tail.events.len();
        self.tail.poll(&self.state().join("events.jsonl"));
        let new: Vec<Value> = self.tail.events[from..].to_vec();
        for event in new {
            let vm = event["vm"].as_str().unwrap_or("").to_string();
            if is_failure(&event) {
                // Events written late (a full disk) may predate the fault.
                let after_fault = self
                    .expected
                    .get(&vm)
                    .is_some_and(|e| ms(&event) >= e.at_ms);
                let expected = if after_fault {
                    self.expected.remove(&vm)
                } else {
                    None
                };
                if let Some(expected) = expected {
                    let reason = event["reason"].as_str().unwrap_or("");
                    let want = expected.fault.reason().unwrap_or("");
                    let took = ms(&event).saturating_sub(expected.at_ms);
                    if reason != want {
                        self.violation(format!(
                            "{} on {vm} was detected as {reason}, not {want}: {event}",
                            expected.fault.name()
                        ));
                    } else if expected.fault.is_stall() {
                        self.detections.push((expected.fault, took as f64));
                        let bound = HEARTBEAT_TIMEOUT_MS + HB_MS + DETECTION_ALLOWANCE_MS;
                        if took > bound {
                            self.violation(format!(
                                "{} on {vm} was detected {took} ms after it began (bound {bound} ms): {event}",
                                expected.fault.name()
                            ));
                        }
                    }
                }
                continue;
            }
            if event["reason"] == "restored" && event["to"] == "running" {
                let detail = event["detail"].as_str().unwrap_or("");
                let cause = self
                    .last_fault
                    .get(&vm)
                    .filter(|(_, at)| *at <= ms(&event))
                    .map_or("other", |(f, _)| f.name());
                let path = event["path"].as_str().unwrap_or("?").to_string();
                if let Some(total) = event["durations"]["total_ms"].as_f64() {
                    self.failovers
                        .entry((path.clone(), cause.to_string()))
                        .or_default()
                        .push(total);
                }
                let boot = detail.ends_with("restored boot");
                let image_hb = if boot {
                    None
                } else {
                    event["image_id"]
                        .as_str()
                        .and_then(|id| self.image_heartbeat(&vm, id))
                };
                if !boot && image_hb.is_none() {
                    *self.verified.entry("consistency, image gone").or_default() += 1;
                    continue;
                }
                let before_seq = self.last_seq_seen.get(&vm).copied();
                self.verify.push(ToVerify {
                    vm,
                    boot,
                    image_hb,
                    restored_ms: ms(&event),
                    before_seq,
                });
            }
        }
        if let Some(views) = views {
            self.verify_restores(views);
        }
    }

    /// The guest's last heartbeat recorded in image `id` of `vm`.
    fn image_heartbeat(&self, vm: &str, id: &str) -> Option<Heartbeat> {
        let dir = self.state().join(vm).join("images");
        let path = std::fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(&format!("-{id}.rimg")))?;
        let out = run_vmm(["images", "inspect", path.to_str()?, "--json"]);
        let inspected: Value = serde_json::from_str(&out.stdout).ok()?;
        inspected["app_status"]["last_heartbeat"]
            .as_str()
            .and_then(Heartbeat::parse)
    }

    /// Checks queued restores against what each VM's guest says now.
    fn verify_restores(&mut self, views: &BTreeMap<String, Value>) {
        if self.events_lag_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let pending = std::mem::take(&mut self.verify);
        for v in pending {
            let later_change =
                self.tail.events.iter().any(|e| {
                    e["vm"] == v.vm.as_str() && ms(e) > v.restored_ms && e["from"] != e["to"]
                });
            if later_change {
                *self.verified.entry("superseded").or_default() += 1;
                continue;
            }
            let Some(hb) = views
                .get(&v.vm)
                .filter(|w| w["state"] == "running")
                .and_then(heartbeat_of)
            else {
                if unix_ms().saturating_sub(v.restored_ms) > 20_000 {
                    self.violation(format!(
                        "{} sent no heartbeat for 20 s after its restore",
                        v.vm
                    ));
                } else {
                    self.verify.push(v);
                }
                continue;
            };
            if v.boot {
                let elapsed = unix_ms().saturating_sub(v.restored_ms);
                let most = elapsed / HB_MS + 10;
                if hb.seq > most {
                    self.violation(format!(
                        "{}: {hb:?} {elapsed} ms after a boot restore does not start afresh \
                         (seq at most {most}; before the failure: {:?})",
                        v.vm, v.before_seq
                    ));
                } else {
                    *self.verified.entry("boot, started afresh").or_default() += 1;
                }
            } else if let Some(image) = v.image_hb {
                match image.continued_by(&hb) {
                    Ok(()) => *self.verified.entry("consistency, continued").or_default() += 1,
                    Err(e) => self.violation(format!(
                        "{}: the consistency restore did not continue its image: {e}",
                        v.vm
                    )),
                }
            }
        }
        for (vm, view) in views {
            if let Some(hb) = heartbeat_of(view) {
                self.last_seq_seen.insert(vm.clone(), hb.seq);
            }
        }
    }

    /// Expected failures that never showed.
    fn overdue(&mut self) {
        let now = Instant::now();
        let late: Vec<(String, Fault)> = self
            .expected
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(vm, e)| (vm.clone(), e.fault))
            .collect();
        for (vm, fault) in late {
            self.expected.remove(&vm);
            if self.supervisor_up() {
                self.violation(format!(
                    "{} on {vm} was not detected within {EXPECT_WITHIN:?}",
                    fault.name()
                ));
            }
        }
    }

    /// Process counts and image counts.
    fn check_resources(&mut self) {
        let now = Instant::now();
        for vm in VMS {
            let pids = self.vmm_pids(vm);
            if pids.len() > 2 {
                let since = *self.crowded.entry(vm.to_string()).or_insert(now);
                if now.duration_since(since) > Duration::from_secs(3) {
                    let described: Vec<String> = pids
                        .iter()
                        .map(|p| format!("{p}: {}", cmdline(*p)))
                        .collect();
                    self.violation(format!(
                        "{vm} has {} VMM processes for 3 s:\n  {}",
                        pids.len(),
                        described.join("\n  ")
                    ));
                    // Said once: not again for this VM.
                    self.crowded
                        .insert(vm.to_string(), now + Duration::from_secs(100_000));
                }
            } else {
                self.crowded.remove(vm);
            }
            let images = image_files(&self.state().join(vm).join("images"));
            let most = self.max_images.entry(vm.to_string()).or_default();
            *most = (*most).max(images);
            if images > image_bound() {
                self.violation(format!(
                    "{vm} holds {images} images, more than {} (keep_images {KEEP_IMAGES})",
                    image_bound()
                ));
            }
        }
    }

    fn check_panics(&mut self) {
        let logs: Vec<PathBuf> = std::fs::read_dir(self.fleet.dir.path())
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().ends_with(".err"))
                    .collect()
            })
            .unwrap_or_default();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("panicked")) {
                let what = format!("the supervisor panicked ({}): {line}", log.display());
                if !self.violations.contains(&what) {
                    self.violation(what);
                }
            }
        }
    }
}

/// The boot image, the in-use (restored-from) image, `keep_images` chains
/// and the chain being written, each a full image or a compacted layer with
/// the raw layers on it, and the full image under compacted layers.
fn image_bound() -> usize {
    3 + (KEEP_IMAGES + 1) * (1 + MERGE_AFTER_LAYERS)
}

fn image_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".rimg"))
                .count()
        })
        .unwrap_or(0)
}

fn temp_files(state: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![state.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                dirs.push(path);
            } else if name.starts_with(".tmp-") || name.ends_with(".tmp") {
                found.push(path);
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------
// Final checks
// ---------------------------------------------------------------------------

/// The README's policy, replayed over one VM's events: whether each
/// decision was the one it prescribes. Decisions within 500 ms of a window's
/// edge are not judged (event times trail the detection by a few ms).
fn check_policy(vm: &str, events: &[&Value], violations: &mut Vec<String>) -> bool {
    const EDGE_MS: u64 = 500;
    let mut failures: Vec<u64> = Vec::new();
    let mut last_state_restore: Option<(u64, &Value)> = None;
    let mut failed = false;
    for e in events {
        let t = ms(e);
        let to = e["to"].as_str().unwrap_or("");
        let reason = e["reason"].as_str().unwrap_or("");
        if reason == "operator-start" {
            failures.clear();
            last_state_restore = None;
            failed = false;
            continue;
        }
        if reason == "restored" {
            let detail = e["detail"].as_str().unwrap_or("");
            // The last restore counts; only one of saved state (a consistency
            // or an operator's image) sends the next failure to the boot image.
            last_state_restore = (!detail.ends_with("restored boot")).then_some((t, *e));
            continue;
        }
        if !is_failure(e) {
            continue;
        }
        if failed {
            if to != "failed" {
                violations.push(format!("{vm} left `failed` without `relive start`: {e}"));
            }
            continue;
        }
        failures.push(t);
        let in_window = |at: u64| t.saturating_sub(at) < FAILURE_WINDOW_MS;
        let near_edge = |at: u64| t.saturating_sub(at).abs_diff(FAILURE_WINDOW_MS) < EDGE_MS;
        let counted = failures.iter().filter(|&&at| in_window(at)).count();
        let unsure = failures.iter().any(|&at| near_edge(at));
        let give_up = counted > MAX_FAILURES;
        if !unsure && give_up != (to == "failed") {
            violations.push(format!(
                "{vm}: {counted} failures within failure_window means {}, but the supervisor went to {to}: {e}",
                if give_up { "failed" } else { "a restore" }
            ));
        }
        if to == "failed" {
            failed = true;
            continue;
        }
        let recent = last_state_restore.filter(|(at, _)| in_window(*at));
        let recent_unsure = last_state_restore.is_some_and(|(at, _)| near_edge(at));
        if let Some((at, restore)) = recent.filter(|_| !recent_unsure && to != "restoring-boot") {
            violations.push(format!(
                "{vm}: a failure {} ms after a consistency restore must go to the boot image, not {to}: {e}\n  the restore: {restore}",
                t - at
            ));
        }
    }
    failed
}

fn check_events(tail: &EventTail, violations: &mut Vec<String>) {
    let seqs: Vec<u64> = tail
        .events
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    if seqs != expected {
        let gaps: Vec<(u64, u64)> = seqs
            .windows(2)
            .filter(|w| w[1] != w[0] + 1)
            .map(|w| (w[0], w[1]))
            .collect();
        violations.push(format!(
            "events.jsonl does not hold events 1..={} in order: {} events, jumps {gaps:?}",
            seqs.last().copied().unwrap_or(0),
            seqs.len()
        ));
    }
    let mut last_to: HashMap<&str, &str> = HashMap::new();
    for e in &tail.events {
        if e["from"] == e["to"] {
            continue;
        }
        let vm = e["vm"].as_str().unwrap_or("");
        let from = e["from"].as_str().unwrap_or("");
        if let Some(prev) = last_to.get(vm) {
            if *prev != from && from != "starting" {
                violations.push(format!(
                    "{vm}: an event from {from} follows one to {prev}: {e}"
                ));
            }
        }
        last_to.insert(vm, e["to"].as_str().unwrap_or(""));
    }
}

#[test]
fn chaos_soak() {
    if !require_kvm() {
        return;
    }
    let secs = std::env::var("RELIVE_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECS);
    let seed = std::env::var("RELIVE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| unix_ms() ^ u64::from(std::process::id()));
    eprintln!("chaos soak: seed {seed}, {secs} s (replay: RELIVE_CHAOS_SEED={seed} RELIVE_CHAOS_SECS={secs})");

    let fleet = Fleet::new(fleet_yaml);
    let tmpfs = match Tmpfs::mount(&fleet.state) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!(
                "note: no tmpfs for the state directory ({e}): the full-disk fault is left out"
            );
            None
        }
    };
    let mut soak = Soak {
        can_fill_disk: tmpfs.is_some(),
        fleet,
        rng: Rng(seed),
        tail: EventTail::default(),
        supervisor_since: None,
        restart_supervisor_at: None,
        expected: HashMap::new(),
        stopped: Vec::new(),
        disk_full_until: None,
        events_lag_until: None,
        disk_fulls: 0,
        faults: BTreeMap::new(),
        last_fault: HashMap::new(),
        verify: Vec::new(),
        verified: BTreeMap::new(),
        detections: Vec::new(),
        failovers: BTreeMap::new(),
        crowded: HashMap::new(),
        max_images: BTreeMap::new(),
        last_seq_seen: HashMap::new(),
        violations: Vec::new(),
        api_calls: 0,
    };
    soak.start_supervisor();
    wait_for("every VM running", STEP, || {
        let views = soak.fleet.status();
        views
            .iter()
            .all(|v| v["state"] == "running" && heartbeat_of(v).is_some())
            .then_some(())
    });

    let started = Instant::now();
    let run_end = started + Duration::from_secs(secs);
    let mut next_fault = started + Duration::from_secs(3);
    while Instant::now() < run_end {
        soak.housekeeping();
        let views = soak.views();
        soak.on_events(views.as_ref());
        soak.overdue();
        soak.check_resources();
        if Instant::now() >= next_fault {
            if let Some(views) = &views {
                soak.inject(views, run_end);
            }
            next_fault = Instant::now() + Duration::from_millis(700 + soak.rng.below(1600));
        }
        std::thread::sleep(POLL);
    }

    // Settle: every fault ended, every VM running or failed, standbys back.
    eprintln!("settling");
    for (pid, _) in std::mem::take(&mut soak.stopped) {
        if is_alive(pid) {
            signal(pid, libc::SIGCONT);
        }
    }
    let _ = std::fs::remove_file(soak.state().join("filler"));
    soak.disk_full_until = None;
    if soak.restart_supervisor_at.take().is_some() {
        soak.start_supervisor();
    }
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    let views = loop {
        let views = soak.views().unwrap_or_default();
        soak.on_events(Some(&views));
        let settled = views.len() == VMS.len()
            && views.values().all(|v| {
                (v["state"] == "running"
                    && heartbeat_of(v).is_some()
                    && (v["standby"] != "starting" && v["standby"] != "none"))
                    || v["state"] == "failed"
            })
            && soak.verify.is_empty();
        if settled || Instant::now() > settle_deadline {
            break views;
        }
        std::thread::sleep(POLL);
    };
    // A checkpoint and its retention after the last failover.
    std::thread::sleep(Duration::from_secs(3));
    let views = soak.views().unwrap_or(views);
    soak.on_events(Some(&views));
    soak.overdue();
    soak.check_resources();
    soak.check_panics();

    let mut violations = std::mem::take(&mut soak.violations);
    for (vm, view) in &views {
        let state = view["state"].as_str().unwrap_or("");
        if state != "running" && state != "failed" {
            violations.push(format!("{vm} did not settle: {view}"));
        }
        let events: Vec<&Value> = soak
            .tail
            .events
            .iter()
            .filter(|e| e["vm"] == vm.as_str())
            .collect();
        let failed = check_policy(vm, &events, &mut violations);
        if failed != (state == "failed") {
            violations.push(format!(
                "{vm} is {state}, but the policy says it is {}",
                if failed { "failed" } else { "not failed" }
            ));
        }
        let listed: BTreeSet<u32> = ["pid", "standby_pid"]
            .iter()
            .filter_map(|k| view[*k].as_u64().map(|p| p as u32))
            .collect();
        let running = soak.vmm_pids(vm);
        if running != listed {
            let described: Vec<String> = running
                .iter()
                .map(|p| format!("{p}: {}", cmdline(*p)))
                .collect();
            violations.push(format!(
                "{vm}: VMM processes\n  {}\nbut the supervisor knows {listed:?}",
                described.join("\n  ")
            ));
        }
    }
    check_events(&soak.tail, &mut violations);
    let temps = temp_files(soak.state());
    if !temps.is_empty() {
        violations.push(format!("temporary files left: {temps:?}"));
    }
    check_metrics(&soak, &mut violations);
    if soak.tail.fragments > 0 {
        // The event log keeps blocks allocated past its end, so a full disk
        // does not fail its writes (and a supervisor killed meanwhile loses
        // no event).
        violations.push(format!(
            "events.jsonl holds {} fragments of failed writes: events were written to a full disk outside the log's reserve",
            soak.tail.fragments
        ));
    }

    // The summary.
    println!(
        "chaos soak: seed {seed}, {secs} s, {} faults",
        soak.faults.values().sum::<usize>()
    );
    for (fault, n) in &soak.faults {
        println!("  {:<36} {n}", fault.name());
    }
    println!(
        "events: {} ({} fragments of failed writes), API calls answered: {}",
        soak.tail.events.len(),
        soak.tail.fragments,
        soak.api_calls
    );
    println!("restores verified: {:?}", soak.verified);
    println!(
        "most images per VM: {:?} (bound {})",
        soak.max_images,
        image_bound()
    );
    for fault in [Fault::Hang, Fault::Stall] {
        let d: Vec<f64> = soak
            .detections
            .iter()
            .filter(|(f, _)| *f == fault)
            .map(|(_, t)| *t)
            .collect();
        if let Some(s) = Summary::of(&d) {
            println!(
                "detection of {:<22} n={:<3} median {:.0} ms, p90 {:.0} ms, max {:.0} ms (bound {} ms)",
                fault.name(),
                d.len(),
                s.median,
                s.p90,
                s.max,
                HEARTBEAT_TIMEOUT_MS + HB_MS + DETECTION_ALLOWANCE_MS
            );
        }
    }
    println!("failover total_ms by path and cause:");
    let mut by_path: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for ((path, cause), times) in &soak.failovers {
        by_path.entry(path).or_default().extend(times);
        let s = Summary::of(times).unwrap();
        println!(
            "  {path:<8} {cause:<36} n={:<3} median {:>7.1} p90 {:>7.1} max {:>7.1}",
            times.len(),
            s.median,
            s.p90,
            s.max
        );
    }
    for (path, times) in by_path {
        let s = Summary::of(&times).unwrap();
        println!(
            "  {path:<8} {:<36} n={:<3} median {:>7.1} p90 {:>7.1} max {:>7.1}",
            "(all)",
            times.len(),
            s.median,
            s.p90,
            s.max
        );
    }
    // On failure the fleet's drop prints the supervisor's log and the events.
    assert!(
        violations.is_empty(),
        "{} violations (seed {seed}):\n{}",
        violations.len(),
        violations.join("\n")
    );
    drop(soak);
    drop(tmpfs);
}

/// The current supervisor's metrics against its events: failures by reason,
/// restores by image and path.
fn check_metrics(soak: &Soak, violations: &mut Vec<String>) {
    let Some(since) = soak.supervisor_since else {
        return;
    };
    let metrics = soak.fleet.metrics();
    let ours: Vec<&Value> = soak.tail.events.iter().filter(|e| ms(e) >= since).collect();
    for vm in VMS {
        for reason in FAILURE_REASONS {
            let events = ours
                .iter()
                .filter(|e| e["vm"] == vm && e["reason"] == reason && is_failure(e))
                .count() as f64;
            let counted = metrics.sum("relive_failures_total", &[("vm", vm), ("reason", reason)]);
            if events != counted {
                violations.push(format!(
                    "{vm}: {events} {reason} failure events but relive_failures_total says {counted}"
                ));
            }
        }
        for path in ["standby", "cold"] {
            for image in ["consistency", "boot", "image"] {
                let events = ours
                    .iter()
                    .filter(|e| {
                        e["vm"] == vm
                            && e["reason"] == "restored"
                            && e["path"] == path
                            && e["detail"]
                                .as_str()
                                .is_some_and(|d| d.contains(&format!("restored {image}")))
                    })
                    .count() as f64;
                let labels = [("vm", vm), ("image", image), ("path", path)];
                let counted = metrics.sum("relive_restores_total", &labels);
                if events != counted {
                    violations.push(format!(
                        "{vm}: {events} restores of {image} ({path}) in the events but relive_restores_total says {counted}"
                    ));
                }
            }
        }
    }
}
