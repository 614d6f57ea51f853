//! The supervisor as its users meet it, for the end-to-end tests: a fleet
//! file in a temporary directory and the real `relive up` running it, driven
//! through the real CLI (`relive --api SOCKET ... --json`), its metrics
//! parsed as Prometheus text, and the VMM processes seen in /proc. See
//! `tests/supervisor.rs` for what each test checks.
//!
//! # No leaks, no hangs
//!
//! VMMs outlive the supervisor by design, so [`Fleet`]'s drop kills the
//! supervisor and then every VMM of the test by pid: the pids it saw in
//! `relive status`/`show` (`pid`, `standby_pid`), those in the state
//! directory's records (`vmm.record.a|b`), and any `relive-vmm` process whose command
//! line names the test's own state directory (no kill by name). Every wait
//! polls with a deadline. When a test fails, the drop prints the supervisor's
//! log and the events.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{run_vmm, run_with_timeout, temp_dir, vmm_bin, ChildGuard, Heartbeat, Output, TempDir};

/// The `relive` binary (the root package's own, built by `cargo test`).
pub const RELIVE: &str = env!("CARGO_BIN_EXE_relive");

/// Bound for one CLI call or one step a user waits for (a VM starting, a
/// failover completing). Generous: this is a loaded 2-core machine.
pub const STEP: Duration = Duration::from_secs(30);

/// How often a wait polls.
pub const POLL: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------
// Heartbeats
// ---------------------------------------------------------------------------

/// The heartbeat `relive show`/`status` reports for a VM.
pub fn heartbeat_of(view: &Value) -> Option<Heartbeat> {
    view["last_heartbeat"].as_str().and_then(Heartbeat::parse)
}

