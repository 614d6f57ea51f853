//! Records the commit relive is built from as `RELIVE_COMMIT` for
//! `relive_build_info`: `RELIVE_COMMIT` from the environment when set
//! (packagers building outside git), else `git rev-parse --short=12 HEAD`,
//! else `unknown`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=RELIVE_COMMIT");
    let commit = std::env::var("RELIVE_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    // Rebuild when HEAD moves (a commit, a checkout).
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for f in ["HEAD", "packed-refs"] {
            let p = Path::new(&dir).join(f);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let p = Path::new(&dir).join(r);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    println!(
        "cargo:rustc-env=RELIVE_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
