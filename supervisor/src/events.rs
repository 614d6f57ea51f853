//! Structured transition events: what happened to each VM, when and why.
//!
//! Every state transition of a VM becomes one [`Event`]. The [`EventLog`]
//! keeps them three ways:
//!
//! - a bounded in-memory ring (the last `capacity` events, default
//!   [`DEFAULT_CAPACITY`]) for `relive events` and the API, read with
//!   [`EventLog::recent`] and [`EventLog::since`];
//! - an append-only JSON-lines file, one event per line, written (one
//!   `write(2)` on an `O_APPEND` file, no user-space buffer) before
//!   [`EventLog::record`] returns;
//! - a [`tokio::sync::broadcast`] channel for `relive events --follow`
//!   ([`EventLog::subscribe`]).
//!
//! Each event gets a sequence number, increasing by one per event and carried
//! on from the file's last line when the log is reopened, so a follower can
//! ask for what it missed. A file line is the event's JSON object with a
//! `seq` field added:
//!
//! ```text
//! {"seq":7,"time":"2026-01-02T03:04:05.678Z","unix_ms":1767323045678,"vm":"demo-1","from":"running","to":"restoring-consistency","reason":"vmm-killed","image_id":null,"path":null,"durations":null,"detail":null}
//! ```
//!
//! # The disk may fail; the log does not
//!
//! The file keeps [`RESERVE_BYTES`] of blocks allocated past its end
//! (`fallocate` with `FALLOC_FL_KEEP_SIZE`, topped up whenever half of it
//! has been written): appending into blocks already allocated needs no free
//! space, so events recorded while the disk is full still reach the file,
//! and a supervisor killed before the disk has room again loses none of them
//! (the next supervisor's policy and the events agree).
//!
//! A write that fails anyway (the reserve used up, a filesystem without
//! `fallocate`, an I/O error) is counted
//! ([`EventLog::write_failures`]) and logged once when writing starts failing
//! and once when it works again; the event is still in the ring and still
//! broadcast, and its line waits in memory: the next event writes the lines
//! owed first, in order (at most 65,536 wait; beyond that the oldest are
//! dropped and counted). Earlier lines are never rewritten. A failed write may
//! leave part of a line behind, so the first write after a failure starts
//! with a newline: the broken fragment stands on a line of its own, and
//! readers (including [`EventLog::open`]) skip lines that do not parse.
//!
//! # Locking
//!
//! Two locks, taken in this order: `ring` (the in-memory events and the
//! next sequence number; the broadcast send happens under it so subscribers
//! see events in sequence order), then `file` (the open file and the lines it
//! owes). `record` queues an event's line under both, so lines are queued in
//! sequence order whichever thread records them, then releases `ring` and
//! writes under `file` alone; nothing takes `ring` while holding `file`.
//! `record` does a small blocking write; it is safe to call from any tokio
//! task or thread.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::metrics::RestorePath;
use crate::policy::VmState;

/// The ring's capacity when the configuration does not say.
pub const DEFAULT_CAPACITY: usize = 1000;

/// How many events a `--follow` subscriber may fall behind before it misses
/// some (it then gets `RecvError::Lagged` and can catch up with `since`).
const BROADCAST_CAPACITY: usize = 1024;

/// At most this much of an existing file's tail is read back on open.
const MAX_TAIL_BYTES: u64 = 4 << 20;

