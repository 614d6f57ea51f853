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
//! | `vms` | required | the VMs, at least one |
//! | `vms[].name` | required | `a-z`, `0-9` and `-`, 1 to 48 characters, starting and ending with a letter or digit; unique |
//! | `vms[].kernel` | required | `bundled` (relive's own guest) or the path of an ELF vmlinux or bzImage (`./bundled` for a file of that name) |
//! | `vms[].initrd` | none | path of an initrd |
//! | `vms[].cmdline` | none | kernel command line, at most 2047 bytes, no control characters |
//! | `vms[].vcpus` | 1 | 1 to the host's cores |
//! | `vms[].memory_mib` | 128 | guest memory, at least 16 MiB, at most the host's RAM |
//! | `vms[].limits.cpu_percent` | none | CPU quota of the VMM process, in percent of one core: 1 to 100 × host cores |
//! | `vms[].limits.memory_mib` | none | memory limit of the VMM process: more than the guest's `memory_mib` |
//! | `vms[].limits.pids` | none | most tasks of the VMM process: at least `vcpus` + 8 |
//! | `vms[].policy.<policy key>` | `defaults` | this VM's own policy |
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
//!
//! Durations are whole numbers with units from largest to smallest, each at
//! most once: `500ms`, `30s`, `2m`, `1h`, `1m30s`, `0s`; at most `8760h`.
//!
//! # Rules beyond types
//!
//! Each policy, after merging, must pass [`Policy::check`](crate::policy::Policy::check)
//! (`heartbeat_timeout` > 0, `failure_window` >= `ready_grace` and > 0,
//! `max_failures` >= 1, `max_failures` × `restart_backoff` < `failure_window`,
//! `keep_images` >= 1, `checkpoint_interval` 0 or >= 100ms); `defaults` must
//! pass on its own. A VM on the bundled guest needs `heartbeat_timeout` of at
//! least twice its heartbeat interval (`relive.hb_ms` on its command line,
//! 100 ms when absent). The API's and the metrics listener's addresses must
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
    /// The VMs, in file order, at least one, names unique.
    pub vms: Vec<VmSpec>,
}

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
}

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

/// What the checks need to know about this host.
#[derive(Debug, Clone, Copy)]
struct Host {
    cores: usize,
    /// RAM of this host in MiB (`MemTotal` of /proc/meminfo; unlimited when unknown).
    memory_mib: u64,
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
    ctx.check(raw, absolute)
}

// ---------------------------------------------------------------------------
// The file as serde sees it.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    state_dir: Option<String>,
    api: Option<RawApi>,
    metrics: Option<RawMetrics>,
    defaults: Option<RawPolicy>,
    vms: Option<Vec<RawVm>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<String>,
    tcp: Option<String>,
    token: Option<String>,
    token_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    kernel: String,
    initrd: Option<String>,
    cmdline: Option<String>,
    vcpus: Option<u8>,
    memory_mib: Option<u64>,
    limits: Option<RawLimits>,
    policy: Option<RawPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    cpu_percent: Option<u32>,
    memory_mib: Option<u64>,
    pids: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    checkpoint_interval: Option<DurationValue>,
    heartbeat_timeout: Option<DurationValue>,
    ready_grace: Option<DurationValue>,
    failure_window: Option<DurationValue>,
    max_failures: Option<u32>,
    restart_backoff: Option<DurationValue>,
    warm_boot_image: Option<bool>,
    standby: Option<bool>,
    keep_images: Option<usize>,
}

impl RawPolicy {
    /// `base` with every key this section sets replaced.
    fn over(&self, base: &Policy) -> Policy {
        let d = |v: &Option<DurationValue>, b: Duration| v.as_ref().map_or(b, |v| v.0);
        Policy {
            checkpoint_interval: d(&self.checkpoint_interval, base.checkpoint_interval),
            heartbeat_timeout: d(&self.heartbeat_timeout, base.heartbeat_timeout),
            ready_grace: d(&self.ready_grace, base.ready_grace),
            failure_window: d(&self.failure_window, base.failure_window),
            max_failures: self.max_failures.unwrap_or(base.max_failures),
            restart_backoff: d(&self.restart_backoff, base.restart_backoff),
            warm_boot_image: self.warm_boot_image.unwrap_or(base.warm_boot_image),
            standby: self.standby.unwrap_or(base.standby),
            keep_images: self.keep_images.unwrap_or(base.keep_images),
        }
    }

    /// Whether this section sets `key`.
    fn sets(&self, key: &str) -> bool {
        match key {
            "checkpoint_interval" => self.checkpoint_interval.is_some(),
            "heartbeat_timeout" => self.heartbeat_timeout.is_some(),
            "ready_grace" => self.ready_grace.is_some(),
            "failure_window" => self.failure_window.is_some(),
            "max_failures" => self.max_failures.is_some(),
            "restart_backoff" => self.restart_backoff.is_some(),
            "warm_boot_image" => self.warm_boot_image.is_some(),
            "standby" => self.standby.is_some(),
            "keep_images" => self.keep_images.is_some(),
            _ => false,
        }
    }
}

/// A duration written like `1m30s`.
struct DurationValue(Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 500ms, 30s or 1m30s")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<DurationValue, E> {
                parse_duration(s).map(DurationValue).map_err(E::custom)
            }
        }
        // serde_yaml hands every scalar, numbers included, to `visit_str`.
        deserializer.deserialize_str(V)
    }
}