/// The guest's last heartbeat as recorded in an image (`relive-vmm images
/// inspect IMAGE --json`, `app_status.last_heartbeat`).
pub fn heartbeat_in_image(image: &Value) -> Heartbeat {
    let path = image["path"].as_str().expect("an image has a path");
    let out = run_vmm(["images", "inspect", path, "--json"]);
    assert_eq!(out.code, Some(0), "images inspect {path}: {out:?}");
    let inspected: Value = serde_json::from_str(&out.stdout).unwrap();
    inspected["app_status"]["last_heartbeat"]
        .as_str()
        .and_then(Heartbeat::parse)
        .unwrap_or_else(|| panic!("{path} records no heartbeat: {}", inspected["app_status"]))
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Whether `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    relive_testkit::pid_alive(pid)
}

/// The command line of `pid`, arguments joined by spaces (empty when gone).
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Whether `pid` is a live `relive-vmm` working in `state_dir`.
pub fn is_vmm_of(pid: u32, state_dir: &Path) -> bool {
    let line = cmdline(pid);
    is_alive(pid)
        && line
            .split(' ')
            .next()
            .is_some_and(|argv0| argv0.ends_with("relive-vmm"))
        && line.contains(&*state_dir.to_string_lossy())
}

/// Every live `relive-vmm` process whose command line names `state_dir`.
pub fn vmms_of(state_dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| is_vmm_of(*pid, state_dir))
        .collect()
}

/// Sends SIGKILL to `pid`.
pub fn kill9(pid: u32) {
    signal(pid, libc::SIGKILL);
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) only sends a signal; every caller checked just before
    // that `pid` is a relive-vmm process of this test (`is_vmm_of`).
    let _ = unsafe { libc::kill(pid, sig) };
}

/// Stops `pid` (SIGSTOP) as a stalled process would be: it runs no code,
/// answers nothing, and its sockets stay open. Returns when (unix ms).
pub fn stall(pid: u32) -> u64 {
    signal(pid, libc::SIGSTOP);
    unix_ms()
}

/// Waits until `probe` returns something, polling every [`POLL`]; panics
/// naming `what` after `timeout`.
pub fn wait_for<T>(
    what: impl Display,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// One scrape of `/metrics`, parsed.
pub struct Metrics {
    /// The samples.
    pub samples: Vec<prometheus_parse::Sample>,
    /// The text scraped.
    pub text: String,
}

impl Metrics {
    pub fn parse(text: String) -> Metrics {
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("the metrics are in the Prometheus text format");
        Metrics {
            samples: scrape.samples,
            text,
        }
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    /// The sum of the counter, gauge or untyped samples of `name` carrying
    /// `labels` (0 when there is none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name} is not a plain sample: {other:?}"),
            })
            .sum()
    }

    /// The value of the one sample of `name` carrying `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let n = self.matching(name, labels).count();
        assert_eq!(
            n, 1,
            "expected one {name}{labels:?} series, found {n}:\n{}",
            self.text
        );
        self.sum(name, labels)
    }

    /// Observations of histogram `name` carrying `labels` (its `_count`).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(&format!("{name}_count"), labels)
    }

    /// Asserts the VM's `relive_vm_state` is 1 for `state` only.
    pub fn assert_state(&self, vm: &str, state: &str) {
        assert_eq!(
            self.value("relive_vm_state", &[("vm", vm), ("state", state)]),
            1.0,
            "relive_vm_state of {vm} is not {state}:\n{}",
            self.text
        );
        assert_eq!(
            self.sum("relive_vm_state", &[("vm", vm)]),
            1.0,
            "{vm} is in more than one state:\n{}",
            self.text
        );
    }

    /// Asserts the VM's failures by reason are exactly `expected` (every
    /// other reason 0).
    pub fn assert_failures(&self, vm: &str, expected: &[(&str, f64)]) {
        let total: f64 = expected.iter().map(|(_, n)| n).sum();
        for (reason, n) in expected {
            assert_eq!(
                self.value("relive_failures_total", &[("vm", vm), ("reason", reason)]),
                *n,
                "relive_failures_total{{vm={vm},reason={reason}}}:\n{}",
                self.text
            );
        }
        assert_eq!(
            self.sum("relive_failures_total", &[("vm", vm)]),
            total,
            "failures of {vm} other than {expected:?}:\n{}",
            self.text
        );
    }

    /// Asserts the VM's restores by (image kind, path) are exactly `expected`,
    /// each with as many failover durations observed.
    pub fn assert_restores(&self, vm: &str, expected: &[(&str, &str, f64)]) {
        let total: f64 = expected.iter().map(|(_, _, n)| n).sum();
        for (image, path, n) in expected {
            let labels = [("vm", vm), ("image", *image), ("path", *path)];
            assert_eq!(
                self.value("relive_restores_total", &labels),
                *n,
                "relive_restores_total{labels:?}:\n{}",
                self.text
            );
            assert_eq!(
                self.count("relive_failover_duration_seconds", &labels),
                *n,
                "relive_failover_duration_seconds{labels:?} count:\n{}",
                self.text
            );
        }
        assert_eq!(
            self.sum("relive_restores_total", &[("vm", vm)]),
            total,
            "restores of {vm} other than {expected:?}:\n{}",
            self.text
        );
        assert_eq!(
            self.count("relive_failover_duration_seconds", &[("vm", vm)]),
            total,
            "failover durations of {vm} other than {expected:?}:\n{}",
            self.text
        );
    }
}

// ---------------------------------------------------------------------------
// The fleet under test
// ---------------------------------------------------------------------------

/// A fleet file in its own temporary directory, and the `relive up` running
/// it. Drop kills the supervisor and every VMM of the fleet (see the module
/// docs).
pub struct Fleet {
    supervisor: Option<ChildGuard>,
    /// How many supervisors were started (each logs to its own files).
    ups: usize,
    /// The fleet file.
    pub file: PathBuf,
    /// The fleet's state directory.
    pub state: PathBuf,
    /// The supervisor's API socket.
    pub api: PathBuf,
    /// Every VMM pid `relive status`/`show` reported.
    seen_pids: Mutex<BTreeSet<u32>>,
    /// The file mode creation mask `relive up` runs with (the test's own
    /// when `None`).
    pub umask: Option<libc::mode_t>,
    /// The host (network namespace and cgroup) `relive up` runs in, for the
    /// multi-host tests; the test's own when `None`.
    pub host: Option<std::sync::Arc<relive_testkit::hosts::Host>>,
    /// More arguments of `relive up`.
    pub up_args: Vec<String>,
    /// The test's directory. Declared last: removed once the processes are gone.
    pub dir: TempDir,
}

