//! Checkpoint and restore benchmark of `relive-vmm`: how long a full
//! checkpoint stops the guest, and how fast a fresh VMM process restored from
//! an image runs the guest again, for small and large guests.
//!
//! ```text
//! cargo build --release --workspace && cargo bench --bench restore
//! ```
//!
//! It drives the real binary, `target/release/relive-vmm` (found next to this
//! bench's own executable), and is not a timed test: it prints figures, with
//! the project's targets beside them, and exits 0 whether or not they are met.
//! Where `/dev/kvm` cannot be used it prints why and exits 0 (1 when
//! `RELIVE_REQUIRE_KVM=1`).
//!
//! For each guest memory size (128 MiB, 512 MiB, 2048 MiB; the guest writes
//! 16 MiB at start, `relive.touch_mib=16 relive.hb_ms=1`), with N runs
//! (`RELIVE_BENCH_RUNS`, default 20):
//! 1. *Checkpoints*: start `relive-vmm run --images DIR`, wait for `ready`,
//!    then N times `checkpoint` (full) on the control socket; record the
//!    VMM's own `pause_us` (vCPUs stopped), `total_us` and `bytes`. Only the
//!    last image is kept; the source VM is shut down before restores start,
//!    so that it does not compete for the host's cores.
//! 2. *Restores* (one discarded warm-up, then N): read CLOCK_MONOTONIC
//!    (`relive_vmm::vm::monotonic_ns`, the clock the VMM stamps with), spawn
//!    `relive-vmm restore --image IMG --control SOCK`, connect to the socket
//!    as soon as it exists (it is bound before the vCPUs start; requests are
//!    read once they run) and at once send `watch`:
//!    - *restore -> vCPUs running* = `vcpus_started_monotonic_ns` (from a
//!      `status` after the first heartbeat) - spawn time: exact, stamped by
//!      the VMM itself just before it starts the vCPU threads.
//!    - *restore -> first heartbeat*: an upper bound, per run, on when the
//!      VMM received the restored guest's first agent line (which must be an
//!      `hb` with a `seq` beyond the image's last heartbeat). The VMM stamps
//!      no time on agent lines, and polling `status` is no substitute: on a
//!      restored VM each `status` holds the VMM's event thread for ~10 ms per
//!      GiB of guest (mincore over the file mapping), which would delay the
//!      very line it waits for. So the bench relies on the watch, whose lines
//!      leave the event thread in the order it handles them:
//!      - if the watch saw the VMM's *first* line (checked afterwards: a
//!        `status` reports `agent.lines = L` and `last_line`; the bench reads
//!        the watch up to `last_line` and must have seen exactly L lines),
//!        the bound is when the bench read that line: tight, the watch's
//!        delivery takes tens of µs (*exact* runs);
//!      - else the first line was handled before the watch was registered,
//!        so before the bench read the watch's `ok`: that is the bound
//!        (the watch registers within a millisecond or so of the vCPUs
//!        starting, and races the guest's first beat).
//!
//!      A median of per-run upper bounds bounds the true median from above.
//!
//!    Each restored VM is then shut down and reaped. The image is in the page
//!    cache (it was just written): "cold" means a fresh process, not a cold
//!    disk.
//!
//! Output: a table, the 2 GiB / 128 MiB ratio of the restore medians, the
//! targets with a verdict each, and one final line `BENCH restore {json}`.
//!
//! Rows: each row of the table is a [`Row`], built by one function per kind
//! of measurement ([`full_checkpoint_and_cold_restore`] today). An
//! incremental-checkpoint row or a standby-restore row is another such
//! function that returns a `Row` (with [`CheckpointFigures`] and/or
//! [`RestoreFigures`]); the table and the JSON line take any rows.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use relive_control::{
    error_chain, CheckpointKind, ClientError, ControlClient, ExitReason, Request, Response,
    VmStatus, WatchEvent,
};
use relive_images::format::{ImageReader, SectionKind};
use relive_testkit::bins::{beside_exe, newer_source_than};
use relive_testkit::{env_count, host_note, kvm_usable, ns_to_ms, tail, verdict, Summary, TempDir};
use relive_vmm::vm::monotonic_ns;

/// Errors of a bench are reported as text.
type Result<T> = std::result::Result<T, String>;

