//! End-to-end tests of the supervisor, the way its users meet it: each test
//! writes a fleet file, runs `relive up FLEET.yaml` (the real binary, with the
//! real `relive-vmm` and the bundled guest), and checks what an operator would
//! check:
//!
//! - `relive --api <state_dir>/api.sock status|show|events|images|... --json`
//!   (the real CLI over the Unix socket API);
//! - `relive metrics`, parsed as Prometheus text (`prometheus-parse`), whose
//!   counters must match what happened in the test;
//! - `relive-vmm ctl SOCKET ...` on the VMMs' control sockets (to make a guest
//!   panic, crash or hang, and to see that VMMs outlive the supervisor);
//! - `relive-vmm images inspect IMAGE --json`, whose app status holds the
//!   guest's last heartbeat at the image: with the guest's hash chain
//!   ([`replay_hash`]) it proves where a restored guest continued from.
//!
//! Policies are short so the suite stays fast (see [`fleet_yaml`]): 500 ms
//! checkpoints, 1 s ready grace, 5 s failure window, at most 2 failures in
//! it, heartbeats every 50 ms. `heartbeat_timeout` is 2 s rather than 1 s: on
//! a loaded 2-core machine a guest can be descheduled long enough to look
//! hung, which would add failures the counters do not expect.
//!
//! # No leaks, no hangs
//!
//! [`Fleet`] (in `tests/common/fleet.rs`, shared with the chaos soak) kills
//! the supervisor and every VMM of the test by pid when dropped, and every
//! wait polls with a deadline.
//!
//! The binaries must be built first: `cargo build --workspace` (see
//! `tests/common/mod.rs`). Tests that boot VMs skip without `/dev/kvm`, or
//! fail with `RELIVE_REQUIRE_KVM=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers fail a test by panicking

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fleet::*;
use common::{require_kvm, run_vmm, run_with_timeout, Heartbeat};
use relive_images::guest::{replay_hash, HASH_INIT};
use serde_json::Value;

/// The fleet's `failure_window` (see [`fleet_yaml`]).
const FAILURE_WINDOW: Duration = Duration::from_secs(5);

/// The fleet's `heartbeat_timeout`.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

/// The fleet's `control_timeout`.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);

/// The fleet's `standby_timeout`.
const STANDBY_TIMEOUT: Duration = Duration::from_secs(1);

/// What a detection may take beyond its own timeout: the supervisor's
/// 50 ms tick, a heartbeat interval, a status sample period (1 s), and
/// scheduling on a loaded machine.
const DETECTION_SLACK: Duration = Duration::from_millis(2500);

// ---------------------------------------------------------------------------
// Fleet files
// ---------------------------------------------------------------------------

/// A fleet of bundled-guest VMs named `vms` with the tests' short policy;
/// `extra` is inserted at the top level (e.g. an `api:` section).
fn fleet_yaml(state_dir: &Path, vms: &[&str], standby: bool, extra: &str) -> String {
    let mut yaml = format!(
        "state_dir: {}\n{extra}defaults:\n  checkpoint_interval: 500ms\n  heartbeat_timeout: 2s\n  \
         ready_grace: 1s\n  failure_window: 5s\n  max_failures: 2\n  warm_boot_image: true\n  \
         control_timeout: 3s\n  standby_timeout: 1s\n  standby: {standby}\nvms:\n",
        state_dir.display()
    );
    for vm in vms {
        yaml.push_str(&format!(
            "  - name: {vm}\n    kernel: bundled\n    cmdline: \"relive.hb_ms=50\"\n    memory_mib: 64\n"
        ));
    }
    yaml
}

/// Writes the standard fleet ([`fleet_yaml`]) and starts its supervisor.
fn up(vms: &[&str], standby: bool) -> Fleet {
    let mut fleet = Fleet::new(|state| fleet_yaml(state, vms, standby, ""));
    fleet.start_supervisor();
    fleet
}

/// Finds the image `id` in a VM's image list.
fn image_by_id<'a>(images: &'a [Value], id: &str) -> &'a Value {
    images
        .iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("no image {id} in {images:#?}"))
}

/// An image's kind: `full`, `incremental` or `boot`.
fn kind(image: &Value) -> &str {
    image["kind"]["kind"].as_str().unwrap_or("?")
}

fn is_consistency(image: &Value) -> bool {
    matches!(kind(image), "full" | "incremental")
}

// ---------------------------------------------------------------------------
// Failures and failover
// ---------------------------------------------------------------------------

/// kill -9 of a VM's VMM: the supervisor restores the latest consistency
/// image into the hot standby, the guest continues from that image, and a
/// new standby is ready afterwards.
#[test]
fn a_killed_vmm_is_restored_from_the_latest_consistency_image_into_the_standby() {
    if !require_kvm() {
        return;
    }
    let fleet = up(&["web"], true);
    let before = fleet.wait_healthy("web", 20, true);
    let standby_pid = before["standby_pid"].as_u64().unwrap();
    let since = fleet.events().len();

    let killed = fleet.kill_vmm("web");
    let (failure, restored) = fleet.wait_failover("web", since, "vmm-killed");
    assert_eq!(failure["from"], "running", "{failure}");
    assert_eq!(failure["to"], "restoring-consistency", "{failure}");
    assert_eq!(restored["to"], "running", "{restored}");
    assert_eq!(restored["reason"], "restored", "{restored}");
    assert_eq!(restored["path"], "standby", "{restored}");

    // The image is a consistency image, and the newest one taken before the
    // failure.
    let id = restored["image_id"]
        .as_str()
        .expect("the restore names its image");
    let images = fleet.images("web");
    let image = image_by_id(&images, id);
    assert!(is_consistency(image), "restored from {image}");
    let created = image["created_unix_ms"].as_u64().unwrap();
    let failed_at = failure["unix_ms"].as_u64().unwrap();
    assert!(created <= failed_at, "{image} is newer than the failure");
    let newer: Vec<&Value> = images
        .iter()
        .filter(|i| is_consistency(i))
        .filter(|i| {
            let t = i["created_unix_ms"].as_u64().unwrap();
            t > created && t < failed_at
        })
        .collect();
    assert!(newer.is_empty(), "{id} is not the latest image: {newer:#?}");

    // The guest went on from the image: its counter and hash continue the
    // image's, in the process that was the standby.
    let at_image = heartbeat_in_image(image);
    assert!(
        at_image.seq >= 10,
        "the image is of a guest that ran: {at_image:?}"
    );
    let after = fleet.wait_heartbeat_from("web", standby_pid);
    at_image.assert_continued_by(&after, "after the restore");
    assert!(!is_alive(killed as u32));

    // A new standby is started in the background.
    let view = wait_for("a new standby", STEP, || {
        let view = fleet.show("web");
        (view["standby"] == "ready"
            && view["standby_pid"]
                .as_u64()
                .is_some_and(|p| p != standby_pid && p != killed))
        .then_some(view)
    });
    assert!(is_vmm_of(
        view["standby_pid"].as_u64().unwrap() as u32,
        &fleet.state
    ));
    assert!(view["standby_memory_bytes"].as_u64().unwrap() > 0, "{view}");

    let metrics = fleet.metrics();
    metrics.assert_state("web", "running");
    metrics.assert_failures("web", &[("vmm-killed", 1.0)]);
    metrics.assert_restores("web", &[("consistency", "standby", 1.0)]);
    assert_eq!(metrics.value("relive_standby_ready", &[("vm", "web")]), 1.0);
}

