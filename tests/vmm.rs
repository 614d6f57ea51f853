//! End-to-end tests of `relive-vmm` with the bundled guest: what a user sees
//! through the real binary (exit status, the JSON exit line, `ctl status`,
//! `ctl watch`, `ctl agent`, signals, error messages).
//!
//! The bundled guest's agent protocol is described in `images/guest/guest.S`;
//! heartbeats carry the BSP's workload counter and hash, which
//! [`replay_hash`] recomputes on the host. Tests boot with
//! `relive.hb_ms=20` so that heartbeats come fast. Tests that boot a VM skip
//! (with a printed reason) without `/dev/kvm`, or fail if
//! `RELIVE_REQUIRE_KVM=1`; see `tests/common/mod.rs`, which also explains why
//! the binary must be built first (`cargo build --workspace`).

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    host_cores, require_kvm, run_vmm, temp_dir, vmm_command, ChildGuard, Vmm, Watch, STEP_TIMEOUT,
};
use relive_images::guest::{replay_hash, HASH_INIT};

/// Heartbeat period the tests give the guest.
const HB_MS: u64 = 20;

fn hb_cmdline() -> String {
    format!("relive.hb_ms={HB_MS}")
}

/// Starts the bundled guest with fast heartbeats and `extra` arguments.
fn start_guest(extra: &[&str]) -> Vmm {
    let cmdline = hb_cmdline();
    let mut args = vec!["--cmdline", cmdline.as_str()];
    args.extend_from_slice(extra);
    Vmm::start(&args)
}

/// The value of `key=value` in an agent line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .skip(1)
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn num(line: &str, key: &str) -> u64 {
    let value = field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    value
        .parse()
        .unwrap_or_else(|e| panic!("{key}={value} in {line:?} is not a number: {e}"))
}

fn hex(line: &str, key: &str) -> u64 {
    let value = field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    assert_eq!(value.len(), 16, "{key} is not 16 hex digits in {line:?}");
    u64::from_str_radix(value, 16)
        .unwrap_or_else(|e| panic!("{key}={value} in {line:?} is not hex: {e}"))
}

/// A heartbeat: `hb seq=S counter=C hash=H cpus=N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Beat {
    seq: u64,
    counter: u64,
    hash: u64,
    cpus: u64,
}

fn is_hb(line: &str) -> bool {
    line.starts_with("hb ")
}

fn parse_hb(line: &str) -> Beat {
    assert!(is_hb(line), "not a heartbeat: {line:?}");
    Beat {
        seq: num(line, "seq"),
        counter: num(line, "counter"),
        hash: hex(line, "hash"),
        cpus: num(line, "cpus"),
    }
}

/// Reads `n` heartbeats from `watch` (any other line is a failure).
fn heartbeats(watch: &mut Watch, n: usize) -> Vec<Beat> {
    (0..n)
        .map(|_| {
            let line = watch.wait_for(STEP_TIMEOUT, "heartbeat", |_| true);
            assert!(
                is_hb(&line),
                "expected only heartbeats, got {line:?}; lines: {:#?}",
                watch.last_seen(20)
            );
            parse_hb(&line)
        })
        .collect()
}

/// Checks that `beats` are consecutive, with the counter moving forward and
/// each hash the replay of the workload from the previous one.
fn assert_heartbeat_chain(beats: &[Beat]) {
    for pair in beats.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        assert_eq!(next.seq, prev.seq + 1, "seq not consecutive: {beats:#?}");
        assert!(
            next.counter > prev.counter,
            "counter did not increase: {beats:#?}"
        );
        assert_eq!(
            replay_hash(prev.counter, prev.hash, next.counter),
            next.hash,
            "hash of {next:?} is not the workload replayed from {prev:?}"
        );
    }
}

/// Waits for the VMM to exit and checks its status and JSON exit line, and
/// that it removed its control socket.
fn assert_exit(vmm: &mut Vmm, status: i32, reason: &str) -> serde_json::Value {
    let (code, record) = vmm.wait_exit(STEP_TIMEOUT);
    assert_eq!(
        (code, record["reason"].as_str()),
        (status, Some(reason)),
        "exit status and reason; exit line: {record}"
    );
    assert_eq!(record["event"], "vm-exit", "{record}");
    assert_eq!(record["status"], status, "{record}");
    assert!(record["uptime_ms"].is_u64(), "{record}");
    assert!(
        !vmm.socket.exists(),
        "the control socket {} was left behind",
        vmm.socket.display()
    );
    record
}

