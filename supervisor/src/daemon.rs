//! `relive up FLEET.yaml`: the supervisor daemon.
//!
//! Loads the fleet (a bad file starts nothing), opens the event log and the
//! metrics registry, starts one task per VM (each adopts its running VMM or
//! starts one), serves the API on the Unix socket (mode 0600) and, when
//! configured, on loopback TCP with a bearer token and an extra `/metrics`
//! listener. It runs until SIGINT or SIGTERM; stopping the supervisor leaves
//! the VMs running, and the next `relive up` adopts them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError};
use crate::events::EventLog;
use crate::fleet::{Fleet, Paths};
use crate::metrics::Metrics;
use std::time::Duration;

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The fleet file is bad.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A directory or file could not be made.
    #[error("cannot {what} {path}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another supervisor serves the API socket.
    #[error("another supervisor already serves {0}: stop it first, or use another state_dir")]
    Running(PathBuf),
    /// The event log cannot be opened.
    #[error("cannot open the event log")]
    Events(#[source] crate::events::EventError),
    /// The metrics registry cannot be built.
    #[error("cannot build the metrics registry")]
    Metrics(#[source] prometheus::Error),
    #[error("cannot join the cluster (the fleet file's cluster: section)")]
    Cluster(#[source] crate::cluster::ClusterError),
    /// Cluster mode: this host's fleet is not the cluster's.
    #[error(
        "{file}: this fleet differs from the cluster's fleet in etcd (put by host {host}, \
         revision {revision}): {difference}. Every host runs the same `vms`, `defaults` and \
         `container_kernel`: give this host the cluster's file, or, to change the cluster's \
         fleet, start one host on the new file with `relive up FILE --replace-fleet {revision}` \
         (the other hosts run theirs until they are restarted on it)"
    )]
    FleetDiffers {
        /// This host's fleet file.
        file: PathBuf,
        /// The host that put etcd's fleet.
        host: String,
        /// Its revision.
        revision: i64,
        /// What differs, for people.
        difference: String,
    },
}

