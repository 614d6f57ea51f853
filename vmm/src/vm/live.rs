//! Live checkpoints: guest memory is copied while the guest runs.
//!
//! Pre-copy on KVM's dirty log, as live migration does it:
//!
//! 1. On the event thread, without stopping the guest: read (and so clear)
//!    the dirty log, and start the image in page mode
//!    ([`ImageWriter::begin_pages`]). Round 0's pages are the pages dirtied
//!    since the previous image (a layer), or every page the guest may have
//!    (resident in this process, in the image it was restored from, or
//!    dirtied: a full image).
//! 2. On a writer thread, while the guest runs: copy round 0's pages into
//!    the image, each at its place in the file; then round after round, read
//!    the dirty log and copy the pages written meanwhile (a page copied
//!    before is replaced), until a round finds at most [`CONVERGED_PAGES`],
//!    stops shrinking, or [`MAX_ROUNDS`] have run. The thread tells the event
//!    thread (`Converged`).
//! 3. On the event thread: pause the vCPUs, read the dirty log one last
//!    time, capture vCPU, VM and device state, copy the last dirty pages into
//!    a buffer, resume. Only this is the guest's pause.
//! 4. On the writer thread: write the last pages and the state sections,
//!    settle the present pages and the checksum, commit (fsync, rename,
//!    fsync of the directory), and tell the event thread (`Written`), which
//!    answers the `checkpoint` request.
//!
//! The image holds exactly the guest's state at the pause: every page the
//! guest wrote after its last copy is in a later dirty log, so its last copy
//! is taken after the guest's last write, at the latest while paused. The
//! VMM itself writes no guest memory (its devices do no DMA), so the dirty
//! log is complete. The event thread goes on serving the control socket and
//! the agent channel throughout: heartbeats flow while memory is copied.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};

use super::*;
use relive_control::CopyStats;

/// Bytes in a guest page.
const PAGE: usize = relive_images::format::PAGE_SIZE as usize;
use relive_images::format::{CommittedImage, ImageWriter};

/// At most this many rounds run while the guest runs (round 0 included);
/// whatever the guest wrote during the last one is copied while paused.
pub const MAX_ROUNDS: u32 = 8;
/// A round that finds at most this many dirty pages (1 MiB) ends the rounds.
pub const CONVERGED_PAGES: u64 = 256;
/// Pages copied per read of guest memory and per write to the image.
const CHUNK_PAGES: u64 = 256;

/// What the writer thread tells the event thread.
pub enum LiveEvent {
    /// The rounds are over: time to pause for the last pages.
    Converged,
    /// The image is committed, or the checkpoint failed.
    Written {
        /// The image, or why there is none.
        result: Result<CommittedImage, CheckpointError>,
        /// How memory was copied.
        stats: CopyStats,
        /// The last pages' buffer, for the next checkpoint.
        buffer: Vec<u8>,
    },
}

impl std::fmt::Debug for LiveEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiveEvent::Converged => f.write_str("Converged"),
            LiveEvent::Written { result, stats, .. } => f
                .debug_struct("Written")
                .field("ok", &result.is_ok())
                .field("stats", stats)
                .finish_non_exhaustive(),
        }
    }
}

/// What a live snapshot is for.
pub(super) enum Purpose {
    /// A consistency image a `checkpoint` request asked for: answered here.
    Checkpoint(SyncSender<Response>),
    /// The warm boot image, at the guest's first `ready`.
    BootImage,
}

impl Purpose {
    /// Tells whoever waits that the snapshot failed.
    fn failed(self, e: CheckpointError) {
        match self {
            Purpose::Checkpoint(reply) => {
                let _ = reply.send(Response::error(e.kind(), &e));
            }
            Purpose::BootImage => {
                let error = relive_control::error_chain(&e);
                tracing::error!(%error, "cannot write the warm boot image");
            }
        }
    }
}

/// A live checkpoint in progress, as the event thread holds it.
pub(super) struct LiveCheckpoint {
    purpose: Purpose,
    kind: ImageKind,
    started: Instant,
    /// The pause's state and last pages go to the writer thread here.
    final_tx: Option<Sender<FinalStage>>,
    cancel: Arc<AtomicBool>,
    pause_us: u64,
}

impl LiveCheckpoint {
    /// Stops the writer thread at its next round or wait; its temporary
    /// file is removed.
    pub(super) fn cancel(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.final_tx = None;
    }
}

