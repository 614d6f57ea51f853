//! Section 6 of the failover bench: failover across hosts (see the bench's
//! module docs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value as Sample};
use relive_testkit::etcd::EtcdCluster;
use relive_testkit::hosts::{Host, Network};
use serde_json::{json, Value};

use super::{cell, summary_json, unix_ms, Bins, Result, Supervisor, TempDir};

const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];
const VM: &str = "web";
/// The lease TTL the section runs with (printed beside the figures).
const TTL: &str = "3s";
const PEER_PORT: u16 = 7800;
/// Longest wait for one step (a VM running, a host taking over).
const STEP: Duration = Duration::from_secs(60);

fn fleet_yaml(state: &Path, host: &Host, etcd: &[String], vms: usize, policy: Policy) -> String {
    let Policy {
        checkpoint_interval,
        ready_grace,
        failure_window,
        short_lease,
        prefix,
    } = policy;
    let timings = if short_lease {
        format!(
            "  lease_ttl: {TTL}\n  keepalive_interval: 500ms\n  request_timeout: 500ms\n  \
             fence_margin: 1s\n  failover_grace: 500ms\n"
        )
    } else {
        String::new()
    };
    let names: String = (0..vms)
        .map(|i| {
            let name = if vms == 1 {
                VM.to_string()
            } else {
                format!("vm-{i:02}")
            };
            format!(
                "  - name: {name}\n    kernel: bundled\n    memory_mib: 64\n    cmdline: relive.hb_ms=100\n"
            )
        })
        .collect();
    format!(
        r#"state_dir: {state}
cluster:
  etcd: [{etcd}]
  host: {host}
  advertise: {ip}:{PEER_PORT}
  token: bench-cluster-token-0123456789
  replicas: 1
  prefix: {prefix}
{timings}defaults:
  checkpoint_interval: {checkpoint_interval}
  heartbeat_timeout: 2s
  ready_grace: {ready_grace}
  failure_window: {failure_window}
  max_failures: 1000
vms:
{names}"#,
        state = state.display(),
        etcd = etcd.join(", "),
        host = host.name,
        ip = host.ip,
    )
}

/// The VMs' policy in a section.
#[derive(Clone, Copy)]
struct Policy {
    checkpoint_interval: &'static str,
    ready_grace: &'static str,
    failure_window: &'static str,
    /// The short lease timings (`lease_ttl` [`TTL`]), or the defaults.
    short_lease: bool,
    /// The section's own keys in etcd (each runs its own fleet).
    prefix: &'static str,
}

/// Host deaths: every takeover is a first failure once [`DEATH_GAP`] has
/// passed since the last restore.
const DEATH_POLICY: Policy = Policy {
    checkpoint_interval: "1s",
    ready_grace: "1s",
    failure_window: "2s",
    short_lease: true,
    prefix: "/relive-bench-death",
};
const DEATH_GAP: Duration = Duration::from_millis(2500);
/// The 50-VM fleet: room to start on 2 cores, the default lease timings
/// (`lease_ttl: 10s`, `request_timeout: 2s`): a loaded 2-core machine
/// running 50 guests, three etcd members and image replication misses 500 ms
/// deadlines.
const LOAD_POLICY: Policy = Policy {
    checkpoint_interval: "5s",
    ready_grace: "10s",
    failure_window: "60s",
    short_lease: false,
    prefix: "/relive-bench-load",
};

/// Three supervisors, one per host, each in `scratch/<host>`.
struct Hosts<'a> {
    bins: &'a Bins,
    network: &'a Network,
    dirs: Vec<PathBuf>,
    yamls: Vec<String>,
    sups: Vec<Option<Supervisor>>,
}

