//! The blocking client of a VMM's control socket (the CLI, tests, benches).
//!
//! One connection carries one request at a time; replies come in order. A
//! request that times out closes the connection (the client is then
//! [`ClientError::Broken`]): its late reply can never be read as the answer
//! to the next request.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::exit::ExitRecord;
use crate::protocol::{CheckpointKind, CheckpointReport, Request, Response, RestoreReport};
use crate::status::VmStatus;
use crate::{ClientError, WatchEvent};

/// A connection to one VMM's control socket.
#[derive(Debug)]
pub struct ControlClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Option<Duration>,
    broken: bool,
}

impl ControlClient {
    /// Connects to the socket at `path`; replies are awaited without a deadline
    /// until [`ControlClient::with_timeout`] sets one.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| ClientError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(ControlClient {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            timeout: None,
            broken: false,
        })
    }

    /// Connects, retrying until the socket serves or `within` has passed (a
    /// VMM that was just started).
    pub fn connect_within(path: &Path, within: Duration) -> Result<Self, ClientError> {
        let deadline = Instant::now() + within;
        loop {
            match Self::connect(path) {
                Ok(client) => return Ok(client),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Sets how long a reply may take (`None`: no limit).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends a request without waiting for its answer.
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        if self.broken {
            return Err(ClientError::Broken {
                path: self.path.clone(),
            });
        }
        let mut line =
            serde_json::to_vec(request).map_err(|e| self.io(std::io::Error::other(e)))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| self.io(e))
    }

    /// Reads the next reply as it came (an error reply is `Ok`); `None` when
    /// the VMM closed the connection. A reply that does not come within the
    /// timeout breaks the connection.
    pub fn next_response(
        &mut self,
        waiting_for: &'static str,
    ) -> Result<Option<Response>, ClientError> {
        if self.broken {
            return Err(ClientError::Broken {
                path: self.path.clone(),
            });
        }
        self.reader
            .get_ref()
            .set_read_timeout(self.timeout)
            .map_err(|e| self.io(e))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => {
                serde_json::from_str(line.trim())
                    .map(Some)
                    .map_err(|_| ClientError::BadReply {
                        path: self.path.clone(),
                        line: line.trim().to_string(),
                    })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.broken = true;
                let _ = self.writer.shutdown(std::net::Shutdown::Both);
                Err(ClientError::Timeout {
                    path: self.path.clone(),
                    request: waiting_for,
                    after: self.timeout.unwrap_or_default(),
                })
            }
            Err(e) => Err(self.io(e)),
        }
    }

    /// Sends a request and waits for its reply; an error reply is
    /// [`ClientError::Refused`] with its kind.
    pub fn request(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.send(request)?;
        match self.next_response(request.name())? {
            None => Err(ClientError::Closed {
                path: self.path.clone(),
                request: request.name(),
            }),
            Some(Response::Error { kind, error }) => Err(ClientError::Refused {
                path: self.path.clone(),
                request: request.name(),
                kind,
                message: error,
            }),
            Some(reply) => Ok(reply),
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
    pub fn status(&mut self) -> Result<VmStatus, ClientError> {
        match self.request(&Request::Status)? {
            Response::Status(status) => Ok(*status),
            other => Err(self.unexpected("status", other)),
        }
    }

    /// `checkpoint`.
    pub fn checkpoint(&mut self, kind: CheckpointKind) -> Result<CheckpointReport, ClientError> {
        match self.request(&Request::Checkpoint { kind })? {
            Response::Checkpoint(report) => Ok(report),
            other => Err(self.unexpected("checkpoint", other)),
        }
    }

    /// `restore` (standby VMMs).
    pub fn restore(&mut self, image: &Path) -> Result<RestoreReport, ClientError> {
        let request = Request::Restore {
            image: image.display().to_string(),
        };
        match self.request(&request)? {
            Response::Restored(report) => Ok(report),
            other => Err(self.unexpected("restore", other)),
        }
    }

    /// A request answered `ok`: `shutdown`, `agent`, `pause`, `resume`.
    pub fn expect_ok(&mut self, request: &Request) -> Result<(), ClientError> {
        match self.request(request)? {
            Response::Ok => Ok(()),
            other => Err(self.unexpected(request.name(), other)),
        }
    }

    /// `agent LINE`: queue one line for the guest.
    pub fn agent(&mut self, line: &str) -> Result<(), ClientError> {
        self.expect_ok(&Request::Agent {
            line: line.to_string(),
        })
    }

    /// Turns this connection into a `watch`.
    pub fn watch(mut self) -> Result<Watch, ClientError> {
        self.expect_ok(&Request::Watch)?;
        Ok(Watch {
            client: self,
            ended: false,
        })
    }
}

/// A `watch` connection: the guest's agent lines, then why the VM ended.
#[derive(Debug)]
pub struct Watch {
    client: ControlClient,
    ended: bool,
}

impl Watch {
    /// The next event; `Ok(None)` once the VMM closed the connection (after
    /// its [`WatchEvent::Exit`], or without one when it was killed). A
    /// timeout (set with [`ControlClient::with_timeout`] before `watch`)
    /// is [`ClientError::Timeout`] and ends the watch.
    pub fn next_event(&mut self) -> Result<Option<WatchEvent>, ClientError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            match self.client.next_response("watch")? {
                None => {
                    self.ended = true;
                    return Ok(None);
                }
                Some(Response::Agent { line }) => return Ok(Some(WatchEvent::Line(line))),
                Some(Response::Paused { reason }) => {
                    return Ok(Some(WatchEvent::Paused { reason }))
                }
                Some(Response::Resumed { reason, paused_us }) => {
                    return Ok(Some(WatchEvent::Resumed { reason, paused_us }))
                }
                Some(Response::Exit(record)) => {
                    self.ended = true;
                    return Ok(Some(WatchEvent::Exit(record)));
                }
                // Replies this build does not know: skip (compatibility rule).
                Some(_) => {}
            }
        }
    }

    /// Sets how long [`Watch::next_event`] waits.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.client.timeout = timeout;
    }

    /// Reads until the VM's exit record (lines before it are dropped).
    pub fn exit_record(&mut self) -> Result<Option<ExitRecord>, ClientError> {
        while let Some(event) = self.next_event()? {
            if let WatchEvent::Exit(record) = event {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }
}
