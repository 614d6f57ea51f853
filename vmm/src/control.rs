//! The per-VM control socket: protocol, server and client.
//!
//! A Unix stream socket (mode 0600) speaking newline-delimited JSON. Each
//! request is one line; each answer is one line, except `watch`, which answers
//! `ok` and then streams one `agent` line per line the guest sends on COM2
//! until the client disconnects.
//!
//! Requests:
//!
//! ```text
//! {"cmd":"status"}                    -> {"reply":"status", ...VmStatus fields}
//! {"cmd":"shutdown"}                  -> {"reply":"ok"} and the VMM exits with status 3
//! {"cmd":"agent","line":"status"}     -> {"reply":"ok"} once the line is queued for the guest
//! {"cmd":"watch"}                     -> {"reply":"ok"}, then {"reply":"agent","line":"hb seq=1 ..."} ...
//! {"cmd":"pause"} / {"cmd":"resume"}  -> {"reply":"ok"}
//! {"cmd":"restore","image":"PATH"}    -> {"reply":"restored","image_id":"..","path":"..","restore_us":..} (standby VMMs only)
//! {"cmd":"checkpoint","kind":"full"}  -> {"reply":"checkpoint","image_id":"..","path":"..","bytes":..,"pause_us":..,"total_us":..}
//! ```
//!
//! Any request can be answered `{"reply":"error","error":"..."}`. Unknown
//! commands and malformed JSON get such an error and the connection stays
//! open. New commands (pause, resume, checkpoint) are new `cmd` values; clients
//! must ignore reply fields they do not know.
//!
//! Threads: one accept thread, one thread per connection. A connection thread
//! only parses; the VM's event thread owns all state and answers through a
//! channel ([`ControlRequest`]). A `watch` client that stops reading loses
//! lines (at most [`crate::vm::WATCH_QUEUE`] are queued for it); the guest
//! never waits for it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::vm::{EventSink, VmEvent, VmStatus, WATCH_QUEUE};

/// Longest request line the server reads.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// How long a connection waits for the event thread to answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// VM state and counters.
    Status,
    /// Stop the VM.
    Shutdown,
    /// Send one line to the guest's agent channel.
    Agent {
        /// The line, without newline.
        line: String,
    },
    /// Stream what the guest says on the agent channel.
    Watch,
    /// Stop every vCPU (the guest's time stands still).
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// Standby VMMs only: take this image and run its guest.
    Restore {
        /// The image file (a layer is merged with its chain first).
        image: String,
    },
    /// Write a consistency image into the VM's image directory.
    Checkpoint {
        /// `full` (default) or `incremental`.
        #[serde(default)]
        kind: CheckpointKind,
    },
}

/// What a checkpoint writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointKind {
    /// Every page the guest touched.
    #[default]
    Full,
    /// Only pages dirtied since the last image, as a layer on it (a full
    /// image when there is no image to layer on yet).
    Incremental,
}

/// The answer to `checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// The image id (32 hex digits).
    pub image_id: String,
    /// What was written (an incremental request without a parent writes full).
    pub kind: CheckpointKind,
    /// The committed image file.
    pub path: String,
    /// Bytes written.
    pub bytes: u64,
    /// How long the vCPUs stood still, in microseconds.
    pub pause_us: u64,
    /// The whole checkpoint, in microseconds.
    pub total_us: u64,
}

/// An answer on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Response {
    /// Done.
    Ok,
    /// The request failed.
    Error {
        /// Why.
        error: String,
    },
    /// The answer to `status`.
    Status(Box<VmStatus>),
    /// A line the guest sent (during `watch`).
    Agent {
        /// The line.
        line: String,
    },
    /// The answer to `checkpoint`.
    Checkpoint(CheckpointReport),
    /// The answer to `restore`.
    Restored(RestoreReport),
}

