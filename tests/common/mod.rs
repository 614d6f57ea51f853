//! Helpers shared by the end-to-end tests in `tests/`: they drive the real
//! `relive-vmm` binary exactly as a user would, through its command line, its
//! control socket (via `relive-vmm ctl`), its console file, its exit status and
//! the JSON exit line on its stderr.
//!
//! # Where the binary comes from
//!
//! `env!("CARGO_BIN_EXE_relive-vmm")` only exists for integration tests of the
//! package that owns the binary (`vmm/`), and the root package's dependency on
//! `relive-vmm` makes cargo build that package's *library*, not its binary. So
//! [`vmm_bin`] looks for the binary next to the test executable: the test runs
//! as `target/<profile>/deps/<test>-<hash>` and the binary is
//! `target/<profile>/relive-vmm`. Build it first:
//!
//! ```text
//! cargo build --workspace && cargo test --workspace
//! ```
//!
//! `RELIVE_VMM_BIN=/path/to/relive-vmm` overrides the lookup. A binary older
//! than the VMM's or the guest's sources gets a warning on stderr (a stale
//! binary tests old code).
//!
//! # Hardware gating
//!
//! Tests that boot a VM call [`require_kvm`] first: without a usable
//! `/dev/kvm` they print why and pass as skipped, unless `RELIVE_REQUIRE_KVM=1`
//! (CI), which turns the skip into a failure.
//!
//! # No test hangs, no process leaks
//!
//! Every wait has a deadline. Every child process (the VMM, `ctl` clients,
//! `ctl watch`) is owned by a guard that kills and reaps it on drop, also when
//! the test panics; each VMM gets its own temporary directory, removed on drop.
//! When a test fails, the guard prints the VMM's stderr and the tail of its
//! console to help diagnose it.

// Each test binary uses a subset of these helpers; a failed expectation in
// a helper is a test failure, as in a #[test] function.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fleet;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};

use relive_control::{
    CheckpointKind, CheckpointReport, ControlClient, Request, Response, VmStatus,
};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bound for one short step: starting a VMM, one `ctl` call, a VM exiting
/// after it was told to. Generous, because a loaded 2-core CI machine is slow.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of the `relive-vmm` binary (see the module docs).
pub fn vmm_bin() -> PathBuf {
    let bin = relive_testkit::bins::beside_exe("relive-vmm").unwrap_or_else(|e| panic!("{e}"));
    static STALE_CHECK: Once = Once::new();
    STALE_CHECK.call_once(|| {
        if let Some(newer) = relive_testkit::bins::newer_source_than(&bin) {
            eprintln!(
                "warning: {} is older than {}: run `cargo build --workspace` to test the current code",
                bin.display(),
                newer.display()
            );
        }
    });
    bin
}

/// The workspace root (the root package's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether the environment variable `name` is set to `1`.
pub fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// The name of the running test (libtest names each test's thread after it).
pub fn test_name() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_string(),
        _ => "this test".to_string(),
    }
}

/// Whether this test can use KVM. Without a read-write `/dev/kvm` it prints
/// `skipping <test>: /dev/kvm not available` and returns false, or panics
/// when `RELIVE_REQUIRE_KVM=1`.
pub fn require_kvm() -> bool {
    match relive_testkit::kvm_usable() {
        Ok(()) => true,
        Err(e) => {
            let test = test_name();
            assert!(
                !env_flag("RELIVE_REQUIRE_KVM"),
                "{test}: {e}, and RELIVE_REQUIRE_KVM=1 forbids skipping"
            );
            eprintln!("skipping {test}: {e}");
            false
        }
    }
}

/// Online cores of this host.
pub fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub use relive_testkit::TempDir;

/// A fresh scratch directory for a test, removed on drop.
pub fn temp_dir() -> TempDir {
    TempDir::create("relive-test").unwrap_or_else(|e| panic!("cannot create a test directory: {e}"))
}