/// A guest `panic`, `crash` (triple fault) and `hang`, one per VM: each is
/// detected with its own reason and restored from a consistency image, from
/// which the guest continues.
#[test]
fn guest_panic_crash_and_hang_are_each_detected_with_their_reason_and_restored() {
    if !require_kvm() {
        return;
    }
    let cases = [
        ("p", "panic", "panic"),
        ("c", "crash", "triple-fault"),
        ("h", "hang", "heartbeat-timeout"),
    ];
    let fleet = up(&["p", "c", "h"], false);
    for (vm, _, _) in cases {
        fleet.wait_healthy(vm, 20, false);
    }
    let since = fleet.events().len();
    let started = Instant::now();
    for (vm, command, _) in cases {
        // Early in a checkpoint interval, so the guest acts on the command
        // well before the next image.
        fleet.wait_next_checkpoint(vm);
        fleet.agent(vm, command);
    }
    for (vm, command, reason) in cases {
        let (failure, restored) = fleet.wait_failover(vm, since, reason);
        assert_eq!(
            failure["to"], "restoring-consistency",
            "{command}: {failure}"
        );
        assert_eq!(restored["to"], "running", "{command}: {restored}");
        assert_eq!(restored["path"], "cold", "{command}: {restored}");
        let id = restored["image_id"].as_str().expect("an image id");
        let images = fleet.images(vm);
        let image = image_by_id(&images, id);
        assert!(is_consistency(image), "{command}: restored from {image}");
        let at_image = heartbeat_in_image(image);
        let pid = fleet.show(vm)["pid"].as_u64().unwrap();
        let after = fleet.wait_heartbeat_from(vm, pid);
        at_image.assert_continued_by(&after, &format!("after the {command}"));
        let view = fleet.show(vm);
        assert_eq!(view["last_failure"], reason, "{view}");
    }
    // A hang is only seen once heartbeat_timeout has passed.
    assert!(started.elapsed() >= HEARTBEAT_TIMEOUT);

    // Each VM failed once, for its own reason, and was restored once.
    let metrics = fleet.metrics();
    for (vm, _, reason) in cases {
        metrics.assert_state(vm, "running");
        metrics.assert_failures(vm, &[(reason, 1.0)]);
        metrics.assert_restores(vm, &[("consistency", "cold", 1.0)]);
    }
    fleet.assert_plain_logs();
    for (vm, _, _) in cases {
        fleet.assert_logged_in_span(vm);
    }
}