/// Parses a duration like `500ms`, `30s`, `2m`, `1h` or `1m30s`: whole
/// numbers, units `h`, `m`, `s`, `ms` from largest to smallest, each at most
/// once, no spaces, at most [`MAX_DURATION`]. The error is a sentence for the
/// user.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)];
    let how = "write a whole number and a unit (ms, s, m or h), like 500ms, 30s, 2m or 1m30s";
    if text.is_empty() {
        return Err(format!("an empty value is not a duration: {how}"));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "\"{text}\" has no unit: write {text}s for seconds or {text}ms for milliseconds"
        ));
    }
    let mut rest = text;
    let mut total_ms: u64 = 0;
    let mut last_unit = None::<usize>;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("\"{text}\" is not a duration: {how}"));
        }
        let (number, after) = rest.split_at(digits);
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(letters);
        if after.starts_with('.') || after.starts_with(',') {
            return Err(format!(
                "\"{text}\" is not a duration: use whole numbers, like 1s500ms for one and a \
                 half seconds"
            ));
        }
        let Some(index) = UNITS.iter().position(|(u, _)| *u == unit) else {
            return Err(format!("\"{text}\" is not a duration: {how}"));
        };
        if last_unit.is_some_and(|last| index <= last) {
            return Err(format!(
                "\"{text}\" is not a duration: write units from largest to smallest, each \
                 once, like 1h30m or 1m30s"
            ));
        }
        last_unit = Some(index);
        let value = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(UNITS[index].1))
            .and_then(|ms| total_ms.checked_add(ms));
        total_ms = match value {
            Some(ms) if Duration::from_millis(ms) <= MAX_DURATION => ms,
            _ => {
                return Err(format!(
                    "\"{text}\" is too long: durations are at most {}",
                    format_duration(MAX_DURATION)
                ))
            }
        };
        rest = after;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Formats a duration the way the fleet file writes them (`1m30s`, `500ms`,
/// `0s`), exactly.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let parts = [
        (secs / 3600, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
        (u64::from(nanos / 1_000_000), "ms"),
        (u64::from(nanos / 1000 % 1000), "us"),
        (u64::from(nanos % 1000), "ns"),
    ];
    parts
        .iter()
        .filter(|(n, _)| *n != 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect()
}

// ---------------------------------------------------------------------------
// serde_yaml's errors, rewritten for users.

/// Turns a serde_yaml error into one [`ConfigError`]. serde_yaml writes
/// `PATH: MESSAGE at line L column C`, where PATH (like `vms[0].limits`) is
/// left out at the top level and the location where unknown.
fn from_yaml(file: &Path, source: &str, error: &serde_yaml::Error) -> ConfigError {
    let location = error.location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    });
    let mut text = error.to_string();
    if let Some(l) = &location {
        text = text.replacen(&format!(" at line {} column {}", l.line, l.column), "", 1);
    }
    let (path, message) = match text.split_once(": ") {
        Some((p, m)) if is_yaml_path(p) => (p.to_string(), m.to_string()),
        _ => (String::new(), text),
    };
    let join = |field: &str| {
        if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        }
    };
    let (kind, key, message) = if let Some(rest) = message.strip_prefix("unknown field ") {
        let quoted = backticked(rest);
        let field = quoted.first().cloned().unwrap_or_default();
        let known: Vec<String> = quoted.into_iter().skip(1).collect();
        let mut m = format!("unknown key \"{field}\"");
        if field == "<<" {
            m.push_str(
                ": YAML merge keys are not supported; put shared settings under `defaults:` or \
                 repeat them",
            );
        } else if let Some(close) = closest(&field, &known) {
            m.push_str(&format!(": did you mean \"{close}\"?"));
        } else {
            m.push_str(": remove it or fix its spelling");
        }
        if !known.is_empty() {
            m.push_str(&format!(" (keys here: {})", known.join(", ")));
        }
        (ConfigErrorKind::UnknownKey, join(&field), m)
    } else if let Some(rest) = message.strip_prefix("missing field ") {
        let field = backticked(rest).into_iter().next().unwrap_or_default();
        let what = match field.as_str() {
            "vms" => "list the VMs to run under `vms:`",
            "name" => "give the VM a name, like `name: web-1`",
            "kernel" => {
                "add `kernel: bundled` for relive's own guest, or the path of an ELF vmlinux or \
                 bzImage"
            }
            "listen" => "add `listen: 127.0.0.1:9464`, or remove `metrics:`",
            _ => "add it",
        };
        let m = format!("missing required key \"{field}\": {what}");
        (ConfigErrorKind::MissingKey, join(&field), m)
    } else if let Some(rest) = message.strip_prefix("duplicate field ") {
        let field = backticked(rest).into_iter().next().unwrap_or_default();
        let m = format!("\"{field}\" is given twice here: keep one");
        (ConfigErrorKind::DuplicateKey, join(&field), m)
    } else if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
        if path == "vms" && found == "unit value" {
            let m = "no VMs: list at least one VM under `vms:`".to_string();
            (ConfigErrorKind::NoVms, path.clone(), m)
        } else if path.is_empty() {
            let m = "the fleet file must be a mapping of keys like state_dir, defaults and vms \
                     (see configs/fleet.example.yaml)"
                .to_string();
            (ConfigErrorKind::Syntax, String::new(), m)
        } else {
            let m = format!(
                "expected {}, found {}",
                friendly_expected(expected),
                friendly_found(found)
            );
            (ConfigErrorKind::BadType, path.clone(), m)
        }
    } else if let Some(rest) = message.strip_prefix("invalid value: ") {
        let (found, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
        let m = format!(
            "{} is out of range: expected {}",
            friendly_found(found),
            friendly_expected(expected)
        );
        (ConfigErrorKind::BadValue, path.clone(), m)
    } else if !path.is_empty() {
        // Our own messages: only durations raise them.
        (ConfigErrorKind::BadDuration, path.clone(), message)
    } else if message.contains("more than one document") {
        let m =
            "the file holds more than one YAML document (---): keep one fleet per file".to_string();
        (ConfigErrorKind::Syntax, String::new(), m)
    } else if location.is_some_and(|l| tab_indented(source, l.line)) {
        let m = format!("{message}: YAML does not allow tabs for indentation; indent with spaces");
        (ConfigErrorKind::Syntax, String::new(), m)
    } else {
        let m = format!(
            "{message}: fix the YAML syntax (indent with spaces; write `key: value`; quote \
             values that contain `: ` or start with a special character)"
        );
        (ConfigErrorKind::Syntax, String::new(), m)
    };
    // serde_yaml places a missing key at its mapping and an error of a value
    // at the value; point at the key itself where the text has it.
    let location = match kind {
        ConfigErrorKind::BadType | ConfigErrorKind::BadValue | ConfigErrorKind::BadDuration => {
            parse_key_path(&key)
                .and_then(|segs| locate_exact(source, &segs))
                .or(location)
        }
        _ => location,
    };
    ConfigError {
        file: file.to_path_buf(),
        location,
        key,
        kind,
        message,
        source: None,
    }
}

/// Whether line `line` (1-based) of `source` is indented with a tab.
fn tab_indented(source: &str, line: usize) -> bool {
    source
        .lines()
        .nth(line.saturating_sub(1))
        .is_some_and(|l| l.trim_start_matches(' ').starts_with('\t'))
}

/// Whether `text` is a serde_yaml path like `vms[0].limits`.
fn is_yaml_path(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '-'))
}

/// The `backticked` words of a serde message, in order.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The known key closest to `typo`, if it is close (an edit distance of at
/// most 2, or one contains the other).
fn closest(typo: &str, known: &[String]) -> Option<String> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut diagonal = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let above = row[j + 1];
                row[j + 1] = (diagonal + usize::from(ca != *cb))
                    .min(row[j] + 1)
                    .min(above + 1);
                diagonal = above;
            }
        }
        row[b.len()]
    }
    known
        .iter()
        .map(|k| (distance(typo, k), k))
        .filter(|(d, k)| *d <= 2 || (typo.len() >= 4 && (k.contains(typo) || typo.contains(*k))))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone())
}

fn friendly_expected(expected: &str) -> String {
    match expected {
        "u8" => "a whole number from 0 to 255".into(),
        "u32" => format!("a whole number from 0 to {}", u32::MAX),
        "u64" | "usize" => "a whole number of 0 or more".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "a list (lines starting with `- `)".into(),
        e if e.starts_with("struct ") => "a mapping (`key: value` lines)".into(),
        e => e.into(),
    }
}

fn friendly_found(found: &str) -> String {
    match found {
        "unit value" => "an empty value".into(),
        "map" => "a mapping".into(),
        "sequence" => "a list".into(),
        f => f.replace('`', ""),
    }
}

// ---------------------------------------------------------------------------
// Checks beyond what serde sees.

/// One step of a key path: `vms`, `[1]`, `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A key path like `vms[1].policy.max_failures`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct KeyPath(Vec<Seg>);

impl KeyPath {
    fn key(&self, key: &str) -> KeyPath {
        let mut segs = self.0.clone();
        segs.push(Seg::Key(key.to_string()));
        KeyPath(segs)
    }

    fn index(&self, index: usize) -> KeyPath {
        let mut segs = self.0.clone();
        segs.push(Seg::Index(index));
        KeyPath(segs)
    }
}

fn root(key: &str) -> KeyPath {
    KeyPath::default().key(key)
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Parses a path as serde_yaml writes it (`vms[0].limits`).
fn parse_key_path(text: &str) -> Option<Vec<Seg>> {
    let mut segs = Vec::new();
    for part in text.split('.') {
        let (name, indexes) = part.split_once('[').map_or((part, ""), |(n, i)| (n, i));
        if !name.is_empty() {
            segs.push(Seg::Key(name.to_string()));
        }
        if !indexes.is_empty() {
            for index in indexes.trim_end_matches(']').split("][") {
                segs.push(Seg::Index(index.parse().ok()?));
            }
        }
    }
    (!segs.is_empty()).then_some(segs)
}

struct Checker<'a> {
    file: PathBuf,
    source: &'a str,
    base: PathBuf,
    host: Host,
}

