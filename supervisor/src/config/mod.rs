//! The fleet file: one YAML file describing every VM `relive up` runs.
//!
//! [`load`] reads and checks the whole file before anything is started: it
//! either returns a complete [`FleetConfig`], with every path absolute and every
//! VM's policy resolved, or exactly one [`ConfigError`] that names the file,
//! the line and column, the key, what is wrong and what to do:
//!
//! ```text
//! configs/fleet.yaml:14:5: vms[1].name: duplicate VM name "demo-1" (first at line 9): give every VM its own name
//! ```
//!
//! This is the only module that knows YAML is involved (`serde_yaml`, archived
//! upstream: keep it behind this module). A fully commented example is
//! `configs/fleet.example.yaml`.
//!
//! # Keys
//!
//! Unknown keys are errors everywhere. Relative paths are relative to the
//! directory of the YAML file; `~` is not expanded.
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `state_dir` | `./relive-state` | per-VM images, sockets and logs (`<state_dir>/<vm>/images`, ...) |
//! | `api.socket` | `<state_dir>/api.sock` | the API's Unix socket (mode 0600); its path must be under 108 bytes |
//! | `api.tcp` | none | an extra TCP listener, `ADDRESS:PORT` on loopback only (`127.0.0.1`, `::1`, `localhost`) |
//! | `api.token` | none | bearer token for `api.tcp` (required with it): at least 16 characters, no spaces |
//! | `api.token_file` | none | a file holding the token instead (one line); not together with `api.token` |
//! | `metrics.listen` | none | an extra loopback `ADDRESS:PORT` serving only `/metrics`, for scrapers |
//! | `defaults.<policy key>` | see below | the fleet-wide policy |
//! | `jail` | `true` as root, `false` otherwise | start VMMs jailed (own namespaces, a root holding only the VM's images and console, no capabilities): `true` (as uid and gid 65534), `{ uid: N, gid: N }` (not 0), or `false`; needs the supervisor to run as root |
//! | `cluster` | none | cluster mode (several hosts share the fleet through etcd); without it the supervisor runs alone, with no etcd |
//! | `cluster.etcd` | required | etcd's client endpoints, a list of `http://HOST:PORT` (or `HOST:PORT`) |
//! | `cluster.host` | required | this host's name, unique in the cluster (same form as a VM name) |
//! | `cluster.advertise` | none | `ADDRESS:PORT` of this host's cluster listener (image replication from peers): it listens there, and the other hosts connect there |
//! | `cluster.prefix` | `/relive` | the cluster's key prefix in etcd: starts with `/`, no trailing `/` |
//! | `cluster.lease_ttl` | `10s` | the host's session lease; whole seconds, at least `2s` |
//! | `cluster.keepalive_interval` | `2s` | how often the lease is renewed |
//! | `cluster.request_timeout` | `2s` | how long one etcd request may take |
//! | `cluster.fence_margin` | `2s` | the host fences itself (kills its VMs) this long before its lease could expire; `keepalive_interval` + 2 × `request_timeout` must be at most `lease_ttl` − `fence_margin` |
//! | `cluster.failover_grace` | `2s` | after a VM's owner is gone, the wait before another host takes it |
//! | `cluster.token` | none | the bearer token of the cluster listener (at least 16 characters, the same on every host); required with `advertise` |
//! | `cluster.token_file` | none | a file holding it instead |
//! | `cluster.replicas` | `1` | how many peer hosts receive each consistency image (0: none); peers are hosts that `advertise` |
//! | `vms` | required | the VMs, at least one |
//! | `vms[].name` | required | `a-z`, `0-9` and `-`, 1 to 48 characters, starting and ending with a letter or digit; unique |
//! | `container_kernel` | `/var/lib/relive/vmlinux` | the Linux kernel of every `image:` VM (`scripts/setup.sh` installs Debian's cloud kernel there) |
//! | `vms[].kernel` | required without `image` | `bundled` (relive's own guest) or the path of an ELF vmlinux or bzImage (`./bundled` for a file of that name) |
//! | `vms[].image` | none | a container image built by `relive image build` (an initramfs whose `/init` is `relive-agent`): the VM boots `container_kernel` with it; not with `kernel` or `initrd` |
//! | `vms[].command` | the image's | with `image`: the app's whole command line, a list (replaces the image's entrypoint and cmd) |
//! | `vms[].env` | none | with `image`: a map of environment variables added to (or replacing those of) the image's |
//! | `vms[].restart` | `on-failure` | with `image`, what the app's end means: `on-failure` (a non-zero exit or a signal is a failure, restored by the policy; exit 0 stops the VM: it is done), `always` (exit 0 restarts it from its boot image), `never` (exit 0 stops it, any other end marks it `failed`) |
//! | `vms[].initrd` | none | path of an initrd |
//! | `vms[].cmdline` | none | kernel command line, at most 2047 bytes, no control characters; with `image`, added after relive's own (`console=ttyS0 panic=-1 quiet ...`) |
//! | `vms[].vcpus` | 1 | 1 to the host's cores |
//! | `vms[].memory_mib` | 128 | guest memory, at least 16 MiB, at most the host's RAM |
//! | `vms[].limits.cpu_percent` | none | CPU quota of the VMM process, in percent of one core: 1 to 100 × host cores |
//! | `vms[].limits.memory_mib` | none | memory limit of the VMM process: more than the guest's `memory_mib` |
//! | `vms[].limits.pids` | none | most tasks of the VMM process: at least `vcpus` + 8 |
//! | `vms[].policy.<policy key>` | `defaults` | this VM's own policy |
//! | `vms[].jail` | the fleet's `jail` | this VM's own jail (`false`, `true`, `{ uid: N, gid: N }`): a uid per VM keeps VMMs from signalling one another |
//!
//! Policy keys (in `defaults:` and per VM under `policy:`, see
//! [`crate::policy`] for their semantics):
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `checkpoint_interval` | `5s` | consistency image period while healthy; `0s` disables |
//! | `heartbeat_timeout` | `2s` | no heartbeat for this long: the guest hangs |
//! | `ready_grace` | `10s` | uptime after a start or restore before the VM counts as healthy |
//! | `failure_window` | `60s` | failures are counted this long; a failure this soon after a consistency restore goes to the boot image |
//! | `max_failures` | `3` | more failures within `failure_window`: the VM is `failed` |
//! | `restart_backoff` | `0s` | wait before each automatic restore |
//! | `warm_boot_image` | `true` | the boot image is a snapshot of the freshly booted guest, not a recipe |
//! | `standby` | `false` | keep a standby VMM ready for the fastest failover |
//! | `keep_images` | `3` | consistency images kept per VM |
//! | `control_timeout` | `5s` | a VMM that does not answer a control request this fast has failed (`control-timeout`) |
//! | `standby_timeout` | `1s` | a standby that has not taken the image this fast is killed and the restore goes cold |
//!
//! Durations are whole numbers with units from largest to smallest, each at
//! most once: `500ms`, `30s`, `2m`, `1h`, `1m30s`, `0s`; at most `8760h`.
//!
//! # Rules beyond types
//!
//! Each policy, after merging, must pass [`Policy::check`](crate::policy::Policy::check)
//! (`heartbeat_timeout` > 0, `failure_window` >= `ready_grace` and > 0,
//! `max_failures` >= 1, `max_failures` × `restart_backoff` < `failure_window`,
//! `keep_images` >= 1, `checkpoint_interval` 0 or >= 100ms, `control_timeout`
//! and `standby_timeout` > 0); `defaults` must
//! pass on its own. A VM on the bundled guest needs `heartbeat_timeout` of at
//! least twice its heartbeat interval (`relive.hb_ms` on its command line,
//! 100 ms when absent); so does an `image:` VM, whose agent heartbeats every
//! `relive.hb_ms` (1000 ms when absent). The API's and the metrics listener's addresses must
//! be loopback and distinct.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::policy::Policy;

