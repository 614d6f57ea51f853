//! Cluster mode: consistency images replicated to peer hosts, so that a VM
//! taken over from a lost host continues from its latest image there.
//!
//! The owner of a VM pushes every image it commits (and the chain that
//! image needs: its full image and the layers before it, and the VM's boot
//! image) to `cluster.replicas` peer hosts over HTTP on the peers' cluster
//! listener (`cluster.advertise`, bearer `cluster.token`):
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | HEAD | `/v1/peer/images/{vm}/{file}` | 200 if the peer holds that image file, else 404 |
//! | PUT | `/v1/peer/images/{vm}/{file}` | the image file, sparse (below); header `x-relive-fencing-token` |
//! | GET | `/v1/peer/images/{vm}/{file}` | the image file, sparse (a host pulling what it lacks) |
//!
//! An image file is mostly holes (a guest's untouched memory): it is sent
//! *sparse*, its data extents only (`SEEK_DATA`/`SEEK_HOLE`), each as its
//! offset and length (u64, little-endian) followed by its bytes, with the
//! file's length in the header `x-relive-sparse-length`; the receiver
//! writes each extent at its offset and sets the length, so the copy has
//! the same holes. A 2 GiB guest that touched 16 MiB sends about 16 MiB.
//!
//! A peer writes what it receives into the VM's image directory as the
//! store writes its own images (a temporary file, fsync, rename, fsync of
//! the directory), verifies it (header, sections, every page) and records
//! the verdict beside it before it answers, then applies the VM's
//! retention. It refuses an image whose fencing token is lower than the
//! highest it has seen for that VM (409): a stale owner cannot overwrite a
//! newer owner's history. Peers are chosen per VM by rendezvous hashing of
//! the VM's and the hosts' names among the live hosts, so every owner of a
//! VM prefers the same peers.
//!
//! Once every chosen peer acknowledged an image, the owner records the
//! VM's image manifest in etcd (`vms/<vm>/images`, written under its
//! fencing token): the newest image, the files its restore needs (the boot
//! image and the chain), and the hosts that hold them. A host that takes
//! the VM over restores that image; a host that lacks files of it first
//! pulls them from a live holder (GET), verifying each as a peer verifies
//! what it is sent. Holders are preferred when hosts rank themselves for a
//! takeover, so a pull happens only when no holder is left to take it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::head;
use axum::{Json, Router};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use relive_images::store::ImageStore;
use serde::{Deserialize, Serialize};

use crate::cluster::Member;

/// The header carrying the sender's fencing token for the VM.
pub const FENCING_HEADER: &str = "x-relive-fencing-token";
/// The header carrying a refusal's reason (also on answers to HEAD).
pub const ERROR_HEADER: &str = "x-relive-error";
/// The header of a sparse body (see the module docs): the file's length.
pub const SPARSE_HEADER: &str = "x-relive-sparse-length";

/// `vms/<vm>/images` in etcd: the newest replicated image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The image's file name in the VM's image directory.
    pub file: String,
    /// The hosts that hold it (the owner first).
    pub hosts: Vec<String>,
    /// Every file a restore of it needs, in order (the boot image, the
    /// full image, the layers up to `file`). Empty in a manifest from a
    /// version that did not record it: then `file` alone.
    #[serde(default)]
    pub chain: Vec<String>,
    /// The CPU of the host that took the image
    /// ([`crate::cluster::cpu_fingerprint`]; empty from older versions).
    #[serde(default)]
    pub cpu: String,
    /// The owner's fencing token when it was written.
    pub token: i64,
}

/// What the peer listener serves.
#[derive(Clone)]
pub struct PeerState {
    /// Each VM of the fleet and its image directory and `keep_images`.
    vms: Arc<BTreeMap<String, (PathBuf, usize)>>,
    /// The highest fencing token seen per VM.
    highest: Arc<Mutex<HashMap<String, i64>>>,
    token: Arc<String>,
}

