//! Cluster mode: supervisors on several hosts share one fleet through etcd.
//!
//! etcd is the engine: leases, transactions and watches. relive writes no
//! consensus of its own. This module is the host's membership and each VM's
//! ownership; the VM tasks ([`crate::fleet`]) act on what it tells them.
//!
//! # Keys
//!
//! Under the cluster's `prefix` (`/relive` unless the fleet file says):
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `hosts/<host>` | [`HostRecord`] (JSON) | the host's session lease |
//! | `vms/<vm>/owner` | [`OwnerRecord`] (JSON) | the owner's session lease |
//! | `vms/<vm>/status` | the owner's view of the VM (JSON), written under its token | none |
//!
//! # Session and fencing
//!
//! A host holds one session lease (`lease_ttl`), renewed every
//! `keepalive_interval` on a keep-alive stream. Every renewal the server
//! answers moves the host's **fencing deadline** to *the instant the renewal
//! was sent* + the TTL − `fence_margin`, on the host's own monotonic clock:
//! the server cannot expire the lease before the TTL has run from when it got
//! the renewal, which is after it was sent, so at the deadline the lease is
//! still valid by at least the margin. A renewal that fails, times out or is
//! never answered (a stalled stream) does not move it. When the deadline
//! passes, the host has **fenced itself**: [`Standing::Fenced`] is published
//! and the VM tasks kill their VMMs and restore nothing, all before any other
//! host can see the lease expire and start a restore. The margin covers
//! killing the VMMs and the two clocks running at slightly different rates.
//! A fenced host revokes its old lease as soon as etcd answers again (its
//! VMs are dead: the others need not wait for the TTL) and joins anew with a
//! new lease; it owns nothing then.
//!
//! # Ownership
//!
//! A VM's owner key is created with a create-if-absent transaction on the
//! owner's lease; its creation revision is the VM's **fencing token**. Every
//! owner write is a transaction that compares the owner key's creation
//! revision with the token, so a write by a stale owner (one whose key
//! expired and was created again by another host, even by the same host on a
//! newer lease) fails with [`ClusterError::Stale`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use crate::config::ClusterConfig;

/// How often the etcd client pings its connections (see `Member::join`).
const H2_PING_INTERVAL: Duration = Duration::from_secs(10);

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No endpoint of the etcd cluster answered.
    #[error("cannot reach etcd at {endpoints}: check that etcd runs and that cluster.etcd lists its client URLs")]
    Connect {
        /// The endpoints tried.
        endpoints: String,
        /// What the client said.
        #[source]
        source: etcd_client::Error,
    },
    /// A request failed.
    #[error("etcd {what} failed")]
    Request {
        /// The request.
        what: &'static str,
        /// What the client said.
        #[source]
        source: etcd_client::Error,
    },
    /// A request got no answer in time.
    #[error("etcd {what} got no answer within {timeout:?}")]
    Timeout {
        /// The request.
        what: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// An owner write with a token that is no longer the VM's.
    #[error("VM {vm}: fencing token {token} is stale (the VM's owner key was created again, or is gone): this host no longer owns it")]
    Stale {
        /// The VM.
        vm: String,
        /// The token the write carried.
        token: i64,
    },
    /// The host has fenced itself: it may not act as an owner until it
    /// joined again.
    #[error("this host has fenced itself (its session lease could not be renewed in time)")]
    Fenced,
    /// A key held a value this version cannot read.
    #[error("etcd key {key} holds a value relive cannot read: {detail}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
}

/// The host's standing in the cluster, as its keep-alive task sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Joined with session lease `lease`; owner actions are allowed until
    /// `deadline` (monotonic), which each renewal moves.
    Live {
        /// The session lease.
        lease: i64,
        /// The fencing deadline.
        deadline: Instant,
    },
    /// The renewals of lease `lease` stopped before its deadline: the host
    /// has fenced itself and is trying to join again.
    Fenced {
        /// The lost lease.
        lease: i64,
    },
}

impl Standing {
    /// The lease this standing is about.
    pub fn lease(&self) -> i64 {
        match *self {
            Standing::Live { lease, .. } | Standing::Fenced { lease } => lease,
        }
    }

