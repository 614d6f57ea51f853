//! The supervisor's Prometheus metrics.
//!
//! [`Metrics`] owns its own [`prometheus::Registry`]: nothing here touches the
//! process-global default registry, so two supervisors (or two tests) in one
//! process never see each other's series. `/metrics` serves [`Metrics::render`]
//! with the content type [`CONTENT_TYPE`] (text format 0.0.4).
//!
//! # Labels are bounded
//!
//! Every label other than `vm` takes its value from a typed kind whose name is
//! a `&'static str`: the policy's [`VmState`] ([`VmState::LABELS`]),
//! [`FailureReason`] and [`RestoreTarget::kind`] (`consistency`, `boot`,
//! `image`: an explicit image's id is never a label), and this module's
//! [`RestorePath`] and [`CheckpointKind`]. A formatted error never becomes a
//! label value, so the number of series is at most (VMs in the fleet) x (the
//! product of those kinds' sizes), and [`Metrics::remove_vm`] can drop every
//! series of a VM by walking the kinds.
//!
//! # Series
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `relive_vm_state` | gauge, 1 for the current state, 0 for the others ([`VmState::LABELS`]) | vm, state |
//! | `relive_vm_up` | gauge, 1 when running and healthy | vm |
//! | `relive_failures_total` | counter | vm, reason |
//! | `relive_app_exits_total` | counter, a container app's ends (`success`: exit 0) | vm, result |
//! | `relive_restores_total` | counter | vm, image, path |
//! | `relive_failover_duration_seconds` | histogram, failure detected -> guest running | vm, image, path |
//! | `relive_restore_duration_seconds` | histogram | vm, path |
//! | `relive_checkpoint_duration_seconds` | histogram | vm, kind |
//! | `relive_checkpoint_pause_seconds` | histogram, time the guest was paused | vm, kind |
//! | `relive_checkpoints_failed_total` | counter | vm |
//! | `relive_image_bytes` | gauge, bytes on disk of the image dir | vm |
//! | `relive_images` | gauge, images in the image dir | vm |
//! | `relive_heartbeat_age_seconds` | gauge | vm |
//! | `relive_vcpu_exits_total` | counter, mirrored from the VMM | vm |
//! | `relive_guest_memory_resident_bytes` | gauge | vm |
//! | `relive_vmm_cpu_seconds_total` | counter, utime + stime of the VMM process | vm |
//! | `relive_vm_paused_seconds_total` | counter, time the guest stood still when asked (not counted against `heartbeat_timeout`) | vm, reason |
//! | `relive_standby_ready` | gauge | vm |
//! | `relive_standby_memory_bytes` | gauge | vm |
//! | `relive_last_checkpoint_timestamp_seconds` | gauge, unix time of the newest consistency image (the supervisor's start until the first) | vm |
//! | `relive_policy_checkpoint_interval_seconds`, `relive_policy_heartbeat_timeout_seconds`, `relive_policy_standby` | gauges, the VM's policy, for alerts to compare with | vm |
//! | `relive_cluster_lease_live` | gauge, cluster mode: 1 while this host holds a live session lease, 0 once it fenced itself | host |
//! | `relive_cluster_fence_deadline_timestamp_seconds` | gauge, cluster mode: unix time at which this host would fence itself without another renewal | host |
//! | `relive_cluster_fences_total` | counter, cluster mode: times this host fenced itself | host |
//! | `relive_replication_lag_seconds` | gauge, cluster mode: the last replicated image, from its checkpoint's report to its manifest in etcd | vm |
//! | `relive_replication_bytes_total` | counter, cluster mode: image bytes sent to peers | vm |
//! | `relive_replication_failures_total` | counter, cluster mode: replications that did not complete | vm |
//! | `relive_build_info` | gauge, 1 | version, commit |
//! | `process_*` | the supervisor's own CPU, memory, file descriptors, start time (the `prometheus` crate's process collector) | - |
//!
//! # Counters mirrored from another process
//!
//! vCPU exits and CPU seconds are cumulative counts kept by each VMM process
//! (or the kernel, for CPU time). They only go up, so by Prometheus conventions
//! they are counters named `_total`, not gauges: `rate()` and `increase()` are
//! the queries one runs on them, and those need counter semantics. A gauge
//! would be wrong twice: `rate()` on a gauge is meaningless, and a gauge that
//! drops to zero when a failover starts a new VMM process would read as a huge
//! negative rate instead of a counter reset.
//!
//! The supervisor samples the VMM's cumulative value and adds the difference
//! since its previous sample to a counter it owns ([`Metrics::observe_vcpu_exits`],
//! [`Metrics::observe_vmm_cpu_seconds`]). The sample is keyed by the VMM's pid:
//! when the pid changes (a failover into a standby or a cold restore started a
//! new process), the new process's whole count is the delta. So the exported
//! counter keeps growing across failovers and counts every exit the supervisor
//! saw, by every VMM that ran the VM; only what a killed VMM did after its last
//! sample is lost. It resets only when the supervisor restarts, which
//! Prometheus handles as any counter reset.
//!
//! # Timers
//!
//! [`Metrics::checkpoint_timer`] and [`Metrics::restore_timer`] return a
//! [`HistogramTimer`] that observes the elapsed time when dropped, so an early
//! return still records; call `stop_and_discard()` on it to record nothing
//! (for example when the operation failed and its time would skew the
//! histogram).
//!
//! # Locking
//!
//! One lock, `state_lock`, is taken by [`Metrics::set_state`] and by
//! [`Metrics::render`] around the gather, so a scrape never sees a VM in two
//! states or in none. `cursors` (the last VMM samples) is a separate lock, never
//! held together with `state_lock`. Neither is held across I/O.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::policy::{FailureReason, Policy, RestoreTarget, VmState};
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramTimer, HistogramVec, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The content type of [`Metrics::render`]'s output (text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Buckets of the failover and restore histograms: 0.5 ms to 10 s, dense
/// between 1 and 15 ms where a standby and a cold restore land.
pub const FAILOVER_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets of the checkpoint duration histogram: 1 ms to 30 s.
pub const CHECKPOINT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of the checkpoint pause histogram: 100 us to 1 s.
pub const PAUSE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Kernel clock ticks per second as seen by user space (`USER_HZ`), the unit
/// of `utime` and `stime` in `/proc/<pid>/stat`. It is 100 on every x86_64
/// Linux regardless of the kernel's internal `HZ` (it is part of the ABI).
pub const USER_HZ: f64 = 100.0;

macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in the order they are documented.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// Every value of [`RestoreTarget::kind`], the `image` label.
pub const IMAGE_KINDS: [&str; 3] = ["consistency", "boot", "image"];

label_enum! {
    /// How a restore ran: the `path` label.
    RestorePath {
        /// Into the hot standby VMM, already started and waiting.
        Standby => "standby",
        /// Into a freshly started VMM.
        Cold => "cold",
    }
}

label_enum! {
    /// What a checkpoint wrote: the `kind` label.
    CheckpointKind {
        /// A whole consistency image.
        Full => "full",
        /// Only the pages dirtied since the previous image.
        Incremental => "incremental",
    }
}

/// The last cumulative samples taken from a VM's VMM, keyed by its pid.
#[derive(Default)]
struct Cursor {
    vcpu_exits: Option<(u32, u64)>,
    cpu_seconds: Option<(u32, f64)>,
}

/// The `result` label values of `relive_app_exits_total`.
const APP_EXIT_RESULTS: [&str; 2] = ["success", "failure"];

/// The supervisor's metrics and the registry that holds them.
pub struct Metrics {
    registry: Registry,
    /// Taken by `set_state` and `render`; see "Locking" in the module docs.
    state_lock: Mutex<()>,
    cursors: Mutex<HashMap<String, Cursor>>,
    vm_state: IntGaugeVec,
    vm_up: IntGaugeVec,
    failures: IntCounterVec,
    app_exits: IntCounterVec,
    restores: IntCounterVec,
    failover_duration: HistogramVec,
    restore_duration: HistogramVec,
    checkpoint_duration: HistogramVec,
    checkpoint_pause: HistogramVec,
    checkpoints_failed: IntCounterVec,
    image_bytes: IntGaugeVec,
    images: IntGaugeVec,
    heartbeat_age: GaugeVec,
    vcpu_exits: IntCounterVec,
    guest_memory_resident: IntGaugeVec,
    vmm_cpu_seconds: CounterVec,
    paused_seconds: CounterVec,
    standby_ready: IntGaugeVec,
    standby_memory: IntGaugeVec,
    last_checkpoint: GaugeVec,
    policy_checkpoint_interval: GaugeVec,
    policy_heartbeat_timeout: GaugeVec,
    policy_standby: IntGaugeVec,
    cluster_lease_live: IntGaugeVec,
    cluster_fence_deadline: GaugeVec,
    cluster_fences: IntCounterVec,
    replication_lag: GaugeVec,
    replication_bytes: IntCounterVec,
    replication_failures: IntCounterVec,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn register<C>(registry: &Registry, collector: C) -> Result<C, prometheus::Error>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

fn int_gauge(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, prometheus::Error> {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

fn int_counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    register(r, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn gauge(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<GaugeVec, prometheus::Error> {
    register(r, GaugeVec::new(Opts::new(name, help), labels)?)
}

/// The relive version and the commit it was built from (`unknown` outside a
/// git checkout; `RELIVE_COMMIT` at build time overrides it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// See [`VERSION`].
pub const COMMIT: &str = env!("RELIVE_COMMIT");

/// `relive_build_info{version, commit} 1`: which relive is running.
fn build_info(r: &Registry) -> Result<(), prometheus::Error> {
    let info = IntGaugeVec::new(
        Opts::new(
            "relive_build_info",
            "1, labelled with the relive version and the commit it was built from.",
        ),
        &["version", "commit"],
    )?;
    info.with_label_values(&[VERSION, COMMIT]).set(1);
    register(r, info).map(drop)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<HistogramVec, prometheus::Error> {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(r, HistogramVec::new(opts, labels)?)
}

/// Converts a byte count to a gauge value, saturating (no VM has 8 EiB).
fn bytes(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves only counters behind:
    // nothing to repair, so keep serving them.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Metrics {
    /// Creates every metric and registers it in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        Ok(Self {
            vm_state: int_gauge(
                &r,
                "relive_vm_state",
                "1 for the VM's current lifecycle state, 0 for the others.",
                &["vm", "state"],
            )?,
            vm_up: int_gauge(
                &r,
                "relive_vm_up",
                "1 when the VM is running and healthy, else 0.",
                &["vm"],
            )?,
            failures: int_counter(
                &r,
                "relive_failures_total",
                "Failures detected, by reason.",
                &["vm", "reason"],
            )?,
            app_exits: int_counter(
                &r,
                "relive_app_exits_total",
                "Ends of a container VM's app: success (exit 0) or failure.",
                &["vm", "result"],
            )?,
            restores: int_counter(
                &r,
                "relive_restores_total",
                "Restores completed, by the image kind used and the restore path.",
                &["vm", "image", "path"],
            )?,
            failover_duration: histogram(
                &r,
                "relive_failover_duration_seconds",
                "Time from failure detected (or failover requested) to the guest running again.",
                &["vm", "image", "path"],
                FAILOVER_BUCKETS,
            )?,
            restore_duration: histogram(
                &r,
                "relive_restore_duration_seconds",
                "Time to restore a VM from an image into a VMM.",
                &["vm", "path"],
                FAILOVER_BUCKETS,
            )?,
            checkpoint_duration: histogram(
                &r,
                "relive_checkpoint_duration_seconds",
                "Time to take a consistency checkpoint, durable on disk.",
                &["vm", "kind"],
                CHECKPOINT_BUCKETS,
            )?,
            checkpoint_pause: histogram(
                &r,
                "relive_checkpoint_pause_seconds",
                "Time the guest was paused for a checkpoint.",
                &["vm", "kind"],
                PAUSE_BUCKETS,
            )?,
            checkpoints_failed: int_counter(
                &r,
                "relive_checkpoints_failed_total",
                "Checkpoints that failed (for example on a full disk).",
                &["vm"],
            )?,
            image_bytes: int_gauge(
                &r,
                "relive_image_bytes",
                "Bytes on disk of the VM's image directory.",
                &["vm"],
            )?,
            images: int_gauge(
                &r,
                "relive_images",
                "Images in the VM's image directory.",
                &["vm"],
            )?,
            heartbeat_age: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "relive_heartbeat_age_seconds",
                        "Seconds since the guest's last heartbeat.",
                    ),
                    &["vm"],
                )?,
            )?,
            vcpu_exits: int_counter(
                &r,
                "relive_vcpu_exits_total",
                "vCPU exits to the VMM, summed over every VMM process that ran the VM.",
                &["vm"],
            )?,
            guest_memory_resident: int_gauge(
                &r,
                "relive_guest_memory_resident_bytes",
                "Bytes of guest memory resident in host RAM.",
                &["vm"],
            )?,
            vmm_cpu_seconds: register(
                &r,
                CounterVec::new(
                    Opts::new(
                        "relive_vmm_cpu_seconds_total",
                        "User and system CPU seconds of the VM's VMM processes.",
                    ),
                    &["vm"],
                )?,
            )?,
            paused_seconds: register(
                &r,
                CounterVec::new(
                    Opts::new(
                        "relive_vm_paused_seconds_total",
                        "Seconds the guest stood still because it was asked to (reason: \
                         checkpoint); not counted against heartbeat_timeout.",
                    ),
                    &["vm", "reason"],
                )?,
            )?,
            standby_ready: int_gauge(
                &r,
                "relive_standby_ready",
                "1 when a hot standby VMM is ready to take over the VM.",
                &["vm"],
            )?,
            standby_memory: int_gauge(
                &r,
                "relive_standby_memory_bytes",
                "Resident bytes of the VM's standby VMM.",
                &["vm"],
            )?,
            last_checkpoint: gauge(
                &r,
                "relive_last_checkpoint_timestamp_seconds",
                "Unix time of the VM's newest consistency image taken under this supervisor \
                 (the supervisor's start until the first).",
                &["vm"],
            )?,
            policy_checkpoint_interval: gauge(
                &r,
                "relive_policy_checkpoint_interval_seconds",
                "The VM's checkpoint_interval (0: no periodic checkpoints).",
                &["vm"],
            )?,
            policy_heartbeat_timeout: gauge(
                &r,
                "relive_policy_heartbeat_timeout_seconds",
                "The VM's heartbeat_timeout.",
                &["vm"],
            )?,
            cluster_lease_live: int_gauge(
                &r,
                "relive_cluster_lease_live",
                "Cluster mode: 1 while this host holds a live session lease, 0 once it fenced itself.",
                &["host"],
            )?,
            cluster_fence_deadline: gauge(
                &r,
                "relive_cluster_fence_deadline_timestamp_seconds",
                "Cluster mode: unix time at which this host fences itself unless its lease is renewed.",
                &["host"],
            )?,
            cluster_fences: int_counter(
                &r,
                "relive_cluster_fences_total",
                "Cluster mode: times this host fenced itself (killed its VMMs: its lease was not renewed in time).",
                &["host"],
            )?,
            replication_lag: gauge(
                &r,
                "relive_replication_lag_seconds",
                "Cluster mode: the last replicated image, from its checkpoint's report to its manifest in etcd.",
                &["vm"],
            )?,
            replication_bytes: int_counter(
                &r,
                "relive_replication_bytes_total",
                "Cluster mode: image bytes sent to peer hosts.",
                &["vm"],
            )?,
            replication_failures: int_counter(
                &r,
                "relive_replication_failures_total",
                "Cluster mode: image replications that did not complete.",
                &["vm"],
            )?,
            policy_standby: int_gauge(
                &r,
                "relive_policy_standby",
                "1 when the VM's policy keeps a standby VMM.",
                &["vm"],
            )?,
            registry: {
                build_info(&r)?;
                #[cfg(target_os = "linux")]
                r.register(Box::new(
                    prometheus::process_collector::ProcessCollector::for_self(),
                ))?;
                r
            },
            state_lock: Mutex::new(()),
            cursors: Mutex::new(HashMap::new()),
        })
    }