/// A second failure within `failure_window` of a consistency restore goes to
/// the boot image (the guest's counter starts again); one more is beyond
/// `max_failures`: the VM is `failed` and stays down until `relive start`.
#[test]
fn repeated_failures_go_to_the_boot_image_then_failed_until_start() {
    if !require_kvm() {
        return;
    }
    let fleet = up(&["db"], false);
    fleet.wait_healthy("db", 60, false);
    let since = fleet.events().len();
    let window_start = Instant::now();

    // 1st failure: the latest consistency image.
    fleet.kill_vmm("db");
    let (_, restored) = fleet.wait_failover("db", since, "vmm-killed");
    assert_eq!(restored["from"], "restoring-consistency", "{restored}");
    let pid = fleet.show("db")["pid"].as_u64().unwrap();
    let before = fleet.wait_heartbeat_from("db", pid);
    assert!(before.seq >= 40, "{before:?}");

    // 2nd failure, within the window: the (warm) boot image.
    let since = fleet.events().len();
    fleet.kill_vmm("db");
    let (failure, restored) = fleet.wait_failover("db", since, "vmm-killed");
    assert_eq!(failure["to"], "restoring-boot", "{failure}");
    assert_eq!(restored["to"], "running", "{restored}");
    let id = restored["image_id"].as_str().expect("the boot image's id");
    assert_eq!(kind(image_by_id(&fleet.images("db"), id)), "boot");
    // The counter starts again: a warm boot image is the guest at `ready`,
    // before its workload's first step.
    let pid = fleet.show("db")["pid"].as_u64().unwrap();
    let after = fleet.wait_heartbeat_from("db", pid);
    assert!(
        after.seq < before.seq && after.counter < before.counter,
        "the guest did not start again: {before:?} -> {after:?}"
    );
    assert_eq!(replay_hash(0, HASH_INIT, after.counter), after.hash);

    // 3rd failure, within the window: more than max_failures (2).
    let since = fleet.events().len();
    let last_pid = fleet.kill_vmm("db");
    let failed = wait_for("db failed", STEP, || {
        fleet
            .transitions("db", since)
            .into_iter()
            .find(|e| e["to"] == "failed")
    });
    assert_eq!(failed["reason"], "vmm-killed", "{failed}");
    assert!(
        window_start.elapsed() < FAILURE_WINDOW,
        "the failures were not within failure_window; the machine is too slow for this test"
    );

    // It stays down: no VMM, no restore, until an operator starts it.
    let down_since = Instant::now();
    while down_since.elapsed() < Duration::from_millis(1500) {
        let view = fleet.show("db");
        assert_eq!(view["state"], "failed", "{view}");
        assert!(view["pid"].is_null(), "{view}");
        assert_eq!(vmms_of(&fleet.state), Vec::<u32>::new());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(!is_alive(last_pid as u32));
    assert!(
        fleet
            .transitions("db", since)
            .iter()
            .all(|e| e["to"] != "running"),
        "a failed VM was restarted"
    );
    let metrics = fleet.metrics();
    metrics.assert_state("db", "failed");
    assert_eq!(metrics.value("relive_vm_up", &[("vm", "db")]), 0.0);

    let since = fleet.events().len();
    fleet.act(&["start", "db"]);
    let view = fleet.show("db");
    assert_eq!(view["state"], "running", "{view}");
    let pid = view["pid"].as_u64().expect("a VMM again");
    fleet.wait_heartbeat_from("db", pid);
    let reasons: Vec<Value> = fleet
        .transitions("db", since)
        .iter()
        .map(|e| e["reason"].clone())
        .collect();
    assert_eq!(reasons, ["operator-start", "started"]);

    let metrics = fleet.metrics();
    metrics.assert_state("db", "running");
    metrics.assert_failures("db", &[("vmm-killed", 3.0)]);
    metrics.assert_restores("db", &[("consistency", "cold", 1.0), ("boot", "cold", 1.0)]);
}

/// After a boot fallback, once `failure_window` has passed and the VM has
/// taken a new checkpoint, a failure restores a consistency image again.
#[test]
fn a_failure_after_the_window_restores_a_consistency_image_again() {
    if !require_kvm() {
        return;
    }
    let fleet = up(&["app"], false);
    fleet.wait_healthy("app", 20, false);
    let since = fleet.events().len();
    fleet.kill_vmm("app");
    let (first, _) = fleet.wait_failover("app", since, "vmm-killed");
    assert_eq!(first["to"], "restoring-consistency", "{first}");
    let since = fleet.events().len();
    fleet.kill_vmm("app");
    let (second, booted) = fleet.wait_failover("app", since, "vmm-killed");
    assert_eq!(second["to"], "restoring-boot", "{second}");
    let booted_at = booted["unix_ms"].as_u64().unwrap();

    // The consistency images predate the boot fallback: they are trusted
    // again only once a new one exists, and the failures only count for
    // failure_window.
    let fresh = wait_for("a consistency image taken after the boot", STEP, || {
        fleet
            .images("app")
            .into_iter()
            .find(|i| is_consistency(i) && i["created_unix_ms"].as_u64().unwrap() > booted_at)
    });
    wait_for("the failures to leave failure_window", STEP, || {
        (fleet.show("app")["recent_failures"] == 0).then_some(())
    });
    let window_end = second["unix_ms"].as_u64().unwrap() + FAILURE_WINDOW.as_millis() as u64;
    assert!(unix_ms() >= window_end);

    let since = fleet.events().len();
    fleet.kill_vmm("app");
    let (third, restored) = fleet.wait_failover("app", since, "vmm-killed");
    assert_eq!(third["to"], "restoring-consistency", "{third}");
    let id = restored["image_id"].as_str().unwrap();
    let images = fleet.images("app");
    let image = image_by_id(&images, id);
    assert!(is_consistency(image), "{image}");
    assert!(
        image["created_unix_ms"].as_u64().unwrap() >= fresh["created_unix_ms"].as_u64().unwrap(),
        "restored {image}, older than the first image after the boot, {fresh}"
    );
    let at_image = heartbeat_in_image(image);
    let pid = fleet.show("app")["pid"].as_u64().unwrap();
    at_image.assert_continued_by(&fleet.wait_heartbeat_from("app", pid), "after the restore");

    let metrics = fleet.metrics();
    metrics.assert_state("app", "running");
    metrics.assert_failures("app", &[("vmm-killed", 3.0)]);
    metrics.assert_restores(
        "app",
        &[("consistency", "cold", 2.0), ("boot", "cold", 1.0)],
    );
}

// ---------------------------------------------------------------------------
// Operator actions
// ---------------------------------------------------------------------------

/// `relive failover VM --to consistency|boot|IMAGE_ID`, `pause`/`resume` and
/// `stop`/`start`, as an operator runs them. Forced failovers are restores,
/// not failures.
#[test]
fn operator_failover_to_each_target_pause_resume_stop_start() {
    if !require_kvm() {
        return;
    }
    let fleet = up(&["ops"], false);
    fleet.wait_healthy("ops", 20, false);

    // --to consistency: the latest consistency image.
    let since = fleet.events().len();
    fleet.act(&["failover", "ops", "--to", "consistency"]);
    let (forced, restored) = fleet.wait_failover("ops", since, "operator-failover");
    assert_eq!(forced["to"], "restoring-consistency", "{forced}");
    let images = fleet.images("ops");
    let image = image_by_id(&images, restored["image_id"].as_str().unwrap());
    assert!(is_consistency(image), "{image}");
    let pid = fleet.show("ops")["pid"].as_u64().unwrap();
    heartbeat_in_image(image)
        .assert_continued_by(&fleet.wait_heartbeat_from("ops", pid), "--to consistency");

    // --to boot: the boot image; the guest starts again.
    let before = fleet.wait_healthy("ops", 40, false);
    let before = heartbeat_of(&before).unwrap();
    let since = fleet.events().len();
    fleet.act(&["failover", "ops", "--to", "boot"]);
    let (forced, restored) = fleet.wait_failover("ops", since, "operator-failover");
    assert_eq!(forced["to"], "restoring-boot", "{forced}");
    let id = restored["image_id"].as_str().unwrap();
    assert_eq!(kind(image_by_id(&fleet.images("ops"), id)), "boot");
    let pid = fleet.show("ops")["pid"].as_u64().unwrap();
    let after = fleet.wait_heartbeat_from("ops", pid);
    assert!(
        after.seq < before.seq && after.counter < before.counter,
        "the guest did not start again: {before:?} -> {after:?}"
    );
    assert_eq!(replay_hash(0, HASH_INIT, after.counter), after.hash);

    // --to IMAGE_ID: that very image.
    fleet.wait_healthy("ops", 20, false);
    let images = fleet.images("ops");
    let chosen = images
        .iter()
        .rev()
        .find(|i| kind(i) == "full")
        .expect("a full consistency image");
    let chosen_id = chosen["id"].as_str().unwrap();
    let since = fleet.events().len();
    fleet.act(&["failover", "ops", "--to", chosen_id]);
    let (forced, restored) = fleet.wait_failover("ops", since, "operator-failover");
    assert_eq!(forced["to"], "restoring-image", "{forced}");
    assert_eq!(restored["image_id"], chosen_id, "{restored}");
    let pid = fleet.show("ops")["pid"].as_u64().unwrap();
    heartbeat_in_image(chosen)
        .assert_continued_by(&fleet.wait_heartbeat_from("ops", pid), "--to IMAGE_ID");

    // pause: heartbeats stop, and a paused guest is not a hung one.
    let since = fleet.events().len();
    fleet.act(&["pause", "ops"]);
    let paused = fleet.show("ops");
    assert_eq!(paused["state"], "paused", "{paused}");
    fleet.metrics().assert_state("ops", "paused");
    std::thread::sleep(POLL * 2); // a heartbeat already on its way
    let paused = fleet.show("ops");
    std::thread::sleep(HEARTBEAT_TIMEOUT + Duration::from_millis(500));
    let still = fleet.show("ops");
    assert_eq!(still["state"], "paused", "{still}");
    assert_eq!(still["pid"], paused["pid"], "{still}");
    assert_eq!(
        still["last_heartbeat"], paused["last_heartbeat"],
        "a paused guest heartbeated"
    );
    assert!(still["heartbeat_age_ms"].as_u64().unwrap() >= HEARTBEAT_TIMEOUT.as_millis() as u64);
    let at_pause = heartbeat_of(&still).unwrap();

    // resume: the same guest goes on.
    fleet.act(&["resume", "ops"]);
    let resumed = wait_for("a heartbeat after resume", STEP, || {
        let view = fleet.show("ops");
        heartbeat_of(&view).filter(|hb| view["state"] == "running" && hb.seq > at_pause.seq)
    });
    at_pause.assert_continued_by(&resumed, "after resume");
    let reasons: Vec<Value> = fleet
        .transitions("ops", since)
        .iter()
        .map(|e| e["reason"].clone())
        .collect();
    assert_eq!(reasons, ["operator-pause", "operator-resume"]);

    // stop: the VMM is gone and stays gone; start: running again.
    let pid = fleet.show("ops")["pid"].as_u64().unwrap();
    fleet.act(&["stop", "ops"]);
    let stopped = fleet.show("ops");
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(stopped["pid"].is_null(), "{stopped}");
    assert!(!is_vmm_of(pid as u32, &fleet.state), "the VMM still runs");
    assert_eq!(vmms_of(&fleet.state), Vec::<u32>::new());
    fleet.metrics().assert_state("ops", "stopped");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fleet.show("ops")["state"], "stopped");
    fleet.act(&["start", "ops"]);
    let started = fleet.show("ops");
    assert_eq!(started["state"], "running", "{started}");
    let pid = started["pid"].as_u64().unwrap();
    fleet.wait_heartbeat_from("ops", pid);

    let metrics = fleet.metrics();
    metrics.assert_state("ops", "running");
    metrics.assert_failures("ops", &[]);
    metrics.assert_restores(
        "ops",
        &[
            ("consistency", "cold", 1.0),
            ("boot", "cold", 1.0),
            ("image", "cold", 1.0),
        ],
    );
}