/// Sends agent command `cmd` once heartbeats flow, then expects the VMM to
/// exit with `status` and `reason`, the guest having acknowledged `cmd`.
fn guest_command_ends_vm(cmd: &str, status: i32, reason: &str) {
    let mut vmm = start_guest(&[]);
    let mut watch = vmm.watch();
    // A heartbeat on the watch proves the watch is registered.
    watch.wait_for(STEP_TIMEOUT, "first heartbeat", is_hb);
    vmm.agent(cmd);
    assert_exit(&mut vmm, status, reason);
    // The guest acknowledged the command before acting on it.
    let ack = format!("ok {cmd}");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !watch.is_closed() && Instant::now() < deadline {
        watch.next_line(Duration::from_millis(100));
    }
    assert!(
        watch.seen.contains(&ack),
        "watch did not show {ack:?}; last lines: {:#?}",
        watch.last_seen(10)
    );
}

#[test]
fn ready_then_heartbeats_with_increasing_counter() {
    if !require_kvm() {
        return;
    }
    let vmm = start_guest(&[]);
    let mut watch = vmm.watch();
    let first = watch.wait_for(STEP_TIMEOUT, "ready or heartbeat", |l| {
        l.starts_with("ready ") || is_hb(l)
    });
    let mut beats = Vec::new();
    if first.starts_with("ready ") {
        // ready counter=0 hash=<FNV offset> cpus=N hb_ms=20
        assert_eq!(num(&first, "hb_ms"), HB_MS, "{first}");
        assert_eq!(
            replay_hash(0, HASH_INIT, num(&first, "counter")),
            hex(&first, "hash"),
            "{first}"
        );
    } else {
        // The watch connected after the guest said ready: the VMM saw it.
        let status = vmm.status_json();
        assert_eq!(status["agent"]["ready"], true, "{status}");
        beats.push(parse_hb(&first));
    }
    beats.extend(heartbeats(&mut watch, 6 - beats.len()));
    assert_heartbeat_chain(&beats);
    // The chain starts at the workload's origin: counter 0, the FNV offset.
    assert_eq!(
        replay_hash(0, HASH_INIT, beats[0].counter),
        beats[0].hash,
        "{:?} is not the workload replayed from its start",
        beats[0]
    );
    assert!(
        beats.iter().all(|b| b.cpus == 1),
        "a 1-vCPU guest reports cpus=1: {beats:#?}"
    );
    let console = vmm.console_text();
    assert!(
        console.contains(&format!("relive-guest: up, hb_ms={HB_MS}")),
        "console: {console:?}"
    );
}

#[test]
fn agent_panic_exits_11_panic() {
    if require_kvm() {
        guest_command_ends_vm("panic", 11, "panic");
    }
}

#[test]
fn agent_crash_exits_12_triple_fault() {
    if require_kvm() {
        guest_command_ends_vm("crash", 12, "triple-fault");
    }
}

#[test]
fn agent_reset_exits_10_reset() {
    if require_kvm() {
        guest_command_ends_vm("reset", 10, "reset");
    }
}

#[test]
fn agent_exit_exits_0_exit() {
    if require_kvm() {
        guest_command_ends_vm("exit", 0, "exit");
    }
}

