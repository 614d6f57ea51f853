//! The per-VM control socket server.
//!
//! A Unix stream socket (mode 0600) speaking the protocol of the
//! `relive-control` crate ([`relive_control::protocol`]): one JSON request
//! per line, one reply per line; `watch` streams the guest's agent lines and
//! ends with the VM's exit record.
//!
//! Threads: one accept thread, one thread per connection. A connection thread
//! only parses; the VM's event thread owns all state and answers through a
//! channel ([`ControlRequest`]), one channel per request, so an answer can
//! only ever reach the request it answers. A `watch` client that stops
//! reading loses lines (at most [`crate::vm::WATCH_QUEUE`] are queued for
//! it; the guest never waits for it), but never the exit record, which has a
//! slot of its own ([`WatchEnd`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use relive_control::protocol::{MAX_REQUEST_LEN, REPLY_TIMEOUT};
use relive_control::{ErrorKind, ExitRecord, Request, Response};

use crate::vm::{EventSink, VmEvent, WATCH_QUEUE};

/// A request on its way to the event thread, with the channel for answers.
#[derive(Debug)]
pub struct ControlRequest {
    /// What is asked.
    pub request: Request,
    /// Where answers go (for `watch`, every line).
    pub reply: SyncSender<Response>,
    /// For `watch`: where the exit record goes when the VM ends.
    pub watch_end: Option<WatchEnd>,
}

/// The end of a `watch`: the exit record's slot, and word that the
/// connection has written it (or given up).
#[derive(Debug)]
pub struct WatchEnd {
    record: Arc<OnceLock<ExitRecord>>,
    written: Receiver<()>,
}

impl WatchEnd {
    /// Gives the connection the VM's exit record; it writes it after the
    /// lines still queued, once the line queue's sender is dropped.
    pub fn set_record(&self, record: ExitRecord) {
        let _ = self.record.set(record);
    }

    /// Whether the connection has written (and let go) already.
    pub fn is_written(&self) -> bool {
        matches!(
            self.written.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Disconnected)
        )
    }

    /// Waits until the connection has written the record and ended, or
    /// `deadline` passed.
    pub fn wait_written(self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        // The connection thread never sends: it ends by dropping its sender.
        let _ = self.written.recv_timeout(left);
    }
}

/// Errors of the control socket server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another live process serves this socket.
    #[error("control socket {path} is in use by another VMM: pick another --control path")]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// The socket cannot be created.
    #[error("cannot create control socket {path}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The listening side, owned by the VM.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    sink: EventSink,
}

/// A listener bound before the VM was built (by [`prebind`]), waiting for
/// its [`ControlServer`].
static PREBOUND: std::sync::Mutex<Option<(PathBuf, UnixListener)>> = std::sync::Mutex::new(None);

/// Binds the control socket at `path` now, for the [`ControlServer`] the VM
/// builds later: a jailed VMM binds it on the host, before its root no longer
/// holds the socket's directory ([`crate::jail`]).
pub fn prebind(path: &Path) -> Result<(), ControlError> {
    let listener = listen(path)?;
    *PREBOUND
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((path.to_path_buf(), listener));
    Ok(())
}

/// Creates the socket at `path` (owner-only), replacing a stale one.
fn listen(path: &Path) -> Result<UnixListener, ControlError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

impl ControlServer {
    /// Serves the socket at `path`: the one [`prebind`] bound there, else a
    /// new one (replacing a stale one).
    pub fn bind(path: &Path, sink: EventSink) -> Result<Self, ControlError> {
        let prebound = PREBOUND
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take_if(|(bound, _)| bound == path)
            .map(|(_, listener)| listener);
        let listener = match prebound {
            Some(listener) => listener,
            None => listen(path)?,
        };
        Ok(ControlServer {
            path: path.to_path_buf(),
            listener,
            sink,
        })
    }

    /// Starts accepting connections on a background thread.
    pub fn start(&self) -> std::io::Result<()> {
        let listener = self.listener.try_clone()?;
        let sink = self.sink.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                // Connection threads inherit this filter.
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Control);
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let sink = sink.clone();
                    let spawned = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || serve(stream, sink));
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot start a control connection thread");
                    }
                }
            })?;
        Ok(())
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn bad_request(error: String) -> Response {
    Response::Error {
        kind: ErrorKind::BadRequest,
        error,
    }
}

fn serve(stream: UnixStream, sink: EventSink) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_REQUEST_LEN as u64)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() >= MAX_REQUEST_LEN {
            let error = format!("request longer than {MAX_REQUEST_LEN} bytes");
            let _ = writer.write_all(&bad_request(error).to_line());
            return;
        }
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let request: Request = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let error = format!(
                    "bad request: {e}; expected e.g. {{\"cmd\":\"status\"}} (commands: status, shutdown, agent, watch, pause, resume, checkpoint, restore)"
                );
                if writer.write_all(&bad_request(error).to_line()).is_err() {
                    return;
                }
                continue;
            }
        };
        if request == Request::Watch {
            watch(&mut writer, &sink);
            return;
        }
        let (reply_tx, reply_rx) = sync_channel(1);
        // A VM that ends right after answering (`shutdown`, an `agent
        // crash` the guest obeys at once) waits, as it does for a watch's
        // exit record, until this thread has written the answer: the
        // process does not end with it still here.
        let (written_tx, written_rx) = std::sync::mpsc::channel::<()>();
        let ack = Some(WatchEnd {
            record: Arc::new(OnceLock::new()),
            written: written_rx,
        });
        sink.send(VmEvent::Control(ControlRequest {
            request,
            reply: reply_tx,
            watch_end: ack,
        }));
        let response = reply_rx
            .recv_timeout(REPLY_TIMEOUT)
            .unwrap_or_else(|_| Response::Error {
                kind: ErrorKind::Timeout,
                error: format!("the VM did not answer within {REPLY_TIMEOUT:?}"),
            });
        let written = writer.write_all(&response.to_line());
        drop(written_tx);
        if written.is_err() {
            return;
        }
    }
}

/// Streams a `watch`: every line, then the exit record when the VM ends.
fn watch(writer: &mut UnixStream, sink: &EventSink) {
    let (lines_tx, lines_rx) = sync_channel(WATCH_QUEUE);
    // Dropped when this function returns: tells the event thread we are done.
    let (_written_tx, written_rx) = std::sync::mpsc::channel::<()>();
    let record = Arc::new(OnceLock::new());
    sink.send(VmEvent::Control(ControlRequest {
        request: Request::Watch,
        reply: lines_tx,
        watch_end: Some(WatchEnd {
            record: record.clone(),
            written: written_rx,
        }),
    }));
    while let Ok(response) = lines_rx.recv() {
        if writer.write_all(&response.to_line()).is_err() {
            return;
        }
    }
    if let Some(record) = record.get() {
        let _ = writer.write_all(&Response::Exit(record.clone()).to_line());
    }
}
