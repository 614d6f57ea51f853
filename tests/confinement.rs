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
//! - `--no-seccomp` runs unfiltered and says so on stderr;
//! - a jailed VMM (`--jail UID:GID`, as root) runs as that uid with no
//!   capability and `no_new_privs`, in mount, pid, network, IPC and UTS
//!   namespaces of its own, cannot read a host file (the `inject-fault
//!   read-host-file` drill), sees only its image directory and console in
//!   its root, checkpoints and restores (cold and into a standby), ends with
//!   the VMM's own exit status, and dies with the process that waits for it.
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
/// and that the kinds named are among them. A thread installs its filter as
/// the first thing it does, so one that was created a moment ago and not
/// yet scheduled (a loaded host) shows mode 0 for that moment: the check
/// waits for that, bounded by [`STEP_TIMEOUT`]; a thread that never
/// installs one fails it.
fn assert_all_filtered(pid: u32, kinds: &[&str]) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut modes = thread_modes(pid);
    while !modes.iter().all(|(_, m)| m == "2") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        modes = thread_modes(pid);
    }
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
    standby_takes(&last.path, &[], |socket, pid| {
        assert_eq!(reported_pid(socket), pid);
        assert_all_filtered(pid, &["relive-vmm", "vcpu0", "control"]);
    });
}

/// A `relive-vmm standby EXTRA...` takes `image` over its control socket
/// and runs its guest; `check` then looks at it (its socket, the spawned
/// process's pid), and it shuts down with status 3.
fn standby_takes(image: &str, extra: &[&str], check: impl FnOnce(&Path, u32)) {
    let dir = temp_dir();
    let socket = dir.join("standby.sock");
    let mut standby = ChildGuard::spawn(
        vmm_command()
            .arg("standby")
            .args(extra)
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(dir.join("standby.console"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let answer = connect(&socket).request(&Request::Restore {
        image: image.to_string(),
    });
    assert!(matches!(answer, Response::Restored(_)), "{answer:?}");
    vmm_agent_status(&socket);
    check(&socket, standby.id());
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

/// Whether this test can create jails (root); skips with the reason where
/// not, and fails instead under `RELIVE_REQUIRE_KVM=1` (CI runs as root).
fn require_root() -> bool {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("RELIVE_REQUIRE_KVM").as_deref() != Ok("1"),
        "jail tests need root, and RELIVE_REQUIRE_KVM=1 forbids skipping"
    );
    eprintln!("skipping: jail tests need root (namespaces, mounts, changing uid)");
    false
}

/// The jail's account in these tests (Debian's nobody:nogroup).
const JAIL: &str = "65534:65534";

/// The `Name:` line of `/proc/PID/status`, its fields split.
fn proc_status(pid: u32, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Asserts everything a jailed VMM `pid` must be: its ids, no privilege,
/// its own namespaces, a filter on every thread.
fn assert_jailed(pid: u32) {
    assert_eq!(proc_status(pid, "Uid"), ["65534"; 4]);
    assert_eq!(proc_status(pid, "Gid"), ["65534"; 4]);
    assert_eq!(proc_status(pid, "Groups"), Vec::<String>::new());
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(proc_status(pid, set), ["0000000000000000"], "{set}");
    }
    assert_eq!(proc_status(pid, "NoNewPrivs"), ["1"]);
    // Pid 1 of a pid namespace of its own.
    assert_eq!(proc_status(pid, "NSpid"), [pid.to_string(), "1".into()]);
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the jailed VMM shares the {ns} namespace");
    }
    // No network but a loopback (down).
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    let interfaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(interfaces, ["lo"], "{dev}");
    assert_all_filtered(pid, &["relive-vmm", "vcpu0", "control"]);
}

/// Every path in the jailed VMM's root, as it sees it.
fn jail_tree(pid: u32) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(base).unwrap().display().to_string());
            if path.is_dir() && !path.is_symlink() {
                walk(&path, base, out);
            }
        }
    }
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

/// A VMM's host pid as it reports it (`status`): for a jailed VMM, not the
/// process that waits for it.
fn reported_pid(socket: &Path) -> u32 {
    let Response::Status(status) = request(socket, Request::Status) else {
        panic!("no status from {}", socket.display())
    };
    status.pid
}

