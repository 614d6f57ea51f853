//! The VMM under its seccomp filters, through the real binary:
//!
//! - every operation a VMM serves (boot, agent traffic and watch, pause and
//!   resume, full and incremental checkpoints with their background
//!   verification and merge, cold restore of a layer, standby restore,
//!   shutdown) works with the filters on, and every thread of every VMM
//!   runs filtered (`Seccomp: 2` in `/proc/PID/task/TID/status`);
//! - a forbidden system call (the `inject-fault forbidden-syscall` request:
//!   `socket(AF_INET)` on the event loop) ends the VMM with the typed
//!   `seccomp` exit (status 15) and a record naming the thread kind and the
//!   call;
//! - `--no-seccomp` runs unfiltered and says so on stderr.
//!
//! The supervisor's side (the `seccomp` failure, failed over like any
//! crash) is in `tests/supervisor.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers fail a test by panicking

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    checkpoint, connect, request, require_kvm, temp_dir, vmm_command, ChildGuard, Vmm, STEP_TIMEOUT,
};
use relive_control::{CheckpointKind, Fault, Request, Response};

/// The seccomp mode of each thread of `pid`, by thread name. Threads that
/// end while they are read (a control connection's) are left out, and so
/// is KVM's own `kvm-nx-lpage-recovery` worker, a kernel thread the kernel
/// lists among the process's tasks (it runs no user code to filter).
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm"))
                .ok()?
                .trim()
                .to_string();
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))?
                .trim()
                .to_string();
            (!name.starts_with("kvm-nx-lpage")).then_some((name, mode))
        })
        .collect()
}

/// Asserts that every thread of `pid` runs under a seccomp filter (mode 2)
/// and that the kinds named are among them.
fn assert_all_filtered(pid: u32, kinds: &[&str]) {
    let modes = thread_modes(pid);
    for kind in kinds {
        assert!(
            modes.iter().any(|(n, _)| n.starts_with(kind)),
            "no {kind} thread in {modes:?}"
        );
    }
    assert!(
        modes.iter().all(|(_, m)| m == "2"),
        "threads without a seccomp filter: {modes:?}"
    );
}

/// A checkpoint, asked again while the warm boot image (a live snapshot of
/// its own) is still being written.
fn checkpoint_when_free(socket: &Path, kind: CheckpointKind) -> relive_control::CheckpointReport {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match request(socket, Request::Checkpoint { kind }) {
            Response::Checkpoint(report) => return report,
            Response::Error { error, .. }
                if error.contains("being taken already") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => panic!("checkpoint: {other:?}"),
        }
    }
}

fn wait_exit(child: &mut ChildGuard) -> i32 {
    child
        .wait_timeout(STEP_TIMEOUT)
        .expect("the VMM exits")
        .code()
        .expect("an exit status, not a signal")
}

