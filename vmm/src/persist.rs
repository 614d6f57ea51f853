//! Saving and restoring VM state: one symmetric trait and the state types.
//!
//! Every stateful part of a VM implements [`Persist`]: `save` produces a
//! serde state struct of our own (never a third-party type on the wire), and
//! `restore` builds the part again from it. The trait has no default bodies:
//! a part that forgets to save something does not compile. Every
//! implementation passes the shared conformance check
//! (`conformance::check`, in the unit tests): save, encode, decode, restore, save again gives
//! equal state.
//!
//! KVM structures are kept as their exact ABI bytes ([`KvmBlob`]), tagged with
//! their name and checked for size on restore: the KVM ABI is stable across
//! kernels, and a byte copy cannot drop a field the way a hand-written field
//! list can.
//!
//! # vCPU restore order
//!
//! Firecracker's order, for the same reasons (see `restore_vcpu`):
//! 1. TSC frequency (`KVM_SET_TSC_KHZ`), when it differs: before anything that
//!    reads the TSC;
//! 2. `KVM_SET_CPUID2`: MSRs and XSAVE are validated against CPUID;
//! 3. `KVM_SET_MP_STATE`;
//! 4. `KVM_SET_REGS`, then `KVM_SET_SREGS` (the latter recomputes the MMU mode);
//! 5. `KVM_SET_XSAVE`, `KVM_SET_XCRS`, `KVM_SET_DEBUGREGS`;
//! 6. `KVM_SET_LAPIC` before `KVM_SET_MSRS` (the TSC-deadline MSR needs the
//!    LAPIC's timer mode);
//! 7. `KVM_SET_MSRS` (all of KVM's MSR index list, IA32_TSC first);
//! 8. `KVM_SET_VCPU_EVENTS` last: pending exceptions and interrupts must not
//!    be overwritten by the calls above.
//!
//! # VM restore order
//!
//! The irqchip, the PIT and the vCPUs are created first (as for a fresh
//! VM), then `KVM_SET_PIT2`, `KVM_SET_CLOCK` (read back with
//! `KVM_GET_CLOCK`), and `KVM_SET_IRQCHIP` for the master PIC, the slave
//! PIC and the IOAPIC ([`restore_vm`]), then each vCPU's state.
//!
//! # The TSC and the kvmclock, as of one instant
//!
//! A guest reads time two ways, its TSC and its kvmclock, and while its
//! vCPUs are paused both run on with the host. Each is read (and set) by its
//! own ioctl, at its own moment: the kvmclock by the VM, each TSC (an MSR)
//! by its vCPU. Saved and set as read, the two disagree by the time between
//! the calls, and a Linux guest whose clocksource watchdog sees its TSC and
//! kvmclock drift apart across a restore marks the TSC unstable (seen on the
//! nested kvm-amd tier: 2-15 ms of skew on every restore, where the calls
//! are slow). KVM says when its clock was read: `KVM_GET_CLOCK` gives the
//! host TSC of that instant (`KVM_CLOCK_HOST_TSC`), and a vCPU's TSC is the
//! host's plus an offset that KVM also gives (`KVM_VCPU_TSC_OFFSET`, Linux
//! 5.16+): so the capture stores each guest TSC as it was at the clock's
//! instant, host TSC + offset ([`TscReading::at`], [`VcpuState::set_tsc`]),
//! and the image holds both as of that instant. On restore (the vCPUs
//! created first: KVM has that clock reading only once a VM has vCPUs), the
//! clock is set and read back ([`restore_vm`] gives a [`TscTarget`]), and
//! each vCPU's TSC offset is set so that its TSC is the saved one plus the
//! clock's advance since ([`restore_vcpu`]). No call's latency enters: on
//! the nested tier `KVM_SET_MSRS` alone took 18 ms before KVM read its TSC,
//! and a TSC written through it came out 18 ms behind. Where KVM gives no
//! offset attribute, the TSC read or written through the MSR is moved by
//! the host ticks measured around the call; without the host-TSC flag (no
//! KVM master clock) both are restored as saved.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Save and restore of one stateful part of a VM.
pub trait Persist: Sized {
    /// The saved state (our own serde type).
    type State: Serialize + for<'de> Deserialize<'de> + Clone + PartialEq + std::fmt::Debug;
    /// What `restore` needs besides the state (fds, channels, memory).
    type RestoreArgs;
    /// Why save or restore failed.
    type Error: std::error::Error;