fn drill(socket: &Path) -> (bool, String) {
    match request(
        socket,
        Request::InjectFault {
            fault: Fault::ReadHostFile,
        },
    ) {
        Response::Drill { held, detail } => (held, detail),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_jailed_vmm_sees_only_its_own_files_and_runs_as_its_uid_without_privilege() {
    if !require_kvm() || !require_root() {
        return;
    }
    // Unjailed, the drill reads the host's file: the drill itself works.
    let free = Vmm::start(&[]);
    let (held, detail) = drill(&free.socket);
    assert!(!held, "{detail}");
    drop(free);

    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let mut vmm = Vmm::start(&["--jail", JAIL, "--images", &images_arg]);
    let pid = reported_pid(&vmm.socket);
    assert_ne!(
        pid,
        vmm.pid(),
        "the jailed VMM is the waiting process's child"
    );
    assert_jailed(pid);
    let (held, detail) = drill(&vmm.socket);
    assert!(held, "{detail}");
    assert!(detail.contains("/etc/hostname"), "{detail}");

    // Its root holds the image directory and the console log, at their
    // host paths, and nothing else: no /etc, /dev, /proc, no kernel.
    let tree = jail_tree(pid);
    let images_rel = images_arg.trim_start_matches('/').to_string();
    let console_rel = vmm
        .console
        .display()
        .to_string()
        .trim_start_matches('/')
        .to_string();
    let mut allowed: Vec<String> = Vec::new();
    for path in [&images_rel, &console_rel] {
        let mut at = std::path::PathBuf::new();
        for part in Path::new(path) {
            at.push(part);
            allowed.push(at.display().to_string());
        }
    }
    let strays: Vec<&String> = tree
        .iter()
        .filter(|p| !allowed.contains(p) && !p.starts_with(&format!("{images_rel}/")))
        .collect();
    assert!(
        strays.is_empty(),
        "the jail holds more: {strays:?} (all: {tree:?})"
    );
    assert!(
        tree.contains(&images_rel) && tree.contains(&console_rel),
        "{tree:?}"
    );

    // It works: images are written (owned by the jail's account, owner-only)
    // full and incremental.
    checkpoint_when_free(&vmm.socket, CheckpointKind::Full);
    std::thread::sleep(Duration::from_millis(50));
    let layer = checkpoint(&vmm.socket, CheckpointKind::Incremental);
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&layer.path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (65534, 65534, 0o600)
        );
    }
    assert_eq!(request(&vmm.socket, Request::Shutdown), Response::Ok);
    // The waiting process ends as the VMM did.
    let (code, record) = vmm.wait_exit(STEP_TIMEOUT);
    assert_eq!(code, 3, "{record}");
    assert_eq!(record["reason"], "shutdown", "{record}");

    // A jailed cold restore of the layer, and a jailed standby taking it.
    let dir = temp_dir();
    let socket = dir.join("restored.sock");
    let mut restored = ChildGuard::spawn(
        vmm_command()
            .args([
                "restore",
                "--jail",
                JAIL,
                "--image",
                &layer.path,
                "--images",
                &images_arg,
            ])
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(dir.join("restored.console"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("restored.err")).unwrap()),
    );
    let restored_pid = (0..500)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            socket
                .exists()
                .then(|| connect(&socket).request(&Request::Status))
                .and_then(|r| match r {
                    Response::Status(s) => Some(s.pid),
                    _ => None,
                })
        })
        .unwrap_or_else(|| {
            panic!(
                "the jailed restore does not serve: {}",
                std::fs::read_to_string(dir.join("restored.err")).unwrap_or_default()
            )
        });
    assert_jailed(restored_pid);
    vmm_agent_status(&socket);
    // Killing the waiting process takes the jailed VMM with it.
    restored.signal(libc::SIGKILL);
    let _ = restored.wait_timeout(STEP_TIMEOUT);
    let deadline = Instant::now() + STEP_TIMEOUT;
    while Path::new(&format!("/proc/{restored_pid}")).exists() {
        let state = proc_status(restored_pid, "State");
        if state.first().map(String::as_str) == Some("Z") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the jailed VMM outlived its waiter"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    standby_takes(
        &layer.path,
        &["--jail", JAIL, "--images", &images_arg],
        |socket, _| {
            assert_jailed(reported_pid(socket));
        },
    );
}

#[test]
fn jail_refuses_root_ids_and_names_the_flag() {
    if !require_kvm() {
        return;
    }
    let out = common::run_vmm(["run", "--jail", "0:0"]);
    assert_ne!(out.code, Some(0), "{out:?}");
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains("--jail 0:0") && said.contains("not be 0"),
        "{said}"
    );
    let out = common::run_vmm(["run", "--jail", "nobody"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("UID:GID"), "{}", out.stderr);
}