impl Fleet {
    /// Writes the fleet file `yaml(state_dir)` into a new temporary directory.
    pub fn new(yaml: impl FnOnce(&Path) -> String) -> Fleet {
        let dir = temp_dir();
        let state = dir.join("state");
        let file = dir.join("fleet.yaml");
        std::fs::write(&file, yaml(&state)).unwrap();
        Fleet {
            supervisor: None,
            ups: 0,
            api: state.join("api.sock"),
            file,
            state,
            seen_pids: Mutex::new(BTreeSet::new()),
            umask: None,
            host: None,
            up_args: Vec::new(),
            dir,
        }
    }

    /// The `relive up FILE` command (without output redirections).
    pub fn up_command(&self) -> Command {
        let mut cmd = Command::new(RELIVE);
        cmd.arg("up")
            .arg(&self.file)
            .arg("--vmm-bin")
            .arg(vmm_bin())
            .args(&self.up_args)
            .env_remove("RELIVE_API")
            .env_remove("RELIVE_TOKEN")
            .env("RELIVE_LOG", "info")
            // `relive up` records its API address for the CLI in
            // $XDG_RUNTIME_DIR: keep that inside the test.
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .stdin(Stdio::null());
        if let Some(mask) = self.umask {
            super::with_umask(&mut cmd, mask);
        }
        if let Some(host) = &self.host {
            host.place(&mut cmd);
        }
        cmd
    }

    /// Starts `relive up` and waits until its API answers.
    pub fn start_supervisor(&mut self) {
        assert!(self.supervisor.is_none(), "a supervisor is running already");
        self.ups += 1;
        let out = File::create(self.stdout_path()).unwrap();
        let err = File::create(self.stderr_path()).unwrap();
        let mut cmd = self.up_command();
        cmd.stdout(out).stderr(err);
        self.supervisor = Some(ChildGuard::spawn(&mut cmd));
        wait_for("the supervisor's API", STEP, || {
            if let Some(status) = self.supervisor.as_mut().and_then(ChildGuard::try_wait) {
                panic!(
                    "relive up exited ({status}) before serving its API:\n{}",
                    self.supervisor_log()
                );
            }
            (self.api.exists() && self.relive(&["status", "--json"]).code == Some(0)).then_some(())
        });
    }

    /// Kills the supervisor with SIGKILL (and reaps it); its VMMs go on.
    pub fn kill_supervisor(&mut self) {
        let mut supervisor = self.supervisor.take().expect("a running supervisor");
        supervisor.kill();
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.dir.join(format!("relive-up-{}.out", self.ups))
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.join(format!("relive-up-{}.err", self.ups))
    }

    /// Asserts that the logs written to files (the supervisor's stderr, each
    /// VMM's log in the state directory) are plain text: no ANSI colour codes.
    pub fn assert_plain_logs(&self) {
        let mut logs = vec![self.stderr_path()];
        if let Ok(dirs) = std::fs::read_dir(&self.state) {
            for dir in dirs.filter_map(Result::ok) {
                for log in ["vmm-a.log", "vmm-b.log"] {
                    logs.push(dir.path().join(log));
                }
            }
        }
        let mut read = 0;
        for log in logs {
            let Ok(text) = std::fs::read_to_string(&log) else {
                continue;
            };
            read += text.len();
            assert!(
                !text.contains('\u{1b}'),
                "{} has ANSI escape codes:\n{text}",
                log.display()
            );
        }
        assert!(read > 0, "no log was written: nothing was checked");
    }

    /// Asserts that the supervisor logged `vm`'s state changes inside the
    /// VM's own span (`vm{name=VM}`).
    pub fn assert_logged_in_span(&self, vm: &str) {
        let log = std::fs::read_to_string(self.stderr_path()).unwrap_or_default();
        let span = format!("vm{{name={vm}}}");
        assert!(
            log.lines()
                .any(|l| l.contains(&span) && l.contains("state change")),
            "no state change of {vm} logged in its span {span}:\n{log}"
        );
    }