/// What differs between two fleets' shared parts (`FleetConfig::shared`):
/// the VMs only one has, the VMs both have but define differently, and
/// the other keys that differ.
pub fn fleet_difference(ours: &str, theirs: &str) -> String {
    use serde_json::Value;
    let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
    let (ours, theirs) = (parse(ours), parse(theirs));
    let vms = |fleet: &Value| -> std::collections::BTreeMap<String, Value> {
        fleet["vms"]
            .as_array()
            .map(|vms| {
                vms.iter()
                    .map(|vm| (vm["name"].as_str().unwrap_or("?").to_string(), vm.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (mine, cluster) = (vms(&ours), vms(&theirs));
    let list = |names: Vec<&String>| {
        names
            .into_iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut parts = Vec::new();
    let only_here: Vec<&String> = mine.keys().filter(|n| !cluster.contains_key(*n)).collect();
    if !only_here.is_empty() {
        parts.push(format!("VMs only in this file: {}", list(only_here)));
    }
    let only_there: Vec<&String> = cluster.keys().filter(|n| !mine.contains_key(*n)).collect();
    if !only_there.is_empty() {
        parts.push(format!("VMs only in the cluster's: {}", list(only_there)));
    }
    let changed: Vec<&String> = mine
        .iter()
        .filter(|(n, vm)| cluster.get(*n).is_some_and(|c| c != *vm))
        .map(|(n, _)| n)
        .collect();
    if !changed.is_empty() {
        parts.push(format!("VMs defined differently: {}", list(changed)));
    }
    for key in ["defaults", "container_kernel"] {
        if ours[key] != theirs[key] {
            parts.push(format!("`{key}` differs"));
        }
    }
    if parts.is_empty() && mine.keys().ne(cluster.keys()) {
        parts.push("the VMs are in another order".to_string());
    }
    if parts.is_empty() {
        parts.push("the files differ".to_string());
    }
    parts.join("; ")
}

/// Where the daemon serves, for the start banner.
#[derive(Debug, Clone)]
pub struct Served {
    /// The Unix socket.
    pub socket: PathBuf,
    /// The TCP API, if any.
    pub tcp: Option<std::net::SocketAddr>,
    /// The metrics listener, if any.
    pub metrics: Option<std::net::SocketAddr>,
    /// The event log file.
    pub events: PathBuf,
}

/// Runs the supervisor for `fleet_file` until `shutdown` is cancelled;
/// `on_ready` is called once the API serves.
pub async fn up(
    fleet_file: &Path,
    vmm_bin: PathBuf,
    replace_fleet: Option<i64>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(&Served),
) -> Result<(), DaemonError> {
    let fleet_cfg = config::load(fleet_file)?;
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| DaemonError::Io { what, path, source }
    };
    relive_images::private::create_dir_all(&fleet_cfg.state_dir)
        .map_err(io("create the state directory", &fleet_cfg.state_dir))?;
    tighten_state(&fleet_cfg);
    if fleet_cfg.jail != config::Jail::Off {
        // Jailed VMMs are left by their starters: they become ours to reap.
        crate::vmm::become_subreaper().map_err(io(
            "become the child subreaper (for jailed VMMs) of",
            &fleet_cfg.state_dir,
        ))?;
    }
    let socket = fleet_cfg.api.socket.clone();
    if let Some(parent) = socket.parent() {
        relive_images::private::create_dir_all(parent)
            .map_err(io("create the directory of", &socket))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Err(DaemonError::Running(socket));
        }
        let _ = std::fs::remove_file(&socket);
    }
    let events_path = fleet_cfg.state_dir.join("events.jsonl");
    let events = Arc::new(EventLog::open(&events_path, 1000).map_err(DaemonError::Events)?);
    let metrics = Arc::new(Metrics::new().map_err(DaemonError::Metrics)?);
    for vm in &fleet_cfg.vms {
        metrics.add_vm(&vm.name, &vm.policy);
    }

    let unix = tokio::net::UnixListener::bind(&socket).map_err(io("listen on", &socket))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restrict the permissions of", &socket))?;
    let tcp = match fleet_cfg.api.tcp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io("listen on", Path::new(&addr.to_string())))?,
        ),
        None => None,
    };
    let metrics_listener = match &fleet_cfg.metrics {
        Some(m) => Some(
            tokio::net::TcpListener::bind(m.listen)
                .await
                .map_err(io("listen on", Path::new(&m.listen.to_string())))?,
        ),
        None => None,
    };

    let cluster = match fleet_cfg.cluster.clone() {
        Some(config) => {
            let lease_file = fleet_cfg.state_dir.join("cluster-lease.json");
            let member = crate::cluster::Member::join(config, &lease_file, shutdown.clone())
                .await
                .map_err(DaemonError::Cluster)?;
            tracing::info!(
                host = member.host(),
                lease = member.standing().lease(),
                "joined the cluster"
            );
            use crate::cluster::FleetShare;
            let shared = member
                .share_fleet(&fleet_cfg.shared, replace_fleet)
                .await
                .map_err(DaemonError::Cluster)?;
            match shared {
                FleetShare::Loaded { revision } => {
                    tracing::info!(revision, "this fleet is the cluster's now (etcd `fleet`)");
                }
                FleetShare::Same { revision, host } => {
                    tracing::info!(revision, %host, "this fleet is the cluster's");
                }
                FleetShare::Differs {
                    revision,
                    host,
                    theirs,
                } => {
                    return Err(DaemonError::FleetDiffers {
                        file: fleet_file.to_path_buf(),
                        host,
                        revision,
                        difference: fleet_difference(&fleet_cfg.shared, &theirs),
                    });
                }
            }
            events.set_host(member.host());
            tokio::spawn(crate::cluster::export_standing(
                member.clone(),
                metrics.clone(),
                shutdown.clone(),
            ));
            Some(member)
        }
        None => None,
    };
    if let Some(cluster) = &fleet_cfg.cluster {
        match (cluster.advertise, &cluster.token) {
            (Some(addr), Some(token)) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(io("listen (cluster.advertise) on", Path::new(&addr.to_string())))?;
                let state = crate::replication::PeerState::new(
                    fleet_cfg.vms.iter().map(|vm| {
                        (
                            vm.name.clone(),
                            vm.images_dir.clone(),
                            vm.policy.keep_images,
                        )
                    }),
                    token.secret().to_string(),
                );
                let app = crate::replication::peer_router(state);
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await;
                });
                tracing::info!(%addr, "serving the cluster listener (image replication)");
            }
            _ => tracing::warn!(
                "cluster.advertise is not set: this host receives no replicated images, and VMs taken over here start from their boot image"
            ),
        }
    }
    let (fleet, tasks) = Fleet::start(
        fleet_cfg.vms.clone(),
        Paths {
            vmm_bin,
            state_dir: fleet_cfg.state_dir.clone(),
        },
        events.clone(),
        metrics.clone(),
        cluster,
        shutdown.clone(),
    );

    let served = Served {
        socket: socket.clone(),
        tcp: tcp.as_ref().and_then(|l| l.local_addr().ok()),
        metrics: metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
        events: events_path,
    };
    let api_file = crate::client::current_api_file();
    let _ = relive_images::private::create_file(&api_file).and_then(|mut f| {
        std::io::Write::write_all(&mut f, socket.display().to_string().as_bytes())
    });

    let mut servers = Vec::new();
    let app = crate::api::router(fleet.clone(), None);
    let stop = shutdown.clone();
    servers.push(tokio::spawn(async move {
        let _ = axum::serve(unix, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    }));
    if let Some(tcp) = tcp {
        let token = fleet_cfg.api.token.as_ref().map(|t| t.secret().to_string());
        let app = crate::api::router(fleet.clone(), token);
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move {
            let _ = axum::serve(tcp, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        }));
    }
    if let Some(listener) = metrics_listener {
        let fleet = fleet.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let fleet = fleet.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        fleet.metrics.render(),
                    )
                }
            }),
        );
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        }));
    }
    // Event lines a full disk refused are written once it has room, even
    // when no new event comes to carry them.
    {
        let events = events.clone();
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = every.tick() => events.flush(),
                }
            }
        }));
    }
    on_ready(&served);

    shutdown.cancelled().await;
    for task in tasks {
        let _ = task.await;
    }
    for server in servers {
        let _ = server.await;
    }
    let _ = std::fs::remove_file(&socket);
    if std::fs::read_to_string(&api_file).is_ok_and(|s| s.trim() == socket.display().to_string()) {
        let _ = std::fs::remove_file(&api_file);
    }
    Ok(())
}

/// Narrows the state directory, each VM's directory and image directory to
/// owner-only where an older relive (or a hand) left them wider, saying so:
/// they hold guest memory and consoles.
fn tighten_state(fleet: &config::FleetConfig) {
    let dirs = std::iter::once(fleet.state_dir.clone()).chain(fleet.vms.iter().flat_map(|vm| {
        let vm_dir = vm.images_dir.parent().map(Path::to_path_buf);
        vm_dir
            .into_iter()
            .chain(std::iter::once(vm.images_dir.clone()))
    }));
    for dir in dirs {
        match relive_images::private::tighten_dir(&dir) {
            Ok(Some(mode)) => tracing::warn!(
                dir = %dir.display(),
                was = format!("{mode:04o}"),
                "state directory was readable by others: narrowed to 0700"
            ),
            Ok(None) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot narrow a state directory to 0700")
            }
        }
    }
}