impl PeerState {
    /// The fleet's VMs (name, image directory, `keep_images`) and the
    /// cluster's bearer token.
    pub fn new(vms: impl IntoIterator<Item = (String, PathBuf, usize)>, token: String) -> Self {
        PeerState {
            vms: Arc::new(
                vms.into_iter()
                    .map(|(name, dir, keep)| (name, (dir, keep)))
                    .collect(),
            ),
            highest: Arc::new(Mutex::new(HashMap::new())),
            token: Arc::new(token),
        }
    }
}

/// The peer listener's routes.
pub fn peer_router(state: PeerState) -> Router {
    Router::new()
        .route(
            "/v1/peer/images/{vm}/{file}",
            head(has_image).put(put_image).get(get_image),
        )
        // An image is as large as the guest's touched memory: streamed to
        // disk, never held, so axum's in-memory body limit does not apply.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// A refused peer request: logged, answered as JSON.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        tracing::warn!(status = %self.0, message = %self.1, "refused a peer's request");
        // Also as a header: the answer to a HEAD has no body.
        let reason: String = self
            .1
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        let mut response = (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response();
        if let Ok(value) = header::HeaderValue::from_str(&reason) {
            response.headers_mut().insert(ERROR_HEADER, value);
        }
        response
    }
}

fn refuse(status: StatusCode, message: String) -> Refusal {
    Refusal(status, message)
}

/// The request's bearer token is the cluster's.
fn authorized(state: &PeerState, headers: &HeaderMap) -> Result<(), Refusal> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let want = state.token.as_bytes();
    let same = given.len() == want.len()
        && given
            .as_bytes()
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(refuse(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: peers send the cluster's token (cluster.token)".into(),
        ))
    }
}

/// The VM's image directory and the file's path in it, for a well-formed
/// image file name of a VM of this fleet.
fn target(state: &PeerState, vm: &str, file: &str) -> Result<(PathBuf, usize, PathBuf), Refusal> {
    let Some((dir, keep)) = state.vms.get(vm) else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("no VM named {vm:?} in this host's fleet file"),
        ));
    };
    if !is_image_file_name(file) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("{file:?} is not an image file name (<created_ms>-<32 hex digits>.rimg)"),
        ));
    }
    Ok((dir.clone(), *keep, dir.join(file)))
}

/// [`target`] of a request that carries the cluster's bearer token.
fn authorized_target(
    state: &PeerState,
    headers: &HeaderMap,
    vm: &str,
    file: &str,
) -> Result<(PathBuf, usize, PathBuf), Refusal> {
    authorized(state, headers)?;
    target(state, vm, file)
}

/// `<digits>-<32 hex digits>.rimg`, nothing else (no path separators).
pub fn is_image_file_name(file: &str) -> bool {
    let Some(stem) = file.strip_suffix(".rimg") else {
        return false;
    };
    let Some((ms, id)) = stem.split_once('-') else {
        return false;
    };
    !ms.is_empty()
        && ms.bytes().all(|b| b.is_ascii_digit())
        && id.len() == 32
        && id.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn has_image(
    State(state): State<PeerState>,
    UrlPath((vm, file)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = match authorized_target(&state, &headers, &vm, &file) {
        Ok((_, _, path)) => path,
        Err(refused) => return refused.into_response(),
    };
    // A sender's token is judged before it sends a body.
    if let Some(token) = fencing_token(&headers) {
        let highest = state.highest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(seen) = highest.get(&vm).filter(|&&seen| token < seen) {
            return stale(&vm, token, *seen).into_response();
        }
    }
    if path.is_file() {
        StatusCode::OK.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

fn fencing_token(headers: &HeaderMap) -> Option<i64> {
    headers
        .get(FENCING_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
}

fn stale(vm: &str, token: i64, seen: i64) -> Refusal {
    refuse(
        StatusCode::CONFLICT,
        format!(
            "VM {vm}: fencing token {token} is older than {seen}, which this host has seen: the \
             sender no longer owns the VM"
        ),
    )
}

async fn put_image(
    State(state): State<PeerState>,
    UrlPath((vm, file)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (dir, keep, path) = match authorized_target(&state, &headers, &vm, &file) {
        Ok(t) => t,
        Err(refused) => return refused.into_response(),
    };
    let Some(token) = fencing_token(&headers) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("no {FENCING_HEADER} header: the owner sends its fencing token"),
        )
        .into_response();
    };
    {
        let mut highest = state.highest.lock().unwrap_or_else(|e| e.into_inner());
        let seen = highest.entry(vm.clone()).or_insert(token);
        if token < *seen {
            return stale(&vm, token, *seen).into_response();
        }
        *seen = token;
    }
    tracing::debug!(%vm, %file, token, "receiving a replicated image");
    let Some(length) = sparse_length(&headers) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "no {SPARSE_HEADER} header: images are sent sparse (a peer of an older version?)"
            ),
        )
        .into_response();
    };
    if let Err(e) = receive(&dir, &path, body, length).await {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write {}: {e}", path.display()),
        )
        .into_response();
    }
    match verify_received(dir, keep, path).await {
        Ok(verdict) if verdict.good => {
            Json(serde_json::json!({ "verdict": "good" })).into_response()
        }
        Ok(verdict) => refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{file}: verification failed: {}",
                verdict.reason.unwrap_or_default()
            ),
        )
        .into_response(),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// Verifies an image file this host received (header, sections, every