/// Runs when `RELIVE_BENCH_RUNS` is not set.
const DEFAULT_RUNS: usize = 20;
/// Guest memory sizes, MiB.
const SIZES_MIB: [u64; 3] = [128, 512, 2048];
/// What the guest does: writes 16 MiB at start, a heartbeat every 1 ms.
const CMDLINE: &str = "relive.touch_mib=16 relive.hb_ms=1";
/// Target: median restore -> vCPUs running.
const RESTORE_TARGET_MS: f64 = 8.0;
/// Target: restore(2 GiB) / restore(128 MiB), vCPUs-running medians.
const RATIO_TARGET: f64 = 1.2;
/// Target: median full checkpoint (total) of a guest that touched 16 MiB.
const CHECKPOINT_TARGET_MS: f64 = 20.0;
/// Target: standby restore, `ctl restore` to vCPUs running.
const STANDBY_TARGET_MS: f64 = 1.0;
/// Target: incremental checkpoint pause at ~1% dirty.
const INCREMENTAL_PAUSE_TARGET_MS: f64 = 1.0;
/// Longest wait for `ready` or for a restored heartbeat.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for a VMM to exit after `shutdown`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two attempts to connect to a starting VMM's socket.
const POLL_INTERVAL: Duration = Duration::from_micros(100);
/// Longest wait for one answer on the control socket (a checkpoint of a big
/// guest on a slow disk included).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Guest time between two checkpoints.
const BETWEEN_CHECKPOINTS: Duration = Duration::from_millis(20);

const MIB: f64 = (1u64 << 20) as f64;

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("restore bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    if let Err(reason) = kvm_usable() {
        if std::env::var("RELIVE_REQUIRE_KVM").as_deref() == Ok("1") {
            return Err(format!("{reason} (and RELIVE_REQUIRE_KVM=1)"));
        }
        println!("restore bench: skipped: {reason}");
        return Ok(());
    }
    let vmm = beside_exe("relive-vmm")?;
    let runs = env_count("RELIVE_BENCH_RUNS", DEFAULT_RUNS)?;
    if let Some(newer) = newer_source_than(&vmm) {
        eprintln!(
            "restore bench: warning: {} is newer than {}: figures are for an old build; \
             run `cargo build --release --workspace` first",
            newer.display(),
            vmm.display()
        );
    }
    let scratch = TempDir::create("relive-bench-restore")
        .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    println!("relive-vmm checkpoint/restore benchmark");
    println!("  binary  {}", vmm.display());
    println!("  guest   bundled, cmdline {CMDLINE:?}, 1 vCPU");
    println!("  runs    {runs} per figure (RELIVE_BENCH_RUNS to change); restores after 1 warm-up");
    println!(
        "  images  {} ({})",
        scratch.path().display(),
        fs_note(scratch.path())
    );
    println!("  host    {}", host_note());

    let mut rows = Vec::new();
    for mem_mib in SIZES_MIB {
        let dir = scratch.join(format!("{mem_mib}mib"));
        let (row, image) = full_checkpoint_and_cold_restore(&vmm, &dir, mem_mib, runs)
            .map_err(|e| format!("{mem_mib} MiB: {e}"))?;
        rows.push(row);
        rows.push(
            standby_restores(
                &vmm,
                &dir.join("standby"),
                mem_mib,
                &image,
                runs,
                Confinement::Seccomp,
            )
            .map_err(|e| format!("{mem_mib} MiB standby: {e}"))?,
        );
        rows.push(
            incremental_checkpoints(&vmm, &dir.join("incremental"), mem_mib, runs)
                .map_err(|e| format!("{mem_mib} MiB incremental: {e}"))?,
        );
        if mem_mib == SIZES_MIB[0] {
            // The cost of the confinement: the same restores without seccomp,
            // and jailed (as root only), in the same run.
            let mut kinds = vec![Confinement::NoSeccomp];
            if is_root() {
                kinds.push(Confinement::Jail);
            } else {
                println!("  note    not root: the jailed rows are left out");
            }
            for confinement in kinds {
                let tag = confinement.tag();
                if confinement == Confinement::Jail {
                    rows.push(
                        jailed_checkpoints(&vmm, &dir.join("jailed-source"), mem_mib, runs)
                            .map_err(|e| format!("{mem_mib} MiB jailed checkpoints: {e}"))?,
                    );
                }
                rows.push(Row {
                    mem_mib,
                    mode: confinement.label("full/cold"),
                    checkpoint: None,
                    restore: Some(
                        measure_cold_restores(&vmm, &dir.join(tag), &image, runs, confinement)
                            .map_err(|e| format!("{mem_mib} MiB cold, {tag}: {e}"))?,
                    ),
                });
                rows.push(
                    standby_restores(
                        &vmm,
                        &dir.join(format!("standby-{tag}")),
                        mem_mib,
                        &image,
                        runs,
                        confinement,
                    )
                    .map_err(|e| format!("{mem_mib} MiB standby, {tag}: {e}"))?,
                );
            }
        }
    }
    report(runs, &rows);
    Ok(())
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// One row of the table: one guest size, one way of checkpointing and
/// restoring. Either half may be absent for a row that measures only one.
struct Row {
    mem_mib: u64,
    /// e.g. `full/cold`.
    mode: &'static str,
    checkpoint: Option<CheckpointFigures>,
    restore: Option<RestoreFigures>,
}