/// The answer to `restore` on a standby VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The image the guest now runs from.
    pub image_id: String,
    /// Its file.
    pub path: String,
    /// From the request reaching the VMM to the vCPUs running, in microseconds.
    pub restore_us: u64,
}

/// A request on its way to the event thread, with the channel for answers.
#[derive(Debug)]
pub struct ControlRequest {
    /// What is asked.
    pub request: Request,
    /// Where answers go.
    pub reply: SyncSender<Response>,
}

/// Errors of the control socket, on either side.
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
    /// The client cannot connect.
    #[error("cannot connect to control socket {path}: is the VMM running?")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("control socket {path}: connection lost")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The other side sent something that is not protocol.
    #[error("control socket {path}: bad reply {line:?}")]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// What came.
        line: String,
    },
}

/// The listening side, owned by the VM.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    sink: EventSink,
}

impl ControlServer {
    /// Creates the socket at `path`, replacing a stale one.
    pub fn bind(path: &Path, sink: EventSink) -> Result<Self, ControlError> {
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

fn write_line(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
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
            let _ = write_line(
                &mut writer,
                &Response::Error {
                    error: format!("request longer than {MAX_REQUEST_LEN} bytes"),
                },
            );
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
                if write_line(&mut writer, &Response::Error { error }).is_err() {
                    return;
                }
                continue;
            }
        };
        let watching = request == Request::Watch;
        let (reply_tx, reply_rx) = sync_channel(WATCH_QUEUE);
        sink.send(VmEvent::Control(ControlRequest {
            request,
            reply: reply_tx,
        }));
        if watching {
            while let Ok(response) = reply_rx.recv() {
                if write_line(&mut writer, &response).is_err() {
                    return;
                }
            }
            return;
        }
        let response = reply_rx
            .recv_timeout(REPLY_TIMEOUT)
            .unwrap_or(Response::Error {
                error: "the VM did not answer in time".into(),
            });
        if write_line(&mut writer, &response).is_err() {
            return;
        }
    }
}

/// A client of one VMM's control socket.
#[derive(Debug)]
pub struct ControlClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(ControlClient {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends a request without waiting for the answer.
    pub fn send(&mut self, request: &Request) -> Result<(), ControlError> {
        let mut line = serde_json::to_vec(request).map_err(|e| ControlError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Reads the next answer; `None` when the server closed the connection.
    pub fn next_response(&mut self) -> Result<Option<Response>, ControlError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(line.trim())
            .map(Some)
            .map_err(|_| ControlError::BadReply {
                path: self.path.clone(),
                line: line.trim().to_string(),
            })
    }

    /// Sends a request and waits for its answer.
    pub fn request(&mut self, request: &Request) -> Result<Response, ControlError> {
        self.send(request)?;
        self.next_response()?.ok_or_else(|| ControlError::Io {
            path: self.path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the VMM closed the connection",
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let cases = [
            (Request::Status, r#"{"cmd":"status"}"#),
            (Request::Shutdown, r#"{"cmd":"shutdown"}"#),
            (Request::Watch, r#"{"cmd":"watch"}"#),
            (
                Request::Agent {
                    line: "panic".into(),
                },
                r#"{"cmd":"agent","line":"panic"}"#,
            ),
        ];
        for (request, wire) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), wire);
            assert_eq!(serde_json::from_str::<Request>(wire).unwrap(), request);
        }
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"agent","line":"a","x":1}"#).is_err());
    }

    #[test]
    fn responses_have_a_stable_wire_form() {
        assert_eq!(
            serde_json::to_string(&Response::Ok).unwrap(),
            r#"{"reply":"ok"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Agent { line: "hb".into() }).unwrap(),
            r#"{"reply":"agent","line":"hb"}"#
        );
        let err = Response::Error {
            error: "nope".into(),
        };
        let back: Response = serde_json::from_str(&serde_json::to_string(&err).unwrap()).unwrap();
        assert_eq!(back, err);
    }
}
