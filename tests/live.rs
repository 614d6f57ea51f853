//! Live checkpoints, proven by the guest itself: the bundled guest in
//! working-set mode (`relive.ws_mib`) rewrites its pages as fast as it runs,
//! each write stamped with its sequence number, and keeps the sum of its
//! pages; `verify` recomputes that sum from the pages. A checkpoint taken
//! while it runs, restored after a kill -9, must add up (the image holds one
//! moment), and an image whose pages come from two moments must not (the
//! check can fail: every CRC of such an image is valid).

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers fail a test by panicking

mod common;

use std::path::{Path, PathBuf};

use common::{
    connect, heartbeat, request, require_kvm, run_vmm, spawn_restore, temp_dir, wait_gone,
    Heartbeat, TempDir, Vmm, STEP_TIMEOUT,
};
use relive_control::{CheckpointKind, CheckpointReport, Request, Response};
use relive_images::format::{ImageKind, ImageReader, ImageWriter, SectionKind, PAGE_SIZE};

fn is_memory(kind: SectionKind) -> bool {
    matches!(kind, SectionKind::Memory | SectionKind::MemoryMap)
}

/// The working set the guest rewrites, and its guest memory.
const WS_MIB: u64 = 64;
const MEM_MIB: &str = "256";
/// Where the working set starts (the guest's TOUCH_BASE).
const WS_BASE: u64 = 4 << 20;

fn start_ws_guest(images: &TempDir) -> Vmm {
    Vmm::start(&[
        "--images",
        images.path().to_str().unwrap(),
        "--cmdline",
        &format!("relive.hb_ms=50 relive.ws_mib={WS_MIB}"),
        "--mem-mib",
        MEM_MIB,
    ])
}

/// A checkpoint of a running guest.
fn checkpoint(socket: &Path, kind: CheckpointKind) -> CheckpointReport {
    match request(socket, Request::Checkpoint { kind }) {
        Response::Checkpoint(report) => report,
        other => panic!("checkpoint {kind:?}: {other:?}"),
    }
}

