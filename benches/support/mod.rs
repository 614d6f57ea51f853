//! Helpers shared by the benchmarks (each bench includes this module with
//! `#[path = "support/mod.rs"] mod support;`): finding the release binaries,
//! checking for /dev/kvm, the number of runs, and notes on the host.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Errors of a bench are reported as text.
pub type Result<T> = std::result::Result<T, String>;

/// `target/release/relive-vmm`: this bench runs as `target/release/deps/boot-*`.
pub fn vmm_binary(bench: &str) -> Result<PathBuf> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot locate the bench executable: {e}"))?;
    let release = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected bench location {}", exe.display()))?;
    let vmm = release.join("relive-vmm");
    if vmm.is_file() {
        Ok(vmm)
    } else {
        Err(format!(
            "{} not found: run `cargo build --release --workspace` first \
             (the documented command is `cargo build --release --workspace && cargo bench --bench {bench}`)",
            vmm.display()
        ))
    }
}

/// Whether this process can open `/dev/kvm` read-write, as the VMM must.
pub fn kvm_usable() -> std::result::Result<(), String> {
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

pub fn runs(default: usize) -> Result<usize> {
    match std::env::var("RELIVE_BENCH_RUNS") {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "RELIVE_BENCH_RUNS={v:?}: expected a number of runs, at least 1"
            )),
        },
    }
}

/// A source file of the VMM or the bundled guest modified after `binary` was built.
pub fn newer_source_than(binary: &Path) -> Option<PathBuf> {
    fn newest(dir: &Path, best: &mut Option<(SystemTime, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                newest(&path, best);
            } else if let Ok(modified) = meta.modified() {
                if best.as_ref().is_none_or(|(t, _)| modified > *t) {
                    *best = Some((modified, path));
                }
            }
        }
    }
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut best = None;
    for dir in ["src", "supervisor/src", "vmm/src", "images/src"] {
        newest(&root.join(dir), &mut best);
    }
    best.filter(|(t, _)| *t > built).map(|(_, p)| p)
}

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

/// Median, p90 (nearest rank), min and max of some figures.
#[derive(Debug, Clone, Copy)]
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