    /// Captures the part's state.
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Builds the part from a saved state.
    fn restore(args: Self::RestoreArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Errors while saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{ioctl} failed")]
    Kvm {
        /// The ioctl.
        ioctl: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved KVM structure has the wrong size for this build.
    #[error("saved {name} is {found} bytes, this relive expects {expected}: the image comes from an incompatible build")]
    BlobSize {
        /// The structure.
        name: String,
        /// Its saved size.
        found: usize,
        /// The size here.
        expected: usize,
    },
    /// KVM took fewer MSRs than were saved.
    #[error("KVM_SET_MSRS set {set} of {total} MSRs; MSR {index:#x} was refused")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were saved.
        total: usize,
        /// The first refused MSR.
        index: u32,
    },
    /// A FAM structure could not be built.
    #[error("cannot build {what}")]
    Fam {
        /// Which structure.
        what: &'static str,
        /// The error.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// A device could not be restored.
    #[error("cannot restore device {device}: {reason}")]
    Device {
        /// Which device.
        device: &'static str,
        /// Why.
        reason: String,
    },
}

fn kvm(ioctl: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { ioctl, source }
}

/// The exact ABI bytes of one KVM structure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmBlob {
    /// The structure's name (`kvm_regs`, ...).
    pub name: String,
    /// Its bytes, as KVM returned them.
    pub bytes: Vec<u8>,
}

impl KvmBlob {
    /// Captures `value`.
    pub fn of<T: IntoBytes + Immutable>(name: &str, value: &T) -> Self {
        KvmBlob {
            name: name.to_string(),
            bytes: value.as_bytes().to_vec(),
        }
    }

    /// Decodes the structure, checking its size.
    pub fn get<T: FromBytes>(&self) -> Result<T, StateError> {
        T::read_from_bytes(&self.bytes).map_err(|_| StateError::BlobSize {
            name: self.name.clone(),
            found: self.bytes.len(),
            expected: std::mem::size_of::<T>(),
        })
    }
}

/// One MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// One CPUID entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf.
    pub function: u32,
    /// Subleaf.
    pub index: u32,
    /// KVM flags.
    pub flags: u32,
    /// Registers.
    pub eax: u32,
    /// Registers.
    pub ebx: u32,
    /// Registers.
    pub ecx: u32,
    /// Registers.
    pub edx: u32,
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<CpuidEntry>,
    /// `kvm_mp_state`.
    pub mp_state: KvmBlob,
    /// `kvm_regs`.
    pub regs: KvmBlob,
    /// `kvm_sregs`.
    pub sregs: KvmBlob,
    /// `kvm_xsave`.
    pub xsave: KvmBlob,
    /// `kvm_xcrs`.
    pub xcrs: KvmBlob,
    /// `kvm_debugregs`.
    pub debugregs: KvmBlob,
    /// `kvm_lapic_state`.
    pub lapic: KvmBlob,
    /// All MSRs of KVM's index list.
    pub msrs: Vec<MsrValue>,
    /// `kvm_vcpu_events`.
    pub vcpu_events: KvmBlob,
}

