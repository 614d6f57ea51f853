//! The VM: KVM objects, guest memory, devices, vCPU threads and the event loop.
//!
//! Threads of a `relive-vmm` process:
//! - one thread per vCPU ([`crate::vcpu`]), which only runs the guest and
//!   dispatches its exits to the device bus;
//! - the event thread (the caller of [`Vm::run`]), which owns everything else:
//!   it waits with epoll on the devices' eventfds (reset, panic, power-off,
//!   agent lines, COM2 drained), on vCPU exit reports and on control requests,
//!   and decides when the VM ends;
//! - the control socket's accept thread and one thread per client connection
//!   ([`crate::control`]), which only parse requests and hand them to the event
//!   thread.
//!
//! Build order (and why): KVM VM, TSS address, in-kernel irqchip (before any
//! vCPU, so each vCPU gets a LAPIC), PIT, memory slots, kernel and boot
//! structures, devices and their irqfds, then the vCPUs: CPUID, MSRs, regs,
//! sregs, FPU, LAPIC LINT pins, and the MP state of secondary vCPUs.
//!
//! Lock order: a device mutex is taken alone; no code holds two device locks.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, kvm_pit_config, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, BootConfig, BootEntry, SmpStart};
use crate::control::{self, ControlRequest, WatchEnd};
use crate::cpuid::{filter_cpuid, CpuidConfig};
use crate::devices::{
    self, encode_command, AgentConfig, AgentWriter, ConsoleWriter, EventFdTrigger, LinePort,
    PioBus, PowerOff, PvPanic, SerialDevice, SerialEventsSink, I8042,
};
use crate::memory::{self, GuestMemoryMmap};
use crate::persist::{restore_vcpu, restore_vm, save_vm, Persist, TscTarget};
use crate::snapshot::{self, DeviceState, ImageConfig, ImageParts, LoadedImage, MachineState};
use crate::vcpu::{self, PauseError, Paused, Vcpu, VcpuRunState, VcpuSet};
use relive_control::heartbeat;
use relive_control::{
    AgentStatus, AppExit, AppStatus, CheckpointKind, CheckpointReport, ErrorKind, ExitReason,
    ExitRecord, Fault, Request, ResourceLimits, Response, RestoreReport, RunState, VmStatus,
};
use relive_images::format::{ImageId, ImageKind, ImageWriter, PageRun};
use relive_images::store::ImageStore;

mod checkpoint;
mod housekeeping;
mod live;

use checkpoint::ImageHistory;
pub use checkpoint::{CheckpointError, StandbyRestoreError};

/// Address of the three pages KVM needs for the TSS on Intel hosts.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Where COM1 (the console) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or appended to.
    File(PathBuf),
}

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel, initrd, command line, vCPU count.
    pub boot: BootConfig,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// COM1 destination.
    pub console: ConsoleOutput,
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// Directory where checkpoints are written.
    pub images: Option<PathBuf>,
    /// Consistency images kept in `images` (chains of a full image and its layers).
    pub keep_images: usize,
    /// Host resource limits (recorded in every image).
    pub limits: ResourceLimits,
    /// The VM's name: its cgroup is `relive/<name>`.
    pub name: Option<String>,
    /// Write a boot image into `images` (see [`BootImageMode`]).
    pub boot_image: Option<BootImageMode>,
    /// Allow more vCPUs than the host has cores (up to KVM's limit): the
    /// vCPU threads then share cores, and a guest's spinlocks may wait on a
    /// preempted vCPU. Off by default.
    pub overcommit_vcpus: bool,
}

/// What boot image a booting VM writes into its image directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootImageMode {
    /// The recipe only (kernel, initrd, cmdline, config, limits), written at
    /// start: restoring it boots the VM afresh.
    Recipe,
    /// A snapshot taken when the fresh guest first says `ready`: restoring it
    /// is a clean start that skips the boot.
    Warm,
}

/// Incremental layers after which the store merges the chain into a new full image.
pub const MERGE_AFTER_LAYERS: usize = 4;
/// Default number of consistency images kept.
pub const DEFAULT_KEEP_IMAGES: usize = 3;

