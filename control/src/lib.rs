//! relive-control: the wire contract between relive's supervisor and its VMMs.
//!
//! A `relive-vmm` process serves a Unix control socket; the supervisor, the
//! `relive-vmm ctl` CLI, the tests and the benches talk to it. Everything
//! both ends must agree on lives here, and nothing else: no KVM, no images.
//!
//! - [`protocol`]: requests, replies, typed error kinds ([`ErrorKind`]), the
//!   checkpoint and restore reports;
//! - [`status`]: what `status` answers, resource limits, the application
//!   status a guest reports;
//! - [`exit`]: why a VM ended ([`ExitReason`]), the process status of each,
//!   and the exit record ([`ExitRecord`]) that ends every `watch`;
//! - [`heartbeat`]: the agent-channel lines the host reads (heartbeats, ready);
//! - [`ControlClient`] (blocking) and, with the `tokio` feature,
//!   [`AsyncClient`]: the only two clients.
//!
//! Text for people is made once, at the edge: errors travel as
//! [`ErrorKind`] plus a message built by [`error_chain`].

pub mod exit;
pub mod heartbeat;
pub mod protocol;
pub mod status;

#[cfg(feature = "tokio")]
mod async_client;
mod client;

use std::path::PathBuf;
use std::time::Duration;

#[cfg(feature = "tokio")]
pub use async_client::{AsyncClient, AsyncWatch};
pub use client::{ControlClient, Watch};
pub use exit::{AppExit, ExitReason, ExitRecord};
pub use heartbeat::Heartbeat;
pub use protocol::{
    CheckpointKind, CheckpointReport, CopyStats, ErrorKind, Fault, Request, Response, RestoreReport,
};
pub use status::{AgentStatus, AppStatus, ChainStatus, ResourceLimits, RunState, VmStatus};

/// What a `watch` connection delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A line the guest sent on the agent channel.
    Line(String),
    /// The VM ended: always the last event of a watch, when the VMM could
    /// send it (a killed VMM sends none).
    Exit(ExitRecord),
    /// The VMM stops the vCPUs for `reason` (a checkpoint) now.
    Paused {
        /// Why.
        reason: String,
    },
    /// The vCPUs run again after standing still `paused_us`.
    Resumed {
        /// Why they had stopped.
        reason: String,
        /// How long, in microseconds.
        paused_us: u64,
    },
}

/// Errors of a control-socket client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket does not accept connections.
    #[error("cannot connect to control socket {path}: is the VMM running?")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("control socket {path}: connection lost")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM closed the connection instead of answering.
    #[error("control socket {path}: the VMM closed the connection before answering {request}")]
    Closed {
        /// The socket.
        path: PathBuf,
        /// The request.
        request: &'static str,
    },
    /// No reply in time; the connection was closed so that the late reply
    /// cannot answer another request.
    #[error("control socket {path}: no reply to {request} within {after:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The request.
        request: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// An earlier request timed out on this connection: connect again.
    #[error("control socket {path}: connection closed after a timed-out request; connect again")]
    Broken {
        /// The socket.
        path: PathBuf,
    },
    /// The reply is not protocol.
    #[error("control socket {path}: bad reply {line:?}")]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// What came.
        line: String,
    },
    /// The VMM answered with an error.
    #[error("{request} refused by the VMM ({kind}): {message}")]
    Refused {
        /// The socket.
        path: PathBuf,
        /// The request.
        request: &'static str,
        /// What kind of failure.
        kind: ErrorKind,
        /// The VMM's message.
        message: String,
    },
    /// The VMM answered with a reply of another request's kind.
    #[error("control socket {path}: {request} answered {reply}")]
    Unexpected {
        /// The socket.
        path: PathBuf,
        /// The request.
        request: &'static str,
        /// The reply, as debug text.
        reply: String,
    },
}

impl ClientError {
    /// The VMM's error kind, when it refused the request.
    pub fn refused_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Refused { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// An error and its causes as one line: `error: cause: cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    fn socket_path(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("relive-control-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("ctl.sock")
    }

    /// A server that answers the first request after `delay` with `first`,
    /// and each later one at once with an `ok`.
    fn serve(path: &std::path::Path, delay: Duration, first: Response) {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let first = first.clone();
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().unwrap();
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        line.clear();
                        let reply = if n == 0 {
                            std::thread::sleep(delay);
                            first.clone()
                        } else {
                            Response::Ok
                        };
                        if writer.write_all(&reply.to_line()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_late_reply_never_answers_the_next_request() {
        let path = socket_path("late");
        let late = Response::Error {
            kind: ErrorKind::PauseTimeout,
            error: "late".into(),
        };
        serve(&path, Duration::from_millis(300), late);
        let mut client = ControlClient::connect(&path)
            .unwrap()
            .with_timeout(Some(Duration::from_millis(50)));
        let err = client.request(&Request::Pause).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Timeout {
                    request: "pause",
                    ..
                }
            ),
            "{err}"
        );
        // The connection is closed: the late reply cannot be read as the
        // answer to `resume`.
        let err = client.request(&Request::Resume).unwrap_err();
        assert!(matches!(err, ClientError::Broken { .. }), "{err}");
        std::thread::sleep(Duration::from_millis(400));
        let mut fresh = ControlClient::connect(&path)
            .unwrap()
            .with_timeout(Some(Duration::from_secs(5)));
        fresh.expect_ok(&Request::Resume).unwrap();
    }

    #[test]
    fn an_error_reply_is_refused_with_its_kind() {
        let path = socket_path("refused");
        serve(
            &path,
            Duration::ZERO,
            Response::Error {
                kind: ErrorKind::WrongState,
                error: "standby".into(),
            },
        );
        let mut client = ControlClient::connect(&path).unwrap();
        let err = client.status().unwrap_err();
        assert_eq!(err.refused_kind(), Some(ErrorKind::WrongState));
        assert_eq!(
            err.to_string(),
            "status refused by the VMM (wrong-state): standby"
        );
    }

    #[test]
    fn error_chain_joins_causes() {
        let inner = std::io::Error::other("disk full");
        let outer = ClientError::Io {
            path: "/s".into(),
            source: inner,
        };
        assert_eq!(
            error_chain(&outer),
            "control socket /s: connection lost: disk full"
        );
    }
}
