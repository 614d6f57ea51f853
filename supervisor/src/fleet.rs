//! The fleet: one tokio task per VM, each owning its VM's state machine.
//!
//! ```text
//! starting -> running -> (failure) -> restoring{consistency|boot} -> running ...
//!                 \-> paused -> running        \-> failed (too many failures)
//!                 \-> stopped (operator)         failed/stopped -> starting (relive start)
//! ```
//!
//! A VM task ([`VmTask`]) owns the VM's `relive-vmm` process (and its standby
//! when the policy asks for one) and waits, all at once, for:
//! - the VMM process to end (pidfd);
//! - the VMM's `watch` connection: the guest's agent lines (heartbeats), and
//!   last the VMM's exit record, which says why it ended; a connection that
//!   ends without one while the process lives is `control-lost`;
//! - the heartbeat deadline (`heartbeat_timeout` after the last heartbeat,
//!   once past `ready_grace`): a hung guest;
//! - the next periodic checkpoint (incremental; the VMM writes a full image
//!   when it has no parent, and merges chains itself);
//! - the answers of the requests it has in flight to its VMM (a checkpoint,
//!   a status sample): they run beside the loop, so the heartbeat deadline is
//!   judged on time whatever a request is doing, and a request that outlasts
//!   `control_timeout` is a failure of its own (`control-timeout`);
//! - the end of the restart backoff, when a restore waits for it;
//! - operator commands from the API ([`Action`]).
//!
//! A failure goes to the [`FailoverPolicy`], which answers: restore the
//! latest good consistency image, restore the boot image, or give up. After a
//! failure of the guest itself (panic, triple fault, reset, power-off, hang),
//! the consistency images captured after its last heartbeat are deleted first:
//! no heartbeat vouches for them, and they may hold the failing guest (a hung
//! one, or one with the fatal command already queued). A
//! restore goes into the standby VMM when one is ready (mapping the image over
//! an already built VM) and cold into a new process otherwise; a new standby
//! is then started in the background. Every transition is an [`Event`].
//!
//! What the supervisor knows of a VM is written to
//! `<state_dir>/<vm>/vmm.record.a|b` ([`crate::record`]: a full disk cannot
//! keep it stale) at every transition: its processes, so that a new supervisor adopts running
//! VMMs instead of restarting them; the policy's failure history, so that its
//! rules hold across restarts; and whether the VM is held down (stopped,
//! failed), so that a restart does not bring it back.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relive_control::{
    AppExit, AppStatus, AsyncClient, AsyncWatch, CheckpointKind, CheckpointReport, ClientError,
    ErrorKind, ExitReason, ExitRecord, Heartbeat, Request, VmStatus, WatchEvent,
};
use relive_images::store::ImageStore;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::applog::{AppLog, LogFeed};
use crate::cluster::{Claim, Member, Standing};
use crate::config::{KernelSpec, Restart, VmSpec};
use crate::events::{Event, EventDurations, EventLog};
use crate::metrics::{Metrics, RestorePath};
use crate::policy::{
    Decision, FailoverPolicy, FailureReason, PolicyHistory, RestoreTarget, VmState,
};
use crate::vmm::{exit_detail, VmmError, VmmProcess};

/// How often a VM task checks heartbeats and checkpoint deadlines.
pub const TICK: Duration = Duration::from_millis(50);
/// How often a VM task samples its VMM for metrics.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How long a VMM gets to serve its control socket after it starts.
pub const VMM_START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a VMM whose watch connection ended without an exit record gets
/// to be seen gone (pidfd) before its control socket counts as lost. A
/// killed VMM's sockets close a moment before its pidfd turns readable; the
/// wait ends as soon as it does. A VMM that sent its exit record is not
/// waited for this way.
pub const EXIT_GRACE: Duration = Duration::from_secs(1);
/// How long one checkpoint may take before it counts as failed. A live
/// checkpoint copies the guest's memory while it runs, which takes seconds
/// for a large guest; the VMM's responsiveness is judged by the status
/// samples meanwhile (`control_timeout`), not by this.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a VMM that sent its exit record gets to end.
pub const EXIT_AFTER_RECORD: Duration = Duration::from_secs(5);

/// What an operator asks of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Fail over now to `to`: `consistency`, `boot`, or an image id.
    Failover {
        /// The target.
        to: String,
    },
    /// Cluster mode: move the VM to another host now (checkpoint, send the
    /// image there, end it here, hand it off; that host restores it).
    Move {
        /// The host.
        to_host: String,
    },
    /// Write a consistency image now.
    Checkpoint,
    /// Pause the guest.
    Pause,
    /// Resume the guest.
    Resume,
    /// Stop the VM; no restarts until `start`.
    Stop,
    /// Start a stopped or failed VM (a clean start from the boot image).
    Start,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    /// Name.
    pub name: String,
    /// State label.
    pub state: String,
    /// When it entered this state (unix ms).
    pub since_unix_ms: u64,
    /// VMM process id.
    pub pid: Option<u32>,
    /// VMM control socket.
    pub socket: Option<String>,
    /// Standby VMM: `ready`, `starting`, `none`, or `disabled`.
    pub standby: String,
    /// Standby process id.
    pub standby_pid: Option<u32>,
    /// Host memory the standby holds (its RSS).
    pub standby_memory_bytes: u64,
    /// Failures within the failure window.
    pub recent_failures: usize,
    /// The last failure's reason.
    pub last_failure: Option<String>,
    /// Restores since the supervisor started.
    pub restores: u64,
    /// The last checkpoint's image id.
    pub last_checkpoint: Option<String>,
    /// The last heartbeat line.
    pub last_heartbeat: Option<String>,
    /// Milliseconds since the last heartbeat (when the view was read).
    pub heartbeat_age_ms: Option<u64>,
    /// When the last heartbeat came (unix ms).
    pub last_heartbeat_unix_ms: Option<u64>,
    /// The VM's image directory.
    pub images_dir: String,
    /// Cluster mode: the host that owns the VM (this one, or where it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Cluster mode: the fencing token this host holds the VM under (the
    /// owner key's creation revision), while it owns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<i64>,
}

/// An answer to an [`Action`].
pub type ActionResult = Result<String, ActionError>;

/// Why an action failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// No VM of that name.
    #[error("no VM named {0:?}")]
    UnknownVm(String),
    /// The action does not fit the VM's state.
    #[error("{0}")]
    Conflict(String),
    /// The action failed.
    #[error("{0}")]
    Failed(String),
}

struct Command {
    action: Action,
    reply: oneshot::Sender<ActionResult>,
}

/// The handle the API uses: send actions, read views.
#[derive(Clone)]
pub struct Fleet {
    vms: Arc<BTreeMap<String, VmHandle>>,
    /// The event log.
    pub events: Arc<EventLog>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Live app output of every VM.
    pub logs: LogFeed,
    /// Cluster mode: this host's membership.
    pub cluster: Option<Arc<Member>>,
}

#[derive(Clone)]
struct VmHandle {
    tx: mpsc::Sender<Command>,
    view: Arc<Mutex<VmView>>,
    images_dir: PathBuf,
    app_log: PathBuf,
    memory_mib: u64,
}

impl VmHandle {
    fn read(&self) -> VmView {
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        view.heartbeat_age_ms = view
            .last_heartbeat_unix_ms
            .map(|at| unix_ms().saturating_sub(at));
        view
    }
}

/// Where the supervisor finds things.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The `relive-vmm` binary.
    pub vmm_bin: PathBuf,
    /// The fleet's state directory.
    pub state_dir: PathBuf,
}

