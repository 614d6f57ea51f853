//! The tokio client of a VMM's control socket (the supervisor).
//!
//! Each request opens its own connection and is bounded by a deadline; a
//! reply that comes late is dropped with its connection, so it can never
//! answer another request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::protocol::{CheckpointKind, CheckpointReport, Request, Response, RestoreReport};
use crate::status::VmStatus;
use crate::{ClientError, WatchEvent};

/// Requests to one VMM's control socket, each with `timeout`.
#[derive(Debug, Clone)]
pub struct AsyncClient {
    path: PathBuf,
    timeout: Duration,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    }
}

async fn connect_and_send(path: &Path, request: &Request) -> Result<UnixStream, ClientError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let mut line =
        serde_json::to_vec(request).map_err(|e| io_err(path)(std::io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line).await.map_err(io_err(path))?;
    Ok(stream)
}

fn decode(path: &Path, line: &str) -> Result<Response, ClientError> {
    serde_json::from_str(line.trim()).map_err(|_| ClientError::BadReply {
        path: path.to_path_buf(),
        line: line.trim().to_string(),
    })
}

impl AsyncClient {
    /// A client of the socket at `path`.
    pub fn new(path: &Path, timeout: Duration) -> Self {
        AsyncClient {
            path: path.to_path_buf(),
            timeout,
        }
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `request` and waits for its reply; an error reply is
    /// [`ClientError::Refused`] with its kind.
    pub async fn request(&self, request: &Request) -> Result<Response, ClientError> {
        let path = &self.path;
        let work = async {
            let stream = connect_and_send(path, request).await?;
            let mut reply = String::new();
            BufReader::new(stream)
                .read_line(&mut reply)
                .await
                .map_err(io_err(path))?;
            if reply.is_empty() {
                return Err(ClientError::Closed {
                    path: path.clone(),
                    request: request.name(),
                });
            }
            decode(path, &reply)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(Response::Error { kind, error })) => Err(ClientError::Refused {
                path: path.clone(),
                request: request.name(),
                kind,
                message: error,
            }),
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                path: path.clone(),
                request: request.name(),
                after: self.timeout,
            }),
        }
    }

    fn unexpected(&self, request: &'static str, reply: Response) -> ClientError {
        ClientError::Unexpected {
            path: self.path.clone(),
            request,
            reply: format!("{reply:?}"),
        }
    }

    /// `status`.
    pub async fn status(&self) -> Result<VmStatus, ClientError> {
        match self.request(&Request::Status).await? {
            Response::Status(status) => Ok(*status),
            other => Err(self.unexpected("status", other)),
        }
    }

    /// `checkpoint`.
    pub async fn checkpoint(&self, kind: CheckpointKind) -> Result<CheckpointReport, ClientError> {
        match self.request(&Request::Checkpoint { kind }).await? {
            Response::Checkpoint(report) => Ok(report),
            other => Err(self.unexpected("checkpoint", other)),
        }
    }

    /// `restore` (standby VMMs).
    pub async fn restore(&self, image: &Path) -> Result<RestoreReport, ClientError> {
        let request = Request::Restore {
            image: image.display().to_string(),
        };
        match self.request(&request).await? {
            Response::Restored(report) => Ok(report),
            other => Err(self.unexpected("restore", other)),
        }
    }

    /// A request answered `ok`: `shutdown`, `agent`, `pause`, `resume`.
    pub async fn expect_ok(&self, request: &Request) -> Result<(), ClientError> {
        match self.request(request).await? {
            Response::Ok => Ok(()),
            other => Err(self.unexpected(request.name(), other)),
        }
    }

    /// Opens a `watch` (its `ok` within the timeout).
    pub async fn watch(&self) -> Result<AsyncWatch, ClientError> {
        let path = &self.path;
        let work = async {
            let stream = connect_and_send(path, &Request::Watch).await?;
            let mut lines = BufReader::new(stream).lines();
            match lines.next_line().await.map_err(io_err(path))? {
                None => Err(ClientError::Closed {
                    path: path.clone(),
                    request: "watch",
                }),
                Some(first) => match decode(path, &first)? {
                    Response::Ok => Ok(AsyncWatch {
                        path: path.clone(),
                        lines,
                        ended: false,
                    }),
                    Response::Error { kind, error } => Err(ClientError::Refused {
                        path: path.clone(),
                        request: "watch",
                        kind,
                        message: error,
                    }),
                    other => Err(self.unexpected("watch", other)),
                },
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    path: path.clone(),
                    request: "watch",
                    after: self.timeout,
                })
            })
    }
}

/// A `watch` connection: the guest's agent lines, then why the VM ended.
#[derive(Debug)]
pub struct AsyncWatch {
    path: PathBuf,
    lines: tokio::io::Lines<BufReader<UnixStream>>,
    ended: bool,
}

impl AsyncWatch {
    /// The next event; `None` once the connection ended (after the VMM's
    /// [`WatchEvent::Exit`], or without one when the VMM was killed or the
    /// connection broke). Cancel-safe: a `select!` may drop this future.
    pub async fn next_event(&mut self) -> Option<WatchEvent> {
        loop {
            if self.ended {
                return None;
            }
            let Ok(Some(raw)) = self.lines.next_line().await else {
                self.ended = true;
                return None;
            };
            match decode(&self.path, &raw) {
                Ok(Response::Agent { line }) => return Some(WatchEvent::Line(line)),
                Ok(Response::Paused { reason }) => return Some(WatchEvent::Paused { reason }),
                Ok(Response::Resumed { reason, paused_us }) => {
                    return Some(WatchEvent::Resumed { reason, paused_us })
                }
                Ok(Response::Exit(record)) => {
                    self.ended = true;
                    return Some(WatchEvent::Exit(record));
                }
                // Replies this build does not know: skip (compatibility rule).
                Ok(_) | Err(_) => {}
            }
        }
    }
}