    /// Whether owner actions are allowed now.
    pub fn is_live(&self) -> bool {
        matches!(*self, Standing::Live { deadline, .. } if Instant::now() < deadline)
    }
}

/// `hosts/<host>`: who a host is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Its name (`cluster.host`).
    pub host: String,
    /// Where its peers reach its API (`cluster.advertise`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<SocketAddr>,
    /// Its session lease.
    pub lease: i64,
    /// When it joined, wall clock, ms since the epoch.
    pub joined_unix_ms: u64,
    /// Its CPU ([`cpu_fingerprint`]): an image restores where the CPU is
    /// the same as where it was taken.
    #[serde(default)]
    pub cpu: String,
    /// Its cores.
    #[serde(default)]
    pub cores: usize,
    /// Its RAM in MiB.
    #[serde(default)]
    pub memory_mib: u64,
}

/// This host's CPU as a restore depends on it: vendor, family, model and
/// the feature flags (a hash of them), from `/proc/cpuinfo`; empty where
/// that cannot be read.
pub fn cpu_fingerprint() -> String {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return String::new();
    };
    let first = info.split("\n\n").next().unwrap_or("");
    let field = |name: &str| {
        first
            .lines()
            .find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_string())
            })
            .unwrap_or_default()
    };
    let mut flags: Vec<String> = field("flags")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    flags.sort();
    format!(
        "{} family {} model {} flags {:08x}",
        field("vendor_id"),
        field("cpu family"),
        field("model"),
        crc32c::crc32c(flags.join(" ").as_bytes())
    )
}

/// The order in which live `hosts` try to take VM `vm` over (the first
/// first): the hosts that hold its latest replicated image (`holders`, by
/// its manifest) before the others, within each those on the CPU the image
/// was taken on (`cpu`) before the others, and within that rendezvous
/// hashing of the VM's and the host's names, so every host computes the
/// same order and hosts do not stampede.
pub fn takeover_order(
    vm: &str,
    hosts: &[HostRecord],
    holders: &[String],
    cpu: &str,
) -> Vec<String> {
    let score = |host: &str| crc32c::crc32c(format!("{vm}/{host}").as_bytes());
    let mut ranked: Vec<&HostRecord> = hosts.iter().collect();
    ranked.sort_by_key(|h| {
        std::cmp::Reverse((
            holders.contains(&h.host),
            !cpu.is_empty() && h.cpu == cpu,
            score(&h.host),
            h.host.clone(),
        ))
    });
    ranked.into_iter().map(|h| h.host.clone()).collect()
}

/// `vms/<vm>/owner`: which host owns a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The owner host.
    pub host: String,
    /// Its session lease (the key's lease).
    pub lease: i64,
    /// When it took the VM, wall clock, ms since the epoch.
    pub since_unix_ms: u64,
}

/// `vms/<vm>/restored`: a consistency restore within the VM's failure
/// window, on any host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRecord {
    /// Where the VM was restored.
    pub host: String,
    /// When, wall clock, ms since the epoch.
    pub unix_ms: u64,
}

/// What [`Member::share_fleet`] found in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetShare {
    /// etcd had no fleet (or the one of the revision to replace): this
    /// host's is the cluster's now, at `revision`.
    Loaded {
        /// The fleet key's revision.
        revision: i64,
    },
    /// etcd holds the same fleet, put by `host`.
    Same {
        /// The fleet key's revision.
        revision: i64,
        /// The host that put it.
        host: String,
    },
    /// etcd holds another fleet.
    Differs {
        /// The fleet key's revision: what a replacement names.
        revision: i64,
        /// The host that put it.
        host: String,
        /// Its shared part (see `FleetConfig::shared`).
        theirs: String,
    },
}

/// `fleet` in etcd.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FleetRecord {
    host: String,
    unix_ms: u64,
    shared: String,
}

/// The answer to [`Member::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This host owns the VM; `token` is the owner key's creation revision.
    Owned {
        /// The fencing token.
        token: i64,
        /// The session lease the owner key is attached to: the VM is this
        /// host's only while its standing is `Live` on this lease.
        lease: i64,
    },
    /// Another host (or this host on an older lease) owns it.
    Taken {
        /// The owner.
        owner: OwnerRecord,
        /// Its fencing token.
        token: i64,
    },
}