/// What differs between a saved vCPU state and the state read back after
/// restoring it, one line per difference: the restore self-check (debug log).
/// Some differences are expected: the TSC and the LAPIC timer's current
/// count move on; any other is a piece of state KVM did not take as given.
pub fn differences(saved: &VcpuState, now: &VcpuState) -> Vec<String> {
    let mut out = Vec::new();
    let blobs = [
        (&saved.mp_state, &now.mp_state),
        (&saved.regs, &now.regs),
        (&saved.xsave, &now.xsave),
        (&saved.xcrs, &now.xcrs),
        (&saved.debugregs, &now.debugregs),
        (&saved.lapic, &now.lapic),
        (&saved.vcpu_events, &now.vcpu_events),
    ];
    for (a, b) in blobs {
        let differing: Vec<usize> = a
            .bytes
            .iter()
            .zip(&b.bytes)
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, _)| i)
            .collect();
        if !differing.is_empty() {
            out.push(format!(
                "{}: {} bytes differ, first at offsets {:?}",
                a.name,
                differing.len(),
                &differing[..differing.len().min(8)]
            ));
        }
    }
    if let (Ok(a), Ok(b)) = (saved.sregs.get::<kvm_sregs>(), now.sregs.get::<kvm_sregs>()) {
        let segs = |s: &kvm_sregs| {
            [
                ("cs", s.cs),
                ("ds", s.ds),
                ("es", s.es),
                ("fs", s.fs),
                ("gs", s.gs),
                ("ss", s.ss),
                ("tr", s.tr),
                ("ldt", s.ldt),
            ]
        };
        for ((name, x), (_, y)) in segs(&a).into_iter().zip(segs(&b)) {
            if x.as_bytes() != y.as_bytes() {
                out.push(format!("sregs.{name}: saved {x:?}, now {y:?}"));
            }
        }
        for (name, x, y) in [
            ("cr0", a.cr0, b.cr0),
            ("cr2", a.cr2, b.cr2),
            ("cr3", a.cr3, b.cr3),
            ("cr4", a.cr4, b.cr4),
            ("cr8", a.cr8, b.cr8),
            ("efer", a.efer, b.efer),
            ("apic_base", a.apic_base, b.apic_base),
        ] {
            if x != y {
                out.push(format!("sregs.{name}: saved {x:#x}, now {y:#x}"));
            }
        }
        if a.gdt.as_bytes() != b.gdt.as_bytes() || a.idt.as_bytes() != b.idt.as_bytes() {
            out.push(format!(
                "sregs.gdt/idt: saved {:?}/{:?}, now {:?}/{:?}",
                a.gdt, a.idt, b.gdt, b.idt
            ));
        }
        if a.interrupt_bitmap != b.interrupt_bitmap {
            out.push(format!(
                "sregs.interrupt_bitmap: saved {:x?}, now {:x?}",
                a.interrupt_bitmap, b.interrupt_bitmap
            ));
        }
    }
    for m in &saved.msrs {
        match now.msrs.iter().find(|n| n.index == m.index) {
            Some(n) if n.data != m.data => out.push(format!(
                "msr {:#x}: saved {:#x}, now {:#x}",
                m.index, m.data, n.data
            )),
            None => out.push(format!("msr {:#x}: saved, not read back", m.index)),
            _ => {}
        }
    }
    out
}

/// IA32_TSC: restored first among the MSRs.
const MSR_IA32_TSC: u32 = 0x10;

/// `KVM_CLOCK_HOST_TSC`: `kvm_clock_data::host_tsc` is valid.
const KVM_CLOCK_HOST_TSC: u32 = kvm_bindings::KVM_CLOCK_HOST_TSC;

/// The host's TSC now: the counter KVM's own `rdtsc()` reads.
pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The kvmclock as KVM read it, and the host TSC at that instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockAnchor {
    /// kvmclock, ns.
    pub clock_ns: u64,
    /// The host's TSC when KVM computed `clock_ns`.
    pub host_tsc: u64,
}

/// What a restored vCPU's TSC must be written as: the saved value, moved on
/// by the time the kvmclock has run since it was set to its saved value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscTarget {
    /// The kvmclock value of the image (the instant its TSCs were moved to).
    pub saved_clock_ns: u64,
    /// The kvmclock read back right after it was set.
    pub now: ClockAnchor,
}

impl TscTarget {
    /// The guest TSC at the instant of [`TscTarget::now`] of a vCPU whose
    /// saved TSC is `saved` and runs at `khz`: the saved value plus the
    /// kvmclock's advance since it was set, in guest ticks.
    pub fn tsc_at_anchor(&self, saved: u64, khz: u32) -> u64 {
        let clock_ns = self.now.clock_ns.saturating_sub(self.saved_clock_ns);
        let ticks = u128::from(clock_ns) * u128::from(khz) / 1_000_000;
        saved.wrapping_add(u64::try_from(ticks).unwrap_or(u64::MAX))
    }

    /// The guest TSC to write at host TSC `host_now` (host and guest TSC
    /// rates taken as equal over that short time; an ioctl's own latency is
    /// an error here, which [`set_tsc_offset`] does not have).
    pub fn tsc_for(&self, saved: u64, khz: u32, host_now: u64) -> u64 {
        self.tsc_at_anchor(saved, khz)
            .wrapping_add(host_now.wrapping_sub(self.now.host_tsc))
    }
}