    /// Cluster mode: this host's standing; `deadline_unix_s` while live.
    pub fn set_cluster_standing(&self, host: &str, deadline_unix_s: Option<f64>) {
        self.cluster_lease_live
            .with_label_values(&[host])
            .set(i64::from(deadline_unix_s.is_some()));
        if let Some(at) = deadline_unix_s {
            self.cluster_fence_deadline
                .with_label_values(&[host])
                .set(at);
        }
    }

    /// Cluster mode: an image of `vm` replicated (`bytes` sent) in `lag`.
    pub fn record_replication(&self, vm: &str, bytes: u64, lag: Duration) {
        self.replication_lag
            .with_label_values(&[vm])
            .set(lag.as_secs_f64());
        self.replication_bytes
            .with_label_values(&[vm])
            .inc_by(bytes);
    }

    /// Cluster mode: a replication of `vm` failed.
    pub fn record_replication_failure(&self, vm: &str) {
        self.replication_failures.with_label_values(&[vm]).inc();
    }

    /// Cluster mode: this host fenced itself.
    pub fn record_fence(&self, host: &str) {
        self.cluster_fences.with_label_values(&[host]).inc();
        self.set_cluster_standing(host, None);
    }

    /// The registry, to register more collectors in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders every series in the text format 0.0.4 (see [`CONTENT_TYPE`]).
    ///
    /// A metric family the encoder rejects (it only rejects empty or unnamed
    /// families, which `gather` never returns) is left out rather than failing
    /// the whole scrape.
    pub fn render(&self) -> String {
        let families = {
            let _state = lock(&self.state_lock);
            self.registry.gather()
        };
        let encoder = TextEncoder::new();
        let mut out = String::new();
        for family in &families {
            let mut one = String::new();
            if encoder
                .encode_utf8(std::slice::from_ref(family), &mut one)
                .is_ok()
            {
                out.push_str(&one);
            }
        }
        debug_assert_eq!(encoder.format_type(), CONTENT_TYPE);
        out
    }

