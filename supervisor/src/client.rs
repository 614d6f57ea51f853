//! The API client the `relive` CLI uses: HTTP/1.1 (hyper) over the
//! supervisor's Unix socket, or over TCP with a bearer token.
//!
//! Where the API is: `--api` (a socket path or `http://HOST:PORT`), else
//! `$RELIVE_API`, else the address the last `relive up` recorded in
//! [`current_api_file`].
//!
//! Every request but a followed stream gets its whole answer within the
//! client's timeout ([`DEFAULT_TIMEOUT`], or `--timeout`): a supervisor that
//! accepts the connection and never answers does not hold the CLI for ever.
//! A followed stream (`events --follow`, `logs --follow`) is bounded until
//! its first bytes (the answer's head), then runs as long as it is read.

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Where a supervisor's API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddress {
    /// A Unix socket.
    Unix(PathBuf),
    /// `host:port` over TCP.
    Tcp(String),
}

impl ApiAddress {
    /// Parses `http://HOST:PORT` or a socket path.
    pub fn parse(s: &str) -> ApiAddress {
        match s.strip_prefix("http://") {
            Some(rest) => ApiAddress::Tcp(rest.trim_end_matches('/').to_string()),
            None => ApiAddress::Unix(PathBuf::from(s.strip_prefix("unix:").unwrap_or(s))),
        }
    }
}

impl std::fmt::Display for ApiAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiAddress::Unix(p) => write!(f, "{}", p.display()),
            ApiAddress::Tcp(a) => write!(f, "http://{a}"),
        }
    }
}

/// The file where `relive up` records its API address for the CLI.
pub fn current_api_file() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let uid = std::fs::metadata("/proc/self").map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    });
    base.join(format!("relive-{uid}.api"))
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No API address is known.
    #[error("no supervisor found: start one with `relive up FLEET.yaml`, or pass --api SOCKET|http://HOST:PORT (or set RELIVE_API)")]
    NoApi,
    /// The connection failed.
    #[error("cannot reach the supervisor at {address}: {reason}")]
    Connect {
        /// Where.
        address: String,
        /// Why.
        reason: String,
    },
    /// The API answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error text.
        message: String,
    },
    /// The answer is not what the API documents.
    #[error("bad answer from the supervisor: {0}")]
    Bad(String),
    /// No whole answer within the client's timeout.
    #[error("the supervisor at {address} did not answer within {timeout:?}: it may be stuck or overloaded (see its log and `relive events`), or the request needs longer: pass --timeout")]
    Timeout {
        /// Where.
        address: String,
        /// The bound.
        timeout: Duration,
    },
}

/// How long a request may take by default: long enough for a checkpoint of
/// a large guest or a failover, which the supervisor answers when done.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// A client for one supervisor.
#[derive(Debug, Clone)]
pub struct Client {
    address: ApiAddress,
    token: Option<String>,
    timeout: Duration,
}

impl Client {
    /// A client for `address` (or the default, see the module docs).
    pub fn new(address: Option<String>, token: Option<String>) -> Result<Client, ClientError> {
        let address = address
            .or_else(|| std::env::var("RELIVE_API").ok().filter(|s| !s.is_empty()))
            .or_else(|| {
                std::fs::read_to_string(current_api_file())
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .ok_or(ClientError::NoApi)?;
        Ok(Client {
            address: ApiAddress::parse(&address),
            token: token.or_else(|| std::env::var("RELIVE_TOKEN").ok()),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same client with every request bounded by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// `work` within the client's timeout.
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    address: self.address.to_string(),
                    timeout: self.timeout,
                })
            })
    }

    /// The address in use.
    pub fn address(&self) -> &ApiAddress {
        &self.address
    }

    async fn send(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            address: self.address.to_string(),
            reason,
        };
        let (mut sender, host) = match &self.address {
            ApiAddress::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| connect_err(e.to_string()))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| connect_err(e.to_string()))?;
                tokio::spawn(conn);
                (sender, "localhost".to_string())
            }
            ApiAddress::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| connect_err(e.to_string()))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| connect_err(e.to_string()))?;
                tokio::spawn(conn);
                (sender, addr.clone())
            }
        };
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host);
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(json) => {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request
            .body(body)
            .map_err(|e| ClientError::Bad(e.to_string()))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| connect_err(e.to_string()))
    }

    /// A request whose answer is one JSON document.
    pub async fn json(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        self.bounded(self.json_unbounded(method, path, body)).await
    }

    async fn json_unbounded(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Bad(e.to_string()))?
            .to_bytes();
        let value: serde_json::Value = if status == hyper::StatusCode::OK && path == "/metrics" {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|_| ClientError::Bad(String::from_utf8_lossy(&bytes).into_owned()))?
        };
        if !status.is_success() {
            return Err(ClientError::Api {
                status: status.as_u16(),
                message: value["error"]
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_string),
            });
        }
        Ok(value)
    }

    /// `GET path`, the body as text (for `/metrics`).
    pub async fn text(&self, path: &str) -> Result<String, ClientError> {
        self.bounded(self.text_unbounded(path)).await
    }

    async fn text_unbounded(&self, path: &str) -> Result<String, ClientError> {
        let response = self.send(hyper::Method::GET, path, None).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Bad(e.to_string()))?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if !status.is_success() {
            return Err(ClientError::Api {
                status: status.as_u16(),
                message: text,
            });
        }
        Ok(text)
    }

    /// Streams the JSON lines of `path` (`/v1/events/follow`,
    /// `/v1/vms/VM/logs?follow=true`), calling `each` with every line until
    /// it returns false or the stream ends.
    pub async fn follow(
        &self,
        path: &str,
        mut each: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let response = self
            .bounded(self.send(hyper::Method::GET, path, None))
            .await?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        let mut body = response.into_body();
        let mut pending = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Bad(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                pending.extend_from_slice(data);
                while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=pos).collect();
                    if !each(String::from_utf8_lossy(&line).trim_end()) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            ApiAddress::parse("http://127.0.0.1:7070/"),
            ApiAddress::Tcp("127.0.0.1:7070".into())
        );
        assert_eq!(
            ApiAddress::parse("/run/relive/api.sock"),
            ApiAddress::Unix("/run/relive/api.sock".into())
        );
        assert_eq!(
            ApiAddress::parse("unix:/x.sock"),
            ApiAddress::Unix("/x.sock".into())
        );
    }
}