/// The guest's last heartbeat as the image recorded it.
fn image_heartbeat(image: &Path) -> Heartbeat {
    let out = run_vmm(["images", "inspect", image.to_str().unwrap(), "--json"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    heartbeat(v["app_status"]["last_heartbeat"].as_str().unwrap()).unwrap()
}

/// The restored guest's first heartbeat and its answer to `verify`.
fn heartbeat_and_verify(socket: &Path) -> (Heartbeat, String) {
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never served",
            socket.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let mut watch = connect(socket);
    assert_eq!(watch.request(&Request::Watch), Response::Ok);
    let mut first = None;
    let mut asked = false;
    loop {
        match watch.next_response() {
            Some(Response::Agent { line }) => {
                if let Some(hb) = heartbeat(&line) {
                    if first.is_none() {
                        first = Some(hb);
                        assert_eq!(
                            request(
                                socket,
                                Request::Agent {
                                    line: "verify".into()
                                }
                            ),
                            Response::Ok
                        );
                        asked = true;
                    }
                } else if asked && line.starts_with("verify ") {
                    return (first.unwrap(), line);
                }
            }
            Some(other) => panic!("unexpected reply during watch: {other:?}"),
            None => panic!("the VMM closed the watch before answering verify"),
        }
    }
}

/// Restores `image`, and checks that the guest goes on from the image's
/// heartbeat and that its working set adds up.
fn restore_and_verify(image: &Path, what: &str) {
    let before = image_heartbeat(image);
    let (mut child, socket, _dir) = spawn_restore(image, None);
    let (after, verify) = heartbeat_and_verify(&socket);
    assert!(
        after.seq <= before.seq + 20,
        "{what}: the restored guest must go on right from the image's heartbeat {before:?}, got {after:?}"
    );
    before.assert_continued_by(&after, what);
    assert!(
        verify.starts_with("verify ok ") && verify.contains(&format!("pages={}", WS_MIB * 256)),
        "{what}: the guest's working set does not add up after the restore: {verify}"
    );
    assert_eq!(request(&socket, Request::Shutdown), Response::Ok);
    assert_eq!(
        child.wait_timeout(STEP_TIMEOUT).and_then(|s| s.code()),
        Some(3)
    );
}

#[test]
fn live_checkpoints_of_a_guest_rewriting_its_memory_restore_to_one_moment() {
    if !require_kvm() {
        return;
    }
    let images = temp_dir();
    let mut vmm = start_ws_guest(&images);
    // The guest's write sequence number, from its last heartbeat.
    let ws_seq = |socket: &Path| loop {
        let Response::Status(status) = request(socket, Request::Status) else {
            panic!("status failed");
        };
        if let Some(seq) = status
            .agent
            .last_line
            .as_deref()
            .unwrap_or("")
            .split(' ')
            .find_map(|w| w.strip_prefix("ws_seq="))
            .and_then(|n| n.parse::<u64>().ok())
        {
            return seq;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let first = ws_seq(&vmm.socket);
    let full = checkpoint(&vmm.socket, CheckpointKind::Full);
    let layer1 = checkpoint(&vmm.socket, CheckpointKind::Incremental);
    let layer2 = checkpoint(&vmm.socket, CheckpointKind::Incremental);
    let later = ws_seq(&vmm.socket);
    assert!(
        later > first + WS_MIB * 256,
        "the guest rewrote fewer pages ({}) than its working set during the checkpoints",
        later - first
    );
    for (report, kind) in [
        (&full, CheckpointKind::Full),
        (&layer1, CheckpointKind::Incremental),
        (&layer2, CheckpointKind::Incremental),
    ] {
        assert_eq!(report.kind, kind, "{report:?}");
        // Every working-set page was copied while the guest ran (round 0 of
        // the full image; the layers' pages were all dirtied meanwhile).
        assert!(report.copy.rounds >= 1, "{report:?}");
        assert!(report.copy.copied_pages >= WS_MIB * 256, "{report:?}");
        assert!(
            report.pause_us > 0 && report.total_us >= report.pause_us,
            "{report:?}"
        );
    }
    vmm.signal(libc::SIGKILL);
    wait_gone(&mut vmm);
    restore_and_verify(Path::new(&full.path), "the full image");
    restore_and_verify(
        Path::new(&layer2.path),
        "the second layer (through its chain)",
    );
}

/// Writes, with the project's own writer, an image whose state sections are
/// `newer`'s and whose working-set pages alternate between `older`'s and
/// `newer`'s: every checksum is valid, only the content is torn.
fn write_torn(dir: &Path, older: &Path, newer: &Path) -> PathBuf {
    let old = ImageReader::open(older).unwrap();
    let new = ImageReader::open(newer).unwrap();
    let mut w = ImageWriter::create(dir, ImageKind::Full).unwrap();
    for entry in &new.header().sections {
        let Some(kind) = entry.kind().filter(|k| !is_memory(*k)) else {
            continue;
        };
        w.add_section(kind, entry.version, new.section(kind).unwrap())
            .unwrap();
    }
    let regions: Vec<(u64, u64)> = new
        .memory_map()
        .iter()
        .map(|m| (m.guest_addr, m.len))
        .collect();
    w.begin_pages(&regions).unwrap();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut torn = 0;
    for (ri, layout) in new.memory_map().iter().enumerate() {
        let old_layout = &old.memory_map()[ri];
        for run in &layout.present {
            for p in run.first_page..run.first_page + run.count {
                let addr = layout.guest_addr + p * PAGE_SIZE;
                let from_old = addr >= WS_BASE
                    && p % 2 == 0
                    && old_layout
                        .present
                        .iter()
                        .any(|r| r.first_page <= p && p < r.first_page + r.count);
                let (reader, l) = if from_old {
                    torn += 1;
                    (&old, old_layout)
                } else {
                    (&new, layout)
                };
                reader.read_memory(l, p * PAGE_SIZE, &mut page).unwrap();
                w.write_pages(ri, p, &page).unwrap();
            }
        }
    }
    assert!(torn > 0, "no page was taken from the older image");
    w.finish_pages().unwrap();
    w.commit().unwrap().path
}

#[test]
fn a_torn_image_is_caught_by_the_guests_own_sum() {
    if !require_kvm() {
        return;
    }
    let images = temp_dir();
    let mut vmm = start_ws_guest(&images);
    let older = checkpoint(&vmm.socket, CheckpointKind::Full);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let newer = checkpoint(&vmm.socket, CheckpointKind::Full);
    vmm.signal(libc::SIGKILL);
    wait_gone(&mut vmm);

    let dir = temp_dir();
    let torn = write_torn(dir.path(), Path::new(&older.path), Path::new(&newer.path));
    // Every checksum holds: only the guest can tell.
    let out = run_vmm(["images", "verify", dir.path().to_str().unwrap()]);
    assert_eq!(
        out.code,
        Some(0),
        "the torn image must pass every CRC: {out:?}"
    );

    let (mut child, socket, _d) = spawn_restore(&torn, None);
    let (_, verify) = heartbeat_and_verify(&socket);
    assert!(
        verify.starts_with("verify torn "),
        "a torn image must not add up: {verify}"
    );
    assert_eq!(request(&socket, Request::Shutdown), Response::Ok);
    assert_eq!(
        child.wait_timeout(STEP_TIMEOUT).and_then(|s| s.code()),
        Some(3)
    );
    // The newer image itself adds up.
    restore_and_verify(Path::new(&newer.path), "the newer image");
}