mod checks;
mod positions;
mod raw;
mod yaml_errors;

use checks::*;
use positions::*;
use raw::*;
pub use raw::{format_duration, parse_duration};
use yaml_errors::*;

/// Longest accepted duration: a year.
pub const MAX_DURATION: Duration = Duration::from_secs(8760 * 3600);
/// Longest VM name.
pub const MAX_NAME_LEN: usize = 48;
/// Least guest memory.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Longest kernel command line (Linux x86's limit, less its terminating NUL).
pub const MAX_CMDLINE_LEN: usize = 2047;
/// Shortest accepted API token.
pub const MIN_TOKEN_LEN: usize = 16;
/// Tasks a VMM process needs besides one per vCPU.
pub const VMM_OWN_TASKS: u64 = 8;
/// Longest Unix socket path (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A checked fleet: what `relive up` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// The YAML file, absolute.
    pub path: PathBuf,
    /// Per-VM images, sockets and logs, absolute.
    pub state_dir: PathBuf,
    /// Where the HTTP API listens.
    pub api: ApiConfig,
    /// The extra metrics listener, if any.
    pub metrics: Option<MetricsConfig>,
    /// How VMMs are confined beyond their seccomp filters.
    pub jail: Jail,
    /// Cluster mode: the etcd cluster this host shares the fleet through.
    /// `None`: a single host, no etcd (the default).
    pub cluster: Option<ClusterConfig>,
    /// The VMs, in file order, at least one, names unique.
    pub vms: Vec<VmSpec>,
    /// What every host of a cluster must share: the file's `vms`,
    /// `defaults` and `container_kernel`, as canonical JSON (keys sorted,
    /// no formatting or comments), as written (before defaults are merged,
    /// so it does not change with relive's version).
    pub shared: String,
}