// ---------------------------------------------------------------------------
// Supervisor restart
// ---------------------------------------------------------------------------

/// The status reply of the VMM at `socket` (`relive-vmm ctl SOCKET status
/// --json`).
fn vmm_status(socket: &str) -> Value {
    let out = run_vmm(["ctl", socket, "status", "--json"]);
    assert_eq!(out.code, Some(0), "ctl {socket} status: {out:?}");
    serde_json::from_str(out.stdout.trim()).unwrap()
}

/// kill -9 of the supervisor: the VMMs go on running and heartbeating, and a
/// new `relive up` of the same fleet adopts them without restarting any.
#[test]
fn a_killed_supervisor_leaves_the_vms_running_and_a_new_one_adopts_them() {
    if !require_kvm() {
        return;
    }
    let mut fleet = Fleet::new(|state| {
        fleet_yaml(state, &["one", "two"], false, "")
            // As with the built-in defaults (10s and 2s), ready_grace is longer
            // than heartbeat_timeout: an adopted VM must still get its
            // heartbeats judged from its last one, not from ready_grace ago.
            .replace("ready_grace: 1s", "ready_grace: 3s")
            // `one` keeps a standby: adopted too.
            .replace(
                "    memory_mib: 64\n  - name: two",
                "    memory_mib: 64\n    policy: { standby: true }\n  - name: two",
            )
            // `two` has a jail account of its own (as root: jailed).
            .replace(
                "  - name: two\n",
                "  - name: two\n    jail: { uid: 2001, gid: 2001 }\n",
            )
    });
    assert!(std::fs::read_to_string(&fleet.file)
        .unwrap()
        .contains("ready_grace: 3s\n"));
    fleet.start_supervisor();
    let mut before = Vec::new();
    for (vm, standby) in [("one", true), ("two", false)] {
        let view = fleet.wait_healthy(vm, 20, standby);
        before.push(view);
    }

    // As root the VMMs run jailed (the default): their own uid, pid 1 of
    // their own pid namespace, yet the pid the supervisor knows is theirs.
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        for (pid, uid) in [
            (before[0]["pid"].as_u64(), 65534),
            (before[0]["standby_pid"].as_u64(), 65534),
            (before[1]["pid"].as_u64(), 2001),
        ] {
            assert_jailed_as(pid.unwrap() as u32, uid);
        }
    }

    // The new supervisor reads the event log back: count what is there.
    let since = fleet.events().len();
    fleet.kill_supervisor();
    // The VMMs did not notice: still running, still heartbeating.
    for view in &before {
        let socket = view["socket"].as_str().unwrap();
        let pid = view["pid"].as_u64().unwrap();
        let first = vmm_status(socket);
        assert_eq!(first["state"], "running", "{first}");
        assert_eq!(first["pid"], pid, "{first}");
        let beat = |status: &Value| {
            Heartbeat::parse(status["agent"]["last_line"].as_str().unwrap_or("")).unwrap()
        };
        let first = beat(&first);
        let later = wait_for("a heartbeat without the supervisor", STEP, || {
            Some(beat(&vmm_status(socket))).filter(|hb| hb.seq > first.seq)
        });
        first.assert_continued_by(&later, "without a supervisor");
    }
    let standby_pid = before[0]["standby_pid"].as_u64().unwrap();
    assert!(is_vmm_of(standby_pid as u32, &fleet.state));

    fleet.start_supervisor();
    for view in &before {
        let vm = view["name"].as_str().unwrap();
        let adopted = wait_for(format!("{vm} adopted"), STEP, || {
            fleet
                .transitions(vm, since)
                .into_iter()
                .find(|e| e["reason"] == "adopted")
        });
        assert_eq!(adopted["to"], "running", "{adopted}");
        let pid = view["pid"].as_u64().unwrap();
        let status = fleet.status();
        let now = status.iter().find(|v| v["name"] == vm).unwrap();
        assert_eq!(now["pid"], pid, "{vm} runs in another VMM: {now}");
        // The guest was not restarted: its heartbeats carry on.
        let hb = fleet.wait_heartbeat_from(vm, pid);
        heartbeat_of(view)
            .unwrap()
            .assert_continued_by(&hb, "after the adoption");
    }
    let one = fleet.show("one");
    assert_eq!(one["standby"], "ready", "{one}");
    assert_eq!(one["standby_pid"], standby_pid, "{one}");

    // Well past heartbeat_timeout, nothing happened to them.
    std::thread::sleep(HEARTBEAT_TIMEOUT + Duration::from_millis(500));
    for view in &before {
        let vm = view["name"].as_str().unwrap();
        let transitions = fleet.transitions(vm, since);
        assert_eq!(transitions.len(), 1, "{vm}: {transitions:#?}");
        let now = fleet.show(vm);
        assert_eq!(now["state"], "running", "{now}");
        assert_eq!(now["pid"], view["pid"], "{now}");
    }
    let metrics = fleet.metrics();
    for vm in ["one", "two"] {
        metrics.assert_state(vm, "running");
        metrics.assert_failures(vm, &[]);
        metrics.assert_restores(vm, &[]);
    }

    // An adopted (jailed) VMM that dies is failed over like any other, into
    // a new VMM that is jailed again.
    let old = before[1]["pid"].as_u64().unwrap();
    // SAFETY: kill(2) with a pid this test read from the supervisor.
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    let restored = wait_for("two restored after its adopted VMM died", STEP, || {
        let now = fleet.show("two");
        (now["state"] == "running" && now["pid"].as_u64().is_some_and(|p| p != old)).then_some(now)
    });
    if root {
        assert_jailed_as(restored["pid"].as_u64().unwrap() as u32, 2001);
    }
}

