//! `relive-agent` as a real PID 1 on the host: started by `unshare` in new
//! pid, mount and UTS namespaces, chrooted into a root made here (the agent
//! with its libraries, Debian's static busybox), its agent channel a pty
//! pair. It runs the entrypoint as the configured user with the configured
//! environment and working directory, carries the app's stdout and stderr
//! line by line with one increasing count, answers `status`, heartbeats,
//! reaps an orphan, hands SIGTERM on to the app and reports its exit code.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers fail a test by panicking

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::temp_dir;

/// Copies `bin` into `root` at the same path, with every library `ldd`
/// names (the agent is not static yet).
fn install_with_libs(bin: &Path, root: &Path, at: &str) {
    let target = root.join(at.trim_start_matches('/'));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(bin, &target).unwrap();
    let ldd = Command::new("ldd").arg(bin).output().unwrap();
    for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
        if word.starts_with('/') && Path::new(word).exists() {
            let dest = root.join(word.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(word, dest).unwrap();
        }
    }
}

/// A pty pair: (master, slave).
fn pty() -> (std::fs::File, std::fs::File) {
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname on the descriptor just
    // opened; ptsname's string is copied before any other call.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(master >= 0);
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(master))
            .to_string_lossy()
            .into_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&name)
            .unwrap();
        (std::fs::File::from_raw_fd(master), slave)
    }
}

#[test]
fn the_agent_runs_the_app_as_pid_1_carries_its_output_reaps_and_forwards_sigterm() {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/bin/busybox").exists() {
        assert!(
            !common::env_flag("RELIVE_REQUIRE_KVM"),
            "the agent test needs root and /bin/busybox (scripts/setup.sh installs it)"
        );
        eprintln!("skipping: needs root (namespaces, chroot) and /bin/busybox");
        return;
    }
    let dir = temp_dir();
    let root = dir.join("root");
    // The static build (scripts/build-agent.sh, run by the setup) is what a
    // guest gets; without it, the dynamic one with its libraries.
    let dynamic = relive_testkit::bins::beside_exe("relive-agent").unwrap();
    let target_dir = dynamic.parent().and_then(Path::parent).unwrap();
    let static_agent = ["release", "debug"]
        .iter()
        .map(|p| {
            target_dir
                .join("x86_64-unknown-linux-gnu")
                .join(p)
                .join("relive-agent")
        })
        .find(|p| p.exists());
    match static_agent {
        Some(agent) => {
            std::fs::create_dir_all(&root).unwrap();
            std::fs::copy(&agent, root.join("init")).unwrap();
        }
        None => {
            eprintln!(
                "note: no static agent (scripts/build-agent.sh): the dynamic one runs with its libraries"
            );
            install_with_libs(&dynamic, &root, "/init");
        }
    }
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "id"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::create_dir_all(root.join("work")).unwrap();
    std::fs::create_dir_all(root.join(".relive")).unwrap();
    let script = "echo hello; echo oops >&2; id -u; pwd; echo foo=$FOO; \
                  sh -c 'sleep 0.2 &'; trap 'echo term; exit 7' TERM; \
                  while true; do sleep 0.05; done";
    std::fs::write(
        root.join(".relive/config.json"),
        serde_json::to_vec(&serde_json::json!({
            "entrypoint": ["/bin/sh", "-c", script],
            "env": ["FOO=bar", "PATH=/bin"],
            "working_dir": "/work",
            "user": "1000:1000",
            "hb_ms": 50,
        }))
        .unwrap(),
    )
    .unwrap();

    let (master, slave) = pty();
    let mut unshare = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "chroot",
        ])
        .arg(&root)
        .args(["/init", "--channel-fd", "0"])
        .stdin(slave)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    // A line seen already counts: stdout and stderr are two pipes, their
    // order between them is the scheduler's.
    let wait_line = |what: &str, pred: &dyn Fn(&str) -> bool, seen: &mut Vec<String>| -> String {
        if let Some(line) = seen.iter().find(|l| pred(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no {what} from the agent; it said:\n{}", seen.join("\n")),
            }
        }
    };
    let ready = wait_line(
        "ready",
        &|l| l.starts_with("ready app=running pid="),
        &mut seen,
    );
    let app_pid: u32 = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(ready.ends_with(" notices=restored"), "{ready}");
    assert!(app_pid > 1, "{ready}");
    for want in ["hello", "1000", "/work", "foo=bar"] {
        wait_line(
            want,
            &|l| l.starts_with("out ") && l.ends_with(&format!(" {want}")),
            &mut seen,
        );
    }
    wait_line(
        "oops on stderr",
        &|l| l.starts_with("err ") && l.ends_with(" oops"),
        &mut seen,
    );
    // The orphaned `sleep 0.2` ends as PID 1's child, and is reaped.
    wait_line(
        "a heartbeat after the orphan was reaped",
        &|l| l.starts_with("hb seq=") && !l.ends_with("reaped=0"),
        &mut seen,
    );
    (&master).write_all(b"status\n").unwrap();
    wait_line(
        "status",
        &|l| l.starts_with("status app=running"),
        &mut seen,
    );
    // The VMM's notice after a restore: the agent reseeds the RNG with the
    // bytes and would step the clock (here it is the host's, and the time
    // sent is now: no step is due, so none is made).
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    (&master)
        .write_all(format!("restored time={now_ns} entropy={}\n", "ab".repeat(32)).as_bytes())
        .unwrap();
    wait_line(
        "the answer to restored",
        &|l| l == "restored reseeded=32 clock_step_ms=0",
        &mut seen,
    );

    // SIGTERM to the agent (pid 1 of the namespace, unshare's child) goes on
    // to the app, whose trap exits 7.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap();
    let agent_pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: kill(2) to the agent this test started.
    unsafe { libc::kill(agent_pid, libc::SIGTERM) };
    wait_line(
        "the app's trap",
        &|l| l.starts_with("out ") && l.ends_with(" term"),
        &mut seen,
    );
    wait_line("the exit", &|l| l == "app exited code=7", &mut seen);

    // One count over stdout and stderr, increasing, from 1.
    let counts: Vec<u64> = seen
        .iter()
        .filter(|l| l.starts_with("out ") || l.starts_with("err "))
        .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        counts,
        (1..=counts.len() as u64).collect::<Vec<_>>(),
        "{seen:#?}"
    );
    // PID 1 powers off: in a pid namespace that ends its init, and unshare.
    let deadline = Instant::now() + Duration::from_secs(10);
    while unshare.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the agent did not end after its app"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