/// `cluster:`: supervisors on several hosts share one fleet through etcd
/// (see [`crate::cluster`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd's client endpoints (`http://HOST:PORT` or `HOST:PORT`).
    pub etcd: Vec<String>,
    /// This host's name in the cluster, unique among its hosts.
    pub host: String,
    /// Where the other hosts reach this host's API.
    pub advertise: Option<SocketAddr>,
    /// The key prefix of this cluster in etcd, without a trailing `/`.
    pub prefix: String,
    /// The session lease's time to live.
    pub lease_ttl: Duration,
    /// How often the lease is renewed.
    pub keepalive_interval: Duration,
    /// How long one etcd request may take.
    pub request_timeout: Duration,
    /// How long before the lease could expire the host fences itself.
    pub fence_margin: Duration,
    /// How long the other hosts wait after an owner's key is gone before
    /// one of them takes its VM.
    pub failover_grace: Duration,
    /// The bearer token of the cluster listener (`advertise`), shared by
    /// every host.
    pub token: Option<Token>,
    /// How many peer hosts receive each consistency image.
    pub replicas: usize,
}

/// Defaults of `cluster:` (Patroni's rule `loop_wait + 2 × retry_timeout ≤
/// ttl`, here `keepalive_interval + 2 × request_timeout ≤ lease_ttl −
/// fence_margin`: a host retries its renewal at least once before it
/// fences itself).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// See [`DEFAULT_LEASE_TTL`].
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// See [`DEFAULT_LEASE_TTL`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// See [`DEFAULT_LEASE_TTL`].
pub const DEFAULT_FENCE_MARGIN: Duration = Duration::from_secs(2);
/// See [`DEFAULT_LEASE_TTL`].
pub const DEFAULT_FAILOVER_GRACE: Duration = Duration::from_secs(2);

/// Whether the supervisor starts VMMs jailed (`relive-vmm --jail`: own
/// mount, pid, network, IPC and UTS namespaces, a root holding only the VM's
/// image directory and console log, a non-root uid and gid, no
/// capabilities).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jail {
    /// VMMs run as the supervisor's user, unjailed.
    Off,
    /// VMMs run jailed as `uid:gid`.
    As {
        /// The uid.
        uid: u32,
        /// The gid.
        gid: u32,
    },
}

/// The jail's uid and gid when the file does not name them: `nobody` and
/// `nogroup` on Debian.
pub const DEFAULT_JAIL_ID: u32 = 65534;

impl FleetConfig {
    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmSpec> {
        self.vms.iter().find(|vm| vm.name == name)
    }

    /// The directory of the VM named `name` (`<state_dir>/<name>`).
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }
}

/// Where the HTTP API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// The Unix socket (mode 0600), absolute.
    pub socket: PathBuf,
    /// An extra TCP listener on loopback.
    pub tcp: Option<SocketAddr>,
    /// The bearer token the TCP listener requires (set whenever `tcp` is).
    pub token: Option<Token>,
}