/// `pid` runs as `uid` (and gid), as pid 1 of a pid namespace of its own.
fn assert_jailed_as(pid: u32, uid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(
        field("Uid:"),
        format!("{uid} {uid} {uid} {uid}"),
        "pid {pid}"
    );
    assert_eq!(
        field("Gid:"),
        format!("{uid} {uid} {uid} {uid}"),
        "pid {pid}"
    );
    assert_eq!(field("NSpid:"), format!("{pid} 1"), "pid {pid}");
    assert_eq!(field("CapEff:"), "0000000000000000", "pid {pid}");
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

/// A bad fleet file: `relive up` exits non-zero with one error line naming
/// the file, the line and the key, and starts nothing.
#[test]
fn bad_fleet_files_are_refused_naming_file_line_and_key_and_nothing_starts() {
    let good_vm = "  - name: a\n    kernel: bundled\n";
    // (what, the file after `state_dir:`, line, key, words of the message)
    let cases: [(&str, String, usize, &str, &str); 6] = [
        (
            "unknown key",
            format!("defaults:\n  checkpoint_intervl: 5s\nvms:\n{good_vm}"),
            3,
            "defaults.checkpoint_intervl",
            "did you mean \"checkpoint_interval\"",
        ),
        (
            "bad duration",
            format!("defaults:\n  heartbeat_timeout: 30 s\nvms:\n{good_vm}"),
            3,
            "defaults.heartbeat_timeout",
            "is not a duration",
        ),
        (
            "missing kernel file",
            "vms:\n  - name: a\n    kernel: ./kernels/vmlinux\n".to_string(),
            4,
            "vms[0].kernel",
            "does not exist",
        ),
        (
            "no kernel key",
            "vms:\n  - name: a\n    memory_mib: 64\n".to_string(),
            3,
            "vms[0].kernel",
            "missing required key \"kernel\"",
        ),
        (
            "duplicate names",
            format!("vms:\n{good_vm}{good_vm}"),
            5,
            "vms[1].name",
            "duplicate VM name \"a\"",
        ),
        (
            "impossible policy",
            format!("defaults:\n  ready_grace: 10s\n  failure_window: 5s\nvms:\n{good_vm}"),
            4,
            "defaults.failure_window",
            "shorter than ready_grace",
        ),
    ];
    for (what, body, line, key, words) in cases {
        let fleet = Fleet::new(|state| format!("state_dir: {}\n{body}", state.display()));
        let out = run_with_timeout(&mut fleet.up_command(), STEP);
        assert_eq!(out.code, Some(1), "{what}: {out:?}");
        let errors: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("relive: error: "))
            .collect();
        assert_eq!(errors.len(), 1, "{what}: {}", out.stderr);
        let expected = format!("{}:{line}:", fleet.file.display());
        assert!(
            errors[0].contains(&expected) && errors[0].contains(&format!(" {key}: ")),
            "{what}: {:?} does not name {expected} and {key}",
            errors[0]
        );
        assert!(errors[0].contains(words), "{what}: {:?}", errors[0]);
        assert!(out.stdout.is_empty(), "{what}: {}", out.stdout);
        // Nothing started: no state directory, no VMM.
        assert!(!fleet.state.exists(), "{what}: the state dir was created");
        assert_eq!(vmms_of(&fleet.state), Vec::<u32>::new(), "{what}");
    }
}

/// One HTTP/1.1 request over TCP; the status code and the parsed JSON body.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("body {body:?}: {e}"));
    (status, body)
}

