//! Checkpoint, kill -9, restore in a fresh process: the guest continues from
//! exactly the image's state.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers fail a test by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    checkpoint, connect, heartbeat, request, require_kvm, temp_dir, vmm_command, wait_gone,
    ChildGuard, Heartbeat, TempDir, Vmm, STEP_TIMEOUT,
};
use relive_control::{CheckpointKind, ErrorKind, Request, Response};
use relive_images::format::ImageReader;
use relive_images::guest::replay_hash;

/// The first heartbeat a fresh watch connection sees.
fn first_heartbeat(socket: &Path) -> Heartbeat {
    let mut client = connect(socket);
    assert_eq!(client.request(&Request::Watch), Response::Ok);
    next_heartbeat(&mut client)
}

/// The next heartbeat on a watch connection.
fn next_heartbeat(client: &mut common::Client) -> Heartbeat {
    loop {
        match client.next_response() {
            Some(Response::Agent { line }) => {
                if let Some(hb) = heartbeat(&line) {
                    return hb;
                }
            }
            Some(other) => panic!("unexpected reply during watch: {other:?}"),
            None => panic!("the VMM closed the watch before a heartbeat"),
        }
    }
}

fn last_heartbeat(socket: &Path) -> Heartbeat {
    let Response::Status(status) = request(socket, Request::Status) else {
        panic!("status failed");
    };
    heartbeat(status.agent.last_line.as_deref().unwrap_or(""))
        .expect("the last agent line is a heartbeat")
}

#[test]
fn checkpoint_kill_restore_continues_exactly_from_the_image() {
    if !require_kvm() {
        return;
    }
    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let mut vmm = Vmm::start(&[
        "--images",
        &images_arg,
        "--cmdline",
        "relive.hb_ms=20",
        "--mem-mib",
        "256",
    ]);
    // Let it run, then freeze it so the image's state is known exactly.
    first_heartbeat(&vmm.socket);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(request(&vmm.socket, Request::Pause), Response::Ok);
    let before = last_heartbeat(&vmm.socket);
    let Response::Checkpoint(report) = request(
        &vmm.socket,
        Request::Checkpoint {
            kind: Default::default(),
        },
    ) else {
        panic!("checkpoint failed");
    };
    let image = PathBuf::from(&report.path);
    assert!(image.starts_with(images.path()), "{}", report.path);
    assert!(report.bytes > 0 && report.pause_us > 0);
    // Sparse: 256 MiB of guest memory, a few hundred KiB touched.
    let on_disk = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image).unwrap()) * 512;
    assert!(on_disk < 16 << 20, "image uses {on_disk} bytes on disk");

    vmm.signal(libc::SIGKILL);
    wait_gone(&mut vmm);

    let dir = temp_dir();
    let socket = dir.join("ctl.sock");
    let mut restored = ChildGuard::spawn(
        vmm_command()
            .arg("restore")
            .arg("--image")
            .arg(&image)
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(&vmm.console)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let after = first_heartbeat(&socket);
    // The watch may connect a heartbeat or two after the restored guest runs
    // again; what must hold is that it goes on from the image's heartbeat.
    assert!(
        after.seq > before.seq && after.seq <= before.seq + 10,
        "the restored guest must go on from the image's heartbeat {before:?}, got {after:?}"
    );
    assert!(after.counter > before.counter);
    assert_eq!(
        replay_hash(before.counter, before.hash, after.counter),
        after.hash,
        "the hash chain must continue from the image's state"
    );
    // The console is one stream: the guest's banner once, before and after.
    let console = std::fs::read_to_string(&vmm.console).unwrap();
    assert_eq!(console.matches("relive-guest: up").count(), 1, "{console}");

    assert_eq!(request(&socket, Request::Shutdown), Response::Ok);
    let status = restored
        .wait_timeout(STEP_TIMEOUT)
        .expect("restored VMM exits");
    assert_eq!(status.code(), Some(3));
}