/// A bearer token. Its `Debug` never shows it; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The token itself, for the one place that compares or sends it.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they
    /// differ.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The extra listener for `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// A loopback address.
    pub listen: SocketAddr,
}

/// One VM of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Unique name (`[a-z0-9-]`, 1 to 48 characters).
    pub name: String,
    /// What to boot.
    pub kernel: KernelSpec,
    /// An initrd, absolute.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// vCPUs, 1 to the host's cores.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Host resource limits of the VMM process.
    pub limits: Limits,
    /// The fully resolved policy (defaults merged with the VM's overrides).
    pub policy: Policy,
    /// `<state_dir>/<name>/images`, absolute.
    pub images_dir: PathBuf,
    /// Whether its VMMs run jailed (the fleet's `jail`).
    pub jail: Jail,
    /// A container VM's app (`image:`); its kernel, initrd and command line
    /// are set from it.
    pub app: Option<AppSpec>,
}

/// A container VM's app (`image:`): what the guest agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSpec {
    /// The image (initramfs), absolute; it is the VM's initrd.
    pub image: PathBuf,
    /// The app's whole command line, replacing the image's.
    pub command: Option<Vec<String>>,
    /// `NAME=value` added to the image's environment.
    pub env: Vec<String>,
    /// What the app's end means.
    pub restart: Restart,
}

/// What a container app's end means (`vms[].restart`), like Kubernetes'
/// `restartPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// A non-zero exit or a signal is a failure (the policy restores the
    /// VM); exit 0 stops it.
    OnFailure,
    /// A non-zero exit or a signal is a failure; exit 0 restarts the VM
    /// from its boot image.
    Always,
    /// Exit 0 stops the VM; any other end marks it failed.
    Never,
}

impl Restart {
    /// The value as written in the fleet file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Restart::OnFailure => "on-failure",
            Restart::Always => "always",
            Restart::Never => "never",
        }
    }
}

/// Where an `image:` VM's kernel is when the fleet does not say
/// (`container_kernel`); `scripts/setup.sh` installs Debian's cloud kernel
/// there.
pub const DEFAULT_CONTAINER_KERNEL: &str = "/var/lib/relive/vmlinux";

/// Heartbeat period of `relive-agent` without `relive.hb_ms`.
pub const AGENT_DEFAULT_HB_MS: u64 = 1000;

/// The kernel command line relive gives every `image:` VM (before the VM's
/// own `cmdline`): the console on COM1, reboot on panic (relive sees the
/// panic), `reboot` through the i8042 (relive's typed `reset`; Linux's
/// default on hardware-reduced ACPI without EFI is a real-mode BIOS restart
/// that a microVM has no firmware for), no boot chatter, and no probing of
/// absent legacy devices.
pub const CONTAINER_CMDLINE: &str =
    "console=ttyS0 panic=-1 reboot=k quiet initcall_blacklist=cmos_init";

/// The kernel a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSpec {
    /// relive's bundled guest.
    Bundled,
    /// An ELF vmlinux or bzImage (absolute; it existed when loaded).
    Path(PathBuf),
}

/// Host resource limits of a VMM process (cgroup); `None` leaves one alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU quota in percent of one core.
    pub cpu_percent: Option<u32>,
    /// Memory limit in MiB.
    pub memory_mib: Option<u64>,
    /// Most tasks.
    pub pids: Option<u64>,
}

/// A place in the fleet file; both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Line.
    pub line: usize,
    /// Column, in characters.
    pub column: usize,
}

/// What kind of mistake a [`ConfigError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Read,
    /// Not valid YAML, or not a single mapping.
    Syntax,
    /// A key relive does not know.
    UnknownKey,
    /// A required key is absent.
    MissingKey,
    /// A key given twice in one mapping.
    DuplicateKey,
    /// A value of the wrong type.
    BadType,
    /// A value of the right type that is out of range or malformed.
    BadValue,
    /// A duration that does not parse.
    BadDuration,
    /// A kernel, initrd or token file that is missing or unreadable.
    MissingFile,
    /// Two VMs with one name.
    DuplicateName,
    /// A VM name outside the allowed form.
    BadName,
    /// A policy that cannot work.
    BadPolicy,
    /// An API or metrics listener that is not allowed.
    BadListener,
    /// No VMs.
    NoVms,
}