/// N checkpoints, as the VMM reported them.
struct CheckpointFigures {
    pause_ms: Vec<f64>,
    total_ms: Vec<f64>,
    bytes: Vec<f64>,
}

/// N restores.
struct RestoreFigures {
    /// Spawn -> `vcpus_started_monotonic_ns`.
    vcpus_ms: Vec<f64>,
    /// Spawn -> an upper bound on the VMM's receipt of the first heartbeat.
    first_hb_ms: Vec<f64>,
    /// Runs whose bound is the watched first line itself (the others are
    /// bounded by the watch's registration).
    first_hb_exact: usize,
}

/// Full checkpoints of a running guest, then cold restores of the last image.
fn full_checkpoint_and_cold_restore(
    vmm: &Path,
    dir: &Path,
    mem_mib: u64,
    runs: usize,
) -> Result<(Row, PathBuf)> {
    let mut source = start_source(vmm, dir, mem_mib, &[])?;
    let (checkpoint, image) = measure_checkpoints(&mut source, CheckpointKind::Full, runs)?;
    source.shutdown()?;
    let restore = measure_cold_restores(
        vmm,
        &dir.join("restore"),
        &image,
        runs,
        Confinement::Seccomp,
    )?;
    Ok((
        Row {
            mem_mib,
            mode: "full/cold",
            checkpoint: Some(checkpoint),
            restore: Some(restore),
        },
        image,
    ))
}

/// One discarded, then `runs` standby restores of `image`: each into a fresh
/// `relive-vmm standby` (started and serving before the clock starts); the
/// figure is the VMM's own `restore_us`, from the `restore` request reaching
/// it to the vCPUs running again.
fn standby_restores(
    vmm: &Path,
    dir: &Path,
    mem_mib: u64,
    image: &Path,
    runs: usize,
    confinement: Confinement,
) -> Result<Row> {
    let mut vcpus_ms = Vec::with_capacity(runs);
    let mem = mem_mib.to_string();
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["standby".as_ref(), "--mem-mib".as_ref(), mem.as_ref()];
    args.extend(confinement.args(image));
    for i in 0..=runs {
        let mut standby =
            Running::start(vmm, &dir.join(format!("run-{i}")), &args, monotonic_ns())?;
        let report = match standby.client.request(&Request::Restore {
            image: image.display().to_string(),
        }) {
            Ok(Response::Restored(r)) => r,
            Ok(other) => return Err(standby.failed(format!("restore answered {other:?}"))),
            Err(e) => return Err(standby.failed(format!("restore: {e}"))),
        };
        standby.shutdown()?;
        if i > 0 {
            vcpus_ms.push(report.restore_us as f64 / 1e3);
        }
    }
    Ok(Row {
        mem_mib,
        mode: confinement.label("standby"),
        checkpoint: None,
        restore: Some(RestoreFigures {
            vcpus_ms,
            first_hb_ms: Vec::new(),
            first_hb_exact: 0,
        }),
    })
}