/// One VM state transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When, as RFC 3339 in UTC with milliseconds (`2026-01-02T03:04:05.678Z`).
    pub time: String,
    /// When, as milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The VM's name.
    pub vm: String,
    /// The state before ([`VmState::as_str`]: `running`, `restoring-boot`, ...).
    pub from: String,
    /// The state after.
    pub to: String,
    /// Why, as a short kebab-case word: a failure reason
    /// ([`crate::policy::FailureReason::as_str`]) or what happened otherwise
    /// (`restored`, `operator-failover`, ...).
    pub reason: String,
    /// The image restored from, when the transition used one.
    #[serde(default)]
    pub image_id: Option<String>,
    /// Whether a restore went into the hot standby or a fresh VMM.
    #[serde(default)]
    pub path: Option<RestorePath>,
    /// How long the failover took, on the transition that ended it.
    #[serde(default)]
    pub durations: Option<EventDurations>,
    /// Free-form detail for people (an error chain, the standby used, ...).
    #[serde(default)]
    pub detail: Option<String>,
    /// Cluster mode: the host whose supervisor recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// The phases of a failover, in milliseconds (fractional: they are often
/// below one).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventDurations {
    /// From the failure's detection to the start of the restore: the
    /// policy's decision and its `restart_backoff`. (When the failure itself
    /// happened before its detection, e.g. for a hang, is not known.)
    pub detect_ms: f64,
    /// Restoring the image into a VMM.
    pub restore_ms: f64,
    /// From detection to the guest running again.
    pub total_ms: f64,
}

impl EventDurations {
    /// Builds the millisecond figures from durations.
    pub fn new(detect: Duration, restore: Duration, total: Duration) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Self {
            detect_ms: ms(detect),
            restore_ms: ms(restore),
            total_ms: ms(total),
        }
    }
}

impl Event {
    /// An event happening now.
    pub fn new(
        vm: impl Into<String>,
        from: &VmState,
        to: &VmState,
        reason: impl Into<String>,
    ) -> Self {
        Self::at(SystemTime::now(), vm, from, to, reason)
    }

    /// An event that happened at `when`.
    pub fn at(
        when: SystemTime,
        vm: impl Into<String>,
        from: &VmState,
        to: &VmState,
        reason: impl Into<String>,
    ) -> Self {
        let since_epoch = when.duration_since(UNIX_EPOCH).unwrap_or_default();
        Self {
            time: humantime::format_rfc3339_millis(when).to_string(),
            unix_ms: u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
            vm: vm.into(),
            from: from.as_str().to_owned(),
            to: to.as_str().to_owned(),
            reason: reason.into(),
            image_id: None,
            path: None,
            durations: None,
            host: None,
            detail: None,
        }
    }

    /// Sets the image id.
    pub fn with_image_id(mut self, id: impl Into<String>) -> Self {
        self.image_id = Some(id.into());
        self
    }

    /// Sets the restore path.
    pub fn with_path(mut self, path: RestorePath) -> Self {
        self.path = Some(path);
        self
    }

    /// Sets the failover durations.
    pub fn with_durations(mut self, durations: EventDurations) -> Self {
        self.durations = Some(durations);
        self
    }

    /// Sets the detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// A line of the JSON-lines file: the event with its sequence number.
#[derive(Serialize)]
struct LineOut<'a> {
    seq: u64,
    #[serde(flatten)]
    event: &'a Event,
}

#[derive(Deserialize)]
struct LineIn {
    seq: u64,
    #[serde(flatten)]
    event: Event,
}

/// Opening the event log failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// A capacity of zero would keep nothing.
    #[error("event log capacity must be at least 1")]
    ZeroCapacity,
    /// The file's directory could not be created.
    #[error("cannot create the event log directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The existing file could not be read back.
    #[error("cannot read the event log {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file could not be opened for appending.
    #[error("cannot open the event log {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

struct Ring {
    events: VecDeque<(u64, Event)>,
    capacity: usize,
    next_seq: u64,
}

/// Most event lines kept in memory while the file cannot be written (a full
/// disk); beyond this the oldest are dropped (and counted as write failures).
const MAX_BACKLOG: usize = 65_536;

/// How much the file keeps allocated past its end for a full disk.
pub const RESERVE_BYTES: u64 = 4 << 20;