/// page) and records the verdict beside it; a bad file is removed (its
/// sender sends it again with the next checkpoint's chain), a good one is
/// followed by the VM's retention (the newest chains are kept).
async fn verify_received(
    dir: PathBuf,
    keep: usize,
    path: PathBuf,
) -> Result<relive_images::store::Verdict, String> {
    tokio::task::spawn_blocking(move || {
        let store = ImageStore::open(&dir, keep.max(1)).map_err(|e| e.to_string())?;
        let verdict = store.verify(&path).map_err(|e| e.to_string())?;
        if verdict.good {
            let _ = store.retain(&[]);
        } else {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(relive_images::store::verdict_path(&path));
        }
        Ok(verdict)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Serves an image file to a host that pulls it.
async fn get_image(
    State(state): State<PeerState>,
    UrlPath((vm, file)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = match authorized_target(&state, &headers, &vm, &file) {
        Ok((_, _, path)) => path,
        Err(refused) => return refused.into_response(),
    };
    match sparse_body(&path) {
        Ok(sparse) => (
            [(SPARSE_HEADER, sparse.length.to_string())],
            Body::from_stream(sparse.stream),
        )
            .into_response(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => refuse(
            StatusCode::NOT_FOUND,
            format!("this host holds no image {file} of VM {vm}"),
        )
        .into_response(),
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read {}: {e}", path.display()),
        )
        .into_response(),
    }
}

fn sparse_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(SPARSE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// The data extents of `file` (offset, length) up to `len`: holes left out.
fn data_extents(file: &std::fs::File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let mut extents = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match seek(file, SeekFrom::Data(at)) {
            Ok(start) => start,
            // No data after `at`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = seek(file, SeekFrom::Hole(start))?.min(len);
        if end > start {
            extents.push((start, end - start));
        }
        at = end.max(start + 1);
    }
    Ok(extents)
}

/// A file as a sparse body (see the module docs).
struct SparseBody<S> {
    /// The file's length.
    length: u64,
    /// The bytes of its data extents.
    data: u64,
    stream: S,
}

/// `path` as a sparse body, read on a blocking thread 1 MiB at a time.
fn sparse_body(
    path: &Path,
) -> std::io::Result<
    SparseBody<impl futures_util::Stream<Item = std::io::Result<hyper::body::Bytes>>>,
> {
    let file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    let extents = data_extents(&file, length)?;
    let data = extents.iter().map(|(_, len)| len).sum();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<hyper::body::Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        for (offset, len) in extents {
            let mut head = Vec::with_capacity(16);
            head.extend_from_slice(&offset.to_le_bytes());
            head.extend_from_slice(&len.to_le_bytes());
            if tx.blocking_send(Ok(head.into())).is_err() {
                return;
            }
            let mut done = 0;
            while done < len {
                let n = usize::try_from((len - done).min(1 << 20)).unwrap_or(1 << 20);
                let mut buf = vec![0u8; n];
                if let Err(e) = file.read_exact_at(&mut buf, offset + done) {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
                if tx.blocking_send(Ok(buf.into())).is_err() {
                    return;
                }
                done += n as u64;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(SparseBody {
        length,
        data,
        stream,
    })
}

/// Writes the sparse `body` of a file of `length` bytes to `path` as the
/// store commits an image: a temporary file (owner-only) with the extents at
/// their offsets and the holes between, fsync, rename, fsync of the
/// directory.
async fn receive(dir: &Path, path: &Path, body: Body, length: u64) -> std::io::Result<u64> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.part"));
    relive_images::private::create_dir_all(dir)?;
    let file = relive_images::private::create_file(&temp)?;
    let mut file = tokio::fs::File::from_std(file);
    let written = async {
        let data = write_sparse(&mut file, body, length).await?;
        file.sync_all().await?;
        tokio::fs::rename(&temp, path).await?;
        tokio::fs::File::open(dir).await?.sync_all().await?;
        Ok(data)
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    written
}

/// Writes a sparse body's extents into `file` and gives it `length`; the
/// bytes of the extents.
async fn write_sparse(file: &mut tokio::fs::File, body: Body, length: u64) -> std::io::Result<u64> {
    use std::io::{Error, ErrorKind, SeekFrom};
    use tokio::io::{AsyncSeekExt, AsyncWriteExt};
    let mut stream = body.into_data_stream();
    let mut head: Vec<u8> = Vec::with_capacity(16);
    // Bytes of the current extent still to come.
    let mut left: u64 = 0;
    let mut data: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk.map_err(Error::other)?;
        while !chunk.is_empty() {
            if left == 0 {
                let take = (16 - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
                chunk = chunk.slice(take..);
                if head.len() == 16 {
                    let word = |at: usize| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&head[at..at + 8]);
                        u64::from_le_bytes(b)
                    };
                    let (offset, len) = (word(0), word(8));
                    if offset.checked_add(len).is_none_or(|end| end > length) {
                        return Err(Error::new(
                            ErrorKind::InvalidData,
                            format!("an extent at {offset} of {len} bytes lies beyond the file's {length} bytes"),
                        ));
                    }
                    file.seek(SeekFrom::Start(offset)).await?;
                    left = len;
                    head.clear();
                }
            } else {
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                file.write_all(&chunk[..take]).await?;
                chunk = chunk.slice(take..);
                left -= take as u64;
                data += take as u64;
            }
        }
    }
    if left != 0 || !head.is_empty() {
        return Err(Error::new(
            ErrorKind::UnexpectedEof,
            "the body ended inside an extent",
        ));
    }
    file.set_len(length).await?;
    Ok(data)
}

/// The peers that hold a VM's images: the other live hosts that advertise
/// a listener, those on this host's CPU first, each group ranked by
/// rendezvous hashing with the VM's name
/// ([`crate::cluster::takeover_order`]); the first `replicas`.
pub async fn peers_of(
    member: &Member,
    vm: &str,
    replicas: usize,
) -> Result<Vec<(String, std::net::SocketAddr)>, crate::cluster::ClusterError> {
    let hosts: Vec<crate::cluster::HostRecord> = member
        .hosts()
        .await?
        .into_iter()
        .filter(|h| h.host != member.host() && h.advertise.is_some())
        .collect();
    let order = crate::cluster::takeover_order(vm, &hosts, &[], &crate::cluster::cpu_fingerprint());
    Ok(order
        .into_iter()
        .filter_map(|name| {
            let addr = hosts.iter().find(|h| h.host == name)?.advertise?;
            Some((name, addr))
        })
        .take(replicas)
        .collect())
}

/// What one push did.
#[derive(Debug, Default)]
pub struct Pushed {
    /// Files sent (not already held by the peer).
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// Makes `peer` hold every file of `files` (sent in order, skipping those it
/// has), for VM `vm` under fencing token `token`.
pub async fn push(
    peer: std::net::SocketAddr,
    bearer: &str,
    vm: &str,
    token: i64,
    files: &[PathBuf],
    timeout: Duration,
) -> Result<Pushed, String> {
    let mut pushed = Pushed::default();
    for path in files {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{} has no file name", path.display()))?;
        let uri = format!("/v1/peer/images/{vm}/{file}");
        tracing::debug!(%peer, %file, "pushing an image file");
        let (held, reason) = request(
            peer,
            bearer,
            hyper::Method::HEAD,
            &uri,
            Some(token),
            None,
            timeout,
        )
        .await?;
        match held {
            StatusCode::OK => continue,
            // Not held (a refusal says why: an unknown VM is a 404 too).
            StatusCode::NOT_FOUND if reason.is_empty() => {}
            other => return Err(format!("{peer} refused {file}: {other} {reason}")),
        }
        let sparse =
            sparse_body(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let (length, data) = (sparse.length, sparse.data);
        // A large image can take long: its own bound grows with what is
        // sent (at least 10 MB/s).
        let bound = timeout + Duration::from_secs(data / 10_000_000);
        let frames = sparse
            .stream
            .map(|chunk| chunk.map(hyper::body::Frame::data));
        let body: PushBody = BodyExt::boxed(http_body_util::StreamBody::new(frames));
        let (status, body) = request(
            peer,
            bearer,
            hyper::Method::PUT,
            &uri,
            Some(token),
            Some((length, body)),
            bound,
        )
        .await?;
        if status != StatusCode::OK {
            return Err(format!("{peer} refused {file}: {status} {body}"));
        }
        pushed.files += 1;
        pushed.bytes += data;
    }
    Ok(pushed)
}

type PushBody = http_body_util::combinators::BoxBody<hyper::body::Bytes, std::io::Error>;

async fn request(
    peer: std::net::SocketAddr,
    bearer: &str,
    method: hyper::Method,
    uri: &str,
    token: Option<i64>,
    upload: Option<(u64, PushBody)>,
    timeout: Duration,
) -> Result<(StatusCode, String), String> {
    let exchange = async {
        let (length, body) = match upload {
            Some((length, body)) => (Some(length), body),
            None => (
                None,
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            ),
        };
        let response = send(peer, bearer, method, uri, token, length, body).await?;
        let status = response.status();
        let reason = response
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{peer}: {}", relive_control::error_chain(&e)))?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Ok((status, reason.filter(|_| text.is_empty()).unwrap_or(text)))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{peer} did not answer within {timeout:?}")))
}

/// One HTTP/1.1 exchange with a peer's listener, on a connection of its
/// own; the response with its body still to be read.
async fn send(
    peer: std::net::SocketAddr,
    bearer: &str,
    method: hyper::Method,
    uri: &str,
    token: Option<i64>,
    sparse_length: Option<u64>,
    body: PushBody,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = tokio::net::TcpStream::connect(peer)
        .await
        .map_err(|e| format!("cannot connect to {peer}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{peer}: {}", relive_control::error_chain(&e)))?;
    tokio::spawn(conn);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, peer.to_string())
        .header(header::AUTHORIZATION, format!("Bearer {bearer}"));
    if let Some(token) = token {
        builder = builder.header(FENCING_HEADER, token.to_string());
    }
    if let Some(length) = sparse_length {
        builder = builder.header(SPARSE_HEADER, length.to_string());
    }
    let request = builder.body(body).map_err(|e| e.to_string())?;
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("{peer}: {}", relive_control::error_chain(&e)))
}

/// What a pull fetched.
#[derive(Debug, Default)]
pub struct Pulled {
    /// The host it pulled from.
    pub from: String,
    /// Files fetched (those this host lacked).
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// Makes this host hold every file of the manifest's image (its `chain`)
/// in `store`'s directory, fetching the files it lacks from a live host of
/// the manifest's holders (in the manifest's order; the next one when a
/// holder fails) and verifying each as a peer verifies a pushed image.
pub async fn pull(
    member: &Member,
    bearer: &str,
    vm: &str,
    manifest: &Manifest,
    store: &ImageStore,
) -> Result<Pulled, String> {
    let files: Vec<String> = if manifest.chain.is_empty() {
        vec![manifest.file.clone()]
    } else {
        manifest.chain.clone()
    };
    if let Some(bad) = files.iter().find(|f| !is_image_file_name(f)) {
        return Err(format!(
            "the manifest of VM {vm} names {bad:?}, not an image file"
        ));
    }
    let dir = store.dir().to_path_buf();
    let missing: Vec<&String> = files.iter().filter(|f| !dir.join(f).is_file()).collect();
    if missing.is_empty() {
        return Ok(Pulled::default());
    }
    let live: HashMap<String, std::net::SocketAddr> = member
        .hosts()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|h| h.advertise.map(|a| (h.host, a)))
        .collect();
    let timeout = member.config().request_timeout.max(Duration::from_secs(5));
    let mut failures = Vec::new();
    for holder in manifest.hosts.iter().filter(|h| *h != member.host()) {
        let Some(&addr) = live.get(holder) else {
            failures.push(format!("host {holder} is not live"));
            continue;
        };
        let mut pulled = Pulled {
            from: holder.clone(),
            ..Pulled::default()
        };
        let mut fetched = Ok(());
        for file in &missing {
            match fetch(addr, bearer, vm, file, store, timeout).await {
                Ok(bytes) => {
                    pulled.files += 1;
                    pulled.bytes += bytes;
                }
                Err(e) => {
                    fetched = Err(format!("host {holder}: {e}"));
                    break;
                }
            }
        }
        match fetched {
            Ok(()) => return Ok(pulled),
            Err(e) => failures.push(e),
        }
    }
    Err(format!(
        "no holder of {} gave it: {}",
        manifest.file,
        if failures.is_empty() {
            "the manifest names no other host".to_string()
        } else {
            failures.join("; ")
        }
    ))
}

/// Fetches one image file from `peer` into `store`'s directory, committed
/// and verified as a received push is; the bytes that came (its data
/// extents).
async fn fetch(
    peer: std::net::SocketAddr,
    bearer: &str,
    vm: &str,
    file: &str,
    store: &ImageStore,
    timeout: Duration,
) -> Result<u64, String> {
    let uri = format!("/v1/peer/images/{vm}/{file}");
    let empty: PushBody = http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed();
    let response = tokio::time::timeout(
        timeout,
        send(peer, bearer, hyper::Method::GET, &uri, None, None, empty),
    )
    .await
    .unwrap_or_else(|_| Err(format!("{peer} did not answer within {timeout:?}")))?;
    if response.status() != StatusCode::OK {
        let reason = response
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        return Err(format!("{file}: {} {reason}", response.status()));
    }
    let Some(len) = sparse_length(response.headers()) else {
        return Err(format!(
            "{file}: the answer is not sparse (no {SPARSE_HEADER})"
        ));
    };
    // As a push: its own bound grows with its size (at least 10 MB/s).
    let bound = timeout + Duration::from_secs(len / 10_000_000);
    let (dir, path) = (store.dir().to_path_buf(), store.dir().join(file));
    let data = tokio::time::timeout(
        bound,
        receive(&dir, &path, Body::new(response.into_body()), len),
    )
    .await
    .map_err(|_| format!("{file}: not received within {bound:?}"))?
    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let verdict = verify_received(dir, store.keep(), path).await?;
    if !verdict.good {
        return Err(format!(
            "{file}: verification failed: {}",
            verdict.reason.unwrap_or_default()
        ));
    }
    Ok(data)
}

/// Replicates image `image` of VM `vm` (and its chain, and the boot image)
/// to the VM's peers, then records the manifest. Returns the manifest and
/// how long it took.
pub async fn replicate(
    member: Arc<Member>,
    bearer: String,
    vm: String,
    token: i64,
    store: ImageStore,
    image: PathBuf,
    replicas: usize,
) -> Result<(Manifest, Pushed, Duration), String> {
    let peers = peers_of(&member, &vm, replicas)
        .await
        .map_err(|e| e.to_string())?;
    if peers.is_empty() {
        return Err("no peer host advertises a listener: nothing replicated".into());
    }
    replicate_to(&member, &bearer, &vm, token, &store, &image, peers).await
}

/// [`replicate`] to the given peers (an operator's move: the host the VM
/// goes to).
pub async fn replicate_to(
    member: &Member,
    bearer: &str,
    vm: &str,
    token: i64,
    store: &ImageStore,
    image: &Path,
    peers: Vec<(String, std::net::SocketAddr)>,
) -> Result<(Manifest, Pushed, Duration), String> {
    let started = Instant::now();
    let files = {
        let store = store.clone();
        let image = image.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut files = store.chain(&image).map_err(|e| e.to_string())?;
            if let Ok(selection) = store.boot_image() {
                if let Some(boot) = selection.image {
                    files.insert(0, boot.path().to_path_buf());
                }
            }
            Ok::<_, String>(files)
        })
        .await
        .map_err(|e| e.to_string())??
    };
    let timeout = member.config().request_timeout.max(Duration::from_secs(5));
    let mut total = Pushed::default();
    for (host, addr) in &peers {
        let pushed = push(*addr, bearer, vm, token, &files, timeout)
            .await
            .map_err(|e| format!("host {host}: {e}"))?;
        total.files += pushed.files;
        total.bytes += pushed.bytes;
    }
    let name = |path: &Path| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let manifest = Manifest {
        file: name(image),
        chain: files.iter().map(|f| name(f)).collect(),
        cpu: crate::cluster::cpu_fingerprint(),
        hosts: std::iter::once(member.host().to_string())
            .chain(peers.into_iter().map(|(h, _)| h))
            .collect(),
        token,
    };
    let value = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
    member
        .owner_put(vm, token, "images", value)
        .await
        .map_err(|e| e.to_string())?;
    Ok((manifest, total, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("relive-sparse-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    async fn body_of(path: &Path) -> (u64, u64, Body) {
        let sparse = sparse_body(path).unwrap();
        (sparse.length, sparse.data, Body::from_stream(sparse.stream))
    }

    /// A file of 64 MiB with two 4 KiB extents (one at the very end) goes
    /// over as about 8 KiB and arrives byte for byte with its holes.
    #[tokio::test]
    async fn a_sparse_file_goes_over_as_its_extents_and_keeps_its_holes() {
        let dir = scratch("roundtrip");
        let source = dir.join("source");
        let f = std::fs::File::create(&source).unwrap();
        let length = 64 << 20;
        f.set_len(length).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[9u8; 4096], length - 4096).unwrap();
        drop(f);
        let (len, data, body) = body_of(&source).await;
        assert_eq!(len, length);
        assert!(data <= 16 * 4096, "only the extents are sent: {data} bytes");
        let copy = dir.join("copy");
        receive(&dir, &copy, body, len).await.unwrap();
        assert!(std::fs::read(&source).unwrap() == std::fs::read(&copy).unwrap());
        let blocks = std::fs::metadata(&copy).unwrap().blocks() * 512;
        assert!(
            blocks <= 1 << 20,
            "the copy keeps the holes: {blocks} bytes allocated"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A body that names an extent beyond the file, or ends inside one, is
    /// refused and leaves nothing behind.
    #[tokio::test]
    async fn a_bad_sparse_body_is_refused_and_leaves_nothing() {
        let dir = scratch("bad");
        let path = dir.join("copy");
        let frame = |offset: u64, len: u64, bytes: &[u8]| {
            let mut v = offset.to_le_bytes().to_vec();
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(bytes);
            v
        };
        let beyond = receive(&dir, &path, Body::from(frame(4096, 8192, &[1; 8192])), 8192).await;
        assert!(
            beyond
                .as_ref()
                .is_err_and(|e| e.to_string().contains("beyond")),
            "{beyond:?}"
        );
        let cut = receive(&dir, &path, Body::from(frame(0, 4096, &[1; 100])), 8192).await;
        assert!(
            cut.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof),
            "{cut:?}"
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "nothing is left: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
