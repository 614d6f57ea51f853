//! The Intel MultiProcessor Specification 1.4 table that tells the guest how many
//! vCPUs it has and how its interrupts are wired.
//!
//! Without ACPI, a Linux guest finds its CPUs by scanning the first KiB of the
//! EBDA (among other places) for the 16-byte *MP floating pointer structure*
//! (`"_MP_"`). That structure points to the *MP configuration table* (`"PCMP"`),
//! a header followed by variable-length entries. We write both in one piece:
//!
//! ```text
//! MPTABLE_START  floating pointer     16 bytes, physptr = MPTABLE_START + 16
//! +16            config table header  44 bytes, checksum over header + entries
//! +60            processor entries    20 bytes each, APIC id = vCPU index, BSP = 0
//!                ISA bus entry         8 bytes, bus id 0
//!                I/O APIC entry        8 bytes, id = num_cpus, at 0xfec0_0000
//!                I/O interrupt entries 8 bytes each, ISA IRQ n -> I/O APIC pin n, n < 24
//!                local interrupt entries 8 bytes each, ExtINT -> LINT0, NMI -> LINT1
//! ```
//!
//! Every structure is `#[repr(C, packed)]` with little-endian fields (this crate is
//! x86_64 only), so its in-memory bytes are exactly the bytes the spec lays out.
//! The table is assembled in a host buffer, checksummed, and written to guest
//! memory with a single write.
//!
//! ## Where the table lives
//!
//! The floating pointer sits at [`MPTABLE_START`] (0x9fc00), the first KiB of the
//! EBDA, which Linux scans. The EBDA's single KiB below 0xa0000 holds the table for
//! up to 37 vCPUs; a larger table runs on into the legacy VGA/BIOS hole, up to
//! [`MPTABLE_MAX_END`] (0xa10f4 for [`MAX_CPUS`]). The memory layout must
//! therefore keep `[MPTABLE_START, MPTABLE_MAX_END)` out of the RAM ranges it
//! reports in e820 (the usual layout reports RAM only below 0x9fc00 and from
//! 1 MiB) while still backing it with guest memory. A compile-time check keeps
//! the largest table below 1 MiB, where the kernel is loaded.

use std::mem::size_of;

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Guest physical address of the MP floating pointer: the start of the EBDA,
/// just below 640 KiB.
pub const MPTABLE_START: u64 = 0x9fc00;

/// The most vCPUs the table describes. APIC ids are the vCPU indices 0..=253;
/// the I/O APIC takes the next id, and 0xff is the xAPIC broadcast id.
pub const MAX_CPUS: u8 = 254;

/// End (exclusive) of the largest table, the one for [`MAX_CPUS`] vCPUs.
pub const MPTABLE_MAX_END: u64 = MPTABLE_START + mptable_len(MAX_CPUS);

/// Start of high memory, where the kernel is loaded: the table must end below it.
const HIGH_MEMORY_START: u64 = 0x10_0000;

const _: () = assert!(MPTABLE_MAX_END <= HIGH_MEMORY_START);

/// Local APIC base address, reported in the config table header.
const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// I/O APIC base address.
const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Local APIC version of an integrated APIC (as KVM emulates it).
const APIC_VERSION: u8 = 0x14;
/// I/O APIC version (82093AA-compatible, as KVM emulates it).
const IO_APIC_VERSION: u8 = 0x11;
/// Specification revision 1.4.
const MP_SPEC_REV: u8 = 4;
/// Number of I/O APIC pins, and so of ISA/legacy IRQs routed to it.
const IO_APIC_PINS: u8 = 24;
/// ISA bus id (the only bus).
const ISA_BUS_ID: u8 = 0;

const MPF_SIGNATURE: [u8; 4] = *b"_MP_";
const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
const MPC_OEM: [u8; 8] = *b"RELIVE  ";
const MPC_PRODUCT_ID: [u8; 12] = *b"MICROVM     ";
const BUS_TYPE_ISA: [u8; 6] = *b"ISA   ";

/// Processor signature (family 6) and feature flags (FPU, APIC) of each
/// processor entry; Linux takes the real values from CPUID.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1 << 0;
const CPU_FEATURE_APIC: u32 = 1 << 9;

// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTPROCESSOR: u8 = 1 << 1;

// I/O APIC entry flags.
const MPC_APIC_USABLE: u8 = 1 << 0;