/// What the pause produced for the writer thread.
struct FinalStage {
    captured: Captured,
    pages: snapshot::PackedPages,
}

/// The VM's state at a pause, owned, for an image's sections.
pub(super) struct Captured {
    pub(super) config: ImageConfig,
    pub(super) limits: ResourceLimits,
    pub(super) machine: MachineState,
    pub(super) devices: DeviceState,
    pub(super) app: AppStatus,
}

impl Captured {
    pub(super) fn parts(&self) -> ImageParts<'_> {
        ImageParts {
            config: &self.config,
            limits: &self.limits,
            machine: &self.machine,
            devices: &self.devices,
            app: &self.app,
        }
    }
}

/// Pages KVM saw written since the last call, per memory region (slot
/// `i` is region `i`); on failure, the slot whose log could not be read.
pub(super) fn dirty_log(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Vec<PageRun>>, (u32, kvm_ioctls::Error)> {
    use vm_memory::GuestMemoryRegion;
    let mut out = Vec::new();
    for (slot, region) in vm_memory::GuestMemoryBackend::iter(mem).enumerate() {
        let len = region.len() as usize;
        let bitmap = vm
            .get_dirty_log(slot as u32, len)
            .map_err(|e| (slot as u32, e))?;
        out.push(PageRun::from_bitmap(&bitmap, (len / 4096) as u64));
    }
    Ok(out)
}

fn pages_in(runs: &[Vec<PageRun>]) -> u64 {
    runs.iter().flatten().map(|r| r.count).sum()
}

/// Everything the writer thread needs.
struct Writer {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    /// The image being written; dropped (its temporary file removed) on failure.
    image: Option<ImageWriter>,
    round0: Vec<Vec<PageRun>>,
    sink: EventSink,
    final_rx: Receiver<FinalStage>,
    cancel: Arc<AtomicBool>,
    /// Per region, one bit per page: copied in this checkpoint already.
    copied: Vec<Vec<u64>>,
    stats: CopyStats,
    buffer: Vec<u8>,
}

impl Writer {
    fn run(mut self) {
        let result = self.write();
        // A failed image is dropped: its temporary file goes with it.
        self.image = None;
        let buffer = std::mem::take(&mut self.buffer);
        self.sink.send(VmEvent::Live(LiveEvent::Written {
            result,
            stats: self.stats,
            buffer,
        }));
    }

    fn image(&mut self) -> Result<&mut ImageWriter, CheckpointError> {
        self.image.as_mut().ok_or(CheckpointError::Abandoned)
    }

    fn write(&mut self) -> Result<CommittedImage, CheckpointError> {
        let round0 = std::mem::take(&mut self.round0);
        self.copy(&round0)?;
        self.stats.rounds = 1;
        let mut last = pages_in(&round0);
        while self.stats.rounds < MAX_ROUNDS {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(CheckpointError::Abandoned);
            }
            let dirty = dirty_log(&self.vm, &self.mem)
                .map_err(|(slot, source)| CheckpointError::DirtyLog { slot, source })?;
            let n = pages_in(&dirty);
            self.copy(&dirty)?;
            self.stats.rounds += 1;
            if n <= CONVERGED_PAGES || n >= last {
                break;
            }
            last = n;
        }
        self.sink.send(VmEvent::Live(LiveEvent::Converged));
        let last_stage = self
            .final_rx
            .recv()
            .map_err(|_| CheckpointError::Abandoned)?;
        self.stats.final_pages = last_stage
            .pages
            .regions
            .iter()
            .flat_map(|(_, _, runs)| runs)
            .map(|r| r.count)
            .sum();
        let write = |e| CheckpointError::Write(snapshot::SnapshotError::Write(e));
        let mut at = 0usize;
        for (ri, (_, _, runs)) in last_stage.pages.regions.iter().enumerate() {
            for run in runs {
                let len = run.count as usize * PAGE;
                let bytes = &last_stage.pages.data[at..at + len];
                self.image
                    .as_mut()
                    .ok_or(CheckpointError::Abandoned)?
                    .write_pages(ri, run.first_page, bytes)
                    .map_err(write)?;
                at += len;
            }
        }
        self.buffer = last_stage.pages.data;
        snapshot::add_sections(self.image()?, &last_stage.captured.parts())
            .map_err(CheckpointError::Write)?;
        self.image()?.finish_pages().map_err(write)?;
        let image = self.image.take().ok_or(CheckpointError::Abandoned)?;
        image.commit().map_err(CheckpointError::Commit)
    }

    /// Copies `runs` of guest memory into the image, a chunk at a time.
    fn copy(&mut self, runs: &[Vec<PageRun>]) -> Result<(), CheckpointError> {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion};
        let bases: Vec<u64> = vm_memory::GuestMemoryBackend::iter(&self.mem)
            .map(|r| r.start_addr().0)
            .collect();
        let mut chunk = vec![0u8; CHUNK_PAGES as usize * PAGE];
        let write = |e| CheckpointError::Write(snapshot::SnapshotError::Write(e));
        for (ri, region_runs) in runs.iter().enumerate() {
            let Some(&base) = bases.get(ri) else { continue };
            for run in region_runs {
                let mut page = run.first_page;
                while page < run.end() {
                    let n = (run.end() - page).min(CHUNK_PAGES);
                    let len = n as usize * PAGE;
                    // A volatile copy: the guest may be writing these pages
                    // right now; any page it writes is in the next dirty log.
                    let addr = base + page * PAGE as u64;
                    self.mem
                        .read_slice(&mut chunk[..len], GuestAddress(addr))
                        .map_err(|e| CheckpointError::ReadMemory {
                            addr,
                            reason: e.to_string(),
                        })?;
                    self.image()?
                        .write_pages(ri, page, &chunk[..len])
                        .map_err(write)?;
                    let seen = &mut self.copied[ri];
                    for p in page..page + n {
                        let (word, bit) = ((p / 64) as usize, p % 64);
                        if seen[word] & (1 << bit) != 0 {
                            self.stats.recopied_pages += 1;
                        }
                        seen[word] |= 1 << bit;
                    }
                    self.stats.copied_pages += n;
                    page += n;
                }
            }
        }
        Ok(())
    }
}