#[test]
fn agent_hang_stops_heartbeats_until_shutdown() {
    if !require_kvm() {
        return;
    }
    let mut vmm = start_guest(&[]);
    let mut watch = vmm.watch();
    let last = parse_hb(&watch.wait_for(STEP_TIMEOUT, "first heartbeat", is_hb));
    vmm.agent("hang");
    watch.wait_for(STEP_TIMEOUT, "ok hang", |l| l == "ok hang");
    // The loop pass that handled `hang` may still send its heartbeat; after
    // that, silence for 10 heartbeat periods.
    let quiet = Duration::from_millis(10 * HB_MS);
    let mut late = Vec::new();
    while let Some(line) = watch.next_line(quiet) {
        assert!(is_hb(&line), "unexpected line after hang: {line:?}");
        late.push(parse_hb(&line));
        assert!(
            late.len() <= 1,
            "heartbeats go on after hang: {:#?}",
            watch.last_seen(10)
        );
    }
    assert!(!watch.is_closed(), "the watch ended: did the VMM exit?");
    assert!(
        late.iter().all(|b| b.seq > last.seq),
        "{late:?} after {last:?}"
    );
    assert!(vmm.is_running(), "a hung guest keeps the VMM running");

    // The VMM sees the silence: the heartbeat age grows with time.
    let age = |status: &serde_json::Value| {
        status["agent"]["last_heartbeat_age_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("no last_heartbeat_age_ms: {status}"))
    };
    let first = vmm.status_json();
    assert!(age(&first) > 5 * HB_MS, "{first}");
    let wait_ms = 10 * HB_MS;
    std::thread::sleep(Duration::from_millis(wait_ms));
    let second = vmm.status_json();
    assert!(
        age(&second) + 1 >= age(&first) + wait_ms,
        "heartbeat age did not grow: {first} then {second}"
    );
    assert_eq!(second["state"], "running", "{second}");
    assert_eq!(
        watch.next_line(Duration::ZERO).filter(|l| is_hb(l)),
        None,
        "a heartbeat after hang"
    );
    assert!(vmm.is_running());

    let (code, out) = vmm.ctl(&["shutdown"]);
    assert_eq!((code, out.trim()), (0, "ok"));
    assert_exit(&mut vmm, 3, "shutdown");
}

#[test]
fn agent_status_is_answered_on_watch() {
    if !require_kvm() {
        return;
    }
    let mut vmm = start_guest(&[]);
    let mut watch = vmm.watch();
    let before = parse_hb(&watch.wait_for(STEP_TIMEOUT, "first heartbeat", is_hb));
    vmm.agent("status");
    let line = watch.wait_for(STEP_TIMEOUT, "status reply", |l| l.starts_with("status "));
    // status seq=S counter=C hash=H cpus=N ticks=T
    assert!(num(&line, "seq") >= before.seq, "{line} after {before:?}");
    let counter = num(&line, "counter");
    assert!(counter >= before.counter, "{line} after {before:?}");
    assert_eq!(
        replay_hash(before.counter, before.hash, counter),
        hex(&line, "hash"),
        "{line} does not continue {before:?}"
    );
    assert!(num(&line, "cpus") <= 1, "{line}");
    assert!(num(&line, "ticks") > 0, "{line}");
    // The guest keeps going.
    watch.wait_for(STEP_TIMEOUT, "heartbeat after status", is_hb);
    let (code, out) = vmm.ctl(&["shutdown"]);
    assert_eq!((code, out.trim()), (0, "ok"));
    assert_exit(&mut vmm, 3, "shutdown");
}

#[test]
fn unknown_agent_command_gets_an_error_line() {
    if !require_kvm() {
        return;
    }
    let mut vmm = start_guest(&[]);
    let mut watch = vmm.watch();
    watch.wait_for(STEP_TIMEOUT, "first heartbeat", is_hb);
    vmm.agent("bogus");
    watch.wait_for(STEP_TIMEOUT, "error reply", |l| {
        l == "error unknown command"
    });
    // The guest keeps going, and the VMM too.
    let after = parse_hb(&watch.wait_for(STEP_TIMEOUT, "heartbeat after bogus", is_hb));
    assert_eq!(
        replay_hash(0, HASH_INIT, after.counter),
        after.hash,
        "{after:?}"
    );
    assert!(vmm.is_running());
    let (code, out) = vmm.ctl(&["shutdown"]);
    assert_eq!((code, out.trim()), (0, "ok"));
    assert_exit(&mut vmm, 3, "shutdown");
}

#[test]
fn sigterm_exits_3_shutdown() {
    if !require_kvm() {
        return;
    }
    let mut vmm = start_guest(&[]);
    vmm.signal(libc::SIGTERM);
    assert_exit(&mut vmm, 3, "shutdown");
}

#[test]
fn two_vcpus_both_run() {
    if !require_kvm() {
        return;
    }
    if host_cores() < 2 {
        eprintln!(
            "skipping {}: this host has {} core(s), --vcpus 2 needs 2",
            common::test_name(),
            host_cores()
        );
        return;
    }
    let vmm = start_guest(&["--vcpus", "2"]);
    let status = vmm.status_json();
    assert_eq!(status["vcpus"], 2, "{status}");
    let mut watch = vmm.watch();
    watch.wait_for(STEP_TIMEOUT, "first heartbeat", is_hb);
    // The second vCPU starts its workload a little after the first: wait
    // until a heartbeat counts both, then expect both to keep running.
    watch.wait_for(STEP_TIMEOUT, "heartbeat with cpus=2", |l| {
        is_hb(l) && parse_hb(l).cpus == 2
    });
    let beats = heartbeats(&mut watch, 10);
    assert_heartbeat_chain(&beats);
    assert!(
        beats.iter().all(|b| (1..=2).contains(&b.cpus)),
        "cpus out of range: {beats:#?}"
    );
    let both = beats.iter().filter(|b| b.cpus == 2).count();
    assert!(
        both >= 8,
        "only {both} of 10 heartbeats saw both vCPUs advance: {beats:#?}"
    );
}

/// More vCPUs than the host has cores are refused, naming the flag that
/// allows them; with `--overcommit-vcpus` they all run (sharing cores).
#[test]
fn more_vcpus_than_cores_run_only_when_overcommitted() {
    if !require_kvm() {
        return;
    }
    let n = (host_cores() + 1).to_string();
    assert_rejected(&["--vcpus", &n], &["--vcpus", &n, "--overcommit-vcpus"]);
    let vmm = start_guest(&["--vcpus", &n, "--overcommit-vcpus"]);
    let status = vmm.status_json();
    assert_eq!(status["vcpus"].to_string(), n, "{status}");
    let mut watch = vmm.watch();
    watch.wait_for(STEP_TIMEOUT, "a heartbeat counting every vCPU", |l| {
        is_hb(l) && parse_hb(l).cpus.to_string() == n
    });
}

/// The value of the `key   value` line of `ctl status`'s human output.
fn status_field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?;
            rest.starts_with(char::is_whitespace).then(|| rest.trim())
        })
        .unwrap_or_else(|| panic!("no {key:?} line in ctl status output:\n{out}"))
}

