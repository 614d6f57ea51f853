//! The supervisor's handle on `relive-vmm` processes.
//!
//! Every VM runs in its own `relive-vmm` process, started in a process group
//! of its own, so a Ctrl-C or a kill of the supervisor never reaches it: VMMs
//! outlive the supervisor, and a new supervisor adopts them by pid and control
//! socket. Their stdout and stderr go to a log file in the VM's state
//! directory, for people.
//!
//! Why a VMM ended reaches the supervisor as the last message of its `watch`
//! connection ([`relive_control::WatchEvent::Exit`]); a VMM killed by a
//! signal sends none. Only a VMM that ended while nobody watched it (before
//! its first watch was open) is looked up in its log ([`last_exit_record`]).
//!
//! Exit is watched with a pidfd (readable when the process ends), the same for
//! children and adopted processes; children are then reaped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relive_control::{AsyncClient, ClientError, ExitRecord, Request};
use tokio::io::unix::AsyncFd;

/// Errors of talking to or starting a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary could not be started.
    #[error("cannot start {bin}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The log file could not be opened.
    #[error("cannot open VMM log {path}")]
    Log {
        /// The log.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control socket did not answer, or the VMM refused.
    #[error(transparent)]
    Control(#[from] ClientError),
    /// The VMM did not serve its control socket in time.
    #[error("control socket {socket}: not serving after {after:?}")]
    NotServing {
        /// The socket.
        socket: PathBuf,
        /// How long it was given.
        after: Duration,
    },
    /// The VMM ended before it served its control socket.
    #[error("the VMM exited before serving its control socket: {0}")]
    EarlyExit(String),
}

/// One line for events about how a VMM ended.
pub fn exit_detail(record: Option<&ExitRecord>) -> String {
    match record {
        Some(r) => r.detail.clone(),
        None => "the VMM ended without an exit record (killed or crashed)".into(),
    }
}

/// How long [`VmmProcess::spawn`] waits for the VMM's `READY=1` before it
/// checks the control socket itself (and then waits again).
const NOTIFY_WAIT: Duration = Duration::from_millis(20);

/// A datagram socket a starting VMM sends `READY=1` to (sd_notify's
/// protocol; the VMM finds its path in `NOTIFY_SOCKET`). It lies beside the
/// VMM's control socket, in the VM's owner-only directory, so no other user
/// can send to it; it is removed once the spawn is over.
struct NotifySocket {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// A fresh socket beside `control` (`<control>.rdy`, no longer than the
    /// control socket's path), or `None` (the spawn then polls the control
    /// socket).
    fn bind(control: &Path) -> Option<NotifySocket> {
        let path = control.with_extension("rdy");
        let _ = std::fs::remove_file(&path);
        let socket = tokio::net::UnixDatagram::bind(&path).ok()?;
        let owner_only = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        let _ = std::fs::set_permissions(&path, owner_only);
        Some(NotifySocket { socket, path })
    }

    /// Whether `READY=1` arrives within `wait`; a `MAINPID=<pid>` (a
    /// jailed VMM's starter naming the VMM) seen meanwhile goes to `main_pid`.
    async fn ready_within(&self, wait: Duration, main_pid: &mut Option<u32>) -> bool {
        let mut buf = [0u8; 512];
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await {
            if parse_notify(&buf[..n], main_pid) {
                return true;
            }
        }
        false
    }

    /// The messages already queued: whether one says `READY=1`.
    fn drain(&self, main_pid: &mut Option<u32>) -> bool {
        let mut buf = [0u8; 512];
        let mut ready = false;
        // Straight to the socket: tokio's `try_recv` trusts its readiness
        // cache, which may not know yet what just arrived.
        while let Ok((n, _)) =
            rustix::net::recv(&self.socket, &mut buf, rustix::net::RecvFlags::DONTWAIT)
        {
            ready |= parse_notify(&buf[..n], main_pid);
        }
        ready
    }
}

/// Reads one sd_notify message: whether it says `READY=1`; a
/// `MAINPID=<pid>` goes to `main_pid`.
fn parse_notify(message: &[u8], main_pid: &mut Option<u32>) -> bool {
    let mut ready = false;
    for line in message.split(|b| *b == b'\n') {
        if line == b"READY=1" {
            ready = true;
        } else if let Some(pid) = line.strip_prefix(b"MAINPID=") {
            if let Some(pid) = std::str::from_utf8(pid).ok().and_then(|p| p.parse().ok()) {
                *main_pid = Some(pid);
            }
        }
    }
    ready
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One running `relive-vmm` process.
#[derive(Debug)]
pub struct VmmProcess {
    pid: u32,
    socket: PathBuf,
    log: PathBuf,
    /// Where this process's output starts in `log` (the file is shared over
    /// time by the VMMs that took the same role: only this one's records count).
    log_start: u64,
    pidfd: Option<AsyncFd<std::os::fd::OwnedFd>>,
    child: Option<tokio::process::Child>,
    /// A jailed VMM this supervisor reaps itself (it became the VMM's
    /// parent as a child subreaper when the starter exited), and its exit
    /// status once reaped.
    subreaped: bool,
    exit_code: Option<i32>,
    /// Started with `--jail-detach`: the process spawned is a starter that
    /// names the VMM (`MAINPID`) and exits.
    expect_main_pid: bool,
}

/// Makes this process the child subreaper of everything it starts: a jailed
/// VMM, left by its starter (`relive-vmm --jail-detach`), becomes this
/// process's child, so its exit status comes here.
pub fn become_subreaper() -> std::io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))
}