fn restore_and_check(image: &Path, console: &Path, before: Heartbeat) {
    let (mut restored, socket, _dir) = common::spawn_restore(image, Some(console));
    let after = first_heartbeat(&socket);
    assert!(
        after.seq <= before.seq + 10,
        "the restored guest must go on right from the image's heartbeat {before:?}, got {after:?}"
    );
    before.assert_continued_by(&after, "the restored guest");
    assert_eq!(request(&socket, Request::Shutdown), Response::Ok);
    let status = restored
        .wait_timeout(STEP_TIMEOUT)
        .expect("restored VMM exits");
    assert_eq!(status.code(), Some(3));
}

#[test]
fn incremental_chain_restores_exactly_through_its_chain_without_merging() {
    if !require_kvm() {
        return;
    }
    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let mut vmm = Vmm::start(&[
        "--images",
        &images_arg,
        "--cmdline",
        "relive.hb_ms=20 relive.touch_mib=8 relive.dirty_pages=2",
    ]);
    first_heartbeat(&vmm.socket);
    let full = checkpoint(&vmm.socket, CheckpointKind::Full);
    assert_eq!(full.kind, CheckpointKind::Full);
    let mut layers = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(60));
        let layer = checkpoint(&vmm.socket, CheckpointKind::Incremental);
        assert_eq!(layer.kind, CheckpointKind::Incremental);
        // A layer holds the dirtied pages, far less than the full image
        // (on disk: a live checkpoint's `bytes` counts pages copied twice).
        let on_disk = |path: &str| {
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap()) * 512
        };
        assert!(
            on_disk(&layer.path) < on_disk(&full.path) / 2,
            "{} vs {} bytes on disk",
            on_disk(&layer.path),
            on_disk(&full.path)
        );
        layers.push(layer);
    }
    // After four layers the VMM merges the chain in the background: the
    // layers are small beside the full image, so into one compacted layer
    // on it. Wait for it to appear.
    let store = relive_images::store::ImageStore::open(images.path(), 10).unwrap();
    let compacted = || {
        store.list().unwrap().iter().any(|e| {
            e.merged_from.is_some()
                && matches!(
                    e.kind,
                    Some(relive_images::format::ImageKind::Incremental { .. })
                )
        })
    };
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !compacted() {
        assert!(
            Instant::now() < deadline,
            "no merged image in {}",
            images.path().display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(request(&vmm.socket, Request::Pause), Response::Ok);
    let before = last_heartbeat(&vmm.socket);
    let last = checkpoint(&vmm.socket, CheckpointKind::Incremental);
    vmm.signal(libc::SIGKILL);
    wait_gone(&mut vmm);
    // The layer is restored by mapping its chain's full image, the
    // compacted layer's pages and each newer layer's over it: nothing is
    // merged (or written) on the way.
    let chain = store.chain(Path::new(&last.path)).unwrap();
    assert!(
        chain
            .iter()
            .any(|p| ImageReader::read_header(p).unwrap().merged_from.is_some()),
        "the chain does not go through the compacted layer: {chain:?}"
    );
    let images_before = store.list().unwrap().len();
    restore_and_check(Path::new(&last.path), &vmm.console, before);
    assert_eq!(
        store.list().unwrap().len(),
        images_before,
        "restoring a layer wrote an image"
    );

    // The image tools see the same: every image good, layers and merged images.
    let verify = common::run_vmm(["images", "verify", &images_arg]);
    assert_eq!(verify.code, Some(0), "{}{}", verify.stdout, verify.stderr);
    assert!(verify.stdout.contains("incremental"), "{}", verify.stdout);
    assert!(verify.stdout.contains(" 0 bad"), "{}", verify.stdout);
    let inspect = common::run_vmm(["images", "inspect", last.path.as_str(), "--json"]);
    assert_eq!(inspect.code, Some(0), "{}", inspect.stderr);
    let value: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(value["memory_verified"], true);
    assert_eq!(
        value["app_status"]["last_heartbeat"]
            .as_str()
            .and_then(heartbeat),
        Some(before)
    );
}

/// Starts `relive-vmm standby` and waits until it answers.
fn start_standby(dir: &TempDir, name: &str, mem_mib: &str) -> (ChildGuard, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let child = ChildGuard::spawn(
        vmm_command()
            .arg("standby")
            .arg("--mem-mib")
            .arg(mem_mib)
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(dir.join(format!("{name}.console")))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let Response::Status(status) = connect(&socket).request(&Request::Status) else {
        panic!("standby status failed");
    };
    assert_eq!(
        serde_json::to_value(status.state).unwrap(),
        serde_json::json!("standby")
    );
    (child, socket)
}

#[test]
fn standby_takes_an_image_and_continues_exactly() {
    if !require_kvm() {
        return;
    }
    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let mut vmm = Vmm::start(&[
        "--images",
        &images_arg,
        "--cmdline",
        "relive.hb_ms=20 relive.touch_mib=4",
    ]);
    let standbys = temp_dir();
    let (mut standby, socket) = start_standby(&standbys, "standby", "128");
    let (mut wrong, wrong_socket) = start_standby(&standbys, "wrong", "256");
    first_heartbeat(&vmm.socket);
    assert_eq!(request(&vmm.socket, Request::Pause), Response::Ok);
    let before = last_heartbeat(&vmm.socket);
    let image = checkpoint(&vmm.socket, CheckpointKind::Full);
    vmm.signal(libc::SIGKILL);

    // A standby of another memory size refuses clearly and stays a standby.
    match request(
        &wrong_socket,
        Request::Restore {
            image: image.path.clone(),
        },
    ) {
        Response::Error { error, kind } => {
            assert_eq!(kind, ErrorKind::ImageRefused, "{error}");
            assert!(
                error.contains("128 MiB") && error.contains("256 MiB"),
                "{error}"
            )
        }
        other => panic!("a 256 MiB standby took a 128 MiB image: {other:?}"),
    }
    let Response::Status(status) = request(&wrong_socket, Request::Status) else {
        panic!("status failed");
    };
    assert_eq!(
        serde_json::to_value(status.state).unwrap(),
        serde_json::json!("standby")
    );

    // Watching from before the restore, the first heartbeat seen is the
    // first the restored guest sends, however slow the host.
    let mut watch = connect(&socket);
    assert_eq!(watch.request(&Request::Watch), Response::Ok);
    let Response::Restored(report) = request(
        &socket,
        Request::Restore {
            image: image.path.clone(),
        },
    ) else {
        panic!("standby restore failed");
    };
    assert_eq!(report.image_id, image.image_id);
    let after = next_heartbeat(&mut watch);
    assert!(
        after.seq > before.seq && after.seq <= before.seq + 2,
        "the standby's guest must go on from the image's heartbeat {before:?}, got {after:?}"
    );
    assert_eq!(
        replay_hash(before.counter, before.hash, after.counter),
        after.hash
    );
    // It is now an ordinary running VM: a second restore is refused.
    assert!(matches!(
        request(
            &socket,
            Request::Restore {
                image: image.path.clone()
            }
        ),
        Response::Error { .. }
    ));
    for (child, socket) in [(&mut standby, &socket), (&mut wrong, &wrong_socket)] {
        assert_eq!(request(socket, Request::Shutdown), Response::Ok);
        assert_eq!(child.wait_timeout(STEP_TIMEOUT).unwrap().code(), Some(3));
    }
}

#[test]
fn restore_reapplies_the_cgroup_limits() {
    limits_hold_through_a_restore(false);
}

/// A jailed VMM has no cgroup filesystem: it applies the limits it knows
/// at start (the command line's, the image's for a restore) before its
/// jail, and they hold the same.
#[test]
fn a_jailed_vmm_applies_its_limits_before_the_jail() {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            !common::env_flag("RELIVE_REQUIRE_KVM"),
            "jails need root, and RELIVE_REQUIRE_KVM=1 forbids skipping"
        );
        eprintln!("skipping a_jailed_vmm_applies_its_limits_before_the_jail: not root");
        return;
    }
    limits_hold_through_a_restore(true);
}