    /// What the current supervisor printed (for failure messages).
    pub fn supervisor_log(&self) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let err = read(self.stderr_path());
        let lines: Vec<&str> = err.lines().collect();
        format!(
            "--- relive up stdout ---\n{}--- relive up stderr (last 80 lines) ---\n{}",
            read(self.stdout_path()),
            lines[lines.len().saturating_sub(80)..].join("\n")
        )
    }

    /// Runs `relive --api SOCKET ARGS...` to its end.
    pub fn relive(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(RELIVE);
        cmd.arg("--api")
            .arg(&self.api)
            .args(args)
            .env_remove("RELIVE_API")
            .env_remove("RELIVE_TOKEN")
            .env_remove("RELIVE_LOG")
            .stdin(Stdio::null());
        run_with_timeout(&mut cmd, STEP)
    }

    /// Runs `relive --api SOCKET ARGS... --json`, asserting success; its JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.relive(&all);
        assert_eq!(out.code, Some(0), "relive {all:?} failed: {out:?}");
        serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("relive {all:?} printed no JSON ({e}): {out:?}"))
    }

    /// Runs `relive ARGS... --json` for an action (`failover`, `pause`, ...),
    /// asserting that it succeeded.
    pub fn act(&self, args: &[&str]) {
        let answer = self.json(args);
        assert!(answer["ok"].is_string(), "relive {args:?}: {answer}");
    }

    pub fn note_pids(&self, view: &Value) {
        let mut seen = self.seen_pids.lock().unwrap();
        for key in ["pid", "standby_pid"] {
            if let Some(pid) = view[key].as_u64() {
                seen.insert(pid as u32);
            }
        }
    }

    /// `relive show VM --json`.
    pub fn show(&self, vm: &str) -> Value {
        let view = self.json(&["show", vm]);
        self.note_pids(&view);
        view
    }

    /// `relive status --json`.
    pub fn status(&self) -> Vec<Value> {
        let vms = self.json(&["status"]);
        let vms = vms.as_array().expect("status is a list").clone();
        for view in &vms {
            self.note_pids(view);
        }
        vms
    }

    /// `relive events --json -n 1000`: every event the supervisor keeps.
    pub fn events(&self) -> Vec<Value> {
        let out = self.relive(&["events", "--json", "-n", "1000"]);
        assert_eq!(out.code, Some(0), "relive events failed: {out:?}");
        out.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("event {l:?}: {e}")))
            .collect()
    }

    /// The state transitions of `vm` (events whose `from` differs from `to`)
    /// among the events after the first `since`.
    pub fn transitions(&self, vm: &str, since: usize) -> Vec<Value> {
        self.events()
            .into_iter()
            .skip(since)
            .filter(|e| e["vm"] == vm && e["from"] != e["to"])
            .collect()
    }

    /// Waits for a failover of `vm` among the events after the first `since`:
    /// a transition from `running` with `reason` to `restoring`, then the
    /// transition back to running. Returns both events.
    pub fn wait_failover(&self, vm: &str, since: usize, reason: &str) -> (Value, Value) {
        wait_for(format!("a failover of {vm} ({reason})"), STEP, || {
            let events = self.transitions(vm, since);
            let at = events.iter().position(|e| e["reason"] == reason)?;
            let failure = events[at].clone();
            let done = events[at + 1..]
                .iter()
                .find(|e| e["from"] == failure["to"])?
                .clone();
            Some((failure, done))
        })
    }

    /// `relive images VM --json`.
    pub fn images(&self, vm: &str) -> Vec<Value> {
        self.json(&["images", vm]).as_array().unwrap().clone()
    }

    /// `relive metrics`, parsed.
    pub fn metrics(&self) -> Metrics {
        let out = self.relive(&["metrics"]);
        assert_eq!(out.code, Some(0), "relive metrics failed: {out:?}");
        Metrics::parse(out.stdout)
    }

    /// Waits until `vm` runs, has a consistency image, has heartbeated at
    /// least `min_seq` times and, with a standby policy, has its standby
    /// ready. Returns its view.
    pub fn wait_healthy(&self, vm: &str, min_seq: u64, standby: bool) -> Value {
        self.wait_healthy_within(vm, min_seq, standby, STEP)
    }

    /// [`wait_healthy`](Self::wait_healthy) with its own deadline.
    pub fn wait_healthy_within(
        &self,
        vm: &str,
        min_seq: u64,
        standby: bool,
        timeout: Duration,
    ) -> Value {
        let last = std::sync::Mutex::new(Value::Null);
        let healthy = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(
                format!("{vm} running with a checkpoint and heartbeat seq >= {min_seq}"),
                timeout,
                || {
                    let view = self.show(vm);
                    let ok = view["state"] == "running"
                        && view["pid"].is_u64()
                        && view["last_checkpoint"].is_string()
                        && heartbeat_of(&view).is_some_and(|hb| hb.seq >= min_seq)
                        && (!standby
                            || (view["standby"] == "ready" && view["standby_pid"].is_u64()));
                    *last.lock().unwrap() = view.clone();
                    ok.then_some(view)
                },
            )
        }));
        healthy.unwrap_or_else(|e| {
            let view = last.lock().unwrap().clone();
            eprintln!("{vm} as last seen: {view:#}");
            std::panic::resume_unwind(e)
        })
    }

    /// Waits until `vm` runs in VMM `pid` and has heartbeated from it.
    pub fn wait_heartbeat_from(&self, vm: &str, pid: u64) -> Heartbeat {
        wait_for(format!("a heartbeat of {vm} from VMM {pid}"), STEP, || {
            let view = self.show(vm);
            if view["pid"].as_u64() != Some(pid) || view["state"] != "running" {
                return None;
            }
            heartbeat_of(&view)
        })
    }

    /// Kills the active VMM of `vm` with SIGKILL; returns its pid.
    pub fn kill_vmm(&self, vm: &str) -> u64 {
        let pid = self.show(vm)["pid"].as_u64().expect("the VM has a VMM");
        assert!(
            is_vmm_of(pid as u32, &self.state),
            "pid {pid} is not a VMM of this fleet: {}",
            cmdline(pid as u32)
        );
        kill9(pid as u32);
        pid
    }

    /// Sends `line` to the guest of `vm` through its VMM's control socket
    /// (`relive-vmm ctl SOCKET agent LINE`).
    pub fn agent(&self, vm: &str, line: &str) {
        let view = self.show(vm);
        let socket = view["socket"]
            .as_str()
            .expect("the VM has a control socket");
        let out = run_vmm(["ctl", socket, "agent", line]);
        assert_eq!(
            (out.code, out.stdout.trim()),
            (Some(0), "ok"),
            "ctl agent {line}: {out:?}"
        );
    }

    /// Waits for `vm`'s next periodic checkpoint, so that what follows
    /// happens early in a checkpoint interval.
    pub fn wait_next_checkpoint(&self, vm: &str) {
        let last = self.show(vm)["last_checkpoint"].clone();
        wait_for(format!("a new checkpoint of {vm}"), STEP, || {
            (self.show(vm)["last_checkpoint"] != last).then_some(())
        });
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let events =
                std::fs::read_to_string(self.state.join("events.jsonl")).unwrap_or_default();
            eprintln!("{}\n--- events ---\n{events}---", self.supervisor_log());
            // Each VMM's own log (its errors, its exit record), last lines.
            let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.state)
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .flat_map(|vm| std::fs::read_dir(vm.path()).into_iter().flatten())
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                eprintln!("--- {} (last 15 lines) ---\n{tail}", log.display());
            }
        }
        if let Some(mut supervisor) = self.supervisor.take() {
            supervisor.kill();
        }
        // Every VMM of this fleet, by pid: seen by the CLI, recorded for
        // adoption, or naming the fleet's state directory.
        let mut pids: BTreeSet<u32> = self.seen_pids.lock().map(|s| s.clone()).unwrap_or_default();
        if let Ok(dirs) = std::fs::read_dir(&self.state) {
            for dir in dirs.filter_map(Result::ok) {
                let Some(bytes) =
                    relive_supervisor::record::Record::new(&dir.path(), "vmm.record").read()
                else {
                    continue;
                };
                if let Ok(recorded) = serde_json::from_slice::<Value>(&bytes) {
                    for key in ["pid", "standby_pid"] {
                        if let Some(pid) = recorded[key].as_u64() {
                            pids.insert(pid as u32);
                        }
                    }
                }
            }
        }
        pids.extend(vmms_of(&self.state));
        for pid in &pids {
            if is_vmm_of(*pid, &self.state) {
                kill9(*pid);
            }
        }
        let deadline = Instant::now() + STEP;
        while pids.iter().any(|p| is_vmm_of(*p, &self.state)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