/// How a vCPU's TSC was read at a save: its value, the host TSC around the
/// read, and KVM's offset of it from the host TSC (where KVM gives it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TscReading {
    /// The host TSC in the middle of `KVM_GET_MSRS`.
    pub host_tsc: u64,
    /// The guest TSC it read.
    pub guest_tsc: u64,
    /// `KVM_VCPU_TSC_OFFSET`: guest TSC = host TSC + offset, when unscaled.
    pub offset: Option<u64>,
}

/// Host ticks within which a read TSC must agree with host TSC + offset
/// for the offset to be trusted (else the TSC is scaled, or the reading
/// odd): about 0.4 s at 2.5 GHz, far above an ioctl's latency, far below
/// what a scaled TSC drifts from the host's.
const OFFSET_AGREEMENT_TICKS: u64 = 1 << 30;

impl TscReading {
    /// The guest TSC at host TSC `host_tsc`: exactly host TSC + offset when
    /// KVM gave an offset that agrees with the reading, else the reading
    /// moved by the host ticks in between.
    pub fn at(&self, host_tsc: u64) -> u64 {
        if let Some(offset) = self.offset {
            let expected = self.host_tsc.wrapping_add(offset);
            let apart = expected.abs_diff(self.guest_tsc);
            if apart < OFFSET_AGREEMENT_TICKS {
                return host_tsc.wrapping_add(offset);
            }
        }
        self.guest_tsc
            .wrapping_add(host_tsc.wrapping_sub(self.host_tsc))
    }
}

impl VcpuState {
    /// The saved TSC.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .iter()
            .find(|m| m.index == MSR_IA32_TSC)
            .map(|m| m.data)
    }

    /// Replaces the saved TSC (moving it to another instant).
    pub fn set_tsc(&mut self, value: u64) {
        for msr in self.msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
            msr.data = value;
        }
    }
}

vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe1,
    kvm_bindings::kvm_device_attr
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_GET_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe2,
    kvm_bindings::kvm_device_attr
);

/// The `KVM_VCPU_TSC_OFFSET` attribute, its value at address `addr`.
fn tsc_offset_attr(addr: u64) -> kvm_bindings::kvm_device_attr {
    kvm_bindings::kvm_device_attr {
        flags: 0,
        group: kvm_bindings::KVM_VCPU_TSC_CTRL,
        attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
        addr,
    }
}

/// The vCPU's TSC offset from the host's (`KVM_VCPU_TSC_OFFSET`, Linux
/// 5.16+); `None` where KVM has no such attribute.
pub fn tsc_offset(fd: &VcpuFd) -> Option<u64> {
    let mut offset: u64 = 0;
    let attr = tsc_offset_attr(std::ptr::addr_of_mut!(offset) as u64);
    // SAFETY: KVM_GET_DEVICE_ATTR on a vCPU fd with this group and attribute
    // writes one u64 at `attr.addr`, which is `offset`, alive for the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_GET_DEVICE_ATTR(), &attr) };
    (ret == 0).then_some(offset)
}

/// Sets the vCPU's TSC offset from the host's: its TSC reads host TSC +
/// `offset` from now on, whatever time the call itself takes.
pub fn set_tsc_offset(fd: &VcpuFd, offset: u64) -> Result<(), StateError> {
    let attr = tsc_offset_attr(std::ptr::addr_of!(offset) as u64);
    // SAFETY: KVM_SET_DEVICE_ATTR with this group and attribute reads one
    // u64 at `attr.addr`, which is `offset`, alive for the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &attr) };
    if ret != 0 {
        return Err(kvm("KVM_SET_DEVICE_ATTR (TSC offset)")(
            kvm_ioctls::Error::last(),
        ));
    }
    Ok(())
}

/// Captures the state of a paused vCPU. `msr_index` is KVM's MSR index list.
pub fn save_vcpu(id: u8, fd: &VcpuFd, msr_index: &[u32]) -> Result<VcpuState, StateError> {
    save_vcpu_timed(id, fd, msr_index).map(|(state, _)| state)
}