impl Checker<'_> {
    fn fail(&self, kind: ConfigErrorKind, key: &KeyPath, message: String) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            location: locate(self.source, &key.0),
            key: key.to_string(),
            kind,
            message,
            source: None,
        }
    }

    /// `path` relative to the fleet file's directory, without `.` components
    /// (so paths read cleanly in logs and events; `..` is kept, since
    /// collapsing it lexically is wrong across symlinks).
    fn resolve(&self, path: &str) -> PathBuf {
        self.base.join(path).components().collect()
    }

    fn check(&self, raw: RawFleet, absolute: PathBuf) -> Result<FleetConfig, ConfigError> {
        use ConfigErrorKind::*;
        let state_dir = match raw.state_dir.as_deref() {
            Some("") => {
                let m = "state_dir is empty: give a directory, like ./relive-state".into();
                return Err(self.fail(BadValue, &root("state_dir"), m));
            }
            Some(dir) => self.resolve(dir),
            None => self.base.join("relive-state"),
        };
        if state_dir.exists() && !state_dir.is_dir() {
            let m = format!(
                "{} exists and is not a directory: choose another state_dir",
                state_dir.display()
            );
            return Err(self.fail(BadValue, &root("state_dir"), m));
        }
        let api = self.check_api(raw.api, &state_dir, raw.state_dir.is_some())?;
        let metrics = match raw.metrics {
            None => None,
            Some(m) => {
                let key = root("metrics").key("listen");
                let listen = self.loopback(&key, &m.listen)?;
                if api.tcp == Some(listen) && listen.port() != 0 {
                    let m = format!(
                        "{listen} is also api.tcp: the metrics listener needs a port of its own \
                         (or leave metrics out: /metrics is served on the API listeners too)"
                    );
                    return Err(self.fail(BadListener, &key, m));
                }
                Some(MetricsConfig { listen })
            }
        };
        let defaults_raw = raw.defaults.unwrap_or_default();
        let defaults = defaults_raw.over(&Policy::default());
        if let Err(problem) = defaults.check() {
            let key = problem
                .keys
                .iter()
                .find(|k| defaults_raw.sets(k))
                .map_or_else(|| root("defaults"), |k| root("defaults").key(k));
            return Err(self.fail(BadPolicy, &key, problem.message));
        }
        let raw_vms = raw.vms.unwrap_or_default();
        if raw_vms.is_empty() {
            let m = "no VMs: list at least one VM under `vms:`".into();
            return Err(self.fail(NoVms, &root("vms"), m));
        }
        let mut first_index: HashMap<&str, usize> = HashMap::new();
        let mut vms = Vec::with_capacity(raw_vms.len());
        for (i, vm) in raw_vms.iter().enumerate() {
            let at = root("vms").index(i);
            check_name(&vm.name).map_err(|m| self.fail(BadName, &at.key("name"), m))?;
            if let Some(&first) = first_index.get(vm.name.as_str()) {
                let first_key = root("vms").index(first).key("name");
                let first_at = locate(self.source, &first_key.0)
                    .map_or_else(|| format!("{first_key}"), |l| format!("line {}", l.line));
                let m = format!(
                    "duplicate VM name \"{}\" (first at {first_at}): give every VM its own name",
                    vm.name
                );
                return Err(self.fail(DuplicateName, &at.key("name"), m));
            }
            first_index.insert(&vm.name, i);
            vms.push(self.check_vm(&at, vm, &defaults_raw, &defaults, &state_dir)?);
        }
        Ok(FleetConfig {
            path: absolute,
            state_dir,
            api,
            metrics,
            vms,
        })
    }

    fn check_api(
        &self,
        raw: Option<RawApi>,
        state_dir: &Path,
        state_dir_set: bool,
    ) -> Result<ApiConfig, ConfigError> {
        use ConfigErrorKind::*;
        let api = root("api");
        let raw = raw.unwrap_or(RawApi {
            socket: None,
            tcp: None,
            token: None,
            token_file: None,
        });
        let (socket, socket_key) = match raw.socket.as_deref() {
            Some("") => {
                let m = "the socket path is empty: give a path, or leave the key out for \
                         <state_dir>/api.sock"
                    .into();
                return Err(self.fail(BadValue, &api.key("socket"), m));
            }
            Some(s) => (self.resolve(s), api.key("socket")),
            None if state_dir_set => (state_dir.join("api.sock"), root("state_dir")),
            None => (state_dir.join("api.sock"), api.clone()),
        };
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            let m = format!(
                "the API socket {} is {len} bytes long, but Unix socket paths must be at most \
                 {MAX_SOCKET_PATH}: choose a shorter state_dir or set api.socket",
                socket.display()
            );
            return Err(self.fail(BadListener, &socket_key, m));
        }
        let tcp = match raw.tcp.as_deref() {
            None => None,
            Some(t) => Some(self.loopback(&api.key("tcp"), t)?),
        };
        let token = match (raw.token, raw.token_file) {
            (Some(_), Some(_)) => {
                let m = "token and token_file are both set: keep one".into();
                return Err(self.fail(BadListener, &api.key("token_file"), m));
            }
            (Some(t), None) => Some((t, api.key("token"))),
            (None, Some(f)) => {
                let key = api.key("token_file");
                let path = self.resolve(&f);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    let mut err = self.fail(MissingFile, &key, missing_file_message(&path, &e));
                    if e.kind() != io::ErrorKind::NotFound {
                        err.source = Some(e);
                    }
                    err
                })?;
                Some((text.trim_end_matches(['\n', '\r']).to_string(), key))
            }
            (None, None) => None,
        };
        if let Some((token, key)) = &token {
            check_token(token).map_err(|m| self.fail(BadListener, key, m))?;
        }
        if tcp.is_some() && token.is_none() {
            let m = "a TCP listener needs a bearer token: add `token:` (at least 16 characters, \
                     e.g. from `openssl rand -hex 32`) or `token_file:`"
                .into();
            return Err(self.fail(BadListener, &api.key("tcp"), m));
        }
        Ok(ApiConfig {
            socket,
            tcp,
            token: token.map(|(t, _)| Token(t)),
        })
    }

    /// Parses a loopback `ADDRESS:PORT` (`localhost:PORT` means 127.0.0.1).
    fn loopback(&self, key: &KeyPath, text: &str) -> Result<SocketAddr, ConfigError> {
        use ConfigErrorKind::BadListener;
        let addr = match text.strip_prefix("localhost:") {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p)),
            None => text.parse::<SocketAddr>().ok(),
        };
        let Some(addr) = addr else {
            let m = format!(
                "\"{text}\" is not an address and port: write it like 127.0.0.1:7070 or \
                 [::1]:7070"
            );
            return Err(self.fail(BadListener, key, m));
        };
        if !addr.ip().is_loopback() {
            let m = format!(
                "{addr} is not a loopback address: relive listens on loopback only (127.0.0.1 \
                 or ::1); reach it from other hosts through an SSH tunnel or a reverse proxy"
            );
            return Err(self.fail(BadListener, key, m));
        }
        Ok(addr)
    }

    fn check_vm(
        &self,
        at: &KeyPath,
        vm: &RawVm,
        defaults_raw: &RawPolicy,
        defaults: &Policy,
        state_dir: &Path,
    ) -> Result<VmSpec, ConfigError> {
        use ConfigErrorKind::*;
        let kernel = match vm.kernel.as_str() {
            "bundled" => KernelSpec::Bundled,
            path => KernelSpec::Path(self.existing_file(&at.key("kernel"), path, "kernel")?),
        };
        let initrd = match vm.initrd.as_deref() {
            None => None,
            Some(path) => Some(self.existing_file(&at.key("initrd"), path, "initrd")?),
        };
        if let Some(cmdline) = &vm.cmdline {
            let key = at.key("cmdline");
            if cmdline.len() > MAX_CMDLINE_LEN {
                let m = format!(
                    "the command line is {} bytes long, at most {MAX_CMDLINE_LEN} fit: shorten it",
                    cmdline.len()
                );
                return Err(self.fail(BadValue, &key, m));
            }
            if cmdline.chars().any(char::is_control) {
                let m = "the command line contains control characters (a newline?): write it on \
                         one line, in quotes"
                    .into();
                return Err(self.fail(BadValue, &key, m));
            }
        }
        let vcpus = vm.vcpus.unwrap_or(1);
        if vcpus == 0 || usize::from(vcpus) > self.host.cores {
            let m = format!(
                "{vcpus} vCPUs: use 1 to {} (the cores of this host)",
                self.host.cores
            );
            return Err(self.fail(BadValue, &at.key("vcpus"), m));
        }
        let memory_mib = vm.memory_mib.unwrap_or(128);
        if memory_mib < MIN_MEMORY_MIB {
            let m = format!("{memory_mib} MiB is too little: give a VM at least {MIN_MEMORY_MIB}");
            return Err(self.fail(BadValue, &at.key("memory_mib"), m));
        }
        if memory_mib > self.host.memory_mib {
            let m = format!(
                "{memory_mib} MiB is more than this host's {} MiB of RAM: give the VM less",
                self.host.memory_mib
            );
            return Err(self.fail(BadValue, &at.key("memory_mib"), m));
        }
        let limits = match &vm.limits {
            None => Limits::default(),
            Some(l) => self.check_limits(&at.key("limits"), l, vcpus, memory_mib)?,
        };
        let own = vm.policy.as_ref();
        let policy = own.map_or_else(|| defaults.clone(), |p| p.over(defaults));
        // Blame the VM's own key if it sets one, else the defaults'.
        let blame = |keys: &[&str]| -> KeyPath {
            if let Some(k) = keys.iter().find(|k| own.is_some_and(|p| p.sets(k))) {
                at.key("policy").key(k)
            } else if let Some(k) = keys.iter().find(|k| defaults_raw.sets(k)) {
                root("defaults").key(k)
            } else {
                at.key("policy")
            }
        };
        if let Err(problem) = policy.check() {
            return Err(self.fail(BadPolicy, &blame(problem.keys), problem.message));
        }
        if kernel == KernelSpec::Bundled {
            let hb_ms = bundled_heartbeat_ms(vm.cmdline.as_deref().unwrap_or(""))
                .map_err(|m| self.fail(BadValue, &at.key("cmdline"), m))?;
            let interval =
                Duration::from_millis(hb_ms.unwrap_or(relive_images::guest::DEFAULT_HB_MS));
            if policy.heartbeat_timeout < interval.saturating_mul(2) {
                let key = if own.is_some_and(|p| p.sets("heartbeat_timeout")) || hb_ms.is_none() {
                    blame(&["heartbeat_timeout"])
                } else {
                    at.key("cmdline")
                };
                let m = format!(
                    "heartbeat_timeout ({}) is less than twice the guest's heartbeat interval \
                     (relive.hb_ms={}), so one late heartbeat would read as a hang: raise \
                     heartbeat_timeout to at least {} or lower relive.hb_ms",
                    format_duration(policy.heartbeat_timeout),
                    interval.as_millis(),
                    format_duration(interval.saturating_mul(2))
                );
                return Err(self.fail(BadPolicy, &key, m));
            }
        }
        Ok(VmSpec {
            name: vm.name.clone(),
            kernel,
            initrd,
            cmdline: vm.cmdline.clone(),
            vcpus,
            memory_mib,
            limits,
            policy,
            images_dir: state_dir.join(&vm.name).join("images"),
        })
    }

    fn check_limits(
        &self,
        at: &KeyPath,
        raw: &RawLimits,
        vcpus: u8,
        memory_mib: u64,
    ) -> Result<Limits, ConfigError> {
        use ConfigErrorKind::BadValue;
        let most_cpu = 100 * u32::try_from(self.host.cores).unwrap_or(u32::MAX / 100);
        if let Some(cpu) = raw.cpu_percent {
            if cpu == 0 || cpu > most_cpu {
                let m = format!(
                    "{cpu}% is not a CPU quota here: it is a percentage of one core, 1 to \
                     {most_cpu} on this host of {} cores",
                    self.host.cores
                );
                return Err(self.fail(BadValue, &at.key("cpu_percent"), m));
            }
        }
        if let Some(limit) = raw.memory_mib {
            if limit <= memory_mib {
                let m = format!(
                    "a limit of {limit} MiB does not hold the guest's {memory_mib} MiB and the \
                     VMM itself: use at least {}",
                    memory_mib + 64
                );
                return Err(self.fail(BadValue, &at.key("memory_mib"), m));
            }
        }
        if let Some(pids) = raw.pids {
            let least = u64::from(vcpus) + VMM_OWN_TASKS;
            if pids < least {
                let m = format!(
                    "{pids} tasks are too few: the VMM runs one thread per vCPU plus up to \
                     {VMM_OWN_TASKS} of its own; use at least {least}"
                );
                return Err(self.fail(BadValue, &at.key("pids"), m));
            }
        }
        Ok(Limits {
            cpu_percent: raw.cpu_percent,
            memory_mib: raw.memory_mib,
            pids: raw.pids,
        })
    }

    /// Resolves `path` and checks that it is an existing regular file.
    fn existing_file(&self, key: &KeyPath, path: &str, what: &str) -> Result<PathBuf, ConfigError> {
        use ConfigErrorKind::MissingFile;
        if path.is_empty() {
            let m = match what {
                "kernel" => "no kernel given: write `bundled` for relive's own guest, or the \
                             path of an ELF vmlinux or bzImage"
                    .to_string(),
                _ => format!("no {what} path given: give one, or leave the key out"),
            };
            return Err(self.fail(MissingFile, key, m));
        }
        let resolved = self.resolve(path);
        match std::fs::metadata(&resolved) {
            Ok(meta) if meta.is_file() => Ok(resolved),
            Ok(_) => {
                let m = format!("{} is not a file: give the {what} file", resolved.display());
                Err(self.fail(MissingFile, key, m))
            }
            Err(e) => {
                let mut err = self.fail(MissingFile, key, missing_file_message(&resolved, &e));
                if e.kind() != io::ErrorKind::NotFound {
                    err.source = Some(e);
                }
                Err(err)
            }
        }
    }
}

