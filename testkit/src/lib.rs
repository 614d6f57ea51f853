//! relive-testkit: what the end-to-end tests (`tests/`) and the benchmarks
//! (`benches/`) share, so that each is written once.
//!
//! - [`etcd`] and [`hosts`]: a real etcd (one member or a cluster) and
//!   hosts in network namespaces and cgroups, for the cluster tests;
//! - [`bins`]: the workspace's binaries beside the running test or bench, and
//!   whether one is older than the sources it was built from;
//! - [`kvm_usable`]: whether this process can use `/dev/kvm`;
//! - [`TempDir`]: a scratch directory removed on drop;
//! - [`Summary`]: median, p90, min and max of measured figures;
//! - [`Heartbeat`]: the bundled guest's heartbeat, and the check that one
//!   heartbeat continues another by the guest's own workload;
//! - small helpers for reports: [`tail`], [`ns_to_ms`], [`verdict`],
//!   [`env_count`], [`host_note`], [`load_average`].
//!
//! Talking to a VMM is not here: the tests and benches use
//! `relive-control`'s clients, like the supervisor.

pub mod bins;
pub mod etcd;
pub mod hosts;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Whether this process can open `/dev/kvm` read-write, as the VMM must;
/// why not, when it cannot.
pub fn kvm_usable() -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("/dev/kvm does not exist on this machine".into())
        }
        Err(e) => Err(format!("/dev/kvm cannot be opened read-write: {e}")),
    }
}

/// A fresh directory under the system temp dir, removed (with its
/// contents) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<temp>/<prefix>-<pid>-<n>`.
    pub fn create(prefix: &str) -> std::io::Result<TempDir> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// Median, p90 (nearest rank), min and max of some figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Median.
    pub median: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    /// The summary of `values`, `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v = values.to_vec();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let p90 = v[(n * 9).div_ceil(10).clamp(1, n) - 1];
        Some(Summary {
            median,
            p90,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// Every figure divided by `by` (bytes to MiB, say).
    pub fn scaled(self, by: f64) -> Summary {
        Summary {
            median: self.median / by,
            p90: self.p90 / by,
            min: self.min / by,
            max: self.max / by,
        }
    }

    /// As JSON, rounded to `digits` decimals.
    pub fn json(self, digits: i32) -> serde_json::Value {
        let r = |x: f64| {
            let k = 10f64.powi(digits);
            (x * k).round() / k
        };
        serde_json::json!({
            "median": r(self.median),
            "p90": r(self.p90),
            "min": r(self.min),
            "max": r(self.max),
        })
    }
}

/// The last ten lines of a file, indented, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "    (empty)".into();
    }
    lines[lines.len().saturating_sub(10)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Nanoseconds as milliseconds.
pub fn ns_to_ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// `ok` or `MISSED`, for a target.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

/// A count from the environment variable `name` (at least 1), `default`
/// when it is not set.
pub fn env_count(name: &str, default: usize) -> Result<usize, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name}={v:?}: expected a whole number, at least 1")),
        },
    }
}

/// This host's CPUs and kind of KVM, for a report's header.
pub fn host_note() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .any(|f| f == "vmx" || f == "svm");
    let kvm = if hw {
        "KVM on vmx/svm"
    } else {
        "nested KVM (no vmx/svm flag in /proc/cpuinfo)"
    };
    format!("{cpus} CPUs, {kvm}")
}

/// The 1-minute load average: other work on the machine shows in the figures.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A heartbeat of the bundled guest (`hb seq=S counter=C hash=H ...`): the
/// work fields, optional on the wire, are required here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sequence number.
    pub seq: u64,
    /// Work counter.
    pub counter: u64,
    /// Running hash.
    pub hash: u64,
}

impl Heartbeat {
    /// Parses a bundled guest's heartbeat line.
    pub fn parse(line: &str) -> Option<Heartbeat> {
        let hb = relive_control::Heartbeat::parse(line)?;
        Some(Heartbeat {
            seq: hb.seq,
            counter: hb.counter?,
            hash: hb.hash?,
        })
    }

    /// Whether `later` follows from this heartbeat by the guest's own
    /// workload: a larger seq and counter, and the hash the workload reaches
    /// from here at `later`'s counter. `Err` says how it does not.
    pub fn continued_by(&self, later: &Heartbeat) -> Result<(), String> {
        if later.seq <= self.seq || later.counter <= self.counter {
            return Err(format!("{later:?} does not come after {self:?}"));
        }
        let want = relive_images::guest::replay_hash(self.counter, self.hash, later.counter);
        if want != later.hash {
            return Err(format!(
                "the hash chain from {self:?} does not lead to {later:?} (it leads to {want:x})"
            ));
        }
        Ok(())
    }

    /// Panics with `what` unless `later` continues this heartbeat (see
    /// [`Heartbeat::continued_by`]).
    pub fn assert_continued_by(&self, later: &Heartbeat, what: &str) {
        if let Err(e) = self.continued_by(later) {
            panic!("{what}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_nearest_rank_p90_and_the_middle_median() {
        let s = Summary::of(&[5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 8.0, 9.0]).unwrap();
        assert_eq!((s.median, s.p90, s.min, s.max), (5.5, 9.0, 1.0, 10.0));
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[2.0]).unwrap().scaled(2.0).p90, 1.0);
    }

    #[test]
    fn a_heartbeat_is_continued_only_by_the_guests_own_work() {
        let start = Heartbeat {
            seq: 1,
            counter: 10,
            hash: relive_images::guest::replay_hash(0, relive_images::guest::HASH_INIT, 10),
        };
        let later = Heartbeat {
            seq: 5,
            counter: 50,
            hash: relive_images::guest::replay_hash(0, relive_images::guest::HASH_INIT, 50),
        };
        assert_eq!(start.continued_by(&later), Ok(()));
        let forged = Heartbeat {
            hash: later.hash ^ 1,
            ..later
        };
        assert!(start.continued_by(&forged).is_err());
        assert!(later.continued_by(&start).is_err());
        let line = format!("hb seq=5 counter=50 hash={:x} cpus=1", later.hash);
        assert_eq!(Heartbeat::parse(&line), Some(later));
        assert_eq!(Heartbeat::parse("hb seq=5"), None);
    }
}