/// How a VM comes to life.
pub enum Origin {
    /// Boot the kernel.
    Boot,
    /// Resume from a failover image.
    Image(Box<LoadedImage>),
    /// Build everything that does not depend on an image and wait for one.
    Standby,
}

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The event loop's seccomp filter could not be installed.
    #[error("cannot confine the VMM")]
    Seccomp(#[source] crate::seccomp::SeccompError),
    /// `/dev/kvm` cannot be used.
    #[error("cannot open /dev/kvm: is KVM available and are you allowed to use it?")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM call failed while building the VM.
    #[error("{what} failed")]
    KvmCall {
        /// Which call.
        what: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU count is out of range.
    #[error(
        "--vcpus {vcpus} is out of range: use 1 to {max} (this host's cores; \
         --overcommit-vcpus allows up to KVM's limit)"
    )]
    VcpuCount {
        /// Requested.
        vcpus: u32,
        /// Largest allowed.
        max: u32,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// CPUID setup.
    #[error("cannot build the CPUID of vCPU {vcpu}")]
    Cpuid {
        /// The vCPU.
        vcpu: u8,
        /// Why.
        #[source]
        source: crate::cpuid::CpuidError,
    },
    /// Device setup.
    #[error("cannot set up device {device}")]
    Device {
        /// Which device.
        device: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The console file cannot be opened.
    #[error("cannot open console file {path}")]
    Console {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The control socket cannot be created.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The image cannot be used.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// The resource limits cannot be applied.
    #[error("cannot apply the VM's resource limits")]
    Cgroup(#[source] crate::cgroup::CgroupError),
    /// The image directory cannot be used.
    #[error("cannot use the image directory")]
    Store(#[source] relive_images::store::StoreError),
    /// Saved state cannot be loaded into KVM.
    #[error("cannot restore the VM's state")]
    State(#[source] crate::persist::StateError),
    /// A saved device cannot be restored.
    #[error("cannot restore device {device}: {reason}")]
    DeviceState {
        /// Which device.
        device: &'static str,
        /// Why.
        reason: String,
    },
    /// A thread or eventfd could not be created.
    #[error("cannot {what}")]
    Os {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the event thread hears from the other threads.
#[derive(Debug)]
pub enum VmEvent {
    /// A vCPU stopped the VM.
    VcpuExit {
        /// Which vCPU.
        vcpu: u8,
        /// Why.
        reason: ExitReason,
        /// Detail for the exit record.
        detail: String,
    },
    /// A control client asks something.
    Control(ControlRequest),
    /// The writer thread of a live checkpoint.
    Live(live::LiveEvent),
}

/// A cloneable way for other threads to reach the event thread.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: Sender<VmEvent>,
    wake: Arc<EventFd>,
}

impl EventSink {
    /// Sends an event and wakes the event thread.
    pub fn send(&self, event: VmEvent) {
        if self.tx.send(event).is_ok() {
            let _ = self.wake.write(1);
        }
    }

    /// Reports that vCPU `vcpu` stopped the VM.
    pub fn vcpu_exit(&self, vcpu: u8, reason: ExitReason, detail: String) {
        self.send(VmEvent::VcpuExit {
            vcpu,
            reason,
            detail,
        });
    }
}

type Com1 = SerialDevice<ConsoleWriter>;
type Com2 = SerialDevice<AgentWriter>;

struct Devices {
    com1: Arc<Mutex<Com1>>,
    com2: Arc<Mutex<Com2>>,
    pvpanic: Arc<Mutex<PvPanic>>,
    agent_tx: Sender<String>,
    reset_evt: EventFd,
    panic_evt: EventFd,
    power_evt: EventFd,
    agent_evt: EventFd,
    agent_rx: Receiver<String>,
    com2_drained_evt: EventFd,
}

/// A built VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    cfg: VmConfig,
    devices: Devices,
    vcpus: Vec<Vcpu>,
    events_rx: Receiver<VmEvent>,
    events_wake: EventFd,
    sink: EventSink,
    control: Option<control::ControlServer>,
    agent: AgentState,
    pending_input: VecDeque<u8>,
    history: Option<ImageHistory>,
    standby: bool,
    /// Built from an image: the guest hears `restored` once it runs.
    restored: bool,
}

/// The console's writer: stdout, or a file appended to.
fn console_writer(console: &ConsoleOutput) -> Result<ConsoleWriter, VmError> {
    let out: Box<dyn Write + Send> = match console {
        ConsoleOutput::Stdout => Box::new(std::io::stdout()),
        ConsoleOutput::File(path) => Box::new(
            relive_images::private::open_options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmError::Console {
                    path: path.clone(),
                    source,
                })?,
        ),
    };
    Ok(ConsoleWriter::new(out))
}

impl Devices {
    /// Loads saved device state into the devices in place (the bus and the
    /// vCPUs keep their references): each stateful device is rebuilt from
    /// its state around the same interrupt lines and host channels.
    fn load_state(&self, console: &ConsoleOutput, state: &DeviceState) -> Result<(), VmError> {
        let os = |what| move |source| VmError::Os { what, source };
        let restore_err = |device: &'static str| {
            move |e: devices::SerialError| VmError::DeviceState {
                device,
                reason: e.to_string(),
            }
        };
        let mut com1 = lock(&self.com1);
        let irq = com1
            .interrupt_evt()
            .try_clone()
            .map_err(os("clone the COM1 irqfd"))?;
        *com1 = SerialDevice::restore(
            (irq, SerialEventsSink::new(), console_writer(console)?),
            &state.com1,
        )
        .map_err(restore_err("COM1"))?;
        drop(com1);

        let mut agent = AgentWriter::new(
            AgentConfig::default(),
            self.agent_tx.clone(),
            self.agent_evt
                .try_clone()
                .map_err(os("clone the agent eventfd"))?,
        );
        // A partial line carries no newline, so this only refills the framer.
        let _ = agent.write_all(state.agent_partial_line.as_bytes());
        let mut com2 = lock(&self.com2);
        let irq = com2
            .interrupt_evt()
            .try_clone()
            .map_err(os("clone the COM2 irqfd"))?;
        let drained = self
            .com2_drained_evt
            .try_clone()
            .map_err(os("clone the COM2 drain eventfd"))?;
        *com2 = SerialDevice::restore(
            (irq, SerialEventsSink::with_rx_drained(drained), agent),
            &state.com2,
        )
        .map_err(restore_err("COM2"))?;
        drop(com2);

        let panic_evt = self
            .panic_evt
            .try_clone()
            .map_err(os("clone the panic eventfd"))?;
        *lock(&self.pvpanic) = match PvPanic::restore(panic_evt, &state.pvpanic) {
            Ok(dev) => dev,
            Err(never) => match never {},
        };
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn eventfd(what: &'static str) -> Result<EventFd, VmError> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| VmError::Os { what, source })
}

/// Largest vCPU count this host allows: its online cores, capped by KVM.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    cores
        .min(kvm.get_nr_vcpus() as u32)
        .min(u32::from(crate::cpuid::MAX_VCPUS))
}

impl Vm {
    /// Builds the VM: KVM objects, memory, kernel, devices and vCPUs.
    pub fn build(cfg: VmConfig) -> Result<Vm, VmError> {
        Self::assemble(cfg, Origin::Boot)
    }

    /// Builds a standby VM: the KVM VM, irqchip, PIT, memory slots over
    /// untouched anonymous memory, devices and vCPU threads (parked), all
    /// that does not depend on an image. `restore IMAGE` on the control
    /// socket then maps the image's memory over the slots and loads its state.
    pub fn standby(cfg: VmConfig) -> Result<Vm, VmError> {
        Self::assemble(cfg, Origin::Standby)
    }

    /// Builds a VM from a failover image: memory mapped from the image,
    /// KVM and device state loaded; the guest resumes where the image was taken.
    ///
    /// An incremental layer is restored through its chain without merging:
    /// the full image's memory is mapped, then each layer's pages over it.
    pub fn restore(
        image: &std::path::Path,
        console: ConsoleOutput,
        control: Option<PathBuf>,
        images: Option<PathBuf>,
        keep_images: usize,
        name: Option<String>,
        overcommit_vcpus: bool,
    ) -> Result<Vm, VmError> {
        if let Some(recipe) = snapshot::load_recipe(image)? {
            tracing::info!(image = %image.display(), "booting afresh from a boot recipe");
            let cfg = VmConfig {
                boot: BootConfig {
                    kernel: boot::KernelSource::parse(&recipe.config.kernel),
                    initrd: recipe.config.initrd.clone(),
                    cmdline: recipe.config.cmdline.clone(),
                    vcpus: recipe.config.vcpus,
                },
                mem_mib: recipe.config.mem_mib,
                console,
                control,
                images,
                keep_images,
                limits: recipe.limits,
                name: name.or(recipe.config.name),
                boot_image: None,
                overcommit_vcpus,
            };
            return Self::assemble(cfg, Origin::Boot);
        }
        let loaded = snapshot::load(image)?;
        let cfg = VmConfig {
            boot: BootConfig {
                kernel: boot::KernelSource::parse(&loaded.config.kernel),
                initrd: loaded.config.initrd.clone(),
                cmdline: loaded.config.cmdline.clone(),
                vcpus: loaded.config.vcpus,
            },
            mem_mib: loaded.config.mem_mib,
            console,
            control,
            images,
            keep_images,
            limits: loaded.limits.clone(),
            name: name.or_else(|| loaded.config.name.clone()),
            boot_image: None,
            overcommit_vcpus,
        };
        Self::assemble(cfg, Origin::Image(Box::new(loaded)))
    }

    fn assemble(cfg: VmConfig, origin: Origin) -> Result<Vm, VmError> {
        let started = Instant::now();
        // Limits first, so that everything the VM allocates is charged to them.
        apply_limits(cfg.name.as_deref(), &cfg.limits)?;
        let kvm = crate::jail::kvm().map_err(VmError::Kvm)?;
        let max = if cfg.overcommit_vcpus {
            (kvm.get_max_vcpus() as u32).min(u32::from(crate::cpuid::MAX_VCPUS))
        } else {
            max_vcpus(&kvm)
        };
        let vcpus = u32::from(cfg.boot.vcpus);
        if vcpus == 0 || vcpus > max {
            return Err(VmError::VcpuCount { vcpus, max });
        }
        let mut phases = Phases::new();
        let mem = match &origin {
            Origin::Boot | Origin::Standby => memory::create(cfg.mem_mib)?,
            Origin::Image(image) => snapshot::map_memory(image)?,
        };
        phases.mark("memory");
        let kvm_call = |what| move |source| VmError::KvmCall { what, source };
        let vm = kvm.create_vm().map_err(kvm_call("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_call("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_call("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_call("KVM_CREATE_PIT2"))?;
        phases.mark("kvm-vm");
        // Dirty logging feeds incremental checkpoints; only VMs that write images pay for it.
        let slot_flags = if cfg.images.is_some() {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        memory::register(&vm, &mem, slot_flags)?;
        phases.mark("memory-slots");
        let entry = match &origin {
            Origin::Boot => Some(boot::load(&mem, &cfg.boot)?),
            // An image's VM state is loaded with its vCPUs (restore_vcpus).
            Origin::Standby | Origin::Image(_) => None,
        };
        let msr_index = Arc::new(
            kvm.get_msr_index_list()
                .map_err(kvm_call("KVM_GET_MSR_INDEX_LIST"))?
                .as_slice()
                .to_vec(),
        );

        let (events_tx, events_rx) = std::sync::mpsc::channel();
        let events_wake = eventfd("create the event eventfd")?;
        let sink = EventSink {
            tx: events_tx,
            wake: Arc::new(events_wake.try_clone().map_err(|source| VmError::Os {
                what: "clone the event eventfd",
                source,
            })?),
        };
        phases.mark("boot-or-vm-state");
        let (devices, bus) = Self::build_devices(&vm, &mem, &cfg)?;
        if let Origin::Image(image) = &origin {
            devices.load_state(&cfg.console, &image.devices)?;
        }
        phases.mark("devices");
        let vcpus = match (&origin, entry) {
            (Origin::Image(image), _) => {
                Self::restore_vcpus(&vm, &image.machine, &bus, &sink, &msr_index)?
            }
            (Origin::Boot, Some(entry)) => {
                Self::build_vcpus(&kvm, &vm, &cfg, entry, &bus, &sink, &msr_index)?
            }
            (Origin::Standby, _) | (Origin::Boot, None) => {
                Self::create_vcpus(&vm, &cfg, &bus, &sink, &msr_index)?
            }
        };
        phases.mark("vcpus");
        let (agent, pending_input) = match &origin {
            Origin::Boot | Origin::Standby => (AgentState::default(), VecDeque::new()),
            Origin::Image(image) => (
                AgentState::from_app_status(&image.app),
                image.devices.agent_pending_input.iter().copied().collect(),
            ),
        };
        let history = match &cfg.images {
            None => None,
            Some(dir) => {
                if let Ok(Some(mode)) = relive_images::private::tighten_dir(dir) {
                    tracing::warn!(
                        dir = %dir.display(),
                        was = format!("{mode:04o}"),
                        "image directory was readable by others: narrowed to 0700"
                    );
                }
                let store = ImageStore::open(dir, cfg.keep_images).map_err(VmError::Store)?;
                let mut history = ImageHistory::new(store);
                match &origin {
                    Origin::Image(image) => history.adopt(image),
                    _ => history.verify_missing(),
                }
                Some(history)
            }
        };
        let standby = matches!(origin, Origin::Standby);
        let restored = matches!(origin, Origin::Image(_));
        let control = match &cfg.control {
            Some(path) => Some(control::ControlServer::bind(path, sink.clone())?),
            None => None,
        };
        phases.mark("images-and-control");
        tracing::debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            phases = %phases,
            "VM built"
        );
        Ok(Vm {
            _kvm: kvm,
            vm,
            mem,
            cfg,
            devices,
            vcpus,
            events_rx,
            events_wake,
            sink,
            control,
            agent,
            pending_input,
            history,
            standby,
            restored,
        })
    }

    /// vCPUs with no state yet (a standby's): configured when an image comes.
    fn create_vcpus(
        vm: &VmFd,
        cfg: &VmConfig,
        bus: &PioBus,
        sink: &EventSink,
        msr_index: &Arc<Vec<u32>>,
    ) -> Result<Vec<Vcpu>, VmError> {
        (0..cfg.boot.vcpus)
            .map(|id| {
                let fd = vm
                    .create_vcpu(u64::from(id))
                    .map_err(|source| VmError::KvmCall {
                        what: "KVM_CREATE_VCPU",
                        source,
                    })?;
                Ok(Vcpu::new(
                    id,
                    fd,
                    bus.clone(),
                    sink.clone(),
                    msr_index.clone(),
                ))
            })
            .collect()
    }

    /// The VM state and the vCPUs of `machine`, their state loaded. The
    /// vCPUs are created first: KVM reads its clock against the host TSC
    /// (its master clock) only once a VM has vCPUs, and their TSCs are
    /// written against that reading ("The TSC and the kvmclock" in
    /// [`crate::persist`]).
    fn restore_vcpus(
        vm: &VmFd,
        machine: &MachineState,
        bus: &PioBus,
        sink: &EventSink,
        msr_index: &Arc<Vec<u32>>,
    ) -> Result<Vec<Vcpu>, VmError> {
        let fds = machine
            .vcpus
            .iter()
            .map(|state| {
                vm.create_vcpu(u64::from(state.id))
                    .map_err(|source| VmError::KvmCall {
                        what: "KVM_CREATE_VCPU",
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tsc: Option<TscTarget> = restore_vm(vm, &machine.vm).map_err(VmError::State)?;
        let mut vcpus = Vec::with_capacity(machine.vcpus.len());
        for (state, fd) in machine.vcpus.iter().zip(fds) {
            restore_vcpu(&fd, state, tsc.as_ref()).map_err(VmError::State)?;
            if tracing::enabled!(tracing::Level::DEBUG) {
                match crate::persist::save_vcpu(state.id, &fd, msr_index) {
                    Ok(now) => {
                        for difference in crate::persist::differences(state, &now) {
                            tracing::debug!(vcpu = state.id, %difference, "restore self-check");
                        }
                    }
                    Err(e) => {
                        tracing::debug!(vcpu = state.id, error = %e, "restore self-check failed")
                    }
                }
            }
            vcpus.push(Vcpu::new(
                state.id,
                fd,
                bus.clone(),
                sink.clone(),
                msr_index.clone(),
            ));
        }
        Ok(vcpus)
    }

    fn build_devices(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        cfg: &VmConfig,
    ) -> Result<(Devices, PioBus), VmError> {
        let dev_err = |device| move |source| VmError::Device { device, source };
        let com1_irq = eventfd("create the COM1 irqfd")?;
        vm.register_irqfd(&com1_irq, devices::COM1_IRQ)
            .map_err(|e| VmError::KvmCall {
                what: "KVM_IRQFD (COM1)",
                source: e,
            })?;
        let com1 = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new(com1_irq),
            SerialEventsSink::new(),
            console_writer(&cfg.console)?,
        )));

        let com2_irq = eventfd("create the COM2 irqfd")?;
        vm.register_irqfd(&com2_irq, devices::COM2_IRQ)
            .map_err(|e| VmError::KvmCall {
                what: "KVM_IRQFD (COM2)",
                source: e,
            })?;
        let (agent_tx, agent_rx) = std::sync::mpsc::channel();
        let agent_evt = eventfd("create the agent eventfd")?;
        let com2_drained_evt = eventfd("create the COM2 drain eventfd")?;
        let com2 = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new(com2_irq),
            SerialEventsSink::with_rx_drained(
                com2_drained_evt.try_clone().map_err(dev_err("COM2"))?,
            ),
            AgentWriter::new(
                AgentConfig::default(),
                agent_tx.clone(),
                agent_evt.try_clone().map_err(dev_err("agent channel"))?,
            ),
        )));

        let reset_evt = eventfd("create the reset eventfd")?;
        let i8042 = Arc::new(Mutex::new(I8042::new(EventFdTrigger::new(
            reset_evt.try_clone().map_err(dev_err("i8042"))?,
        ))));
        let panic_evt = eventfd("create the panic eventfd")?;
        let pvpanic = Arc::new(Mutex::new(PvPanic::new(
            panic_evt.try_clone().map_err(dev_err("pvpanic"))?,
        )));
        let power_evt = eventfd("create the power-off eventfd")?;
        let power = Arc::new(Mutex::new(PowerOff::new(
            power_evt.try_clone().map_err(dev_err("power-off port"))?,
        )));

        let line_port = Arc::new(Mutex::new(LinePort::new(mem.clone(), com2.clone())));
        let mut bus = PioBus::new();
        let bus_err = |device| {
            move |e: devices::BusError| VmError::Device {
                device,
                source: std::io::Error::other(e),
            }
        };
        bus.insert(
            com1.clone(),
            devices::COM1_PORT_BASE,
            devices::SERIAL_PORT_LEN,
        )
        .map_err(bus_err("COM1"))?;
        bus.insert(
            com2.clone(),
            devices::COM2_PORT_BASE,
            devices::SERIAL_PORT_LEN,
        )
        .map_err(bus_err("COM2"))?;
        bus.insert(line_port, devices::LINE_PORT, devices::LINE_PORT_LEN)
            .map_err(bus_err("agent line port"))?;
        bus.insert(i8042, devices::I8042_PORT_BASE, devices::I8042_PORT_LEN)
            .map_err(bus_err("i8042"))?;
        bus.insert(
            pvpanic.clone(),
            devices::PVPANIC_PORT,
            devices::PVPANIC_PORT_LEN,
        )
        .map_err(bus_err("pvpanic"))?;
        bus.insert(power, devices::POWER_PORT, devices::POWER_PORT_LEN)
            .map_err(bus_err("power-off port"))?;
        Ok((
            Devices {
                com1,
                com2,
                pvpanic: pvpanic.clone(),
                agent_tx,
                reset_evt,
                panic_evt,
                power_evt,
                agent_evt,
                agent_rx,
                com2_drained_evt,
            },
            bus,
        ))
    }

    fn build_vcpus(
        kvm: &Kvm,
        vm: &VmFd,
        cfg: &VmConfig,
        entry: BootEntry,
        bus: &PioBus,
        sink: &EventSink,
        msr_index: &Arc<Vec<u32>>,
    ) -> Result<Vec<Vcpu>, VmError> {
        let kvm_call = |what| move |source| VmError::KvmCall { what, source };
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_call("KVM_GET_SUPPORTED_CPUID"))?;
        let cpuid_cfg = CpuidConfig {
            vcpu_count: cfg.boot.vcpus,
        };
        let mut vcpus = Vec::with_capacity(usize::from(cfg.boot.vcpus));
        for id in 0..cfg.boot.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_call("KVM_CREATE_VCPU"))?;
            let cpuid = filter_cpuid(&supported, id, &cpuid_cfg)
                .map_err(|source| VmError::Cpuid { vcpu: id, source })?;
            fd.set_cpuid2(&cpuid).map_err(kvm_call("KVM_SET_CPUID2"))?;
            let msrs = boot::boot_msrs().map_err(|e| VmError::Os {
                what: "build the boot MSR list",
                source: std::io::Error::other(e),
            })?;
            fd.set_msrs(&msrs).map_err(kvm_call("KVM_SET_MSRS"))?;
            fd.set_regs(&boot::boot_regs(entry.entry))
                .map_err(kvm_call("KVM_SET_REGS"))?;
            let sregs = fd.get_sregs().map_err(kvm_call("KVM_GET_SREGS"))?;
            fd.set_sregs(&boot::boot_sregs(sregs))
                .map_err(kvm_call("KVM_SET_SREGS"))?;
            fd.set_fpu(&boot::boot_fpu())
                .map_err(kvm_call("KVM_SET_FPU"))?;
            let mut lapic = fd.get_lapic().map_err(kvm_call("KVM_GET_LAPIC"))?;
            boot::set_lint(&mut lapic);
            fd.set_lapic(&lapic).map_err(kvm_call("KVM_SET_LAPIC"))?;
            if id > 0 && entry.smp_start == SmpStart::Direct {
                fd.set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(kvm_call("KVM_SET_MP_STATE"))?;
            }
            vcpus.push(Vcpu::new(
                id,
                fd,
                bus.clone(),
                sink.clone(),
                msr_index.clone(),
            ));
        }
        Ok(vcpus)
    }

    /// Runs the VM until it stops; returns why.
    pub fn run(self) -> Result<ExitRecord, VmError> {
        vcpu::install_kick_handler().map_err(|source| VmError::Os {
            what: "install the vCPU kick signal handler",
            source,
        })?;
        let term_evt = eventfd("create the termination eventfd")?;
        install_termination_handler(&term_evt).map_err(|source| VmError::Os {
            what: "install the SIGTERM/SIGINT handler",
            source,
        })?;
        let Vm {
            _kvm,
            vm,
            mem,
            cfg,
            devices,
            vcpus,
            events_rx,
            events_wake,
            sink,
            control,
            agent,
            pending_input,
            history,
            standby,
            restored,
        } = self;
        let started = Instant::now();
        let started_ns = monotonic_ns();
        let initial = if standby {
            VcpuRunState::Paused
        } else {
            VcpuRunState::Running
        };
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            handles.push(vcpu.start(initial).map_err(|source| VmError::Os {
                what: "spawn a vCPU thread",
                source,
            })?);
        }
        let (vcpus, parked) = VcpuSet::new(handles, PAUSE_TIMEOUT, initial);
        if let Some(control) = &control {
            control.start().map_err(|source| VmError::Os {
                what: "spawn the control socket thread",
                source,
            })?;
        }
        // The control socket serves: say so to whoever started this VMM
        // (before the filter, which forbids creating sockets).
        notify_ready();
        // Setup is over: from here on this thread only runs the VM.
        crate::seccomp::install(crate::seccomp::ThreadKind::EventLoop).map_err(VmError::Seccomp)?;
        let mut event_loop = EventLoop {
            vm: Arc::new(vm),
            mem,
            cfg,
            devices,
            vcpus,
            events_rx,
            events_wake,
            term_evt,
            _sink: sink,
            started,
            started_ns,
            activity: match parked {
                Some(paused) => Activity::Standby(paused),
                None => Activity::Running,
            },
            fatal: None,
            agent,
            pending_input,
            history,
            boot_image_path: None,
            copy_buffer: Vec::new(),
            watchers: Vec::new(),
            reply_acks: Vec::new(),
            live: None,
            fence_deadline: None,
        };
        if event_loop.cfg.boot_image == Some(BootImageMode::Recipe) {
            event_loop.write_boot_image(BootImageMode::Recipe);
        }
        if restored {
            event_loop.notify_restored();
        }
        let record = event_loop.run();
        // The vCPUs stop and the control socket goes before the watchers hear
        // why: once a supervisor has the record, nothing of this VM runs or
        // answers any more.
        event_loop.stop();
        drop(control);
        event_loop.end_watches(&record);
        Ok(record)
    }
}

#[derive(Default)]
struct AgentState {
    ready: bool,
    ready_monotonic_ns: Option<u64>,
    lines: u64,
    last_line: Option<String>,
    last_heartbeat: Option<String>,
    last_line_at: Option<Instant>,
    last_heartbeat_at: Option<Instant>,
    /// The agent's `app exited ...`, parsed, and the line.
    app_exit: Option<(AppExit, String)>,
    /// Its `ready` line asked for the `restored` notice.
    wants_restored: bool,
}

impl AgentState {
    fn from_app_status(app: &AppStatus) -> Self {
        AgentState {
            ready: app.ready,
            last_line: app.last_line.clone(),
            last_heartbeat: app.last_heartbeat.clone(),
            wants_restored: app.wants_restored,
            ..AgentState::default()
        }
    }
}

/// What the vCPUs are doing, with the proof of a pause where they are parked.
enum Activity {
    /// Running the guest.
    Running,
    /// Paused by a `pause` request.
    Paused(Paused),
    /// A standby VMM: parked, no guest yet.
    Standby(Paused),
}

impl Activity {
    fn run_state(&self) -> RunState {
        match self {
            Activity::Running => RunState::Running,
            Activity::Paused(_) => RunState::Paused,
            Activity::Standby(_) => RunState::Standby,
        }
    }
}

/// A `watch` client: its queue of lines and where its exit record goes.
struct Watcher {
    lines: SyncSender<Response>,
    end: WatchEnd,
}

struct EventLoop {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    cfg: VmConfig,
    devices: Devices,
    vcpus: VcpuSet,
    events_rx: Receiver<VmEvent>,
    events_wake: EventFd,
    term_evt: EventFd,
    _sink: EventSink,
    started: Instant,
    started_ns: u64,
    activity: Activity,
    /// Set when the VM cannot go on (a vCPU stopped answering): the event
    /// loop ends the VM with it after the current event.
    fatal: Option<ExitRecord>,
    agent: AgentState,
    /// Host-to-guest agent bytes that did not fit in the COM2 FIFO yet.
    pending_input: VecDeque<u8>,
    history: Option<ImageHistory>,
    /// The boot image written by this VM.
    boot_image_path: Option<String>,
    /// Dirty pages are copied here during an incremental checkpoint's pause
    /// (kept between checkpoints so its pages are not faulted in again).
    copy_buffer: Vec<u8>,
    watchers: Vec<Watcher>,
    /// Requests answered whose connections may not have written the
    /// answer yet ([`EventLoop::end_watches`] waits for them).
    reply_acks: Vec<WatchEnd>,
    /// The live checkpoint being taken.
    live: Option<live::LiveCheckpoint>,
    /// The fencing deadline a `fence` request armed.
    fence_deadline: Option<Instant>,
}

const TOKEN_EVENTS: u64 = 1;
const TOKEN_RESET: u64 = 2;
const TOKEN_PANIC: u64 = 3;
const TOKEN_POWER: u64 = 4;
const TOKEN_AGENT: u64 = 5;
const TOKEN_COM2_DRAINED: u64 = 6;
const TOKEN_TERM: u64 = 7;

/// How often the console's partial line is flushed while the guest is quiet.
const CONSOLE_FLUSH_INTERVAL_MS: i32 = 200;
/// Lines queued for one `watch` client before lines are dropped for it.
pub const WATCH_QUEUE: usize = 1024;
/// How long an ending VMM waits for its `watch` clients to be sent its exit record.
const WATCH_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

impl EventLoop {
    fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn run(&mut self) -> ExitRecord {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                return ExitRecord::new(
                    ExitReason::KvmError,
                    self.uptime_ms(),
                    format!("cannot create epoll: {e}"),
                )
            }
        };
        let sources = [
            (self.events_wake.as_raw_fd(), TOKEN_EVENTS),
            (self.devices.reset_evt.as_raw_fd(), TOKEN_RESET),
            (self.devices.panic_evt.as_raw_fd(), TOKEN_PANIC),
            (self.devices.power_evt.as_raw_fd(), TOKEN_POWER),
            (self.devices.agent_evt.as_raw_fd(), TOKEN_AGENT),
            (
                self.devices.com2_drained_evt.as_raw_fd(),
                TOKEN_COM2_DRAINED,
            ),
            (self.term_evt.as_raw_fd(), TOKEN_TERM),
        ];
        for (fd, token) in sources {
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            ) {
                return ExitRecord::new(
                    ExitReason::KvmError,
                    self.uptime_ms(),
                    format!("cannot register an eventfd with epoll: {e}"),
                );
            }
        }
        let mut ready = vec![EpollEvent::default(); sources.len()];
        loop {
            let timeout = match self.fence_deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Rounded up: waking before the deadline only waits again.
                    let ms = left.as_micros().div_ceil(1000);
                    i32::try_from(ms).map_or(CONSOLE_FLUSH_INTERVAL_MS, |ms| {
                        ms.min(CONSOLE_FLUSH_INTERVAL_MS)
                    })
                }
                None => CONSOLE_FLUSH_INTERVAL_MS,
            };
            let n = match epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    return ExitRecord::new(
                        ExitReason::KvmError,
                        self.uptime_ms(),
                        format!("epoll_wait failed: {e}"),
                    )
                }
            };
            if n == 0 {
                self.flush_console();
            }
            if let Some(record) = self.fence_due() {
                return record;
            }
            for event in &ready[..n] {
                if let Some(record) = self.on_ready(event.data()) {
                    return self.with_app_exit(record);
                }
                if let Some(record) = self.fatal.take() {
                    return record;
                }
            }
        }
    }

    /// The fencing deadline passed: the VM ends (`fenced`).
    fn fence_due(&mut self) -> Option<ExitRecord> {
        let deadline = self.fence_deadline?;
        let now = Instant::now();
        (now >= deadline).then(|| {
            ExitRecord::new(
                ExitReason::Fenced,
                self.uptime_ms(),
                format!(
                    "the fencing deadline passed {} ms ago without a renewal: the supervisor or \
                     its host's cluster lease is gone",
                    now.duration_since(deadline).as_millis()
                ),
            )
        })
    }

    /// A power-off that follows the agent's `app exited ...` is the app's
    /// end ([`ExitReason::AppExit`]). The agent's last lines may still wait
    /// in the channel (its eventfd and the power-off's can come in one
    /// wake-up, in either order): they are taken first.
    fn with_app_exit(&mut self, record: ExitRecord) -> ExitRecord {
        if record.reason != ExitReason::Exit {
            return record;
        }
        while let Ok(line) = self.devices.agent_rx.try_recv() {
            self.on_agent_line(line);
        }
        match self.agent.app_exit.take() {
            Some((app, line)) => ExitRecord {
                app: Some(app),
                ..ExitRecord::new(
                    ExitReason::AppExit,
                    record.uptime_ms,
                    format!("the app ended ({line}), then the guest powered off"),
                )
            },
            None => record,
        }
    }

    fn on_ready(&mut self, token: u64) -> Option<ExitRecord> {
        let uptime = self.uptime_ms();
        match token {
            TOKEN_EVENTS => {
                let _ = self.events_wake.read();
                while let Ok(event) = self.events_rx.try_recv() {
                    if let Some(record) = self.on_event(event) {
                        return Some(record);
                    }
                }
                None
            }
            TOKEN_RESET => {
                let _ = self.devices.reset_evt.read();
                Some(ExitRecord::new(
                    ExitReason::Reset,
                    uptime,
                    "i8042: the guest asked for a CPU reset",
                ))
            }
            TOKEN_PANIC => {
                let _ = self.devices.panic_evt.read();
                Some(ExitRecord::new(
                    ExitReason::Panic,
                    uptime,
                    "pvpanic: the guest reported a panic",
                ))
            }
            TOKEN_POWER => {
                let _ = self.devices.power_evt.read();
                Some(ExitRecord::new(
                    ExitReason::Exit,
                    uptime,
                    "power-off port: the guest powered off",
                ))
            }
            TOKEN_AGENT => {
                let _ = self.devices.agent_evt.read();
                while let Ok(line) = self.devices.agent_rx.try_recv() {
                    self.on_agent_line(line);
                }
                None
            }
            TOKEN_TERM => {
                let _ = self.term_evt.read();
                Some(ExitRecord::new(
                    ExitReason::Shutdown,
                    uptime,
                    "SIGTERM/SIGINT: shutdown requested",
                ))
            }
            TOKEN_COM2_DRAINED => {
                let _ = self.devices.com2_drained_evt.read();
                self.push_pending_input();
                None
            }
            _ => None,
        }
    }

    fn on_event(&mut self, event: VmEvent) -> Option<ExitRecord> {
        match event {
            VmEvent::VcpuExit {
                vcpu,
                reason,
                detail,
            } => Some(ExitRecord::new(
                reason,
                self.uptime_ms(),
                format!("vcpu{vcpu}: {detail}"),
            )),
            VmEvent::Control(request) => self.on_control(request),
            VmEvent::Live(event) => {
                self.on_live(event);
                None
            }
        }
    }

    fn on_agent_line(&mut self, line: String) {
        let now = Instant::now();
        self.agent.lines += 1;
        if heartbeat::is_heartbeat(&line) {
            self.agent.last_heartbeat_at = Some(now);
            self.agent.last_heartbeat = Some(line.clone());
        } else if let Some(app) = AppExit::parse(&line) {
            self.agent.app_exit = Some((app, line.clone()));
        } else if heartbeat::is_ready(&line) {
            let first = !self.agent.ready;
            self.agent.ready = true;
            self.agent.wants_restored = heartbeat::wants_notice(&line, "restored");
            self.agent.ready_monotonic_ns = Some(monotonic_ns());
            // A warm boot image needs the vCPUs: not once they have stopped.
            if first && self.cfg.boot_image == Some(BootImageMode::Warm) && !self.vcpus.finished() {
                self.write_boot_image(BootImageMode::Warm);
            }
        }
        self.agent.last_line_at = Some(now);
        self.tell_watchers(&Response::Agent { line: line.clone() });
        self.agent.last_line = Some(line);
    }

    /// Queues `response` on every `watch` connection (a full queue drops it
    /// for that one; a closed one is forgotten).
    fn tell_watchers(&mut self, response: &Response) {
        self.watchers
            .retain(|w| match w.lines.try_send(response.clone()) {
                Ok(()) | Err(TrySendError::Full(_)) => true,
                Err(TrySendError::Disconnected(_)) => false,
            });
    }

    /// Tells the guest it was restored ([`devices::agent::restored_notice`]),
    /// after whatever input the image had queued, if it asked for that: a
    /// guest that did not would only spend exits reading it.
    fn notify_restored(&mut self) {
        if !self.agent.wants_restored {
            return;
        }
        match devices::agent::restored_notice() {
            Ok(notice) => {
                self.pending_input.extend(notice);
                self.push_pending_input();
            }
            Err(e) => tracing::warn!(error = %e, "cannot tell the guest it was restored"),
        }
    }

    fn push_pending_input(&mut self) {
        if self.pending_input.is_empty() {
            return;
        }
        let (front, _) = self.pending_input.as_slices();
        let chunk: Vec<u8> = front.to_vec();
        let taken = match lock(&self.devices.com2).enqueue(&chunk) {
            Ok(n) => n,
            Err(devices::SerialError::InputInterrupt { queued, .. }) => queued,
            Err(e) => {
                tracing::warn!(error = %e, "cannot pass agent input to COM2");
                0
            }
        };
        self.pending_input
            .drain(..taken.min(self.pending_input.len()));
    }

    fn on_control(&mut self, request: ControlRequest) -> Option<ExitRecord> {
        let ControlRequest {
            request,
            reply,
            mut watch_end,
        } = request;
        // Every answer is written before the process ends (an `agent
        // crash` answered just before the guest triple-faults included):
        // the connection's end is kept until it has written, and waited for
        // with the watches' ends.
        self.reply_acks.retain(|ack| !ack.is_written());
        if !matches!(request, Request::Watch) {
            self.reply_acks.extend(watch_end.take());
        }
        let standby = matches!(self.activity, Activity::Standby(_));
        let answer = match request {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Shutdown => {
                let _ = reply.send(Response::Ok);
                return Some(ExitRecord::new(
                    ExitReason::Shutdown,
                    self.uptime_ms(),
                    "control socket: shutdown requested",
                ));
            }
            Request::Agent { .. } if standby => no_guest(),
            Request::Agent { line } => match encode_command(&line) {
                Ok(bytes) => {
                    self.pending_input.extend(bytes);
                    self.push_pending_input();
                    Response::Ok
                }
                Err(e) => Response::error(ErrorKind::AgentRefused, &e),
            },
            Request::Watch => {
                if let Some(end) = watch_end {
                    if reply.send(Response::Ok).is_ok() {
                        self.watchers.push(Watcher { lines: reply, end });
                    }
                }
                return None;
            }
            Request::Pause => self.pause_request(),
            Request::Resume => self.resume_request(),
            Request::Restore { image } => {
                match self.restore_standby(std::path::Path::new(&image)) {
                    Ok(report) => Response::Restored(report),
                    Err(e) => Response::error(e.kind(), &e),
                }
            }
            Request::Checkpoint { kind } => {
                // Answered once the image is committed (`on_live`).
                self.checkpoint_request(kind, reply);
                return None;
            }
            Request::Fence { within_ms: 0 } => {
                self.fence_deadline = None;
                Response::Ok
            }
            Request::Fence { within_ms } => {
                // Only ever later: a renewal overtaken by an older one on
                // its way (each comes on its own connection) keeps its
                // deadline.
                let asked = Instant::now() + Duration::from_millis(within_ms);
                self.fence_deadline = Some(self.fence_deadline.map_or(asked, |d| d.max(asked)));
                Response::Ok
            }
            Request::InjectFault {
                fault: Fault::ForbiddenSyscall,
            } => forbidden_syscall(),
            Request::InjectFault {
                fault: Fault::ReadHostFile,
            } => read_host_file(),
        };
        let _ = reply.send(answer);
        None
    }

    /// `pause`: every vCPU stops, or none does.
    fn pause_request(&mut self) -> Response {
        match self.activity {
            Activity::Standby(_) => return no_guest(),
            Activity::Paused(_) => return Response::Ok,
            Activity::Running => {}
        }
        match self.vcpus.pause() {
            Ok(paused) => {
                self.activity = Activity::Paused(paused);
                Response::Ok
            }
            Err(e) => self.pause_failed(e),
        }
    }

    /// `resume`.
    fn resume_request(&mut self) -> Response {
        match std::mem::replace(&mut self.activity, Activity::Running) {
            Activity::Running => Response::Ok,
            Activity::Standby(paused) => {
                self.activity = Activity::Standby(paused);
                no_guest()
            }
            Activity::Paused(paused) => match self.vcpus.resume(paused) {
                Ok(()) => Response::Ok,
                Err(e) => self.stuck(&e),
            },
        }
    }

    /// The answer to a failed pause; a stuck vCPU also ends the VM.
    fn pause_failed(&mut self, e: PauseError) -> Response {
        match e {
            PauseError::Timeout(_) => Response::error(ErrorKind::PauseTimeout, &e),
            PauseError::Stuck(_) => self.stuck(&e),
        }
    }

    /// A vCPU stopped answering: the VM ends after this event with a
    /// `vcpu-stuck` exit (the client that asked gets the error first).
    fn stuck(&mut self, e: &dyn std::error::Error) -> Response {
        let detail = relive_control::error_chain(e);
        tracing::error!(error = %detail, "ending the VM: a vCPU stopped answering");
        self.fatal = Some(ExitRecord::new(
            ExitReason::VcpuStuck,
            self.uptime_ms(),
            detail.clone(),
        ));
        Response::Error {
            kind: ErrorKind::PauseTimeout,
            error: format!("{detail}; the VM is ending"),
        }
    }

    /// Runs `f` with every vCPU paused: a running VM is paused first and
    /// resumed after (a paused or standby VM stays as it is). A vCPU that
    /// does not resume ends the VM (see [`EventLoop::stuck`]).
    fn with_paused<T>(&mut self, f: impl FnOnce(&mut Self, &Paused) -> T) -> Result<T, PauseError> {
        match std::mem::replace(&mut self.activity, Activity::Running) {
            Activity::Running => {
                let paused = match self.vcpus.pause() {
                    Ok(paused) => paused,
                    Err(e) => {
                        if let PauseError::Stuck(_) = e {
                            let _ = self.stuck(&e);
                        }
                        return Err(e);
                    }
                };
                let out = f(self, &paused);
                if let Err(e) = self.vcpus.resume(paused) {
                    let _ = self.stuck(&e);
                }
                Ok(out)
            }
            Activity::Paused(paused) => {
                let out = f(self, &paused);
                self.activity = Activity::Paused(paused);
                Ok(out)
            }
            Activity::Standby(paused) => {
                let out = f(self, &paused);
                self.activity = Activity::Standby(paused);
                Ok(out)
            }
        }
    }

    /// Sends `record` as the last message of every `watch` and waits (at most
    /// [`WATCH_FLUSH_TIMEOUT`]) until each connection has written it.
    fn end_watches(&mut self, record: &ExitRecord) {
        let deadline = Instant::now() + WATCH_FLUSH_TIMEOUT;
        let ends: Vec<WatchEnd> = self
            .watchers
            .drain(..)
            .map(|w| {
                w.end.set_record(record.clone());
                // Dropping the queue's sender lets the connection write what is
                // queued, then the record.
                drop(w.lines);
                w.end
            })
            .chain(self.reply_acks.drain(..))
            .collect();
        for end in ends {
            end.wait_written(deadline);
        }
    }

    fn status(&self) -> VmStatus {
        let now = Instant::now();
        let age = |t: Option<Instant>| t.map(|t| now.duration_since(t).as_millis() as u64);
        let stats = lock(&self.devices.com2).writer().stats();
        let (exits, io_exits) = self.vcpus.handles().iter().fold((0, 0), |(e, io), h| {
            (
                e + h.stats().exits.load(Ordering::Relaxed),
                io + h.stats().io_exits.load(Ordering::Relaxed),
            )
        });
        VmStatus {
            state: self.activity.run_state(),
            uptime_ms: self.uptime_ms(),
            vcpus_started_monotonic_ns: self.started_ns,
            vcpus: self.cfg.boot.vcpus,
            vcpu_exits: exits,
            io_exits,
            mem_mib: self.cfg.mem_mib,
            guest_resident_bytes: memory::resident_bytes(&self.mem),
            pid: crate::jail::host_pid(),
            kernel: self.cfg.boot.kernel.to_string(),
            name: self.cfg.name.clone(),
            limits: self.cfg.limits.clone(),
            boot_image: self.boot_image_path.clone(),
            agent: AgentStatus {
                ready: self.agent.ready,
                lines: self.agent.lines,
                dropped_lines: stats.dropped_lines,
                truncated_lines: stats.truncated_lines,
                last_line: self.agent.last_line.clone(),
                last_line_age_ms: age(self.agent.last_line_at),
                last_heartbeat_age_ms: age(self.agent.last_heartbeat_at),
                ready_monotonic_ns: self.agent.ready_monotonic_ns,
            },
            chain: self
                .history
                .as_ref()
                .map(ImageHistory::chain_status)
                .unwrap_or_default(),
        }
    }

    fn flush_console(&self) {
        let _ = lock(&self.devices.com1).writer_mut().flush_buffered();
    }

    /// Stops every vCPU thread and flushes the console.
    /// Stops the vCPUs, then hands on what the guest wrote before they
    /// stopped: the console's last bytes, and agent lines still queued because
    /// the exit that ended the loop was read first (a guest that acknowledges
    /// `crash` and triple-faults gets both woken in one `epoll_wait`).
    fn stop(&mut self) {
        if let Some(mut live) = self.live.take() {
            live.cancel();
        }
        self.vcpus.finish();
        self.flush_console();
        while let Ok(line) = self.devices.agent_rx.try_recv() {
            self.on_agent_line(line);
        }
    }
}