    /// Creates a VM's series at their zero values, histograms included, so
    /// that dashboards and `rate()` see every failure reason and restore
    /// kind from the start (a series born with its first observation hides
    /// that observation from `rate()` and `increase()`: the first failover
    /// of a VM would never show), and exports the parts of its policy
    /// alerts compare with.
    pub fn add_vm(&self, vm: &str, policy: &Policy) {
        self.policy_checkpoint_interval
            .with_label_values(&[vm])
            .set(policy.checkpoint_interval.as_secs_f64());
        self.policy_heartbeat_timeout
            .with_label_values(&[vm])
            .set(policy.heartbeat_timeout.as_secs_f64());
        self.policy_standby
            .with_label_values(&[vm])
            .set(i64::from(policy.standby));
        self.set_last_checkpoint(vm, std::time::SystemTime::now());
        {
            let _state = lock(&self.state_lock);
            for state in VmState::LABELS {
                self.vm_state.with_label_values(&[vm, state]).set(0);
            }
        }
        self.vm_up.with_label_values(&[vm]).set(0);
        for reason in FailureReason::ALL {
            self.failures.with_label_values(&[vm, reason.as_str()]);
        }
        for result in APP_EXIT_RESULTS {
            self.app_exits.with_label_values(&[vm, result]);
        }
        for image in IMAGE_KINDS {
            for path in RestorePath::ALL {
                self.restores.with_label_values(&[vm, image, path.as_str()]);
                self.failover_duration
                    .with_label_values(&[vm, image, path.as_str()]);
            }
        }
        for path in RestorePath::ALL {
            self.restore_duration
                .with_label_values(&[vm, path.as_str()]);
        }
        for kind in CheckpointKind::ALL {
            self.checkpoint_duration
                .with_label_values(&[vm, kind.as_str()]);
            self.checkpoint_pause
                .with_label_values(&[vm, kind.as_str()]);
        }
        self.checkpoints_failed.with_label_values(&[vm]);
        self.vcpu_exits.with_label_values(&[vm]);
        self.vmm_cpu_seconds.with_label_values(&[vm]);
        self.paused_seconds.with_label_values(&[vm, "checkpoint"]);
        self.standby_ready.with_label_values(&[vm]).set(0);
    }

    /// Sets `relive_vm_state` to 1 for `state` and 0 for every other state,
    /// atomically with respect to [`Metrics::render`].
    pub fn set_state(&self, vm: &str, state: &VmState) {
        let current = state.as_str();
        let _state = lock(&self.state_lock);
        for label in VmState::LABELS {
            self.vm_state
                .with_label_values(&[vm, label])
                .set(i64::from(label == current));
        }
    }

    /// Sets `relive_vm_up`: true when the VM is running and healthy.
    pub fn set_up(&self, vm: &str, up: bool) {
        self.vm_up.with_label_values(&[vm]).set(i64::from(up));
    }

    /// Counts one end of a container app (`relive_app_exits_total`).
    pub fn record_app_exit(&self, vm: &str, succeeded: bool) {
        let result = APP_EXIT_RESULTS[usize::from(!succeeded)];
        self.app_exits.with_label_values(&[vm, result]).inc();
    }

    /// Counts one detected failure.
    pub fn record_failure(&self, vm: &str, reason: FailureReason) {
        self.failures
            .with_label_values(&[vm, reason.as_str()])
            .inc();
    }

    /// Counts one completed restore (`relive_restores_total`), labelled with
    /// the target's kind (an explicit image's id is not a label).
    pub fn record_restore(&self, vm: &str, target: &RestoreTarget, path: RestorePath) {
        self.restores
            .with_label_values(&[vm, target.kind(), path.as_str()])
            .inc();
    }

    /// Observes a restore's duration measured elsewhere (for example by the VMM).
    pub fn observe_restore(&self, vm: &str, path: RestorePath, took: Duration) {
        self.restore_duration
            .with_label_values(&[vm, path.as_str()])
            .observe(took.as_secs_f64());
    }

    /// A timer that observes `relive_restore_duration_seconds` when dropped.
    pub fn restore_timer(&self, vm: &str, path: RestorePath) -> HistogramTimer {
        self.restore_duration
            .with_label_values(&[vm, path.as_str()])
            .start_timer()
    }

    /// Observes one failover: from failure detected (or failover requested)
    /// to the guest running again.
    pub fn observe_failover(
        &self,
        vm: &str,
        target: &RestoreTarget,
        path: RestorePath,
        took: Duration,
    ) {
        self.failover_duration
            .with_label_values(&[vm, target.kind(), path.as_str()])
            .observe(took.as_secs_f64());
    }

    /// A timer that observes `relive_checkpoint_duration_seconds` when dropped.
    /// On a failed checkpoint, call `stop_and_discard()` on it and
    /// [`Metrics::record_checkpoint_failure`].
    pub fn checkpoint_timer(&self, vm: &str, kind: CheckpointKind) -> HistogramTimer {
        self.checkpoint_duration
            .with_label_values(&[vm, kind.as_str()])
            .start_timer()
    }

