//! The file as serde sees it.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) state_dir: Option<String>,
    pub(super) api: Option<RawApi>,
    pub(super) metrics: Option<RawMetrics>,
    pub(super) defaults: Option<RawPolicy>,
    pub(super) jail: Option<RawJail>,
    pub(super) container_kernel: Option<String>,
    pub(super) cluster: Option<RawCluster>,
    pub(super) vms: Option<Vec<RawVm>>,
}

/// `cluster: { etcd: [...], host: NAME, ... }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) etcd: Vec<String>,
    pub(super) host: String,
    pub(super) advertise: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) lease_ttl: Option<DurationValue>,
    pub(super) keepalive_interval: Option<DurationValue>,
    pub(super) request_timeout: Option<DurationValue>,
    pub(super) fence_margin: Option<DurationValue>,
    pub(super) failover_grace: Option<DurationValue>,
    pub(super) token: Option<String>,
    pub(super) token_file: Option<String>,
    pub(super) replicas: Option<usize>,
}

/// `jail: false`, `jail: true` or `jail: { uid: N, gid: N }`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawJail {
    Enabled(bool),
    Ids(RawJailIds),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJailIds {
    pub(super) uid: u32,
    pub(super) gid: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    pub(super) socket: Option<String>,
    pub(super) tcp: Option<String>,
    pub(super) token: Option<String>,
    pub(super) token_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVm {
    pub(super) name: String,
    pub(super) kernel: Option<String>,
    pub(super) image: Option<String>,
    pub(super) command: Option<Vec<String>>,
    pub(super) env: Option<std::collections::BTreeMap<String, String>>,
    pub(super) restart: Option<String>,
    pub(super) initrd: Option<String>,
    pub(super) cmdline: Option<String>,
    pub(super) vcpus: Option<u8>,
    pub(super) memory_mib: Option<u64>,
    pub(super) limits: Option<RawLimits>,
    pub(super) policy: Option<RawPolicy>,
    pub(super) jail: Option<RawJail>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) cpu_percent: Option<u32>,
    pub(super) memory_mib: Option<u64>,
    pub(super) pids: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) checkpoint_interval: Option<DurationValue>,
    pub(super) heartbeat_timeout: Option<DurationValue>,
    pub(super) ready_grace: Option<DurationValue>,
    pub(super) failure_window: Option<DurationValue>,
    pub(super) max_failures: Option<u32>,
    pub(super) restart_backoff: Option<DurationValue>,
    pub(super) warm_boot_image: Option<bool>,
    pub(super) standby: Option<bool>,
    pub(super) keep_images: Option<usize>,
    pub(super) control_timeout: Option<DurationValue>,
    pub(super) standby_timeout: Option<DurationValue>,
}

impl RawPolicy {
    /// `base` with every key this section sets replaced.
    pub(super) fn over(&self, base: &Policy) -> Policy {
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
            control_timeout: d(&self.control_timeout, base.control_timeout),
            standby_timeout: d(&self.standby_timeout, base.standby_timeout),
        }
    }

    /// Whether this section sets `key`.
    pub(super) fn sets(&self, key: &str) -> bool {
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
            "control_timeout" => self.control_timeout.is_some(),
            "standby_timeout" => self.standby_timeout.is_some(),
            _ => false,
        }
    }
}

/// A duration written like `1m30s`.
pub(super) struct DurationValue(pub(super) Duration);

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