/// Incremental checkpoints of a guest that rewrites about 1% of its memory
/// between two checkpoints (`relive.dirty_pages` per 1 ms heartbeat, with
/// [`BETWEEN_CHECKPOINTS`] between checkpoints), after one full image.
fn incremental_checkpoints(vmm: &Path, dir: &Path, mem_mib: u64, runs: usize) -> Result<Row> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images)
        .map_err(|e| format!("cannot create {}: {e}", images.display()))?;
    let pages = mem_mib * 256;
    let beats = BETWEEN_CHECKPOINTS.as_millis().max(1) as u64;
    // The guest rewrites pages within the 16 MiB it touched (4096 pages).
    let per_beat = (pages / 100 / beats).clamp(1, 4096 / beats);
    let cmdline = format!("{CMDLINE} relive.dirty_pages={per_beat}");
    let mut vm = Running::start(
        vmm,
        &dir.join("vm"),
        &[
            "run".as_ref(),
            "--mem-mib".as_ref(),
            mem_mib.to_string().as_ref(),
            "--cmdline".as_ref(),
            cmdline.as_ref(),
            "--images".as_ref(),
            images.as_os_str(),
        ],
        monotonic_ns(),
    )?;
    vm.wait_ready()?;
    match vm.client.request(&Request::Checkpoint {
        kind: CheckpointKind::Full,
    }) {
        Ok(Response::Checkpoint(_)) => {}
        other => return Err(vm.failed(format!("the base checkpoint answered {other:?}"))),
    }
    let mut figures = CheckpointFigures {
        pause_ms: Vec::with_capacity(runs),
        total_ms: Vec::with_capacity(runs),
        bytes: Vec::with_capacity(runs),
    };
    for i in 0..runs {
        std::thread::sleep(BETWEEN_CHECKPOINTS);
        match vm.client.request(&Request::Checkpoint {
            kind: CheckpointKind::Incremental,
        }) {
            Ok(Response::Checkpoint(r)) if r.kind == CheckpointKind::Incremental => {
                figures.pause_ms.push(r.pause_us as f64 / 1e3);
                figures.total_ms.push(r.total_us as f64 / 1e3);
                figures.bytes.push(r.bytes as f64);
            }
            other => {
                return Err(vm.failed(format!("incremental checkpoint {i} answered {other:?}")))
            }
        }
    }
    vm.shutdown()?;
    Ok(Row {
        mem_mib,
        mode: "incr ~1%",
        checkpoint: Some(figures),
        restore: None,
    })
}

/// `runs` checkpoints of `kind` of a running VM; returns the figures and the
/// last image (earlier ones are deleted as the next one is written).
fn measure_checkpoints(
    vm: &mut Running,
    kind: CheckpointKind,
    runs: usize,
) -> Result<(CheckpointFigures, PathBuf)> {
    let mut figures = CheckpointFigures {
        pause_ms: Vec::with_capacity(runs),
        total_ms: Vec::with_capacity(runs),
        bytes: Vec::with_capacity(runs),
    };
    let mut last: Option<PathBuf> = None;
    for i in 0..runs {
        std::thread::sleep(BETWEEN_CHECKPOINTS);
        let report = match vm.client.request(&Request::Checkpoint { kind }) {
            Ok(Response::Checkpoint(r)) => r,
            Ok(other) => return Err(vm.failed(format!("checkpoint {i} answered {other:?}"))),
            Err(e) => return Err(vm.failed(format!("checkpoint {i}: {e}"))),
        };
        figures.pause_ms.push(report.pause_us as f64 / 1e3);
        figures.total_ms.push(report.total_us as f64 / 1e3);
        figures.bytes.push(report.bytes as f64);
        if let Some(old) = last.replace(PathBuf::from(&report.path)) {
            let _ = std::fs::remove_file(old);
        }
    }
    let image = last.ok_or("no checkpoint was taken")?;
    Ok((figures, image))
}

/// One discarded, then `runs` measured restores of `image` into fresh processes.
fn measure_cold_restores(
    vmm: &Path,
    dir: &Path,
    image: &Path,
    runs: usize,
    confinement: Confinement,
) -> Result<RestoreFigures> {
    let image_seq = image_heartbeat_seq(image)?;
    let mut figures = RestoreFigures {
        vcpus_ms: Vec::with_capacity(runs),
        first_hb_ms: Vec::with_capacity(runs),
        first_hb_exact: 0,
    };
    for i in 0..=runs {
        let spawn_ns = monotonic_ns();
        let mut vm = Running::start(
            vmm,
            &dir.join(format!("run-{i}")),
            &restore_args(image, confinement),
            spawn_ns,
        )?;
        let first = vm.first_heartbeat(image_seq)?;
        vm.shutdown()?;
        if i == 0 {
            continue; // warm-up
        }
        figures
            .vcpus_ms
            .push(ns_to_ms(first.vcpus_started_ns.saturating_sub(spawn_ns)));
        figures
            .first_hb_ms
            .push(ns_to_ms(first.first_hb_by_ns.saturating_sub(spawn_ns)));
        figures.first_hb_exact += usize::from(first.exact);
    }
    Ok(figures)
}

/// `restore --image IMAGE` with the confinement's arguments.
fn restore_args(image: &Path, confinement: Confinement) -> Vec<&std::ffi::OsStr> {
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["restore".as_ref(), "--image".as_ref(), image.as_os_str()];
    args.extend(confinement.args(image));
    args
}

/// How a measured VMM is confined.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Confinement {
    /// The default: seccomp filters on every thread.
    Seccomp,
    /// `--no-seccomp`.
    NoSeccomp,
    /// Seccomp and `--jail 65534:65534`, with the image's directory as
    /// `--images` (handed to the jail's uid, as the supervisor's VMMs have
    /// it): what a supervisor running as root starts.
    Jail,
}