/// This host's membership of the cluster: its session lease, kept alive by a
/// background task, and the requests it makes as a member.
pub struct Member {
    config: ClusterConfig,
    client: Client,
    standing: watch::Receiver<Standing>,
}

impl Member {
    /// Connects to etcd, takes a session lease (or resumes the one a
    /// previous supervisor of this host recorded in `lease_file`, if it is
    /// still alive: the VMMs it left running are still this host's, under
    /// the same tokens) and registers the host, and keeps the lease alive
    /// until `shutdown`. The lease is not revoked at shutdown: the VMMs
    /// outlive the supervisor, and the VMs must stay this host's.
    pub async fn join(
        config: ClusterConfig,
        lease_file: &Path,
        shutdown: CancellationToken,
    ) -> Result<Arc<Member>, ClusterError> {
        // No per-call timeout on the channel: it would end every watch and
        // the keepalive stream after it (a gRPC deadline covers a whole
        // call). Each request is bounded by `request` instead; HTTP/2 pings
        // find a dead connection under a watch, but no more often than
        // etcd accepts them (`--grpc-keepalive-min-time`, 5 s by default:
        // a client that pings more often has its connection closed, and
        // every watch on it broken, "too many pings").
        let options = ConnectOptions::new()
            .with_connect_timeout(config.request_timeout)
            .with_keep_alive(
                H2_PING_INTERVAL,
                config.request_timeout.max(Duration::from_secs(2)),
            );
        let client = Client::connect(&config.etcd, Some(options))
            .await
            .map_err(|source| ClusterError::Connect {
                endpoints: config.etcd.join(","),
                source,
            })?;
        let (lease, deadline) = match resume(&config, &mut client.clone(), lease_file).await {
            Some(resumed) => resumed,
            None => first_grant(&config, &mut client.clone()).await?,
        };
        if let Err(e) = record_lease(lease_file, &config.host, lease) {
            tracing::warn!(error = %e, file = %lease_file.display(), "cannot record the session lease for the next supervisor");
        }
        let (tx, standing) = watch::channel(Standing::Live { lease, deadline });
        let member = Arc::new(Member {
            config,
            client,
            standing,
        });
        tokio::spawn(member.clone().keep_alive(
            tx,
            lease,
            deadline,
            lease_file.to_path_buf(),
            shutdown,
        ));
        Ok(member)
    }

