//! Booting a guest with the Linux x86 64-bit boot protocol.
//!
//! The VMM loads the kernel (an ELF vmlinux, or a bzImage whose 64-bit entry is
//! at `code32_start + 0x200`), writes a zero page (`boot_params`) with the e820
//! map, the command line and the initrd, builds identity page tables for the
//! first GiB and a flat GDT, and starts the boot vCPU in long mode at the
//! kernel's entry with `rsi` pointing at the zero page, as Firecracker does.
//!
//! Fixed guest-physical addresses of the boot structures:
//!
//! | address   | what                                   |
//! |-----------|----------------------------------------|
//! | `0x0500`  | boot GDT (null, code64, data, TSS)     |
//! | `0x0520`  | boot IDT (empty)                       |
//! | `0x7000`  | zero page (`boot_params`)              |
//! | `0x8ff0`  | initial stack pointer                  |
//! | `0x9000`  | PML4, then PDPT at `0xa000`, PD at `0xb000` |
//! | `0x20000` | kernel command line                    |
//! | `0x9fc00` | MP table (see [`crate::mptable`])      |
//! | `0xe0000` | ACPI tables (see [`crate::acpi`]); `boot_params.acpi_rsdp_addr` points here |
//! | `1 MiB`   | kernel (ELF: its own physical addresses) |
//!
//! Secondary vCPUs: a Linux guest starts them itself with INIT/SIPI through
//! the in-kernel LAPIC, so they are left in KVM's wait-for-SIPI state. The
//! bundled guest has no real-mode trampoline; its vCPUs all start directly
//! at the entry point in long mode ([`SmpStart::Direct`]) and tell themselves
//! apart by their APIC id.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{self, GuestMemoryMmap};

/// Boot GDT address.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Boot IDT address.
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// Zero page address.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 address.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT address.
pub const PDPT_ADDR: u64 = 0xa000;
/// PD address (maps the first GiB with 2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line address.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line for an ELF kernel (Linux x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;
/// Default command line for a Linux guest. `reboot=k`: a guest's reboot
/// is the i8042 reset (Linux's default path on hardware-reduced ACPI jumps
/// to BIOS code a microVM has none of). No `noapic`: the MADT gives the
/// IOAPIC, and Debian's cloud kernel with `noapic` oopses in
/// `serial8250_init` on kvm-amd (measured on the nested tier).
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 nomodule";

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XLF_KERNEL_64: u16 = 1;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;

/// Where the kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// The bundled guest, built from `images/guest/` into the binary.
    Bundled,
    /// A kernel file: ELF vmlinux or bzImage.
    File(PathBuf),
}

impl KernelSource {
    /// `bundled` names the bundled guest; anything else is a path.
    pub fn parse(s: &str) -> Self {
        if s == "bundled" {
            KernelSource::Bundled
        } else {
            KernelSource::File(PathBuf::from(s))
        }
    }

    /// How secondary vCPUs start with this kernel.
    pub fn smp_start(&self) -> SmpStart {
        match self {
            KernelSource::Bundled => SmpStart::Direct,
            KernelSource::File(_) => SmpStart::Sipi,
        }
    }
}

impl std::fmt::Display for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelSource::Bundled => write!(f, "bundled"),
            KernelSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// How secondary vCPUs begin to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmpStart {
    /// The guest starts them with INIT/SIPI (Linux).
    Sipi,
    /// Every vCPU starts at the kernel entry in long mode (the bundled guest).
    Direct,
}

/// Errors while loading and configuring the guest for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}")]
    KernelRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an ELF vmlinux nor a bzImage.
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage: give --kernel a Linux kernel image or `bundled`")]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// A bzImage that has no 64-bit entry point.
    #[error("bzImage {path} has no 64-bit entry point (XLF_KERNEL_64 unset): use a 64-bit kernel")]
    Not64Bit {
        /// The file.
        path: PathBuf,
    },
    /// linux-loader refused the image.
    #[error("cannot load kernel {kernel}")]
    Load {
        /// The kernel.
        kernel: String,
        /// The loader error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line does not fit.
    #[error(
        "kernel command line is {len} bytes, longer than the {max} bytes the boot protocol allows"
    )]
    CmdlineTooLong {
        /// Its length with the terminating NUL.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line has a character the boot protocol cannot carry.
    #[error("kernel command line is invalid: {0}")]
    CmdlineInvalid(String),
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}")]
    InitrdRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit in low memory above the kernel.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory: use a larger --mem-mib")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write the {what} to guest memory")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Writing the zero page failed.
    #[error("cannot write the zero page")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    /// Writing the MP table failed.
    #[error("cannot write the MP table")]
    Mptable(#[source] crate::mptable::MptableError),
    /// The ACPI tables could not be written.
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] crate::acpi::AcpiError),
}