#[test]
fn ctl_status_reports_the_vm() {
    if !require_kvm() {
        return;
    }
    let vmm = start_guest(&["--mem-mib", "64"]);
    // Wait until the guest is up and has talked.
    let deadline = Instant::now() + STEP_TIMEOUT;
    let status = loop {
        let status = vmm.status_json();
        if status["agent"]["ready"] == true && status["agent"]["last_heartbeat_age_ms"].is_u64() {
            break status;
        }
        assert!(Instant::now() < deadline, "guest not up: {status}");
        std::thread::sleep(Duration::from_millis(HB_MS));
    };
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["vcpus"], 1, "{status}");
    assert_eq!(status["mem_mib"], 64, "{status}");
    assert_eq!(status["pid"], vmm.pid(), "{status}");
    assert_eq!(status["kernel"], "bundled", "{status}");
    assert!(status["vcpu_exits"].as_u64() > Some(0), "{status}");
    assert!(
        status["io_exits"].as_u64() <= status["vcpu_exits"].as_u64(),
        "{status}"
    );
    assert!(
        status["guest_resident_bytes"].as_u64() > Some(0),
        "{status}"
    );
    assert!(
        status["guest_resident_bytes"].as_u64() <= Some(64 << 20),
        "{status}"
    );
    assert!(status["uptime_ms"].is_u64(), "{status}");
    assert!(status["agent"]["lines"].as_u64() > Some(0), "{status}");
    assert!(status["agent"]["last_line"].as_str().is_some(), "{status}");

    let (code, out) = vmm.ctl(&["status"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(status_field(&out, "state"), "running", "{out}");
    assert_eq!(status_field(&out, "pid"), vmm.pid().to_string(), "{out}");
    assert_eq!(status_field(&out, "kernel"), "bundled", "{out}");
    assert_eq!(status_field(&out, "vcpus"), "1", "{out}");
    assert!(status_field(&out, "memory").starts_with("64 MiB"), "{out}");
    assert_eq!(status_field(&out, "agent ready"), "yes", "{out}");
    assert!(
        status_field(&out, "last heartbeat").ends_with("ms ago"),
        "{out}"
    );
    let exits: u64 = status_field(&out, "vcpu exits")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("vcpu exits is not a number:\n{out}"));
    assert!(exits > 0, "{out}");
}