/// Puts this process into the cgroup `relive/<name>` with `limits`; nothing
/// to do when no limit is set. A VM with limits needs a name.
fn apply_limits(name: Option<&str>, limits: &ResourceLimits) -> Result<(), VmError> {
    if limits == &ResourceLimits::default() {
        return Ok(());
    }
    let fallback = format!("vmm-{}", std::process::id());
    let name = name.unwrap_or(&fallback);
    if crate::jail::limits_fixed(name, limits).is_some() {
        // Applied before the jail, and fixed since.
        return Ok(());
    }
    crate::cgroup::apply(name, limits).map_err(VmError::Cgroup)?;
    Ok(())
}

/// Durations of the steps of building a VM, for the debug log.
struct Phases {
    last: Instant,
    done: Vec<(&'static str, u64)>,
}

impl Phases {
    fn new() -> Self {
        Phases {
            last: Instant::now(),
            done: Vec::new(),
        }
    }

    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done
            .push((name, now.duration_since(self.last).as_micros() as u64));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, us)) in self.done.iter().enumerate() {
            write!(f, "{}{name}={us}us", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

static TERMINATION_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_termination(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = TERMINATION_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer
        // and `fd` is an eventfd kept open for the life of the process.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Requests from SIGTERM/SIGINT arrive as a `shutdown` on the event thread.
fn install_termination_handler(wake: &EventFd) -> std::io::Result<()> {
    let fd = wake.try_clone()?;
    let raw = fd.as_raw_fd();
    // The clone stays open for the rest of the process: the handler may run at any time.
    std::mem::forget(fd);
    TERMINATION_FD.store(raw, Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, on_termination)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

const STANDBY_HAS_NO_GUEST: &str =
    "this is a standby VMM with no guest yet: restore an image first";

fn no_guest() -> Response {
    Response::Error {
        kind: ErrorKind::WrongState,
        error: STANDBY_HAS_NO_GUEST.into(),
    }
}

/// Time the event thread waits for vCPUs to acknowledge a pause.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The host file [`Fault::ReadHostFile`] tries to read.
pub const HOST_FILE: &str = "/etc/hostname";

/// [`Fault::ReadHostFile`]: reads a host file that a jail does not keep.
fn read_host_file() -> Response {
    match std::fs::read(HOST_FILE) {
        Ok(bytes) => Response::Drill {
            held: false,
            detail: format!(
                "read {HOST_FILE} ({} bytes): this VMM sees the host's files (it is not jailed)",
                bytes.len()
            ),
        },
        Err(e) => Response::Drill {
            held: true,
            detail: format!("cannot open {HOST_FILE}: {e}"),
        },
    }
}

/// [`Fault::ForbiddenSyscall`]: opens an IPv4 socket, which no VMM thread
/// may. Under seccomp this does not return (the SIGSYS handler ends the
/// process with the `seccomp` exit).
fn forbidden_syscall() -> Response {
    // SAFETY: socket(2) takes no pointers; the descriptor, if any, is
    // closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by socket(2) and is owned here.
        unsafe { libc::close(fd) };
    }
    Response::Error {
        kind: ErrorKind::Other,
        error: "the forbidden system call (socket(AF_INET)) was allowed: seccomp is off \
                (--no-seccomp)"
            .into(),
    }
}

/// The readiness socket, connected before a jail hid its path
/// ([`preconnect_notify`]).
static NOTIFY: Mutex<Option<std::os::unix::net::UnixDatagram>> = Mutex::new(None);

/// Connects a datagram socket to `NOTIFY_SOCKET` now, for [`notify`] to use
/// later: a jailed VMM's root and network namespace no longer reach its path
/// (or abstract name). Nothing without `NOTIFY_SOCKET`.
pub fn preconnect_notify() {
    if let Some(socket) = connect_notify() {
        *NOTIFY.lock().unwrap_or_else(PoisonError::into_inner) = Some(socket);
    }
}

fn connect_notify() -> Option<std::os::unix::net::UnixDatagram> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let target = std::env::var_os("NOTIFY_SOCKET")?;
    let connected = UnixDatagram::unbound().and_then(|sock| {
        match target.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                SocketAddr::from_abstract_name(name).and_then(|addr| sock.connect_addr(&addr))
            }
            None => sock.connect(std::path::Path::new(&target)),
        }
        .map(|()| sock)
    });
    match connected {
        Ok(sock) => Some(sock),
        Err(e) => {
            tracing::warn!(error = %e, target = ?target, "cannot reach the readiness socket");
            None
        }
    }
}

/// Sends `message` (sd_notify lines: `READY=1`, `MAINPID=<pid>`) to
/// whoever started this VMM, on `NOTIFY_SOCKET`; nothing without one.
pub fn notify(message: &str) {
    let kept = NOTIFY.lock().unwrap_or_else(PoisonError::into_inner);
    let sent = match kept.as_ref() {
        Some(sock) => sock.send(message.as_bytes()).map(|_| ()),
        None => {
            drop(kept);
            match connect_notify() {
                Some(sock) => sock.send(message.as_bytes()).map(|_| ()),
                None => return,
            }
        }
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify the starter");
    }
}

/// Tells whoever started this VMM that its control socket serves, the
/// sd_notify way: `READY=1` to the datagram socket `NOTIFY_SOCKET` names (a
/// path, or `@name` in the abstract namespace). The supervisor waits for it
/// instead of polling the socket; without `NOTIFY_SOCKET` nothing is sent.
fn notify_ready() {
    notify("READY=1\n");
}
