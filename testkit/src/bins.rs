//! The workspace's binaries, found beside the running test or bench.
//!
//! A test runs as `target/<profile>/deps/<test>-<hash>` and a bench as
//! `target/release/deps/<bench>-<hash>`; the binaries are
//! `target/<profile>/relive-vmm` and `target/<profile>/relive`. Cargo builds
//! them only for `cargo build --workspace` (the root package's dependency on
//! `relive-vmm` builds its library, not its binary), so a missing one gets an
//! error that says so. `RELIVE_VMM_BIN` overrides the VMM's path.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    let testkit = Path::new(env!("CARGO_MANIFEST_DIR"));
    testkit.parent().unwrap_or(testkit).to_path_buf()
}

/// `target/<profile>/NAME` for the running test or bench executable.
pub fn beside_exe(name: &str) -> Result<PathBuf, String> {
    if name == "relive-vmm" {
        if let Some(path) = std::env::var_os("RELIVE_VMM_BIN") {
            return Ok(PathBuf::from(path));
        }
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot locate the running executable: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected executable location {}", exe.display()))?;
    let bin = profile_dir.join(name);
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: `cargo test` and `cargo bench` do not build the workspace's \
             binaries; run `cargo build --workspace` (with `--release` for benches) first, \
             or set RELIVE_VMM_BIN",
            bin.display()
        ))
    }
}

/// A source file of the workspace modified after `binary` was built: the
/// binary then runs old code.
pub fn newer_source_than(binary: &Path) -> Option<PathBuf> {
    fn newest(path: &Path, best: &mut Option<(SystemTime, PathBuf)>) {
        let Ok(meta) = path.metadata() else { return };
        if meta.is_dir() {
            let Ok(entries) = std::fs::read_dir(path) else {
                return;
            };
            for entry in entries.flatten() {
                newest(&entry.path(), best);
            }
        } else if let Ok(modified) = meta.modified() {
            if best.as_ref().is_none_or(|(t, _)| modified > *t) {
                *best = Some((modified, path.to_path_buf()));
            }
        }
    }
    let built = std::fs::metadata(binary).and_then(|m| m.modified()).ok()?;
    let root = workspace_root();
    let mut best = None;
    for dir in [
        "src",
        "control/src",
        "supervisor/src",
        "vmm/src",
        "images/src",
        "images/guest",
    ] {
        newest(&root.join(dir), &mut best);
    }
    best.filter(|(t, _)| *t > built).map(|(_, p)| p)
}
