//! Cluster mode end to end: two `relive up` supervisors ("hosts") share one
//! fleet through a real etcd (Debian's `etcd-server`, one member on
//! loopback), each with its own state directory:
//!
//! - the VM runs on the host that claimed it first; the other host shows it
//!   `elsewhere`, owned by the first, and refuses operator actions naming it;
//! - the owner replicates each consistency image (and its chain and boot
//!   image) to the other host, which verifies and stores it;
//! - a host lost whole (its supervisor and its VMM killed with SIGKILL): the
//!   other host takes the VM once the lost host's lease expired and runs it
//!   from the replicated consistency image: the guest's counter and hash
//!   chain continue from that image;
//! - a VM restored from a consistency image on one host that fails again
//!   within its failure_window by losing that host starts on the other from
//!   its boot image (the window is kept in etcd);
//! - a host cut from etcd (its etcd connection stalls through a proxy, no
//!   error): it fences itself, its VMM dead before the other host starts
//!   the VM (by the two hosts' event timestamps), and once the network is
//!   back it does not run the VM again: the VM is `elsewhere` there;
//! - a supervisor killed alone (its host and its VMM fine): the VMM ends
//!   its VM by itself at the fencing deadline the supervisor last renewed
//!   (exit `fenced`, 17), before the other host takes the VM over.
//!
//! Without etcd the tests skip with the reason (fail under
//! `RELIVE_REQUIRE_TOOLS=1`, as in CI).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step fails the test

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fleet::{heartbeat_in_image, is_alive, kill9, unix_ms, wait_for, Fleet, STEP};
use common::{require_kvm, temp_dir};
use relive_testkit::etcd::{free_port, Etcd, Proxy};
use serde_json::Value;

/// The cluster listeners' shared bearer token.
const CLUSTER_TOKEN: &str = "cluster-test-token-0123456789";

/// TTL 3 s, renewals every 500 ms, fencing 1 s before the TTL could run
/// out, takeover 500 ms after an owner's key is gone; images replicated to
/// one peer through each host's listener on a loopback port of its own.
fn fleet_yaml(state: &Path, host: &str, etcd: &str) -> String {
    format!(
        r#"state_dir: {state}
cluster:
  etcd: [{etcd}]
  host: {host}
  advertise: 127.0.0.1:{port}
  token: {CLUSTER_TOKEN}
  replicas: 1
  prefix: /relive-e2e
  lease_ttl: 3s
  keepalive_interval: 500ms
  request_timeout: 500ms
  fence_margin: 1s
  failover_grace: 500ms
defaults:
  checkpoint_interval: 1s
  heartbeat_timeout: 2s
  ready_grace: 1s
vms:
  - name: web
    kernel: bundled
    memory_mib: 64
    cmdline: relive.hb_ms=100
"#,
        state = state.display(),
        port = free_port().unwrap(),
    )
}

/// Host A running `web`, host B seeing it there.
fn two_hosts(a_etcd: &str, b_etcd: &str) -> (Fleet, Fleet) {
    let mut a = Fleet::new(|state| fleet_yaml(state, "host-a", a_etcd));
    a.start_supervisor();
    a.wait_healthy("web", 3, false);
    assert_eq!(a.show("web")["host"], "host-a");
    let mut b = Fleet::new(|state| fleet_yaml(state, "host-b", b_etcd));
    b.start_supervisor();
    wait_for("host-b to see web on host-a", STEP, || {
        let view = b.show("web");
        (view["state"] == "elsewhere" && view["host"] == "host-a").then_some(())
    });
    let hosts = b.json(&["hosts"]);
    let listed: Vec<(String, bool, Vec<Value>)> = hosts
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap().to_string(),
                h["this"] == true,
                h["vms"].as_array().cloned().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("host-a".to_string(), false, vec![Value::from("web")]),
            ("host-b".to_string(), true, vec![]),
        ],
        "relive hosts on host-b: {hosts}"
    );
    let refused = b.relive(&["failover", "web", "--to", "boot"]);
    assert_ne!(
        refused.code,
        Some(0),
        "host-b must refuse to act on host-a's VM"
    );
    assert!(
        refused.stderr.contains("runs on host host-a"),
        "the refusal must name the owner: {refused:?}"
    );
    (a, b)
}

/// A one-member etcd in a directory of its own, or `None` (the test then
/// skips, with the reason printed) without KVM or etcd.
/// (etcd first: it is killed before its directory is removed.)
fn etcd() -> Option<(Etcd, common::TempDir)> {
    if !require_kvm() {
        return None;
    }
    let dir = temp_dir();
    let etcd = Etcd::start(dir.path())?;
    Some((etcd, dir))
}