impl<'a> Hosts<'a> {
    fn new(
        bins: &'a Bins,
        network: &'a Network,
        root: &Path,
        etcd: &[String],
        vms: usize,
        policy: Policy,
    ) -> Hosts<'a> {
        let dirs: Vec<PathBuf> = HOSTS.iter().map(|h| root.join(h)).collect();
        let yamls = dirs
            .iter()
            .zip(&network.hosts)
            .map(|(dir, host)| fleet_yaml(&dir.join("state"), host, etcd, vms, policy))
            .collect();
        Hosts {
            bins,
            network,
            dirs,
            yamls,
            sups: HOSTS.iter().map(|_| None).collect(),
        }
    }

    fn start(&mut self, i: usize) -> Result<()> {
        let sup = Supervisor::start_on(
            self.bins,
            &self.dirs[i],
            &self.yamls[i],
            Some(&self.network.hosts[i]),
        )?;
        self.sups[i] = Some(sup);
        Ok(())
    }

    fn sup(&self, i: usize) -> Result<&Supervisor> {
        self.sups[i]
            .as_ref()
            .ok_or_else(|| format!("{} has no supervisor", HOSTS[i]))
    }

    /// Kills host `i` whole and forgets its supervisor (whose state goes).
    fn kill(&mut self, i: usize) {
        self.network.hosts[i].kill();
        self.sups[i] = None;
    }

    /// The host `vm` runs on (by its own view), with the view.
    fn running(&self, vm: &str) -> Option<(usize, Value)> {
        (0..HOSTS.len()).find_map(|i| {
            let view = self.sup(i).ok()?.show(vm).ok()?;
            (view["state"] == "running" && view["host"] == HOSTS[i] && view["pid"].is_u64())
                .then_some((i, view))
        })
    }
}

fn wait<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("cluster section: {what} not within {STEP:?}"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn scrape(text: &str) -> Result<Scrape> {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| format!("cannot parse metrics: {e}"))
}

fn value(sample: &prometheus_parse::Sample) -> f64 {
    match sample.value {
        Sample::Counter(v) | Sample::Gauge(v) | Sample::Untyped(v) => v,
        _ => 0.0,
    }
}

/// The sum of `name`'s samples whose labels include `labels`.
fn sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(value)
        .sum()
}

fn supervisor_metrics(sup: &Supervisor) -> Result<Scrape> {
    scrape(&sup.cli(&["metrics"])?)
}

fn event_ms(events: &[Value], reason: &str, after: u64) -> Option<u64> {
    events
        .iter()
        .filter(|e| e["vm"] == VM && e["reason"] == reason)
        .filter_map(|e| e["unix_ms"].as_u64())
        .find(|&t| t >= after)
}

pub(super) fn failover_across_hosts(
    bins: &Bins,
    scratch: &TempDir,
    runs: usize,
    fleet_secs: u64,
) -> Result<()> {
    println!();
    println!("6. failover across hosts (cluster mode: 3 hosts, 3-member etcd, lease_ttl {TTL})");
    let Some(network) = Network::new(&HOSTS) else {
        println!("   skipped: see the reason above");
        return Ok(());
    };
    let root = scratch.path().join("cluster");
    std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let Some(etcd) = EtcdCluster::start(&root, 3, network.gateway) else {
        println!("   skipped: etcd is not installed");
        return Ok(());
    };
    let host_death = host_death(bins, &network, &root.join("death"), &etcd.urls(), runs)?;
    let load = etcd_load(bins, &network, &root.join("load"), &etcd, fleet_secs)?;
    println!(
        "BENCH cluster {}",
        json!({ "lease_ttl": TTL, "host_death": host_death, "etcd_load": load })
    );
    Ok(())
}

