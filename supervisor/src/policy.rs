//! The failover policy: what to do when a VM fails, and when to checkpoint.
//!
//! Everything here is pure: no tokio, no I/O, no clock. The supervisor's
//! per-VM task passes the current time in as an [`Instant`], so tests drive a
//! policy through any timeline deterministically.
//!
//! # States
//!
//! A VM is in one [`VmState`] at a time:
//!
//! ```text
//!            start                 failure (policy: restore)
//! Starting ─────────▶ Running ─────────────────────────────▶ Restoring{consistency|boot|image}
//!                     ▲  │  ▲                                   │
//!                     │  │  └───────────── restored ────────────┘
//!      operator start │  │ failure (policy: give up)
//!                     │  ▼
//!                    Failed          Paused ⇄ Running (operator pause/resume)
//!                                    Stopped (operator stop; `relive start` leaves it)
//! ```
//!
//! # Failover
//!
//! [`FailoverPolicy::on_failure`] is called for every failure the supervisor
//! detects ([`FailureReason`]: the VMM process died, the guest panicked,
//! triple-faulted, reset or powered off, its heartbeats stopped, its control
//! socket went away, or a restore did not come up). It records the failure
//! with its time and decides, in this order:
//!
//! 1. **Forget old failures.** A failure counts while it is younger than
//!    `failure_window`; one exactly `failure_window` old or older is forgotten.
//! 2. **Give up** when more than `max_failures` failures are counted: the VM
//!    goes to `Failed` and is not restarted again until an operator runs
//!    `relive start VM` ([`FailoverPolicy::on_operator_start`], which clears the
//!    failure history). Further failures reported while failed give up again.
//! 3. **Boot image** when the previous restore brought back saved state (a
//!    consistency image, or a specific image an operator picked) less than
//!    `failure_window` ago: that state is suspect, so start clean.
//! 4. **Boot image** too while the consistency images are *suspect*: after a
//!    fallback to the boot image, every consistency image on disk comes from
//!    the state that kept failing. They stay suspect until a new consistency
//!    image is taken ([`FailoverPolicy::on_checkpoint`]), which only happens once
//!    the VM has run healthy past `ready_grace` since the boot.
//! 5. Otherwise restore the latest good **consistency image**.
//!
//! Every restore waits `restart_backoff` first ([`Decision::Restore`]'s
//! `after`). The supervisor reports each completed restore, automatic or
//! forced, with [`FailoverPolicy::on_restored`]. A failover an operator forces
//! (`relive failover VM --to ...`) is a restore but not a failure: it does not
//! count towards `max_failures`, though a failure soon after it is treated like
//! one soon after any restore.
//!
//! # Health and checkpoints
//!
//! A VM counts as healthy once it has been running for `ready_grace` since its
//! last start or restore ([`FailoverPolicy::is_healthy`], like vSphere HA's
//! minimum uptime). Periodic consistency checkpoints are taken only while the
//! VM is `Running` *and* healthy, every `checkpoint_interval` (0 disables them):
//! never while it is starting, restoring, paused, stopped or failed, so a
//! failing VM never overwrites its last good image with its failing state
//! ([`FailoverPolicy::next_checkpoint_at`], [`FailoverPolicy::should_checkpoint`]).
//! A guest is hung once its last heartbeat is `heartbeat_timeout` old
//! ([`FailoverPolicy::is_hung`]).
//!
//! # Timeline
//!
//! With `checkpoint_interval: 5s`, `ready_grace: 10s`, `failure_window: 60s`,
//! `max_failures: 3`, `restart_backoff: 0s` (times in seconds since
//! `relive up`; this exact timeline is the test `documented_timeline`):
//!
//! | t | what happens | failures counted | decision |
//! | ---: | --- | ---: | --- |
//! | 0 | booted | | |
//! | 10 | healthy; checkpoints at 10, 15, ..., 95 | | |
//! | 97 | VMM process killed | 1 | restore the consistency image of t=95 |
//! | 107 | healthy again; checkpoints at 107, 112, 117 | | |
//! | 120 | guest panic | 2 | boot image: the consistency restore was 23 s ago |
//! | 125 | heartbeat timeout | 3 | boot image: no checkpoint since the boot, the consistency images are suspect |
//! | 128 | guest panic | 4 | give up: `Failed`, no more restarts |
//! | 300 | operator: `relive start` | 0 | (history cleared) start from the boot image |
//! | 310 | healthy; checkpoints at 310, ..., 395 | | |
//! | 400 | VMM process killed | 1 | restore the consistency image of t=395 |

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::format_duration;