struct FileState {
    file: File,
    /// The file's length, as far as this log has written it.
    len: u64,
    /// Blocks are allocated up to here (a `fallocate` that worked).
    reserved_to: u64,
    /// The last attempt to top the reserve up failed (logged once).
    reserve_failing: bool,
    /// The previous write failed (and may have left part of a line).
    failing: bool,
    /// Lines not written yet, oldest first: written, in order, before the
    /// next line once the file takes writes again.
    backlog: VecDeque<Vec<u8>>,
}

/// The bounded in-memory event ring, its JSON-lines file and its subscribers.
pub struct EventLog {
    path: PathBuf,
    ring: Mutex<Ring>,
    file: Mutex<FileState>,
    write_failures: AtomicU64,
    tx: broadcast::Sender<(u64, Event)>,
    /// Cluster mode: this host's name, put on every event.
    host: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("path", &self.path)
            .field("write_failures", &self.write_failures())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing a panicking holder leaves behind is inconsistent: a ring of
    // complete events, a file handle.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EventLog {
    /// Opens (creating it and its parent directory if needed) the JSON-lines
    /// file at `path` and keeps the last `capacity` events in memory. Events
    /// already in the file (from a previous supervisor) fill the ring, and
    /// sequence numbers carry on after the last one.
    pub fn open(path: &Path, capacity: usize) -> Result<Self, EventError> {
        if capacity == 0 {
            return Err(EventError::ZeroCapacity);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            relive_images::private::create_dir_all(dir).map_err(|source| {
                EventError::CreateDir {
                    path: dir.to_owned(),
                    source,
                }
            })?;
        }
        let events = read_tail(path, capacity).map_err(|source| EventError::Read {
            path: path.to_owned(),
            source,
        })?;
        let next_seq = events.back().map_or(1, |(seq, _)| seq + 1);
        let file = relive_images::private::open_options()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|source| EventError::Open {
                path: path.to_owned(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| EventError::Open {
                path: path.to_owned(),
                source,
            })?
            .len();
        let mut file = FileState {
            file,
            len,
            reserved_to: 0,
            reserve_failing: false,
            failing: false,
            backlog: VecDeque::new(),
        };
        file.keep_reserve(path);
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            path: path.to_owned(),
            ring: Mutex::new(Ring {
                events,
                capacity,
                next_seq,
            }),
            file: Mutex::new(file),
            write_failures: AtomicU64::new(0),
            tx,
            host: std::sync::OnceLock::new(),
        })
    }

    /// Cluster mode: every event recorded from now on names `host`.
    pub fn set_host(&self, host: &str) {
        let _ = self.host.set(host.to_string());
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records an event: into the ring, to subscribers, then to the file.
    /// Returns its sequence number. Never fails: a file write that fails is
    /// counted in [`EventLog::write_failures`].
    pub fn record(&self, mut event: Event) -> u64 {
        if event.host.is_none() {
            event.host = self.host.get().cloned();
        }
        let mut ring = lock(&self.ring);
        let seq = ring.next_seq;
        ring.next_seq += 1;
        let line = encode_line(seq, &event);
        if ring.events.len() == ring.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back((seq, event.clone()));
        // No subscriber is not an error.
        let _ = self.tx.send((seq, event));
        // The line is queued before `ring` is released: lines reach the file
        // in sequence order whichever thread records them.
        let mut file = lock(&self.file);
        drop(ring);
        match line {
            Ok(line) => {
                file.backlog.push_back(line);
                if file.backlog.len() > MAX_BACKLOG {
                    file.backlog.pop_front();
                    self.write_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(error) => {
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, seq, "cannot encode an event");
            }
        }
        self.write_backlog(&mut file);
        seq
    }

    /// Writes the lines a failing file still owes, if it takes them now.
    pub fn flush(&self) {
        let mut guard = lock(&self.file);
        if !guard.backlog.is_empty() {
            self.write_backlog(&mut guard);
        }
    }

    /// Writes the queued lines, in order, as far as the file takes them. A
    /// write that fails keeps its line (and those after it) for the next
    /// attempt; a line left half-written is ended by a newline first, so it
    /// never swallows the next one (readers skip it).
    fn write_backlog(&self, state: &mut FileState) {
        let FileState {
            file,
            len,
            failing,
            backlog,
            ..
        } = state;
        while let Some(next) = backlog.front() {
            let written = if *failing {
                file.write_all(b"\n")
                    .and_then(|()| file.write_all(next))
                    .map(|()| 1 + next.len() as u64)
            } else {
                file.write_all(next).map(|()| next.len() as u64)
            };
            match written {
                Ok(bytes) => {
                    *len += bytes;
                    backlog.pop_front();
                    if *failing {
                        *failing = false;
                        tracing::info!(path = %self.path.display(), "event log is writable again");
                    }
                }
                Err(error) => {
                    self.write_failures.fetch_add(1, Ordering::Relaxed);
                    if !*failing {
                        *failing = true;
                        tracing::warn!(
                            path = %self.path.display(),
                            %error,
                            "cannot write the event log; events stay in memory and are written once it works again"
                        );
                    }
                    return;
                }
            }
        }
        state.keep_reserve(&self.path);
    }

    /// How many events could not be written to the file.
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// The last `n` events in the ring, oldest first.
    pub fn recent(&self, n: usize) -> Vec<Event> {
        let ring = lock(&self.ring);
        let skip = ring.events.len().saturating_sub(n);
        ring.events
            .iter()
            .skip(skip)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The events after sequence number `seq` still in the ring, oldest
    /// first. `since(0)` is the whole ring. If the first returned number is
    /// more than `seq + 1`, the ring no longer holds some of what was asked.
    pub fn since(&self, seq: u64) -> Vec<(u64, Event)> {
        let ring = lock(&self.ring);
        // Sequence numbers increase along the ring.
        let start = ring.events.partition_point(|(s, _)| *s <= seq);
        ring.events.range(start..).cloned().collect()
    }

    /// The sequence number of the last event recorded (0 before any).
    pub fn last_seq(&self) -> u64 {
        lock(&self.ring).next_seq - 1
    }

    /// A receiver of every event recorded from now on, with its sequence
    /// number. To follow without a gap: subscribe first, then read
    /// [`EventLog::since`], then skip received events whose number is not
    /// above the last one read. A receiver more than 1024 events behind gets
    /// `RecvError::Lagged` and can catch up the same way.
    pub fn subscribe(&self) -> broadcast::Receiver<(u64, Event)> {
        self.tx.subscribe()
    }
}

/// An event's line in the file, newline included.
fn encode_line(seq: u64, event: &Event) -> serde_json::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(320);
    serde_json::to_writer(&mut line, &LineOut { seq, event })?;
    line.push(b'\n');
    Ok(line)
}

impl FileState {
    /// Tops the blocks allocated past the end up to [`RESERVE_BYTES`] once
    /// less than half of them is left: one `fallocate` per ~2 MiB of events.
    /// A disk that is full, or a filesystem without `fallocate`, leaves the
    /// reserve as it is (said once; tried again on the next write).
    fn keep_reserve(&mut self, path: &Path) {
        if self.reserved_to.saturating_sub(self.len) >= RESERVE_BYTES / 2 {
            return;
        }
        match rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::KEEP_SIZE,
            self.len,
            RESERVE_BYTES,
        ) {
            Ok(()) => {
                self.reserved_to = self.len + RESERVE_BYTES;
                if std::mem::take(&mut self.reserve_failing) {
                    tracing::info!(path = %path.display(), "the event log has its reserve for a full disk again");
                }
            }
            Err(error) => {
                if !std::mem::replace(&mut self.reserve_failing, true) {
                    tracing::warn!(
                        path = %path.display(),
                        %error,
                        "cannot reserve room for the event log; if the disk fills up, events wait in memory"
                    );
                }
            }
        }
    }
}