#[test]
fn every_vmm_operation_runs_with_every_thread_filtered() {
    if !require_kvm() {
        return;
    }
    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let mut vmm = Vmm::start(&[
        "--images",
        &images_arg,
        "--boot-image",
        "warm",
        "--cmdline",
        "relive.hb_ms=20 relive.touch_mib=8 relive.dirty_pages=4",
    ]);
    let mut watch = vmm.watch();
    watch
        .next_line(STEP_TIMEOUT)
        .expect("the guest talks on the agent channel");
    vmm.agent("status");
    assert_eq!(request(&vmm.socket, Request::Pause), Response::Ok);
    assert_eq!(request(&vmm.socket, Request::Resume), Response::Ok);
    checkpoint_when_free(&vmm.socket, CheckpointKind::Full);
    let mut last = None;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(40));
        last = Some(checkpoint(&vmm.socket, CheckpointKind::Incremental));
    }
    let last = last.unwrap();
    // The image store thread has verified and merged by now (its work is
    // the proof it ran filtered: a violation would have ended the VMM).
    let verdict = Path::new(&last.path).with_extension("verdict");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !verdict.exists() {
        assert!(Instant::now() < deadline, "no verdict for {}", last.path);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_all_filtered(
        vmm.pid(),
        &["relive-vmm", "vcpu0", "control", "image-store"],
    );
    assert!(vmm.is_running(), "stderr:\n{}", vmm.stderr());
    assert_eq!(request(&vmm.socket, Request::Shutdown), Response::Ok);
    let (code, record) = vmm.wait_exit(STEP_TIMEOUT);
    assert_eq!(code, 3, "{record}");

    // Cold restore of the newest layer, then a checkpoint of the restored VM
    // into the same directory (a layer on the restored image).
    let dir = temp_dir();
    let socket = dir.join("restored.sock");
    let mut restored = ChildGuard::spawn(
        vmm_command()
            .args(["restore", "--image", &last.path, "--images", &images_arg])
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(dir.join("restored.console"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("restored.err")).unwrap()),
    );
    let report = connect(&socket)
        .control()
        .checkpoint(CheckpointKind::Incremental)
        .unwrap_or_else(|e| {
            panic!(
                "checkpoint of the restored VM: {}\n{}",
                relive_control::error_chain(&e),
                std::fs::read_to_string(dir.join("restored.err")).unwrap_or_default()
            )
        });
    assert_eq!(report.kind, CheckpointKind::Incremental);
    assert_all_filtered(restored.id(), &["relive-vmm", "vcpu0", "control"]);
    assert_eq!(request(&socket, Request::Shutdown), Response::Ok);
    assert_eq!(wait_exit(&mut restored), 3);

    // A standby takes the image over its control socket.
    let dir = temp_dir();
    let socket = dir.join("standby.sock");
    let mut standby = ChildGuard::spawn(
        vmm_command()
            .arg("standby")
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(dir.join("standby.console"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let answer = connect(&socket).request(&Request::Restore {
        image: last.path.clone(),
    });
    assert!(matches!(answer, Response::Restored(_)), "{answer:?}");
    vmm_agent_status(&socket);
    assert_all_filtered(standby.id(), &["relive-vmm", "vcpu0", "control"]);
    assert_eq!(request(&socket, Request::Shutdown), Response::Ok);
    assert_eq!(wait_exit(&mut standby), 3);
}

/// An agent command accepted by a VMM (the guest runs).
fn vmm_agent_status(socket: &Path) {
    let answer = request(
        socket,
        Request::Agent {
            line: "status".into(),
        },
    );
    assert_eq!(answer, Response::Ok);
}

#[test]
fn a_forbidden_system_call_ends_the_vmm_with_the_seccomp_exit() {
    if !require_kvm() {
        return;
    }
    let mut vmm = Vmm::start(&[]);
    connect(&vmm.socket).send(&Request::InjectFault {
        fault: Fault::ForbiddenSyscall,
    });
    let (code, record) = vmm.wait_exit(STEP_TIMEOUT);
    assert_eq!(code, 15, "{record}");
    assert_eq!(record["reason"], "seccomp", "{record}");
    assert_eq!(record["status"], 15, "{record}");
    let detail = record["detail"].as_str().unwrap();
    assert!(
        detail.contains("event-loop thread")
            && detail.contains(&format!("system call {}", libc::SYS_socket)),
        "{detail}"
    );
}

#[test]
fn no_seccomp_runs_unfiltered_and_says_so() {
    if !require_kvm() {
        return;
    }
    let vmm = Vmm::start(&["--no-seccomp"]);
    let modes = thread_modes(vmm.pid());
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
    let answer = request(
        &vmm.socket,
        Request::InjectFault {
            fault: Fault::ForbiddenSyscall,
        },
    );
    let Response::Error { error, .. } = answer else {
        panic!("{answer:?}")
    };
    assert!(error.contains("seccomp is off"), "{error}");
    assert!(
        vmm.stderr().contains("WARNING: --no-seccomp"),
        "{}",
        vmm.stderr()
    );
}