// Interrupt types of I/O and local interrupt entries.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Polarity and trigger mode "conform to the bus" (edge, active high on ISA).
const MP_IRQFLAG_DEFAULT: u16 = 0;
/// Local interrupt entry destination meaning "every local APIC".
const ALL_LOCAL_APICS: u8 = 0xff;

/// MP floating pointer structure (spec 4.1).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpFloatingPointer {
    signature: [u8; 4],
    /// Physical address of the config table.
    physptr: u32,
    /// Length in 16-byte units: 1.
    length: u8,
    specification: u8,
    checksum: u8,
    /// 0: a config table is present (no default configuration).
    feature1: u8,
    /// Bit 7 clear: virtual wire mode, no IMCR.
    feature2: u8,
    feature3: u8,
    feature4: u8,
    feature5: u8,
}

/// MP configuration table header (spec 4.2).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpConfigHeader {
    signature: [u8; 4],
    /// Length of the header plus all entries.
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    product_id: [u8; 12],
    oem_table_ptr: u32,
    oem_table_size: u16,
    /// Number of entries after the header.
    entry_count: u16,
    lapic_addr: u32,
    ext_table_length: u16,
    ext_table_checksum: u8,
    reserved: u8,
}

/// Processor entry (spec 4.3.1).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpProcessor {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    cpu_flags: u8,
    cpu_signature: u32,
    feature_flags: u32,
    reserved: [u32; 2],
}

/// Bus entry (spec 4.3.2).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpBus {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

/// I/O APIC entry (spec 4.3.3).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpIoApic {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    apic_addr: u32,
}

/// I/O interrupt assignment entry (spec 4.3.4).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpIoInterrupt {
    entry_type: u8,
    irq_type: u8,
    irq_flags: u16,
    src_bus_id: u8,
    src_bus_irq: u8,
    dst_apic_id: u8,
    dst_apic_pin: u8,
}

/// Local interrupt assignment entry (spec 4.3.5).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpLocalInterrupt {
    entry_type: u8,
    irq_type: u8,
    irq_flags: u16,
    src_bus_id: u8,
    src_bus_irq: u8,
    dst_apic_id: u8,
    dst_apic_lint: u8,
}

// SAFETY: each of these is `#[repr(C, packed)]` and made only of integers and
// integer arrays: it has no padding, no references and no invariants, so every
// bit pattern of its size is a valid value.
unsafe impl ByteValued for MpFloatingPointer {}
// SAFETY: as above: packed plain integers, no padding, all bit patterns valid.
unsafe impl ByteValued for MpConfigHeader {}
// SAFETY: as above: packed plain integers, no padding, all bit patterns valid.
unsafe impl ByteValued for MpProcessor {}
// SAFETY: as above: packed plain integers, no padding, all bit patterns valid.
unsafe impl ByteValued for MpBus {}
// SAFETY: as above: packed plain integers, no padding, all bit patterns valid.
unsafe impl ByteValued for MpIoApic {}
// SAFETY: as above: packed plain integers, no padding, all bit patterns valid.
unsafe impl ByteValued for MpIoInterrupt {}
// SAFETY: as above: packed plain integers, no padding, all bit patterns valid.
unsafe impl ByteValued for MpLocalInterrupt {}

// The sizes the spec gives.
const _: () = assert!(size_of::<MpFloatingPointer>() == 16);
const _: () = assert!(size_of::<MpConfigHeader>() == 44);
const _: () = assert!(size_of::<MpProcessor>() == 20);
const _: () = assert!(size_of::<MpBus>() == 8);
const _: () = assert!(size_of::<MpIoApic>() == 8);
const _: () = assert!(size_of::<MpIoInterrupt>() == 8);
const _: () = assert!(size_of::<MpLocalInterrupt>() == 8);

/// Number of local interrupt entries: ExtINT on LINT0 and NMI on LINT1.
const LOCAL_INTERRUPTS: usize = 2;

/// Failure to write the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// A machine needs at least one vCPU.
    #[error("the MP table needs at least one vCPU")]
    NoCpus,
    /// More vCPUs than the table can give APIC ids to.
    #[error("{num_cpus} vCPUs do not fit in the MP table (at most {max})")]
    TooManyCpus {
        /// vCPUs asked for.
        num_cpus: u8,
        /// [`MAX_CPUS`].
        max: u8,
    },
    /// Guest memory does not back the whole table.
    #[error("cannot write the {len}-byte MP table at guest address {addr:#x}")]
    WriteMemory {
        /// Start of the table.
        addr: u64,
        /// Length of the table.
        len: usize,
        /// What guest memory reported.
        #[source]
        source: GuestMemoryError,
    },
}