fn pidfd(pid: u32) -> Option<AsyncFd<std::os::fd::OwnedFd>> {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
    // `AsyncFd::new` is deprecated because a *borrowed* descriptor could be
    // closed behind the reactor's back; here the AsyncFd owns the OwnedFd, so
    // nothing else can close it (the replacement, `register`, is unsafe).
    #[allow(deprecated)]
    AsyncFd::new(fd).ok()
}

impl VmmProcess {
    /// Starts `bin ARGS...` in its own process group, stdout and stderr
    /// appended to `log`, and waits until `socket` answers.
    pub async fn spawn(
        bin: &Path,
        args: Vec<OsString>,
        socket: &Path,
        log: &Path,
        ready_timeout: Duration,
    ) -> Result<VmmProcess, VmmError> {
        let open_log = || {
            relive_images::private::open_options()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|source| VmmError::Log {
                    path: log.to_path_buf(),
                    source,
                })
        };
        let _ = std::fs::remove_file(socket);
        let log_start = std::fs::metadata(log).map_or(0, |m| m.len());
        let notify = NotifySocket::bind(socket);
        let expect_main_pid = args.iter().any(|a| a == "--jail-detach");
        if expect_main_pid && notify.is_none() {
            return Err(VmmError::Spawn {
                bin: bin.to_path_buf(),
                source: std::io::Error::other(
                    "a jailed VMM reports its pid on a readiness socket, and none could be created beside the control socket",
                ),
            });
        }
        let mut command = tokio::process::Command::new(bin);
        match &notify {
            Some(n) => command.env("NOTIFY_SOCKET", &n.path),
            // Never the supervisor's own (systemd's): that one is not for VMMs.
            None => command.env_remove("NOTIFY_SOCKET"),
        };
        let child = command
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                bin: bin.to_path_buf(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        let mut vmm = VmmProcess {
            pid,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            log_start,
            pidfd: pidfd(pid),
            child: Some(child),
            subreaped: false,
            exit_code: None,
            expect_main_pid,
        };
        if let Err(e) = vmm.wait_serving(ready_timeout, notify.as_ref()).await {
            // One that does not serve in time is not left behind.
            vmm.kill();
            vmm.exited().await;
            return Err(e);
        }
        Ok(vmm)
    }