/// Runs `relive-vmm run` with bad `args` and checks that it fails as a user
/// expects: status 1, one `relive-vmm: error:` line naming the problem (it
/// contains every one of `keywords`), no panic, no control socket left.
fn assert_rejected(args: &[&str], keywords: &[&str]) {
    let dir = temp_dir();
    let socket = dir.join("ctl.sock");
    let console = dir.join("console.log");
    let mut argv = vec![
        "run".to_string(),
        "--control".to_string(),
        socket.display().to_string(),
        "--console".to_string(),
        console.display().to_string(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    let out = run_vmm(&argv);
    let stderr = &out.stderr;
    assert!(
        !stderr.contains("panicked"),
        "relive-vmm panicked:\n{stderr}"
    );
    assert_eq!(
        out.code,
        Some(1),
        "exit status for {args:?}; stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr:\n{stderr}"
    );
    let line = lines[0];
    assert!(line.starts_with("relive-vmm: error:"), "{line}");
    for keyword in keywords {
        assert!(
            line.contains(keyword),
            "{line:?} does not mention {keyword:?}"
        );
    }
    assert!(
        !socket.exists(),
        "control socket {} left behind",
        socket.display()
    );
}

#[test]
fn missing_kernel_file_is_rejected() {
    if !require_kvm() {
        return;
    }
    let dir = temp_dir();
    let kernel = dir.join("no-such-vmlinux");
    let kernel = kernel.to_str().expect("UTF-8 temp path");
    assert_rejected(&["--kernel", kernel], &[kernel, "kernel"]);
}

#[test]
fn non_kernel_file_is_rejected() {
    if !require_kvm() {
        return;
    }
    let dir = temp_dir();
    let path = dir.join("random.bin");
    // Deterministic noise (xorshift), not an ELF nor a bzImage header.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, bytes).expect("write the random file");
    let kernel = path.to_str().expect("UTF-8 temp path");
    assert_rejected(&["--kernel", kernel], &[kernel, "kernel"]);
}

#[test]
fn zero_memory_is_rejected() {
    if require_kvm() {
        assert_rejected(&["--mem-mib", "0"], &["--mem-mib"]);
    }
}

#[test]
fn more_memory_than_the_host_is_rejected() {
    if require_kvm() {
        assert_rejected(&["--mem-mib", "10000000"], &["--mem-mib", "10000000"]);
    }
}

#[test]
fn zero_vcpus_is_rejected() {
    if require_kvm() {
        assert_rejected(&["--vcpus", "0"], &["--vcpus"]);
    }
}

/// Needs no KVM: the count is refused before /dev/kvm is opened.
#[test]
fn a_thousand_vcpus_is_rejected() {
    assert_rejected(&["--vcpus", "1000"], &["--vcpus", "1000"]);
}

#[test]
fn overlong_command_line_is_rejected() {
    if !require_kvm() {
        return;
    }
    let cmdline = "x".repeat(3000);
    assert_rejected(&["--cmdline", &cmdline], &["command line"]);
}

#[test]
fn ctl_without_a_vmm_says_so() {
    let dir = temp_dir();
    let socket = dir.join("nonexistent.sock");
    let out = run_vmm(["ctl".as_ref(), socket.as_os_str(), "status".as_ref()]);
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "ctl on a missing socket must fail: {out:?}"
    );
    assert!(
        out.stderr.contains("is the VMM running"),
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&socket.display().to_string()),
        "the error names the socket: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn second_vmm_on_the_same_control_socket_is_refused() {
    if !require_kvm() {
        return;
    }
    let mut first = start_guest(&[]);
    let other_console = first.dir.join("console2.log");
    let out = run_vmm([
        "run".as_ref(),
        "--control".as_ref(),
        first.socket.as_os_str(),
        "--console".as_ref(),
        other_console.as_os_str(),
    ]);
    assert_eq!(out.code, Some(1), "{out:?}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "stderr: {}", out.stderr);
    assert!(lines[0].starts_with("relive-vmm: error:"), "{}", lines[0]);
    assert!(lines[0].contains("in use"), "{}", lines[0]);
    // The first VMM is unharmed and still reachable.
    assert!(first.is_running());
    assert!(first.socket.exists(), "the refused VMM removed the socket");
    let status = first.status_json();
    assert_eq!(status["pid"], first.pid(), "{status}");
    let (code, out) = first.ctl(&["shutdown"]);
    assert_eq!((code, out.trim()), (0, "ok"));
    assert_exit(&mut first, 3, "shutdown");
}

/// `relive-vmm ctl SOCK watch | head -1`: the watch ends quietly when its
/// reader goes away, and the VMM is not affected.
#[test]
fn watch_into_a_closed_pipe_ends_quietly() {
    if !require_kvm() {
        return;
    }
    let mut vmm = start_guest(&[]);
    let mut cmd = vmm_command();
    cmd.arg("ctl")
        .arg(&vmm.socket)
        .arg("watch")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut watch = ChildGuard::spawn(&mut cmd);
    // Close the reading end at once: the first line the watch prints, a
    // heartbeat within milliseconds, hits a closed pipe.
    drop(watch.child_mut().stdout.take());
    let status = watch
        .wait_timeout(STEP_TIMEOUT)
        .expect("ctl watch did not end after its reader went away");
    let mut stderr = String::new();
    if let Some(mut pipe) = watch.child_mut().stderr.take() {
        pipe.read_to_string(&mut stderr).expect("read ctl stderr");
    }
    assert!(
        !stderr.contains("panicked"),
        "ctl watch panicked:\n{stderr}"
    );
    assert_eq!(status.code(), Some(0), "{status}; stderr:\n{stderr}");
    assert!(vmm.is_running());
    assert_eq!(vmm.status_json()["state"], "running");
    let (code, out) = vmm.ctl(&["shutdown"]);
    assert_eq!((code, out.trim()), (0, "ok"));
    assert_exit(&mut vmm, 3, "shutdown");
}

/// A VMM started with `NOTIFY_SOCKET` sends sd_notify's `READY=1` there
/// once its control socket serves (what the supervisor waits for instead of
/// polling), and only once.
#[test]
fn ready_is_notified_once_the_control_socket_serves() {
    if !require_kvm() {
        return;
    }
    let dir = common::temp_dir();
    let notify_path = dir.join("notify.rdy");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    let socket = dir.join("ctl.sock");
    let mut vmm = common::ChildGuard::spawn(
        common::vmm_command()
            .arg("run")
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(dir.join("console.log"))
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let mut buf = [0u8; 64];
    let n = notify
        .recv(&mut buf)
        .expect("READY=1 within the step timeout");
    assert_eq!(&buf[..n], b"READY=1\n");
    // Serving at that moment: a status is answered without waiting for the
    // socket to appear.
    assert!(socket.exists(), "READY=1 before the control socket exists");
    let status = common::status(&socket);
    assert_eq!(serde_json::to_value(status.state).unwrap(), "running");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(notify.recv(&mut buf).is_err(), "a second notification");
    assert_eq!(
        common::request(&socket, relive_control::Request::Shutdown),
        relive_control::Response::Ok
    );
    vmm.wait_timeout(STEP_TIMEOUT).expect("the VMM exits");
}

/// `ctl fence MS`: renewed in time, the VM runs on; `fence 0` disarms it;
/// left to pass, it ends the VM with status 17 (`fenced`) at the deadline,
/// not before (cluster mode's guard against a VMM whose supervisor is gone).
#[test]
fn a_fence_not_renewed_ends_the_vm_with_status_17_at_its_deadline() {
    if !require_kvm() {
        return;
    }
    let mut vmm = start_guest(&[]);
    let mut watch = vmm.watch();
    watch.wait_for(STEP_TIMEOUT, "first heartbeat", is_hb);
    // One `ctl` round trip sets the time scale (the nested tier's emulated
    // machine is hundreds of times slower than this one).
    let probe = Instant::now();
    assert_eq!(vmm.ctl(&["status"]).0, 0);
    let rtt = probe.elapsed();
    let within = (rtt * 10).max(Duration::from_secs(1));
    let ms = within.as_millis().to_string();
    // Renewed until well past the first deadline: still running.
    let renewing = Instant::now();
    while renewing.elapsed() < within * 2 {
        assert_eq!(vmm.ctl(&["fence", &ms]).0, 0);
        std::thread::sleep(within / 10);
    }
    assert_eq!(vmm.ctl(&["fence", "0"]).0, 0, "disarm");
    std::thread::sleep(within + rtt);
    assert_eq!(
        vmm.ctl(&["status"]).0,
        0,
        "a disarmed fence must not end the VM"
    );
    watch.wait_for(
        STEP_TIMEOUT,
        "a heartbeat after the disarmed deadline",
        is_hb,
    );
    // Armed and left: the VM ends at the deadline, not before.
    let armed = Instant::now();
    assert_eq!(vmm.ctl(&["fence", &ms]).0, 0);
    let record = assert_exit(&mut vmm, 17, "fenced");
    let took = armed.elapsed();
    assert!(
        took >= within && took < within * 2 + rtt * 4 + Duration::from_secs(2),
        "ended {took:?} after a {within:?} fence (ctl round trip {rtt:?}): {record}"
    );
    assert!(
        record["detail"]
            .as_str()
            .unwrap_or("")
            .contains("fencing deadline"),
        "{record}"
    );
}