/// Shortest `checkpoint_interval` other than 0 (disabled): each checkpoint
/// pauses the VM while its state is captured.
pub const MIN_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// A VM's failover policy, fully resolved (fleet defaults merged with the VM's
/// own overrides). The meaning of each knob is in the [module docs](self) and
/// in `configs/fleet.example.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// How often to take a consistency image while the VM is healthy; zero
    /// disables periodic checkpoints.
    pub checkpoint_interval: Duration,
    /// A guest whose last heartbeat is this old is hung.
    pub heartbeat_timeout: Duration,
    /// Minimum uptime after a start or restore before the VM counts as healthy.
    pub ready_grace: Duration,
    /// How long failures are remembered, and how soon after a consistency
    /// restore a failure sends the VM to its boot image.
    pub failure_window: Duration,
    /// More failures than this within `failure_window`: the VM is `Failed`.
    pub max_failures: u32,
    /// Delay before each automatic restore.
    pub restart_backoff: Duration,
    /// Boot images are snapshots taken when the freshly booted guest first
    /// reported ready (fast, clean) rather than a recipe that boots again.
    pub warm_boot_image: bool,
    /// Keep a standby VMM ready to take an image, for the fastest failover.
    pub standby: bool,
    /// Consistency images kept per VM.
    pub keep_images: usize,
    /// A VMM that does not answer a control request (status, checkpoint,
    /// pause) within this long has failed (`control-timeout`).
    pub control_timeout: Duration,
    /// A standby that has not taken the image within this long is abandoned
    /// (killed) and the restore goes cold.
    pub standby_timeout: Duration,
}

impl Default for Policy {
    /// The built-in defaults, used for every knob neither the fleet's
    /// `defaults:` nor the VM's `policy:` sets.
    fn default() -> Self {
        Policy {
            checkpoint_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(2),
            ready_grace: Duration::from_secs(10),
            failure_window: Duration::from_secs(60),
            max_failures: 3,
            restart_backoff: Duration::ZERO,
            warm_boot_image: true,
            standby: false,
            keep_images: 3,
            control_timeout: Duration::from_secs(5),
            standby_timeout: Duration::from_secs(1),
        }
    }
}

/// Why a policy cannot work, found by [`Policy::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    /// The policy keys involved, the one to point at first.
    pub keys: &'static [&'static str],
    /// What is wrong and what to do, as one sentence.
    pub message: String,
}

impl Policy {
    /// Checks the rules every policy must follow:
    ///
    /// - `heartbeat_timeout` > 0 (a hang would never be detected);
    /// - `failure_window` > 0 and `failure_window` >= `ready_grace` (a VM that
    ///   fails before it even counts as healthy has failed soon after its
    ///   restore);
    /// - `max_failures` >= 1 (with 0 the first failure would mark the VM failed
    ///   instead of restoring it);
    /// - `max_failures` × `restart_backoff` < `failure_window` (otherwise the
    ///   back-off alone spaces failures too far apart ever to reach
    ///   `max_failures`, and a crash-looping VM is restarted forever);
    /// - `keep_images` >= 1;
    /// - `checkpoint_interval` is 0 (disabled) or at least
    ///   [`MIN_CHECKPOINT_INTERVAL`];
    /// - `control_timeout` and `standby_timeout` > 0.
    pub fn check(&self) -> Result<(), PolicyProblem> {
        let d = format_duration;
        let timeouts: [(&'static [&'static str], Duration, &str); 2] = [
            (&["control_timeout"], self.control_timeout, "5s"),
            (&["standby_timeout"], self.standby_timeout, "1s"),
        ];
        for (keys, value, example) in timeouts {
            if value.is_zero() {
                return Err(PolicyProblem {
                    keys,
                    message: format!(
                        "{} must be more than 0s, or no VMM could ever answer in time: use \
                         e.g. {example}",
                        keys[0]
                    ),
                });
            }
        }
        if self.heartbeat_timeout.is_zero() {
            return Err(PolicyProblem {
                keys: &["heartbeat_timeout"],
                message: "heartbeat_timeout must be more than 0s, or a hung guest is never \
                          detected: use e.g. 2s"
                    .into(),
            });
        }
        if self.failure_window.is_zero() {
            return Err(PolicyProblem {
                keys: &["failure_window"],
                message: "failure_window must be more than 0s, or failures are forgotten at \
                          once and a crash-looping VM is restarted forever: use e.g. 60s"
                    .into(),
            });
        }
        if self.failure_window < self.ready_grace {
            return Err(PolicyProblem {
                keys: &["failure_window", "ready_grace"],
                message: format!(
                    "failure_window ({}) is shorter than ready_grace ({}): a VM that fails \
                     before it even counts as healthy must count as failing soon after its \
                     restore; make failure_window at least as long as ready_grace",
                    d(self.failure_window),
                    d(self.ready_grace)
                ),
            });
        }
        if self.max_failures == 0 {
            return Err(PolicyProblem {
                keys: &["max_failures"],
                message: "max_failures must be at least 1: with 0 the first failure would mark \
                          the VM failed instead of restoring it"
                    .into(),
            });
        }
        let spacing = self.restart_backoff.saturating_mul(self.max_failures);
        if spacing >= self.failure_window {
            return Err(PolicyProblem {
                keys: &["failure_window", "restart_backoff", "max_failures"],
                message: format!(
                    "failure_window ({}) is not longer than max_failures × restart_backoff \
                     ({} × {} = {}): the back-off alone spaces failures too far apart to ever \
                     reach max_failures, so a crash-looping VM would be restarted forever; \
                     lengthen failure_window or shorten restart_backoff",
                    d(self.failure_window),
                    self.max_failures,
                    d(self.restart_backoff),
                    d(spacing)
                ),
            });
        }
        if self.keep_images == 0 {
            return Err(PolicyProblem {
                keys: &["keep_images"],
                message: "keep_images must be at least 1: failover restores the latest \
                          consistency image"
                    .into(),
            });
        }
        if !self.checkpoint_interval.is_zero() && self.checkpoint_interval < MIN_CHECKPOINT_INTERVAL
        {
            return Err(PolicyProblem {
                keys: &["checkpoint_interval"],
                message: format!(
                    "checkpoint_interval {} is too short: each checkpoint pauses the VM; use \
                     at least {}, or 0s to disable periodic checkpoints",
                    d(self.checkpoint_interval),
                    d(MIN_CHECKPOINT_INTERVAL)
                ),
            });
        }
        Ok(())
    }
}