impl Fleet {
    /// Starts one task per VM; each adopts its running VMM or starts one
    /// (in cluster mode, once this host owns the VM).
    pub fn start(
        specs: Vec<VmSpec>,
        paths: Paths,
        events: Arc<EventLog>,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<Member>>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> (Fleet, Vec<tokio::task::JoinHandle<()>>) {
        let mut vms = BTreeMap::new();
        let mut tasks = Vec::new();
        let logs = LogFeed::default();
        for spec in specs {
            let (tx, rx) = mpsc::channel(16);
            let view = Arc::new(Mutex::new(VmView {
                name: spec.name.clone(),
                state: "starting".into(),
                images_dir: spec.images_dir.display().to_string(),
                ..VmView::default()
            }));
            let app_log = AppLog::open(&spec.name, &paths.state_dir.join(&spec.name), logs.clone());
            vms.insert(
                spec.name.clone(),
                VmHandle {
                    tx,
                    view: view.clone(),
                    images_dir: spec.images_dir.clone(),
                    app_log: app_log.path().to_path_buf(),
                    memory_mib: spec.memory_mib,
                },
            );
            let span = tracing::info_span!("vm", name = %spec.name);
            let mut task = VmTask::new(
                spec,
                paths.clone(),
                (events.clone(), metrics.clone(), app_log),
                view,
                rx,
                shutdown.clone(),
            );
            task.standing = cluster.as_ref().map(|c| c.subscribe());
            task.cluster = cluster.clone();
            tasks.push(tokio::spawn(tracing::Instrument::instrument(
                task.run(),
                span,
            )));
        }
        (
            Fleet {
                vms: Arc::new(vms),
                events,
                metrics,
                logs,
                cluster,
            },
            tasks,
        )
    }

    /// Every VM.
    pub fn list(&self) -> Vec<VmView> {
        self.vms.values().map(VmHandle::read).collect()
    }

    /// A VM's guest memory in MiB, by the fleet file.
    pub fn memory_mib(&self, name: &str) -> Option<u64> {
        self.vms.get(name).map(|vm| vm.memory_mib)
    }

    /// One VM.
    pub fn show(&self, name: &str) -> Option<VmView> {
        self.vms.get(name).map(VmHandle::read)
    }

    /// The image directory of a VM.
    pub fn images_dir(&self, name: &str) -> Option<PathBuf> {
        self.vms.get(name).map(|h| h.images_dir.clone())
    }

    /// The app log of a VM (`relive logs`, [`crate::applog`]).
    pub fn app_log(&self, name: &str) -> Option<PathBuf> {
        self.vms.get(name).map(|h| h.app_log.clone())
    }

    /// Asks VM `name` to do `action` and waits for the answer.
    pub async fn act(&self, name: &str, action: Action) -> ActionResult {
        let handle = self
            .vms
            .get(name)
            .ok_or_else(|| ActionError::UnknownVm(name.to_string()))?;
        let (reply, rx) = oneshot::channel();
        handle
            .tx
            .send(Command { action, reply })
            .await
            .map_err(|_| ActionError::Failed(format!("the task of VM {name} has ended")))?;
        rx.await
            .map_err(|_| ActionError::Failed(format!("the task of VM {name} has ended")))?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the supervisor records about a VM, for the next supervisor: its
/// processes (to adopt them), the failover policy's history (so the policy's
/// rules hold across restarts), and whether an operator or the policy holds
/// the VM down. Written whole, atomically (temporary file and rename).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Persisted {
    pid: Option<u32>,
    socket: Option<PathBuf>,
    standby_pid: Option<u32>,
    standby_socket: Option<PathBuf>,
    /// Each VMM's log and where its own output starts there.
    #[serde(default)]
    log: Option<(PathBuf, u64)>,
    #[serde(default)]
    standby_log: Option<(PathBuf, u64)>,
    #[serde(default)]
    policy: PolicyHistory,
    /// `stopped` or `failed`: the VM stays down until `relive start`.
    #[serde(default)]
    held: Option<String>,
    /// The VM's state when this was written.
    #[serde(default)]
    state: Option<String>,
}

struct Standby {
    process: VmmProcess,
}

/// A control request to the active VMM that runs beside the VM task's loop,
/// so that no request, however slow, holds up hang detection.
struct InFlight<T> {
    /// The VMM it was sent to: an answer from an earlier one is dropped.
    pid: u32,
    handle: tokio::task::JoinHandle<Result<T, ClientError>>,
}

impl<T: Send + 'static> InFlight<T> {
    fn spawn(
        pid: u32,
        request: impl std::future::Future<Output = Result<T, ClientError>> + Send + 'static,
    ) -> Self {
        InFlight {
            pid,
            handle: tokio::spawn(request),
        }
    }

    /// The answer. Await it once: the caller drops this request after.
    async fn answer(&mut self) -> Answer<T> {
        let (timed_out, result) = match (&mut self.handle).await {
            Ok(Ok(value)) => (false, Ok(value)),
            Ok(Err(e)) => (
                matches!(e, ClientError::Timeout { .. }),
                Err(relive_control::error_chain(&e)),
            ),
            Err(e) => (false, Err(format!("the request task ended: {e}"))),
        };
        Answer {
            pid: self.pid,
            timed_out,
            result,
        }
    }
}

/// An answered [`InFlight`] request: whether it timed out, and its result.
struct Answer<T> {
    pid: u32,
    timed_out: bool,
    result: Result<T, String>,
}

/// What a status sample keeps of a VMM's status.
struct Sample {
    vcpu_exits: u64,
    guest_resident_bytes: u64,
}

impl Sample {
    fn of(status: &VmStatus) -> Self {
        Sample {
            vcpu_exits: status.vcpu_exits,
            guest_resident_bytes: status.guest_resident_bytes,
        }
    }
}

/// What a new supervisor found of a VM.
enum Adoption {
    /// Its VMM runs and answers: adopted, in this state.
    Adopted(VmState),
    /// The last supervisor held it down (stopped or failed): it stays so.
    Held(VmState),
    /// Its VMM runs but does not answer: killed; the policy decides.
    Unresponsive(String),
    /// Its VMM is gone: a failure; the policy decides.
    Lost(String),
    /// Nothing to adopt: start it.
    Nothing,
}

/// What ended the wait of a running VM.
enum Wake {
    Checkpointed(Answer<CheckpointReport>),
    Sampled(Answer<Sample>),
    Exited,
    Watch(Option<WatchEvent>),
    RestoreDue,
    Tick,
    Command(Option<Command>),
    StandbyExited,
    /// Cluster mode: the host's standing changed.
    Standing,
    Shutdown,
}

struct VmTask {
    spec: VmSpec,
    paths: Paths,
    dir: PathBuf,
    events: Arc<EventLog>,
    metrics: Arc<Metrics>,
    view: Arc<Mutex<VmView>>,
    rx: mpsc::Receiver<Command>,
    shutdown: tokio_util::sync::CancellationToken,
    policy: FailoverPolicy,
    state: VmState,
    vmm: Option<VmmProcess>,
    watch: Option<AsyncWatch>,
    /// Whether a watch was ever open on the active VMM (else its exit
    /// record can only be found in its log).
    watched: bool,
    /// A restore waiting for the restart backoff.
    pending_restore: Option<PendingRestore>,
    standby: Option<Standby>,
    standby_starting: Option<tokio::task::JoinHandle<Result<VmmProcess, VmmError>>>,
    standby_failures: u32,
    standby_retry_at: Option<Instant>,
    /// Drives heartbeat checks, checkpoints and sampling (persists across waits,
    /// so a busy agent channel cannot starve it).
    ticker: tokio::time::Interval,
    last_sample: Option<Instant>,
    running_since: Instant,
    last_heartbeat_at: Option<Instant>,
    last_heartbeat: Option<String>,
    last_checkpoint_at: Option<Instant>,
    restores: u64,
    /// Which of the two socket names the active VMM uses (the standby takes the other).
    socket_flip: bool,
    /// The active VMM is being stopped on purpose: its exit is not a failure.
    stopping: bool,
    /// When the active VMM came up (unix ms): its images are the ones
    /// [`VmTask::discard_unconfirmed_images`] may judge by heartbeat seq.
    active_since_unix_ms: u64,
    /// The checkpoint being taken, and the operators waiting for it.
    checkpoint: Option<(
        InFlight<CheckpointReport>,
        Vec<oneshot::Sender<ActionResult>>,
    )>,
    /// Operators who asked for a checkpoint while one was being taken: they
    /// get the next one.
    checkpoint_waiters: Vec<oneshot::Sender<ActionResult>>,
    /// The status request of the current sample.
    sample: Option<InFlight<Sample>>,
    /// The VMM stopped the vCPUs for a checkpoint at this time and has not
    /// said they run again: no heartbeat is expected meanwhile.
    asked_pause: Option<Instant>,
    /// The last [`VmTask::persist`] failed: try again at the next tick.
    persist_pending: std::sync::atomic::AtomicBool,
    /// `<dir>/vmm.record.a|b`: what the next supervisor reads.
    record: Mutex<crate::record::Record>,
    /// The app's output (`relive logs`).
    app_log: AppLog,
    /// Cluster mode: this host's membership.
    cluster: Option<Arc<Member>>,
    /// Cluster mode: the host's standing, watched for fencing.
    standing: Option<tokio::sync::watch::Receiver<Standing>>,
    /// Cluster mode: the fencing token while this host owns the VM.
    token: Option<i64>,
    /// Cluster mode: the session lease the VM's owner key is attached to.
    /// The VM is this host's only while the host is live on that lease: a
    /// host that lost its lease and joined again (while this task was busy
    /// restoring, say) owns nothing, though it is live again.
    token_lease: Option<i64>,
    /// Cluster mode: the replication of the last image, while it runs.
    replicating: Option<tokio::task::JoinHandle<()>>,
    /// Cluster mode: the VM is not (or no longer) this host's: it was
    /// handed to another host (an operator's move), or the host is not live
    /// on the VM's lease when it would restore it; the task waits to own it
    /// again.
    reown: bool,
    /// Cluster mode: the VM was handed to this host by its owner (an
    /// operator's move), which this host's takeover carries out.
    handed_here: bool,
}

impl VmTask {
    /// A task for `spec`, writing to the fleet's event log and metrics and
    /// to its own app log (`logs`).
    fn new(
        spec: VmSpec,
        paths: Paths,
        logs: (Arc<EventLog>, Arc<Metrics>, AppLog),
        view: Arc<Mutex<VmView>>,
        rx: mpsc::Receiver<Command>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let (events, metrics, app_log) = logs;
        let dir = paths.state_dir.join(&spec.name);
        let record = Mutex::new(crate::record::Record::new(&dir, "vmm.record"));
        VmTask {
            policy: FailoverPolicy::new(spec.policy.clone()),
            spec,
            paths,
            dir,
            events,
            metrics,
            view,
            rx,
            shutdown,
            state: VmState::Starting,
            vmm: None,
            watch: None,
            watched: false,
            pending_restore: None,
            standby: None,
            standby_starting: None,
            standby_failures: 0,
            standby_retry_at: None,
            ticker: {
                let mut t = tokio::time::interval(TICK);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                t
            },
            last_sample: None,
            running_since: Instant::now(),
            last_heartbeat_at: None,
            last_heartbeat: None,
            last_checkpoint_at: None,
            restores: 0,
            socket_flip: false,
            stopping: false,
            active_since_unix_ms: 0,
            checkpoint: None,
            checkpoint_waiters: Vec::new(),
            sample: None,
            asked_pause: None,
            persist_pending: std::sync::atomic::AtomicBool::new(false),
            record,
            app_log,
            cluster: None,
            standing: None,
            token: None,
            replicating: None,
            token_lease: None,
            reown: false,
            handed_here: false,
        }
    }

    /// A client of the active VMM, each request bounded by `control_timeout`.
    fn client(&self) -> Option<AsyncClient> {
        self.vmm
            .as_ref()
            .map(|v| v.client(self.spec.policy.control_timeout))
    }

    fn socket_path(&self, flip: bool) -> PathBuf {
        self.dir
            .join(if flip { "vmm-b.sock" } else { "vmm-a.sock" })
    }

    fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Where the supervisors before the A/B record kept it.
    fn legacy_record_path(&self) -> PathBuf {
        self.dir.join("vmm.json")
    }