/// Owns a child process: kills and reaps it on drop unless it already ended.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd`.
    pub fn spawn(cmd: &mut Command) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        ChildGuard {
            child,
            status: None,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child itself, e.g. to take its stdout or stderr pipe.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status, if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waitpid on a child");
        }
        self.status
    }

    /// Waits up to `timeout` for the process to end.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the process (if it still runs).
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.try_wait().is_none() {
            let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
            // SAFETY: kill(2) only sends a signal; `pid` is our own child,
            // not yet reaped (try_wait returned None), so it names that process.
            let rc = unsafe { libc::kill(pid, signal) };
            assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
        }
    }

    /// Kills the process (if it still runs) and reaps it.
    pub fn kill(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a pipe to its end on a thread, into a shared buffer.
fn collect_pipe(pipe: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    let handle = std::thread::spawn(move || {
        let mut pipe = pipe;
        let mut chunk = [0u8; 4096];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => sink
                    .lock()
                    .expect("pipe buffer")
                    .extend_from_slice(&chunk[..n]),
            }
        }
    });
    (buf, handle)
}

fn buffer_text(buf: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buf.lock().expect("pipe buffer")).into_owned()
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// Exit status code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Makes `cmd` run with the file mode creation mask `mask`.
pub fn with_umask(cmd: &mut Command, mask: libc::mode_t) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only umask(2), which is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(mask);
            Ok(())
        })
    }
}

/// A `relive-vmm` command with a predictable environment: no stdin, default
/// log level (a developer's `RELIVE_LOG` would add lines to stderr).
pub fn vmm_command() -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.env_remove("RELIVE_LOG")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to its end, capturing its output; panics (after killing it)
/// when it takes longer than `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(cmd);
    let stdout = child.child_mut().stdout.take().expect("piped stdout");
    let stderr = child.child_mut().stderr.take().expect("piped stderr");
    let (out, out_reader) = collect_pipe(stdout);
    let (err, err_reader) = collect_pipe(stderr);
    let Some(status) = child.wait_timeout(timeout) else {
        child.kill();
        panic!(
            "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
            buffer_text(&out),
            buffer_text(&err)
        );
    };
    let _ = out_reader.join();
    let _ = err_reader.join();
    Output {
        code: status.code(),
        stdout: buffer_text(&out),
        stderr: buffer_text(&err),
    }
}

/// Runs `relive-vmm ARGS...` to its end (bounded by [`STEP_TIMEOUT`]).
pub fn run_vmm<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_timeout(vmm_command().args(args), STEP_TIMEOUT)
}

/// A running `relive-vmm run`, with its control socket and console file in a
/// private temporary directory. Killed, reaped and cleaned up on drop.
#[derive(Debug)]
pub struct Vmm {
    child: ChildGuard,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
    /// `--control` path.
    pub socket: PathBuf,
    /// `--console` path.
    pub console: PathBuf,
    /// Holds the socket and the console; declared last so it is removed
    /// after the process is gone.
    pub dir: TempDir,
}