/// The TCP API refuses calls without its token or with a wrong one (401,
/// JSON error, nothing done); an unknown VM is a 404 with a clear message.
#[test]
fn api_calls_without_the_token_or_for_an_unknown_vm_are_refused_and_change_nothing() {
    if !require_kvm() {
        return;
    }
    const TOKEN: &str = "test-token-0123456789abcdef";
    let mut fleet = Fleet::new(|state| {
        fleet_yaml(
            state,
            &["web"],
            false,
            &format!("api:\n  tcp: 127.0.0.1:0\n  token: {TOKEN}\n"),
        )
    });
    fleet.start_supervisor();
    let before = fleet.wait_healthy("web", 5, false);
    let banner = std::fs::read_to_string(fleet.stdout_path()).unwrap();
    let addr = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("API      http://"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no TCP API in the banner:\n{banner}"))
        .to_string();
    let url = format!("http://{addr}");
    let since = fleet.events().len();

    // A supervisor that runs alone has no cluster to list.
    let alone = fleet.relive(&["hosts"]);
    assert_ne!(alone.code, Some(0), "{alone:?}");
    assert!(alone.stderr.contains("runs alone"), "{alone:?}");

    // Over HTTP: 401 and a JSON error, for reads and actions alike.
    for (method, path) in [
        ("GET", "/v1/vms"),
        ("POST", "/v1/vms/web/stop"),
        ("GET", "/metrics"),
    ] {
        let (status, body) = http(&addr, method, path, None);
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("missing bearer token"),
            "{body}"
        );
        let (status, body) = http(&addr, method, path, Some("wrong-token-0123456789"));
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert_eq!(body["error"], "wrong bearer token", "{body}");
    }
    // Through the CLI: a non-zero exit and the same message.
    let cli = |args: &[&str]| {
        let mut cmd = Command::new(RELIVE);
        cmd.args(["--api", &url])
            .args(args)
            .env_remove("RELIVE_API")
            .env_remove("RELIVE_TOKEN")
            .stdin(Stdio::null());
        run_with_timeout(&mut cmd, STEP)
    };
    for args in [
        &["stop", "web"][..],
        &["failover", "web", "--to", "boot"],
        &["status"],
    ] {
        let out = cli(args);
        assert_eq!(out.code, Some(1), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("missing bearer token"),
            "{args:?}: {out:?}"
        );
        let mut wrong = vec!["--token", "wrong-token-0123456789"];
        wrong.extend_from_slice(args);
        let out = cli(&wrong);
        assert_eq!(out.code, Some(1), "{wrong:?}: {out:?}");
        assert!(
            out.stderr.contains("wrong bearer token"),
            "{wrong:?}: {out:?}"
        );
    }
    // With the token it works.
    let out = cli(&["--token", TOKEN, "show", "web", "--json"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let view: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(view["name"], "web");

    // Unknown VM: 404 with a message naming it, over HTTP and the CLI.
    let (status, body) = http(&addr, "GET", "/v1/vms/nope", Some(TOKEN));
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no VM named \"nope\""),
        "{body}"
    );
    let (status, body) = http(&addr, "POST", "/v1/vms/nope/stop", Some(TOKEN));
    assert_eq!(status, 404, "{body}");
    for args in [
        &["show", "nope"][..],
        &["failover", "nope"],
        &["stop", "nope"],
        &["images", "nope"],
    ] {
        let out = fleet.relive(args);
        assert_eq!(out.code, Some(1), "{args:?}: {out:?}");
        assert!(
            out.stderr
                .starts_with("relive: error: no VM named \"nope\""),
            "{args:?}: {}",
            out.stderr
        );
    }

    // Nothing changed: same VMM, still running, no transition, no restore.
    let after = fleet.show("web");
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["pid"], before["pid"], "{after}");
    assert_eq!(fleet.transitions("web", since), Vec::<Value>::new());
    let metrics = fleet.metrics();
    metrics.assert_state("web", "running");
    metrics.assert_failures("web", &[]);
    metrics.assert_restores("web", &[]);
}

// ---------------------------------------------------------------------------
// Stalls and restarts
// ---------------------------------------------------------------------------

/// The `unix_ms` of an event.
fn event_ms(event: &Value) -> u64 {
    event["unix_ms"].as_u64().expect("an event has unix_ms")
}

/// A VMM stopped dead (SIGSTOP: no heartbeats, no answers, sockets open) is
/// failed over at `heartbeat_timeout` while it is still stopped, not when it
/// resumes: requests to it (the next checkpoint is due every 500 ms) must not
/// hold up hang detection. A paused VM has no heartbeats to judge; its
/// stalled VMM is caught by `control_timeout` on the status sample.
#[test]
fn a_stalled_vmm_is_failed_over_on_time_while_it_is_still_stopped() {
    if !require_kvm() {
        return;
    }
    let fleet = up(&["st"], false);
    fleet.wait_healthy("st", 3, false);
    fleet.wait_next_checkpoint("st");
    let since = fleet.events().len();
    let pid = fleet.show("st")["pid"].as_u64().unwrap() as u32;
    assert!(is_vmm_of(pid, &fleet.state));
    let stopped_at = stall(pid);
    let (failure, done) = fleet.wait_failover("st", since, "heartbeat-timeout");
    let took = Duration::from_millis(event_ms(&failure).saturating_sub(stopped_at));
    assert!(
        took <= HEARTBEAT_TIMEOUT + DETECTION_SLACK,
        "the stall was detected {took:?} after it began (heartbeat_timeout {HEARTBEAT_TIMEOUT:?}): {failure}"
    );
    assert!(!is_alive(pid), "the stalled VMM {pid} was left behind");
    assert_eq!(done["to"], "running", "{done}");

    // Paused: no heartbeats are expected, but the VMM must still answer.
    let view = fleet.wait_healthy("st", 3, false);
    fleet.act(&["pause", "st"]);
    let since = fleet.events().len();
    let pid = view["pid"].as_u64().unwrap() as u32;
    let stopped_at = stall(pid);
    let (failure, done) = fleet.wait_failover("st", since, "control-timeout");
    let took = Duration::from_millis(event_ms(&failure).saturating_sub(stopped_at));
    assert_eq!(failure["from"], "paused", "{failure}");
    assert!(
        took <= CONTROL_TIMEOUT + DETECTION_SLACK,
        "the paused VM's stalled VMM was found {took:?} after the stall (control_timeout {CONTROL_TIMEOUT:?}): {failure}"
    );
    assert!(!is_alive(pid), "the stalled VMM {pid} was left behind");
    assert_eq!(done["to"], "running", "{done}");
    let metrics = fleet.metrics();
    metrics.assert_failures(
        "st",
        &[("heartbeat-timeout", 1.0), ("control-timeout", 1.0)],
    );
}

