//! Failover images of a running VM: consistency checkpoints (full and
//! incremental), boot images, and a standby's restore of an image.
//!
//! A checkpoint pauses the vCPUs, captures the vCPU, VM and device state and
//! the dirty log, and either writes the memory while paused (a full image) or
//! copies the dirty pages into a buffer (an incremental layer); the vCPUs then
//! resume before the layer is written and the image committed (fsync,
//! rename, fsync of the directory). After a commit the store's housekeeping
//! (merging a long chain, retention) runs on a background thread.

use super::*;

use super::live::Captured;

use crate::devices::SerialError;
use crate::persist::StateError;
use crate::vcpu::VcpuError;
use relive_control::ChainStatus;
use relive_images::format::{CommittedImage, WriteError};

/// Errors of a checkpoint or a boot image.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The VM was started without `--images`.
    #[error("this VM has no image directory: start it with --images DIR")]
    NoImageDir,
    /// A standby has no guest to write.
    #[error("{STANDBY_HAS_NO_GUEST}")]
    NoGuest,
    /// The vCPUs could not be paused (the VM runs on, or ends when stuck).
    #[error("cannot pause the VM for the checkpoint")]
    Pause(#[source] PauseError),
    /// KVM's dirty log could not be read.
    #[error("KVM_GET_DIRTY_LOG on slot {slot} failed")]
    DirtyLog {
        /// The memory slot.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU's state could not be captured.
    #[error("cannot capture the vCPUs' state")]
    Vcpu(#[source] VcpuError),
    /// The VM-wide KVM state could not be captured.
    #[error("cannot capture the VM's state")]
    VmState(#[source] StateError),
    /// A device's state could not be captured.
    #[error("cannot capture the state of {device}")]
    Device {
        /// The device.
        device: &'static str,
        /// Why.
        #[source]
        source: SerialError,
    },
    /// A section could not be encoded.
    #[error("cannot encode the image's {section} section")]
    Encode {
        /// The section.
        section: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The image could not be written.
    #[error("cannot write the image")]
    Write(#[source] snapshot::SnapshotError),
    /// The image could not be committed (fsync, rename).
    #[error("cannot commit the image")]
    Commit(#[source] WriteError),
    /// A checkpoint is being taken already.
    #[error("a checkpoint is being taken already: ask again once it is done")]
    Busy,
    /// A live checkpoint was given up (the VM ended, or could not pause).
    #[error("the checkpoint was abandoned before its pause")]
    Abandoned,
    /// The checkpoint's writer thread could not start.
    #[error("cannot start the checkpoint's writer thread")]
    Thread(#[source] std::io::Error),
    /// Guest memory could not be read.
    #[error("cannot read guest memory at {addr:#x}: {reason}")]
    ReadMemory {
        /// The guest address.
        addr: u64,
        /// Why.
        reason: String,
    },
}

impl CheckpointError {
    /// What kind of failure this is, for the control socket.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CheckpointError::NoImageDir | CheckpointError::NoGuest => ErrorKind::WrongState,
            CheckpointError::Pause(_) => ErrorKind::PauseTimeout,
            CheckpointError::DirtyLog { .. } | CheckpointError::VmState(_) => ErrorKind::Kvm,
            CheckpointError::Vcpu(e) if e.is_kvm() => ErrorKind::Kvm,
            CheckpointError::Vcpu(_) => ErrorKind::PauseTimeout,
            CheckpointError::Write(_) | CheckpointError::Commit(_) => ErrorKind::ImageWrite,
            CheckpointError::Busy => ErrorKind::WrongState,
            CheckpointError::Device { .. }
            | CheckpointError::Encode { .. }
            | CheckpointError::Abandoned
            | CheckpointError::Thread(_)
            | CheckpointError::ReadMemory { .. } => ErrorKind::Other,
        }
    }
}

/// Errors of a standby's `restore`.
#[derive(Debug, thiserror::Error)]
pub enum StandbyRestoreError {
    /// This VMM runs a guest already.
    #[error("this VMM already runs a guest: only a standby VMM takes an image")]
    NotStandby,
    /// The image cannot be read or merged.
    #[error(transparent)]
    Image(#[from] snapshot::SnapshotError),
    /// The image is of a VM of another shape.
    #[error(
        "image {path} is of a VM with {image_mib} MiB and {image_vcpus} vCPUs; this standby has \
         {mib} MiB and {vcpus} vCPUs: restore it into a standby started with --mem-mib {image_mib} --vcpus {image_vcpus}"
    )]
    Shape {
        /// The image.
        path: PathBuf,
        /// Its memory.
        image_mib: u64,
        /// Its vCPUs.
        image_vcpus: u8,
        /// This standby's memory.
        mib: u64,
        /// This standby's vCPUs.
        vcpus: u8,
    },
    /// The image's memory could not be mapped over the slots.
    #[error("cannot map the image's memory over guest memory")]
    Map(#[source] memory::MemoryError),
    /// The VM-wide state could not be loaded.
    #[error("cannot load the VM's state")]
    VmState(#[source] StateError),
    /// A vCPU's state could not be loaded.
    #[error("cannot load the vCPUs' state")]
    Vcpu(#[source] VcpuError),
    /// The devices' state could not be loaded.
    #[error("cannot load the devices' state")]
    Devices(#[source] Box<VmError>),
    /// The resource limits could not be applied.
    #[error("cannot apply the image's resource limits")]
    Limits(#[source] Box<VmError>),
    /// The dirty log could not be reset.
    #[error("KVM_GET_DIRTY_LOG on slot {slot} failed")]
    DirtyLog {
        /// The memory slot.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl StandbyRestoreError {
    /// What kind of failure this is, for the control socket.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StandbyRestoreError::NotStandby => ErrorKind::WrongState,
            StandbyRestoreError::Image(_) | StandbyRestoreError::Shape { .. } => {
                ErrorKind::ImageRefused
            }
            StandbyRestoreError::VmState(_)
            | StandbyRestoreError::Vcpu(_)
            | StandbyRestoreError::DirtyLog { .. } => ErrorKind::Kvm,
            StandbyRestoreError::Map(_)
            | StandbyRestoreError::Devices(_)
            | StandbyRestoreError::Limits(_) => ErrorKind::Other,
        }
    }
}

/// What the VM knows of its image directory.
pub(super) struct ImageHistory {
    pub(super) store: Arc<ImageStore>,
    /// The newest image this process wrote or was restored from.
    pub(super) last: Option<ImageId>,
    /// The next checkpoint must be full (a failed one lost the dirty log).
    pub(super) need_full: bool,
    /// Layers written since the last full or merged image.
    pub(super) layers: usize,
    /// Present pages per region of the image this VM was restored from.
    pub(super) base_present: Vec<Vec<PageRun>>,
    /// The image a running restore uses: never deleted.
    pub(super) in_use: Option<ImageId>,
    /// Background merge and retention.
    housekeeper: Option<super::housekeeping::Housekeeper>,
}

impl ImageHistory {
    /// What `status` reports of the chain.
    pub(super) fn chain_status(&self) -> ChainStatus {
        ChainStatus {
            last_image: self.last.map(|id| id.to_string()),
            next_full: self.need_full || self.last.is_none(),
            layers: self.layers,
        }
    }

    pub(super) fn new(store: ImageStore) -> Self {
        ImageHistory {
            store: Arc::new(store),
            last: None,
            need_full: true,
            layers: 0,
            base_present: Vec::new(),
            in_use: None,
            housekeeper: None,
        }
    }

    /// The VM now runs from `image`: later layers build on it when it lives
    /// in this store's directory (a layer must sit beside its parent).
    pub(super) fn adopt(&mut self, image: &LoadedImage) {
        let parent = image.reader.path().parent().map(std::fs::canonicalize);
        let same_dir = matches!(
            (parent, std::fs::canonicalize(self.store.dir())),
            (Some(Ok(a)), Ok(b)) if a == b
        );
        self.last = Some(image.reader.id());
        // Layers sit beside their parent, and a boot image is no parent:
        // the first image after a boot-image start is full.
        self.need_full = !same_dir || image.reader.kind() == ImageKind::Boot;
        self.layers = 0;
        self.base_present = image.present();
        self.in_use = Some(image.reader.id());
        self.verify_missing();
    }

    /// Queues the verification of every image without a verdict (a VMM
    /// killed while verifying leaves its image without one, and a failover
    /// trusts only verdicts).
    pub(super) fn verify_missing(&mut self) {
        if let Some(h) = self.housekeeper() {
            h.push(super::housekeeping::Job::VerifyMissing);
        }
    }

    /// The store's background thread, started on first use.
    fn housekeeper(&mut self) -> Option<&super::housekeeping::Housekeeper> {
        if self.housekeeper.is_none() {
            match super::housekeeping::Housekeeper::start(self.store.clone()) {
                Ok(h) => self.housekeeper = Some(h),
                Err(e) => tracing::warn!(error = %e, "cannot start image housekeeping"),
            }
        }
        self.housekeeper.as_ref()
    }

    /// Records `image`, a committed consistency image of `kind`, as the
    /// newest of the chain (the next layer's parent) and starts the store's
    /// housekeeping (merging a long chain, retention) in the background. The
    /// report's timing and copy figures are the caller's to fill in.
    pub(super) fn committed(
        &mut self,
        image: &CommittedImage,
        kind: ImageKind,
    ) -> CheckpointReport {
        self.last = Some(image.id);
        self.need_full = false;
        self.layers = match kind {
            ImageKind::Incremental { .. } => self.layers + 1,
            _ => 0,
        };
        let merge = (self.layers >= MERGE_AFTER_LAYERS).then(|| image.path.clone());
        if merge.is_some() {
            self.layers = 0;
        }
        self.housekeeping(&image.path, merge);
        CheckpointReport {
            image_id: image.id.to_string(),
            kind: match kind {
                ImageKind::Incremental { .. } => CheckpointKind::Incremental,
                _ => CheckpointKind::Full,
            },
            path: image.path.display().to_string(),
            bytes: image.bytes_written,
            pause_us: 0,
            total_us: 0,
            copy: relive_control::CopyStats::default(),
        }
    }

    /// Queues the store's background work after `image` was committed:
    /// its verification, the merge of `merge` (a layer) if given, retention.
    fn housekeeping(&mut self, image: &std::path::Path, merge: Option<PathBuf>) {
        use super::housekeeping::Job;
        let in_use: Vec<ImageId> = self.in_use.into_iter().chain(self.last).collect();
        let Some(h) = self.housekeeper() else { return };
        h.push(Job::Verify(image.to_path_buf()));
        if let Some(layer) = merge {
            h.push(Job::Merge(layer));
        }
        h.push(Job::Retain(in_use));
    }
}

impl EventLoop {
    /// Standby restore: maps the image's memory over the registered slots,
    /// loads the VM, vCPU and device state, and runs the guest. An image of
    /// another shape (memory, vCPUs) is refused before anything changes, and
    /// the standby stays ready for the next `restore`.
    pub(super) fn restore_standby(
        &mut self,
        path: &std::path::Path,
    ) -> Result<RestoreReport, StandbyRestoreError> {
        let received = Instant::now();
        let paused = match std::mem::replace(&mut self.activity, Activity::Running) {
            Activity::Standby(paused) => paused,
            other => {
                self.activity = other;
                return Err(StandbyRestoreError::NotStandby);
            }
        };
        match self.load_into_standby(path, &paused) {
            Ok(image) => {
                self.started = Instant::now();
                self.started_ns = monotonic_ns();
                if let Err(e) = self.vcpus.resume(paused) {
                    // The guest cannot run: end the VM (the request gets the error).
                    let _ = self.stuck(&e);
                }
                self.notify_restored();
                Ok(RestoreReport {
                    image_id: image.0,
                    path: image.1,
                    restore_us: received.elapsed().as_micros() as u64,
                })
            }
            Err(e) => {
                self.activity = Activity::Standby(paused);
                Err(e)
            }
        }
    }

    /// Everything of a standby restore but the resume; gives the image's id and path.
    fn load_into_standby(
        &mut self,
        path: &std::path::Path,
        paused: &Paused,
    ) -> Result<(String, String), StandbyRestoreError> {
        let image = snapshot::load(path)?;
        if image.config.mem_mib != self.cfg.mem_mib || image.config.vcpus != self.cfg.boot.vcpus {
            return Err(StandbyRestoreError::Shape {
                path: path.to_path_buf(),
                image_mib: image.config.mem_mib,
                image_vcpus: image.config.vcpus,
                mib: self.cfg.mem_mib,
                vcpus: self.cfg.boot.vcpus,
            });
        }
        let layouts: Vec<(u64, u64, u64)> = image
            .base()
            .memory_map()
            .iter()
            .map(|m| (m.guest_addr, m.len, m.file_offset))
            .collect();
        memory::map_file_over(&self.mem, image.base().file(), &layouts)
            .map_err(StandbyRestoreError::Map)?;
        snapshot::overlay(&self.mem, &image)?;
        let tsc = restore_vm(&self.vm, &image.machine.vm).map_err(StandbyRestoreError::VmState)?;
        self.vcpus
            .load(paused, &image.machine.vcpus, tsc)
            .map_err(StandbyRestoreError::Vcpu)?;
        self.devices
            .load_state(&self.cfg.console, &image.devices)
            .map_err(|e| StandbyRestoreError::Devices(Box::new(e)))?;
        self.pending_input = image.devices.agent_pending_input.iter().copied().collect();
        self.agent = AgentState::from_app_status(&image.app);
        self.cfg.boot.kernel = boot::KernelSource::parse(&image.config.kernel);
        self.cfg.boot.initrd = image.config.initrd.clone();
        self.cfg.boot.cmdline = image.config.cmdline.clone();
        self.cfg.limits = image.limits.clone();
        if self.cfg.name.is_none() {
            self.cfg.name = image.config.name.clone();
        }
        apply_limits(self.cfg.name.as_deref(), &self.cfg.limits)
            .map_err(|e| StandbyRestoreError::Limits(Box::new(e)))?;
        if let Some(history) = self.history.as_mut() {
            history.adopt(&image);
        }
        // The standby's own (empty) writes are not the guest's: start clean.
        if self.history.is_some() {
            self.take_dirty_log()
                .map_err(|(slot, source)| StandbyRestoreError::DirtyLog { slot, source })?;
        }
        Ok((image.reader.id().to_string(), path.display().to_string()))
    }

    /// Writes this VM's boot image; a failure is logged, the VM runs on.
    /// A warm one is a live snapshot ([`super::live`]): the guest runs on
    /// while its memory is copied, and [`Self::boot_image_written`] follows.
    pub(super) fn write_boot_image(&mut self, mode: BootImageMode) {
        let result = match mode {
            BootImageMode::Recipe => self.write_recipe(),
            BootImageMode::Warm => {
                self.start_live(ImageKind::Boot, super::live::Purpose::BootImage);
                return;
            }
        };
        self.boot_image_written(result, mode);
    }

    /// Records the outcome of writing the boot image.
    pub(super) fn boot_image_written(
        &mut self,
        result: Result<CommittedImage, CheckpointError>,
        mode: BootImageMode,
    ) {
        match result {
            Ok(image) => {
                tracing::info!(path = %image.path.display(), ?mode, "boot image written");
                self.boot_image_path = Some(image.path.display().to_string());
            }
            Err(error) => {
                let error = relive_control::error_chain(&error);
                tracing::error!(%error, ?mode, "cannot write the boot image");
            }
        }
    }

    fn write_recipe(&mut self) -> Result<CommittedImage, CheckpointError> {
        let history = self.history.as_ref().ok_or(CheckpointError::NoImageDir)?;
        let mut writer = ImageWriter::create(history.store.dir(), ImageKind::Boot)
            .map_err(CheckpointError::Commit)?;
        let encode = |section| move |source| CheckpointError::Encode { section, source };
        let config = serde_json::to_vec(&self.image_config()).map_err(encode("config"))?;
        let limits = serde_json::to_vec(&self.cfg.limits).map_err(encode("limits"))?;
        for (kind, payload) in [
            (relive_images::format::SectionKind::Config, config),
            (relive_images::format::SectionKind::Limits, limits),
        ] {
            writer
                .add_section(kind, snapshot::SECTION_VERSION, &payload)
                .map_err(CheckpointError::Commit)?;
        }
        writer.commit().map_err(CheckpointError::Commit)
    }

    /// A full snapshot of the freshly booted guest, kept as a boot image.
    fn image_config(&self) -> ImageConfig {
        ImageConfig {
            vcpus: self.cfg.boot.vcpus,
            mem_mib: self.cfg.mem_mib,
            kernel: self.cfg.boot.kernel.to_string(),
            initrd: self.cfg.boot.initrd.clone(),
            cmdline: self.cfg.boot.cmdline.clone(),
            relive_version: env!("CARGO_PKG_VERSION").to_string(),
            name: self.cfg.name.clone(),
        }
    }

    /// Pages KVM saw written since the last call, per memory region; on
    /// failure, the slot whose log could not be read.
    pub(super) fn take_dirty_log(&self) -> Result<Vec<Vec<PageRun>>, (u32, kvm_ioctls::Error)> {
        super::live::dirty_log(&self.vm, &self.mem)
    }

    /// The VM's state while `paused`: vCPUs, VM-wide KVM state, devices, the
    /// agent's status, and the config and limits it runs with.
    pub(super) fn capture(&mut self, paused: &Paused) -> Result<Captured, CheckpointError> {
        let (mut vcpus, read_at) = self.vcpus.save(paused).map_err(CheckpointError::Vcpu)?;
        let (vm, clock) = save_vm(&self.vm).map_err(CheckpointError::VmState)?;
        // Every TSC as of the clock's instant ("The TSC and the kvmclock").
        if let Some(clock) = clock {
            for (vcpu, reading) in vcpus.iter_mut().zip(read_at) {
                if let Some(reading) = reading {
                    vcpu.set_tsc(reading.at(clock.host_tsc));
                }
            }
        }
        let machine = MachineState { vm, vcpus };
        let device_err = |device| move |source| CheckpointError::Device { device, source };
        let devices = {
            let com1 = lock(&self.devices.com1)
                .save()
                .map_err(device_err("COM1"))?;
            let com2_dev = lock(&self.devices.com2);
            let com2 = com2_dev.save().map_err(device_err("COM2"))?;
            let agent_partial_line = com2_dev.writer().pending().to_string();
            drop(com2_dev);
            let pvpanic = match lock(&self.devices.pvpanic).save() {
                Ok(state) => state,
                Err(never) => match never {},
            };
            DeviceState {
                com1,
                com2,
                agent_partial_line,
                agent_pending_input: self.pending_input.iter().copied().collect(),
                pvpanic,
            }
        };
        Ok(Captured {
            config: self.image_config(),
            limits: self.cfg.limits.clone(),
            machine,
            devices,
            app: AppStatus {
                ready: self.agent.ready,
                last_heartbeat: self.agent.last_heartbeat.clone(),
                last_line: self.agent.last_line.clone(),
                wants_restored: self.agent.wants_restored,
            },
        })
    }
}