impl Vmm {
    /// Starts `relive-vmm run --control DIR/ctl.sock --console DIR/console.log
    /// EXTRA...` and waits until its control socket answers, which also means
    /// the VM is running and its SIGTERM handler is installed.
    pub fn start(extra: &[&str]) -> Vmm {
        let dir = temp_dir();
        let socket = dir.join("ctl.sock");
        let console = dir.join("console.log");
        let mut cmd = vmm_command();
        cmd.arg("run")
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(&console)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd);
        let pipe = child.child_mut().stderr.take().expect("piped stderr");
        let (stderr, stderr_reader) = collect_pipe(pipe);
        let mut vmm = Vmm {
            child,
            stderr,
            stderr_reader: Some(stderr_reader),
            socket,
            console,
            dir,
        };
        vmm.wait_until_serving(STEP_TIMEOUT);
        vmm
    }

    /// Waits for the socket to exist and answer a `status` request.
    fn wait_until_serving(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait() {
                self.join_stderr();
                panic!(
                    "relive-vmm exited ({status}) before serving its control socket; stderr:\n{}",
                    self.stderr()
                );
            }
            if self.socket.exists() && raw_status(&self.socket, deadline).is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relive-vmm did not serve {} within {timeout:?}; stderr:\n{}",
                self.socket.display(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the VMM process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_none()
    }

    /// Sends `signal` to the VMM.
    pub fn signal(&mut self, signal: libc::c_int) {
        self.child.signal(signal);
    }

    /// Everything the VMM wrote on stderr so far.
    pub fn stderr(&self) -> String {
        buffer_text(&self.stderr)
    }

    /// The console (COM1) output so far.
    pub fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Runs `relive-vmm ctl SOCKET ARGS...`; returns its exit code and stdout.
    pub fn ctl(&self, args: &[&str]) -> (i32, String) {
        let out = self.ctl_output(args);
        let code = out
            .code
            .unwrap_or_else(|| panic!("relive-vmm ctl {args:?} was killed by a signal: {out:?}"));
        (code, out.stdout)
    }

    /// Runs `relive-vmm ctl SOCKET ARGS...`; returns everything it printed.
    pub fn ctl_output(&self, args: &[&str]) -> Output {
        run_with_timeout(
            vmm_command().arg("ctl").arg(&self.socket).args(args),
            STEP_TIMEOUT,
        )
    }

    /// `relive-vmm ctl SOCKET status --json`, parsed; panics unless it succeeds.
    pub fn status_json(&self) -> serde_json::Value {
        let out = self.ctl_output(&["status", "--json"]);
        assert_eq!(out.code, Some(0), "ctl status --json failed: {out:?}");
        let status: serde_json::Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("ctl status --json printed no JSON ({e}): {out:?}"));
        assert_eq!(status["reply"], "status", "{status}");
        status
    }

    /// Sends one line to the guest agent with `relive-vmm ctl SOCKET agent
    /// LINE`, asserting that the VMM accepted it.
    pub fn agent(&self, line: &str) {
        let (code, stdout) = self.ctl(&["agent", line]);
        assert_eq!(
            (code, stdout.trim()),
            (0, "ok"),
            "ctl agent {line:?} was not accepted"
        );
    }

    /// Starts `relive-vmm ctl SOCKET watch`.
    pub fn watch(&self) -> Watch {
        let mut cmd = vmm_command();
        cmd.arg("ctl")
            .arg(&self.socket)
            .arg("watch")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd);
        let stdout = child.child_mut().stdout.take().expect("piped stdout");
        let stderr = child.child_mut().stderr.take().expect("piped stderr");
        let (stderr, _) = collect_pipe(stderr);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Watch {
            child,
            lines: rx,
            stderr,
            seen: Vec::new(),
            closed: false,
        }
    }

    /// Waits up to `timeout` for the VMM to exit; returns its exit code and
    /// the JSON object on the last line of its stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> (i32, serde_json::Value) {
        let Some(status) = self.child.wait_timeout(timeout) else {
            panic!(
                "relive-vmm did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            );
        };
        self.join_stderr();
        let stderr = self.stderr();
        let code = status
            .code()
            .unwrap_or_else(|| panic!("relive-vmm died of {status}; stderr:\n{stderr}"));
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        let record = last
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .unwrap_or_else(|| {
                panic!("relive-vmm (status {code}) printed no JSON exit line; stderr:\n{stderr}")
            });
        (code, record)
    }

    fn join_stderr(&mut self) {
        if let Some(reader) = self.stderr_reader.take() {
            // The pipe closes when the process ends; bound the wait anyway.
            let deadline = Instant::now() + STEP_TIMEOUT;
            while !reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.child.kill();
        self.join_stderr();
        if std::thread::panicking() {
            let console = self.console_text();
            let tail: String = {
                let lines: Vec<&str> = console.lines().collect();
                lines[lines.len().saturating_sub(20)..].join("\n")
            };
            eprintln!(
                "--- relive-vmm stderr ---\n{}\n--- console (last 20 lines) ---\n{tail}\n---",
                self.stderr()
            );
        }
    }
}

/// Sends `{"cmd":"status"}` on the raw socket; the reply line, if one came
/// before `deadline`.
fn raw_status(socket: &Path, deadline: Instant) -> Option<String> {
    let mut stream = UnixStream::connect(socket).ok()?;
    let left = deadline.saturating_duration_since(Instant::now());
    stream
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .ok()?;
    stream.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    line.contains("\"reply\":\"status\"").then_some(line)
}

/// A running `relive-vmm ctl SOCKET watch`: the lines it prints, with
/// timeouts. Killed on drop.
#[derive(Debug)]
pub struct Watch {
    child: ChildGuard,
    lines: Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Every line received so far, for failure messages.
    pub seen: Vec<String>,
    closed: bool,
}

impl Watch {
    /// The next line, or `None` if none came within `timeout` or the watch
    /// ended (see [`Watch::is_closed`]).
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        if self.closed {
            return None;
        }
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                None
            }
        }
    }

    /// Whether the watch's output ended (the VMM or the client went away).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Reads lines until one satisfies `pred` and returns it; panics with
    /// the lines seen if none does within `timeout`.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Some(line) if pred(&line) => return line,
                Some(_) => {}
                None => panic!(
                    "watch: no {what} within {timeout:?} (closed: {}); lines seen: {:#?}\nwatch stderr: {}",
                    self.closed,
                    self.last_seen(20),
                    buffer_text(&self.stderr)
                ),
            }
        }
    }

    /// The last `n` lines received.
    pub fn last_seen(&self, n: usize) -> &[String] {
        &self.seen[self.seen.len().saturating_sub(n)..]
    }

    /// Stops the watch client.
    pub fn stop(&mut self) {
        self.child.kill();
    }
}