    /// Observes a checkpoint's duration measured elsewhere.
    pub fn observe_checkpoint(&self, vm: &str, kind: CheckpointKind, took: Duration) {
        self.checkpoint_duration
            .with_label_values(&[vm, kind.as_str()])
            .observe(took.as_secs_f64());
    }

    /// Observes how long the guest was paused for a checkpoint.
    pub fn observe_checkpoint_pause(&self, vm: &str, kind: CheckpointKind, paused: Duration) {
        self.checkpoint_pause
            .with_label_values(&[vm, kind.as_str()])
            .observe(paused.as_secs_f64());
    }

    /// Counts one failed checkpoint.
    pub fn record_checkpoint_failure(&self, vm: &str) {
        self.checkpoints_failed.with_label_values(&[vm]).inc();
    }

    /// Adds a pause the guest was asked for (`reason`: checkpoint).
    pub fn observe_pause(&self, vm: &str, reason: &str, paused: Duration) {
        self.paused_seconds
            .with_label_values(&[vm, reason])
            .inc_by(paused.as_secs_f64());
    }

    /// Records when the VM's newest consistency image was taken.
    pub fn set_last_checkpoint(&self, vm: &str, at: std::time::SystemTime) {
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_checkpoint.with_label_values(&[vm]).set(secs);
    }

    /// Sets the image directory's image count and bytes on disk.
    pub fn set_images(&self, vm: &str, count: usize, total_bytes: u64) {
        self.images
            .with_label_values(&[vm])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        self.image_bytes
            .with_label_values(&[vm])
            .set(bytes(total_bytes));
    }

    /// Sets the time since the guest's last heartbeat.
    pub fn set_heartbeat_age(&self, vm: &str, age: Duration) {
        self.heartbeat_age
            .with_label_values(&[vm])
            .set(age.as_secs_f64());
    }

    /// Sets the bytes of guest memory resident in host RAM.
    pub fn set_guest_memory_resident(&self, vm: &str, resident: u64) {
        self.guest_memory_resident
            .with_label_values(&[vm])
            .set(bytes(resident));
    }

    /// Sets the standby's readiness and resident memory (0 when there is none).
    pub fn set_standby(&self, vm: &str, ready: bool, memory: u64) {
        self.standby_ready
            .with_label_values(&[vm])
            .set(i64::from(ready));
        self.standby_memory
            .with_label_values(&[vm])
            .set(bytes(memory));
    }

    /// Takes a sample of the VMM's cumulative vCPU exit count and adds what
    /// is new since the previous sample (see "Counters mirrored from another
    /// process" in the module docs).
    pub fn observe_vcpu_exits(&self, vm: &str, vmm_pid: u32, cumulative: u64) {
        let delta = {
            let mut cursors = lock(&self.cursors);
            let cursor = cursors.entry(vm.to_owned()).or_default();
            let delta = match cursor.vcpu_exits {
                Some((pid, last)) if pid == vmm_pid && cumulative >= last => cumulative - last,
                // A new process, or the old one's count went backwards (it
                // cannot, but then its whole count is new too).
                _ => cumulative,
            };
            cursor.vcpu_exits = Some((vmm_pid, cumulative));
            delta
        };
        self.vcpu_exits.with_label_values(&[vm]).inc_by(delta);
    }

    /// Takes a sample of the VMM process's cumulative CPU seconds (utime +
    /// stime, see [`proc_cpu_seconds`]) and adds what is new since the
    /// previous sample.
    pub fn observe_vmm_cpu_seconds(&self, vm: &str, vmm_pid: u32, cumulative: f64) {
        if !cumulative.is_finite() || cumulative < 0.0 {
            return;
        }
        let delta = {
            let mut cursors = lock(&self.cursors);
            let cursor = cursors.entry(vm.to_owned()).or_default();
            let delta = match cursor.cpu_seconds {
                Some((pid, last)) if pid == vmm_pid && cumulative >= last => cumulative - last,
                _ => cumulative,
            };
            cursor.cpu_seconds = Some((vmm_pid, cumulative));
            delta
        };
        self.vmm_cpu_seconds.with_label_values(&[vm]).inc_by(delta);
    }

    /// Drops every series of `vm` (when it leaves the fleet).
    pub fn remove_vm(&self, vm: &str) {
        // `remove_label_values` fails only for a series that does not exist,
        // which is fine: not every series is created for every VM.
        {
            let _state = lock(&self.state_lock);
            for state in VmState::LABELS {
                let _ = self.vm_state.remove_label_values(&[vm, state]);
            }
        }
        for reason in FailureReason::ALL {
            let _ = self.failures.remove_label_values(&[vm, reason.as_str()]);
        }
        for result in APP_EXIT_RESULTS {
            let _ = self.app_exits.remove_label_values(&[vm, result]);
        }
        for image in IMAGE_KINDS {
            for path in RestorePath::ALL {
                let labels = [vm, image, path.as_str()];
                let _ = self.restores.remove_label_values(&labels);
                let _ = self.failover_duration.remove_label_values(&labels);
            }
        }
        for path in RestorePath::ALL {
            let _ = self
                .restore_duration
                .remove_label_values(&[vm, path.as_str()]);
        }
        for kind in CheckpointKind::ALL {
            let _ = self
                .checkpoint_duration
                .remove_label_values(&[vm, kind.as_str()]);
            let _ = self
                .checkpoint_pause
                .remove_label_values(&[vm, kind.as_str()]);
        }
        for gauge in [
            &self.vm_up,
            &self.image_bytes,
            &self.images,
            &self.guest_memory_resident,
            &self.standby_ready,
            &self.standby_memory,
            &self.policy_standby,
        ] {
            let _ = gauge.remove_label_values(&[vm]);
        }
        for gauge in [
            &self.heartbeat_age,
            &self.last_checkpoint,
            &self.policy_checkpoint_interval,
            &self.policy_heartbeat_timeout,
        ] {
            let _ = gauge.remove_label_values(&[vm]);
        }
        let _ = self.checkpoints_failed.remove_label_values(&[vm]);
        let _ = self.vcpu_exits.remove_label_values(&[vm]);
        let _ = self.vmm_cpu_seconds.remove_label_values(&[vm]);
        let _ = self.paused_seconds.remove_label_values(&[vm, "checkpoint"]);
        lock(&self.cursors).remove(vm);
    }
}