fn host_death(
    bins: &Bins,
    network: &Network,
    root: &Path,
    etcd: &[String],
    runs: usize,
) -> Result<Value> {
    let mut hosts = Hosts::new(bins, network, root, etcd, 1, DEATH_POLICY);
    hosts.start(0)?;
    wait("the VM running on host-a", || hosts.running(VM))?;
    hosts.start(1)?;
    hosts.start(2)?;
    let (mut detection, mut acquisition, mut restore, mut total, mut lag) =
        (vec![], vec![], vec![], vec![], vec![]);
    println!("   host death -> VM running, {runs} runs (ms):");
    for run in 0..runs {
        let (owner, _) = wait("the VM running", || hosts.running(VM))?;
        // Past the failure window of the last takeover's restore.
        std::thread::sleep(DEATH_GAP);
        // A checkpoint since the last restore, replicated and recorded.
        let sup = hosts.sup(owner)?;
        let since = supervisor_metrics(sup)
            .map(|m| sum(&m, "relive_replication_bytes_total", &[("vm", VM)]))
            .unwrap_or(0.0);
        let metrics = wait("a replication since the restore", || {
            let m = supervisor_metrics(sup).ok()?;
            (sum(&m, "relive_replication_bytes_total", &[("vm", VM)]) > since).then_some(m)
        })?;
        lag.push(sum(&metrics, "relive_replication_lag_seconds", &[("vm", VM)]) * 1000.0);
        let killed = unix_ms();
        hosts.kill(owner);
        let (taker, _) = wait("the VM running on another host", || {
            hosts.running(VM).filter(|(i, _)| *i != owner)
        })?;
        let events = hosts.sup(taker)?.events()?;
        let (Some(lost), Some(taken), Some(restored)) = (
            event_ms(&events, "owner-lost", killed),
            event_ms(&events, "taken-over", killed),
            event_ms(&events, "restored", killed),
        ) else {
            let tail: Vec<String> = events.iter().rev().take(8).map(Value::to_string).collect();
            let log = std::fs::read_to_string(hosts.dirs[taker].join("up.log")).unwrap_or_default();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            eprintln!("{} warnings:\n{}", HOSTS[taker], warnings.join("\n"));
            return Err(format!(
                "run {run}: {} recorded no owner-lost/taken-over/restored after the kill at {killed}; its last events:\n{}",
                HOSTS[taker],
                tail.join("\n")
            ));
        };
        let ms = |a: u64, b: u64| b.saturating_sub(a) as f64;
        detection.push(ms(killed, lost));
        acquisition.push(ms(lost, taken));
        restore.push(ms(taken, restored));
        total.push(ms(killed, restored));
        println!(
            "     run {run:2}: {} -> {}: detection {:5.0}  acquisition {:4.0}  restore {:4.0}  total {:5.0}",
            HOSTS[owner],
            HOSTS[taker],
            ms(killed, lost),
            ms(lost, taken),
            ms(taken, restored),
            ms(killed, restored)
        );
        hosts.start(owner)?;
    }
    println!("   median / p90 (ms), lease_ttl {TTL}:");
    println!(
        "     detection (lease expiry, seen by the watch)  {}",
        cell(&detection)
    );
    println!(
        "     acquisition (grace + owner transaction)      {}",
        cell(&acquisition)
    );
    println!(
        "     restore (replicated image, cold)             {}",
        cell(&restore)
    );
    println!(
        "     host death -> VM running                     {}",
        cell(&total)
    );
    println!(
        "     replication lag before each death            {}",
        cell(&lag)
    );
    Ok(json!({
        "runs": runs,
        "detection_ms": summary_json(&detection),
        "acquisition_ms": summary_json(&acquisition),
        "restore_ms": summary_json(&restore),
        "total_ms": summary_json(&total),
        "replication_lag_ms": summary_json(&lag),
    }))
}

/// Every etcd member's `grpc_server_msg_received_total`, by method.
fn etcd_messages(etcd: &[String]) -> Result<std::collections::BTreeMap<String, f64>> {
    let mut by_method = std::collections::BTreeMap::new();
    for url in etcd {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", &format!("{url}/metrics")])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run curl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot read {url}/metrics: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let metrics = scrape(&String::from_utf8_lossy(&out.stdout))?;
        for s in metrics
            .samples
            .iter()
            .filter(|s| s.metric == "grpc_server_msg_received_total")
        {
            let method = s.labels.get("grpc_method").unwrap_or("?").to_string();
            *by_method.entry(method).or_insert(0.0) += value(s);
        }
    }
    Ok(by_method)
}