// ---------------------------------------------------------------------------
// Talking to a VMM's control socket directly (library types, bounded reads)
// ---------------------------------------------------------------------------

/// A checkpoint of a guest that touched a few hundred MiB takes seconds on a
/// loaded machine; bound every answer generously (the VMM itself gives up on
/// a request after `relive_control::protocol::REPLY_TIMEOUT`).
const REPLY_TIMEOUT: Duration = Duration::from_secs(90);

/// A control-socket client for tests: `relive_control`'s client with a
/// deadline on every answer, failing the test on any error.
pub struct Client {
    inner: ControlClient,
}

impl Client {
    /// Sends a request without waiting for the answer.
    pub fn send(&mut self, request: &Request) {
        self.inner
            .send(request)
            .unwrap_or_else(|e| panic!("cannot send {request:?}: {e}"));
    }

    /// Sends a request and waits (bounded) for its answer, error replies included.
    pub fn request(&mut self, request: &Request) -> Response {
        self.send(request);
        self.next_response().unwrap_or_else(|| {
            panic!("the VMM closed the connection instead of answering {request:?}")
        })
    }

    /// The next answer (bounded), `None` when the VMM closed the connection:
    /// for `watch`, one per guest line, then the exit record.
    pub fn next_response(&mut self) -> Option<Response> {
        self.inner
            .next_response("a test request")
            .unwrap_or_else(|e| panic!("no answer within {REPLY_TIMEOUT:?}: {e}"))
    }

    /// The client itself, for its typed calls.
    pub fn control(&mut self) -> &mut ControlClient {
        &mut self.inner
    }
}

/// Connects to `socket`, waiting (bounded) until the VMM serves it.
pub fn connect(socket: &Path) -> Client {
    let inner = ControlClient::connect_within(socket, STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{} never served: {e}", socket.display()))
        .with_timeout(Some(REPLY_TIMEOUT));
    Client { inner }
}

pub fn request(socket: &Path, request: Request) -> Response {
    connect(socket).request(&request)
}

pub fn status(socket: &Path) -> VmStatus {
    connect(socket)
        .control()
        .status()
        .unwrap_or_else(|e| panic!("status: {e}"))
}

pub fn checkpoint(socket: &Path, kind: CheckpointKind) -> CheckpointReport {
    connect(socket)
        .control()
        .checkpoint(kind)
        .unwrap_or_else(|e| panic!("checkpoint: {}", relive_control::error_chain(&e)))
}

/// The `seq` of a heartbeat line (`hb seq=S ...`).
pub fn hb_seq(line: &str) -> Option<u64> {
    relive_control::Heartbeat::parse(line).map(|hb| hb.seq)
}

/// `relive-vmm restore --image IMAGE` with its control socket, its stderr
/// (`stderr.log`) and its console (unless `console` names one) in a new
/// temporary directory: the process, its socket, and the directory.
pub fn spawn_restore(image: &Path, console: Option<&Path>) -> (ChildGuard, PathBuf, TempDir) {
    let dir = temp_dir();
    let socket = dir.join("ctl.sock");
    let console = console.map_or_else(|| dir.join("console.log"), Path::to_path_buf);
    let stderr = std::fs::File::create(dir.join("stderr.log")).expect("a stderr log");
    let child = ChildGuard::spawn(
        vmm_command()
            .arg("restore")
            .arg("--image")
            .arg(image)
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(console)
            .stdout(Stdio::null())
            .stderr(stderr),
    );
    (child, socket, dir)
}

/// Waits for a child to end (after SIGKILL, say).
pub fn wait_gone(vmm: &mut Vmm) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while vmm.is_running() {
        assert!(Instant::now() < deadline, "the VMM survived SIGKILL");
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub use relive_testkit::Heartbeat;

/// Parses a heartbeat line of the bundled guest.
pub fn heartbeat(line: &str) -> Option<Heartbeat> {
    Heartbeat::parse(line)
}