impl Confinement {
    fn args(self, image: &Path) -> Vec<&std::ffi::OsStr> {
        match self {
            Confinement::Seccomp => Vec::new(),
            Confinement::NoSeccomp => vec!["--no-seccomp".as_ref()],
            Confinement::Jail => vec![
                "--jail".as_ref(),
                JAIL_IDS.as_ref(),
                "--images".as_ref(),
                image.parent().unwrap_or(Path::new("/")).as_os_str(),
            ],
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Confinement::Seccomp => "seccomp",
            Confinement::NoSeccomp => "no-seccomp",
            Confinement::Jail => "jailed",
        }
    }

    /// `mode`, with the confinement named unless it is the default.
    fn label(self, mode: &'static str) -> &'static str {
        match (self, mode) {
            (Confinement::Seccomp, mode) => mode,
            (Confinement::NoSeccomp, "standby") => "standby, no seccomp",
            (Confinement::NoSeccomp, _) => "full/cold, no seccomp",
            (Confinement::Jail, "standby") => "standby, jailed",
            (Confinement::Jail, _) => "full/cold, jailed",
        }
    }
}

/// The jail's account in the jailed rows.
const JAIL_IDS: &str = "65534:65534";

fn is_root() -> bool {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A VM of `mem_mib` writing into `dir/images`, started with `extra`
/// arguments and ready.
fn start_source(
    vmm: &Path,
    dir: &Path,
    mem_mib: u64,
    extra: &[&std::ffi::OsStr],
) -> Result<Running> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images)
        .map_err(|e| format!("cannot create {}: {e}", images.display()))?;
    let mem = mem_mib.to_string();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "run".as_ref(),
        "--mem-mib".as_ref(),
        mem.as_ref(),
        "--cmdline".as_ref(),
        CMDLINE.as_ref(),
        "--images".as_ref(),
        images.as_os_str(),
    ];
    args.extend(extra);
    let mut source = Running::start(vmm, &dir.join("source"), &args, monotonic_ns())?;
    source.wait_ready()?;
    Ok(source)
}

/// Full checkpoints of a jailed VM: the pause and total a jail leaves.
fn jailed_checkpoints(vmm: &Path, dir: &Path, mem_mib: u64, runs: usize) -> Result<Row> {
    let mut source = start_source(vmm, dir, mem_mib, &["--jail".as_ref(), JAIL_IDS.as_ref()])?;
    let (checkpoint, _) = measure_checkpoints(&mut source, CheckpointKind::Full, runs)?;
    source.shutdown()?;
    Ok(Row {
        mem_mib,
        mode: "full, jailed",
        checkpoint: Some(checkpoint),
        restore: None,
    })
}

/// The `seq` of the last heartbeat recorded in an image's app-status section.
fn image_heartbeat_seq(image: &Path) -> Result<u64> {
    let reader = ImageReader::open(image).map_err(|e| error_chain(&e))?;
    let app = reader
        .section(SectionKind::AppStatus)
        .ok_or_else(|| format!("{} has no app-status section", image.display()))?;
    let app: serde_json::Value =
        serde_json::from_slice(app).map_err(|e| format!("{}: app-status: {e}", image.display()))?;
    app["last_heartbeat"]
        .as_str()
        .and_then(relive_control::Heartbeat::parse)
        .map(|hb| hb.seq)
        .ok_or_else(|| format!("{} recorded no heartbeat: {app}", image.display()))
}

/// When a restored VM's vCPUs started and its first heartbeat arrived.
struct FirstHeartbeat {
    vcpus_started_ns: u64,
    /// The VMM had received the guest's first agent line by this time.
    first_hb_by_ns: u64,
    /// Whether that is when the bench read the line itself from the watch
    /// (else: when it read the watch's `ok`, the line having come before).
    exact: bool,
}

/// A client of `socket` whose answers have a deadline (a VMM that stops
/// answering fails the bench instead of hanging it).
fn connect(socket: &Path) -> std::result::Result<ControlClient, ClientError> {
    ControlClient::connect(socket).map(|c| c.with_timeout(Some(REPLY_TIMEOUT)))
}

/// A VMM process with its control socket, killed and reaped on drop.
struct Running {
    child: Child,
    client: ControlClient,
    socket: PathBuf,
    dir: PathBuf,
}

