//! Fault injection: what a user finds after things go wrong around failover
//! images.
//!
//! - The VMM is killed (SIGKILL) while it writes a checkpoint: the image
//!   directory still offers a good image to restore, never a partial one.
//! - An image is truncated or has a flipped byte: restore refuses it and names
//!   the damaged section; a damaged memory page (which restore does not read
//!   up front) is caught by the store, which falls back to the previous image.
//! - The image directory's file system is full: the checkpoint fails with a
//!   clear error, leaves nothing behind, and the VM keeps running.
//! - An image from a newer relive: restore says to upgrade.
//!
//! Every wait is bounded and every process is owned by a guard (see
//! `tests/common`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers fail a test by panicking

mod common;

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    checkpoint, connect, env_flag, hb_seq, request, require_kvm, run_vmm, status, temp_dir,
    vmm_command, wait_gone, with_umask, ChildGuard, Output, TempDir, Vmm, STEP_TIMEOUT,
};
use relive_control::{CheckpointKind, ErrorKind, Request, Response};
use relive_control::{RunState, VmStatus};
use relive_images::format::{ImageReader, SectionKind, FORMAT_VERSION, HEADER_LEN, PAGE_SIZE};
use relive_images::store::ImageStore;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Polls `status` until `pred` holds; returns that status.
fn wait_status(
    socket: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&VmStatus) -> bool,
) -> VmStatus {
    let deadline = Instant::now() + timeout;
    let mut client = connect(socket);
    loop {
        let status = match client.request(&Request::Status) {
            Response::Status(status) => *status,
            other => panic!("status answered {other:?}"),
        };
        if pred(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {timeout:?}; last status: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the guest said `ready` and sent a heartbeat (its memory
/// touching, done before `ready`, is over).
fn wait_ready(socket: &Path) -> u64 {
    let status = wait_status(socket, STEP_TIMEOUT, "ready guest with a heartbeat", |s| {
        s.agent.ready && s.agent.last_line.as_deref().and_then(hb_seq).is_some()
    });
    status.agent.last_line.as_deref().and_then(hb_seq).unwrap()
}

/// The `seq` of the last heartbeat recorded in an image (its app-status section).
fn image_hb_seq(path: &Path) -> u64 {
    let reader = ImageReader::open(path).unwrap();
    let app: serde_json::Value =
        serde_json::from_slice(reader.section(SectionKind::AppStatus).unwrap()).unwrap();
    app["last_heartbeat"]
        .as_str()
        .and_then(hb_seq)
        .unwrap_or_else(|| panic!("{} recorded no heartbeat: {app}", path.display()))
}

/// A `relive-vmm restore` process, killed and cleaned up on drop.
struct Restored {
    child: ChildGuard,
    socket: PathBuf,
    dir: TempDir,
}

impl Restored {
    fn spawn(image: &Path) -> Restored {
        let (child, socket, dir) = common::spawn_restore(image, None);
        Restored { child, socket, dir }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// Waits for a heartbeat newer than `seq` (the image's); returns its seq.
    fn wait_heartbeat_after(&mut self, seq: u64) -> u64 {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !self.socket.exists() {
            if let Some(status) = self.child.try_wait() {
                panic!("restore exited ({status}): {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "restore did not serve its socket: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = wait_status(&self.socket, STEP_TIMEOUT, "restored heartbeat", |s| {
            s.agent
                .last_line
                .as_deref()
                .and_then(hb_seq)
                .is_some_and(|s| s > seq)
        });
        status.agent.last_line.as_deref().and_then(hb_seq).unwrap()
    }

    fn shutdown(mut self) {
        assert_eq!(request(&self.socket, Request::Shutdown), Response::Ok);
        let status = self
            .child
            .wait_timeout(STEP_TIMEOUT)
            .expect("the restored VMM exits after shutdown");
        assert_eq!(status.code(), Some(3), "{}", self.stderr());
    }
}

/// Copies the first `len` bytes of `src` to a new `dst`, leaving all-zero
/// blocks as holes (images are sparse: a plain copy would write every hole).
fn sparse_copy(src: &Path, dst: &Path, len: u64) {
    const CHUNK: usize = 1 << 16;
    let mut from = File::open(src).unwrap();
    let to = File::create(dst).unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < len {
        let want = (len - at).min(CHUNK as u64) as usize;
        from.read_exact(&mut buf[..want]).unwrap();
        if buf[..want].iter().any(|b| *b != 0) {
            to.write_all_at(&buf[..want], at).unwrap();
        }
        at += want as u64;
    }
    to.set_len(len).unwrap();
}

fn flip(path: &Path, at: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    byte[0] ^= 0x40;
    file.write_all_at(&byte, at).unwrap();
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// The `relive-vmm: error:` lines of a run's stderr.
fn error_lines(out: &Output) -> Vec<&str> {
    out.stderr
        .lines()
        .filter(|l| l.starts_with("relive-vmm: error:"))
        .collect()
}

/// `restore --image image` must exit 1 with exactly one error line that, with
/// the image's path taken out, contains `names`.
fn assert_restore_refused(image: &Path, case: &str, names: &str) -> String {
    let out = run_vmm(["restore".as_ref(), "--image".as_ref(), image.as_os_str()]);
    assert_eq!(out.code, Some(1), "{case}: restore must fail: {out:?}");
    let lines = error_lines(&out);
    assert_eq!(lines.len(), 1, "{case}: one error line: {out:?}");
    assert!(!out.stderr.contains("panicked"), "{case}: {out:?}");
    let text = lines[0].replace(&image.display().to_string(), "IMAGE");
    assert!(
        text.contains(names),
        "{case}: the error must name {names:?}: {}",
        lines[0]
    );
    lines[0].to_string()
}

/// CRC-32C (Castagnoli), bitwise, as FORMAT.md defines the checksums: the
/// test patches a header on its own, without the crate's writer.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------
// 1. SIGKILL while a checkpoint is being written
// ---------------------------------------------------------------------------

/// When the kill lands after the `checkpoint` request was sent.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// A fixed delay.
    Ms(u64),
    /// A fraction of the baseline checkpoint's duration in the same VM, so
    /// that the kill lands inside the write on fast and slow machines alike.
    Fraction(f64),
}

impl KillAt {
    fn delay(self, baseline_total: Duration) -> Duration {
        match self {
            KillAt::Ms(ms) => Duration::from_millis(ms),
            KillAt::Fraction(f) => baseline_total.mul_f64(f),
        }
    }
}

/// What one kill left behind.
#[derive(Debug)]
struct KillOutcome {
    at: KillAt,
    baseline_ms: f64,
    killed_after_ms: f64,
    /// Temporary files (name, length) the dead writer left.
    temps: Vec<(String, u64)>,
    /// Length of the baseline image file: a temporary file this long was
    /// fully written and killed in its commit (fsync, rename).
    full_len: u64,
    /// Committed images besides the baseline.
    newer: usize,
    /// Whether the store picked the baseline (else the newer image).
    picked_baseline: bool,
    restored_seq: u64,
}

impl KillOutcome {
    fn landed(&self) -> String {
        match (self.newer, self.temps.first()) {
            (0, None) => "before the image file was created".into(),
            (0, Some((_, len))) if *len >= self.full_len => {
                "in the commit (temp file complete)".into()
            }
            (0, Some((_, len))) => format!("mid-write (temp file of {} MiB)", len >> 20),
            _ => "after the commit".into(),
        }
    }
}

#[test]
fn kill_during_checkpoint_keeps_the_previous_image() {
    if !require_kvm() {
        return;
    }
    // Fixed short delays catch the pause and state capture; fractions of the
    // measured checkpoint time spread the rest over the memory write and the
    // commit (fsync, rename), and past it (the time varies from run to run).
    let plan = [
        KillAt::Ms(0),
        KillAt::Ms(5),
        KillAt::Ms(20),
        KillAt::Fraction(0.1),
        KillAt::Fraction(0.3),
        KillAt::Fraction(0.5),
        KillAt::Fraction(0.7),
        KillAt::Fraction(0.9),
        KillAt::Fraction(1.5),
        KillAt::Fraction(3.0),
    ];
    let mut outcomes = Vec::with_capacity(plan.len());
    for at in plan {
        outcomes.push(kill_once(at));
    }
    let mut report = String::from(
        "kill during a checkpoint of a 512 MiB guest that touched 256 MiB:\n  \
         kill at            baseline ms  killed after ms  landed                               picked    restored hb\n",
    );
    for o in &outcomes {
        report.push_str(&format!(
            "  {:<18} {:>11.1} {:>16.1}  {:<36} {:<9} seq={}\n",
            match o.at {
                KillAt::Ms(ms) => format!("{ms} ms"),
                KillAt::Fraction(f) => format!("{:.0}% of baseline", f * 100.0),
            },
            o.baseline_ms,
            o.killed_after_ms,
            o.landed(),
            if o.picked_baseline {
                "baseline"
            } else {
                "newer"
            },
            o.restored_seq
        ));
    }
    eprintln!("{report}");
    assert!(
        outcomes.iter().any(|o| o.newer == 0 && !o.temps.is_empty()),
        "no kill landed while the image was being written, so the test proved nothing:\n{report}"
    );
}

fn kill_once(at: KillAt) -> KillOutcome {
    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let mut vmm = Vmm::start(&[
        "--images",
        &images_arg,
        "--mem-mib",
        "512",
        "--cmdline",
        "relive.touch_mib=256",
    ]);
    wait_ready(&vmm.socket);
    let baseline = checkpoint(&vmm.socket, CheckpointKind::Full);
    let baseline_path = PathBuf::from(&baseline.path);
    let baseline_total = Duration::from_micros(baseline.total_us);
    assert!(
        baseline.bytes > 256 << 20,
        "the baseline holds the touched memory: {baseline:?}"
    );
    let delay = at.delay(baseline_total);

    let mut client = connect(&vmm.socket);
    let sent = Instant::now();
    client.send(&Request::Checkpoint {
        kind: CheckpointKind::Full,
    });
    std::thread::sleep(delay.saturating_sub(sent.elapsed()));
    vmm.signal(libc::SIGKILL);
    let killed_after = sent.elapsed();
    wait_gone(&mut vmm);
    drop(client);

    // What the crash left, before the store tidies up.
    let mut temps = Vec::new();
    let mut images_found = Vec::new();
    for entry in std::fs::read_dir(images.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp") {
            temps.push((name, entry.metadata().unwrap().len()));
        } else if name.ends_with(".rimg") {
            images_found.push(entry.path());
        }
    }
    let newer: Vec<&PathBuf> = images_found
        .iter()
        .filter(|p| **p != baseline_path)
        .collect();
    assert!(
        images_found.contains(&baseline_path),
        "the baseline must survive: {images_found:?}"
    );
    assert!(
        newer.len() <= 1,
        "one kill, at most one new image: {newer:?}"
    );

    // Every committed image verifies completely: none is partial.
    for path in &images_found {
        let verified = ImageReader::open(path).and_then(|r| r.verify_memory());
        assert!(
            verified.is_ok(),
            "{} is a committed image but does not verify ({at:?}): {:?}",
            path.display(),
            verified.err()
        );
    }

    let store = ImageStore::open(images.path(), 10).unwrap();
    let left: Vec<String> = std::fs::read_dir(images.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(
        left.is_empty(),
        "opening the store removes the dead writer's temporary file: {left:?}"
    );
    let selection = store.latest_good().unwrap();
    assert!(
        selection.skipped.is_empty(),
        "no image is passed over as bad ({at:?}): {:?}",
        selection.skipped
    );
    let chosen = selection
        .image
        .unwrap_or_else(|| panic!("no good image after the kill ({at:?})"));
    chosen.verify_memory().unwrap();
    let picked_baseline = chosen.path() == baseline_path;
    if !picked_baseline {
        assert_eq!(
            newer.first().map(|p| p.as_path()),
            Some(chosen.path()),
            "the store picks the baseline or the one newer image"
        );
        let base_created = ImageReader::read_header(&baseline_path)
            .unwrap()
            .created_unix_ms;
        assert!(chosen.header().created_unix_ms > base_created);
    }

    let image_seq = image_hb_seq(chosen.path());
    let mut restored = Restored::spawn(chosen.path());
    let restored_seq = restored.wait_heartbeat_after(image_seq);
    restored.shutdown();

    KillOutcome {
        at,
        baseline_ms: baseline_total.as_secs_f64() * 1e3,
        killed_after_ms: killed_after.as_secs_f64() * 1e3,
        temps,
        full_len: file_len(&baseline_path),
        newer: newer.len(),
        picked_baseline,
        restored_seq,
    }
}

// ---------------------------------------------------------------------------
// 2. Truncated and flipped images
// ---------------------------------------------------------------------------

#[test]
fn truncated_and_flipped_images_name_the_section() {
    if !require_kvm() {
        return;
    }
    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let vmm = Vmm::start(&["--images", &images_arg]);
    wait_ready(&vmm.socket);
    let older = checkpoint(&vmm.socket, CheckpointKind::Full);
    let newer = checkpoint(&vmm.socket, CheckpointKind::Full);
    drop(vmm);
    let newer_path = PathBuf::from(&newer.path);
    let older_path = PathBuf::from(&older.path);

    let reader = ImageReader::open(&newer_path).unwrap();
    reader.verify_memory().unwrap();
    let len = reader.file_len();
    // (name, start, length) of the header and of every section in the table.
    let mut parts = vec![("header".to_string(), 0u64, u64::from(HEADER_LEN))];
    for e in &reader.header().sections {
        let kind = e.kind().expect("this build writes only sections it knows");
        parts.push((kind.name().to_string(), e.offset, e.length));
    }
    let names: Vec<&str> = parts.iter().map(|(n, _, _)| n.as_str()).collect();
    for kind in SectionKind::ALL {
        assert!(names.contains(&kind.name()), "{names:?} lacks {kind:?}");
    }
    let memory = reader.memory_map()[0].clone();
    let first_present = memory.present.first().expect("the guest touched memory");
    let present_byte = memory.file_offset + first_present.first_page * PAGE_SIZE + PAGE_SIZE / 2;
    drop(reader);

    let scratch = temp_dir();
    let copy = scratch.join("copy.rimg");
    let mut seen = Vec::new();
    for (name, start, length) in &parts {
        assert!(*length > 0, "{name} is empty");
        let what = if name == "header" {
            "header".to_string()
        } else {
            format!("{name} section")
        };

        // (a) The file ends in the middle of the section.
        sparse_copy(&newer_path, &copy, start + length / 2);
        let case = format!("truncated inside {name}");
        seen.push(assert_restore_refused(&copy, &case, &what));
        std::fs::remove_file(&copy).unwrap();

        // (b) One byte of the section flipped.
        sparse_copy(&newer_path, &copy, len);
        let at = match name.as_str() {
            // The kind field: without the checksum it would read as another kind.
            "header" => 20,
            // A byte of a page the guest wrote (a hole has no checksum).
            "memory" => present_byte,
            _ => start + length / 2,
        };
        assert!(at >= *start && at < start + length);
        flip(&copy, at);
        if name == "memory" {
            // Restore maps memory lazily and does not re-read it by design;
            // the checksum is checked by verify_memory, which the store runs.
            let reader = ImageReader::open(&copy).expect("memory is not read by open");
            let err = reader
                .verify_memory()
                .expect_err("a flipped memory byte fails verify_memory");
            assert_eq!(err.section(), Some(SectionKind::Memory), "{err}");
            assert!(err.to_string().contains("memory section"), "{err}");
            seen.push(format!("verify_memory: {err}"));
        } else {
            let case = format!("byte flipped in {name}");
            seen.push(assert_restore_refused(&copy, &case, &what));
        }
        std::fs::remove_file(&copy).unwrap();
    }

    // The store passes over the image with the damaged page and falls back
    // to the previous one.
    let store_dir = scratch.join("store");
    std::fs::create_dir(&store_dir).unwrap();
    let older_copy = store_dir.join(older_path.file_name().unwrap());
    let newer_copy = store_dir.join(newer_path.file_name().unwrap());
    sparse_copy(&older_path, &older_copy, file_len(&older_path));
    sparse_copy(&newer_path, &newer_copy, len);
    flip(&newer_copy, present_byte);
    let selection = ImageStore::open(&store_dir, 10)
        .unwrap()
        .latest_good()
        .unwrap();
    let chosen = selection.image.expect("the older image is good");
    assert_eq!(chosen.id().to_string(), older.image_id);
    assert_eq!(selection.skipped.len(), 1, "{:?}", selection.skipped);
    let skipped = &selection.skipped[0];
    assert_eq!(skipped.id.map(|i| i.to_string()), Some(newer.image_id));
    assert!(
        skipped.reason.contains("memory section"),
        "the reason names memory: {}",
        skipped.reason
    );
    seen.push(format!("store: {skipped}"));
    eprintln!("errors seen:\n  {}", seen.join("\n  "));
}

// ---------------------------------------------------------------------------
// 3. Full disk
// ---------------------------------------------------------------------------

/// A tmpfs mounted for the test, unmounted on drop (also when the test fails).
struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size` at `path`; `Err` says why it cannot.
    fn mount(path: &Path, size: &str) -> Result<TmpfsMount, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(TmpfsMount {
                path: path.to_path_buf(),
            })
        } else {
            Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let umount = |args: &[&str]| {
            Command::new("umount")
                .args(args)
                .arg(&self.path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(&[]) && !umount(&["-l"]) {
            eprintln!("warning: cannot unmount {}", self.path.display());
        }
    }
}

#[test]
fn full_disk_checkpoint_fails_cleanly_and_the_vm_keeps_running() {
    if !require_kvm() {
        return;
    }
    let scratch = temp_dir();
    let images = scratch.join("images");
    std::fs::create_dir(&images).unwrap();
    let _mount = match TmpfsMount::mount(&images, "2m") {
        Ok(m) => m,
        Err(reason) => {
            assert!(
                !env_flag("RELIVE_REQUIRE_KVM"),
                "{reason}, and RELIVE_REQUIRE_KVM=1 forbids skipping"
            );
            eprintln!(
                "skipping full_disk_checkpoint_fails_cleanly_and_the_vm_keeps_running: {reason}"
            );
            return;
        }
    };
    let images_arg = images.to_str().unwrap().to_string();
    // Declared after the mount, so the VMM is gone before the unmount.
    let vmm = Vmm::start(&[
        "--images",
        &images_arg,
        "--cmdline",
        "relive.hb_ms=20 relive.touch_mib=16",
    ]);
    wait_ready(&vmm.socket);

    let answer = request(
        &vmm.socket,
        Request::Checkpoint {
            kind: CheckpointKind::Full,
        },
    );
    let Response::Error { error, kind } = answer else {
        panic!("a 16 MiB image cannot fit a 2 MiB file system, yet: {answer:?}");
    };
    assert_eq!(
        kind,
        ErrorKind::ImageWrite,
        "a full disk is an image-write error: {error}"
    );
    assert!(
        error.contains("No space left on device"),
        "the error gives the OS's reason: {error}"
    );
    assert!(
        error.contains(&images_arg),
        "the error names the image directory or file: {error}"
    );
    eprintln!("checkpoint on a full disk: {error}");

    // The VM goes on: running, and heartbeats continue after the failure.
    let after_failure = status(&vmm.socket);
    assert_eq!(after_failure.state, RunState::Running);
    let seq = after_failure
        .agent
        .last_line
        .as_deref()
        .and_then(hb_seq)
        .expect("a heartbeat before the checkpoint");
    wait_status(
        &vmm.socket,
        STEP_TIMEOUT,
        "heartbeat after the failure",
        |s| {
            s.agent
                .last_line
                .as_deref()
                .and_then(hb_seq)
                .is_some_and(|s| s > seq + 2)
        },
    );

    // Nothing half-written remains.
    let left: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp") || n.ends_with(".rimg"))
        .collect();
    assert!(left.is_empty(), "partial files left: {left:?}");

    // A second attempt fails as cleanly as the first: the failure left the
    // VMM in no odd state (not stuck paused, no stale writer).
    let again = request(
        &vmm.socket,
        Request::Checkpoint {
            kind: CheckpointKind::Full,
        },
    );
    assert!(
        matches!(&again, Response::Error { error, kind: ErrorKind::ImageWrite } if error.contains("No space left on device")),
        "{again:?}"
    );
    assert_eq!(status(&vmm.socket).state, RunState::Running);
    drop(vmm);
}

// ---------------------------------------------------------------------------
// 4. An image from a newer relive
// ---------------------------------------------------------------------------

#[test]
fn newer_format_version_is_refused() {
    if !require_kvm() {
        return;
    }
    assert_eq!(crc32c(b"123456789"), 0xe306_9283, "FORMAT.md's check value");
    let images = temp_dir();
    let images_arg = images.path().to_str().unwrap().to_string();
    let vmm = Vmm::start(&["--images", &images_arg]);
    wait_ready(&vmm.socket);
    let image = PathBuf::from(checkpoint(&vmm.socket, CheckpointKind::Full).path);
    drop(vmm);

    // format_version is the u32 at offset 8; the header checksum (the last 4
    // of its 4096 bytes) is checked first, so a newer image carries a valid one.
    const OFF_VERSION: usize = 8;
    let header_len = HEADER_LEN as usize;
    let mut header = vec![0u8; header_len];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut header, 0)
        .unwrap();
    let stored = u32::from_le_bytes(header[header_len - 4..].try_into().unwrap());
    header[header_len - 4..].fill(0);
    assert_eq!(
        crc32c(&header),
        stored,
        "the header checksum as FORMAT.md says"
    );
    header[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());

    let scratch = temp_dir();
    // Without a new checksum, the changed version is corruption, not news.
    let bad_sum = scratch.join("bad-sum.rimg");
    sparse_copy(&image, &bad_sum, file_len(&image));
    File::options()
        .write(true)
        .open(&bad_sum)
        .unwrap()
        .write_all_at(&header[..header_len - 4], 0)
        .unwrap();
    let line = assert_restore_refused(&bad_sum, "version patched, old checksum", "corrupt header");
    assert!(!line.contains("upgrade"), "{line}");

    let newer = scratch.join("newer.rimg");
    sparse_copy(&image, &newer, file_len(&image));
    let crc = crc32c(&header);
    header[header_len - 4..].copy_from_slice(&crc.to_le_bytes());
    File::options()
        .write(true)
        .open(&newer)
        .unwrap()
        .write_all_at(&header, 0)
        .unwrap();
    let line = assert_restore_refused(&newer, "newer format version", "upgrade relive");
    assert!(
        line.contains(&format!("format version {}", FORMAT_VERSION + 1)),
        "the error says which version it found: {line}"
    );
    eprintln!("newer image: {line}");
}

// ---------------------------------------------------------------------------
// Confidential state
// ---------------------------------------------------------------------------

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

/// Under umask 000 and 022 alike, the image directory (and the parents the
/// VMM creates), every image and verdict, and the console are owner-only;
/// a layer whose base others can write is refused, naming the base and the
/// fix.
#[test]
fn images_and_consoles_are_owner_only_whatever_the_umask_and_writable_ones_are_refused() {
    if !require_kvm() {
        return;
    }
    for mask in [0o000, 0o022] {
        let dir = temp_dir();
        let images = dir.join("deep/images");
        let socket = dir.join("ctl.sock");
        let console = dir.join("console.log");
        let mut cmd = vmm_command();
        cmd.arg("run")
            .arg("--images")
            .arg(&images)
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(&console)
            .args(["--cmdline", "relive.hb_ms=50"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut vmm = ChildGuard::spawn(with_umask(&mut cmd, mask));
        let full = checkpoint(&socket, CheckpointKind::Full);
        let layer = checkpoint(&socket, CheckpointKind::Incremental);
        // Both verdicts, written by the background verification.
        let verdict = |p: &str| Path::new(p).with_extension("verdict");
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !(verdict(&full.path).exists() && verdict(&layer.path).exists()) {
            assert!(
                Instant::now() < deadline,
                "no verdicts in {}",
                images.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(request(&socket, Request::Shutdown), Response::Ok);
        vmm.wait_timeout(STEP_TIMEOUT).expect("the VMM exits");

        for d in [&images, &dir.join("deep")] {
            assert_eq!(mode_of(d), 0o700, "umask {mask:03o}: {}", d.display());
        }
        let files: Vec<PathBuf> = std::fs::read_dir(&images)
            .unwrap()
            .map(|e| e.unwrap().path())
            .chain([console.clone()])
            .collect();
        assert!(files.len() >= 5, "{files:?}"); // boot image, 2 images, 2 verdicts, console
        for f in &files {
            assert_eq!(mode_of(f), 0o600, "umask {mask:03o}: {}", f.display());
        }

        // The layer's base made group-writable: restoring the layer is refused.
        std::fs::set_permissions(
            &full.path,
            std::os::unix::fs::PermissionsExt::from_mode(0o620),
        )
        .unwrap();
        let out = run_vmm([
            "restore",
            "--image",
            layer.path.as_str(),
            "--control",
            dir.join("restored.sock").to_str().unwrap(),
            "--console",
            dir.join("restored.log").to_str().unwrap(),
        ]);
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert!(
            out.stderr.contains(&full.path)
                && out.stderr.contains("writable by group (mode 0620)")
                && out.stderr.contains(&format!("chmod go-w {}", full.path)),
            "{}",
            out.stderr
        );
        assert!(!dir.join("restored.sock").exists());
    }
}