    /// The cluster configuration.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.config.host
    }

    /// The host's standing now.
    pub fn standing(&self) -> Standing {
        *self.standing.borrow()
    }

    /// A receiver that sees every change of standing.
    pub fn subscribe(&self) -> watch::Receiver<Standing> {
        self.standing.clone()
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.config.prefix)
    }

    /// The owner key of `vm`.
    pub fn owner_key(&self, vm: &str) -> String {
        self.key(&format!("vms/{vm}/owner"))
    }

    /// The lease, if the host may act as an owner now.
    fn live_lease(&self) -> Result<i64, ClusterError> {
        let standing = self.standing();
        if standing.is_live() {
            Ok(standing.lease())
        } else {
            Err(ClusterError::Fenced)
        }
    }

    /// Takes `vm` if nobody owns it (create-if-absent on this host's lease),
    /// or says who does.
    pub async fn acquire(&self, vm: &str) -> Result<Claim, ClusterError> {
        let lease = self.live_lease()?;
        let key = self.owner_key(vm);
        let record = OwnerRecord {
            host: self.config.host.clone(),
            lease,
            since_unix_ms: unix_ms(),
        };
        let value = serde_json::to_vec(&record).map_err(|e| ClusterError::BadValue {
            key: key.clone(),
            detail: e.to_string(),
        })?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    key.as_str(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ),
                // A hand-off is used up by whoever takes the VM.
                TxnOp::delete(self.key(&format!("vms/{vm}/handoff")), None),
            ])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let response = self
            .request("owner transaction", self.client.clone().txn(txn))
            .await?;
        if response.succeeded() {
            let token = response.header().map_or(0, |h| h.revision());
            return Ok(Claim::Owned { token, lease });
        }
        let taken = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        match taken {
            // Deleted between the compare and the get: try again.
            None => Box::pin(self.acquire(vm)).await,
            Some(kv) => {
                let owner: OwnerRecord =
                    serde_json::from_slice(kv.value()).map_err(|e| ClusterError::BadValue {
                        key: key.clone(),
                        detail: e.to_string(),
                    })?;
                let token = kv.create_revision();
                if owner.host == self.config.host && owner.lease == lease {
                    Ok(Claim::Owned { token, lease })
                } else {
                    Ok(Claim::Taken { owner, token })
                }
            }
        }
    }

    /// Makes the cluster's fleet `shared` (a fleet file's shared part) if
    /// etcd has none, or, with `replace`, if etcd's is at that revision
    /// (an operator's deliberate change, guarded like an owner write);
    /// otherwise says whether etcd's is the same.
    pub async fn share_fleet(
        &self,
        shared: &str,
        replace: Option<i64>,
    ) -> Result<FleetShare, ClusterError> {
        let key = self.key("fleet");
        let record = FleetRecord {
            host: self.config.host.clone(),
            unix_ms: unix_ms(),
            shared: shared.to_string(),
        };
        let value = serde_json::to_vec(&record).map_err(|e| ClusterError::BadValue {
            key: key.clone(),
            detail: e.to_string(),
        })?;
        let guard = match replace {
            None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            Some(revision) => Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::put(key.as_str(), value, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let response = self
            .request("fleet transaction", self.client.clone().txn(txn))
            .await?;
        if response.succeeded() {
            let revision = response.header().map_or(0, |h| h.revision());
            return Ok(FleetShare::Loaded { revision });
        }
        let kv = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        let Some(kv) = kv else {
            // Deleted between the compare and the get (or a replacement of
            // a fleet that is gone): load it as the first host would.
            return Box::pin(self.share_fleet(shared, None)).await;
        };
        let theirs: FleetRecord =
            serde_json::from_slice(kv.value()).map_err(|e| ClusterError::BadValue {
                key: key.clone(),
                detail: e.to_string(),
            })?;
        let revision = kv.mod_revision();
        Ok(if theirs.shared == shared {
            FleetShare::Same {
                revision,
                host: theirs.host,
            }
        } else {
            FleetShare::Differs {
                revision,
                host: theirs.host,
                theirs: theirs.shared,
            }
        })
    }

    /// Who owns `vm` now, with the token.
    pub async fn owner(&self, vm: &str) -> Result<Option<(OwnerRecord, i64)>, ClusterError> {
        let key = self.owner_key(vm);
        let got = self
            .request("get", self.client.clone().get(key.as_str(), None))
            .await?;
        match got.kvs().first() {
            None => Ok(None),
            Some(kv) => {
                let owner =
                    serde_json::from_slice(kv.value()).map_err(|e| ClusterError::BadValue {
                        key: key.clone(),
                        detail: e.to_string(),
                    })?;
                Ok(Some((owner, kv.create_revision())))
            }
        }
    }

    /// Writes `value` at `vms/<vm>/<what>` as the VM's owner: only while the
    /// owner key's creation revision is `token` and this host is not fenced.
    pub async fn owner_put(
        &self,
        vm: &str,
        token: i64,
        what: &str,
        value: Vec<u8>,
    ) -> Result<(), ClusterError> {
        self.live_lease()?;
        let key = self.key(&format!("vms/{vm}/{what}"));
        self.as_owner(vm, token, "owner write", [TxnOp::put(key, value, None)])
            .await
    }

    /// `ops` in a transaction that holds only while the owner key of `vm`
    /// was created at revision `token`: the fencing of every owner write.
    async fn as_owner(
        &self,
        vm: &str,
        token: i64,
        what: &'static str,
        ops: impl Into<Vec<TxnOp>>,
    ) -> Result<(), ClusterError> {
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.owner_key(vm),
                CompareOp::Equal,
                token,
            )])
            .and_then(ops);
        let response = self.request(what, self.client.clone().txn(txn)).await?;
        if response.succeeded() {
            Ok(())
        } else {
            Err(ClusterError::Stale {
                vm: vm.to_string(),
                token,
            })
        }
    }

    /// The value at `vms/<vm>/<what>`, if any.
    pub async fn vm_value(&self, vm: &str, what: &str) -> Result<Option<Vec<u8>>, ClusterError> {
        let key = self.key(&format!("vms/{vm}/{what}"));
        let got = self
            .request("get", self.client.clone().get(key, None))
            .await?;
        Ok(got.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Records, as `vm`'s owner, a consistency restore of the VM for
    /// `window` (`vms/<vm>/restored` on a lease of that TTL): any host that
    /// takes the VM over within it knows the VM failed again soon after a
    /// consistency restore, wherever that was.
    pub async fn record_restore(
        &self,
        vm: &str,
        token: i64,
        window: Duration,
    ) -> Result<(), ClusterError> {
        self.live_lease()?;
        let ttl = i64::try_from(window.as_secs().max(1) + u64::from(window.subsec_nanos() > 0))
            .unwrap_or(i64::MAX);
        let lease = self
            .request("lease grant", self.client.clone().lease_grant(ttl, None))
            .await?
            .id();
        let record = RestoreRecord {
            host: self.config.host.clone(),
            unix_ms: unix_ms(),
        };
        let key = self.key(&format!("vms/{vm}/restored"));
        let value = serde_json::to_vec(&record).map_err(|e| ClusterError::BadValue {
            key: key.clone(),
            detail: e.to_string(),
        })?;
        let op = TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
        self.as_owner(vm, token, "restore record", [op]).await
    }

    /// The VM's last consistency restore, if it was within its failure
    /// window (see [`Member::record_restore`]).
    pub async fn recent_restore(&self, vm: &str) -> Result<Option<RestoreRecord>, ClusterError> {
        let key = self.key(&format!("vms/{vm}/restored"));
        match self.vm_value(vm, "restored").await? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| ClusterError::BadValue {
                        key,
                        detail: e.to_string(),
                    })
            }
        }
    }

    /// Gives `vm` up (deletes its owner key if `token` is still the VM's).
    pub async fn release(&self, vm: &str, token: i64) -> Result<(), ClusterError> {
        let op = TxnOp::delete(self.owner_key(vm), None);
        self.as_owner(vm, token, "owner release", [op]).await
    }

    /// Gives `vm` up to host `to` (an operator's move): in one transaction
    /// under `token`, records `vms/<vm>/handoff` = `to` and deletes the
    /// owner key. `to` takes the VM at once; the other hosts leave it to
    /// `to` for `failover_grace` + `lease_ttl` before they compete for it.
    pub async fn hand_off(&self, vm: &str, token: i64, to: &str) -> Result<(), ClusterError> {
        self.live_lease()?;
        let ops = [
            TxnOp::put(
                self.key(&format!("vms/{vm}/handoff")),
                to.as_bytes().to_vec(),
                None,
            ),
            TxnOp::delete(self.owner_key(vm), None),
        ];
        self.as_owner(vm, token, "owner hand-off", ops).await
    }

    /// The host `vm` was handed off to, while nobody has taken it since.
    pub async fn handoff(&self, vm: &str) -> Result<Option<String>, ClusterError> {
        Ok(self
            .vm_value(vm, "handoff")
            .await?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Waits until `vm` has no owner (its key deleted or expired with its
    /// owner's lease); returns at once if it has none now.
    pub async fn wait_unowned(&self, vm: &str) -> Result<(), ClusterError> {
        let key = self.owner_key(vm);
        let got = self
            .request("get", self.client.clone().get(key.as_str(), None))
            .await?;
        if got.kvs().is_empty() {
            return Ok(());
        }
        let from = got.header().map_or(0, |h| h.revision()) + 1;
        let mut stream = self
            .client
            .clone()
            .watch(
                key.as_str(),
                Some(WatchOptions::new().with_start_revision(from)),
            )
            .await
            .map_err(|source| ClusterError::Request {
                what: "watch",
                source,
            })?;
        loop {
            let message = stream
                .message()
                .await
                .map_err(|source| ClusterError::Request {
                    what: "watch",
                    source,
                })?;
            let Some(response) = message else {
                return Err(ClusterError::Request {
                    what: "watch",
                    source: etcd_client::Error::WatchError("the watch stream ended".into()),
                });
            };
            if response
                .events()
                .iter()
                .any(|event| event.event_type() == EventType::Delete)
            {
                return Ok(());
            }
        }
    }

    /// The hosts that are members now.
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, ClusterError> {
        let prefix = self.key("hosts/");
        let got = self
            .request(
                "get",
                self.client
                    .clone()
                    .get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        got.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value()).map_err(|e| ClusterError::BadValue {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    detail: e.to_string(),
                })
            })
            .collect()
    }

    /// Every VM's owner, with its token.
    pub async fn owners(&self) -> Result<Vec<(String, OwnerRecord, i64)>, ClusterError> {
        let prefix = self.key("vms/");
        let got = self
            .request(
                "get",
                self.client
                    .clone()
                    .get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut owners = Vec::new();
        for kv in got.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(vm) = key
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.strip_suffix("/owner"))
            else {
                continue;
            };
            let owner = serde_json::from_slice(kv.value()).map_err(|e| ClusterError::BadValue {
                key: key.clone(),
                detail: e.to_string(),
            })?;
            owners.push((vm.to_string(), owner, kv.create_revision()));
        }
        Ok(owners)
    }

    /// The seconds lease `lease` has left (0: gone).
    pub async fn lease_left(&self, lease: i64) -> Result<i64, ClusterError> {
        let alive = self
            .request(
                "lease time-to-live",
                self.client.clone().lease_time_to_live(lease, None),
            )
            .await?;
        Ok(alive.ttl().max(0))
    }

    async fn request<T>(
        &self,
        what: &'static str,
        request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ClusterError> {
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, request).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(source)) => Err(ClusterError::Request { what, source }),
            Err(_) => Err(ClusterError::Timeout { what, timeout }),
        }
    }

    /// The session: renews the lease, moves the deadline on every answered
    /// renewal, fences the host when the deadline passes, and joins again
    /// with a new lease once etcd answers.
    async fn keep_alive(
        self: Arc<Self>,
        tx: watch::Sender<Standing>,
        mut lease: i64,
        mut deadline: Instant,
        lease_file: PathBuf,
        shutdown: CancellationToken,
    ) {
        let config = &self.config;
        let mut client = self.client.clone();
        let mut stream: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        let mut fenced = false;
        loop {
            if fenced {
                // Rejoin: the old lease goes first (its VMs are dead here).
                let _ =
                    tokio::time::timeout(config.request_timeout, client.lease_revoke(lease)).await;
                match grant(config, &mut client).await {
                    Ok((new_lease, new_deadline)) => {
                        tracing::warn!(lease = new_lease, "joined the cluster again after fencing");
                        lease = new_lease;
                        deadline = new_deadline;
                        if let Err(e) = record_lease(&lease_file, &config.host, lease) {
                            tracing::warn!(error = %e, "cannot record the session lease");
                        }
                        fenced = false;
                        stream = None;
                        let _ = tx.send(Standing::Live { lease, deadline });
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot join the cluster again yet"),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(config.keepalive_interval.min(Duration::from_secs(1))) => {}
                }
                continue;
            }
            let sent = Instant::now();
            let renewal = renew(&mut client, &mut stream, lease);
            let answered = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(deadline.into()) => None,
                r = tokio::time::timeout(config.request_timeout, renewal) => Some(r),
            };
            let mut retry_soon = false;
            match answered {
                None => {}
                Some(Ok(Ok(ttl))) if ttl > 0 => {
                    let ttl = Duration::from_secs(ttl.unsigned_abs());
                    deadline = (sent + ttl)
                        .checked_sub(config.fence_margin)
                        .unwrap_or(sent);
                    let _ = tx.send(Standing::Live { lease, deadline });
                }
                Some(Ok(Ok(_))) => {
                    // The server says the lease is gone.
                    tracing::error!(lease, "etcd says the session lease expired");
                    deadline = Instant::now();
                }
                Some(Ok(Err(e))) => {
                    tracing::warn!(error = %e, lease, "lease renewal failed");
                    stream = None;
                    retry_soon = true;
                }
                Some(Err(_)) => {
                    tracing::warn!(lease, "lease renewal got no answer in time");
                    stream = None;
                    retry_soon = true;
                }
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    lease,
                    "fencing: the session lease was not renewed by its deadline"
                );
                fenced = true;
                let _ = tx.send(Standing::Fenced { lease });
                continue;
            }
            let next = if retry_soon {
                Instant::now() + config.keepalive_interval.min(Duration::from_millis(250))
            } else {
                sent + config.keepalive_interval
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(next.min(deadline).into()) => {}
            }
        }
    }
}