fn missing_file_message(path: &Path, error: &io::Error) -> String {
    let shown = path.display();
    if error.kind() != io::ErrorKind::NotFound {
        return format!("cannot read {shown}: check its permissions");
    }
    let tilde = path.components().any(|c| c.as_os_str() == "~");
    if tilde {
        format!("{shown} does not exist: relive does not expand ~, write the full path")
    } else {
        format!(
            "{shown} does not exist: fix the path (relative paths start at the fleet file's \
             directory)"
        )
    }
}

/// Checks a VM name: `[a-z0-9-]`, 1 to 48 characters, starting and ending
/// with a letter or digit (it names directories, cgroups and CLI arguments).
fn check_name(name: &str) -> Result<(), String> {
    let rule = "use 1 to 48 characters from a-z, 0-9 and -, starting and ending with a letter \
                or digit";
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().all(allowed)
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid VM name \"{name}\": {rule}"))
    }
}

/// Checks a bearer token: long enough, and sendable in an HTTP header.
fn check_token(token: &str) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is too short to be secret: use at least {MIN_TOKEN_LEN} characters, e.g. \
             from `openssl rand -hex 32`"
        ));
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err("the token may only hold printable ASCII characters without spaces".into());
    }
    Ok(())
}

/// The bundled guest's heartbeat interval set on `cmdline` (`relive.hb_ms=N`),
/// if any.
fn bundled_heartbeat_ms(cmdline: &str) -> Result<Option<u64>, String> {
    let Some(value) = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("relive.hb_ms="))
        .next_back()
    else {
        return Ok(None);
    };
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Some(ms)),
        _ => Err(format!(
            "relive.hb_ms={value} is not a heartbeat interval: write a whole number of \
             milliseconds, like relive.hb_ms=100"
        )),
    }
}