fn event<'a>(events: &'a [Value], reason: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| e["vm"] == "web" && e["reason"] == reason)
}

#[test]
fn a_host_lost_whole_has_its_vm_run_on_another_host() {
    let Some((etcd, _dir)) = etcd() else {
        return;
    };
    let (mut a, b) = two_hosts(&etcd.url(), &etcd.url());
    // host-b holds host-a's images: the boot image and consistency images.
    let is_consistency =
        |i: &Value| matches!(i["kind"]["kind"].as_str(), Some("full" | "incremental"));
    wait_for(
        "a consistency image of web replicated to host-b",
        STEP,
        || {
            let images = b.images("web");
            let boot = images.iter().any(|i| i["kind"]["kind"] == "boot");
            // The owner counts what it sent once the manifest is in etcd.
            let sent = a
                .metrics()
                .sum("relive_replication_bytes_total", &[("vm", "web")]);
            (boot && images.iter().any(is_consistency) && sent > 0.0).then_some(())
        },
    );

    let vmm = a.show("web")["pid"].as_u64().unwrap() as u32;
    let lost = Instant::now();
    a.kill_supervisor();
    kill9(vmm);
    // The newest image host-b holds now is what it must restore.
    let newest = b
        .images("web")
        .into_iter()
        .rev()
        .find(is_consistency)
        .expect("host-b holds a consistency image");
    let in_image = heartbeat_in_image(&newest);
    let view = wait_for("web running on host-b", STEP, || {
        let view = b.show("web");
        (view["state"] == "running" && view["host"] == "host-b" && view["pid"].is_u64())
            .then_some(view)
    });
    eprintln!(
        "host lost -> web running on host-b: {:.2?} (lease_ttl 3s, failover_grace 500ms)",
        lost.elapsed()
    );
    let events = b.events();
    let taken = event(&events, "taken-over").expect("host-b records the takeover");
    assert_eq!(
        taken["host"], "host-b",
        "events name the host that recorded them: {taken}"
    );
    let detail = taken["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("from host host-a") && detail.contains("replicated consistency image"),
        "{taken}"
    );
    let after = b.wait_heartbeat_from("web", view["pid"].as_u64().unwrap());
    in_image.assert_continued_by(
        &after,
        "the guest on host-b must go on from the replicated image",
    );
}