/// Number of entries in the config table for `num_cpus` vCPUs.
const fn entry_count(num_cpus: u8) -> usize {
    num_cpus as usize + 1 + 1 + IO_APIC_PINS as usize + LOCAL_INTERRUPTS
}

/// Length of the config table (header and entries) for `num_cpus` vCPUs.
const fn config_table_len(num_cpus: u8) -> usize {
    size_of::<MpConfigHeader>()
        + num_cpus as usize * size_of::<MpProcessor>()
        + size_of::<MpBus>()
        + size_of::<MpIoApic>()
        + IO_APIC_PINS as usize * size_of::<MpIoInterrupt>()
        + LOCAL_INTERRUPTS * size_of::<MpLocalInterrupt>()
}

/// Bytes the whole table (floating pointer and config table) takes in guest
/// memory for `num_cpus` vCPUs, starting at [`MPTABLE_START`].
pub const fn mptable_len(num_cpus: u8) -> u64 {
    (size_of::<MpFloatingPointer>() + config_table_len(num_cpus)) as u64
}

/// The value that makes `bytes` sum to zero modulo 256 once added to them.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte))
        .wrapping_neg()
}

/// Writes the MP floating pointer and config table for `num_cpus` vCPUs at
/// [`MPTABLE_START`] in `mem`.
///
/// vCPU `i` gets local APIC id `i`, vCPU 0 is the boot processor, and the
/// I/O APIC gets id `num_cpus`. The table takes [`mptable_len`]`(num_cpus)`
/// bytes, which must be backed by `mem` (see the module docs for the layout).
pub fn setup_mptable<M: GuestMemory>(mem: &M, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus {
            num_cpus,
            max: MAX_CPUS,
        });
    }
    let table = build_table(num_cpus);
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(|source| MptableError::WriteMemory {
            addr: MPTABLE_START,
            len: table.len(),
            source,
        })
}