// ---------------------------------------------------------------------------
// Finding a key in the source text.
//
// serde_yaml tells where it failed, but checks made after parsing (duplicate
// names, missing kernels, impossible policies) need the line of a key path
// like `vms[1].name`. The locator reads the block structure from indentation:
// a mapping's keys share the column of its first key; a sequence's items are
// `- ` lines at one column, each item's content starting after its `- `.
// Inline `{ key: value }` mappings are searched for the key; inline lists
// are not entered. When a step cannot be found, the deepest step found is
// returned.

/// One line with content: where its content starts and what it is, comments
/// and trailing spaces cut off.
#[derive(Debug, Clone, Copy)]
struct SrcLine<'a> {
    /// 1-based.
    line: usize,
    /// 0-based, in characters.
    col: usize,
    text: &'a str,
}

impl SrcLine<'_> {
    fn location(&self) -> Location {
        Location {
            line: self.line,
            column: self.col + 1,
        }
    }
}

/// `line` without its comment.
fn strip_comment(line: &str) -> &str {
    let mut quote = None::<char>;
    let mut prev = ' ';
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '#' && prev.is_whitespace() => return &line[..i],
            None if (c == '"' || c == '\'')
                && (prev.is_whitespace() || matches!(prev, ':' | '[' | '{' | ',' | '-')) =>
            {
                quote = Some(c)
            }
            None => {}
        }
        prev = c;
    }
    line
}

fn content_lines(source: &str) -> Vec<SrcLine<'_>> {
    source
        .lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let cut = strip_comment(raw).trim_end();
            let text = cut.trim_start_matches(' ');
            let skip = text.is_empty()
                || text == "---"
                || text == "..."
                || (text.starts_with('%') && cut.len() == text.len());
            (!skip).then(|| SrcLine {
                line: i + 1,
                col: cut.len() - text.len(),
                text,
            })
        })
        .collect()
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// What follows `key:` at the start of `text`, if `text` starts with that key.
fn after_key<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let unquoted = text.strip_prefix(key);
    let quoted = || {
        let q = text.chars().next().filter(|c| *c == '"' || *c == '\'')?;
        text[1..].strip_prefix(key)?.strip_prefix(q)
    };
    let rest = unquoted.or_else(quoted)?.trim_start_matches(' ');
    let rest = rest.strip_prefix(':')?;
    (rest.is_empty() || rest.starts_with(' ')).then_some(rest)
}

/// The region holding `rest`, which starts in `line` after `offset` bytes.
fn inline<'a>(line: &SrcLine<'a>, offset: usize) -> SrcLine<'a> {
    SrcLine {
        line: line.line,
        col: line.col + line.text[..offset].chars().count(),
        text: &line.text[offset..],
    }
}

fn find_key<'a>(region: &[SrcLine<'a>], key: &str) -> Option<(Location, Vec<SrcLine<'a>>)> {
    let first = region.first()?;
    if first.text.starts_with('{') {
        return find_flow_key(first, key);
    }
    let indent = first.col;
    for (i, l) in region.iter().enumerate() {
        if l.col != indent || is_item(l.text) {
            continue;
        }
        let Some(rest) = after_key(l.text, key) else {
            continue;
        };
        let value = rest.trim_start();
        let child = if value.is_empty() {
            region[i + 1..]
                .iter()
                .take_while(|n| n.col > indent || (n.col == indent && is_item(n.text)))
                .copied()
                .collect()
        } else {
            vec![inline(l, l.text.len() - value.len())]
        };
        return Some((l.location(), child));
    }
    None
}

/// Finds `key` inside an inline `{ ... }` mapping.
fn find_flow_key<'a>(line: &SrcLine<'a>, key: &str) -> Option<(Location, Vec<SrcLine<'a>>)> {
    let text = line.text;
    let mut from = 0;
    while let Some(found) = text[from..].find(key) {
        let start = from + found;
        let before = text[..start].chars().next_back();
        let boundary = matches!(before, Some('{' | ',' | ' '));
        if boundary {
            if let Some(rest) = after_key(&text[start..], key) {
                let value = rest.trim_start();
                let at = inline(line, start);
                let child = inline(line, text.len() - value.len());
                return Some((at.location(), vec![child]));
            }
        }
        from = start + key.len();
    }
    None
}

fn find_index<'a>(region: &[SrcLine<'a>], index: usize) -> Option<(Location, Vec<SrcLine<'a>>)> {
    let first = region.first()?;
    let indent = first.col;
    let (i, item) = region
        .iter()
        .enumerate()
        .filter(|(_, l)| l.col == indent && is_item(l.text))
        .nth(index)?;
    let value = item.text[1..].trim_start();
    let mut child = Vec::new();
    if !value.is_empty() {
        child.push(inline(item, item.text.len() - value.len()));
    }
    child.extend(
        region[i + 1..]
            .iter()
            .take_while(|n| n.col > indent)
            .copied(),
    );
    let at = child.first().map_or(item.location(), SrcLine::location);
    Some((at, child))
}

/// Where the key `path` is written in `source`, or its deepest ancestor found.
fn locate(source: &str, path: &[Seg]) -> Option<Location> {
    walk(source, path).0
}

/// Where the key `path` is written in `source`, only if found itself.
fn locate_exact(source: &str, path: &[Seg]) -> Option<Location> {
    match walk(source, path) {
        (found, true) => found,
        (_, false) => None,
    }
}