/// [`save_vcpu`], and how its TSC was read: see "The TSC and the kvmclock".
pub fn save_vcpu_timed(
    id: u8,
    fd: &VcpuFd,
    msr_index: &[u32],
) -> Result<(VcpuState, TscReading), StateError> {
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?;
    let entries = msr_index
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect::<Vec<_>>();
    let mut msrs = Msrs::from_entries(&entries).map_err(|source| StateError::Fam {
        what: "the MSR list",
        source,
    })?;
    let before = host_tsc();
    let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    let tsc_at = before.wrapping_add(host_tsc().wrapping_sub(before) / 2);
    let msrs = msrs.as_slice()[..n]
        .iter()
        .map(|e| MsrValue {
            index: e.index,
            data: e.data,
        })
        .collect();
    let state = VcpuState {
        id,
        tsc_khz: fd.get_tsc_khz().ok(),
        cpuid: cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect(),
        mp_state: KvmBlob::of(
            "kvm_mp_state",
            &fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        ),
        regs: KvmBlob::of("kvm_regs", &fd.get_regs().map_err(kvm("KVM_GET_REGS"))?),
        sregs: KvmBlob::of("kvm_sregs", &fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?),
        xsave: KvmBlob::of("kvm_xsave", &fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?),
        xcrs: KvmBlob::of("kvm_xcrs", &fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?),
        debugregs: KvmBlob::of(
            "kvm_debugregs",
            &fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        ),
        lapic: KvmBlob::of(
            "kvm_lapic_state",
            &fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        ),
        msrs,
        vcpu_events: KvmBlob::of(
            "kvm_vcpu_events",
            &fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        ),
    };
    let reading = TscReading {
        host_tsc: tsc_at,
        guest_tsc: state.tsc().unwrap_or(0),
        offset: tsc_offset(fd),
    };
    Ok((state, reading))
}

/// Loads a saved state into a fresh vCPU, in the order the module docs give;
/// with `tsc`, its TSC is written as of the moment of writing ("The TSC and
/// the kvmclock").
pub fn restore_vcpu(
    fd: &VcpuFd,
    state: &VcpuState,
    tsc: Option<&TscTarget>,
) -> Result<(), StateError> {
    let mut scaled = false;
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            scaled = true;
            fd.set_tsc_khz(khz).map_err(kvm("KVM_SET_TSC_KHZ"))?;
        }
    }
    let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = state
        .cpuid
        .iter()
        .map(|e| kvm_bindings::kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    let cpuid = CpuId::from_entries(&entries).map_err(|source| StateError::Fam {
        what: "the CPUID list",
        source,
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state.get::<kvm_mp_state>()?)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs.get::<kvm_regs>()?)
        .map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs.get::<kvm_sregs>()?)
        .map_err(kvm("KVM_SET_SREGS"))?;
    let xsave = state.xsave.get::<kvm_xsave>()?;
    // SAFETY: `xsave` is a full kvm_xsave (4 KiB region) as KVM_GET_XSAVE
    // returned it; KVM_SET_XSAVE reads exactly that structure.
    unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs.get::<kvm_xcrs>()?)
        .map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs.get::<kvm_debugregs>()?)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic.get::<kvm_lapic_state>()?)
        .map_err(kvm("KVM_SET_LAPIC"))?;
    let mut ordered: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    ordered.sort_by_key(|e| e.index != MSR_IA32_TSC);
    if let (Some(target), Some(khz), Some(first)) = (tsc, state.tsc_khz, ordered.first_mut()) {
        if first.index == MSR_IA32_TSC {
            first.data = target.tsc_for(first.data, khz, host_tsc());
        }
    }
    let msrs = Msrs::from_entries(&ordered).map_err(|source| StateError::Fam {
        what: "the MSR list",
        source,
    })?;
    let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != ordered.len() {
        return Err(StateError::Msrs {
            set,
            total: ordered.len(),
            index: ordered[set].index,
        });
    }
    // The MSR write above is off by the ioctl's own latency (18 ms seen on
    // the nested tier); the offset is exact. Unscaled TSCs only: the offset
    // is against the host TSC as it is.
    if let (Some(target), Some(khz), Some(saved), false) = (tsc, state.tsc_khz, state.tsc(), scaled)
    {
        let offset = target
            .tsc_at_anchor(saved, khz)
            .wrapping_sub(target.now.host_tsc);
        if let Err(e) = set_tsc_offset(fd, offset) {
            tracing::debug!(error = %e, "no TSC offset attribute: the TSC stays as written");
        }
    }
    fd.set_vcpu_events(&state.vcpu_events.get::<kvm_vcpu_events>()?)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// What KVM holds for the VM itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// `kvm_pit_state2`.
    pub pit: KvmBlob,
    /// `kvm_clock_data`.
    pub clock: KvmBlob,
    /// `kvm_irqchip` of the master PIC.
    pub pic_master: KvmBlob,
    /// `kvm_irqchip` of the slave PIC.
    pub pic_slave: KvmBlob,
    /// `kvm_irqchip` of the IOAPIC.
    pub ioapic: KvmBlob,
}