    fn persist(&self) {
        let p = Persisted {
            pid: self.vmm.as_ref().map(VmmProcess::pid),
            socket: self.vmm.as_ref().map(|v| v.socket().to_path_buf()),
            standby_pid: self.standby.as_ref().map(|s| s.process.pid()),
            standby_socket: self
                .standby
                .as_ref()
                .map(|s| s.process.socket().to_path_buf()),
            log: self.vmm.as_ref().map(|v| {
                let (path, start) = v.log();
                (path.to_path_buf(), start)
            }),
            standby_log: self.standby.as_ref().map(|s| {
                let (path, start) = s.process.log();
                (path.to_path_buf(), start)
            }),
            policy: self.policy.history(Instant::now(), unix_ms()),
            held: matches!(self.state, VmState::Stopped | VmState::Failed)
                .then(|| self.state.as_str().to_string()),
            state: Some(self.state.as_str().to_string()),
        };
        let written = serde_json::to_vec_pretty(&p)
            .map_err(std::io::Error::other)
            .and_then(|bytes| lock(&self.record).write(&bytes));
        match written {
            Ok(()) => {
                let _ = std::fs::remove_file(self.legacy_record_path());
                if self
                    .persist_pending
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::info!("recorded the VM's processes and policy again");
                }
            }
            Err(e) => {
                // Retried every tick until it works: a stale record would
                // make the next supervisor lose track of running VMMs.
                if !self
                    .persist_pending
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(error = %e, dir = %self.dir.display(), "cannot record the VM's processes and policy; retrying");
                }
            }
        }
    }

    fn store(&self) -> Result<ImageStore, String> {
        ImageStore::open(&self.spec.images_dir, self.spec.policy.keep_images.max(1))
            .map_err(|e| e.to_string())
    }

    fn set_state(&mut self, to: VmState, event: impl FnOnce(Event) -> Event, reason: &str) {
        let from = self.state.clone();
        self.state = to;
        // Inside the task's `vm{name=..}` span: the log line names the VM.
        tracing::info!(%from, to = %self.state, reason, "state change");
        self.metrics.set_state(&self.spec.name, &self.state);
        self.metrics
            .set_up(&self.spec.name, self.state == VmState::Running);
        self.events.record(event(Event::new(
            &self.spec.name,
            &from,
            &self.state,
            reason,
        )));
        // The policy's history and a hold (stopped, failed) change with the
        // state: the next supervisor must see them.
        self.persist();
        self.refresh_view();
    }

    fn note(&self, reason: &str, detail: String) {
        self.events.record(
            Event::new(&self.spec.name, &self.state, &self.state, reason).with_detail(detail),
        );
    }

    fn refresh_view(&self) {
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.state.as_str();
        if view.state != state {
            view.since_unix_ms = unix_ms();
        }
        view.state = state.to_string();
        view.pid = self.vmm.as_ref().map(VmmProcess::pid);
        view.socket = self.vmm.as_ref().map(|v| v.socket().display().to_string());
        view.standby = if !self.spec.policy.standby {
            "disabled".into()
        } else if self.standby.is_some() {
            "ready".into()
        } else if self.standby_starting.is_some() {
            "starting".into()
        } else {
            "none".into()
        };
        view.standby_pid = self.standby.as_ref().map(|s| s.process.pid());
        view.standby_memory_bytes = self
            .standby
            .as_ref()
            .map_or(0, |s| rss_bytes(s.process.pid()));
        view.recent_failures = self.policy.recent_failures(Instant::now()).count();
        view.restores = self.restores;
        view.last_heartbeat = self.last_heartbeat.clone();
        view.last_heartbeat_unix_ms = self
            .last_heartbeat_at
            .map(|t| unix_ms().saturating_sub(t.elapsed().as_millis() as u64));
    }

    /// The arguments shared by every way of starting this VM's VMM.
    fn host_args(&self, socket: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--control".into(),
            socket.into(),
            "--console".into(),
            self.console_path().into(),
            "--images".into(),
            self.spec.images_dir.clone().into(),
            "--keep-images".into(),
            self.spec.policy.keep_images.to_string().into(),
        ];
        args.extend(["--name".into(), self.spec.name.clone().into()]);
        if let crate::config::Jail::As { uid, gid } = self.spec.jail {
            args.extend([
                "--jail".into(),
                format!("{uid}:{gid}").into(),
                "--jail-detach".into(),
            ]);
        }
        args
    }

    /// `--cpu-percent`, `--memory-limit-mib`, `--pids-max` as configured.
    fn limit_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let limits = &self.spec.limits;
        if let Some(cpu) = limits.cpu_percent {
            args.extend(["--cpu-percent".into(), cpu.to_string().into()]);
        }
        if let Some(mib) = limits.memory_mib {
            args.extend(["--memory-limit-mib".into(), mib.to_string().into()]);
        }
        if let Some(pids) = limits.pids {
            args.extend(["--pids-max".into(), pids.to_string().into()]);
        }
        args
    }

    fn boot_args(&self, socket: &Path, with_boot_image: bool) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["run".into(), "--kernel".into()];
        args.push(match &self.spec.kernel {
            KernelSpec::Bundled => "bundled".into(),
            KernelSpec::Path(p) => p.clone().into(),
        });
        if let Some(initrd) = &self.spec.initrd {
            args.extend(["--initrd".into(), initrd.clone().into()]);
        }
        if let Some(cmdline) = &self.spec.cmdline {
            args.extend(["--cmdline".into(), cmdline.into()]);
        }
        args.extend([
            "--mem-mib".into(),
            self.spec.memory_mib.to_string().into(),
            "--vcpus".into(),
            self.spec.vcpus.to_string().into(),
        ]);
        args.extend(self.limit_args());
        if with_boot_image {
            let mode = if self.spec.policy.warm_boot_image {
                "warm"
            } else {
                "recipe"
            };
            args.extend(["--boot-image".into(), mode.into()]);
        }
        args.extend(self.host_args(socket));
        args
    }

    /// Starts a VMM serving `socket`. Its output goes to the log beside the
    /// socket (`vmm-a.log` or `vmm-b.log`): the two live VMMs of a VM (active
    /// and standby) never share a log, so an exit record is always the
    /// writer's own.
    async fn spawn(&self, args: Vec<OsString>, socket: &Path) -> Result<VmmProcess, VmmError> {
        VmmProcess::spawn(
            &self.paths.vmm_bin,
            args,
            socket,
            &socket.with_extension("log"),
            VMM_START_TIMEOUT,
        )
        .await
    }

    /// A fresh boot: the boot image when there is one, else the kernel.
    async fn boot(&mut self) -> Result<Option<String>, String> {
        let socket = self.socket_path(self.socket_flip);
        let store = self.store()?;
        let boot_image = store
            .boot_image()
            .map_err(|e| e.to_string())?
            .image
            .map(|r| r.path().to_path_buf());
        let (args, image_id) = match &boot_image {
            Some(path) => {
                let mut args: Vec<OsString> =
                    vec!["restore".into(), "--image".into(), path.clone().into()];
                args.extend(self.host_args(&socket));
                (args, image_id_of(path))
            }
            None => (self.boot_args(&socket, true), None),
        };
        let vmm = self.spawn(args, &socket).await.map_err(|e| e.to_string())?;
        self.adopt_active(vmm).await;
        Ok(image_id)
    }

    /// Makes `vmm` the active VMM and opens its watch. Which image the next
    /// checkpoint layers on is the VMM's own business (its image store).
    async fn adopt_active(&mut self, vmm: VmmProcess) {
        self.cancel_requests("the VM's VMM was replaced");
        self.asked_pause = None;
        self.watch = vmm
            .client(self.spec.policy.control_timeout)
            .watch()
            .await
            .ok();
        self.watched = self.watch.is_some();
        self.vmm = Some(vmm);
        self.running_since = Instant::now();
        self.last_heartbeat_at = None;
        // The previous VMM's last line says nothing about this one.
        self.last_heartbeat = None;
        self.active_since_unix_ms = unix_ms();
        self.persist();
        self.arm_fence();
    }

    /// Why the active VMM ended: the exit record its watch delivered (read
    /// to its end first: the process is gone, so this does not wait), or,
    /// for a VMM nobody watched, the record in its log.
    async fn take_exit_record(&mut self) -> Option<ExitRecord> {
        if let Some(mut watch) = self.watch.take() {
            // Bounded as a whole: a watch that still brings lines after its
            // process ended is not the ended VMM's (and must not hold this
            // task forever).
            let deadline = tokio::time::Instant::now() + EXIT_GRACE;
            loop {
                match tokio::time::timeout_at(deadline, watch.next_event()).await {
                    Ok(Some(WatchEvent::Exit(record))) => return Some(record),
                    Ok(Some(WatchEvent::Line(line))) => self.on_line(line, Instant::now()),
                    Ok(Some(WatchEvent::Paused { .. } | WatchEvent::Resumed { .. })) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        self.ended_without_watch_record()
    }

    /// Why the VMM ended when its watch said nothing: a child that ended
    /// with a typed status (a seccomp violation's handler cannot reach the
    /// watch) left its record in its log; an unwatched VMM's log holds it;
    /// else nothing (a killed VMM).
    fn ended_without_watch_record(&mut self) -> Option<ExitRecord> {
        if let Some(reason) = self.vmm.as_mut().and_then(VmmProcess::status_reason) {
            let logged = self.vmm.as_ref().and_then(VmmProcess::logged_exit_record);
            return Some(logged.filter(|r| r.reason == reason).unwrap_or_else(|| {
                ExitRecord::new(
                    reason,
                    0,
                    "from the exit status; no exit record was written",
                )
            }));
        }
        if self.watched {
            return None;
        }
        self.vmm.as_ref().and_then(VmmProcess::logged_exit_record)
    }

    /// The vCPUs run again after a pause the VMM was asked for: the pause is
    /// not the guest's silence, so the heartbeat deadline moves by it.
    fn on_resumed(&mut self, reason: &str, paused: Duration, now: Instant) {
        self.asked_pause = None;
        self.metrics.observe_pause(&self.spec.name, reason, paused);
        if let Some(last) = self.last_heartbeat_at {
            self.last_heartbeat_at = Some(last.checked_add(paused).unwrap_or(now).min(now));
        }
    }

    fn on_line(&mut self, line: String, now: Instant) {
        if self.app_log.on_agent_line(&line) {
            return;
        }
        // The agent's answer to the VMM's `restored` notice: whether the
        // restored guest reseeded its RNG and stepped its clock.
        if line.starts_with("restored ") {
            if line.contains("error=") {
                tracing::warn!(answer = %line, "the guest agent could not fully recover from the restore");
            }
            self.note("agent-restored", line);
            return;
        }
        if relive_control::heartbeat::is_heartbeat(&line) {
            self.last_heartbeat_at = Some(now);
            self.last_heartbeat = Some(line);
        }
    }

    /// Restores `path` into the standby when one is ready, else cold.
    /// Returns whether the standby was used.
    async fn restore_image(&mut self, path: &Path) -> Result<bool, String> {
        if let Some(standby) = self.standby.take() {
            let bound = self.spec.policy.standby_timeout;
            match standby.process.client(bound).restore(path).await {
                Ok(_) => {
                    self.socket_flip = !self.socket_flip;
                    self.adopt_active(standby.process).await;
                    return Ok(true);
                }
                Err(e) if e.refused_kind() == Some(ErrorKind::ImageRefused) => {
                    // The image is at fault, not the standby: it stays ready,
                    // and a cold restore of the same image would fail too.
                    self.standby = Some(standby);
                    return Err(relive_control::error_chain(&e));
                }
                Err(e) => {
                    // A stalled or broken standby must not hold the failover
                    // up: it is killed, and the image goes into a new VMM.
                    let why = match e {
                        ClientError::Timeout { .. } => format!(
                            "the standby (pid {}) did not take the image within standby_timeout \
                             ({}): killed it, restoring cold",
                            standby.process.pid(),
                            crate::config::format_duration(bound)
                        ),
                        e => format!(
                            "the standby (pid {}) did not take the image: {}; killed it, \
                             restoring cold",
                            standby.process.pid(),
                            relive_control::error_chain(&e)
                        ),
                    };
                    tracing::warn!(detail = %why, "standby abandoned");
                    self.note("standby-abandoned", why);
                    let mut process = standby.process;
                    process.kill();
                    process.exited().await;
                    self.metrics.set_standby(&self.spec.name, false, 0);
                }
            }
        }
        let socket = self.socket_path(self.socket_flip);
        let mut args: Vec<OsString> = vec!["restore".into(), "--image".into(), path.into()];
        args.extend(self.host_args(&socket));
        let vmm = self.spawn(args, &socket).await.map_err(|e| e.to_string())?;
        self.adopt_active(vmm).await;
        Ok(false)
    }

    /// Brings the VM back to `target`, falling back from a missing or bad
    /// consistency image to the boot image. Returns (what was restored, image
    /// id, path used).
    async fn restore(
        &mut self,
        target: &RestoreTarget,
    ) -> Result<(RestoreTarget, Option<String>, RestorePath), String> {
        let store = self.store()?;
        let chosen = match target {
            RestoreTarget::Consistency => {
                // Verdicts, not memory: nothing on this path reads guest pages.
                let verified = store.latest_verified().map_err(|e| e.to_string())?;
                for skipped in &verified.skipped {
                    self.note(
                        "image-skipped",
                        format!("{}: {}", skipped.path.display(), skipped.reason),
                    );
                }
                match verified.image {
                    Some(image) => Some((RestoreTarget::Consistency, image.path().to_path_buf())),
                    None => self.latest_good_unverified(&store, &verified.unverified)?,
                }
            }
            RestoreTarget::Image(id) => {
                let id_parsed = id
                    .parse()
                    .map_err(|_| format!("{id:?} is not an image id (32 hex digits)"))?;
                let path = store
                    .find(id_parsed)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!("no image {id} in {}", self.spec.images_dir.display())
                    })?;
                Some((target.clone(), path))
            }
            RestoreTarget::Boot => None,
        };
        match chosen {
            Some((what, path)) => {
                let standby = self.restore_image(&path).await?;
                Ok((what, image_id_of(&path), path_kind(standby)))
            }
            None => {
                let boot_image = store
                    .boot_image()
                    .map_err(|e| e.to_string())?
                    .image
                    .map(|r| r.path().to_path_buf());
                match boot_image {
                    Some(path) => {
                        let standby = self.restore_image(&path).await?;
                        Ok((RestoreTarget::Boot, image_id_of(&path), path_kind(standby)))
                    }
                    None => {
                        self.boot().await?;
                        Ok((RestoreTarget::Boot, None, RestorePath::Cold))
                    }
                }
            }
        }
    }

    /// No consistency image has a good verdict yet: the newest one that
    /// verifies when read whole (header, sections, memory, chain), which the
    /// event says; `None` falls back to the boot image.
    fn latest_good_unverified(
        &self,
        store: &ImageStore,
        unverified: &[PathBuf],
    ) -> Result<Option<(RestoreTarget, PathBuf)>, String> {
        let selection = store.latest_good().map_err(|e| e.to_string())?;
        for skipped in &selection.skipped {
            self.note(
                "image-skipped",
                format!("{}: {}", skipped.path.display(), skipped.reason),
            );
        }
        match selection.image {
            Some(image) => {
                self.note(
                    "image-unverified",
                    format!(
                        "no consistency image has been verified yet ({} waiting): restoring {}, \
                         checked now by reading it",
                        unverified.len(),
                        image.path().display()
                    ),
                );
                Ok(Some((
                    RestoreTarget::Consistency,
                    image.path().to_path_buf(),
                )))
            }
            None => {
                self.note(
                    "no-consistency-image",
                    "no good consistency image: falling back to the boot image".into(),
                );
                Ok(None)
            }
        }
    }

    /// Starts a standby in the background when the policy wants one.
    fn ensure_standby(&mut self) {
        if !self.spec.policy.standby || self.standby.is_some() || self.standby_starting.is_some() {
            return;
        }
        if self.standby_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let socket = self.socket_path(!self.socket_flip);
        let mut args: Vec<OsString> = vec![
            "standby".into(),
            "--mem-mib".into(),
            self.spec.memory_mib.to_string().into(),
            "--vcpus".into(),
            self.spec.vcpus.to_string().into(),
        ];
        // A jailed standby puts them on its cgroup before its jail.
        args.extend(self.limit_args());
        args.extend(self.host_args(&socket));
        let bin = self.paths.vmm_bin.clone();
        let log = socket.with_extension("log");
        self.standby_starting = Some(tokio::spawn(async move {
            VmmProcess::spawn(&bin, args, &socket, &log, VMM_START_TIMEOUT).await
        }));
    }

    async fn poll_standby_start(&mut self) {
        let finished = self
            .standby_starting
            .as_ref()
            .is_some_and(tokio::task::JoinHandle::is_finished);
        if !finished {
            return;
        }
        if let Some(handle) = self.standby_starting.take() {
            match handle.await {
                Ok(Ok(process)) => {
                    self.standby_failures = 0;
                    self.metrics
                        .set_standby(&self.spec.name, true, rss_bytes(process.pid()));
                    self.standby = Some(Standby { process });
                    self.persist();
                }
                Ok(Err(e)) => {
                    // Back off: 1 s, doubling up to a minute, so a broken setup does not spin.
                    self.standby_failures += 1;
                    let delay = Duration::from_secs(1 << self.standby_failures.min(6))
                        .min(Duration::from_secs(60));
                    self.standby_retry_at = Some(Instant::now() + delay);
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot start a standby VMM");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the standby start task failed")
                }
            }
        }
    }

    /// Takes over what an earlier supervisor left: the policy's history, a
    /// VM held down (stopped or failed), and the VMMs left running.
    async fn try_adopt(&mut self) -> Adoption {
        let recorded = lock(&self.record).read();
        let Some(bytes) = recorded.or_else(|| std::fs::read(self.legacy_record_path()).ok()) else {
            return Adoption::Nothing;
        };
        let p = match serde_json::from_slice::<Persisted>(&bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot read what the last supervisor recorded; starting afresh");
                return Adoption::Nothing;
            }
        };
        self.policy = FailoverPolicy::with_history(
            self.spec.policy.clone(),
            &p.policy,
            Instant::now(),
            unix_ms(),
        );
        let timeout = self.spec.policy.control_timeout;
        let held = match p.held.as_deref() {
            Some("stopped") => Some(VmState::Stopped),
            Some("failed") => Some(VmState::Failed),
            _ => None,
        };
        if let (Some(pid), Some(socket)) = (p.standby_pid, p.standby_socket.clone()) {
            let (log, start) = p
                .standby_log
                .clone()
                .unwrap_or_else(|| (socket.with_extension("log"), u64::MAX));
            if let Some(process) = VmmProcess::adopt(pid, &socket, &log, start) {
                if held.is_none() && process.client(timeout).status().await.is_ok() {
                    self.standby = Some(Standby { process });
                } else {
                    // Not answering (or not wanted): it would only hold memory.
                    process.kill();
                }
            }
        }
        let adopted = match (p.pid, p.socket) {
            (Some(pid), Some(socket)) => {
                // Without a recorded start, no earlier record can be mistaken for its own.
                let (log, start) = p
                    .log
                    .clone()
                    .unwrap_or_else(|| (socket.with_extension("log"), u64::MAX));
                VmmProcess::adopt(pid, &socket, &log, start).map(|v| (v, socket))
            }
            _ => None,
        };
        if let Some(state) = held {
            if let Some((process, _)) = adopted {
                process.kill();
            }
            return Adoption::Held(state);
        }
        let Some((process, socket)) = adopted else {
            // Its VMM ended while no supervisor watched (or the host
            // rebooted), or a restore was under way: a failure, which the
            // policy answers (the latest consistency image, usually).
            return match (p.pid, p.state.as_deref()) {
                (Some(pid), _) => Adoption::Lost(format!(
                    "the VMM (pid {pid}) ended while no supervisor watched it"
                )),
                (None, Some(state)) if state.starts_with("restoring") => Adoption::Lost(format!(
                    "the previous supervisor ended while the VM was {state}"
                )),
                _ => Adoption::Nothing,
            };
        };
        let status = match process.client(timeout).status().await {
            Ok(status) => status,
            Err(e) => {
                let detail = format!(
                    "the VMM left running (pid {}) does not answer: {}",
                    process.pid(),
                    relive_control::error_chain(&e)
                );
                let mut process = process;
                process.kill();
                process.exited().await;
                return Adoption::Unresponsive(detail);
            }
        };
        self.socket_flip = socket == self.socket_path(true);
        self.adopt_active(process).await;
        let now = Instant::now();
        // An adopted VM has been running for a while: healthy already.
        self.running_since = now.checked_sub(self.spec.policy.ready_grace).unwrap_or(now);
        // Its last heartbeat is the VMM's, not the start of `ready_grace`
        // (that would count the VM as hung at once when `heartbeat_timeout`
        // is shorter than `ready_grace`).
        self.last_heartbeat_at = Some(
            status
                .agent
                .last_heartbeat_age_ms
                .and_then(|age| now.checked_sub(Duration::from_millis(age)))
                .unwrap_or(now),
        );
        Adoption::Adopted(match status.state {
            relive_control::RunState::Paused => VmState::Paused,
            _ => VmState::Running,
        })
    }

    /// Kills the VMMs serving this VM's sockets that are neither its active
    /// nor its standby VMM: started by a supervisor that died before it
    /// recorded them (or could not record them, on a full disk).
    async fn kill_orphans(&mut self) {
        let known: Vec<u32> = self
            .vmm
            .iter()
            .map(VmmProcess::pid)
            .chain(self.standby.iter().map(|s| s.process.pid()))
            .collect();
        let sockets = [self.socket_path(false), self.socket_path(true)];
        let orphans: Vec<u32> = crate::vmm::vmms_serving(&sockets)
            .into_iter()
            .filter(|pid| !known.contains(pid))
            .collect();
        if orphans.is_empty() {
            return;
        }
        for &pid in &orphans {
            if let Some(process) = VmmProcess::adopt(pid, Path::new(""), Path::new(""), u64::MAX) {
                process.kill();
                let mut process = process;
                process.exited().await;
            }
        }
        let detail = format!(
            "killed VMM processes no supervisor recorded (pids {orphans:?}): started by a \
             supervisor that ended before it could record them"
        );
        tracing::warn!(%detail, "orphan VMMs");
        self.note("orphans-killed", detail);
    }

    async fn run(mut self) {
        if let Err(e) = relive_images::private::create_dir_all(&self.dir) {
            tracing::error!(error = %e, "cannot create the VM's state directory");
        }
        let mut taken_over = None;
        if self.cluster.is_some() {
            match self.own().await {
                Some(from) => taken_over = from,
                None => return,
            }
        }
        let adoption = self.try_adopt().await;
        self.kill_orphans().await;
        match adoption {
            Adoption::Adopted(state) => self.set_state(state, |e| e, "adopted"),
            Adoption::Held(state) => self.set_state(
                state,
                |e| {
                    e.with_detail(
                        "held down by the previous supervisor: waiting for `relive start`",
                    )
                },
                "adopted",
            ),
            Adoption::Unresponsive(detail) => {
                self.on_failure(FailureReason::ControlTimeout, Instant::now(), detail)
                    .await;
            }
            Adoption::Lost(detail) => {
                self.on_failure(FailureReason::VmmKilled, Instant::now(), detail)
                    .await;
            }
            Adoption::Nothing if taken_over.is_some() => {
                let from = taken_over.unwrap_or_default();
                self.take_over(Some(from)).await;
            }
            Adoption::Nothing => match self.boot().await {
                Ok(image) => {
                    self.app_log.on_new_run(&started_from(image.as_deref()));
                    self.set_state(VmState::Running, |e| with_image(e, image), "started");
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the VM");
                    self.on_failure(FailureReason::StartFailed, Instant::now(), e)
                        .await;
                }
            },
        }
        self.persist();
        self.ensure_standby();
        loop {
            if std::mem::take(&mut self.reown) {
                match self.own().await {
                    Some(from) => self.take_over(from).await,
                    None => break,
                }
            }
            let wake = self.wait().await;
            let now = Instant::now();
            match wake {
                Wake::Shutdown => break,
                Wake::Command(None) => break,
                Wake::Command(Some(cmd)) if cmd.action == Action::Checkpoint => {
                    self.operator_checkpoint(cmd.reply);
                }
                Wake::Command(Some(cmd)) => {
                    let result = self.on_action(cmd.action).await;
                    let _ = cmd.reply.send(result);
                }
                Wake::Checkpointed(answer) => {
                    let replies = self.checkpoint.take().map(|(_, r)| r).unwrap_or_default();
                    self.on_checkpointed(answer, replies);
                }
                Wake::Sampled(answer) => {
                    self.sample = None;
                    self.on_sampled(answer, now).await;
                }
                Wake::Exited => {
                    let record = self.take_exit_record().await;
                    let vmm = self.vmm.take();
                    if self.stopping {
                        self.stopping = false;
                    } else if self.state.is_up() || matches!(self.state, VmState::Starting) {
                        drop(vmm);
                        self.on_ended(record.as_ref(), now).await;
                    }
                    self.persist();
                }
                Wake::Watch(Some(WatchEvent::Line(line))) => self.on_line(line, now),
                Wake::Watch(Some(WatchEvent::Paused { .. })) => self.asked_pause = Some(now),
                Wake::Watch(Some(WatchEvent::Resumed { reason, paused_us })) => {
                    self.on_resumed(&reason, Duration::from_micros(paused_us), now);
                }
                Wake::Watch(Some(WatchEvent::Exit(record))) => {
                    // The VMM is ending and said why; its vCPUs and its
                    // control socket stopped before it said so. Fail over
                    // now: its process is left to end (and the kernel to
                    // tear its guest memory down, tens of ms for a large
                    // guest) in the background.
                    self.watch = None;
                    if let Some(vmm) = self.vmm.take() {
                        tokio::spawn(reap_after_record(vmm));
                    }
                    if self.state.is_up() && !self.stopping {
                        self.on_ended(Some(&record), now).await;
                    }
                    self.persist();
                }
                Wake::Watch(None) => {
                    self.watch = None;
                    let alive = self.vmm.as_ref().is_some_and(VmmProcess::is_alive);
                    if alive && self.state.is_up() {
                        // No exit record: the VMM was killed (its pidfd turns
                        // readable a moment after its sockets close), or its
                        // control socket is gone while it runs.
                        let ended = match self.vmm.as_mut() {
                            Some(vmm) => tokio::time::timeout(EXIT_GRACE, vmm.exited()).await.ok(),
                            None => None,
                        };
                        if ended.is_some() {
                            let record = self.ended_without_watch_record();
                            self.vmm = None;
                            self.on_ended(record.as_ref(), now).await;
                        } else {
                            if let Some(vmm) = &self.vmm {
                                vmm.kill();
                            }
                            self.stopping = true;
                            if let Some(mut vmm) = self.vmm.take() {
                                vmm.exited().await;
                            }
                            self.stopping = false;
                            self.on_failure(
                                FailureReason::ControlLost,
                                now,
                                "the VMM's control socket went away".into(),
                            )
                            .await;
                        }
                        self.persist();
                    }
                }
                Wake::RestoreDue => {
                    if let Some(p) = self.pending_restore.take() {
                        self.do_restore(p.target, p.detected, p.reason).await;
                    }
                }
                Wake::StandbyExited => {
                    self.standby = None;
                    self.metrics.set_standby(&self.spec.name, false, 0);
                    self.persist();
                }
                Wake::Tick => self.on_tick(now).await,
                Wake::Standing => {
                    if self.token.is_some() && !self.owns_on_live_lease() {
                        self.fence().await;
                        match self.own().await {
                            Some(from) => self.take_over(from).await,
                            None => break,
                        }
                    } else {
                        self.arm_fence();
                    }
                }
            }
            self.poll_standby_start().await;
            if self.state.is_up() {
                self.ensure_standby();
            }
            self.refresh_view();
        }
    }

    async fn wait(&mut self) -> Wake {
        let tick = self.ticker.tick();
        let exited = async {
            match self.vmm.as_mut() {
                Some(vmm) => vmm.exited().await,
                None => std::future::pending().await,
            }
        };
        let watch = async {
            match self.watch.as_mut() {
                Some(w) => w.next_event().await,
                None => std::future::pending().await,
            }
        };
        let restore_due = async {
            match &self.pending_restore {
                Some(p) => tokio::time::sleep_until(p.at.into()).await,
                None => std::future::pending().await,
            }
        };
        let standby_exit = async {
            match self.standby.as_mut() {
                Some(s) => {
                    s.process.exited().await;
                }
                None => std::future::pending().await,
            }
        };
        let checkpointed = async {
            match self.checkpoint.as_mut() {
                Some((request, _)) => request.answer().await,
                None => std::future::pending().await,
            }
        };
        let sampled = async {
            match self.sample.as_mut() {
                Some(request) => request.answer().await,
                None => std::future::pending().await,
            }
        };
        let standing = async {
            match self.standing.as_mut() {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = self.shutdown.cancelled() => Wake::Shutdown,
            () = standing => Wake::Standing,
            answer = checkpointed => Wake::Checkpointed(answer),
            answer = sampled => Wake::Sampled(answer),
            () = exited => Wake::Exited,
            event = watch => Wake::Watch(event),
            () = restore_due => Wake::RestoreDue,
            cmd = self.rx.recv() => Wake::Command(cmd),
            () = standby_exit => Wake::StandbyExited,
            _ = tick => Wake::Tick,
        }
    }

    async fn on_tick(&mut self, now: Instant) {
        if self
            .persist_pending
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.persist();
        }
        // A hung guest: no heartbeat for heartbeat_timeout, once past
        // ready_grace. Judged on time alone: requests to the VMM run beside
        // this loop, so a stalled VMM cannot hold its own detection up.
        // A pause the VMM was asked for is no hang (a stalled one ends in
        // control-timeout: the checkpoint's answer does not come).
        let asked_pause = self.asked_pause.is_some();
        if self.state == VmState::Running
            && !asked_pause
            && self.policy.is_healthy(now, self.running_since)
        {
            let last = self.last_heartbeat_at.unwrap_or(self.running_since);
            if self.policy.is_hung(now, last) {
                if let Some(mut vmm) = self.vmm.take() {
                    vmm.kill();
                    vmm.exited().await;
                }
                self.watch = None;
                self.on_failure(
                    FailureReason::HeartbeatTimeout,
                    now,
                    format!("no heartbeat for {:?}", now.saturating_duration_since(last)),
                )
                .await;
                return;
            }
        }
        if self.checkpoint.is_none()
            && self.policy.should_checkpoint(
                &self.state,
                now,
                self.running_since,
                self.last_checkpoint_at,
            )
        {
            self.last_checkpoint_at = Some(now);
            self.start_checkpoint(Vec::new());
        }
        self.sample(now);
    }

    /// Per-VM accounting from the VMM's status and /proc, every
    /// [`SAMPLE_EVERY`] while the guest is up. The status request runs beside
    /// the loop ([`VmTask::on_sampled`] takes its answer); one that takes
    /// longer than `control_timeout` is a `control-timeout` failure, which
    /// also catches a stalled VMM of a paused VM (no heartbeats to judge).
    fn sample(&mut self, now: Instant) {
        if !self.state.is_up()
            || self.sample.is_some()
            || self
                .last_sample
                .is_some_and(|t| now.saturating_duration_since(t) < SAMPLE_EVERY)
        {
            return;
        }
        self.last_sample = Some(now);
        let (Some(vmm), Some(client)) = (&self.vmm, self.client()) else {
            return;
        };
        self.sample = Some(InFlight::spawn(vmm.pid(), async move {
            client.status().await.map(|status| Sample::of(&status))
        }));
        let name = &self.spec.name;
        if let Some(at) = self.last_heartbeat_at {
            self.metrics.set_heartbeat_age(name, at.elapsed());
        }
        if let Ok(cpu) = crate::metrics::proc_cpu_seconds(vmm.pid()) {
            self.metrics.observe_vmm_cpu_seconds(name, vmm.pid(), cpu);
        }
        self.metrics.set_standby(
            name,
            self.standby.is_some(),
            self.standby
                .as_ref()
                .map_or(0, |s| rss_bytes(s.process.pid())),
        );
    }

    async fn on_sampled(&mut self, answer: Answer<Sample>, now: Instant) {
        let Some(vmm) = self.vmm.as_ref().filter(|v| v.pid() == answer.pid) else {
            return;
        };
        match answer.result {
            Ok(status) => {
                let name = &self.spec.name;
                self.metrics
                    .observe_vcpu_exits(name, vmm.pid(), status.vcpu_exits);
                self.metrics
                    .set_guest_memory_resident(name, status.guest_resident_bytes);
            }
            Err(e) if answer.timed_out && self.state.is_up() => {
                self.control_timeout(now, format!("status: {e}")).await;
            }
            // Gone or going: the VMM's exit or its watch says why.
            Err(e) => tracing::debug!(error = %e, "status sample failed"),
        }
    }

    /// Kills the active VMM on purpose (its end is no failure of its own)
    /// and waits until it is gone.
    async fn kill_active(&mut self) {
        self.stopping = true;
        if let Some(mut vmm) = self.vmm.take() {
            vmm.kill();
            vmm.exited().await;
        }
        self.watch = None;
        self.stopping = false;
    }

    /// The active VMM did not answer within `control_timeout`: it is killed
    /// and failed over like a crash.
    async fn control_timeout(&mut self, now: Instant, detail: String) {
        self.kill_active().await;
        self.on_failure(FailureReason::ControlTimeout, now, detail)
            .await;
        self.persist();
    }

    /// Asks the active VMM for a consistency image (incremental: the VMM
    /// writes a full one when it has no parent). The request runs beside the
    /// loop; `replies` (operators) get the outcome ([`VmTask::on_checkpointed`]).
    fn start_checkpoint(&mut self, replies: Vec<oneshot::Sender<ActionResult>>) {
        let Some(vmm) = &self.vmm else {
            for reply in replies {
                let _ = reply.send(Err(ActionError::Failed("the VM has no running VMM".into())));
            }
            return;
        };
        let client = vmm.client(CHECKPOINT_TIMEOUT);
        let request = InFlight::spawn(vmm.pid(), async move {
            client.checkpoint(CheckpointKind::Incremental).await
        });
        self.checkpoint = Some((request, replies));
    }

    /// An operator's `relive checkpoint`: taken now, or right after the one
    /// being taken (which captured the guest before the operator asked).
    fn operator_checkpoint(&mut self, reply: oneshot::Sender<ActionResult>) {
        if self.state != VmState::Running && self.state != VmState::Paused {
            let _ = reply.send(Err(ActionError::Conflict(format!(
                "VM {} is {}: nothing to checkpoint",
                self.spec.name, self.state
            ))));
        } else if self.checkpoint.is_some() {
            self.checkpoint_waiters.push(reply);
        } else {
            self.start_checkpoint(vec![reply]);
        }
    }

    fn on_checkpointed(
        &mut self,
        answer: Answer<CheckpointReport>,
        replies: Vec<oneshot::Sender<ActionResult>>,
    ) {
        let current = self.vmm.as_ref().is_some_and(|v| v.pid() == answer.pid);
        let outcome = match answer.result {
            _ if !current => Err("the VM's VMM changed before the checkpoint completed".into()),
            Ok(report) => {
                self.on_image(&report);
                Ok(report.image_id)
            }
            Err(e) => {
                self.metrics.record_checkpoint_failure(&self.spec.name);
                tracing::warn!(error = %e, "checkpoint failed");
                Err(e)
            }
        };
        for reply in replies {
            let _ = reply.send(
                outcome
                    .clone()
                    .map(|id| format!("image {id}"))
                    .map_err(ActionError::Failed),
            );
        }
        if current && answer.timed_out {
            // The status samples judge whether the VMM answers; a checkpoint
            // this slow is a failed checkpoint (images go stale), not a VM
            // failure.
            tracing::warn!(after = ?CHECKPOINT_TIMEOUT, "a checkpoint did not finish in time");
        }
        if !self.checkpoint_waiters.is_empty() {
            let waiters = std::mem::take(&mut self.checkpoint_waiters);
            if self.state.is_up() {
                self.start_checkpoint(waiters);
            } else {
                for reply in waiters {
                    let _ = reply.send(Err(ActionError::Conflict(format!(
                        "VM {} is {}: nothing to checkpoint",
                        self.spec.name, self.state
                    ))));
                }
            }
        }
    }

    /// A new consistency image: metrics, view, and the policy's trust.
    fn on_image(&mut self, report: &CheckpointReport) {
        self.record_image(report);
        self.replicate(report);
    }

    /// The metrics, policy and view of a committed image.
    fn record_image(&mut self, report: &CheckpointReport) {
        let kind = match report.kind {
            CheckpointKind::Full => crate::metrics::CheckpointKind::Full,
            CheckpointKind::Incremental => crate::metrics::CheckpointKind::Incremental,
        };
        let name = &self.spec.name;
        self.metrics
            .observe_checkpoint(name, kind, Duration::from_micros(report.total_us));
        self.metrics
            .observe_checkpoint_pause(name, kind, Duration::from_micros(report.pause_us));
        self.metrics
            .set_last_checkpoint(name, std::time::SystemTime::now());
        let (count, bytes) = dir_usage(&self.spec.images_dir);
        self.metrics.set_images(name, count, bytes);
        // A fresh image of a healthy guest: consistency images are trusted again.
        let suspect = self.policy.images_suspect();
        self.policy.on_checkpoint(Instant::now());
        if suspect {
            self.persist();
        }
        self.view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_checkpoint = Some(report.image_id.clone());
    }

    /// Ends the requests to a VMM that is no longer the active one; operators
    /// waiting for a checkpoint are told.
    fn cancel_requests(&mut self, why: &str) {
        if let Some((request, replies)) = self.checkpoint.take() {
            request.handle.abort();
            for reply in replies
                .into_iter()
                .chain(std::mem::take(&mut self.checkpoint_waiters))
            {
                let _ = reply.send(Err(ActionError::Failed(format!("no checkpoint: {why}"))));
            }
        }
        if let Some(sample) = self.sample.take() {
            sample.handle.abort();
        }
    }

    /// Deletes the consistency images the guest never heartbeated after: those
    /// the active VMM captured once the guest's last heartbeat had been sent.
    /// After a failure of the guest itself (a hang, or a panic whose command
    /// was already on its way) they hold the failing guest, and restoring one
    /// would only fail again.
    fn discard_unconfirmed_images(&self) {
        let Some(last_seq) = self
            .last_heartbeat
            .as_deref()
            .and_then(Heartbeat::parse)
            .map(|hb| hb.seq)
        else {
            return;
        };
        let Ok(entries) = self
            .store()
            .and_then(|s| s.list().map_err(|e| e.to_string()))
        else {
            return;
        };
        let mut discarded = Vec::new();
        // Newest first; stop at the first image a later heartbeat confirms.
        for entry in entries.iter().rev() {
            if !entry.kind.is_some_and(|k| k.is_consistency())
                || entry
                    .created_unix_ms
                    .is_none_or(|ms| ms < self.active_since_unix_ms)
            {
                continue;
            }
            let Some(seq) = captured_heartbeat_seq(&entry.path) else {
                continue;
            };
            if seq < last_seq {
                break;
            }
            if std::fs::remove_file(&entry.path).is_ok() {
                discarded.push(entry.path.display().to_string());
            }
        }
        if !discarded.is_empty() {
            self.note(
                "image-discarded",
                format!(
                    "captured after the guest's last heartbeat (seq {last_seq}): {}",
                    discarded.join(", ")
                ),
            );
        }
    }

    /// The active VMM ended by itself, with `record` (if it left one): a
    /// failure, or a container app's end, which `restart` judges.
    async fn on_ended(&mut self, record: Option<&ExitRecord>, now: Instant) {
        let detail = exit_detail(record);
        let (Some(app), Some(spec)) = (
            record
                .filter(|r| r.reason == ExitReason::AppExit)
                .map(|r| r.app.unwrap_or(AppExit::Code(1))),
            self.spec.app.as_ref(),
        ) else {
            return self.on_failure(failure_reason(record), now, detail).await;
        };
        let restart = spec.restart;
        self.metrics
            .record_app_exit(&self.spec.name, app.succeeded());
        match (restart, app.succeeded()) {
            (Restart::OnFailure | Restart::Never, true) => {
                self.stop_standby().await;
                let detail = format!(
                    "{detail}: the app is done (restart: {}); `relive start` runs it again from \
                     its boot image",
                    restart.as_str()
                );
                self.set_state(VmState::Stopped, |e| e.with_detail(detail), "app-exit");
            }
            (Restart::Always, true) => {
                let detail = format!("{detail}: restart: always runs it again from its boot image");
                self.set_state(
                    VmState::Restoring(RestoreTarget::Boot),
                    |e| e.with_detail(detail),
                    "app-exit",
                );
                self.do_restore(RestoreTarget::Boot, now, "app-exit").await;
            }
            (Restart::Never, false) => {
                self.metrics
                    .record_failure(&self.spec.name, FailureReason::AppExit);
                self.stop_standby().await;
                let detail = format!("{detail}: the app failed ({app}) and restart is never");
                self.set_state(VmState::Failed, |e| e.with_detail(detail), "app-exit");
            }
            (Restart::OnFailure | Restart::Always, false) => {
                let detail = format!("{detail}: the app failed ({app})");
                self.on_failure(FailureReason::AppExit, now, detail).await;
            }
        }
    }

    async fn on_failure(&mut self, reason: FailureReason, detected: Instant, detail: String) {
        if self.lost_ownership().await {
            return;
        }
        self.metrics.record_failure(&self.spec.name, reason);
        if matches!(
            reason,
            FailureReason::Panic
                | FailureReason::TripleFault
                | FailureReason::Reset
                | FailureReason::PowerOff
                | FailureReason::KvmError
                | FailureReason::HeartbeatTimeout
                | FailureReason::AppExit
        ) {
            self.discard_unconfirmed_images();
        }
        self.view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_failure = Some(reason.as_str().to_string());
        let decision = self.policy.on_failure(detected, reason);
        match decision {
            Decision::GiveUp => {
                if let Some(vmm) = self.vmm.take() {
                    vmm.kill();
                }
                self.watch = None;
                // A failed VM holds no standby; `relive start` builds a new one.
                self.stop_standby().await;
                let event_detail = format!(
                    "{detail}; too many failures within failure_window: waiting for `relive start`"
                );
                tracing::error!(detail = %event_detail, "VM failed");
                self.set_state(
                    VmState::Failed,
                    |e| e.with_detail(event_detail),
                    reason.as_str(),
                );
            }
            Decision::Restore { target, after } => {
                self.set_state(
                    VmState::Restoring(target.clone()),
                    |e| e.with_detail(detail),
                    reason.as_str(),
                );
                if after.is_zero() {
                    self.do_restore(target, detected, reason.as_str()).await;
                } else {
                    // Waited for in the task's select!, so that stop, start,
                    // a forced failover and shutdown are heard meanwhile.
                    self.pending_restore = Some(PendingRestore {
                        at: Instant::now() + after,
                        target,
                        detected,
                        reason: reason.as_str(),
                    });
                }
            }
        }
    }

    /// Restores `target` and records the outcome; a failed restore is a
    /// failure of its own (`start-failed`), which the policy escalates.
    async fn do_restore(&mut self, target: RestoreTarget, detected: Instant, reason: &str) {
        self.pending_restore = None;
        if self.lost_ownership().await {
            return;
        }
        let started = Instant::now();
        match self.restore(&target).await {
            Ok((what, image_id, path)) => {
                self.restores += 1;
                let described = match (&what, &image_id) {
                    (RestoreTarget::Image(id), _) => format!("image {id}"),
                    (_, Some(id)) => format!("the {} image {id}", what.kind()),
                    (_, None) => format!("the {} image", what.kind()),
                };
                if what.restores_state() {
                    self.app_log.on_restored_state(&described);
                } else {
                    self.app_log
                        .on_new_run(&format!("restored from {described}"));
                }
                let now = Instant::now();
                self.policy.on_restored(now, what.clone());
                if what == RestoreTarget::Consistency {
                    self.record_restore_cluster_wide();
                }
                let total = now.saturating_duration_since(detected);
                let restore = now.saturating_duration_since(started);
                let name = &self.spec.name;
                self.metrics.record_restore(name, &what, path);
                self.metrics.observe_restore(name, path, restore);
                self.metrics.observe_failover(name, &what, path, total);
                let durations = EventDurations::new(
                    started.saturating_duration_since(detected),
                    restore,
                    total,
                );
                self.set_state(
                    VmState::Running,
                    |e| {
                        let e = e
                            .with_path(path)
                            .with_durations(durations)
                            .with_detail(format!("{reason}: restored {what}"));
                        match image_id {
                            Some(id) => e.with_image_id(id),
                            None => e,
                        }
                    },
                    "restored",
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "restore failed");
                Box::pin(self.on_failure(FailureReason::StartFailed, Instant::now(), e)).await;
            }
        }
    }

    /// Ends the standby VMM (and one being started): a stopped VM keeps none.
    async fn stop_standby(&mut self) {
        if let Some(handle) = self.standby_starting.take() {
            if let Ok(Ok(process)) = handle.await {
                process.kill();
            }
        }
        if let Some(mut standby) = self.standby.take() {
            let _ = standby
                .process
                .client(self.spec.policy.control_timeout)
                .request(&Request::Shutdown)
                .await;
            if tokio::time::timeout(EXIT_AFTER_RECORD, standby.process.exited())
                .await
                .is_err()
            {
                standby.process.kill();
            }
        }
        self.metrics.set_standby(&self.spec.name, false, 0);
        self.persist();
    }

    async fn stop_vmm(&mut self) {
        self.watch = None;
        if let Some(mut vmm) = self.vmm.take() {
            let _ = vmm
                .client(self.spec.policy.control_timeout)
                .request(&Request::Shutdown)
                .await;
            let ended = tokio::time::timeout(EXIT_AFTER_RECORD, vmm.exited()).await;
            if ended.is_err() {
                vmm.kill();
                vmm.exited().await;
            }
        }
    }

    async fn on_action(&mut self, action: Action) -> ActionResult {
        let conflict = |msg: String| Err(ActionError::Conflict(msg));
        match action {
            Action::Failover { to } => {
                if matches!(self.state, VmState::Stopped | VmState::Failed) {
                    return conflict(format!(
                        "VM {} is {}: use `relive start` first",
                        self.spec.name, self.state
                    ));
                }
                let target = match to.as_str() {
                    "consistency" => RestoreTarget::Consistency,
                    "boot" => RestoreTarget::Boot,
                    id => RestoreTarget::Image(id.to_string()),
                };
                if let RestoreTarget::Image(id) = &target {
                    let exists = id
                        .parse()
                        .ok()
                        .and_then(|id| self.store().ok()?.find(id).ok()?)
                        .is_some();
                    if !exists {
                        return Err(ActionError::Failed(format!(
                            "no image {id} for VM {}: see `relive images {}`",
                            self.spec.name, self.spec.name
                        )));
                    }
                }
                let detected = Instant::now();
                self.pending_restore = None;
                self.kill_active().await;
                self.set_state(
                    VmState::Restoring(target.clone()),
                    |e| e,
                    "operator-failover",
                );
                self.do_restore(target, detected, "operator-failover").await;
                if self.state == VmState::Running {
                    Ok(format!("VM {} failed over", self.spec.name))
                } else {
                    Err(ActionError::Failed(format!(
                        "VM {} is {} after the failover",
                        self.spec.name, self.state
                    )))
                }
            }
            Action::Move { to_host } => self.move_to(to_host).await,
            Action::Checkpoint => {
                // Taken beside the loop: see `operator_checkpoint`.
                let (reply, answer) = oneshot::channel();
                self.operator_checkpoint(reply);
                answer.await.unwrap_or_else(|_| {
                    Err(ActionError::Failed("the checkpoint was abandoned".into()))
                })
            }
            Action::Pause | Action::Resume => {
                let (request, from, to) = match action {
                    Action::Pause => (Request::Pause, VmState::Running, VmState::Paused),
                    _ => (Request::Resume, VmState::Paused, VmState::Running),
                };
                if self.state != from {
                    return conflict(format!(
                        "VM {} is {}, not {from}",
                        self.spec.name, self.state
                    ));
                }
                let Some(vmm) = &self.vmm else {
                    return conflict("no VMM".into());
                };
                vmm.client(self.spec.policy.control_timeout)
                    .expect_ok(&request)
                    .await
                    .map_err(|e| ActionError::Failed(relive_control::error_chain(&e)))?;
                if to == VmState::Running {
                    self.running_since = Instant::now();
                    self.last_heartbeat_at = None;
                }
                let reason = if to == VmState::Paused {
                    "operator-pause"
                } else {
                    "operator-resume"
                };
                self.set_state(to, |e| e, reason);
                Ok(format!("VM {} is {}", self.spec.name, self.state))
            }
            Action::Stop => {
                if matches!(self.state, VmState::Stopped) {
                    return Ok(format!("VM {} is already stopped", self.spec.name));
                }
                self.pending_restore = None;
                self.stopping = true;
                self.stop_vmm().await;
                self.stop_standby().await;
                self.stopping = false;
                self.set_state(VmState::Stopped, |e| e, "operator-stop");
                self.persist();
                Ok(format!("VM {} stopped", self.spec.name))
            }
            Action::Start => {
                if self.state.is_up()
                    || matches!(self.state, VmState::Restoring(_) | VmState::Starting)
                {
                    return conflict(format!("VM {} is {}", self.spec.name, self.state));
                }
                self.policy.on_operator_start();
                self.set_state(VmState::Starting, |e| e, "operator-start");
                match self.boot().await {
                    Ok(image) => {
                        self.app_log.on_new_run(&started_from(image.as_deref()));
                        self.set_state(VmState::Running, |e| with_image(e, image), "started");
                        Ok(format!("VM {} started", self.spec.name))
                    }
                    Err(e) => {
                        let detail = e.clone();
                        self.set_state(
                            VmState::Failed,
                            |ev| ev.with_detail(detail),
                            "start-failed",
                        );
                        Err(ActionError::Failed(e))
                    }
                }
            }
        }
    }
}