    /// Takes over a VMM started by an earlier supervisor, if `pid` is alive
    /// and is a `relive-vmm`; its output starts at `log_start` in `log`.
    pub fn adopt(pid: u32, socket: &Path, log: &Path, log_start: u64) -> Option<VmmProcess> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let argv0 = cmdline.split(|b| *b == 0).next()?;
        if !String::from_utf8_lossy(argv0).ends_with("relive-vmm") {
            return None;
        }
        Some(VmmProcess {
            pid,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            log_start,
            pidfd: pidfd(pid),
            child: None,
            subreaped: false,
            exit_code: None,
            expect_main_pid: false,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The log file and where this process's output starts in it.
    pub fn log(&self) -> (&Path, u64) {
        (&self.log, self.log_start)
    }

    /// Whether the process still exists (not exited, not a zombie).
    pub fn is_alive(&self) -> bool {
        is_running(self.pid)
    }

    /// Waits until the VMM serves its control socket: its `READY=1` on
    /// `notify` (no polling delay on the failover path), or, checked every
    /// few milliseconds, a `status` that answers.
    async fn wait_serving(
        &mut self,
        timeout: Duration,
        notify: Option<&NotifySocket>,
    ) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut main_pid = None;
        // A jailed VMM's starter names it (`MAINPID`) before the VMM can say
        // `READY=1`; until it has, the process here is the starter, and the
        // VMM is not ours to watch yet.
        let mut ready = false;
        let named = |me: &Self| !me.expect_main_pid || me.subreaped;
        loop {
            if let Some(n) = notify {
                ready |= n.ready_within(NOTIFY_WAIT, &mut main_pid).await;
                self.follow_main_pid(main_pid.take());
                if ready && named(self) {
                    return Ok(());
                }
            }
            if named(self) {
                let probe = AsyncClient::new(&self.socket, Duration::from_millis(500));
                if probe.request(&Request::Status).await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(n) = notify {
                // A starter that named its VMM and exited since the wait
                // above: what it sent is queued.
                ready |= n.drain(&mut main_pid);
                self.follow_main_pid(main_pid.take());
                if ready && named(self) {
                    return Ok(());
                }
            }
            if !self.is_alive() {
                let record = self.logged_exit_record();
                self.reap();
                return Err(VmmError::EarlyExit(
                    last_log_error(&self.log, self.log_start)
                        .unwrap_or_else(|| exit_detail(record.as_ref())),
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmError::NotServing {
                    socket: self.socket.clone(),
                    after: timeout,
                });
            }
            if notify.is_none() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }

    /// A jailed VMM's starter named the VMM (`MAINPID`): from now on this
    /// handle is the VMM's (its pid, its pidfd, reaped here as its
    /// subreaper); the starter, which exits at once, is reaped in the
    /// background.
    fn follow_main_pid(&mut self, main_pid: Option<u32>) {
        let Some(pid) = main_pid.filter(|&p| p != self.pid && p != 0) else {
            return;
        };
        if let Some(mut starter) = self.child.take() {
            tokio::spawn(async move {
                let _ = starter.wait().await;
            });
        }
        self.pid = pid;
        self.pidfd = pidfd(pid);
        self.subreaped = true;
    }

    /// Reaps a subreaped VMM that has ended and keeps its exit status.
    fn reap_subreaped(&mut self) {
        if !self.subreaped || self.exit_code.is_some() {
            return;
        }
        let Some(fd) = &self.pidfd else { return };
        let waited = rustix::process::waitid(
            rustix::process::WaitId::PidFd(std::os::fd::AsFd::as_fd(fd.get_ref())),
            rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
        );
        if let Ok(Some(status)) = waited {
            // A signal's end has no exit code: -1 names no exit reason.
            self.exit_code = Some(status.exit_status().unwrap_or(-1));
        }
    }

    /// Waits until the process ends (and reaps it when it is a child).
    pub async fn exited(&mut self) {
        match &self.pidfd {
            Some(fd) => {
                if let Ok(mut guard) = fd.readable().await {
                    guard.retain_ready();
                }
            }
            None => {
                while self.is_alive() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.wait().await;
        }
        self.reap_subreaped();
    }

    /// The typed reason of the process's exit status, for a child of this
    /// supervisor that has ended (none for a signal, an adopted VMM, one
    /// still running).
    pub fn status_reason(&mut self) -> Option<relive_control::ExitReason> {
        let code = match self.child.as_mut() {
            Some(child) => child.try_wait().ok()??.code()?,
            None => {
                self.reap_subreaped();
                self.exit_code?
            }
        };
        relive_control::ExitReason::from_status(code)
    }

    fn reap(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.try_wait();
        }
        self.reap_subreaped();
    }

    /// Why the process ended, from the last exit record in its own part of
    /// the log: only for a VMM that ended while no watch was open on it.
    pub fn logged_exit_record(&self) -> Option<ExitRecord> {
        last_exit_record(&self.log, self.log_start)
    }

    /// Sends SIGKILL.
    pub fn kill(&self) {
        if let Some(pid) = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }

    /// A client of its control socket, each request bounded by `timeout`
    /// (the VM's `control_timeout`: a VMM that takes longer has failed).
    pub fn client(&self, timeout: Duration) -> AsyncClient {
        AsyncClient::new(&self.socket, timeout)
    }
}

/// The live `relive-vmm` processes started to serve one of `sockets`
/// (`--control SOCKET` on their command line), by pid.
pub fn vmms_serving(sockets: &[PathBuf]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_vmm = args
                .first()
                .is_some_and(|argv0| String::from_utf8_lossy(argv0).ends_with("relive-vmm"));
            is_vmm
                && args.windows(2).any(|w| {
                    w[0] == b"--control"
                        && sockets
                            .iter()
                            .any(|s| s.as_os_str().as_encoded_bytes() == w[1])
                })
                && is_running(pid)
        })
        .collect()
}

/// Whether `pid` exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// The last `vm-exit` record in a VMM log, after byte `start`.
pub fn last_exit_record(log: &Path, start: u64) -> Option<ExitRecord> {
    let text = read_tail(log, start, 64 * 1024)?;
    text.lines()
        .rev()
        .find_map(|line| serde_json::from_str::<ExitRecord>(line.trim()).ok())
}

fn last_log_error(log: &Path, start: u64) -> Option<String> {
    let text = read_tail(log, start, 16 * 1024)?;
    text.lines()
        .rev()
        .find(|l| l.starts_with("relive-vmm: error:"))
        .map(str::to_string)
}

/// At most the last `max` bytes of `path` after byte `start`.
fn read_tail(path: &Path, start: u64, max: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max).max(start)))
        .ok()?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use relive_control::ExitReason;

    /// The readiness socket: `READY=1` (among other sd_notify lines) is
    /// heard, anything else is not, the socket is owner-only beside the
    /// control socket and gone afterwards.
    #[tokio::test]
    async fn a_vmm_readiness_is_heard_on_the_notify_socket() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("relive-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let control = dir.join("vmm-a.sock");
        let notify = NotifySocket::bind(&control).unwrap();
        assert_eq!(notify.path, dir.join("vmm-a.rdy"));
        assert_eq!(
            std::fs::metadata(&notify.path).unwrap().mode() & 0o777,
            0o600
        );
        let sender = std::os::unix::net::UnixDatagram::unbound().unwrap();
        sender.send_to(b"STATUS=booting\n", &notify.path).unwrap();
        let mut main_pid = None;
        assert!(
            !notify
                .ready_within(Duration::from_millis(30), &mut main_pid)
                .await
        );
        assert_eq!(main_pid, None);
        // A jailed VMM's starter names the VMM, then exits: heard even
        // when it is only drained after the wait.
        sender.send_to(b"MAINPID=4242\n", &notify.path).unwrap();
        assert!(!notify.drain(&mut main_pid));
        assert_eq!(main_pid, Some(4242));
        sender
            .send_to(b"MAINPID=77\nREADY=1\n", &notify.path)
            .unwrap();
        assert!(
            notify
                .ready_within(Duration::from_millis(500), &mut main_pid)
                .await
        );
        assert_eq!(main_pid, Some(77));
        let path = notify.path.clone();
        drop(notify);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A jailed VMM's starter (`--jail-detach`) names the VMM with
    /// `MAINPID`; a `READY=1` that comes first must not end the wait: the
    /// process spawned is only the starter, about to exit. Here a Python
    /// starter says `READY=1`, then names a child of its own a moment later.
    #[tokio::test]
    async fn a_jailed_vmm_is_ready_only_once_its_starter_has_named_it() {
        let Ok(python) = which("python3") else {
            eprintln!("skipped: no python3 to play the starter");
            return;
        };
        let dir = std::env::temp_dir().join(format!("relive-mainpid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let control = dir.join("vmm-a.sock");
        let script = r#"
import os, socket, subprocess, sys, time
vmm = subprocess.Popen(["sleep", "30"], start_new_session=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1\n", os.environ["NOTIFY_SOCKET"])
time.sleep(0.3)
s.sendto(("MAINPID=%d\n" % vmm.pid).encode(), os.environ["NOTIFY_SOCKET"])
"#;
        let args = vec!["-c".into(), script.into(), "--jail-detach".into()];
        let vmm = VmmProcess::spawn(
            &python,
            args,
            &control,
            &dir.join("vmm-a.log"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", vmm.pid())).unwrap();
        assert!(
            cmdline.starts_with(b"sleep\0"),
            "the supervisor took the starter for the VMM: {:?}",
            String::from_utf8_lossy(&cmdline)
        );
        vmm.kill();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn which(name: &str) -> Result<PathBuf, ()> {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or(())
    }

    #[test]
    fn the_last_exit_record_of_a_log_is_found() {
        let dir = std::env::temp_dir().join(format!("relive-sup-vmm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("vmm.log");
        let first = ExitRecord::new(ExitReason::Reset, 5, "i8042").to_json();
        let second = ExitRecord::new(ExitReason::Panic, 9, "pvpanic").to_json();
        std::fs::write(&log, format!("boot\n{first}\nnoise\n{second}\n")).unwrap();
        let record = last_exit_record(&log, 0).unwrap();
        assert_eq!(record.reason, ExitReason::Panic);
        // A later VMM sharing the log, killed without a record, inherits nothing.
        let start = std::fs::metadata(&log).unwrap().len();
        assert_eq!(last_exit_record(&log, start), None);
        std::fs::write(&log, "relive-vmm: error: nope\n").unwrap();
        assert_eq!(last_exit_record(&log, 0), None);
        assert_eq!(
            last_log_error(&log, 0).as_deref(),
            Some("relive-vmm: error: nope")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