fn get_irqchip(vm: &VmFd, chip_id: u32, name: &str) -> Result<KvmBlob, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(KvmBlob::of(name, &chip))
}

/// Captures the VM-wide KVM state (PIT, kvmclock, PICs, IOAPIC), and where
/// the kvmclock stood against the host TSC when it was read (when KVM says:
/// see "The TSC and the kvmclock").
pub fn save_vm(vm: &VmFd) -> Result<(VmState, Option<ClockAnchor>), StateError> {
    let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    let anchor = (clock.flags & KVM_CLOCK_HOST_TSC != 0).then_some(ClockAnchor {
        clock_ns: clock.clock,
        host_tsc: clock.host_tsc,
    });
    // Only the clock value travels; the flags describe this host's clock.
    clock.flags = 0;
    clock.host_tsc = 0;
    clock.realtime = 0;
    let state = VmState {
        pit: KvmBlob::of(
            "kvm_pit_state2",
            &vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        ),
        clock: KvmBlob::of("kvm_clock_data", &clock),
        pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "kvm_irqchip pic master")?,
        pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "kvm_irqchip pic slave")?,
        ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC, "kvm_irqchip ioapic")?,
    };
    Ok((state, anchor))
}

/// Loads the VM-wide KVM state into a VM that has its irqchip and PIT
/// (before its vCPUs); gives what their TSCs must be written as, when KVM
/// says where its clock stands ("The TSC and the kvmclock").
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<Option<TscTarget>, StateError> {
    vm.set_pit2(&state.pit.get::<kvm_pit_state2>()?)
        .map_err(kvm("KVM_SET_PIT2"))?;
    let saved = state.clock.get::<kvm_clock_data>()?;
    vm.set_clock(&saved).map_err(kvm("KVM_SET_CLOCK"))?;
    let now = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(&chip.get::<kvm_irqchip>()?)
            .map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok((now.flags & KVM_CLOCK_HOST_TSC != 0).then_some(TscTarget {
        saved_clock_ns: saved.clock,
        now: ClockAnchor {
            clock_ns: now.clock,
            host_tsc: now.host_tsc,
        },
    }))
}

/// The shared conformance check every [`Persist`] implementation passes.
#[cfg(test)]
pub mod conformance {
    use super::Persist;

    /// Save, encode (JSON, as in an image), decode, restore, save again: the
    /// two states must be equal. `mutate` changes the restored part; its
    /// state must then differ (a save that ignores the part's state fails).
    pub fn check<P: Persist>(
        original: &P,
        args: P::RestoreArgs,
        mutate: impl FnOnce(&mut P),
    ) -> P::State
    where
        P::Error: std::fmt::Debug,
    {
        let state = original.save().expect("save");
        let encoded = serde_json::to_vec(&state).expect("encode");
        let decoded: P::State = serde_json::from_slice(&encoded).expect("decode");
        assert_eq!(decoded, state, "encode/decode changed the state");
        let mut restored = P::restore(args, &decoded).expect("restore");
        let again = restored.save().expect("save after restore");
        assert_eq!(again, state, "restore then save changed the state");
        mutate(&mut restored);
        let mutated = restored.save().expect("save after mutation");
        assert_ne!(mutated, state, "a mutation did not show in the saved state");
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_and_check_size() {
        let regs = kvm_regs {
            rip: 0x1234,
            rax: 7,
            ..Default::default()
        };
        let blob = KvmBlob::of("kvm_regs", &regs);
        let back: kvm_regs = blob.get().unwrap();
        assert_eq!(back.rip, 0x1234);
        assert_eq!(back.rax, 7);
        let short = KvmBlob {
            name: "kvm_regs".into(),
            bytes: vec![0; 8],
        };
        let err = short.get::<kvm_regs>().unwrap_err();
        assert!(
            matches!(err, StateError::BlobSize { found: 8, .. }),
            "{err}"
        );
    }
}