/// The deepest step of `path` found, and whether that is all of it.
fn walk(source: &str, path: &[Seg]) -> (Option<Location>, bool) {
    let mut region = content_lines(source);
    let mut found = None;
    for seg in path {
        let step = match seg {
            Seg::Key(k) => find_key(&region, k),
            Seg::Index(i) => find_index(&region, *i),
        };
        let Some((at, child)) = step else {
            return (found, false);
        };
        found = Some(at);
        region = child;
    }
    (found, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const HOST: Host = Host {
        cores: 2,
        memory_mib: 4096,
    };

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("relive-config-test-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn parse_in(dir: &TempDir, yaml: &str) -> Result<FleetConfig, ConfigError> {
        let path = dir.write("fleet.yaml", yaml);
        parse_with(&fs::read_to_string(&path).unwrap(), &path, &HOST)
    }

    fn ok(yaml: &str) -> FleetConfig {
        let dir = TempDir::new();
        match parse_in(&dir, yaml) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        }
    }

    /// Parses `yaml`, expecting an error of `kind` at `line` naming `key`;
    /// returns its text.
    fn bad(yaml: &str, kind: ConfigErrorKind, line: usize, key: &str) -> String {
        let dir = TempDir::new();
        let error = match parse_in(&dir, yaml) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(e) => e,
        };
        let text = error.to_string();
        assert_eq!(error.kind(), kind, "{text}");
        assert_eq!(error.key(), key, "{text}");
        assert_eq!(error.location().map(|l| l.line), Some(line), "{text}");
        assert!(text.contains(&format!("fleet.yaml:{line}:")), "{text}");
        assert!(text.contains(&format!(" {key}: ")), "{text}");
        text
    }

    const ONE: &str = "vms:\n  - name: a\n    kernel: bundled\n";

    #[test]
    fn durations_parse() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("0s", Duration::ZERO),
            ("500ms", ms(500)),
            ("30s", ms(30_000)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("1m30s", ms(90_000)),
            ("1h2m3s4ms", ms(3_723_004)),
            ("8760h", MAX_DURATION),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
            assert_eq!(parse_duration(&format_duration(want)), Ok(want));
        }
        for (text, why) in [
            ("", "empty"),
            ("5", "no unit"),
            ("5x", "not a duration"),
            ("1.5s", "whole numbers"),
            ("30s1m", "largest to smallest"),
            ("1s1s", "largest to smallest"),
            ("s", "not a duration"),
            ("-1s", "not a duration"),
            (" 1s", "not a duration"),
            ("8761h", "too long"),
            ("99999999999999999999h", "too long"),
        ] {
            let e = parse_duration(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_nanos(1_001)), "1us1ns");
    }

    #[test]
    fn happy_path_applies_defaults_merges_overrides_and_resolves_paths() {
        let dir = TempDir::new();
        dir.write("kernels/vmlinux", "ELF");
        dir.write("kernels/initrd.img", "cpio");
        dir.write("token", "0123456789abcdef0123\n");
        let yaml = "\
# a fleet
state_dir: state
api:
  tcp: 127.0.0.1:7070
  token_file: token
metrics:
  listen: localhost:9464
defaults:
  checkpoint_interval: 2s
  max_failures: 5
vms:
  - name: web-1
    kernel: kernels/vmlinux
    initrd: ./kernels/initrd.img
    cmdline: \"console=ttyS0\"
    vcpus: 2
    memory_mib: 256
    limits: { cpu_percent: 50, memory_mib: 512, pids: 64 }
    policy:
      checkpoint_interval: 0s
      standby: true
  - name: db-1
    kernel: bundled
";
        let config = parse_in(&dir, yaml).unwrap();
        let base = std::path::absolute(&dir.0).unwrap();
        assert_eq!(config.path, base.join("fleet.yaml"));
        assert_eq!(config.state_dir, base.join("state"));
        assert_eq!(config.api.socket, base.join("state/api.sock"));
        assert_eq!(config.api.tcp, Some("127.0.0.1:7070".parse().unwrap()));
        let token = config.api.token.as_ref().unwrap();
        assert_eq!(token.secret(), "0123456789abcdef0123");
        assert!(token.matches("0123456789abcdef0123"));
        assert!(!token.matches("0123456789abcdef0124"));
        assert!(!format!("{config:?}").contains("0123456789abcdef0123"));
        assert_eq!(
            config.metrics,
            Some(MetricsConfig {
                listen: "127.0.0.1:9464".parse().unwrap()
            })
        );

        let web = &config.vms[0];
        assert_eq!(web.name, "web-1");
        assert_eq!(web.kernel, KernelSpec::Path(base.join("kernels/vmlinux")));
        assert_eq!(web.initrd, Some(base.join("./kernels/initrd.img")));
        assert_eq!(web.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!((web.vcpus, web.memory_mib), (2, 256));
        assert_eq!(
            web.limits,
            Limits {
                cpu_percent: Some(50),
                memory_mib: Some(512),
                pids: Some(64)
            }
        );
        assert_eq!(
            web.policy,
            Policy {
                checkpoint_interval: Duration::ZERO,
                max_failures: 5,
                standby: true,
                ..Policy::default()
            }
        );
        assert_eq!(web.images_dir, base.join("state/web-1/images"));

        let db = &config.vms[1];
        assert_eq!(db.kernel, KernelSpec::Bundled);
        assert_eq!((db.vcpus, db.memory_mib), (1, 128));
        assert_eq!(db.initrd, None);
        assert_eq!(db.limits, Limits::default());
        assert_eq!(
            db.policy,
            Policy {
                checkpoint_interval: Duration::from_secs(2),
                max_failures: 5,
                ..Policy::default()
            }
        );
        assert_eq!(config.vm("db-1"), Some(db));
        assert_eq!(config.vm_dir("db-1"), base.join("state/db-1"));
    }

    #[test]
    fn minimal_file_gets_every_default() {
        let config = ok(ONE);
        let base = config.path.parent().unwrap().to_path_buf();
        assert_eq!(config.state_dir, base.join("relive-state"));
        assert_eq!(config.api.socket, base.join("relive-state/api.sock"));
        assert_eq!((config.api.tcp, config.api.token.is_none()), (None, true));
        assert_eq!(config.metrics, None);
        assert_eq!(config.vms[0].policy, Policy::default());
    }

    #[test]
    fn unknown_keys_are_refused_everywhere() {
        let text = bad(
            "vms:\n  - name: a\n    kernel: bundled\n    vcpu: 1\n",
            ConfigErrorKind::UnknownKey,
            4,
            "vms[0].vcpu",
        );
        assert!(text.contains("fleet.yaml:4:5: vms[0].vcpu:"), "{text}");
        assert!(text.contains("did you mean \"vcpus\"?"), "{text}");
        bad(
            "state_dir: x\nstatedir: y\nvms: []\n",
            ConfigErrorKind::UnknownKey,
            2,
            "statedir",
        );
        bad(
            "defaults:\n  max_failure: 3\nvms: []\n",
            ConfigErrorKind::UnknownKey,
            2,
            "defaults.max_failure",
        );
        bad(
            &format!("{ONE}    limits: {{ pid: 3 }}\n"),
            ConfigErrorKind::UnknownKey,
            4,
            "vms[0].limits.pid",
        );
        let text = bad(
            &format!("{ONE}    policy:\n      colour: blue\n"),
            ConfigErrorKind::UnknownKey,
            5,
            "vms[0].policy.colour",
        );
        assert!(text.contains("remove it or fix its spelling"), "{text}");
        bad(
            "api:\n  port: 1\nvms: []\n",
            ConfigErrorKind::UnknownKey,
            2,
            "api.port",
        );
    }

    #[test]
    fn bad_durations_name_the_key_and_the_form() {
        let text = bad(
            &format!("defaults:\n  heartbeat_timeout: 2x\n{ONE}"),
            ConfigErrorKind::BadDuration,
            2,
            "defaults.heartbeat_timeout",
        );
        assert!(text.contains("fleet.yaml:2:3:"), "{text}");
        assert!(text.contains("\"2x\" is not a duration"), "{text}");
        let text = bad(
            &format!("{ONE}    policy:\n      ready_grace: 10\n"),
            ConfigErrorKind::BadDuration,
            5,
            "vms[0].policy.ready_grace",
        );
        assert!(text.contains("write 10s for seconds"), "{text}");
        bad(
            &format!("{ONE}    policy: {{ failure_window: 1.5m }}\n"),
            ConfigErrorKind::BadDuration,
            4,
            "vms[0].policy.failure_window",
        );
    }

    #[test]
    fn bad_types_say_what_was_expected() {
        let text = bad(
            "vms:\n  - name: a\n    kernel: bundled\n    vcpus: two\n",
            ConfigErrorKind::BadType,
            4,
            "vms[0].vcpus",
        );
        assert!(
            text.contains("expected a whole number from 0 to 255"),
            "{text}"
        );
        assert!(text.contains("fleet.yaml:4:5:"), "{text}");
        let text = bad(
            &format!("defaults:\n  standby: yes\n{ONE}"),
            ConfigErrorKind::BadType,
            2,
            "defaults.standby",
        );
        assert!(text.contains("expected true or false"), "{text}");
        let text = bad("vms:\n  name: a\n", ConfigErrorKind::BadType, 1, "vms");
        assert!(text.contains("expected a list"), "{text}");
        let text = bad(
            "vms:\n  - name: a\n    kernel: bundled\n    vcpus: 300\n",
            ConfigErrorKind::BadValue,
            4,
            "vms[0].vcpus",
        );
        assert!(text.contains("300 is out of range"), "{text}");
        bad(
            &format!("{ONE}    memory_mib: -5\n"),
            ConfigErrorKind::BadType,
            4,
            "vms[0].memory_mib",
        );
        // More than the host has: refused at load, not failed four times at start.
        let text = bad(
            &format!("{ONE}    memory_mib: 8192\n"),
            ConfigErrorKind::BadValue,
            4,
            "vms[0].memory_mib",
        );
        assert!(text.contains("more than this host's 4096 MiB"), "{text}");
        // serde_yaml reads an empty value as an empty string.
        bad(
            "vms:\n  - name:\n    kernel: bundled\n",
            ConfigErrorKind::BadName,
            2,
            "vms[0].name",
        );
    }

    #[test]
    fn missing_required_keys_are_named() {
        let text = bad(
            "vms:\n  - name: a\n    kernel: bundled\n  - name: b\n    vcpus: 1\n",
            ConfigErrorKind::MissingKey,
            4,
            "vms[1].kernel",
        );
        assert!(text.contains("add `kernel: bundled`"), "{text}");
        let dir = TempDir::new();
        let e = parse_in(&dir, "state_dir: x\n").unwrap_err();
        assert_eq!((e.kind(), e.key()), (ConfigErrorKind::NoVms, "vms"));
        assert!(e
            .to_string()
            .ends_with(": vms: no VMs: list at least one VM under `vms:`"));
        bad(
            &format!("metrics: {{}}\n{ONE}"),
            ConfigErrorKind::MissingKey,
            1,
            "metrics.listen",
        );
    }

    #[test]
    fn no_vms_is_an_error() {
        let text = bad("vms: []\n", ConfigErrorKind::NoVms, 1, "vms");
        assert!(text.contains("list at least one VM"), "{text}");
        bad("state_dir: s\nvms:\n", ConfigErrorKind::NoVms, 2, "vms");
        let dir = TempDir::new();
        let e = parse_in(&dir, "# nothing yet\n\n").unwrap_err();
        assert_eq!(e.kind(), ConfigErrorKind::NoVms);
        assert!(e
            .to_string()
            .contains("fleet.yaml: the fleet file is empty"));
    }

    #[test]
    fn duplicate_names_point_at_the_second() {
        let yaml = "\
state_dir: s
vms:
  - name: demo-1
    kernel: bundled
  - name: demo-2
    kernel: bundled
  - name: demo-1
    kernel: bundled
";
        let text = bad(yaml, ConfigErrorKind::DuplicateName, 7, "vms[2].name");
        assert!(
            text.ends_with(
                "fleet.yaml:7:5: vms[2].name: duplicate VM name \"demo-1\" (first at line 3): \
                 give every VM its own name"
            ),
            "{text}"
        );
    }

    #[test]
    fn duplicate_keys_are_refused() {
        bad(
            "vms:\n  - name: a\n    name: b\n    kernel: bundled\n",
            ConfigErrorKind::DuplicateKey,
            2,
            "vms[0].name",
        );
    }

    #[test]
    fn invalid_names_are_refused() {
        for name in [
            "Web",
            "web_1",
            "-web",
            "web-",
            "\"\"",
            &"a".repeat(49),
            "wéb",
        ] {
            let yaml = format!("vms:\n  - kernel: bundled\n    name: {name}\n");
            let text = bad(&yaml, ConfigErrorKind::BadName, 3, "vms[0].name");
            assert!(text.contains("fleet.yaml:3:5:"), "{text}");
            assert!(text.contains("use 1 to 48 characters"), "{text}");
        }
        ok(&format!(
            "vms:\n  - kernel: bundled\n    name: {}\n",
            "a".repeat(48)
        ));
        ok("vms:\n  - kernel: bundled\n    name: 0\n");
    }

    #[test]
    fn missing_kernel_and_initrd_files_are_named() {
        let dir = TempDir::new();
        let yaml = "vms:\n  - name: a\n    kernel: bundled\n  - name: b\n    kernel: /x/vmlinux\n";
        let e = parse_in(&dir, yaml).unwrap_err();
        assert_eq!(e.kind(), ConfigErrorKind::MissingFile);
        assert_eq!(
            e.to_string(),
            format!(
                "{}:5:5: vms[1].kernel: /x/vmlinux does not exist: fix the path (relative paths \
                 start at the fleet file's directory)",
                dir.0.join("fleet.yaml").display()
            )
        );
        let text = bad(
            "vms:\n  - name: a\n    kernel: k/vmlinux\n",
            ConfigErrorKind::MissingFile,
            3,
            "vms[0].kernel",
        );
        assert!(text.contains("/k/vmlinux does not exist"), "{text}");
        let text = bad(
            &format!("{ONE}    initrd: ~/initrd.img\n"),
            ConfigErrorKind::MissingFile,
            4,
            "vms[0].initrd",
        );
        assert!(text.contains("does not expand ~"), "{text}");
        bad(
            "vms:\n  - name: a\n    kernel: \"\"\n",
            ConfigErrorKind::MissingFile,
            3,
            "vms[0].kernel",
        );
        let text = bad(
            "vms:\n  - name: a\n    kernel: .\n",
            ConfigErrorKind::MissingFile,
            3,
            "vms[0].kernel",
        );
        assert!(text.contains("is not a file"), "{text}");
    }

    #[test]
    fn impossible_policies_name_the_key_that_set_them() {
        let text = bad(
            &format!("defaults:\n  max_failures: 0\n{ONE}"),
            ConfigErrorKind::BadPolicy,
            2,
            "defaults.max_failures",
        );
        assert!(text.contains("at least 1"), "{text}");
        bad(
            &format!("defaults:\n  keep_images: 0\n{ONE}"),
            ConfigErrorKind::BadPolicy,
            2,
            "defaults.keep_images",
        );
        bad(
            &format!("{ONE}    policy:\n      heartbeat_timeout: 0s\n"),
            ConfigErrorKind::BadPolicy,
            5,
            "vms[0].policy.heartbeat_timeout",
        );
        // The VM's own key is blamed even when the other half is a default.
        let text = bad(
            &format!(
                "defaults:\n  failure_window: 30s\n{ONE}    policy:\n      ready_grace: 40s\n"
            ),
            ConfigErrorKind::BadPolicy,
            7,
            "vms[0].policy.ready_grace",
        );
        assert!(text.contains("failure_window (30s) is shorter than ready_grace (40s)"));
        bad(
            &format!("{ONE}    policy: {{ restart_backoff: 30s }}\n"),
            ConfigErrorKind::BadPolicy,
            4,
            "vms[0].policy.restart_backoff",
        );
        bad(
            &format!("defaults:\n  checkpoint_interval: 50ms\n{ONE}"),
            ConfigErrorKind::BadPolicy,
            2,
            "defaults.checkpoint_interval",
        );
    }

    #[test]
    fn heartbeat_timeout_must_outlast_the_bundled_guests_heartbeat() {
        let text = bad(
            &format!("{ONE}    policy:\n      heartbeat_timeout: 150ms\n"),
            ConfigErrorKind::BadPolicy,
            5,
            "vms[0].policy.heartbeat_timeout",
        );
        assert!(text.contains("at least 200ms"), "{text}");
        bad(
            &format!("{ONE}    cmdline: relive.hb_ms=1500\n"),
            ConfigErrorKind::BadPolicy,
            4,
            "vms[0].cmdline",
        );
        bad(
            &format!("{ONE}    cmdline: relive.hb_ms=fast\n"),
            ConfigErrorKind::BadValue,
            4,
            "vms[0].cmdline",
        );
        ok(&format!(
            "{ONE}    cmdline: relive.hb_ms=50\n    policy: {{ heartbeat_timeout: 100ms }}\n"
        ));
    }

    #[test]
    fn vm_sizes_and_limits_are_checked() {
        bad(
            &format!("{ONE}    vcpus: 0\n"),
            ConfigErrorKind::BadValue,
            4,
            "vms[0].vcpus",
        );
        let text = bad(
            &format!("{ONE}    vcpus: 3\n"),
            ConfigErrorKind::BadValue,
            4,
            "vms[0].vcpus",
        );
        assert!(text.contains("use 1 to 2"), "{text}");
        bad(
            &format!("{ONE}    memory_mib: 8\n"),
            ConfigErrorKind::BadValue,
            4,
            "vms[0].memory_mib",
        );
        bad(
            &format!("{ONE}    limits:\n      cpu_percent: 201\n"),
            ConfigErrorKind::BadValue,
            5,
            "vms[0].limits.cpu_percent",
        );
        bad(
            &format!("{ONE}    limits: {{ memory_mib: 128 }}\n"),
            ConfigErrorKind::BadValue,
            4,
            "vms[0].limits.memory_mib",
        );
        bad(
            &format!("{ONE}    limits:\n      pids: 4\n"),
            ConfigErrorKind::BadValue,
            5,
            "vms[0].limits.pids",
        );
        bad(
            &format!("{ONE}    cmdline: \"a\\nb\"\n"),
            ConfigErrorKind::BadValue,
            4,
            "vms[0].cmdline",
        );
    }

    #[test]
    fn api_listeners_are_loopback_with_a_token() {
        let token = "token: 0123456789abcdef";
        let text = bad(
            &format!("api:\n  tcp: 0.0.0.0:7070\n  {token}\n{ONE}"),
            ConfigErrorKind::BadListener,
            2,
            "api.tcp",
        );
        assert!(text.contains("not a loopback address"), "{text}");
        let text = bad(
            &format!("api:\n  tcp: 127.0.0.1:7070\n{ONE}"),
            ConfigErrorKind::BadListener,
            2,
            "api.tcp",
        );
        assert!(text.contains("needs a bearer token"), "{text}");
        bad(
            &format!("api:\n  tcp: 127.0.0.1\n  {token}\n{ONE}"),
            ConfigErrorKind::BadListener,
            2,
            "api.tcp",
        );
        bad(
            &format!("api:\n  tcp: 127.0.0.1:7070\n  token: short\n{ONE}"),
            ConfigErrorKind::BadListener,
            3,
            "api.token",
        );
        bad(
            &format!("api:\n  {token}\n  token_file: t\n{ONE}"),
            ConfigErrorKind::BadListener,
            3,
            "api.token_file",
        );
        bad(
            &format!("api:\n  tcp: 127.0.0.1:7070\n  token_file: nowhere\n{ONE}"),
            ConfigErrorKind::MissingFile,
            3,
            "api.token_file",
        );
        bad(
            &format!("metrics:\n  listen: 10.0.0.1:9464\n{ONE}"),
            ConfigErrorKind::BadListener,
            2,
            "metrics.listen",
        );
        bad(
            &format!(
                "api:\n  tcp: 127.0.0.1:7070\n  {token}\nmetrics:\n  listen: 127.0.0.1:7070\n{ONE}"
            ),
            ConfigErrorKind::BadListener,
            5,
            "metrics.listen",
        );
        let config = ok(&format!("api:\n  tcp: \"[::1]:0\"\n  {token}\n{ONE}"));
        assert_eq!(config.api.tcp, Some("[::1]:0".parse().unwrap()));
        let long = "d".repeat(100);
        bad(
            &format!("state_dir: {long}\n{ONE}"),
            ConfigErrorKind::BadListener,
            1,
            "state_dir",
        );
    }

    #[test]
    fn syntax_errors_have_a_location() {
        let dir = TempDir::new();
        let e = parse_in(&dir, "vms: [\n").unwrap_err();
        assert_eq!(e.kind(), ConfigErrorKind::Syntax);
        assert!(e.location().is_some(), "{e}");
        assert!(e.to_string().contains("fix the YAML syntax"), "{e}");
        let e = parse_in(&dir, "- a\n- b\n").unwrap_err();
        assert_eq!(e.kind(), ConfigErrorKind::Syntax);
        assert!(e.to_string().contains("must be a mapping"), "{e}");
        let e = parse_in(&dir, &format!("{ONE}---\n{ONE}")).unwrap_err();
        assert!(e.to_string().contains("one fleet per file"), "{e}");
        let e = parse_in(&dir, "vms:\n\t- name: a\n").unwrap_err();
        assert_eq!(e.location().map(|l| l.line), Some(2), "{e}");
        assert!(e.to_string().contains("indent with spaces"), "{e}");
        let e = parse_in(&dir, "<<: {}\nvms: []\n").unwrap_err();
        assert!(
            e.to_string().contains("merge keys are not supported"),
            "{e}"
        );
    }

    #[test]
    fn unreadable_file_chains_the_io_error() {
        let e = load(Path::new("/nonexistent/fleet.yaml")).unwrap_err();
        assert_eq!(e.kind(), ConfigErrorKind::Read);
        assert!(e
            .to_string()
            .starts_with("/nonexistent/fleet.yaml: cannot read the fleet file"));
        let source = std::error::Error::source(&e).unwrap();
        assert!(source.downcast_ref::<io::Error>().is_some());
    }

    fn at(source: &str, path: &str) -> Option<(usize, usize)> {
        locate(source, &parse_key_path(path).unwrap()).map(|l| (l.line, l.column))
    }

    #[test]
    fn locator_finds_keys_in_block_and_flow_style() {
        let source = "\
# name: not this one
state_dir: s   # name: nor this
defaults:
  max_failures: 3
vms:
- name: a
  kernel: bundled
  limits: { cpu_percent: 50, pids: 64 }
-
  name: b # the second
  policy:
    standby: true
  \"kernel\": bundled
- { name: c, kernel: bundled }
";
        assert_eq!(at(source, "state_dir"), Some((2, 1)));
        assert_eq!(at(source, "defaults.max_failures"), Some((4, 3)));
        assert_eq!(at(source, "vms[0]"), Some((6, 3)));
        assert_eq!(at(source, "vms[0].name"), Some((6, 3)));
        assert_eq!(at(source, "vms[0].limits.pids"), Some((8, 30)));
        assert_eq!(at(source, "vms[1].name"), Some((10, 3)));
        assert_eq!(at(source, "vms[1].policy.standby"), Some((12, 5)));
        assert_eq!(at(source, "vms[1].kernel"), Some((13, 3)));
        assert_eq!(at(source, "vms[2].kernel"), Some((14, 14)));
        // Not written: the deepest ancestor.
        assert_eq!(at(source, "vms[1].cmdline"), Some((10, 3)));
        assert_eq!(at(source, "api.tcp"), None);
        assert_eq!(at(source, "vms[9].name"), Some((5, 1)));
    }

    #[test]
    fn locator_keeps_nested_items_apart() {
        let source = "\
vms:
  - name: a   # 'quoted # not a comment' below
    cmdline: \"x # y\"
    policy:
      name: decoy
  - name: b
";
        assert_eq!(at(source, "vms[1].name"), Some((6, 5)));
        assert_eq!(at(source, "vms[0].name"), Some((2, 5)));
        assert_eq!(at(source, "vms[0].policy.name"), Some((5, 7)));
        assert_eq!(
            strip_comment("cmdline: \"x # y\" # z"),
            "cmdline: \"x # y\" "
        );
        assert_eq!(strip_comment("a: it's # c"), "a: it's ");
        assert_eq!(
            parse_key_path("vms[3].limits"),
            Some(vec![
                Seg::Key("vms".into()),
                Seg::Index(3),
                Seg::Key("limits".into()),
            ])
        );
    }

    fn repo_file(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
    }

    #[test]
    fn demo_fleet_loads() {
        let config = load(&repo_file("configs/demo.yaml")).unwrap();
        assert_eq!(config.vms.len(), 3);
        for vm in &config.vms {
            assert_eq!(vm.kernel, KernelSpec::Bundled);
            assert!(vm.policy.standby && vm.policy.warm_boot_image);
            assert_eq!(vm.policy.checkpoint_interval, Duration::from_secs(5));
        }
    }

    #[test]
    fn example_fleet_loads() {
        // The example shows a kernel path of its own; put a file there.
        let dir = TempDir::new();
        let text = fs::read_to_string(repo_file("configs/fleet.example.yaml")).unwrap();
        let path = dir.write("fleet.yaml", &text);
        dir.write("kernels/vmlinux", "ELF");
        dir.write("secrets/api-token", "0123456789abcdef0123456789abcdef\n");
        let config = match parse_with(&text, &path, &HOST) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert!(config.vms.len() >= 2);
        assert!(config.api.tcp.is_some() && config.metrics.is_some());
    }
}