/// What a restore brings back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RestoreTarget {
    /// The latest good consistency image (recent state).
    Consistency,
    /// The boot image (a clean start; warm when `warm_boot_image`).
    Boot,
    /// A specific image, by id, as an operator asked.
    Image(String),
}

impl RestoreTarget {
    /// The target's kind as a bounded label (`consistency`, `boot`, `image`).
    pub const fn kind(&self) -> &'static str {
        match self {
            RestoreTarget::Consistency => "consistency",
            RestoreTarget::Boot => "boot",
            RestoreTarget::Image(_) => "image",
        }
    }

    /// Whether this restore brings back saved state rather than a clean start.
    pub const fn restores_state(&self) -> bool {
        !matches!(self, RestoreTarget::Boot)
    }
}

impl fmt::Display for RestoreTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreTarget::Image(id) => write!(f, "image {id}"),
            other => f.write_str(other.kind()),
        }
    }
}

/// Where a VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Its VMM is being started (a boot, or a restore at `relive start`).
    Starting,
    /// The guest runs.
    Running,
    /// Coming back from a failure or a forced failover.
    Restoring(RestoreTarget),
    /// Paused by an operator.
    Paused,
    /// Stopped by an operator.
    Stopped,
    /// Given up after too many failures; waits for `relive start`.
    Failed,
    /// Cluster mode: another host owns the VM; this host waits to take it
    /// over if that host is lost.
    Elsewhere,
    /// Cluster mode: this host could not renew its session lease in time
    /// and fenced itself: the VM's VMM is killed here, and the VM waits
    /// until the host has joined again and owns it.
    Fenced,
}

impl VmState {
    /// Every state's label, for metrics that export one series per state.
    pub const LABELS: [&'static str; 10] = [
        "starting",
        "running",
        "restoring-consistency",
        "restoring-boot",
        "restoring-image",
        "paused",
        "stopped",
        "failed",
        "elsewhere",
        "fenced",
    ];