#[test]
fn a_host_cut_from_etcd_kills_its_vm_before_another_host_runs_it() {
    let Some((etcd, _dir)) = etcd() else {
        return;
    };
    let proxy = Proxy::start(etcd.client).unwrap();
    let (a, b) = two_hosts(&format!("http://{}", proxy.addr), &etcd.url());
    let vmm = a.show("web")["pid"].as_u64().unwrap() as u32;
    proxy.cut(true);
    wait_for("host-a to fence itself", STEP, || {
        (a.show("web")["state"] == "fenced").then_some(())
    });
    assert!(
        !is_alive(vmm),
        "host-a's VMM {vmm} must be dead once it is fenced"
    );
    let metrics = a.metrics();
    assert_eq!(
        metrics.value("relive_cluster_lease_live", &[("host", "host-a")]),
        0.0
    );
    assert_eq!(
        metrics.value("relive_cluster_fences_total", &[("host", "host-a")]),
        1.0
    );
    let metrics = b.metrics();
    assert_eq!(
        metrics.value("relive_cluster_lease_live", &[("host", "host-b")]),
        1.0
    );
    let deadline = metrics.value(
        "relive_cluster_fence_deadline_timestamp_seconds",
        &[("host", "host-b")],
    );
    let now = unix_ms() as f64 / 1000.0;
    assert!(
        deadline > now && deadline < now + 3.0,
        "host-b's fencing deadline {deadline} must lie within its TTL of now {now}"
    );
    wait_for("web running on host-b", STEP, || {
        let view = b.show("web");
        (view["state"] == "running" && view["host"] == "host-b").then_some(())
    });
    let fenced = event(&a.events(), "fenced").expect("host-a records its fencing")["unix_ms"]
        .as_u64()
        .unwrap();
    let taken = event(&b.events(), "taken-over").expect("host-b records the takeover")["unix_ms"]
        .as_u64()
        .unwrap();
    eprintln!(
        "host-a fenced {} ms before host-b took web over",
        taken as i64 - fenced as i64
    );
    assert!(
        fenced < taken,
        "host-a's VMM must be dead (fenced at {fenced}) before host-b takes the VM (at {taken})"
    );

    // The network comes back: host-a joins again and leaves web to host-b.
    proxy.cut(false);
    wait_for("host-a to see web on host-b", STEP, || {
        let view = a.show("web");
        (view["state"] == "elsewhere" && view["host"] == "host-b").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let view = a.show("web");
    assert_eq!(
        view["state"], "elsewhere",
        "host-a must not run web again: {view}"
    );
    assert!(view["pid"].is_null(), "{view}");
}

#[test]
fn a_supervisor_killed_alone_leaves_a_vmm_that_fences_itself_before_another_host_runs_it() {
    let Some((etcd, _dir)) = etcd() else {
        return;
    };
    let (mut a, b) = two_hosts(&etcd.url(), &etcd.url());
    let vmm = a.show("web")["pid"].as_u64().unwrap() as u32;
    a.kill_supervisor();
    // The VMM runs on, alone, until the deadline the supervisor last gave.
    let killed = Instant::now();
    while is_alive(vmm) {
        assert!(
            killed.elapsed() < STEP,
            "host-a's VMM {vmm} still runs {STEP:?} after its supervisor was killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let dead_at = unix_ms();
    eprintln!(
        "supervisor killed -> its VMM ended itself: {:.2?}",
        killed.elapsed()
    );
    let logs: String = ["vmm-a.log", "vmm-b.log"]
        .iter()
        .map(|log| std::fs::read_to_string(a.state.join("web").join(log)).unwrap_or_default())
        .collect();
    assert!(
        logs.contains(r#""reason":"fenced""#),
        "host-a's VMM must end with the fenced exit:\n{logs}"
    );
    wait_for("web running on host-b", STEP, || {
        let view = b.show("web");
        (view["state"] == "running" && view["host"] == "host-b").then_some(())
    });
    let taken = event(&b.events(), "taken-over").expect("host-b records the takeover")["unix_ms"]
        .as_u64()
        .unwrap();
    eprintln!(
        "host-a's VMM ended {} ms before host-b took web over",
        taken as i64 - dead_at as i64
    );
    assert!(
        dead_at < taken,
        "host-a's VMM must have ended (seen at {dead_at}) before host-b took the VM (at {taken})"
    );
}

/// The consistency-then-boot window holds across hosts: a VM restored from
/// a consistency image on host-a that fails again within its
/// failure_window, now by losing host-a, starts on host-b from its boot
/// image (it may hold the failing state), though host-b holds a replicated
/// consistency image.
#[test]
fn a_vm_failing_on_one_host_then_on_another_within_the_window_starts_from_its_boot_image() {
    let Some((etcd, _dir)) = etcd() else {
        return;
    };
    let (mut a, b) = two_hosts(&etcd.url(), &etcd.url());
    let replicated = |a: &Fleet| {
        a.metrics()
            .sum("relive_replication_bytes_total", &[("vm", "web")])
    };
    wait_for("a completed replication of web", STEP, || {
        (replicated(&a) > 0.0).then_some(())
    });
    // A first failure on host-a: restored there from a consistency image.
    let first = a.kill_vmm("web");
    let restored = wait_for("web restored on host-a", STEP, || {
        let view = a.show("web");
        (view["state"] == "running" && view["pid"].as_u64().is_some_and(|p| p != first))
            .then_some(view)
    });
    let a_events = a.events();
    let consistency = event(&a_events, "restored").expect("host-a restored web");
    assert!(
        consistency["detail"]
            .as_str()
            .unwrap_or("")
            .contains("restored consistency"),
        "{consistency}"
    );
    // host-b holds a consistency image, so only the window sends it to boot.
    wait_for("a consistency image of web on host-b", STEP, || {
        b.images("web")
            .iter()
            .any(|i| matches!(i["kind"]["kind"].as_str(), Some("full" | "incremental")))
            .then_some(())
    });
    // The second failure: host-a lost whole, well within failure_window (60 s).
    a.kill_supervisor();
    kill9(restored["pid"].as_u64().unwrap() as u32);
    wait_for("web running on host-b", STEP, || {
        let view = b.show("web");
        (view["state"] == "running" && view["host"] == "host-b").then_some(())
    });
    let b_events = b.events();
    let taken = event(&b_events, "taken-over").expect("host-b records the takeover");
    let detail = taken["detail"].as_str().unwrap_or("");
    assert!(
        taken["to"] == "restoring-boot"
            && detail.contains("within its failure_window")
            && detail.contains("host host-a"),
        "{taken}"
    );
    let booted = b
        .events()
        .into_iter()
        .rev()
        .find(|e| e["vm"] == "web" && e["reason"] == "restored")
        .expect("host-b restored web");
    assert!(
        booted["detail"]
            .as_str()
            .unwrap_or("")
            .contains("restored boot"),
        "{booted}"
    );
}