/// Keeps the host's standing in the metrics (`relive_cluster_*`) until
/// `shutdown`.
pub async fn export_standing(
    member: Arc<Member>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    let host = member.host().to_string();
    let mut standing = member.subscribe();
    let mut was_live = true;
    loop {
        let now = *standing.borrow_and_update();
        match now {
            Standing::Live { deadline, .. } => {
                let left = deadline.saturating_duration_since(Instant::now());
                let wall = SystemTime::now() + left;
                let at = wall
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                metrics.set_cluster_standing(&host, Some(at));
                was_live = true;
            }
            Standing::Fenced { .. } if was_live => {
                metrics.record_fence(&host);
                was_live = false;
            }
            Standing::Fenced { .. } => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = standing.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// The lease a previous supervisor of this host recorded, with its fencing
/// deadline, if etcd still has it alive.
async fn resume(
    config: &ClusterConfig,
    client: &mut Client,
    lease_file: &Path,
) -> Option<(i64, Instant)> {
    let text = std::fs::read_to_string(lease_file).ok()?;
    let recorded: LeaseRecord = serde_json::from_str(&text).ok()?;
    if recorded.host != config.host {
        return None;
    }
    let sent = Instant::now();
    let alive = tokio::time::timeout(
        config.request_timeout,
        client.lease_time_to_live(recorded.lease, None),
    )
    .await
    .ok()?
    .ok()?;
    // The remaining TTL, not the granted one: the deadline may be near.
    let left = Duration::from_secs(u64::try_from(alive.ttl()).ok()?);
    let deadline = (sent + left).checked_sub(config.fence_margin)?;
    if deadline <= Instant::now() {
        return None;
    }
    tracing::info!(lease = recorded.lease, left = ?left, "resumed the session lease of the previous supervisor");
    Some((recorded.lease, deadline))
}

/// `<state_dir>/cluster-lease.json`: the session lease, for the next
/// supervisor of this host.
#[derive(Serialize, Deserialize)]
struct LeaseRecord {
    host: String,
    lease: i64,
}

fn record_lease(path: &Path, host: &str, lease: i64) -> std::io::Result<()> {
    let record = LeaseRecord {
        host: host.to_string(),
        lease,
    };
    let bytes = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
    let temp = path.with_extension("json.tmp");
    let mut file = relive_images::private::create_file(&temp)?;
    std::io::Write::write_all(&mut file, &bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)
}

/// How long `relive up` waits for etcd to grant its first lease (a cluster
/// starting with its hosts may have no leader yet).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// [`grant`], retried until [`JOIN_TIMEOUT`].
async fn first_grant(
    config: &ClusterConfig,
    client: &mut Client,
) -> Result<(i64, Instant), ClusterError> {
    let until = Instant::now() + JOIN_TIMEOUT;
    loop {
        match grant(config, client).await {
            Ok(granted) => return Ok(granted),
            Err(e) if Instant::now() < until => {
                tracing::warn!(error = %e, "etcd has not granted a session lease yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Grants a session lease and registers the host on it; returns the lease
/// and its first fencing deadline.
async fn grant(
    config: &ClusterConfig,
    client: &mut Client,
) -> Result<(i64, Instant), ClusterError> {
    let timeout = config.request_timeout;
    let sent = Instant::now();
    let ttl = i64::try_from(config.lease_ttl.as_secs()).unwrap_or(i64::MAX);
    let granted = match tokio::time::timeout(timeout, client.lease_grant(ttl, None)).await {
        Ok(Ok(granted)) => granted,
        Ok(Err(source)) => {
            return Err(ClusterError::Request {
                what: "lease grant",
                source,
            })
        }
        Err(_) => {
            return Err(ClusterError::Timeout {
                what: "lease grant",
                timeout,
            })
        }
    };
    let lease = granted.id();
    let deadline = (sent + Duration::from_secs(granted.ttl().unsigned_abs()))
        .checked_sub(config.fence_margin)
        .unwrap_or(sent);
    let record = HostRecord {
        host: config.host.clone(),
        advertise: config.advertise,
        lease,
        joined_unix_ms: unix_ms(),
        cpu: cpu_fingerprint(),
        cores: crate::config::host_capacity().0,
        memory_mib: crate::config::host_capacity().1,
    };
    let key = format!("{}/hosts/{}", config.prefix, config.host);
    let value = serde_json::to_vec(&record).map_err(|e| ClusterError::BadValue {
        key: key.clone(),
        detail: e.to_string(),
    })?;
    match tokio::time::timeout(
        timeout,
        client.put(key, value, Some(PutOptions::new().with_lease(lease))),
    )
    .await
    {
        Ok(Ok(_)) => Ok((lease, deadline)),
        Ok(Err(source)) => Err(ClusterError::Request {
            what: "host registration",
            source,
        }),
        Err(_) => Err(ClusterError::Timeout {
            what: "host registration",
            timeout,
        }),
    }
}

/// One renewal on the keep-alive stream (opened if needed): the TTL the
/// server answered (0: the lease is gone).
async fn renew(
    client: &mut Client,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    lease: i64,
) -> Result<i64, etcd_client::Error> {
    if stream.is_none() {
        *stream = Some(client.lease_keep_alive(lease).await?);
    }
    let Some((keeper, responses)) = stream.as_mut() else {
        return Err(etcd_client::Error::LeaseKeepAliveError(
            "no keep-alive stream".into(),
        ));
    };
    keeper.keep_alive().await?;
    match responses.message().await? {
        Some(response) => Ok(response.ttl()),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "the keep-alive stream ended".into(),
        )),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, cpu: &str) -> HostRecord {
        HostRecord {
            host: name.to_string(),
            advertise: None,
            lease: 1,
            joined_unix_ms: 0,
            cpu: cpu.to_string(),
            cores: 2,
            memory_mib: 1024,
        }
    }

    /// Holders of the latest image first, then the hosts on the image's
    /// CPU, then the rest; the same order from any host's list order, and
    /// VMs spread by rendezvous hashing where nothing else decides.
    #[test]
    fn the_takeover_order_prefers_holders_then_the_images_cpu() {
        let hosts = [
            host("a", "x"),
            host("b", "y"),
            host("c", "x"),
            host("d", "x"),
        ];
        let holders = ["b".to_string()];
        let order = takeover_order("web", &hosts, &holders, "x");
        assert_eq!(
            order[0], "b",
            "the holder first, whatever its CPU: {order:?}"
        );
        assert_eq!(order.len(), 4);
        let mut rest: Vec<&str> = order[1..].iter().map(String::as_str).collect();
        rest.sort_unstable();
        assert_eq!(rest, ["a", "c", "d"], "then the hosts on the image's CPU");
        let no_holders = takeover_order("web", &hosts, &[], "y");
        assert_eq!(
            no_holders[0], "b",
            "on the image's CPU first: {no_holders:?}"
        );
        let mut reversed = hosts.clone();
        reversed.reverse();
        assert_eq!(takeover_order("web", &reversed, &holders, "x"), order);
        let firsts: std::collections::BTreeSet<String> = (0..40)
            .map(|i| takeover_order(&format!("vm-{i}"), &hosts, &[], "")[0].clone())
            .collect();
        assert!(firsts.len() >= 3, "VMs spread over the hosts: {firsts:?}");
    }

    #[test]
    fn this_hosts_cpu_fingerprint_names_vendor_model_and_flags() {
        let cpu = cpu_fingerprint();
        assert!(cpu.contains("family") && cpu.contains("flags"), "{cpu}");
        assert_eq!(cpu, cpu_fingerprint(), "stable");
    }
}