/// What the VMM needs to start the vCPUs after loading.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// Guest-physical 64-bit entry point.
    pub entry: GuestAddress,
    /// How secondary vCPUs start.
    pub smp_start: SmpStart,
}

/// Everything needed to load a guest.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// The kernel.
    pub kernel: KernelSource,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs (for the MP table).
    pub vcpus: u8,
}

/// Builds the command line, checking it against the boot protocol's limit.
pub fn build_cmdline(cmdline: &str, max: usize) -> Result<Cmdline, BootError> {
    let len = cmdline.len() + 1;
    if len > max {
        return Err(BootError::CmdlineTooLong { len, max });
    }
    Cmdline::try_from(cmdline, max).map_err(|e| BootError::CmdlineInvalid(e.to_string()))
}

/// The kind of a kernel image, from its first bytes.
fn sniff_kernel<R: Read + Seek>(image: &mut R) -> std::io::Result<Option<KernelKind>> {
    let mut head = [0u8; 0x206];
    image.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < head.len() {
        let r = image.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    image.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(KernelKind::Elf));
    }
    if n >= 0x206 && head[0x202..0x206] == KERNEL_HDR_MAGIC.to_le_bytes() {
        return Ok(Some(KernelKind::BzImage));
    }
    Ok(None)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelKind {
    Elf,
    BzImage,
}

/// Loads the kernel, initrd, command line, zero page and MP table into `mem`.
pub fn load(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<BootEntry, BootError> {
    let himem = Some(GuestAddress(memory::HIMEM_START));
    let (kind, result) = match &cfg.kernel {
        KernelSource::Bundled => {
            let mut image = Cursor::new(relive_images::guest::KERNEL);
            let r = Elf::load(mem, None, &mut image, himem).map_err(|source| BootError::Load {
                kernel: cfg.kernel.to_string(),
                source,
            })?;
            (KernelKind::Elf, r)
        }
        KernelSource::File(path) => {
            let read_err = |source| BootError::KernelRead {
                path: path.clone(),
                source,
            };
            let mut file = File::open(path).map_err(read_err)?;
            let kind = sniff_kernel(&mut file)
                .map_err(read_err)?
                .ok_or_else(|| BootError::NotAKernel { path: path.clone() })?;
            let r = match kind {
                KernelKind::Elf => Elf::load(mem, None, &mut file, himem),
                KernelKind::BzImage => BzImage::load(mem, None, &mut file, himem),
            }
            .map_err(|source| BootError::Load {
                kernel: cfg.kernel.to_string(),
                source,
            })?;
            (kind, r)
        }
    };

    let mut params = boot_params::default();
    let (entry, cmdline_max) = match (kind, result.setup_header) {
        (KernelKind::BzImage, Some(hdr)) => {
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::Not64Bit {
                    path: match &cfg.kernel {
                        KernelSource::File(p) => p.clone(),
                        KernelSource::Bundled => PathBuf::from("bundled"),
                    },
                });
            }
            params.hdr = hdr;
            let max = if hdr.cmdline_size == 0 {
                CMDLINE_MAX
            } else {
                hdr.cmdline_size as usize + 1
            };
            (
                GuestAddress(result.kernel_load.raw_value() + BZIMAGE_ENTRY64_OFFSET),
                max,
            )
        }
        _ => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            (result.kernel_load, CMDLINE_MAX)
        }
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;

    let cmdline = build_cmdline(&cfg.cmdline, cmdline_max)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline).map_err(
        |source| BootError::Load {
            kernel: cfg.kernel.to_string(),
            source,
        },
    )?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = (cfg.cmdline.len() + 1) as u32;

    if let Some(initrd) = &cfg.initrd {
        let (addr, size) = load_initrd(mem, initrd, result.kernel_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    add_e820(&mut params, mem);
    params.acpi_rsdp_addr = crate::acpi::write(mem, cfg.vcpus).map_err(BootError::Acpi)?;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(BootError::ZeroPage)?;

    crate::mptable::setup_mptable(mem, cfg.vcpus).map_err(BootError::Mptable)?;
    write_gdt_and_page_tables(mem)?;

    Ok(BootEntry {
        entry,
        smp_start: cfg.kernel.smp_start(),
    })
}

/// Places the initrd at the top of low memory, page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
    };
    let top = memory::low_ram_end(mem).min(0x3800_0000);
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(memory::HIMEM_START) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::GuestWrite {
            what: "initrd",
            source,
        })?;
    Ok((addr, size))
}