/// Assembles the floating pointer followed by the checksummed config table.
/// `num_cpus` is in `1..=MAX_CPUS`.
fn build_table(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let fp_len = size_of::<MpFloatingPointer>();
    let header_len = size_of::<MpConfigHeader>();
    let mut table = Vec::with_capacity(fp_len + config_table_len(num_cpus));

    // Placeholders, filled in once the entries are known.
    table.extend_from_slice(MpFloatingPointer::default().as_slice());
    table.extend_from_slice(MpConfigHeader::default().as_slice());

    for apic_id in 0..num_cpus {
        let boot = if apic_id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        let cpu = MpProcessor {
            entry_type: MP_PROCESSOR,
            apic_id,
            apic_version: APIC_VERSION,
            cpu_flags: CPU_ENABLED | boot,
            cpu_signature: CPU_SIGNATURE,
            feature_flags: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        };
        table.extend_from_slice(cpu.as_slice());
    }

    let bus = MpBus {
        entry_type: MP_BUS,
        bus_id: ISA_BUS_ID,
        bus_type: BUS_TYPE_ISA,
    };
    table.extend_from_slice(bus.as_slice());

    let ioapic = MpIoApic {
        entry_type: MP_IOAPIC,
        apic_id: ioapic_id,
        apic_version: IO_APIC_VERSION,
        flags: MPC_APIC_USABLE,
        apic_addr: IO_APIC_DEFAULT_PHYS_BASE,
    };
    table.extend_from_slice(ioapic.as_slice());

    for irq in 0..IO_APIC_PINS {
        let int = MpIoInterrupt {
            entry_type: MP_INTSRC,
            irq_type: MP_INT,
            irq_flags: MP_IRQFLAG_DEFAULT,
            src_bus_id: ISA_BUS_ID,
            src_bus_irq: irq,
            dst_apic_id: ioapic_id,
            dst_apic_pin: irq,
        };
        table.extend_from_slice(int.as_slice());
    }

    // The 8259 PIC's output reaches the boot processor's LINT0 (virtual wire
    // mode); NMIs reach every processor's LINT1.
    let extint = MpLocalInterrupt {
        entry_type: MP_LINTSRC,
        irq_type: MP_EXTINT,
        irq_flags: MP_IRQFLAG_DEFAULT,
        src_bus_id: ISA_BUS_ID,
        src_bus_irq: 0,
        dst_apic_id: 0,
        dst_apic_lint: 0,
    };
    let nmi = MpLocalInterrupt {
        irq_type: MP_NMI,
        dst_apic_id: ALL_LOCAL_APICS,
        dst_apic_lint: 1,
        ..extint
    };
    table.extend_from_slice(extint.as_slice());
    table.extend_from_slice(nmi.as_slice());

    let config_len = table.len() - fp_len;
    debug_assert_eq!(config_len, config_table_len(num_cpus));
    let mut header = MpConfigHeader {
        signature: MPC_SIGNATURE,
        // Fits: at most 44 + 254 * 20 + 8 + 8 + 24 * 8 + 16 bytes.
        length: config_len as u16,
        spec: MP_SPEC_REV,
        checksum: 0,
        oem: MPC_OEM,
        product_id: MPC_PRODUCT_ID,
        oem_table_ptr: 0,
        oem_table_size: 0,
        entry_count: entry_count(num_cpus) as u16,
        lapic_addr: APIC_DEFAULT_PHYS_BASE,
        ext_table_length: 0,
        ext_table_checksum: 0,
        reserved: 0,
    };
    let header_range = fp_len..fp_len + header_len;
    table[header_range.clone()].copy_from_slice(header.as_slice());
    header.checksum = checksum(&table[fp_len..]);
    table[header_range].copy_from_slice(header.as_slice());

    let mut fp = MpFloatingPointer {
        signature: MPF_SIGNATURE,
        // Fits: MPTABLE_MAX_END is below 1 MiB.
        physptr: (MPTABLE_START + fp_len as u64) as u32,
        length: 1,
        specification: MP_SPEC_REV,
        ..MpFloatingPointer::default()
    };
    fp.checksum = checksum(fp.as_slice());
    table[..fp_len].copy_from_slice(fp.as_slice());
    table
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn guest_memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn byte_sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
    }

    /// Everything a guest would parse out of the table.
    struct Parsed {
        header: MpConfigHeader,
        cpus: Vec<MpProcessor>,
        buses: Vec<MpBus>,
        ioapics: Vec<MpIoApic>,
        io_ints: Vec<MpIoInterrupt>,
        local_ints: Vec<MpLocalInterrupt>,
    }

    /// Reads the table back the way a guest does: floating pointer at
    /// MPTABLE_START, then the config table it points to, entry by entry.
    fn parse(mem: &GuestMemoryMmap) -> Parsed {
        let fp_addr = GuestAddress(MPTABLE_START);
        let fp: MpFloatingPointer = mem.read_obj(fp_addr).unwrap();
        assert_eq!(fp.signature, *b"_MP_");
        assert_eq!(fp.length, 1);
        assert_eq!(fp.specification, 4);
        assert_eq!(fp.feature1, 0, "a config table must be present");
        let mut fp_bytes = [0u8; 16];
        mem.read_slice(&mut fp_bytes, fp_addr).unwrap();
        assert_eq!(byte_sum(&fp_bytes), 0, "floating pointer checksum");

        let table_addr = GuestAddress(u64::from(fp.physptr));
        let header: MpConfigHeader = mem.read_obj(table_addr).unwrap();
        assert_eq!(header.signature, *b"PCMP");
        assert_eq!(header.spec, 4);
        assert_eq!({ header.lapic_addr }, 0xfee0_0000);
        let mut table = vec![0u8; usize::from(header.length)];
        mem.read_slice(&mut table, table_addr).unwrap();
        assert_eq!(byte_sum(&table), 0, "config table checksum");

        let mut parsed = Parsed {
            header,
            cpus: Vec::new(),
            buses: Vec::new(),
            ioapics: Vec::new(),
            io_ints: Vec::new(),
            local_ints: Vec::new(),
        };
        let mut offset = size_of::<MpConfigHeader>();
        let mut entries = 0;
        while offset < table.len() {
            let rest = &table[offset..];
            let len = match rest[0] {
                MP_PROCESSOR => {
                    parsed
                        .cpus
                        .push(*MpProcessor::from_slice(&rest[..20]).unwrap());
                    20
                }
                MP_BUS => {
                    parsed.buses.push(*MpBus::from_slice(&rest[..8]).unwrap());
                    8
                }
                MP_IOAPIC => {
                    parsed
                        .ioapics
                        .push(*MpIoApic::from_slice(&rest[..8]).unwrap());
                    8
                }
                MP_INTSRC => {
                    parsed
                        .io_ints
                        .push(*MpIoInterrupt::from_slice(&rest[..8]).unwrap());
                    8
                }
                MP_LINTSRC => {
                    parsed
                        .local_ints
                        .push(*MpLocalInterrupt::from_slice(&rest[..8]).unwrap());
                    8
                }
                other => panic!("unknown entry type {other} at offset {offset}"),
            };
            offset += len;
            entries += 1;
        }
        assert_eq!(offset, table.len(), "entries end exactly at the table end");
        assert_eq!(entries, usize::from(header.entry_count));
        parsed
    }

    fn check_table(num_cpus: u8) {
        let mem = guest_memory(1 << 20);
        setup_mptable(&mem, num_cpus).unwrap();
        let parsed = parse(&mem);

        let n = usize::from(num_cpus);
        assert_eq!(usize::from(parsed.header.entry_count), n + 1 + 1 + 24 + 2);

        assert_eq!(parsed.cpus.len(), n);
        for (i, cpu) in parsed.cpus.iter().enumerate() {
            assert_eq!(usize::from(cpu.apic_id), i);
            assert_eq!(cpu.apic_version, 0x14);
            assert_ne!(cpu.cpu_flags & CPU_ENABLED, 0);
            assert_eq!(
                cpu.cpu_flags & CPU_BOOTPROCESSOR != 0,
                i == 0,
                "BSP flag on cpu {i}"
            );
            assert_eq!({ cpu.cpu_signature }, 0x600);
            assert_eq!({ cpu.feature_flags }, 0x201);
        }

        assert_eq!(parsed.buses.len(), 1);
        assert_eq!(parsed.buses[0].bus_id, 0);
        assert_eq!(parsed.buses[0].bus_type, *b"ISA   ");

        assert_eq!(parsed.ioapics.len(), 1);
        let ioapic = parsed.ioapics[0];
        assert_eq!(ioapic.apic_id, num_cpus);
        assert_eq!(ioapic.apic_version, 0x11);
        assert_eq!(ioapic.flags, MPC_APIC_USABLE);
        assert_eq!({ ioapic.apic_addr }, 0xfec0_0000);

        assert_eq!(parsed.io_ints.len(), 24);
        for (irq, int) in parsed.io_ints.iter().enumerate() {
            assert_eq!(int.irq_type, MP_INT);
            assert_eq!(int.src_bus_id, 0);
            assert_eq!(usize::from(int.src_bus_irq), irq);
            assert_eq!(int.dst_apic_id, num_cpus);
            assert_eq!(usize::from(int.dst_apic_pin), irq);
        }

        assert_eq!(parsed.local_ints.len(), 2);
        let (extint, nmi) = (parsed.local_ints[0], parsed.local_ints[1]);
        assert_eq!((extint.irq_type, extint.dst_apic_lint), (MP_EXTINT, 0));
        assert_eq!(
            (nmi.irq_type, nmi.dst_apic_id, nmi.dst_apic_lint),
            (MP_NMI, 0xff, 1)
        );

        assert_eq!(
            u64::from(parsed.header.length) + 16,
            mptable_len(num_cpus),
            "mptable_len matches what was written"
        );
    }

    #[test]
    fn one_cpu() {
        check_table(1);
    }

    #[test]
    fn a_few_cpus() {
        check_table(2);
        check_table(37);
    }

    #[test]
    fn max_cpus() {
        check_table(MAX_CPUS);
    }

    #[test]
    fn table_length_and_the_ebda() {
        assert!(MPTABLE_START + mptable_len(37) <= 0xa0000);
        assert!(MPTABLE_START + mptable_len(38) > 0xa0000);
        assert_eq!(MPTABLE_MAX_END, 0xa10f4);
    }

    #[test]
    fn too_many_cpus() {
        let mem = guest_memory(1 << 20);
        let err = setup_mptable(&mem, MAX_CPUS + 1).unwrap_err();
        assert!(matches!(
            err,
            MptableError::TooManyCpus {
                num_cpus: 255,
                max: 254
            }
        ));
        // Nothing was written.
        let signature: [u8; 4] = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(signature, [0; 4]);
    }

    #[test]
    fn no_cpus() {
        let mem = guest_memory(1 << 20);
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::NoCpus)));
    }

    #[test]
    fn memory_too_small() {
        // Backs the floating pointer but not the whole config table.
        let mem = guest_memory(MPTABLE_START as usize + 64);
        let err = setup_mptable(&mem, 4).unwrap_err();
        assert!(matches!(
            err,
            MptableError::WriteMemory {
                addr: MPTABLE_START,
                ..
            }
        ));
        assert!(std::error::Error::source(&err).is_some());
    }
}