/// Reading a process's CPU time failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcStatError {
    /// `/proc/<pid>/stat` could not be read (the process is gone, most often).
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file did not have the expected fields.
    #[error("unexpected contents in {path}")]
    Parse {
        /// The file.
        path: PathBuf,
    },
}

/// A process's cumulative user + system CPU seconds, from `/proc/<pid>/stat`
/// (`utime` and `stime`, in [`USER_HZ`] ticks).
pub fn proc_cpu_seconds(pid: u32) -> Result<f64, ProcStatError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let text = std::fs::read_to_string(&path).map_err(|source| ProcStatError::Read {
        path: path.clone(),
        source,
    })?;
    parse_stat_cpu_seconds(&text).ok_or(ProcStatError::Parse { path })
}

/// Parses utime + stime out of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may itself hold spaces and parentheses, so
/// fields are counted from the last `)`.
fn parse_stat_cpu_seconds(stat: &str) -> Option<f64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the comm: field 3 (state) is index 0, so utime (field 14) is
    // index 11 and stime (field 15) index 12.
    let mut fields = after_comm.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_parse::{Sample, Scrape, Value};

    fn scrape(m: &Metrics) -> Scrape {
        let text = m.render();
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parse text format")
    }

    /// The samples of `metric` whose labels include every pair in `labels`.
    fn find<'a>(s: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
        s.samples
            .iter()
            .filter(|x| x.metric == metric)
            .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .collect()
    }

    fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let found = find(s, metric, labels);
        assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
        match found[0].value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{metric} is not a scalar: {other:?}"),
        }
    }

    fn histogram_count(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let found = find(s, metric, labels);
        assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
        match &found[0].value {
            Value::Histogram(buckets) => {
                buckets
                    .iter()
                    .find(|b| b.less_than.is_infinite())
                    .expect("+Inf bucket")
                    .count
            }
            other => panic!("{metric} is not a histogram: {other:?}"),
        }
    }

    #[test]
    fn a_sequence_of_calls_renders_as_parsed_values() {
        let m = Metrics::new().unwrap();
        m.add_vm("web", &Policy::default());
        m.set_state("web", &VmState::Running);
        m.set_up("web", true);
        m.record_failure("web", FailureReason::VmmKilled);
        m.record_failure("web", FailureReason::VmmKilled);
        m.record_failure("web", FailureReason::HeartbeatTimeout);
        m.record_restore("web", &RestoreTarget::Consistency, RestorePath::Standby);
        m.record_restore("web", &RestoreTarget::Boot, RestorePath::Cold);
        m.observe_failover(
            "web",
            &RestoreTarget::Consistency,
            RestorePath::Standby,
            Duration::from_micros(2_500),
        );
        m.observe_restore("web", RestorePath::Standby, Duration::from_micros(900));
        m.observe_checkpoint(
            "web",
            CheckpointKind::Incremental,
            Duration::from_millis(40),
        );
        m.observe_checkpoint_pause(
            "web",
            CheckpointKind::Incremental,
            Duration::from_micros(700),
        );
        m.record_checkpoint_failure("web");
        m.set_images("web", 3, 12 << 20);
        m.set_heartbeat_age("web", Duration::from_millis(250));
        m.set_guest_memory_resident("web", 48 << 20);
        m.set_standby("web", true, 5 << 20);
        m.observe_vcpu_exits("web", 100, 1_000);
        m.observe_vcpu_exits("web", 100, 1_500);
        m.observe_vmm_cpu_seconds("web", 100, 1.25);
        m.observe_vmm_cpu_seconds("web", 100, 2.0);

        let s = scrape(&m);
        let web = [("vm", "web")];
        assert_eq!(
            value(
                &s,
                "relive_vm_state",
                &[("vm", "web"), ("state", "running")]
            ),
            1.0
        );
        assert_eq!(value(&s, "relive_vm_up", &web), 1.0);
        assert_eq!(
            value(
                &s,
                "relive_failures_total",
                &[("vm", "web"), ("reason", "vmm-killed")]
            ),
            2.0
        );
        assert_eq!(
            value(
                &s,
                "relive_failures_total",
                &[("vm", "web"), ("reason", "heartbeat-timeout")]
            ),
            1.0
        );
        // add_vm created every reason at zero.
        assert_eq!(
            value(
                &s,
                "relive_failures_total",
                &[("vm", "web"), ("reason", "triple-fault")]
            ),
            0.0
        );
        assert_eq!(
            find(&s, "relive_failures_total", &web).len(),
            FailureReason::ALL.len()
        );
        assert_eq!(
            value(
                &s,
                "relive_restores_total",
                &[("vm", "web"), ("image", "consistency"), ("path", "standby")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "relive_restores_total",
                &[("vm", "web"), ("image", "boot"), ("path", "cold")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "relive_restores_total",
                &[("vm", "web"), ("image", "image"), ("path", "cold")]
            ),
            0.0
        );
        assert_eq!(
            histogram_count(
                &s,
                "relive_failover_duration_seconds",
                &[("vm", "web"), ("image", "consistency"), ("path", "standby")]
            ),
            1.0
        );
        // 2.5 ms lands in the 3 ms bucket, not the 2 ms one.
        let restored = [("vm", "web"), ("image", "consistency"), ("path", "standby")];
        let failover = find(&s, "relive_failover_duration_seconds", &restored);
        let Value::Histogram(buckets) = &failover[0].value else {
            panic!("not a histogram")
        };
        let at = |le: f64| buckets.iter().find(|b| b.less_than == le).unwrap().count;
        assert_eq!(at(0.002), 0.0);
        assert_eq!(at(0.003), 1.0);
        assert_eq!(
            value(&s, "relive_failover_duration_seconds_sum", &restored),
            0.0025
        );
        assert_eq!(
            histogram_count(
                &s,
                "relive_restore_duration_seconds",
                &[("path", "standby")]
            ),
            1.0
        );
        assert_eq!(
            histogram_count(
                &s,
                "relive_checkpoint_duration_seconds",
                &[("kind", "incremental")]
            ),
            1.0
        );
        assert_eq!(
            histogram_count(
                &s,
                "relive_checkpoint_pause_seconds",
                &[("kind", "incremental")]
            ),
            1.0
        );
        assert_eq!(value(&s, "relive_checkpoints_failed_total", &web), 1.0);
        assert_eq!(value(&s, "relive_images", &web), 3.0);
        assert_eq!(
            value(&s, "relive_image_bytes", &web),
            f64::from(12u32 << 20)
        );
        assert_eq!(value(&s, "relive_heartbeat_age_seconds", &web), 0.25);
        assert_eq!(
            value(&s, "relive_guest_memory_resident_bytes", &web),
            f64::from(48u32 << 20)
        );
        assert_eq!(value(&s, "relive_standby_ready", &web), 1.0);
        assert_eq!(
            value(&s, "relive_standby_memory_bytes", &web),
            f64::from(5u32 << 20)
        );
        assert_eq!(value(&s, "relive_vcpu_exits_total", &web), 1_500.0);
        assert_eq!(value(&s, "relive_vmm_cpu_seconds_total", &web), 2.0);
        // Types as Prometheus conventions want them.
        let text = m.render();
        for line in [
            "# TYPE relive_failures_total counter",
            "# TYPE relive_vcpu_exits_total counter",
            "# TYPE relive_vmm_cpu_seconds_total counter",
            "# TYPE relive_vm_state gauge",
            "# TYPE relive_failover_duration_seconds histogram",
        ] {
            assert!(text.contains(line), "missing {line:?}");
        }
    }

    #[test]
    fn state_gauge_is_exclusive() {
        let m = Metrics::new().unwrap();
        m.add_vm("a", &Policy::default());
        m.add_vm("b", &Policy::default());
        let states = every_state();
        for state in &states {
            m.set_state("a", state);
            m.set_state("b", &VmState::Paused);
            let s = scrape(&m);
            for other in VmState::LABELS {
                let want = if other == state.as_str() { 1.0 } else { 0.0 };
                assert_eq!(
                    value(&s, "relive_vm_state", &[("vm", "a"), ("state", other)]),
                    want,
                    "a in {state}, looking at {other}"
                );
            }
            let ones: f64 = find(&s, "relive_vm_state", &[("vm", "b")])
                .iter()
                .map(|x| match x.value {
                    Value::Gauge(v) => v,
                    _ => panic!("not a gauge"),
                })
                .sum();
            assert_eq!(ones, 1.0);
            assert_eq!(
                find(&s, "relive_vm_state", &[("vm", "a")]).len(),
                VmState::LABELS.len()
            );
        }
    }

    #[test]
    fn mirrored_counters_survive_a_new_vmm_process() {
        let m = Metrics::new().unwrap();
        m.observe_vcpu_exits("a", 10, 500);
        m.observe_vcpu_exits("a", 10, 800);
        // Failover: a new VMM (pid 11) starts counting from zero.
        m.observe_vcpu_exits("a", 11, 40);
        m.observe_vcpu_exits("a", 11, 100);
        m.observe_vmm_cpu_seconds("a", 10, 3.0);
        m.observe_vmm_cpu_seconds("a", 11, 0.5);
        m.observe_vmm_cpu_seconds("a", 11, f64::NAN);
        let s = scrape(&m);
        assert_eq!(value(&s, "relive_vcpu_exits_total", &[("vm", "a")]), 900.0);
        assert_eq!(
            value(&s, "relive_vmm_cpu_seconds_total", &[("vm", "a")]),
            3.5
        );
    }

    #[test]
    fn remove_vm_drops_every_series_of_that_vm_only() {
        let m = Metrics::new().unwrap();
        for vm in ["gone", "kept"] {
            m.add_vm(vm, &Policy::default());
            m.set_state(vm, &VmState::Running);
            m.set_up(vm, true);
            m.record_failure(vm, FailureReason::Panic);
            let explicit = RestoreTarget::Image("0190aabbccddeeff0011223344556677".into());
            m.record_restore(vm, &explicit, RestorePath::Cold);
            m.observe_failover(vm, &explicit, RestorePath::Cold, Duration::from_millis(9));
            m.observe_restore(vm, RestorePath::Cold, Duration::from_millis(8));
            m.checkpoint_timer(vm, CheckpointKind::Full)
                .observe_duration();
            m.observe_checkpoint_pause(vm, CheckpointKind::Full, Duration::from_millis(1));
            m.set_images(vm, 1, 1);
            m.set_heartbeat_age(vm, Duration::from_secs(1));
            m.set_guest_memory_resident(vm, 1);
            m.set_standby(vm, false, 0);
            m.observe_vcpu_exits(vm, 1, 1);
            m.observe_vmm_cpu_seconds(vm, 1, 1.0);
        }
        m.remove_vm("gone");
        let s = scrape(&m);
        let gone: Vec<_> = s
            .samples
            .iter()
            .filter(|x| x.labels.get("vm") == Some("gone"))
            .map(|x| x.metric.clone())
            .collect();
        assert!(gone.is_empty(), "left behind: {gone:?}");
        // An explicit image's id is never a label value.
        assert!(!m.render().contains("0190aabbccddeeff"));
        let kept: std::collections::BTreeSet<_> = s
            .samples
            .iter()
            .filter(|x| x.labels.get("vm") == Some("kept"))
            .map(|x| x.metric.as_str())
            .collect();
        for family in [
            "relive_vm_state",
            "relive_vm_up",
            "relive_failures_total",
            "relive_restores_total",
            "relive_failover_duration_seconds",
            "relive_restore_duration_seconds",
            "relive_checkpoint_duration_seconds",
            "relive_checkpoint_pause_seconds",
            "relive_checkpoints_failed_total",
            "relive_image_bytes",
            "relive_images",
            "relive_heartbeat_age_seconds",
            "relive_vcpu_exits_total",
            "relive_guest_memory_resident_bytes",
            "relive_vmm_cpu_seconds_total",
            "relive_standby_ready",
            "relive_standby_memory_bytes",
        ] {
            assert!(kept.contains(family), "kept VM lost {family}");
        }
        // The cursor went too: a VM re-added under the same name counts anew.
        m.observe_vcpu_exits("gone", 1, 5);
        assert_eq!(
            value(&scrape(&m), "relive_vcpu_exits_total", &[("vm", "gone")]),
            5.0
        );
    }

    /// What a dashboard and the alerts need besides the VM's events: the
    /// build, the VM's policy, its newest image's time, the supervisor
    /// process, and histograms present (at zero) before their first
    /// observation.
    #[test]
    fn build_policy_image_age_and_process_series_are_exported() {
        let m = Metrics::new().unwrap();
        let policy = Policy {
            checkpoint_interval: Duration::from_secs(7),
            heartbeat_timeout: Duration::from_millis(1500),
            standby: true,
            ..Policy::default()
        };
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        m.add_vm("web", &policy);
        let s = scrape(&m);
        let build = find(&s, "relive_build_info", &[("version", VERSION)]);
        assert_eq!(build.len(), 1, "{build:?}");
        assert!(!build[0].labels.get("commit").unwrap_or("").is_empty());
        let web = [("vm", "web")];
        assert_eq!(
            value(&s, "relive_policy_checkpoint_interval_seconds", &web),
            7.0
        );
        assert_eq!(
            value(&s, "relive_policy_heartbeat_timeout_seconds", &web),
            1.5
        );
        assert_eq!(value(&s, "relive_policy_standby", &web), 1.0);
        let at = value(&s, "relive_last_checkpoint_timestamp_seconds", &web);
        assert!(
            at >= before.floor() && at < before + 60.0,
            "{at} vs {before}"
        );
        m.set_last_checkpoint("web", std::time::UNIX_EPOCH + Duration::from_secs(1_000));
        assert_eq!(
            value(
                &scrape(&m),
                "relive_last_checkpoint_timestamp_seconds",
                &web
            ),
            1_000.0
        );
        assert!(!find(&s, "process_resident_memory_bytes", &[]).is_empty());
        assert_eq!(
            histogram_count(
                &s,
                "relive_failover_duration_seconds",
                &[("vm", "web"), ("image", "boot"), ("path", "cold")]
            ),
            0.0
        );
        m.remove_vm("web");
        let s = scrape(&m);
        assert!(
            s.samples.iter().all(|x| x.labels.get("vm").is_none()),
            "series of a removed VM remain"
        );
    }

    #[test]
    fn timers_observe_on_drop_unless_discarded() {
        let m = Metrics::new().unwrap();
        {
            let _t = m.checkpoint_timer("a", CheckpointKind::Full);
        }
        m.checkpoint_timer("a", CheckpointKind::Full)
            .stop_and_discard();
        drop(m.restore_timer("a", RestorePath::Standby));
        let s = scrape(&m);
        assert_eq!(
            histogram_count(
                &s,
                "relive_checkpoint_duration_seconds",
                &[("kind", "full")]
            ),
            1.0
        );
        assert_eq!(
            histogram_count(
                &s,
                "relive_restore_duration_seconds",
                &[("path", "standby")]
            ),
            1.0
        );
    }

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new().unwrap();
        let b = Metrics::new().unwrap();
        a.record_failure("x", FailureReason::Panic);
        assert!(a.render().contains("relive_failures_total"));
        assert!(!b.render().contains("relive_failures_total"));
    }

    /// One value of every state label.
    fn every_state() -> Vec<VmState> {
        vec![
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
        ]
    }

    #[test]
    fn label_sets_cover_every_kind() {
        // remove_vm and add_vm walk these lists: they must name every value.
        let labels: Vec<&str> = every_state().iter().map(VmState::as_str).collect();
        assert_eq!(labels, VmState::LABELS);
        for target in [
            RestoreTarget::Consistency,
            RestoreTarget::Boot,
            RestoreTarget::Image("x".into()),
        ] {
            assert!(IMAGE_KINDS.contains(&target.kind()), "{target}");
        }
        let paths: Vec<&str> = RestorePath::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(paths, ["standby", "cold"]);
        let kinds: Vec<&str> = CheckpointKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds, ["full", "incremental"]);
    }

    #[test]
    fn serde_names_are_the_label_values() {
        for path in RestorePath::ALL {
            assert_eq!(serde_json::to_value(path).unwrap(), path.as_str());
            let back: RestorePath = serde_json::from_value(path.as_str().into()).unwrap();
            assert_eq!(back, *path);
        }
        for kind in CheckpointKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }

    #[test]
    fn proc_stat_cpu_seconds() {
        // A comm with spaces and a parenthesis must not shift the fields.
        let line = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 \
                    100 1000000 100 18446744073709551615";
        assert_eq!(parse_stat_cpu_seconds(line), Some(3.0));
        assert_eq!(parse_stat_cpu_seconds("1234 (x) S 1"), None);
        let own = proc_cpu_seconds(std::process::id()).unwrap();
        assert!(own >= 0.0);
        assert!(matches!(
            proc_cpu_seconds(u32::MAX),
            Err(ProcStatError::Read { .. })
        ));
    }
}