fn add_e820(params: &mut boot_params, mem: &GuestMemoryMmap) {
    let mut entries = vec![
        (0, memory::EBDA_START, E820_RAM),
        (
            memory::EBDA_START,
            memory::HIMEM_START - memory::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(memory::HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            entries.push((start, end - start, E820_RAM));
        }
    }
    for (i, (addr, size, type_)) in entries.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
        params.e820_entries = (i + 1) as u8;
    }
}

/// A GDT entry from flags, base and limit (the packed x86 descriptor format).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The KVM segment for GDT entry `index` of [`BOOT_GDT`].
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

fn write_gdt_and_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |what: &'static str| move |source| BootError::GuestWrite { what, source };
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_ADDR + i as u64 * 8))
            .map_err(w("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
        .map_err(w("IDT"))?;
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD maps the first GiB with 2 MiB pages.
    mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))
        .map_err(w("page tables"))?;
    mem.write_obj(PD_ADDR | 0x03, GuestAddress(PDPT_ADDR))
        .map_err(w("page tables"))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))
            .map_err(w("page tables"))?;
    }
    Ok(())
}

/// General-purpose registers at the kernel entry.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// Special registers for 64-bit entry: flat segments, paging on, long mode.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// FPU state at boot: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs set at boot (as Firecracker does): SYSENTER/SYSCALL MSRs cleared, TSC
/// zeroed, fast strings enabled, MTRRs enabled with write-back default.
pub fn boot_msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    Msrs::from_entries(&entries)
}

/// Programs the LAPIC's LINT0 as ExtINT and LINT1 as NMI (the PC wiring).
pub fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let mut update = |offset: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = lapic.regs[offset + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, byte) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *byte as i8;
        }
    };
    update(APIC_LVT0, APIC_MODE_EXTINT);
    update(APIC_LVT1, APIC_MODE_NMI);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&memory::ram_ranges(mib * memory::MIB)).unwrap()
    }

    #[test]
    fn gdt_segments_round_trip() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.l, 1);
        assert_eq!(code.present, 1);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.type_, 0xb);
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(data.db, 1);
        assert_eq!(data.l, 0);
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn cmdline_limit_is_enforced() {
        assert!(build_cmdline("console=ttyS0", CMDLINE_MAX).is_ok());
        let long = "x".repeat(CMDLINE_MAX);
        assert!(matches!(
            build_cmdline(&long, CMDLINE_MAX),
            Err(BootError::CmdlineTooLong { len, max }) if len == CMDLINE_MAX + 1 && max == CMDLINE_MAX
        ));
    }

    #[test]
    fn bundled_guest_loads_with_zero_page_and_e820() {
        let m = mem(64);
        let cfg = BootConfig {
            kernel: KernelSource::Bundled,
            initrd: None,
            cmdline: "relive.hb_ms=100".into(),
            vcpus: 2,
        };
        let entry = load(&m, &cfg).unwrap();
        assert!(entry.entry.raw_value() >= memory::HIMEM_START);
        assert_eq!(entry.smp_start, SmpStart::Direct);
        let params: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!({ last.addr } + { last.size }, 64 * memory::MIB);
        let mut buf = [0u8; 16];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&buf, b"relive.hb_ms=100");
    }

    #[test]
    fn non_kernel_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("relive-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-kernel");
        std::fs::write(&path, vec![0x42u8; 4096]).unwrap();
        let cfg = BootConfig {
            kernel: KernelSource::File(path.clone()),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
        };
        let err = load(&mem(64), &cfg).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        let missing = BootConfig {
            kernel: KernelSource::File(dir.join("missing")),
            ..cfg
        };
        assert!(matches!(
            load(&mem(64), &missing).unwrap_err(),
            BootError::KernelRead { .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let m = mem(64);
        write_gdt_and_page_tables(&m).unwrap();
        let pde: u64 = m.read_obj(GuestAddress(PD_ADDR + 8 * 5)).unwrap();
        assert_eq!(pde, (5 << 21) | 0x83);
    }
}