/// How a start began, for the app log.
/// Cluster mode: ownership, fencing and takeover.
impl VmTask {
    /// Waits until this host owns the VM. While another host owns it the VM
    /// is `elsewhere` here and operator actions are refused naming that
    /// host; when its owner key goes (the owner's lease expired: the host is
    /// lost or fenced itself), this host waits `failover_grace` plus its
    /// rank's share and tries to take it. `None` at shutdown; else the host
    /// it took the VM over from (`None` if nobody else owned it).
    async fn own(&mut self) -> Option<Option<String>> {
        let member = self.cluster.clone()?;
        let name = self.spec.name.clone();
        let mut previous: Option<String> = None;
        loop {
            if !member.standing().is_live() {
                let mut rx = member.subscribe();
                let why =
                    "this host fenced itself and has not joined the cluster again".to_string();
                loop {
                    tokio::select! {
                        () = self.shutdown.cancelled() => return None,
                        cmd = self.rx.recv() => self.refuse(cmd?, &why),
                        changed = rx.changed() => {
                            if changed.is_err() || member.standing().is_live() {
                                break;
                            }
                        }
                    }
                }
                continue;
            }
            let claim = member.acquire(&name).await;
            match claim {
                Ok(Claim::Owned { token, lease }) => {
                    tracing::info!(token, lease, "this host owns the VM");
                    self.token = Some(token);
                    self.token_lease = Some(lease);
                    let mut view = lock(&self.view);
                    view.host = Some(member.host().to_string());
                    view.token = Some(token);
                    drop(view);
                    return Some(previous.filter(|h| h != member.host()));
                }
                Ok(Claim::Taken { owner, token }) => {
                    lock(&self.view).host = Some(owner.host.clone());
                    if self.state != VmState::Elsewhere {
                        self.set_state(
                            VmState::Elsewhere,
                            |e| {
                                e.with_detail(format!(
                                    "host {} owns it (token {token})",
                                    owner.host
                                ))
                            },
                            "owned-elsewhere",
                        );
                    }
                    previous = Some(owner.host.clone());
                    let why = format!("VM {name} runs on host {}: act there", owner.host);
                    // A watch that breaks is watched again (its first step
                    // reads the key): only the key's end starts the
                    // ranked wait, so no host jumps ahead of the others.
                    let unowned = async {
                        loop {
                            match member.wait_unowned(&name).await {
                                Ok(()) => return,
                                Err(e) => {
                                    tracing::warn!(error = %relive_control::error_chain(&e), "cannot watch the VM's owner: watching again");
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        }
                    };
                    tokio::pin!(unowned);
                    loop {
                        tokio::select! {
                            () = self.shutdown.cancelled() => return None,
                            cmd = self.rx.recv() => self.refuse(cmd?, &why),
                            () = &mut unowned => break,
                        }
                    }
                    let handoff = member.handoff(&name).await.ok().flatten();
                    let wait = match handoff {
                        Some(to) if to == member.host() => {
                            self.handed_here = true;
                            Duration::ZERO
                        }
                        Some(to) => {
                            self.note(
                                "owner-lost",
                                format!(
                                    "host {} handed the VM to host {to}: this host leaves it to \
                                     that host for failover_grace + lease_ttl",
                                    owner.host
                                ),
                            );
                            member.config().failover_grace + member.config().lease_ttl
                        }
                        None => {
                            let rank = self.rank(&member).await;
                            self.note(
                                "owner-lost",
                                format!(
                                    "host {} no longer owns the VM: this host (rank {rank}) tries to take it",
                                    owner.host
                                ),
                            );
                            member.config().failover_grace + member.config().request_timeout * rank
                        }
                    };
                    let until = tokio::time::sleep(wait);
                    tokio::pin!(until);
                    loop {
                        tokio::select! {
                            () = self.shutdown.cancelled() => return None,
                            cmd = self.rx.recv() => self.refuse(cmd?, &why),
                            () = &mut until => break,
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim the VM");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return None,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// This host's place among the live hosts for this VM (0 first), by
    /// [`crate::cluster::takeover_order`] on the VM's manifest.
    async fn rank(&self, member: &Member) -> u32 {
        let (holders, cpu) = self
            .manifest()
            .await
            .map(|m| (m.hosts, m.cpu))
            .unwrap_or_default();
        let hosts = member.hosts().await.unwrap_or_default();
        let order = crate::cluster::takeover_order(&self.spec.name, &hosts, &holders, &cpu);
        let at = order
            .iter()
            .position(|h| h == member.host())
            .unwrap_or(order.len());
        u32::try_from(at).unwrap_or(u32::MAX)
    }

    /// Whether this host is live on the lease the VM's owner key is on.
    fn owns_on_live_lease(&self) -> bool {
        match (&self.cluster, self.token_lease) {
            (Some(member), Some(lease)) => {
                let standing = member.standing();
                standing.is_live() && standing.lease() == lease
            }
            _ => false,
        }
    }

    /// Cluster mode: before a failure is handled or anything is restored,
    /// whether the VM stopped being this host's (its lease lapsed: the VMM
    /// may have fenced itself at the same deadline). If so nothing starts
    /// here: the VM is fenced and the task waits to own it again.
    async fn lost_ownership(&mut self) -> bool {
        if self.cluster.is_none() || self.owns_on_live_lease() {
            return false;
        }
        if self.state != VmState::Fenced {
            self.fence().await;
        }
        self.reown = true;
        true
    }

    /// Hands the host's fencing deadline to the active VMM (`fence`): if
    /// this supervisor dies, or stops renewing, the VMM ends its VM by
    /// itself at that deadline, before the lease can expire and another host
    /// take the VM. Renewed with every lease renewal.
    fn arm_fence(&self) {
        let (Some(member), Some(_), Some(vmm)) = (&self.cluster, self.token, &self.vmm) else {
            return;
        };
        let Standing::Live { deadline, lease } = member.standing() else {
            return;
        };
        if Some(lease) != self.token_lease {
            // Not this VM's lease: its deadline is not moved (the task
            // fences the VM as soon as it sees the change).
            return;
        }
        let within = deadline.saturating_duration_since(Instant::now());
        let within_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX).max(1);
        let client = vmm.client(self.spec.policy.control_timeout);
        tokio::spawn(async move {
            if let Err(e) = client.expect_ok(&Request::Fence { within_ms }).await {
                tracing::warn!(error = %relive_control::error_chain(&e), "cannot renew the VMM's fencing deadline");
            }
        });
    }

    /// Pushes the image a checkpoint committed (with its chain and the boot
    /// image) to the VM's peer hosts, then records the manifest in etcd
    /// ([`crate::replication`]). One replication at a time per VM: while one
    /// runs, a new image is left to the next, which pushes every file its
    /// chain needs that a peer lacks.
    fn replicate(&mut self, report: &CheckpointReport) {
        let (Some(member), Some(token)) = (self.cluster.clone(), self.token) else {
            return;
        };
        let config = member.config();
        let (Some(bearer), true) = (config.token.as_ref(), config.replicas > 0) else {
            return;
        };
        if self.replicating.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let Ok(store) = self.store() else {
            return;
        };
        let image = match report.image_id.parse() {
            Ok(id) => match store.find(id) {
                Ok(Some(path)) => path,
                _ => return,
            },
            Err(_) => return,
        };
        let bearer = bearer.secret().to_string();
        let replicas = config.replicas;
        let (metrics, name) = (self.metrics.clone(), self.spec.name.clone());
        let started = Instant::now();
        self.replicating = Some(tokio::spawn(async move {
            let done = crate::replication::replicate(
                member,
                bearer,
                name.clone(),
                token,
                store,
                image,
                replicas,
            )
            .await;
            match done {
                Ok((manifest, pushed, _)) => {
                    metrics.record_replication(&name, pushed.bytes, started.elapsed());
                    tracing::debug!(file = %manifest.file, hosts = ?manifest.hosts, files = pushed.files, bytes = pushed.bytes, "image replicated");
                }
                Err(e) => {
                    metrics.record_replication_failure(&name);
                    tracing::warn!(error = %e, "image replication failed");
                }
            }
        }));
    }

    /// Cluster mode: a consistency restore is recorded in etcd for the VM's
    /// `failure_window`, so that a failure within it on any host goes to
    /// the boot image.
    fn record_restore_cluster_wide(&self) {
        let (Some(member), Some(token)) = (self.cluster.clone(), self.token) else {
            return;
        };
        let (name, window) = (self.spec.name.clone(), self.spec.policy.failure_window);
        tokio::spawn(async move {
            if let Err(e) = member.record_restore(&name, token, window).await {
                tracing::warn!(error = %e, "cannot record the restore in the cluster");
            }
        });
    }

    /// The VM's image manifest in etcd: its newest replicated image.
    async fn manifest(&self) -> Option<crate::replication::Manifest> {
        let member = self.cluster.as_ref()?;
        member
            .vm_value(&self.spec.name, "images")
            .await
            .ok()?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    }

    /// Fetches the files of the manifest's image that this host lacks from
    /// a live holder (a takeover by a host that was not one of them: the
    /// holders were lost too, or ranked after it). `None` when nothing was
    /// pulled; else what happened, for the takeover's event.
    async fn pull_replicated(&self) -> Option<String> {
        let member = self.cluster.as_ref()?;
        let bearer = member.config().token.as_ref()?.secret().to_string();
        let manifest = self.manifest().await?;
        if manifest.hosts.iter().any(|h| h == member.host()) {
            return None;
        }
        let store = self.store().ok()?;
        let started = Instant::now();
        match crate::replication::pull(member, &bearer, &self.spec.name, &manifest, &store).await {
            Ok(pulled) if pulled.files == 0 => None,
            Ok(pulled) => {
                self.metrics
                    .record_replication(&self.spec.name, pulled.bytes, started.elapsed());
                Some(format!(
                    "pulled {} file(s), {} bytes, from host {} in {} ms",
                    pulled.files,
                    pulled.bytes,
                    pulled.from,
                    started.elapsed().as_millis()
                ))
            }
            Err(e) => {
                self.metrics.record_replication_failure(&self.spec.name);
                tracing::warn!(error = %e, "cannot pull the VM's replicated image");
                Some(format!("could not pull its replicated image: {e}"))
            }
        }
    }

    /// The replicated image this host holds for the VM, by the manifest in
    /// etcd, if this host is one of its holders and has the file (or pulled
    /// the files).
    async fn replicated_image(&self) -> Option<String> {
        let member = self.cluster.as_ref()?;
        let manifest = self.manifest().await;
        // The manifest's image, or a newer one that came after it (the owner
        // may have been lost between a peer's ack and the next manifest;
        // retention here may have removed the older file since). Without a
        // manifest (no replication had completed yet), what the owner pushed.
        let created = |file: &str| file.split('-').next()?.parse::<u64>().ok();
        let wanted = match &manifest {
            Some(m)
                if !m.hosts.iter().any(|h| h == member.host())
                    && !self.store().ok()?.dir().join(&m.file).is_file() =>
            {
                return None
            }
            Some(m) => created(&m.file)?,
            None => 0,
        };
        let newest = self.store().ok()?.latest_verified().ok()?.image?;
        let file = newest.path().file_name()?.to_string_lossy().into_owned();
        (created(&file)? >= wanted).then_some(file)
    }

    /// [`replicated_image`](Self::replicated_image), after pulling the
    /// files this host lacks when it holds none; with what the pull did.
    async fn replicated_image_or_pull(&self) -> (Option<String>, Option<String>) {
        if let Some(file) = self.replicated_image().await {
            return (Some(file), None);
        }
        let pulled = self.pull_replicated().await;
        (self.replicated_image().await, pulled)
    }

    /// Cluster mode: the VM's consistency restore within its failure
    /// window, on any host, if there was one.
    async fn recent_restore_elsewhere(&self) -> Option<crate::cluster::RestoreRecord> {
        let member = self.cluster.as_ref()?;
        match member.recent_restore(&self.spec.name).await {
            Ok(recent) => recent,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the VM's recent restores from the cluster");
                None
            }
        }
    }

    fn refuse(&self, cmd: Command, why: &str) {
        let _ = cmd.reply.send(Err(ActionError::Conflict(why.to_string())));
    }

    /// The host's lease could not be renewed in time: kill the VM's VMMs
    /// now, before another host can see the lease expire, and give up the
    /// token.
    async fn fence(&mut self) {
        self.token = None;
        self.token_lease = None;
        lock(&self.view).token = None;
        self.pending_restore = None;
        self.cancel_requests("this host fenced itself");
        let pid = self.end_processes().await;
        let detail = match pid {
            Some(pid) => format!("the session lease was not renewed in time: VMM {pid} killed"),
            None => "the session lease was not renewed in time".to_string(),
        };
        tracing::error!(%detail, "fenced");
        self.set_state(VmState::Fenced, |e| e.with_detail(detail), "fenced");
    }

    /// Kills the VM's VMM and its standby and waits until both are gone;
    /// the pid of the VMM that ran the guest.
    async fn end_processes(&mut self) -> Option<u32> {
        self.watch = None;
        let pid = self.vmm.as_ref().map(VmmProcess::pid);
        if let Some(mut vmm) = self.vmm.take() {
            vmm.kill();
            vmm.exited().await;
        }
        if let Some(handle) = self.standby_starting.take() {
            handle.abort();
        }
        if let Some(mut standby) = self.standby.take() {
            standby.process.kill();
            standby.process.exited().await;
        }
        self.metrics.set_standby(&self.spec.name, false, 0);
        pid
    }

    /// An operator's move to host `to`: the guest is paused and
    /// checkpointed, the image and its chain are sent to `to` (which
    /// verifies them), the VM ends here, and one transaction under this
    /// host's token hands it to `to` and gives up the owner key; `to` takes
    /// it at once and restores that image, so the guest goes on from where
    /// it was paused. Until the hand-off, a failure leaves the VM running
    /// here; answered once `to` owns the VM.
    async fn move_to(&mut self, to: String) -> ActionResult {
        let name = self.spec.name.clone();
        let (Some(member), Some(token)) = (self.cluster.clone(), self.token) else {
            return Err(ActionError::Conflict(format!(
                "VM {name} is not owned by this host: a move is asked of the VM's owner"
            )));
        };
        if to == member.host() {
            return Err(ActionError::Conflict(format!(
                "VM {name} runs on host {to} already"
            )));
        }
        if !matches!(self.state, VmState::Running | VmState::Paused) {
            return Err(ActionError::Conflict(format!(
                "VM {name} is {}: only a running or paused VM is moved",
                self.state
            )));
        }
        let failed = |what: String| {
            Err(ActionError::Failed(format!(
                "{what}; VM {name} runs on here"
            )))
        };
        let Some(bearer) = member
            .config()
            .token
            .as_ref()
            .map(|t| t.secret().to_string())
        else {
            return failed(format!(
                "cluster.token is not set, so no image can be sent to host {to}"
            ));
        };
        let peer = match member.hosts().await {
            Ok(hosts) => hosts
                .into_iter()
                .find(|h| h.host == to)
                .and_then(|h| h.advertise.map(|a| (h.host, a))),
            Err(e) => return failed(format!("cannot list the hosts: {e}")),
        };
        let Some(peer) = peer else {
            return failed(format!(
                "no live host {to} with a cluster listener (see `relive hosts`)"
            ));
        };
        let started = Instant::now();
        // A checkpoint or replication under way ends first: the move's own
        // image comes after it, and no file is sent twice at once.
        if let Some((mut request, replies)) = self.checkpoint.take() {
            let answer = request.answer().await;
            self.on_checkpointed(answer, replies);
        }
        if let Some(replicating) = self.replicating.take() {
            let _ = replicating.await;
        }
        // An image and its chain onto `to` (what it holds is not sent again).
        let send = |store: ImageStore, path: std::path::PathBuf| {
            let (member, bearer, name, peer) =
                (member.clone(), bearer.clone(), name.clone(), peer.clone());
            async move {
                crate::replication::replicate_to(
                    &member,
                    &bearer,
                    &name,
                    token,
                    &store,
                    &path,
                    vec![peer],
                )
                .await
            }
        };
        // While the guest runs, `to` gets the latest image and its chain:
        // the pause then only waits for the layer written in it.
        let latest = lock(&self.view).last_checkpoint.clone();
        if let Some(path) = latest.and_then(|id| self.store().ok()?.find(id.parse().ok()?).ok()?) {
            if let Ok(store) = self.store() {
                if let Err(e) = send(store, path).await {
                    return failed(format!("cannot send its images to host {to}: {e}"));
                }
            }
        }
        let Some(vmm) = &self.vmm else {
            return failed("the VM has no running VMM".into());
        };
        let paused = Instant::now();
        let (control, checkpoint) = (
            vmm.client(self.spec.policy.control_timeout),
            vmm.client(CHECKPOINT_TIMEOUT),
        );
        let was_running = self.state == VmState::Running;
        if let Err(e) = control.expect_ok(&Request::Pause).await {
            return failed(format!(
                "cannot pause it: {}",
                relive_control::error_chain(&e)
            ));
        }
        let resume = |control: relive_control::AsyncClient| async move {
            if was_running {
                let _ = control.expect_ok(&Request::Resume).await;
            }
        };
        let report = match checkpoint.checkpoint(CheckpointKind::Incremental).await {
            Ok(report) => report,
            Err(e) => {
                resume(control).await;
                return failed(format!(
                    "cannot checkpoint it: {}",
                    relive_control::error_chain(&e)
                ));
            }
        };
        self.record_image(&report);
        let image = self.store().and_then(|store| {
            let id = report.image_id.parse().map_err(|e| format!("{e:?}"))?;
            let path = store.find(id).map_err(|e| e.to_string())?;
            Ok((store, path))
        });
        let (store, image) = match image {
            Ok((store, Some(path))) => (store, path),
            Ok((_, None)) | Err(_) => {
                resume(control).await;
                return failed(format!("its image {} is not in the store", report.image_id));
            }
        };
        let pushed = match send(store, image).await {
            Ok((_, pushed, _)) => pushed,
            Err(e) => {
                resume(control).await;
                return failed(format!("cannot send its image to host {to}: {e}"));
            }
        };
        self.metrics
            .record_replication(&name, pushed.bytes, started.elapsed());
        // The guest ends here before anyone else may run it.
        self.pending_restore = None;
        self.cancel_requests("the VM moves to another host");
        let pid = self.end_processes().await;
        if let Err(e) = member.hand_off(&name, token, &to).await {
            // Still the owner (or fenced meanwhile, which handles the rest):
            // the guest goes on here from the image it was paused at.
            tracing::error!(error = %e, "cannot hand the VM off");
            self.set_state(
                VmState::Restoring(RestoreTarget::Consistency),
                |ev| ev.with_detail(format!("the hand-off to host {to} failed: {e}")),
                "move-failed",
            );
            self.do_restore(RestoreTarget::Consistency, Instant::now(), "move-failed")
                .await;
            return Err(ActionError::Failed(format!(
                "cannot hand VM {name} to host {to}: {e}; it was restored here"
            )));
        }
        self.token = None;
        self.token_lease = None;
        {
            let mut view = lock(&self.view);
            view.token = None;
            view.host = Some(to.clone());
            view.pid = None;
        }
        self.reown = true;
        let detail = format!(
            "moved to host {to} by the operator: VMM {} ended after image {} (paused {} ms \
             before the hand-off, {} bytes sent meanwhile)",
            pid.map_or_else(|| "-".to_string(), |p| p.to_string()),
            report.image_id,
            paused.elapsed().as_millis(),
            pushed.bytes
        );
        self.set_state(VmState::Elsewhere, |e| e.with_detail(detail), "moved");
        // Answered once `to` owns it (it takes it at once).
        let bound = member.config().failover_grace + member.config().lease_ttl;
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Ok(Some((owner, _))) = member.owner(&name).await {
                if owner.host == to {
                    return Ok(format!(
                        "VM {name} moved to host {to} in {} ms, its guest paused from {} ms \
                         (image {})",
                        started.elapsed().as_millis(),
                        paused.duration_since(started).as_millis(),
                        report.image_id
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(ActionError::Failed(format!(
            "VM {name} was handed to host {to}, which has not taken it within {bound:?}: \
             the other hosts take it after that"
        )))
    }

    /// Runs the VM after this host took it: after its own fence (its images
    /// here are the latest) from the latest consistency image; from another
    /// host, from the boot image (that host's consistency images are not
    /// replicated here yet).
    async fn take_over(&mut self, from: Option<String>) {
        let now = Instant::now();
        match from {
            None => {
                self.set_state(
                    VmState::Restoring(RestoreTarget::Consistency),
                    |e| e.with_detail("this host owns the VM again".to_string()),
                    "taken-over",
                );
                self.do_restore(RestoreTarget::Consistency, now, "taken-over")
                    .await;
            }
            Some(host) => match self.replicated_image_or_pull().await {
                (Some(file), pulled)
                    if self.handed_here || self.recent_restore_elsewhere().await.is_none() =>
                {
                    let pulled = pulled.map(|p| format!(" ({p})")).unwrap_or_default();
                    // A move is not a failure: the window does not apply.
                    let how = if std::mem::take(&mut self.handed_here) {
                        format!("handed over by host {host} (an operator's move)")
                    } else {
                        format!("taken over from host {host}")
                    };
                    self.set_state(
                        VmState::Restoring(RestoreTarget::Consistency),
                        |e| {
                            e.with_detail(format!(
                                "{how}: from the replicated consistency image {file}{pulled}"
                            ))
                        },
                        "taken-over",
                    );
                    self.do_restore(RestoreTarget::Consistency, now, "taken-over")
                        .await;
                }
                (held, pulled) => {
                    let why = match (held, self.recent_restore_elsewhere().await) {
                        (Some(_), Some(recent)) => format!(
                            "it was restored from a consistency image on host {} {} ms ago, \
                             within its failure_window: a second failure goes to the boot image",
                            recent.host,
                            unix_ms().saturating_sub(recent.unix_ms)
                        ),
                        _ => match pulled {
                            Some(failed) => {
                                format!("no replicated consistency image here: {failed}")
                            }
                            None => "no replicated consistency image here".to_string(),
                        },
                    };
                    self.set_state(
                        VmState::Restoring(RestoreTarget::Boot),
                        |e| {
                            e.with_detail(format!(
                                "taken over from host {host}; {why}: from the boot image"
                            ))
                        },
                        "taken-over",
                    );
                    self.do_restore(RestoreTarget::Boot, now, "taken-over")
                        .await;
                }
            },
        }
        self.handed_here = false;
        self.persist();
    }
}

fn started_from(boot_image: Option<&str>) -> String {
    match boot_image {
        Some(id) => format!("started from the boot image {id}"),
        None => "booted".to_string(),
    }
}

fn path_kind(standby: bool) -> RestorePath {
    if standby {
        RestorePath::Standby
    } else {
        RestorePath::Cold
    }
}

/// The failure a VMM's end is: its exit record's reason, or a killed VMM
/// when it left none.
fn failure_reason(record: Option<&ExitRecord>) -> FailureReason {
    match record.map(|r| r.reason) {
        Some(ExitReason::Exit) => FailureReason::PowerOff,
        Some(ExitReason::Reset) => FailureReason::Reset,
        Some(ExitReason::Panic) => FailureReason::Panic,
        Some(ExitReason::TripleFault) => FailureReason::TripleFault,
        Some(ExitReason::KvmError | ExitReason::VcpuStuck) => FailureReason::KvmError,
        Some(ExitReason::Seccomp) => FailureReason::Seccomp,
        Some(ExitReason::AppExit) => FailureReason::AppExit,
        Some(ExitReason::Fenced) => FailureReason::Fenced,
        // Shut down by someone else than this supervisor.
        Some(ExitReason::Shutdown) | None => FailureReason::VmmKilled,
    }
}

/// Lets a VMM that sent its exit record end by itself, killing it if it
/// has not within [`EXIT_AFTER_RECORD`], and reaps it.
async fn reap_after_record(mut vmm: VmmProcess) {
    if tokio::time::timeout(EXIT_AFTER_RECORD, vmm.exited())
        .await
        .is_err()
    {
        vmm.kill();
        vmm.exited().await;
    }
}

/// A restore that waits for the restart backoff.
struct PendingRestore {
    at: Instant,
    target: RestoreTarget,
    detected: Instant,
    reason: &'static str,
}

fn with_image(event: Event, image: Option<String>) -> Event {
    match image {
        Some(id) => event.with_image_id(id),
        None => event,
    }
}

fn image_id_of(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    stem.rsplit('-').next().map(str::to_string)
}

/// The seq of the last heartbeat the VMM had seen when it captured `image`.
fn captured_heartbeat_seq(image: &Path) -> Option<u64> {
    use relive_images::format::{ImageReader, SectionKind};
    let reader = ImageReader::open(image).ok()?;
    let app: AppStatus = serde_json::from_slice(reader.section(SectionKind::AppStatus)?).ok()?;
    Heartbeat::parse(app.last_heartbeat.as_deref()?).map(|hb| hb.seq)
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Count and bytes on disk of the images in `dir`.
fn dir_usage(dir: &Path) -> (usize, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "rimg"))
        .filter_map(|e| e.metadata().ok())
        .fold((0, 0), |(n, b), m| (n + 1, b + m.blocks() * 512))
}
