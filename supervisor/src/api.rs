//! The supervisor's HTTP API (axum), on a Unix socket and optionally on TCP.
//!
//! Handlers only parse a request into an [`Action`] and hand it to the task
//! that owns the VM ([`Fleet::act`]); they hold no state of their own.
//!
//! | method | path                          | what                                     |
//! |--------|-------------------------------|------------------------------------------|
//! | GET    | `/v1/vms`                     | every VM                                 |
//! | GET    | `/v1/vms/{vm}`                | one VM                                   |
//! | POST   | `/v1/vms/{vm}/failover`       | `{"to":"consistency"|"boot"|IMAGE_ID}` or `{"to_host":HOST}` |
//! | POST   | `/v1/vms/{vm}/checkpoint`     | write a consistency image now            |
//! | POST   | `/v1/vms/{vm}/{pause,resume,stop,start}` |                               |
//! | GET    | `/v1/vms/{vm}/images`         | the VM's image directory                 |
//! | GET    | `/v1/vms/{vm}/logs?n=N`       | the last N entries of the app's output ([`crate::applog`]) |
//! | GET    | `/v1/vms/{vm}/logs?n=N&follow=true` | JSON lines: those, then each new entry as it comes |
//! | GET    | `/v1/events?n=N`              | the last N events                        |
//! | GET    | `/v1/events/follow`           | JSON lines, one per event, as they come  |
//! | GET    | `/v1/cluster/hosts`           | cluster mode: every host, its lease's time left, capacity (cores, RAM, RAM of the VMs it owns), CPU and the VMs it owns (409 alone) |
//! | GET    | `/metrics`                    | Prometheus text format                   |
//!
//! Errors are JSON `{"error": "..."}` with 400 (bad request), 401 (missing or
//! wrong token), 404 (unknown VM or path), 409 (the action does not fit the
//! VM's state), 500, or 503 (cluster mode: etcd did not answer). The Unix socket is mode 0600 and needs no token; the
//! TCP listener (loopback only) requires `Authorization: Bearer TOKEN` on
//! every route.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::fleet::{Action, ActionError, Fleet};

/// A JSON error response.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        let status = match e {
            ActionError::UnknownVm(_) => StatusCode::NOT_FOUND,
            ActionError::Conflict(_) => StatusCode::CONFLICT,
            ActionError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// The API's routes over `fleet`; with `token`, every request must carry it.
pub fn router(fleet: Fleet, token: Option<String>) -> Router {
    let router = Router::new()
        .route("/v1/vms", get(list))
        .route("/v1/vms/{vm}", get(show))
        .route("/v1/vms/{vm}/images", get(images))
        .route("/v1/vms/{vm}/logs", get(logs))
        .route("/v1/vms/{vm}/failover", post(failover))
        .route("/v1/vms/{vm}/{action}", post(simple_action))
        .route("/v1/events", get(events))
        .route("/v1/events/follow", get(follow))
        .route("/v1/cluster/hosts", get(hosts))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such API path: see /v1/vms".into(),
            )
        })
        .with_state(fleet);
    match token {
        Some(token) => router.layer(middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        )),
        None => router,
    }
}

async fn require_token(
    State(token): State<Arc<String>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing bearer token: send Authorization: Bearer TOKEN (the api.token of the fleet file)".into(),
        )),
        Some(given) if !constant_time_eq(given.as_bytes(), token.as_bytes()) => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "wrong bearer token".into(),
        )),
        Some(_) => Ok(next.run(request).await),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unknown(vm: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no VM named {vm:?}: see `relive status` for the fleet"),
    )
}

/// The cluster's hosts, as this host sees them in etcd.
async fn hosts(State(fleet): State<Fleet>) -> Result<impl IntoResponse, ApiError> {
    let Some(member) = fleet.cluster.clone() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this supervisor runs alone: its fleet file has no cluster: section".into(),
        ));
    };
    let unavailable = |e: crate::cluster::ClusterError| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the cluster from etcd: {e}"),
        )
    };
    let hosts = member.hosts().await.map_err(unavailable)?;
    let owners = member.owners().await.map_err(unavailable)?;
    let mut out = Vec::new();
    for host in hosts {
        let left = member.lease_left(host.lease).await.map_err(unavailable)?;
        let vms: Vec<&str> = owners
            .iter()
            .filter(|(_, owner, _)| owner.host == host.host && owner.lease == host.lease)
            .map(|(vm, _, _)| vm.as_str())
            .collect();
        // The fleet is the same on every host: its specs give the memory.
        let vm_memory_mib: u64 = vms.iter().filter_map(|vm| fleet.memory_mib(vm)).sum();
        out.push(serde_json::json!({
            "host": host.host,
            "this": host.host == member.host(),
            "advertise": host.advertise,
            "lease": host.lease,
            "lease_left_s": left,
            "joined_unix_ms": host.joined_unix_ms,
            "cores": host.cores,
            "memory_mib": host.memory_mib,
            "vm_memory_mib": vm_memory_mib,
            "cpu": host.cpu,
            "vms": vms,
        }));
    }
    Ok(Json(out))
}