impl EventLoop {
    /// A `checkpoint` request: starts a live checkpoint (see the module
    /// docs); `reply` gets the answer once the image is committed, or the
    /// error that kept it from starting.
    pub(super) fn checkpoint_request(
        &mut self,
        requested: CheckpointKind,
        reply: SyncSender<Response>,
    ) {
        let kind = self.history.as_ref().map(|history| {
            match (requested, history.last.filter(|_| !history.need_full)) {
                (CheckpointKind::Incremental, Some(parent)) => ImageKind::Incremental { parent },
                _ => ImageKind::Full,
            }
        });
        self.start_live(kind.unwrap_or(ImageKind::Full), Purpose::Checkpoint(reply));
    }

    /// Starts a live snapshot of `kind` for `purpose` (see the module docs);
    /// an error that keeps it from starting goes to `purpose` at once.
    pub(super) fn start_live(&mut self, kind: ImageKind, purpose: Purpose) {
        if let Err(e) = self.try_start_live(kind) {
            purpose.failed(e);
            return;
        }
        if let Some(live) = self.live.as_mut() {
            live.purpose = purpose;
        }
    }

    fn try_start_live(&mut self, kind: ImageKind) -> Result<(), CheckpointError> {
        if self.live.is_some() {
            return Err(CheckpointError::Busy);
        }
        if matches!(self.activity, Activity::Standby(_)) {
            return Err(CheckpointError::NoGuest);
        }
        let Some(history) = self.history.as_ref() else {
            return Err(CheckpointError::NoImageDir);
        };
        let dir = history.store.dir().to_path_buf();
        let known = history.base_present.clone();
        let dirty = match self.take_dirty_log() {
            Ok(dirty) => dirty,
            Err((slot, source)) => {
                self.mark_need_full();
                return Err(CheckpointError::DirtyLog { slot, source });
            }
        };
        if kind == ImageKind::Boot {
            // The boot image takes the dirty log: the next consistency image is full.
            self.mark_need_full();
        }
        let round0 = match kind {
            ImageKind::Incremental { .. } => dirty,
            _ => snapshot::candidate_runs(&self.mem, &known, &dirty),
        };
        let started = (|| {
            use vm_memory::GuestMemoryRegion;
            let mut image = ImageWriter::create(&dir, kind)?;
            let regions: Vec<(u64, u64)> = vm_memory::GuestMemoryBackend::iter(&self.mem)
                .map(|r| (r.start_addr().0, r.len()))
                .collect();
            image.begin_pages(&regions)?;
            Ok::<_, relive_images::format::WriteError>((image, regions))
        })();
        let (image, regions) = match started {
            Ok(started) => started,
            Err(e) => {
                self.mark_need_full();
                return Err(CheckpointError::Commit(e));
            }
        };
        let (final_tx, final_rx) = std::sync::mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            vm: self.vm.clone(),
            mem: self.mem.clone(),
            image: Some(image),
            round0,
            sink: self._sink.clone(),
            final_rx,
            cancel: cancel.clone(),
            copied: regions
                .iter()
                .map(|(_, len)| vec![0u64; (len / PAGE as u64).div_ceil(64) as usize])
                .collect(),
            stats: CopyStats::default(),
            buffer: std::mem::take(&mut self.copy_buffer),
        };
        let spawned = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Checkpoint);
                writer.run()
            });
        if let Err(source) = spawned {
            self.mark_need_full();
            return Err(CheckpointError::Thread(source));
        }
        self.live = Some(LiveCheckpoint {
            purpose: Purpose::BootImage,
            kind,
            started: Instant::now(),
            final_tx: Some(final_tx),
            cancel,
            pause_us: 0,
        });
        Ok(())
    }

    /// The writer thread's news.
    pub(super) fn on_live(&mut self, event: LiveEvent) {
        match event {
            LiveEvent::Converged => self.finish_live_pause(),
            LiveEvent::Written {
                result,
                stats,
                buffer,
            } => {
                if buffer.capacity() > 0 {
                    self.copy_buffer = buffer;
                }
                let Some(live) = self.live.take() else {
                    return;
                };
                match &live.purpose {
                    Purpose::BootImage => {
                        self.boot_image_written(result, BootImageMode::Warm);
                    }
                    Purpose::Checkpoint(reply) => {
                        let answer = match self.on_live_written(&live, result, stats) {
                            Ok(report) => Response::Checkpoint(report),
                            Err(e) => Response::error(e.kind(), &e),
                        };
                        let _ = reply.send(answer);
                    }
                }
            }
        }
    }

    /// The pause of a live checkpoint: the last dirty pages and the state.
    fn finish_live_pause(&mut self) {
        if self.live.is_none() {
            return;
        }
        let buffer = std::mem::take(&mut self.copy_buffer);
        // Watchers (the supervisor) learn that the silence to come is asked
        // for, before it starts.
        self.tell_watchers(&Response::Paused {
            reason: "checkpoint".into(),
        });
        let outcome = self.with_paused(|vm, paused| {
            let at = Instant::now();
            let staged = vm
                .take_dirty_log()
                .map_err(|(slot, source)| CheckpointError::DirtyLog { slot, source })
                .and_then(|dirty| {
                    let captured = vm.capture(paused)?;
                    let pages = snapshot::copy_pages(paused, &vm.mem, dirty, buffer);
                    Ok(FinalStage { captured, pages })
                });
            (staged, at.elapsed().as_micros() as u64)
        });
        let paused_us = match &outcome {
            Ok((_, us)) => *us,
            Err(_) => 0,
        };
        self.tell_watchers(&Response::Resumed {
            reason: "checkpoint".into(),
            paused_us,
        });
        let Some(live) = self.live.as_mut() else {
            return;
        };
        match outcome {
            Ok((Ok(stage), pause_us)) => {
                live.pause_us = pause_us;
                if let Some(tx) = &live.final_tx {
                    let _ = tx.send(stage);
                }
            }
            Ok((Err(e), _)) => {
                tracing::warn!(error = %relive_control::error_chain(&e), "live checkpoint: the pause failed");
                live.cancel();
            }
            Err(e) => {
                tracing::warn!(error = %relive_control::error_chain(&e), "live checkpoint: cannot pause");
                live.cancel();
            }
        }
    }

    fn on_live_written(
        &mut self,
        live: &LiveCheckpoint,
        result: Result<CommittedImage, CheckpointError>,
        stats: CopyStats,
    ) -> Result<CheckpointReport, CheckpointError> {
        let Some(history) = self.history.as_mut() else {
            return Err(CheckpointError::NoImageDir);
        };
        let image = match result {
            Ok(image) => image,
            Err(e) => {
                // The dirty log since the previous image is gone.
                history.need_full = true;
                return Err(e);
            }
        };
        let report = history.committed(&image, live.kind);
        Ok(CheckpointReport {
            pause_us: live.pause_us,
            total_us: live.started.elapsed().as_micros() as u64,
            copy: stats,
            ..report
        })
    }

    fn mark_need_full(&mut self) {
        if let Some(history) = self.history.as_mut() {
            history.need_full = true;
        }
    }
}