/// The VMM's host pid as it reports it (a jailed one is the child of the
/// process that waits for it).
fn reported_pid(socket: &Path) -> u32 {
    let Response::Status(status) = request(socket, Request::Status) else {
        panic!("status failed");
    };
    status.pid
}

fn limits_hold_through_a_restore(jail: bool) {
    if !require_kvm() {
        return;
    }
    let jail_args: &[&str] = if jail {
        &["--jail", "65534:65534"]
    } else {
        &[]
    };
    if !Path::new("/sys/fs/cgroup/pids").exists()
        && !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    {
        assert!(
            !common::env_flag("RELIVE_REQUIRE_KVM"),
            "no cgroup hierarchy to test limits with"
        );
        eprintln!("skipping restore_reapplies_the_cgroup_limits: no cgroup hierarchy");
        return;
    }
    let name = format!("test-limits-{}-{jail}", std::process::id());
    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let mut args = vec![
        "--images",
        &images_arg,
        "--name",
        &name,
        "--cpu-percent",
        "50",
        "--memory-limit-mib",
        "512",
        "--pids-max",
        "64",
    ];
    args.extend(jail_args);
    let mut vmm = Vmm::start(&args);
    let wanted = relive_control::ResourceLimits {
        cpu_percent: Some(50),
        memory_bytes: Some(512 << 20),
        pids: Some(64),
    };
    let pid = reported_pid(&vmm.socket);
    assert_eq!(pid == vmm.pid(), !jail);
    assert_eq!(relive_vmm::cgroup::read_limits(pid).unwrap(), wanted);
    first_heartbeat(&vmm.socket);
    let image = checkpoint(&vmm.socket, CheckpointKind::Full);
    vmm.signal(libc::SIGKILL);
    wait_gone(&mut vmm);

    let dir = temp_dir();
    let socket = dir.join("ctl.sock");
    let mut restored = ChildGuard::spawn(
        vmm_command()
            .arg("restore")
            .arg("--image")
            .arg(&image.path)
            .args(["--images", &images_arg])
            .args(jail_args)
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(dir.join("console.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    first_heartbeat(&socket);
    // Read back from the cgroup files, not from what the VMM says.
    let pid = reported_pid(&socket);
    assert_eq!(relive_vmm::cgroup::read_limits(pid).unwrap(), wanted);
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroups.contains(&format!("relive/{name}")), "{cgroups}");
    let Response::Status(status) = request(&socket, Request::Status) else {
        panic!("status failed");
    };
    assert_eq!(status.limits, wanted);
    assert_eq!(request(&socket, Request::Shutdown), Response::Ok);
    assert_eq!(restored.wait_timeout(STEP_TIMEOUT).unwrap().code(), Some(3));
    // Leave no empty test cgroups behind.
    for line in cgroups.lines() {
        if let Some(path) = line.rsplit(':').next().filter(|p| p.ends_with(&name)) {
            for hierarchy in ["cpu", "memory", "pids"] {
                let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{hierarchy}{path}"));
            }
        }
    }
}

/// Runs a VM with `--boot-image MODE`, waits for its boot image and for
/// heartbeat `seq_at_least`, kills it, and restores the boot image.
fn boot_image_restart(mode: &str) -> (Heartbeat, Heartbeat, String, u64) {
    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let mut vmm = Vmm::start(&[
        "--images",
        &images_arg,
        "--boot-image",
        mode,
        "--cmdline",
        "relive.hb_ms=20",
    ]);
    let deadline = Instant::now() + STEP_TIMEOUT;
    let boot_image = loop {
        let Response::Status(status) = request(&vmm.socket, Request::Status) else {
            panic!("status failed");
        };
        if let Some(path) = status.boot_image {
            break path;
        }
        assert!(Instant::now() < deadline, "no boot image was written");
        std::thread::sleep(Duration::from_millis(10));
    };
    // Run well past the boot before the failure.
    let mut before = first_heartbeat(&vmm.socket);
    while before.seq < 20 {
        assert!(Instant::now() < deadline, "the guest stopped heartbeating");
        std::thread::sleep(Duration::from_millis(20));
        before = last_heartbeat(&vmm.socket);
    }
    vmm.signal(libc::SIGKILL);
    while vmm.is_running() {
        assert!(Instant::now() < deadline, "the VMM survived SIGKILL");
        std::thread::sleep(Duration::from_millis(5));
    }
    let dir = temp_dir();
    let socket = dir.join("ctl.sock");
    let console = dir.join("console.log");
    let mut restored = ChildGuard::spawn(
        vmm_command()
            .arg("restore")
            .arg("--image")
            .arg(&boot_image)
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(&console)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let after = first_heartbeat(&socket);
    assert_eq!(request(&socket, Request::Shutdown), Response::Ok);
    assert_eq!(restored.wait_timeout(STEP_TIMEOUT).unwrap().code(), Some(3));
    // The guest's last heartbeat when the boot image was taken (0: none yet).
    let inspect = common::run_vmm(["images", "inspect", boot_image.as_str(), "--json"]);
    let value: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap_or_default();
    let at_image = value["app_status"]["last_heartbeat"]
        .as_str()
        .and_then(heartbeat)
        .map_or(0, |hb| hb.seq);
    (
        before,
        after,
        std::fs::read_to_string(console).unwrap_or_default(),
        at_image,
    )
}

#[test]
fn warm_boot_image_restarts_from_the_ready_state() {
    if !require_kvm() {
        return;
    }
    let (before, after, console, at_image) = boot_image_restart("warm");
    // A clean start: the sequence starts again, far below where the VM was
    // and right after where the live snapshot taken at `ready` stopped it
    // (a few beats after `ready` on a slow host), and the hash chain runs
    // from the workload's initial state.
    assert!(
        after.seq < before.seq && after.seq <= at_image + 10,
        "{before:?} -> {after:?} (the boot image holds seq {at_image})"
    );
    assert_eq!(
        replay_hash(0, relive_images::guest::HASH_INIT, after.counter),
        after.hash
    );
    // No boot happened: the warm image skips it, so no banner is printed again.
    assert!(!console.contains("relive-guest: up"), "{console}");
}

#[test]
fn boot_recipe_boots_afresh() {
    if !require_kvm() {
        return;
    }
    let (before, after, console, _) = boot_image_restart("recipe");
    assert!(
        after.seq < before.seq && after.seq <= 10,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        replay_hash(0, relive_images::guest::HASH_INIT, after.counter),
        after.hash
    );
    // A real boot with the recorded command line.
    assert!(console.contains("relive-guest: up, hb_ms=20"), "{console}");
}

#[test]
fn restore_refuses_a_corrupt_image_naming_the_section() {
    if !require_kvm() {
        return;
    }
    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let vmm = Vmm::start(&["--images", &images_arg]);
    first_heartbeat(&vmm.socket);
    let Response::Checkpoint(report) = request(
        &vmm.socket,
        Request::Checkpoint {
            kind: Default::default(),
        },
    ) else {
        panic!("checkpoint failed");
    };
    drop(vmm);
    // Flip one byte in the middle of the VM state section.
    let reader = relive_images::format::ImageReader::open(Path::new(&report.path)).unwrap();
    let entry = *reader
        .header()
        .section(relive_images::format::SectionKind::VmState)
        .expect("a VM state section");
    drop(reader);
    let mut bytes = std::fs::read(&report.path).unwrap();
    bytes[(entry.offset + entry.length / 2) as usize] ^= 0x40;
    std::fs::write(&report.path, &bytes).unwrap();

    let out = common::run_vmm(["restore", "--image", report.path.as_str()]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("relive-vmm: error:"), "{}", out.stderr);
    assert!(
        out.stderr.contains("vm-state section"),
        "the error names the section: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}
