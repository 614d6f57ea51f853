//! The supervisor's handle on `relive-vmm` processes.
//!
//! Every VM runs in its own `relive-vmm` process, started in a process group
//! of its own, so a Ctrl-C or a kill of the supervisor never reaches it: VMMs
//! outlive the supervisor, and a new supervisor adopts them by pid and control
//! socket. Their stdout and stderr go to a log file in the VM's state
//! directory; the last line a VMM writes there is its JSON exit record, which
//! is how the supervisor learns why a VMM ended even when it is not its child.
//!
//! Exit is watched with a pidfd (readable when the process ends), the same for
//! children and adopted processes; children are then reaped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relive_vmm::control::{Request, Response};
use relive_vmm::exit::{ExitReason, ExitRecord};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one control request may take (a checkpoint included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The control socket did not answer.
    #[error("control socket {socket}: {what}")]
    Control {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// The VMM answered with an error.
    #[error("the VMM refused: {0}")]
    Refused(String),
    /// The VMM ended before it served its control socket.
    #[error("the VMM exited before serving its control socket: {0}")]
    EarlyExit(String),
}

/// How a VMM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// Its exit record, when it wrote one.
    pub record: Option<ExitRecord>,
}

impl ExitInfo {
    /// The failure reason label for metrics and events.
    pub fn reason(&self) -> &'static str {
        match self.record.as_ref().map(|r| r.reason) {
            Some(ExitReason::Exit) => "exit",
            Some(ExitReason::Reset) => "reset",
            Some(ExitReason::Panic) => "panic",
            Some(ExitReason::TripleFault) => "triple-fault",
            Some(ExitReason::KvmError) => "kvm-error",
            Some(ExitReason::Shutdown) => "shutdown",
            None => "vmm-lost",
        }
    }

    /// One line for events.
    pub fn detail(&self) -> String {
        match &self.record {
            Some(r) => r.detail.clone(),
            None => "the VMM ended without an exit record (killed or crashed)".into(),
        }
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
            std::fs::OpenOptions::new()
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
        let child = tokio::process::Command::new(bin)
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
        };
        vmm.wait_serving(ready_timeout).await?;
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
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    async fn wait_serving(&mut self, timeout: Duration) -> Result<(), VmmError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if request(&self.socket, &Request::Status, Duration::from_millis(500))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if !self.is_alive() {
                let info = self.exit_info();
                self.reap();
                return Err(VmmError::EarlyExit(
                    last_log_error(&self.log, self.log_start).unwrap_or_else(|| info.detail()),
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmmError::Control {
                    socket: self.socket.clone(),
                    what: format!("not serving after {timeout:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until the process ends, then says why.
    pub async fn exited(&mut self) -> ExitInfo {
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
        self.exit_info()
    }

    fn reap(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.try_wait();
        }
    }

    /// Why the process ended, from the last JSON exit record in its log.
    pub fn exit_info(&self) -> ExitInfo {
        ExitInfo {
            record: last_exit_record(&self.log, self.log_start),
        }
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

    /// One control request.
    pub async fn request(&self, req: &Request) -> Result<Response, VmmError> {
        request(&self.socket, req, REQUEST_TIMEOUT).await
    }
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

/// One request on a VMM control socket, with a deadline.
pub async fn request(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, VmmError> {
    let fail = |what: String| VmmError::Control {
        socket: socket.to_path_buf(),
        what,
    };
    let work = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| fail(format!("cannot connect: {e}")))?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(req).map_err(|e| fail(e.to_string()))?;
        line.push(b'\n');
        write
            .write_all(&line)
            .await
            .map_err(|e| fail(format!("cannot send: {e}")))?;
        let mut reply = String::new();
        BufReader::new(read)
            .read_line(&mut reply)
            .await
            .map_err(|e| fail(format!("cannot read the reply: {e}")))?;
        if reply.is_empty() {
            return Err(fail("the VMM closed the connection".into()));
        }
        serde_json::from_str::<Response>(reply.trim())
            .map_err(|e| fail(format!("bad reply {:?}: {e}", reply.trim())))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(Response::Error { error })) => Err(VmmError::Refused(error)),
        Ok(result) => result,
        Err(_) => Err(fail(format!("no reply within {timeout:?}"))),
    }
}

/// A `watch` connection: the guest's agent lines as they come.
pub struct AgentWatch {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    _write: tokio::net::unix::OwnedWriteHalf,
}

impl AgentWatch {
    /// Opens a watch on `socket`.
    pub async fn open(socket: &Path) -> Result<AgentWatch, VmmError> {
        let fail = |what: String| VmmError::Control {
            socket: socket.to_path_buf(),
            what,
        };
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| fail(format!("cannot connect: {e}")))?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(&Request::Watch).map_err(|e| fail(e.to_string()))?;
        line.push(b'\n');
        write
            .write_all(&line)
            .await
            .map_err(|e| fail(format!("cannot send: {e}")))?;
        let mut lines = BufReader::new(read).lines();
        match lines.next_line().await {
            Ok(Some(first)) if first.contains("\"ok\"") => Ok(AgentWatch {
                lines,
                _write: write,
            }),
            other => Err(fail(format!("watch refused: {other:?}"))),
        }
    }

    /// The next line the guest said; `None` when the connection ended.
    pub async fn next_line(&mut self) -> Option<String> {
        loop {
            let raw = self.lines.next_line().await.ok()??;
            match serde_json::from_str::<Response>(&raw) {
                Ok(Response::Agent { line }) => return Some(line),
                Ok(_) => continue,
                Err(_) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_exit_record_of_a_log_is_found() {
        let dir = std::env::temp_dir().join(format!("relive-sup-vmm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("vmm.log");
        let first = ExitRecord::new(ExitReason::Reset, 5, "i8042").to_json();
        let second = ExitRecord::new(ExitReason::Panic, 9, "pvpanic").to_json();
        std::fs::write(&log, format!("boot\n{first}\nnoise\n{second}\n")).unwrap();
        let info = ExitInfo {
            record: last_exit_record(&log, 0),
        };
        assert_eq!(info.reason(), "panic");
        // A later VMM sharing the log, killed without a record, inherits nothing.
        let start = std::fs::metadata(&log).unwrap().len();
        let later = ExitInfo {
            record: last_exit_record(&log, start),
        };
        assert_eq!(later.reason(), "vmm-lost");
        std::fs::write(&log, "relive-vmm: error: nope\n").unwrap();
        let none = ExitInfo {
            record: last_exit_record(&log, 0),
        };
        assert_eq!(none.reason(), "vmm-lost");
        assert_eq!(
            last_log_error(&log, 0).as_deref(),
            Some("relive-vmm: error: nope")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