/// Why a fleet file was refused: one mistake, where it is, and what to do.
///
/// Displays as `FILE:LINE:COLUMN: KEY: MESSAGE` (the location and key left out
/// where unknown); an I/O cause is chained as the error's source.
#[derive(Debug)]
pub struct ConfigError {
    file: PathBuf,
    location: Option<Location>,
    key: String,
    kind: ConfigErrorKind,
    message: String,
    source: Option<io::Error>,
}

impl ConfigError {
    /// The fleet file, as given to [`load`].
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Where in the file, when known.
    pub fn location(&self) -> Option<Location> {
        self.location
    }

    /// The key, like `vms[1].name` (empty for the file as a whole).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The kind of mistake.
    pub fn kind(&self) -> ConfigErrorKind {
        self.kind
    }

    /// What is wrong and what to do.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(at) = self.location {
            write!(f, ":{}:{}", at.line, at.column)?;
        }
        f.write_str(": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Reads and checks the fleet file at `path`. Relative paths inside it are
/// resolved against its directory.
pub fn load(path: &Path) -> Result<FleetConfig, ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        location: None,
        key: String::new(),
        kind: ConfigErrorKind::Read,
        message: "cannot read the fleet file: check the path and its permissions".into(),
        source: Some(e),
    })?;
    parse(&source, path)
}

/// Checks fleet YAML `source` as if read from `path` (which need not exist:
/// it names the file in errors and anchors relative paths).
pub fn parse(source: &str, path: &Path) -> Result<FleetConfig, ConfigError> {
    parse_with(source, path, &Host::detect())
}

/// This host's cores and RAM in MiB (`u64::MAX` when unknown), as the
/// checks see them; cluster mode publishes them as the host's capacity.
pub fn host_capacity() -> (usize, u64) {
    let host = Host::detect();
    (host.cores, host.memory_mib)
}

/// What the checks need to know about this host.
#[derive(Debug, Clone, Copy)]
struct Host {
    cores: usize,
    /// RAM of this host in MiB (`MemTotal` of /proc/meminfo; unlimited when unknown).
    memory_mib: u64,
    /// The supervisor runs as root (it can jail VMMs).
    root: bool,
}

impl Host {
    fn detect() -> Self {
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib / 1024)
            })
            .unwrap_or(u64::MAX);
        Host {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mib,
            root: rustix::process::geteuid().is_root(),
        }
    }
}

fn parse_with(source: &str, path: &Path, host: &Host) -> Result<FleetConfig, ConfigError> {
    let file = path.to_path_buf();
    if content_lines(source).is_empty() {
        return Err(ConfigError {
            file,
            location: None,
            key: String::new(),
            kind: ConfigErrorKind::NoVms,
            message: "the fleet file is empty: list the VMs to run under `vms:` (see \
                      configs/fleet.example.yaml)"
                .into(),
            source: None,
        });
    }
    let raw: RawFleet = serde_yaml::from_str(source).map_err(|e| from_yaml(&file, source, &e))?;
    let absolute = std::path::absolute(path).map_err(|e| ConfigError {
        file: file.clone(),
        location: None,
        key: String::new(),
        kind: ConfigErrorKind::Read,
        message: "cannot make the fleet file's path absolute".into(),
        source: Some(e),
    })?;
    let base = absolute.parent().map(Path::to_path_buf).unwrap_or_default();
    let ctx = Checker {
        file,
        source,
        base,
        host: *host,
    };
    let mut fleet = ctx.check(raw, absolute)?;
    fleet.shared = shared_part(source);
    Ok(fleet)
}

/// The parts of fleet YAML `source` every host of a cluster runs alike
/// (see [`FleetConfig::shared`]). `source` has been checked already.
fn shared_part(source: &str) -> String {
    let all: serde_json::Value = serde_yaml::from_str(source).unwrap_or_default();
    let shared: serde_json::Map<String, serde_json::Value> =
        ["vms", "defaults", "container_kernel"]
            .into_iter()
            .filter_map(|key| Some((key.to_string(), all.get(key)?.clone())))
            .collect();
    serde_json::Value::Object(shared).to_string()
}

#[cfg(test)]
mod tests;