/// A standby that does not take the image (stopped dead) must not hold the
/// failover up: after `standby_timeout` it is killed, the image is restored
/// cold, and an event says so.
#[test]
fn a_stalled_standby_is_abandoned_and_the_restore_goes_cold() {
    if !require_kvm() {
        return;
    }
    let fleet = up(&["sb"], true);
    let view = fleet.wait_healthy("sb", 3, true);
    let standby = view["standby_pid"].as_u64().unwrap() as u32;
    assert!(is_vmm_of(standby, &fleet.state));
    stall(standby);
    let since = fleet.events().len();
    fleet.kill_vmm("sb");
    let (failure, done) = fleet.wait_failover("sb", since, "vmm-killed");
    assert_eq!(failure["to"], "restoring-consistency", "{failure}");
    assert_eq!(done["path"], "cold", "{done}");
    let restore_ms = done["durations"]["restore_ms"].as_f64().unwrap();
    let bound = (STANDBY_TIMEOUT + DETECTION_SLACK).as_millis() as f64;
    assert!(
        restore_ms <= bound,
        "the restore took {restore_ms} ms with a stalled standby (standby_timeout {STANDBY_TIMEOUT:?}): {done}"
    );
    let abandoned: Vec<Value> = fleet
        .events()
        .into_iter()
        .skip(since)
        .filter(|e| e["vm"] == "sb" && e["reason"] == "standby-abandoned")
        .collect();
    assert_eq!(abandoned.len(), 1, "{abandoned:#?}");
    let detail = abandoned[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&standby.to_string()) && detail.contains("standby_timeout"),
        "{detail}"
    );
    wait_for("the stalled standby to be killed", STEP, || {
        (!is_alive(standby)).then_some(())
    });
    // A new standby is built for the next failover.
    let view = fleet.wait_healthy("sb", 1, true);
    assert_ne!(view["standby_pid"].as_u64(), Some(u64::from(standby)));
}

/// The policy remembers across a supervisor restart: a failure soon after a
/// consistency restore goes to the boot image even when a new supervisor
/// sits in between, and a stopped VM stays stopped.
#[test]
fn a_restarted_supervisor_keeps_the_failure_history_and_the_stopped_vms() {
    if !require_kvm() {
        return;
    }
    let mut fleet = up(&["pol", "off"], false);
    fleet.wait_healthy("pol", 3, false);
    fleet.wait_healthy("off", 1, false);
    fleet.act(&["stop", "off"]);
    let since = fleet.events().len();
    fleet.kill_vmm("pol");
    let (failure, done) = fleet.wait_failover("pol", since, "vmm-killed");
    assert_eq!(failure["to"], "restoring-consistency", "{failure}");
    let restored_at = event_ms(&done);

    fleet.kill_supervisor();
    fleet.start_supervisor();
    let view = fleet.wait_healthy("pol", 0, false);
    let since = fleet.events().len();
    fleet.kill_vmm("pol");
    let (failure, _) = fleet.wait_failover("pol", since, "vmm-killed");
    let after = Duration::from_millis(event_ms(&failure).saturating_sub(restored_at));
    assert!(
        after < FAILURE_WINDOW,
        "the test was too slow: the second failure came {after:?} after the restore"
    );
    assert_eq!(
        failure["to"], "restoring-boot",
        "a failure {after:?} after a consistency restore (failure_window {FAILURE_WINDOW:?}), \
         across a supervisor restart, must go to the boot image: {failure}; before: {view}"
    );
    assert_eq!(fleet.show("pol")["recent_failures"], 2);
    let off = fleet.show("off");
    assert_eq!(off["state"], "stopped", "{off}");
    assert!(off["pid"].is_null(), "{off}");
}

/// A failover trusts background verification, and reads no guest memory: the
/// newest image, whose verdict says its memory is damaged, is passed over
/// (the event names it and why) and the one before it is restored.
#[test]
fn failover_skips_an_image_that_failed_verification_and_restores_the_verified_one_before() {
    if !require_kvm() {
        return;
    }
    let fleet = up(&["ver"], false);
    let view = fleet.wait_healthy("ver", 3, false);
    let dir = std::path::PathBuf::from(view["images_dir"].as_str().unwrap());
    let consistency = || -> Vec<Value> {
        let out = run_vmm(["images", "list", dir.to_str().unwrap(), "--json"]);
        let all: Vec<Value> = serde_json::from_str(&out.stdout).unwrap();
        all.into_iter().filter(is_consistency).collect()
    };
    wait_for("two consistency images", STEP, || {
        (consistency().len() >= 2).then_some(())
    });
    // Paused: no checkpoint comes after the ones looked at here.
    fleet.act(&["pause", "ver"]);
    // Every image the VMM committed gets its verdict in the background.
    let images = wait_for("a verdict for every consistency image", STEP, || {
        let images = consistency();
        let missing: Vec<&str> = images
            .iter()
            .map(|i| i["path"].as_str().unwrap())
            .filter(|p| !std::path::Path::new(p).with_extension("verdict").exists())
            .collect();
        (images.len() >= 2 && missing.is_empty()).then_some(images)
    });
    let newest = &images[images.len() - 1];
    let before = &images[images.len() - 2];
    let newest_path = std::path::Path::new(newest["path"].as_str().unwrap());
    // Damage a page of the newest image and record its verdict again.
    let reader = relive_images::format::ImageReader::open(newest_path).unwrap();
    let layout = reader.memory_map()[0].clone();
    let at = layout.file_offset + layout.present[0].first_page * 4096 + 5;
    drop(reader);
    let mut bytes = std::fs::read(newest_path).unwrap();
    bytes[at as usize] ^= 0xff;
    std::fs::write(newest_path, &bytes).unwrap();
    let out = run_vmm(["images", "verify", dir.to_str().unwrap(), "--record"]);
    assert_eq!(out.code, Some(1), "the damaged image is bad: {out:?}");

    let since = fleet.events().len();
    fleet.kill_vmm("ver");
    let (failure, done) = fleet.wait_failover("ver", since, "vmm-killed");
    assert_eq!(failure["to"], "restoring-consistency", "{failure}");
    assert_eq!(
        done["image_id"], before["id"],
        "{done}\nimages: {images:#?}"
    );
    let skipped: Vec<Value> = fleet
        .events()
        .into_iter()
        .skip(since)
        .filter(|e| e["reason"] == "image-skipped")
        .collect();
    assert!(
        skipped.iter().any(|e| {
            let d = e["detail"].as_str().unwrap_or("");
            d.contains(newest_path.to_str().unwrap())
                && d.contains("background verification failed")
        }),
        "no event names the damaged image: {skipped:#?}"
    );
}

