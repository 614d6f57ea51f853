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
//! The irqchip and PIT are created first (as for a fresh VM), then
//! `KVM_SET_PIT2` and `KVM_SET_IRQCHIP` for the master PIC, the slave PIC
//! and the IOAPIC, all before the vCPUs are created ([`restore_vm`]).
//! `KVM_SET_CLOCK` comes last, once every vCPU's state (its TSC among its
//! MSRs) is loaded ([`restore_clock`]). From the moment each is set, the
//! guest's TSC and its kvmclock both advance with the host's time, so the
//! time between the two settings would be skew between them: the clock is
//! set forward by the time since vCPU 0's state was loaded, as
//! [`save_vm`] took it back by the time since vCPU 0's state was saved.
//! Without that (the clock saved after the vCPUs and set before them), a
//! restored Linux on the nested kvm-amd tier saw its TSC fall 2-10 ms behind
//! kvmclock across the restore and marked its TSC clocksource unstable
//! ("skew is too large"); on any host the skew grows with the vCPUs.

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

/// Captures the state of a paused vCPU. `msr_index` is KVM's MSR index list.
pub fn save_vcpu(id: u8, fd: &VcpuFd, msr_index: &[u32]) -> Result<VcpuState, StateError> {
    save_vcpu_timed(id, fd, msr_index).map(|(state, _)| state)
}

/// [`save_vcpu`], and the host's `CLOCK_MONOTONIC` (ns) when its TSC was
/// read (the middle of `KVM_GET_MSRS`): for [`save_vm`].
pub fn save_vcpu_timed(
    id: u8,
    fd: &VcpuFd,
    msr_index: &[u32],
) -> Result<(VcpuState, u64), StateError> {
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
    let before = crate::vm::monotonic_ns();
    let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    let tsc_at = before + (crate::vm::monotonic_ns().saturating_sub(before)) / 2;
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
    Ok((state, tsc_at))
}

/// Loads a saved state into a fresh vCPU, in the order the module docs give.
///
/// Gives the host's `CLOCK_MONOTONIC` (ns) when its TSC was set (just before
/// `KVM_SET_MSRS`, whose first entry it is): for [`restore_clock`].
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<u64, StateError> {
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
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
    let msrs = Msrs::from_entries(&ordered).map_err(|source| StateError::Fam {
        what: "the MSR list",
        source,
    })?;
    let tsc_at = crate::vm::monotonic_ns();
    let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != ordered.len() {
        return Err(StateError::Msrs {
            set,
            total: ordered.len(),
            index: ordered[set].index,
        });
    }
    fd.set_vcpu_events(&state.vcpu_events.get::<kvm_vcpu_events>()?)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(tsc_at)
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

/// Captures the VM-wide KVM state (PIT, kvmclock, PICs, IOAPIC) of a VM
/// whose vCPU 0 had its TSC read at `tsc_at_ns` (host `CLOCK_MONOTONIC`,
/// [`save_vcpu_timed`]).
///
/// The guest's TSC and its kvmclock both run on while the vCPUs are paused,
/// so a clock read later than the TSC is ahead of it by the time between
/// the two reads; the saved clock is taken back by that time, so that clock
/// and TSC in the image describe the same instant (a restored Linux
/// otherwise sees its TSC fall behind kvmclock by the gap and marks it
/// unstable).
pub fn save_vm(vm: &VmFd, tsc_at_ns: u64) -> Result<VmState, StateError> {
    let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    let read_at = crate::vm::monotonic_ns();
    clock.clock = clock
        .clock
        .saturating_sub(read_at.saturating_sub(tsc_at_ns));
    // Only the clock value travels; the flags describe this host's clock.
    clock.flags = 0;
    Ok(VmState {
        pit: KvmBlob::of(
            "kvm_pit_state2",
            &vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        ),
        clock: KvmBlob::of("kvm_clock_data", &clock),
        pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "kvm_irqchip pic master")?,
        pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "kvm_irqchip pic slave")?,
        ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC, "kvm_irqchip ioapic")?,
    })
}

/// Loads the VM-wide KVM state but the clock into a VM that has its
/// irqchip and PIT (before its vCPUs; see "VM restore order").
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    vm.set_pit2(&state.pit.get::<kvm_pit_state2>()?)
        .map_err(kvm("KVM_SET_PIT2"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(&chip.get::<kvm_irqchip>()?)
            .map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// Sets the kvmclock: the last step of a restore, once vCPU 0's TSC was set
/// at `tsc_at_ns` (host `CLOCK_MONOTONIC`, [`restore_vcpu`]). The guest's TSC
/// has run on since, so the clock is set to its saved value plus that time:
/// the two go on from the same instant, as they were saved ([`save_vm`]).
pub fn restore_clock(vm: &VmFd, state: &VmState, tsc_at_ns: u64) -> Result<(), StateError> {
    let mut clock = state.clock.get::<kvm_clock_data>()?;
    clock.clock = clock
        .clock
        .saturating_add(crate::vm::monotonic_ns().saturating_sub(tsc_at_ns));
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
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