async fn list(State(fleet): State<Fleet>) -> impl IntoResponse {
    Json(fleet.list())
}

async fn show(
    State(fleet): State<Fleet>,
    Path(vm): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    fleet.show(&vm).map(Json).ok_or_else(|| unknown(&vm))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverBody {
    to: Option<String>,
    /// Cluster mode: move the VM to this host (its state goes with it).
    to_host: Option<String>,
}

async fn failover(
    State(fleet): State<Fleet>,
    Path(vm): Path<String>,
    body: Option<Json<FailoverBody>>,
) -> Result<impl IntoResponse, ApiError> {
    let (to, to_host) = body.map_or((None, None), |Json(b)| (b.to, b.to_host));
    let action = match (to, to_host) {
        (None, Some(to_host)) => Action::Move { to_host },
        (Some(to), Some(_)) if to != "consistency" => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "\"to\": {to:?} with \"to_host\": a move carries the VM's current state \
                 (consistency); to restart it elsewhere from another image, move it, then \
                 fail it over there"
                ),
            ));
        }
        (Some(_), Some(to_host)) => Action::Move { to_host },
        (to, None) => Action::Failover {
            to: to.unwrap_or_else(|| "consistency".to_string()),
        },
    };
    let message = fleet.act(&vm, action).await?;
    Ok(Json(serde_json::json!({ "ok": message })))
}

async fn simple_action(
    State(fleet): State<Fleet>,
    Path((vm, action)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let action = match action.as_str() {
        "checkpoint" => Action::Checkpoint,
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "stop" => Action::Stop,
        "start" => Action::Start,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "no action {other:?}: use failover, checkpoint, pause, resume, stop or start"
                ),
            ))
        }
    };
    let message = fleet.act(&vm, action).await?;
    Ok(Json(serde_json::json!({ "ok": message })))
}

async fn images(
    State(fleet): State<Fleet>,
    Path(vm): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let dir = fleet.images_dir(&vm).ok_or_else(|| unknown(&vm))?;
    let store = relive_images::store::ImageStore::open(&dir, usize::MAX)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let entries = store
        .list()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(entries))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    n: Option<usize>,
    follow: Option<bool>,
}

/// The app's output: the last `n` entries, and with `follow` every new one
/// after them (subscribed before the file is read, so nothing falls between
/// the two; an entry in both is sent once, by its id).
async fn logs(
    State(fleet): State<Fleet>,
    Path(vm): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let path = fleet.app_log(&vm).ok_or_else(|| unknown(&vm))?;
    let live = q.follow.unwrap_or(false).then(|| fleet.logs.subscribe());
    let n = q.n.unwrap_or(100);
    let tail = tokio::task::spawn_blocking(move || crate::applog::read_tail(&path, n))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the app log: {e}"),
            )
        })?;
    let Some(rx) = live else {
        return Ok(Json(tail).into_response());
    };
    let last_id = tail.last().map_or(0, |e| e.id);
    let ndjson = |entry: &crate::applog::LogEntry| {
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    };
    let past = futures_util::stream::iter(tail.iter().map(ndjson).collect::<Vec<_>>());
    let new = futures_util::stream::unfold(rx, move |mut rx| {
        let vm = vm.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok((name, entry)) if name == vm && entry.id > last_id => {
                        return Some((ndjson(&entry), rx));
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(futures_util::StreamExt::chain(past, new)),
    )
        .into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    n: Option<usize>,
}

async fn events(State(fleet): State<Fleet>, Query(q): Query<EventsQuery>) -> impl IntoResponse {
    Json(fleet.events.recent(q.n.unwrap_or(100)))
}

async fn follow(State(fleet): State<Fleet>) -> impl IntoResponse {
    let rx = fleet.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok((_, event)) => {
                    let mut line = serde_json::to_vec(&event).unwrap_or_default();
                    line.push(b'\n');
                    return Some((Ok::<_, std::convert::Infallible>(line), rx));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
}

async fn metrics(State(fleet): State<Fleet>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        fleet.metrics.render(),
    )
}