impl Running {
    /// Spawns `relive-vmm ARGS --control DIR/ctl.sock --console DIR/console.log`
    /// (stderr to DIR/stderr.log) and connects to its socket.
    fn start(vmm: &Path, dir: &Path, args: &[&std::ffi::OsStr], spawn_ns: u64) -> Result<Running> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let socket = dir.join("ctl.sock");
        let stderr = File::create(dir.join("stderr.log"))
            .map_err(|e| format!("cannot create {}/stderr.log: {e}", dir.display()))?;
        let mut cmd = Command::new(vmm);
        cmd.args(args)
            .arg("--control")
            .arg(&socket)
            .arg("--console")
            .arg(dir.join("console.log"))
            .env_remove("RELIVE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", vmm.display()))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = loop {
            if let Ok(client) = connect(&socket) {
                break client;
            }
            let early = child.try_wait().ok().flatten();
            if early.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the VMM did not serve its control socket ({}) {} ms after spawn\n  stderr:\n{}",
                    early.map_or("still running".to_string(), |s| s.to_string()),
                    ns_to_ms(monotonic_ns().saturating_sub(spawn_ns)),
                    tail(&dir.join("stderr.log"))
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        };
        Ok(Running {
            child,
            client,
            socket,
            dir: dir.to_path_buf(),
        })
    }

    /// An error message with the VMM's stderr and console; kills the VMM.
    fn failed(&mut self, what: String) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!(
            "{what}\n  VMM stderr:\n{}\n  console:\n{}",
            tail(&self.dir.join("stderr.log")),
            tail(&self.dir.join("console.log"))
        )
    }

    fn status(&mut self) -> Result<VmStatus> {
        match self.client.request(&Request::Status) {
            Ok(Response::Status(status)) => Ok(*status),
            Ok(other) => Err(self.failed(format!("status answered {other:?}"))),
            Err(e) => Err(self.failed(format!("status: {e}"))),
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.status()?.agent.ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.failed(format!("no ready within {READY_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Watches a just-started, restored VM for its first agent line, which
    /// must be a heartbeat after the image's (`image_seq`); then checks with
    /// `status` whether it was the VMM's first line (see the module docs).
    fn first_heartbeat(&mut self, image_seq: u64) -> Result<FirstHeartbeat> {
        let watch = connect(&self.socket).and_then(|c| c.with_timeout(Some(READY_TIMEOUT)).watch());
        let mut watch = match watch {
            Ok(w) => w,
            Err(e) => return Err(self.failed(format!("watch: {e}"))),
        };
        let line = |e: std::result::Result<Option<WatchEvent>, ClientError>| match e {
            Ok(Some(WatchEvent::Line(line))) => Ok(line),
            Ok(other) => Err(format!("watch gave {other:?}")),
            Err(e) => Err(format!("watch: {e}")),
        };
        let registered_ns = monotonic_ns();
        let first = match line(watch.next_event()) {
            Ok(l) => l,
            Err(e) => return Err(self.failed(e)),
        };
        let first_ns = monotonic_ns();
        if relive_control::Heartbeat::parse(&first).is_none_or(|hb| hb.seq <= image_seq) {
            return Err(self.failed(format!(
                "the restored guest's first line is {first:?}, not a heartbeat after seq={image_seq}"
            )));
        }
        let status = self.status()?;
        let Some(last) = status.agent.last_line.clone() else {
            return Err(self.failed("status shows no agent line after one was watched".into()));
        };
        let mut seen = 1u64;
        let mut current = first;
        while current != last {
            current = match line(watch.next_event()) {
                Ok(l) => l,
                Err(e) => return Err(self.failed(format!("{e} (waiting for {last:?})"))),
            };
            seen += 1;
        }
        let exact = seen == status.agent.lines;
        Ok(FirstHeartbeat {
            vcpus_started_ns: status.vcpus_started_monotonic_ns,
            first_hb_by_ns: if exact { first_ns } else { registered_ns },
            exact,
        })
    }

    /// `shutdown`, then reap: the VMM must exit with the shutdown status.
    fn shutdown(mut self) -> Result<()> {
        match self.client.request(&Request::Shutdown) {
            Ok(Response::Ok) => {}
            Ok(other) => return Err(self.failed(format!("shutdown answered {other:?}"))),
            Err(e) => return Err(self.failed(format!("shutdown: {e}"))),
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.code() == Some(ExitReason::Shutdown.status()) => {
                    return Ok(())
                }
                Ok(Some(status)) => {
                    return Err(self.failed(format!("the VMM exited with {status} after shutdown")))
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(None) => {
                    return Err(self.failed(format!(
                        "the VMM did not exit within {EXIT_TIMEOUT:?} of shutdown"
                    )))
                }
                Err(e) => return Err(self.failed(format!("cannot reap the VMM: {e}"))),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

/// The file system that holds `dir`, from `/proc/self/mounts` (longest match):
/// checkpoints end with an fsync, so it matters.
fn fs_note(dir: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let best = mounts
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (dev, at, fs) = (w.next()?, w.next()?, w.next()?);
            dir.starts_with(at)
                .then(|| (at.len(), format!("{fs} on {dev}")))
        })
        .max_by_key(|(len, _)| *len);
    best.map_or_else(|| "file system unknown".into(), |(_, note)| note)
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

/// `median / p90` of a column, or `-`.
fn cell(values: Option<&[f64]>, scale: f64, digits: usize) -> String {
    match values.and_then(Summary::of) {
        Some(s) => format!("{:.digits$} / {:.digits$}", s.median / scale, s.p90 / scale),
        None => "-".into(),
    }
}

fn median(values: Option<&[f64]>) -> Option<f64> {
    values.and_then(Summary::of).map(|s| s.median)
}

fn report(runs: usize, rows: &[Row]) {
    fn vcpus(r: &Row) -> Option<&[f64]> {
        r.restore.as_ref().map(|f| f.vcpus_ms.as_slice())
    }
    fn first_hb(r: &Row) -> Option<&[f64]> {
        r.restore.as_ref().map(|f| f.first_hb_ms.as_slice())
    }
    fn exact(r: &Row) -> Option<usize> {
        r.restore.as_ref().map(|f| f.first_hb_exact)
    }
    fn pause(r: &Row) -> Option<&[f64]> {
        r.checkpoint.as_ref().map(|f| f.pause_ms.as_slice())
    }
    fn total(r: &Row) -> Option<&[f64]> {
        r.checkpoint.as_ref().map(|f| f.total_ms.as_slice())
    }
    fn bytes(r: &Row) -> Option<&[f64]> {
        r.checkpoint.as_ref().map(|f| f.bytes.as_slice())
    }

    println!();
    println!(
        "  {:>8} {:<10} {:>17} {:>17} {:>11} {:>17} {:>17} {:>9}",
        "guest",
        "mode",
        "pause ms",
        "checkpoint ms",
        "image MiB",
        "restore->vCPUs",
        "restore->1st hb",
        "hb exact"
    );
    println!(
        "  {:>8} {:<10} {:>17} {:>17} {:>11} {:>17} {:>17} {:>9}",
        "",
        "",
        "median / p90",
        "median / p90",
        "median",
        "ms median / p90",
        "ms median / p90",
        "runs"
    );
    println!(
        "  {:>8} {:<10} {:>17} {:>17} {:>11} {:>17} {:>17} {:>9}",
        "target",
        "",
        "",
        format!("< {CHECKPOINT_TARGET_MS} (median)"),
        "",
        format!("< {RESTORE_TARGET_MS} (median)"),
        "",
        ""
    );
    for r in rows {
        println!(
            "  {:>4} MiB {:<10} {:>17} {:>17} {:>11} {:>17} {:>17} {:>9}",
            r.mem_mib,
            r.mode,
            cell(pause(r), 1.0, 2),
            cell(total(r), 1.0, 2),
            median(bytes(r)).map_or("-".into(), |b| format!("{:.1}", b / MIB)),
            cell(vcpus(r), 1.0, 2),
            cell(first_hb(r), 1.0, 2),
            exact(r).map_or("-".into(), |n| format!("{n}/{runs}")),
        );
    }

    // Restore scaling: the largest guest over the smallest, cold restores.
    let cold = |mem: u64| {
        rows.iter()
            .find(|r| r.mem_mib == mem && r.mode == "full/cold")
            .and_then(|r| median(vcpus(r)))
    };
    let (small, large) = (SIZES_MIB[0], SIZES_MIB[SIZES_MIB.len() - 1]);
    let ratio = match (cold(large), cold(small)) {
        (Some(l), Some(s)) if s > 0.0 => Some(l / s),
        _ => None,
    };
    println!();
    match ratio {
        Some(x) => println!(
            "  restore->vCPUs running, {large} MiB / {small} MiB (medians): {x:.2}   target < {RATIO_TARGET}: {}",
            verdict(x < RATIO_TARGET)
        ),
        None => println!("  restore->vCPUs running, {large} MiB / {small} MiB: not available"),
    }

    println!();
    println!("  targets");
    let mut met = serde_json::Map::new();
    for r in rows {
        let restore_target = if r.mode == "standby" {
            STANDBY_TARGET_MS
        } else {
            RESTORE_TARGET_MS
        };
        if r.mode.starts_with("incr") {
            if let Some(m) = median(pause(r)) {
                let ok = m < INCREMENTAL_PAUSE_TARGET_MS;
                println!(
                    "    {:>4} MiB {:<10} incremental pause median     {m:>8.2} ms  < {INCREMENTAL_PAUSE_TARGET_MS} ms: {}",
                    r.mem_mib, r.mode, verdict(ok)
                );
                met.insert(format!("incremental_pause_{}mib", r.mem_mib), ok.into());
            }
            continue;
        }
        if let Some(m) = median(vcpus(r)) {
            let ok = m < restore_target;
            println!(
                "    {:>4} MiB {:<10} restore->vCPUs running median {m:>8.2} ms  < {restore_target} ms: {}",
                r.mem_mib, r.mode, verdict(ok)
            );
            met.insert(format!("restore_{}mib_{}", r.mem_mib, r.mode), ok.into());
        }
        if let Some(m) = median(total(r)) {
            let ok = m < CHECKPOINT_TARGET_MS;
            println!(
                "    {:>4} MiB {:<10} checkpoint total median      {m:>8.2} ms  < {CHECKPOINT_TARGET_MS} ms: {}",
                r.mem_mib, r.mode, verdict(ok)
            );
            met.insert(format!("checkpoint_{}mib_{}", r.mem_mib, r.mode), ok.into());
        }
    }
    if let Some(x) = ratio {
        met.insert("restore_ratio".into(), (x < RATIO_TARGET).into());
    }
    let standby = |mem: u64| {
        rows.iter()
            .find(|r| r.mem_mib == mem && r.mode == "standby")
            .and_then(|r| median(vcpus(r)))
    };
    if let (Some(l), Some(s)) = (standby(large), standby(small)) {
        if s > 0.0 {
            let x = l / s;
            println!(
                "    standby restore, {large} MiB / {small} MiB (medians): {x:.2}   target < {RATIO_TARGET}: {}",
                verdict(x < RATIO_TARGET)
            );
            met.insert("standby_ratio".into(), (x < RATIO_TARGET).into());
        }
    }
    println!();
    println!(
        "  restore->vCPUs running: the VMM's own CLOCK_MONOTONIC stamp (status\n  \
         vcpus_started_monotonic_ns) minus the bench's stamp just before spawn: exact.\n  \
         restore->1st hb: an upper bound per run on when the VMM got the restored guest's\n  \
         first line (an `hb`), from a `watch` sent as soon as the socket existed. In\n  \
         `hb exact` runs the watch saw that very line (proved by `status` afterwards) and\n  \
         the bound is when the bench read it (tens of µs late); in the others the line\n  \
         came before the watch registered, and the bound is when the bench read the\n  \
         watch's `ok`. The guest beats every 1 ms: up to 1 ms is its wait for a beat.\n  \
         standby: the VMM's own restore_us, from the `restore` request reaching it to\n  \
         the vCPUs running (the standby was built and serving before).\n  \
         incr ~1%: the guest rewrites about 1% of its memory (at most the 16 MiB it\n  \
         touched) between two incremental checkpoints."
    );

    let json = |v: Option<&[f64]>, scale: f64, digits| {
        v.and_then(Summary::of)
            .map_or(serde_json::Value::Null, |s| {
                Summary {
                    median: s.median / scale,
                    p90: s.p90 / scale,
                    min: s.min / scale,
                    max: s.max / scale,
                }
                .json(digits)
            })
    };
    let rows_json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "mem_mib": r.mem_mib,
                "mode": r.mode,
                "checkpoint_pause_ms": json(pause(r), 1.0, 3),
                "checkpoint_total_ms": json(total(r), 1.0, 3),
                "checkpoint_bytes_mib": json(bytes(r), MIB, 3),
                "restore_vcpus_running_ms": json(vcpus(r), 1.0, 3),
                "restore_first_heartbeat_ms": json(first_hb(r), 1.0, 3),
                "restore_first_heartbeat_upper_bound": true,
                "restore_first_heartbeat_exact_runs": exact(r),
            })
        })
        .collect();
    let line = serde_json::json!({
        "runs": runs,
        "cmdline": CMDLINE,
        "rows": rows_json,
        "restore_ratio_large_over_small": ratio.map(|x| (x * 1000.0).round() / 1000.0),
        "targets": {
            "restore_vcpus_running_median_ms": RESTORE_TARGET_MS,
            "restore_ratio": RATIO_TARGET,
            "checkpoint_total_median_ms": CHECKPOINT_TARGET_MS,
        },
        "targets_met": met,
    });
    println!();
    println!("BENCH restore {line}");
}
