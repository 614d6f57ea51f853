//! Builds the bundled guest kernel (`guest/guest.S`) with the system assembler
//! and linker into `$OUT_DIR/relive-guest.elf`, which `src/guest.rs` embeds.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => panic!("cannot run {cmd:?}: {e} (install binutils: apt-get install binutils)"),
    };
    if !status.success() {
        panic!("{cmd:?} failed with {status}");
    }
}

#[allow(clippy::expect_used)] // a build script reports failure by panicking
fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = PathBuf::from("guest/guest.S");
    let script = PathBuf::from("guest/guest.ld");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", script.display());
    let obj = out.join("guest.o");
    let elf = out.join("relive-guest.elf");
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld")
        .arg("-T")
        .arg(&script)
        .args(["-nostdlib", "-static", "--no-warn-rwx-segments", "-o"])
        .arg(&elf)
        .arg(&obj));
}