/// Reads the last `capacity` well-formed events from the tail of an existing
/// file (nothing if there is none).
fn read_tail(path: &Path, capacity: usize) -> io::Result<VecDeque<(u64, Event)>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(VecDeque::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(MAX_TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(MAX_TAIL_BYTES).read_to_end(&mut tail)?;
    let mut lines = tail.split(|b| *b == b'\n');
    if start > 0 {
        // Most likely the middle of a line.
        lines.next();
    }
    let mut events = VecDeque::with_capacity(capacity);
    let mut last = 0;
    for line in lines {
        let Ok(LineIn { seq, event }) = serde_json::from_slice::<LineIn>(line) else {
            continue;
        };
        // Keep the numbers increasing even if the file was edited by hand.
        if seq <= last {
            continue;
        }
        last = seq;
        if events.len() == capacity {
            events.pop_front();
        }
        events.push_back((seq, event));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::broadcast::error::TryRecvError;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "relive-events-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn consistency() -> VmState {
        VmState::Restoring(crate::policy::RestoreTarget::Consistency)
    }

    fn event(vm: &str, n: u32) -> Event {
        Event::new(vm, &VmState::Running, &consistency(), "vmm-killed").with_detail(format!("#{n}"))
    }

    #[test]
    fn the_ring_is_bounded_and_keeps_the_newest() {
        let dir = TempDir::new();
        let log = EventLog::open(&dir.0.join("events.jsonl"), 3).unwrap();
        for n in 0..5 {
            assert_eq!(log.record(event("a", n)), u64::from(n) + 1);
        }
        let details: Vec<_> = log
            .recent(10)
            .into_iter()
            .map(|e| e.detail.unwrap())
            .collect();
        assert_eq!(details, ["#2", "#3", "#4"]);
        assert_eq!(log.recent(1)[0].detail.as_deref(), Some("#4"));
        assert!(log.recent(0).is_empty());
        let seqs: Vec<u64> = log.since(0).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [3, 4, 5]);
        let seqs: Vec<u64> = log.since(4).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [5]);
        assert!(log.since(5).is_empty());
        assert_eq!(log.last_seq(), 5);
        assert!(matches!(
            EventLog::open(&dir.0.join("x"), 0),
            Err(EventError::ZeroCapacity)
        ));
    }

    #[test]
    fn the_file_holds_one_json_event_per_line() {
        let dir = TempDir::new();
        // The parent directories do not exist yet.
        let path = dir.0.join("state/deep/events.jsonl");
        let log = EventLog::open(&path, DEFAULT_CAPACITY).unwrap();
        let when = UNIX_EPOCH + Duration::from_millis(1_767_323_045_678);
        log.record(
            Event::at(
                when,
                "demo-1",
                &VmState::Running,
                &consistency(),
                "vmm-killed",
            )
            .with_detail("VMM exited on signal 9"),
        );
        log.record(
            Event::at(
                when,
                "demo-1",
                &consistency(),
                &VmState::Running,
                "restored",
            )
            .with_image_id("0190aabbccddeeff0011223344556677")
            .with_path(RestorePath::Standby)
            .with_durations(EventDurations::new(
                Duration::from_micros(300),
                Duration::from_micros(1_500),
                Duration::from_micros(2_000),
            )),
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n'));
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        let first = &lines[0];
        assert_eq!(first["seq"], 1);
        assert_eq!(first["time"], "2026-01-02T03:04:05.678Z");
        assert_eq!(first["unix_ms"], 1_767_323_045_678u64);
        assert_eq!(first["vm"], "demo-1");
        assert_eq!(first["from"], "running");
        assert_eq!(first["to"], "restoring-consistency");
        assert_eq!(first["reason"], "vmm-killed");
        assert!(first["image_id"].is_null());
        assert!(first["durations"].is_null());
        assert!(first["path"].is_null());
        assert_eq!(first["detail"], "VMM exited on signal 9");
        let second = &lines[1];
        assert_eq!(second["seq"], 2);
        assert_eq!(second["image_id"], "0190aabbccddeeff0011223344556677");
        assert_eq!(second["path"], "standby");
        assert_eq!(second["durations"]["detect_ms"], 0.3);
        assert_eq!(second["durations"]["restore_ms"], 1.5);
        assert_eq!(second["durations"]["total_ms"], 2.0);
        assert_eq!(log.write_failures(), 0);
    }

    #[test]
    fn reopening_carries_on_from_the_file() {
        let dir = TempDir::new();
        let path = dir.0.join("events.jsonl");
        {
            let log = EventLog::open(&path, 10).unwrap();
            for n in 0..4 {
                log.record(event("a", n));
            }
        }
        // A torn last line (a crash mid-write) is skipped.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":5,\"ti").unwrap();
        drop(f);
        let log = EventLog::open(&path, 2).unwrap();
        let seqs: Vec<u64> = log.since(0).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [3, 4]);
        assert_eq!(log.record(event("a", 9)), 5);
    }

    #[test]
    fn subscribers_receive_recorded_events() {
        let dir = TempDir::new();
        let log = EventLog::open(&dir.0.join("events.jsonl"), 10).unwrap();
        log.record(event("a", 0));
        let mut rx = log.subscribe();
        let mut other = log.subscribe();
        let seq = log.record(event("b", 1));
        let (got_seq, got) = rx.try_recv().unwrap();
        assert_eq!(got_seq, seq);
        assert_eq!(got.vm, "b");
        assert_eq!(other.try_recv().unwrap().1, got);
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        // From another thread, as a tokio task on another worker would.
        let log = std::sync::Arc::new(log);
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || log.record(event("c", 2)))
        };
        let (seq, got) = rx.blocking_recv().unwrap();
        assert_eq!(seq, writer.join().unwrap());
        assert_eq!(got.vm, "c");
    }

    #[test]
    fn a_full_disk_is_counted_not_fatal() {
        // /dev/full fails every write with ENOSPC, as a full disk does.
        // (Removing or chmod-ing the directory after open would not do: the
        // open descriptor still writes, and root ignores permissions.)
        let full = Path::new("/dev/full");
        if !full.exists() {
            eprintln!("skipped: no /dev/full on this machine");
            return;
        }
        let log = EventLog::open(full, 2).unwrap();
        let mut rx = log.subscribe();
        for n in 0..3 {
            log.record(event("a", n));
        }
        assert_eq!(log.write_failures(), 3);
        // The ring and the subscribers carried on.
        assert_eq!(log.recent(5).len(), 2);
        assert_eq!(log.last_seq(), 3);
        assert_eq!(rx.try_recv().unwrap().0, 1);
    }

    /// Events recorded while the disk is full are written, in order, once it
    /// takes writes again: a restarted supervisor reads them all.
    #[test]
    fn events_of_a_full_disk_are_written_once_it_has_room_again() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            eprintln!("skipped: no /dev/full on this machine");
            return;
        }
        let dir = TempDir::new();
        let path = dir.0.join("events.jsonl");
        std::fs::create_dir_all(&dir.0).unwrap();
        let log = EventLog::open(full, 10).unwrap();
        for n in 0..3 {
            log.record(event("a", n));
        }
        assert_eq!(log.write_failures(), 3);
        // Room again: the same log now writes to a real file.
        lock(&log.file).file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        log.record(event("a", 3));
        let text = std::fs::read_to_string(&path).unwrap();
        let seqs: Vec<u64> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4], "{text}");
        let reopened = EventLog::open(&path, 10).unwrap();
        assert_eq!(reopened.last_seq(), 4);
    }

    fn file_seqs(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["seq"].as_u64().unwrap())
            .collect()
    }

    /// Events recorded from many threads at once reach the file in sequence
    /// order (a line written before an earlier number's would tell a reader
    /// the story out of order).
    #[test]
    fn lines_reach_the_file_in_sequence_order_from_many_threads() {
        let dir = TempDir::new();
        let path = dir.0.join("events.jsonl");
        let log = std::sync::Arc::new(EventLog::open(&path, 10).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for n in 0..400 {
                        log.record(event(&format!("vm-{t}"), n));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let want: Vec<u64> = (1..=3200).collect();
        assert_eq!(file_seqs(&path), want);
    }

    /// A tmpfs of `size` mounted over `path` for a test, unmounted on drop;
    /// `None` (with the reason printed) where this machine cannot mount one,
    /// a panic instead under `RELIVE_REQUIRE_TOOLS=1` (CI runs as root).
    struct Tmpfs(PathBuf);

    impl Tmpfs {
        fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
            std::fs::create_dir_all(path).unwrap();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(path)
                .output();
            match out {
                Ok(out) if out.status.success() => Some(Tmpfs(path.to_owned())),
                other => {
                    let why = format!("cannot mount a tmpfs (needs root): {other:?}");
                    assert!(
                        std::env::var("RELIVE_REQUIRE_TOOLS").as_deref() != Ok("1"),
                        "{why}, and RELIVE_REQUIRE_TOOLS=1"
                    );
                    eprintln!("skipped: {why}");
                    None
                }
            }
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// Fills the filesystem holding `dir` until a write fails.
    fn fill(dir: &Path) {
        let mut filler = File::create(dir.join("filler")).unwrap();
        let chunk = vec![0xa5_u8; 64 << 10];
        while filler.write_all(&chunk).is_ok() {}
        while filler.write_all(&chunk[..512]).is_ok() {}
    }

    /// The chaos soak's finding: events recorded while the disk was full
    /// waited in memory, and a supervisor killed before the disk had room
    /// again lost them, so the events no longer told what the policy (whose
    /// record survives a full disk) had done. The reserve past the end keeps
    /// them on disk.
    #[test]
    fn events_recorded_on_a_full_disk_reach_the_file_and_survive_a_kill() {
        let dir = TempDir::new();
        let Some(mount) = Tmpfs::mount(&dir.0, "16m") else {
            return;
        };
        let path = mount.0.join("events.jsonl");
        let log = EventLog::open(&path, 10).unwrap();
        log.record(event("a", 0));
        fill(&mount.0);
        for n in 1..=200 {
            log.record(event("a", n));
        }
        assert_eq!(log.write_failures(), 0, "every line went into the reserve");
        // A kill -9: whatever is only in memory is gone.
        drop(log);
        let want: Vec<u64> = (1..=201).collect();
        assert_eq!(file_seqs(&path), want);
        let reopened = EventLog::open(&path, 1000).unwrap();
        assert_eq!(reopened.last_seq(), 201);
        assert_eq!(reopened.since(0).len(), 201);
        // Still full: the reopened log writes into what is left of the reserve.
        reopened.record(event("a", 201));
        assert_eq!(reopened.write_failures(), 0);
        assert_eq!(file_seqs(&path).last(), Some(&202));
    }

    #[test]
    fn a_write_after_a_failure_starts_on_a_fresh_line() {
        let dir = TempDir::new();
        let path = dir.0.join("events.jsonl");
        let log = EventLog::open(&path, 10).unwrap();
        log.record(event("a", 0));
        // Simulate a failed write that left part of a line behind.
        {
            let mut state = lock(&log.file);
            state.file.write_all(b"{\"seq\":2,\"tor").unwrap();
            state.failing = true;
        }
        log.record(event("a", 1));
        let text = std::fs::read_to_string(&path).unwrap();
        let good: Vec<u64> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(good, [1, 2]);
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn events_round_trip_through_json() {
        let e = Event::new("a", &VmState::Failed, &VmState::Starting, "operator-start")
            .with_image_id("x")
            .with_path(RestorePath::Cold)
            .with_durations(EventDurations::new(
                Duration::ZERO,
                Duration::from_millis(1),
                Duration::from_millis(2),
            ));
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
        assert!(e.time.ends_with('Z'), "{}", e.time);
    }
}