fn etcd_load(
    bins: &Bins,
    network: &Network,
    root: &Path,
    etcd: &EtcdCluster,
    secs: u64,
) -> Result<Value> {
    const VMS: usize = 50;
    let urls = etcd.urls();
    let mut hosts = Hosts::new(bins, network, root, &urls, VMS, LOAD_POLICY);
    for i in 0..HOSTS.len() {
        hosts.start(i)?;
    }
    let started = Instant::now();
    // Every VM running on some host and replicated by it.
    let mut last_report = Instant::now();
    // A VM two hosts both show running, on any poll: must stay empty.
    let mut doubles = std::collections::BTreeSet::new();
    let placed = wait_long("all 50 VMs running and replicated", || {
        let mut placed = [0usize; 3];
        let (mut replicated, mut states) = (0, std::collections::BTreeMap::new());
        let mut running_on = std::collections::BTreeMap::<String, usize>::new();
        for (i, count) in placed.iter_mut().enumerate() {
            let sup = hosts.sup(i).ok()?;
            let views = sup.status().ok()?;
            let metrics = supervisor_metrics(sup).ok()?;
            for view in views.iter().filter(|v| v["host"] == HOSTS[i]) {
                *states.entry(view["state"].to_string()).or_insert(0) += 1;
                if view["state"] != "running" {
                    continue;
                }
                *count += 1;
                let name = view["name"].as_str()?;
                *running_on.entry(name.to_string()).or_insert(0) += 1;
                if sum(&metrics, "relive_replication_bytes_total", &[("vm", name)]) > 0.0 {
                    replicated += 1;
                }
            }
        }
        doubles.extend(
            running_on
                .into_iter()
                .filter(|(_, n)| *n > 1)
                .map(|(vm, _)| vm),
        );
        if last_report.elapsed() > Duration::from_secs(15) {
            last_report = Instant::now();
            println!("     ... running {placed:?}, replicated {replicated}, states {states:?}");
        }
        (placed.iter().sum::<usize>() == VMS && replicated == VMS).then_some(placed)
    })?;
    println!(
        "   etcd load: {VMS} VMs (64 MiB, checkpoint_interval 5s) running and replicated after {:.1} s, on {}",
        started.elapsed().as_secs_f64(),
        HOSTS
            .iter()
            .zip(placed)
            .map(|(h, n)| format!("{h} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "   VMs seen running on two hosts at once while they started: {}",
        if doubles.is_empty() {
            "none".to_string()
        } else {
            format!("{doubles:?} (SPLIT BRAIN)")
        }
    );
    let before = etcd_messages(&urls)?;
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let after = etcd_messages(&urls)?;
    let elapsed = window.elapsed().as_secs_f64();
    let mut rates: Vec<(String, f64)> = after
        .iter()
        .map(|(m, v)| {
            (
                m.clone(),
                (v - before.get(m).copied().unwrap_or(0.0)) / elapsed,
            )
        })
        .filter(|(_, r)| *r > 0.0)
        .collect();
    rates.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = rates.iter().map(|(_, r)| r).sum();
    println!("   etcd requests (gRPC messages received by the 3 members) over {elapsed:.0} s: {total:.1}/s");
    for (method, rate) in &rates {
        println!("     {method:<20} {rate:8.1}/s");
    }
    let mut lags = Vec::new();
    for i in 0..HOSTS.len() {
        let metrics = supervisor_metrics(hosts.sup(i)?)?;
        lags.extend(
            metrics
                .samples
                .iter()
                .filter(|s| s.metric == "relive_replication_lag_seconds")
                .map(|s| value(s) * 1000.0),
        );
    }
    println!(
        "   replication lag of the {} VMs' last images (ms): {}",
        lags.len(),
        cell(&lags)
    );
    Ok(json!({
        "vms": VMS,
        "seconds": elapsed,
        "requests_per_second": total,
        "by_method": rates.into_iter().map(|(m, r)| (m, json!(r))).collect::<serde_json::Map<String, Value>>(),
        "replication_lag_ms": summary_json(&lags),
    }))
}

/// [`wait`] with room for a 50-VM fleet to start on 2 cores.
fn wait_long<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + super::FLEET_TIMEOUT;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "cluster section: {what} not within {:?}",
                super::FLEET_TIMEOUT
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