/// Consistency at the sizes users run: a 2 GiB VM whose guest touched 1 GiB
/// and keeps rewriting 16 MiB, with `heartbeat_timeout: 1s` and a
/// checkpoint every 2 s, runs a minute with no failure (live checkpoints
/// keep it running while memory is copied; their pauses are announced and
/// not counted against the heartbeat deadline), then survives a kill -9 with
/// its counter continuing from the latest image.
#[test]
fn a_vm_of_2_gib_that_touched_1_gib_runs_a_minute_of_checkpoints_then_survives_a_kill() {
    if !require_kvm() {
        return;
    }
    const RUN: Duration = Duration::from_secs(60);
    let mut fleet = Fleet::new(|state| {
        format!(
            "state_dir: {}\ndefaults:\n  checkpoint_interval: 2s\n  heartbeat_timeout: 1s\n  \
             ready_grace: 5s\n  failure_window: 60s\n  max_failures: 3\n  keep_images: 2\n  \
             warm_boot_image: true\nvms:\n  - name: big\n    kernel: bundled\n    \
             cmdline: \"relive.hb_ms=100 relive.touch_mib=1024 relive.ws_mib=16\"\n    \
             memory_mib: 2048\n",
            state.display()
        )
    });
    fleet.start_supervisor();
    // Its first checkpoint follows the warm boot image, 1 GiB copied live
    // while the guest rewrites its working set: ~3.5 s for a debug build on
    // an idle host, several times that beside other tests on two cores.
    fleet.wait_healthy_within("big", 1, false, Duration::from_secs(180));
    let started = Instant::now();
    let mut checkpoints = std::collections::BTreeSet::new();
    while started.elapsed() < RUN {
        let view = fleet.show("big");
        assert_eq!(
            view["state"],
            "running",
            "the VM left running {:?} into the run: {view}",
            started.elapsed()
        );
        if let Some(id) = view["last_checkpoint"].as_str() {
            checkpoints.insert(id.to_string());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let metrics = fleet.metrics();
    metrics.assert_failures("big", &[]);
    assert!(
        checkpoints.len() >= 10,
        "only {} checkpoints in {RUN:?}: {checkpoints:?}",
        checkpoints.len()
    );
    assert!(
        metrics.sum(
            "relive_vm_paused_seconds_total",
            &[("vm", "big"), ("reason", "checkpoint")]
        ) > 0.0,
        "checkpoint pauses are accounted:\n{}",
        metrics.text
    );

    // A kill: the latest verified image, the counter going on from it.
    let since = fleet.events().len();
    let killed = fleet.kill_vmm("big");
    let (failure, done) = fleet.wait_failover("big", since, "vmm-killed");
    assert_eq!(failure["to"], "restoring-consistency", "{failure}");
    assert_eq!(done["to"], "running", "{done}");
    let images = fleet.images("big");
    let image_hb = heartbeat_in_image(image_by_id(&images, done["image_id"].as_str().unwrap()));
    let pid = wait_for("the restored VMM", STEP, || {
        fleet.show("big")["pid"].as_u64().filter(|&p| p != killed)
    });
    let after = fleet.wait_heartbeat_from("big", pid);
    image_hb.assert_continued_by(&after, "the restored 2 GiB guest");
}

/// A supervisor under umask 000 keeps its state owner-only (directories
/// 0700, files 0600: events, records, logs, consoles, images, verdicts,
/// the API socket), and narrows a state directory an older relive left
/// open, saying so in its log.
#[test]
fn state_is_owner_only_under_umask_000_and_a_wide_state_dir_is_narrowed_with_a_warning() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !require_kvm() {
        return;
    }
    let mut fleet = Fleet::new(|state| fleet_yaml(state, &["priv"], true, ""));
    std::fs::create_dir_all(fleet.state.join("priv")).unwrap();
    for d in [fleet.state.clone(), fleet.state.join("priv")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    fleet.umask = Some(0o000);
    fleet.start_supervisor();
    fleet.wait_healthy("priv", 5, true);
    fleet.wait_next_checkpoint("priv");
    let log = fleet.supervisor_log();
    assert!(
        log.contains("state directory was readable by others: narrowed to 0700"),
        "{log}"
    );
    // Every directory and file under the state directory.
    let mut stack = vec![fleet.state.clone()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        let mode = std::fs::metadata(&d).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{}", d.display());
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else {
                files += 1;
                // Sockets are 0600 too; `srw-------` shows as 0600 here.
                assert_eq!(meta.mode() & 0o7777, 0o600, "{}", path.display());
            }
        }
    }
    assert!(
        files >= 8,
        "only {files} files under {}",
        fleet.state.display()
    );
}

/// A VMM that breaks its seccomp filter ends with the typed `seccomp` exit;
/// the supervisor reports that reason (event and metric) and fails the VM
/// over like any crash, into its standby.
#[test]
fn a_seccomp_violation_is_reported_as_such_and_failed_over() {
    if !require_kvm() {
        return;
    }
    let fleet = up(&["sec"], true);
    let before = fleet.wait_healthy("sec", 10, true);
    let since = fleet.events().len();
    let socket = before["socket"].as_str().unwrap();
    relive_control::ControlClient::connect(Path::new(socket))
        .unwrap()
        .send(&relive_control::Request::InjectFault {
            fault: relive_control::Fault::ForbiddenSyscall,
        })
        .unwrap();
    let (failure, restored) = fleet.wait_failover("sec", since, "seccomp");
    assert_eq!(failure["to"], "restoring-consistency", "{failure}");
    let detail = failure["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("event-loop thread made system call"),
        "{failure}"
    );
    assert_eq!(restored["to"], "running", "{restored}");
    assert_eq!(restored["path"], "standby", "{restored}");
    fleet.metrics().assert_failures("sec", &[("seccomp", 1.0)]);
}

/// A supervisor that takes the connection and never answers (stuck, or
/// overloaded) does not hold the CLI: it gives up after `--timeout`, says
/// so, and exits non-zero. No KVM needed: the "supervisor" is a socket.
#[test]
fn the_cli_gives_up_on_a_supervisor_that_never_answers() {
    let dir = common::temp_dir();
    let socket = dir.join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    // Accept and hold every connection, reading nothing, answering nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let started = Instant::now();
    let mut cmd = Command::new(RELIVE);
    cmd.arg("--api")
        .arg(&socket)
        .args(["--timeout", "1s", "status"])
        .env_remove("RELIVE_API")
        .stdin(Stdio::null());
    let out = run_with_timeout(&mut cmd, STEP);
    let took = started.elapsed();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("did not answer within 1s"),
        "the error must say what happened: {out:?}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "gave up after {took:?}"
    );
    // A zero or malformed timeout is refused before anything is sent.
    let mut cmd = Command::new(RELIVE);
    cmd.arg("--api")
        .arg(&socket)
        .args(["--timeout", "0s", "status"]);
    let out = run_with_timeout(&mut cmd, STEP);
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("more than 0s"), "{out:?}");
}
