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
//! | PUT | `/v1/peer/images/{vm}/{file}` | the image file's bytes; header `x-relive-fencing-token` |
//! | GET | `/v1/peer/images/{vm}/{file}` | the image file's bytes (a host pulling what it lacks) |
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
    if let Err(refused) = authorized(&state, &headers) {
        return refused.into_response();
    }
    let path = match target(&state, &vm, &file) {
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
    if let Err(refused) = authorized(&state, &headers) {
        return refused.into_response();
    }
    let (dir, keep, path) = match target(&state, &vm, &file) {
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
    if let Err(e) = receive(&dir, &path, body).await {
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
    if let Err(refused) = authorized(&state, &headers) {
        return refused.into_response();
    }
    let path = match target(&state, &vm, &file) {
        Ok((_, _, path)) => path,
        Err(refused) => return refused.into_response(),
    };
    let opened = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("this host holds no image {file} of VM {vm}"),
            )
            .into_response()
        }
        Err(e) => {
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot open {}: {e}", path.display()),
            )
            .into_response()
        }
    };
    let len = opened.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(opened, 1 << 20));
    ([(header::CONTENT_LENGTH, len.to_string())], body).into_response()
}

/// Writes `body` to `path` as the store commits an image: a temporary file
/// (owner-only), fsync, rename, fsync of the directory.
async fn receive(dir: &Path, path: &Path, body: Body) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.part"));
    relive_images::private::create_dir_all(dir)?;
    let file = relive_images::private::create_file(&temp)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut stream = body.into_data_stream();
    let written = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        tokio::fs::rename(&temp, path).await?;
        tokio::fs::File::open(dir).await?.sync_all().await
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    written
}

/// The peers that hold a VM's images: the other live hosts that advertise
/// a listener, ranked by rendezvous hashing with the VM's name; the first
/// `replicas`.
pub async fn peers_of(
    member: &Member,
    vm: &str,
    replicas: usize,
) -> Result<Vec<(String, std::net::SocketAddr)>, crate::cluster::ClusterError> {
    let score = |host: &str| crc32c::crc32c(format!("{vm}/{host}").as_bytes());
    let mut hosts: Vec<(String, std::net::SocketAddr)> = member
        .hosts()
        .await?
        .into_iter()
        .filter(|h| h.host != member.host())
        .filter_map(|h| h.advertise.map(|a| (h.host, a)))
        .collect();
    hosts.sort_by_key(|(h, _)| std::cmp::Reverse((score(h), h.clone())));
    hosts.truncate(replicas);
    Ok(hosts)
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
        let opened = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let len = opened.metadata().await.map(|m| m.len()).unwrap_or(0);
        // A large image can take long: its own bound grows with its size
        // (at least 10 MB/s).
        let bound = timeout + Duration::from_secs(len / 10_000_000);
        let (status, body) = request(
            peer,
            bearer,
            hyper::Method::PUT,
            &uri,
            Some(token),
            Some(opened),
            bound,
        )
        .await?;
        if status != StatusCode::OK {
            return Err(format!("{peer} refused {file}: {status} {body}"));
        }
        pushed.files += 1;
        pushed.bytes += len;
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
    upload: Option<tokio::fs::File>,
    timeout: Duration,
) -> Result<(StatusCode, String), String> {
    let exchange = async {
        let body: PushBody = match upload {
            Some(file) => {
                let frames = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20)
                    .map(|chunk| chunk.map(hyper::body::Frame::data));
                BodyExt::boxed(http_body_util::StreamBody::new(frames))
            }
            None => http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        };
        let response = send(peer, bearer, method, uri, token, body).await?;
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
/// and verified as a received push is; its bytes.
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
        send(peer, bearer, hyper::Method::GET, &uri, None, empty),
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
    let len = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // As a push: its own bound grows with its size (at least 10 MB/s).
    let bound = timeout + Duration::from_secs(len / 10_000_000);
    let (dir, path) = (store.dir().to_path_buf(), store.dir().join(file));
    tokio::time::timeout(bound, receive(&dir, &path, Body::new(response.into_body())))
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
    Ok(len)
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