    /// The state as a bounded label (one of [`VmState::LABELS`]).
    pub const fn as_str(&self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Restoring(RestoreTarget::Consistency) => "restoring-consistency",
            VmState::Restoring(RestoreTarget::Boot) => "restoring-boot",
            VmState::Restoring(RestoreTarget::Image(_)) => "restoring-image",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
            VmState::Elsewhere => "elsewhere",
            VmState::Fenced => "fenced",
        }
    }

    /// Whether the guest is up (running, or paused with its state in memory).
    pub const fn is_up(&self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a VM failed. Every variant is a bounded label ([`FailureReason::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The VMM process was killed by a signal or ended without its exit line.
    VmmKilled,
    /// The VMM process exited with an error of its own (status 1).
    VmmError,
    /// The guest panicked (pvpanic).
    Panic,
    /// The guest triple-faulted.
    TripleFault,
    /// The guest asked for a reset.
    Reset,
    /// The guest powered off without being asked to.
    PowerOff,
    /// KVM could not run the guest.
    KvmError,
    /// No heartbeat for `heartbeat_timeout`: the guest hangs.
    HeartbeatTimeout,
    /// The VMM's control socket went away while its process still ran.
    ControlLost,
    /// The VMM did not answer a control request within `control_timeout`.
    ControlTimeout,
    /// A start or restore did not bring the VM up.
    StartFailed,
    /// A VMM thread broke its seccomp filter (exit status 15): a guest
    /// escape attempt, or an allow-list that misses a call.
    Seccomp,
    /// A container VM's app ended with a non-zero status or a signal (its
    /// agent said so, then powered the guest off).
    AppExit,
    /// Cluster mode: the VMM's fencing deadline passed before this
    /// supervisor renewed it (exit status 17).
    Fenced,
}

impl FailureReason {
    /// Every reason, for metrics that pre-register one series per reason.
    pub const ALL: [FailureReason; 14] = [
        FailureReason::VmmKilled,
        FailureReason::VmmError,
        FailureReason::Panic,
        FailureReason::TripleFault,
        FailureReason::Reset,
        FailureReason::PowerOff,
        FailureReason::KvmError,
        FailureReason::HeartbeatTimeout,
        FailureReason::ControlLost,
        FailureReason::ControlTimeout,
        FailureReason::StartFailed,
        FailureReason::Seccomp,
        FailureReason::AppExit,
        FailureReason::Fenced,
    ];

    /// The reason's stable name, for events and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            FailureReason::VmmKilled => "vmm-killed",
            FailureReason::VmmError => "vmm-error",
            FailureReason::Panic => "panic",
            FailureReason::TripleFault => "triple-fault",
            FailureReason::Reset => "reset",
            FailureReason::PowerOff => "poweroff",
            FailureReason::KvmError => "kvm-error",
            FailureReason::HeartbeatTimeout => "heartbeat-timeout",
            FailureReason::ControlLost => "control-lost",
            FailureReason::ControlTimeout => "control-timeout",
            FailureReason::StartFailed => "start-failed",
            FailureReason::Seccomp => "seccomp",
            FailureReason::AppExit => "app-exit",
            FailureReason::Fenced => "fenced",
        }
    }

    /// The reason named `name` ([`FailureReason::as_str`]).
    pub fn parse(name: &str) -> Option<FailureReason> {
        FailureReason::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do about a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Restore `target` (only ever [`RestoreTarget::Consistency`] or
    /// [`RestoreTarget::Boot`]) after waiting `after`.
    Restore {
        /// What to restore.
        target: RestoreTarget,
        /// The back-off to wait first (`restart_backoff`).
        after: Duration,
    },
    /// Too many failures: the VM is `Failed` until an operator starts it.
    GiveUp,
}

/// One recorded failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// When it was detected.
    pub at: Instant,
    /// Why.
    pub reason: FailureReason,
}

/// A VM's failure history and the decisions drawn from it (see the
/// [module docs](self)). Owned by the VM's task; every method takes the time.
#[derive(Debug, Clone)]
pub struct FailoverPolicy {
    policy: Policy,
    /// Failures younger than `failure_window` (as of the last `on_failure`),
    /// oldest first.
    failures: VecDeque<Failure>,
    /// The last completed restore.
    last_restore: Option<(Instant, RestoreTarget)>,
    /// The consistency images predate a fallback to the boot image.
    images_suspect: bool,
    /// Gave up; only an operator start clears it.
    failed: bool,
}

/// What a [`FailoverPolicy`] remembers, in a form that outlives the process:
/// times are wall-clock milliseconds since the Unix epoch, because an
/// [`Instant`] means nothing to the next supervisor. The supervisor keeps it
/// in the VM's record ([`crate::record`]), so the policy's rules hold across `relive up`
/// restarts (metrics counters may restart from zero; the policy may not).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyHistory {
    /// Failures still counted, oldest first: (unix ms, reason name).
    pub failures: Vec<(u64, String)>,
    /// The last completed restore: (unix ms, target: `consistency`, `boot`
    /// or `image:<id>`).
    pub last_restore: Option<(u64, String)>,
    /// The consistency images predate a fallback to the boot image.
    pub images_suspect: bool,
    /// The policy gave up on the VM.
    pub failed: bool,
}

fn target_name(target: &RestoreTarget) -> String {
    match target {
        RestoreTarget::Image(id) => format!("image:{id}"),
        other => other.kind().to_string(),
    }
}

fn target_from_name(name: &str) -> Option<RestoreTarget> {
    match name {
        "consistency" => Some(RestoreTarget::Consistency),
        "boot" => Some(RestoreTarget::Boot),
        other => other
            .strip_prefix("image:")
            .map(|id| RestoreTarget::Image(id.to_string())),
    }
}

impl FailoverPolicy {
    /// What this policy remembers at `now`, which is `now_unix_ms` on the
    /// wall clock. Failures already outside `failure_window` are left out.
    pub fn history(&self, now: Instant, now_unix_ms: u64) -> PolicyHistory {
        let unix = |at: Instant| {
            now_unix_ms.saturating_sub(now.saturating_duration_since(at).as_millis() as u64)
        };
        PolicyHistory {
            failures: self
                .recent_failures(now)
                .map(|f| (unix(f.at), f.reason.as_str().to_string()))
                .collect(),
            last_restore: self
                .last_restore
                .as_ref()
                .map(|(at, target)| (unix(*at), target_name(target))),
            images_suspect: self.images_suspect,
            failed: self.failed,
        }
    }

    /// A policy that goes on from `history`, read at `now` (`now_unix_ms` on
    /// the wall clock). A time in the future (the wall clock went back) counts
    /// as now; entries it cannot place or name are dropped.
    pub fn with_history(
        policy: Policy,
        history: &PolicyHistory,
        now: Instant,
        now_unix_ms: u64,
    ) -> Self {
        let at = |unix_ms: u64| {
            now.checked_sub(Duration::from_millis(now_unix_ms.saturating_sub(unix_ms)))
        };
        let mut me = FailoverPolicy::new(policy);
        me.failures = history
            .failures
            .iter()
            .filter_map(|(ms, reason)| {
                Some(Failure {
                    at: at(*ms)?,
                    reason: FailureReason::parse(reason)?,
                })
            })
            .collect();
        me.last_restore = history
            .last_restore
            .as_ref()
            .and_then(|(ms, target)| Some((at(*ms)?, target_from_name(target)?)));
        me.images_suspect = history.images_suspect;
        me.failed = history.failed;
        me
    }

    /// A policy with no history.
    pub fn new(policy: Policy) -> Self {
        FailoverPolicy {
            policy,
            failures: VecDeque::new(),
            last_restore: None,
            images_suspect: false,
            failed: false,
        }
    }

    /// The knobs this policy applies.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Records a failure detected at `now` and decides what to do.
    pub fn on_failure(&mut self, now: Instant, reason: FailureReason) -> Decision {
        if self.failed {
            return Decision::GiveUp;
        }
        self.failures.push_back(Failure { at: now, reason });
        let window = self.policy.failure_window;
        self.failures
            .retain(|f| now.saturating_duration_since(f.at) < window);
        if self.failures.len() > self.policy.max_failures as usize {
            self.failed = true;
            return Decision::GiveUp;
        }
        let recent_state_restore = matches!(
            &self.last_restore,
            Some((at, target)) if target.restores_state()
                && now.saturating_duration_since(*at) < window
        );
        let target = if recent_state_restore || self.images_suspect {
            RestoreTarget::Boot
        } else {
            RestoreTarget::Consistency
        };
        Decision::Restore {
            target,
            after: self.policy.restart_backoff,
        }
    }

    /// Records a completed restore (automatic or forced by an operator) of
    /// `target` at `now`. Restoring the boot image because saved state failed
    /// soon after its restore marks the consistency images suspect.
    pub fn on_restored(&mut self, now: Instant, target: RestoreTarget) {
        if target == RestoreTarget::Boot
            && matches!(&self.last_restore, Some((at, t)) if t.restores_state()
                && now.saturating_duration_since(*at) < self.policy.failure_window)
        {
            self.images_suspect = true;
        }
        self.last_restore = Some((now, target));
    }

    /// Records a new consistency image: the images are trustworthy again.
    pub fn on_checkpoint(&mut self, _now: Instant) {
        self.images_suspect = false;
    }

    /// An operator started the VM (`relive start VM`): forgets the failures
    /// and the last restore, and leaves `Failed`. Whether the consistency images
    /// are suspect is a fact about the images and stays
    /// ([`FailoverPolicy::preferred_target`]).
    pub fn on_operator_start(&mut self) {
        self.failures.clear();
        self.last_restore = None;
        self.failed = false;
    }

    /// What a (re)start should bring back when nothing else says: the boot
    /// image while the consistency images are suspect, else the latest
    /// consistency image.
    pub fn preferred_target(&self) -> RestoreTarget {
        if self.images_suspect {
            RestoreTarget::Boot
        } else {
            RestoreTarget::Consistency
        }
    }

    /// Whether the policy gave up on this VM.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Whether the consistency images predate a fallback to the boot image.
    pub fn images_suspect(&self) -> bool {
        self.images_suspect
    }

    /// Failures still counted at `now` (younger than `failure_window`),
    /// oldest first.
    pub fn recent_failures(&self, now: Instant) -> impl Iterator<Item = &Failure> + '_ {
        let window = self.policy.failure_window;
        self.failures
            .iter()
            .filter(move |f| now.saturating_duration_since(f.at) < window)
    }

    /// The last completed restore, if any since the last operator start.
    pub fn last_restore(&self) -> Option<(Instant, &RestoreTarget)> {
        self.last_restore.as_ref().map(|(at, t)| (*at, t))
    }

    /// Whether a VM running since `running_since` (its last start or restore)
    /// is past `ready_grace` at `now`.
    pub fn is_healthy(&self, now: Instant, running_since: Instant) -> bool {
        now.saturating_duration_since(running_since) >= self.policy.ready_grace
    }

    /// Whether a guest whose last heartbeat (or, before the first one, its
    /// start) was at `last_heartbeat` is hung at `now`.
    pub fn is_hung(&self, now: Instant, last_heartbeat: Instant) -> bool {
        now.saturating_duration_since(last_heartbeat) >= self.policy.heartbeat_timeout
    }

    /// When the next periodic checkpoint is due: `None` unless the VM is
    /// `Running` and periodic checkpoints are enabled; otherwise the later of
    /// the end of `ready_grace` after `running_since` and `checkpoint_interval`
    /// after the last checkpoint.
    pub fn next_checkpoint_at(
        &self,
        state: &VmState,
        running_since: Instant,
        last_checkpoint: Option<Instant>,
    ) -> Option<Instant> {
        if *state != VmState::Running || self.policy.checkpoint_interval.is_zero() {
            return None;
        }
        let healthy_at = running_since.checked_add(self.policy.ready_grace)?;
        match last_checkpoint {
            None => Some(healthy_at),
            Some(last) => {
                let interval_at = last.checked_add(self.policy.checkpoint_interval)?;
                Some(healthy_at.max(interval_at))
            }
        }
    }

    /// Whether a periodic checkpoint is due at `now`: only while `Running` and
    /// healthy, never while starting, restoring, paused, stopped or failed.
    pub fn should_checkpoint(
        &self,
        state: &VmState,
        now: Instant,
        running_since: Instant,
        last_checkpoint: Option<Instant>,
    ) -> bool {
        self.next_checkpoint_at(state, running_since, last_checkpoint)
            .is_some_and(|due| now >= due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// The policy of the documented timeline.
    fn documented() -> Policy {
        Policy {
            checkpoint_interval: secs(5),
            ready_grace: secs(10),
            failure_window: secs(60),
            max_failures: 3,
            restart_backoff: Duration::ZERO,
            ..Policy::default()
        }
    }

    fn restore(target: RestoreTarget, after: Duration) -> Decision {
        Decision::Restore { target, after }
    }

    /// Runs the VM from `from` to `to` (exclusive) taking every checkpoint the
    /// policy asks for, and returns their times in seconds.
    fn run_checkpoints(
        p: &mut FailoverPolicy,
        t0: Instant,
        running_since: u64,
        last: &mut Option<Instant>,
        from: u64,
        to: u64,
    ) -> Vec<u64> {
        let mut taken = Vec::new();
        for s in from..to {
            let now = t0 + secs(s);
            if p.should_checkpoint(&VmState::Running, now, t0 + secs(running_since), *last) {
                p.on_checkpoint(now);
                *last = Some(now);
                taken.push(s);
            }
        }
        taken
    }

    /// A supervisor restart must not reset the policy: the history it saved
    /// (wall-clock times) is read back against another process's clock, and
    /// a failure 8 s after a consistency restore still goes to the boot image.
    #[test]
    fn history_survives_a_supervisor_restart() {
        let p = documented();
        let t0 = Instant::now();
        let u0: u64 = 1_796_000_000_000;
        let ms = |d: u64| Duration::from_millis(d);
        let mut before = FailoverPolicy::new(p.clone());
        assert_eq!(
            before.on_failure(t0, FailureReason::VmmKilled),
            restore(RestoreTarget::Consistency, Duration::ZERO)
        );
        before.on_restored(t0 + ms(1000), RestoreTarget::Consistency);
        let saved = before.history(t0 + ms(2000), u0 + 2000);
        let json = serde_json::to_string(&saved).unwrap();
        let saved: PolicyHistory = serde_json::from_str(&json).unwrap();

        // The next supervisor's monotonic clock has nothing to do with ours.
        let t1 = t0 + secs(3600);
        let now_unix = u0 + 9000;
        let fresh = FailoverPolicy::new(p.clone()).on_failure(t1, FailureReason::Panic);
        assert_eq!(fresh, restore(RestoreTarget::Consistency, Duration::ZERO));
        let mut after = FailoverPolicy::with_history(p.clone(), &saved, t1, now_unix);
        assert_eq!(after.recent_failures(t1).count(), 1);
        assert_eq!(
            after.last_restore(),
            Some((t1 - ms(8000), &RestoreTarget::Consistency))
        );
        assert_eq!(
            after.on_failure(t1, FailureReason::Panic),
            restore(RestoreTarget::Boot, Duration::ZERO),
            "8 s after a consistency restore, within failure_window"
        );

        // Given up stays given up; a wall clock that went back counts as now.
        let mut failed = after.clone();
        for n in 0..3 {
            failed.on_failure(t1 + ms(n), FailureReason::Panic);
        }
        assert!(failed.is_failed());
        let saved = failed.history(t1 + ms(10), now_unix + 10);
        let reread = FailoverPolicy::with_history(p, &saved, t1, now_unix - 60_000);
        assert!(reread.is_failed());
        assert_eq!(reread.recent_failures(t1).count(), saved.failures.len());
    }

    #[test]
    fn documented_timeline() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + secs(s);
        let mut p = FailoverPolicy::new(documented());
        let mut last = None;

        let taken = run_checkpoints(&mut p, t0, 0, &mut last, 0, 97);
        assert_eq!(taken, (10..=95).step_by(5).collect::<Vec<_>>());

        let d = p.on_failure(at(97), FailureReason::VmmKilled);
        assert_eq!(d, restore(RestoreTarget::Consistency, Duration::ZERO));
        p.on_restored(at(97), RestoreTarget::Consistency);

        let taken = run_checkpoints(&mut p, t0, 97, &mut last, 97, 120);
        assert_eq!(taken, vec![107, 112, 117]);

        let d = p.on_failure(at(120), FailureReason::Panic);
        assert_eq!(d, restore(RestoreTarget::Boot, Duration::ZERO));
        p.on_restored(at(120), RestoreTarget::Boot);
        assert!(p.images_suspect());
        assert!(run_checkpoints(&mut p, t0, 120, &mut last, 120, 125).is_empty());

        let d = p.on_failure(at(125), FailureReason::HeartbeatTimeout);
        assert_eq!(d, restore(RestoreTarget::Boot, Duration::ZERO));
        p.on_restored(at(125), RestoreTarget::Boot);
        assert!(run_checkpoints(&mut p, t0, 125, &mut last, 125, 128).is_empty());

        assert_eq!(
            p.on_failure(at(128), FailureReason::Panic),
            Decision::GiveUp
        );
        assert!(p.is_failed());
        assert_eq!(p.recent_failures(at(128)).count(), 4);
        // Still failed, whatever happens, until an operator acts.
        assert_eq!(
            p.on_failure(at(200), FailureReason::Panic),
            Decision::GiveUp
        );

        p.on_operator_start();
        assert!(!p.is_failed());
        assert_eq!(p.recent_failures(at(300)).count(), 0);
        assert_eq!(p.preferred_target(), RestoreTarget::Boot);
        p.on_restored(at(300), RestoreTarget::Boot);

        let taken = run_checkpoints(&mut p, t0, 300, &mut last, 300, 400);
        assert_eq!(taken, (310..=395).step_by(5).collect::<Vec<_>>());
        assert!(!p.images_suspect());

        let d = p.on_failure(at(400), FailureReason::VmmKilled);
        assert_eq!(d, restore(RestoreTarget::Consistency, Duration::ZERO));
    }

    #[test]
    fn first_failure_restores_the_consistency_image() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        assert_eq!(
            p.on_failure(t0, FailureReason::VmmKilled),
            restore(RestoreTarget::Consistency, Duration::ZERO)
        );
    }

    #[test]
    fn quick_second_failure_goes_to_the_boot_image() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        p.on_failure(t0, FailureReason::Panic);
        p.on_restored(t0 + secs(1), RestoreTarget::Consistency);
        let d = p.on_failure(t0 + secs(30), FailureReason::Panic);
        assert_eq!(d, restore(RestoreTarget::Boot, Duration::ZERO));
    }

    #[test]
    fn failure_just_inside_the_window_goes_to_boot_and_at_its_end_does_not() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        p.on_failure(t0, FailureReason::Panic);
        p.on_restored(t0, RestoreTarget::Consistency);
        let mut q = p.clone();
        let inside = t0 + secs(60) - Duration::from_millis(1);
        assert_eq!(
            p.on_failure(inside, FailureReason::Panic),
            restore(RestoreTarget::Boot, Duration::ZERO)
        );
        assert_eq!(
            q.on_failure(t0 + secs(60), FailureReason::Panic),
            restore(RestoreTarget::Consistency, Duration::ZERO)
        );
        assert_eq!(q.recent_failures(t0 + secs(60)).count(), 1);
    }

    #[test]
    fn consistency_again_after_the_window_passed() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        p.on_failure(t0, FailureReason::VmmKilled);
        p.on_restored(t0 + secs(1), RestoreTarget::Consistency);
        let d = p.on_failure(t0 + secs(62), FailureReason::VmmKilled);
        assert_eq!(d, restore(RestoreTarget::Consistency, Duration::ZERO));
        // The first failure was forgotten.
        assert_eq!(p.recent_failures(t0 + secs(62)).count(), 1);
    }

    #[test]
    fn operator_image_restore_counts_as_saved_state() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        p.on_restored(t0, RestoreTarget::Image("00000000000000000007".into()));
        assert_eq!(
            p.on_failure(t0 + secs(5), FailureReason::Panic),
            restore(RestoreTarget::Boot, Duration::ZERO)
        );
    }

    #[test]
    fn boot_after_boot_until_a_new_checkpoint() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        p.on_failure(t0, FailureReason::Panic);
        p.on_restored(t0, RestoreTarget::Consistency);
        p.on_failure(t0 + secs(5), FailureReason::Panic);
        p.on_restored(t0 + secs(5), RestoreTarget::Boot);
        // Long after the window, but no image was taken since the boot.
        let mut q = p.clone();
        assert_eq!(
            q.on_failure(t0 + secs(500), FailureReason::Panic),
            restore(RestoreTarget::Boot, Duration::ZERO)
        );
        // With a new image, its state is trusted again.
        p.on_checkpoint(t0 + secs(20));
        assert_eq!(
            p.on_failure(t0 + secs(30), FailureReason::Panic),
            restore(RestoreTarget::Consistency, Duration::ZERO)
        );
    }

    #[test]
    fn boot_restore_without_a_recent_state_restore_is_not_a_fallback() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        // An operator forces a boot restore: the images are not suspect.
        p.on_restored(t0, RestoreTarget::Boot);
        assert!(!p.images_suspect());
        assert_eq!(
            p.on_failure(t0 + secs(5), FailureReason::Panic),
            restore(RestoreTarget::Consistency, Duration::ZERO)
        );
    }

    #[test]
    fn failed_after_max_failures_plus_one_within_the_window() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        for s in 0..3 {
            let d = p.on_failure(t0 + secs(s * 10), FailureReason::Panic);
            assert!(matches!(d, Decision::Restore { .. }), "failure {s}: {d:?}");
            p.on_restored(t0 + secs(s * 10), RestoreTarget::Consistency);
        }
        assert!(!p.is_failed());
        assert_eq!(
            p.on_failure(t0 + secs(30), FailureReason::Panic),
            Decision::GiveUp
        );
        assert!(p.is_failed());
    }

    #[test]
    fn failures_spread_wider_than_the_window_never_give_up() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        for s in 0..20 {
            let now = t0 + secs(s * 21);
            assert!(matches!(
                p.on_failure(now, FailureReason::HeartbeatTimeout),
                Decision::Restore { .. }
            ));
            p.on_restored(now, RestoreTarget::Consistency);
            assert!(p.recent_failures(now).count() <= 3);
        }
    }

    #[test]
    fn operator_start_resets_the_history() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        for s in 0..4 {
            p.on_failure(t0 + secs(s), FailureReason::Panic);
        }
        assert!(p.is_failed());
        p.on_operator_start();
        assert!(!p.is_failed());
        assert!(p.last_restore().is_none());
        // Three more failures are allowed again, the first restoring state.
        assert_eq!(
            p.on_failure(t0 + secs(5), FailureReason::Panic),
            restore(RestoreTarget::Consistency, Duration::ZERO)
        );
        p.on_failure(t0 + secs(6), FailureReason::Panic);
        assert_ne!(
            p.on_failure(t0 + secs(7), FailureReason::Panic),
            Decision::GiveUp
        );
        assert_eq!(
            p.on_failure(t0 + secs(8), FailureReason::Panic),
            Decision::GiveUp
        );
    }

    #[test]
    fn forced_failovers_do_not_count_as_failures() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(documented());
        for s in 0..10 {
            p.on_restored(t0 + secs(s), RestoreTarget::Boot);
        }
        assert_eq!(p.recent_failures(t0 + secs(10)).count(), 0);
        assert!(matches!(
            p.on_failure(t0 + secs(11), FailureReason::Panic),
            Decision::Restore { .. }
        ));
    }

    #[test]
    fn backoff_is_returned() {
        let t0 = Instant::now();
        let mut p = FailoverPolicy::new(Policy {
            restart_backoff: secs(2),
            ..documented()
        });
        assert_eq!(
            p.on_failure(t0, FailureReason::VmmKilled),
            restore(RestoreTarget::Consistency, secs(2))
        );
        p.on_restored(t0 + secs(2), RestoreTarget::Consistency);
        assert_eq!(
            p.on_failure(t0 + secs(3), FailureReason::VmmKilled),
            restore(RestoreTarget::Boot, secs(2))
        );
    }

    #[test]
    fn health_and_hang_follow_their_timeouts() {
        let t0 = Instant::now();
        let p = FailoverPolicy::new(documented());
        assert!(!p.is_healthy(t0 + secs(9), t0));
        assert!(p.is_healthy(t0 + secs(10), t0));
        // A clock reading before the start is not healthy, not a panic.
        assert!(!p.is_healthy(t0, t0 + secs(1)));
        assert!(!p.is_hung(t0 + Duration::from_millis(1999), t0));
        assert!(p.is_hung(t0 + secs(2), t0));
    }

    #[test]
    fn checkpoints_only_while_running_and_healthy() {
        let t0 = Instant::now();
        let p = FailoverPolicy::new(documented());
        let later = t0 + secs(100);
        for state in [
            VmState::Starting,
            VmState::Restoring(RestoreTarget::Consistency),
            VmState::Restoring(RestoreTarget::Boot),
            VmState::Paused,
            VmState::Stopped,
            VmState::Failed,
            VmState::Elsewhere,
            VmState::Fenced,
        ] {
            assert!(!p.should_checkpoint(&state, later, t0, None), "{state}");
            assert_eq!(p.next_checkpoint_at(&state, t0, None), None);
        }
        assert!(!p.should_checkpoint(&VmState::Running, t0 + secs(9), t0, None));
        assert!(p.should_checkpoint(&VmState::Running, t0 + secs(10), t0, None));
        // An image from before a restore does not bring the next one forward.
        let restored = t0 + secs(50);
        let before = Some(t0 + secs(49));
        assert_eq!(
            p.next_checkpoint_at(&VmState::Running, restored, before),
            Some(restored + secs(10))
        );
        let last = Some(t0 + secs(70));
        assert_eq!(
            p.next_checkpoint_at(&VmState::Running, restored, last),
            Some(t0 + secs(75))
        );
    }

    #[test]
    fn zero_interval_disables_checkpoints() {
        let t0 = Instant::now();
        let p = FailoverPolicy::new(Policy {
            checkpoint_interval: Duration::ZERO,
            ..documented()
        });
        assert!(!p.should_checkpoint(&VmState::Running, t0 + secs(1000), t0, None));
    }

    #[test]
    fn default_policy_passes_its_own_rules() {
        assert_eq!(Policy::default().check(), Ok(()));
        assert_eq!(documented().check(), Ok(()));
    }

    #[test]
    fn impossible_policies_are_refused() {
        let bad = |p: Policy, key: &str| {
            let problem = p.check().unwrap_err();
            assert_eq!(problem.keys[0], key, "{problem:?}");
            assert!(problem.message.contains(key), "{problem:?}");
        };
        let ok = Policy::default();
        bad(
            Policy {
                heartbeat_timeout: Duration::ZERO,
                ..ok.clone()
            },
            "heartbeat_timeout",
        );
        bad(
            Policy {
                failure_window: Duration::ZERO,
                ready_grace: Duration::ZERO,
                ..ok.clone()
            },
            "failure_window",
        );
        bad(
            Policy {
                failure_window: secs(5),
                ..ok.clone()
            },
            "failure_window",
        );
        bad(
            Policy {
                max_failures: 0,
                ..ok.clone()
            },
            "max_failures",
        );
        bad(
            Policy {
                restart_backoff: secs(20),
                ..ok.clone()
            },
            "failure_window",
        );
        bad(
            Policy {
                keep_images: 0,
                ..ok.clone()
            },
            "keep_images",
        );
        bad(
            Policy {
                checkpoint_interval: Duration::from_millis(10),
                ..ok.clone()
            },
            "checkpoint_interval",
        );
        // Equal window and grace is fine; so is a back-off just short enough.
        let edge = Policy {
            failure_window: secs(10),
            restart_backoff: Duration::from_millis(3333),
            ..ok
        };
        assert_eq!(edge.check(), Ok(()));
    }

    #[test]
    fn labels_are_bounded_and_distinct() {
        let states = [
            VmState::Starting,
            VmState::Running,
            VmState::Restoring(RestoreTarget::Consistency),
            VmState::Restoring(RestoreTarget::Boot),
            VmState::Restoring(RestoreTarget::Image("x".into())),
            VmState::Paused,
            VmState::Stopped,
            VmState::Failed,
            VmState::Elsewhere,
            VmState::Fenced,
        ];
        let labels: Vec<_> = states.iter().map(VmState::as_str).collect();
        assert_eq!(labels, VmState::LABELS);
        let mut reasons: Vec<_> = FailureReason::ALL.iter().map(|r| r.as_str()).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), FailureReason::ALL.len());
        assert_eq!(RestoreTarget::Image("abc".into()).to_string(), "image abc");
        assert_eq!(RestoreTarget::Boot.to_string(), "boot");
    }
}
