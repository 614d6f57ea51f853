//! ACPI tables: how a modern guest finds its CPUs, interrupt controllers,
//! devices and the way to power off.
//!
//! Debian's cloud kernel (and most current kernels) ignore the MP table and
//! take their CPUs from ACPI's MADT, so without these tables a Linux guest
//! sees one CPU and prints `ACPI BIOS Error (bug): A valid RSDP was not
//! found`. The tables are encoded by the rust-vmm `acpi_tables` crate and
//! written into the legacy BIOS area, which the e820 map reserves:
//!
//! | address | table |
//! |---------|-------|
//! | [`RSDP_ADDR`] (0xe0000) | RSDP (revision 2): the guest scans 0xe0000..0xfffff for it, and `boot_params.acpi_rsdp_addr` names it |
//! | after it, 16-byte aligned | XSDT, FADT, MADT, DSDT |
//!
//! - **FADT**: a hardware-reduced platform (no PM timer, no SCI, no fixed
//!   power button). Its sleep control and status registers are the
//!   power-off port ([`crate::devices::POWER_PORT`]): Linux's `poweroff`
//!   writes `SLP_TYP=5 | SLP_EN` (0x34) there, which ends the VM with the
//!   typed `exit` reason. Its reset register is the i8042 command port with
//!   0xfe, so `reboot` ends the VM with the typed `reset` reason, as the
//!   i8042 reset does for every guest.
//! - **MADT**: the local APIC of every vCPU (APIC id = vCPU index, as
//!   [`crate::cpuid`] reports them) and the IOAPIC at GSI 0.
//! - **DSDT**: `\_S5_` (the sleep type written for S5), and under `\_SB_` the
//!   two UARTs (COM1 for the console, COM2 for the agent channel) and the
//!   pvpanic device, each with its ports and interrupt. Later devices
//!   (virtio-mmio, `LNRO0005`) are added here.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::devices;
use crate::memory::GuestMemoryMmap;

/// Where the RSDP goes: the start of the area the guest scans.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The end of the area the tables may use (the legacy BIOS area ends at 1 MiB).
pub const ACPI_AREA_END: u64 = 0x10_0000;
/// Local APIC address, for the MADT.
const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC address, for the MADT.
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The i8042 command port and the value that resets the machine.
const RESET_PORT: u64 = 0x64;
const RESET_VALUE: u8 = 0xfe;
/// OEM fields of every table.
const OEM_ID: [u8; 6] = *b"RELIVE";
const OEM_TABLE_ID: [u8; 8] = *b"RELIVEVM";
const OEM_REVISION: u32 = 1;

/// Errors of writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the legacy BIOS area.
    #[error("the ACPI tables need {needed} bytes from {RSDP_ADDR:#x}; only up to {ACPI_AREA_END:#x} is theirs")]
    TooLarge {
        /// Bytes needed.
        needed: u64,
    },
    /// Guest memory could not be written.
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The encoded tables, with the address each one is written at.
#[derive(Debug, Default)]
pub struct Tables {
    /// `(guest address, bytes)` of every table, RSDP first.
    pub tables: Vec<(u64, Vec<u8>)>,
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// The DSDT: `\_S5_` and the devices under `\_SB_`.
fn dsdt() -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let uart = |name: &str, uid: u8, base: u16, irq: u32| {
        bytes_of(&aml::Device::new(
            format!("_SB_.{name}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::IO::new(base, base, 1, devices::SERIAL_PORT_LEN as u8),
                        &aml::Interrupt::new(true, true, false, false, irq),
                    ]),
                ),
            ],
        ))
    };
    let s5 = bytes_of(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&5u8, &0u8]),
    ));
    dsdt.append_slice(&s5);
    dsdt.append_slice(&uart("COM1", 0, devices::COM1_PORT_BASE, devices::COM1_IRQ));
    dsdt.append_slice(&uart("COM2", 1, devices::COM2_PORT_BASE, devices::COM2_IRQ));
    let pvpanic = bytes_of(&aml::Device::new(
        "_SB_.PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(
                    devices::PVPANIC_PORT,
                    devices::PVPANIC_PORT,
                    1,
                    devices::PVPANIC_PORT_LEN as u8,
                )]),
            ),
        ],
    ));
    dsdt.append_slice(&pvpanic);
    dsdt.update_checksum();
    dsdt.as_slice().to_vec()
}

/// The FADT of a hardware-reduced platform whose DSDT is at `dsdt_addr`.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let power = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(devices::POWER_PORT),
    );
    fadt.sleep_control_reg = power;
    fadt.sleep_status_reg = power;
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        RESET_PORT,
    );
    fadt.reset_value = RESET_VALUE;
    bytes_of(&fadt.finalize())
}

/// The MADT: one enabled local APIC per vCPU, and the IOAPIC.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    bytes_of(&madt)
}

/// Encodes the tables of a VM with `vcpus` vCPUs, laid out from [`RSDP_ADDR`].
pub fn build(vcpus: u8) -> Result<Tables, AcpiError> {
    let xsdt_addr = align16(RSDP_ADDR + Rsdp::len() as u64);
    // The XSDT lists two tables: its size is known before their addresses.
    let xsdt_len = 36 + 2 * 8;
    let fadt_addr = align16(xsdt_addr + xsdt_len);
    let fadt_bytes_len =
        bytes_of(&FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION).finalize()).len() as u64;
    let madt_addr = align16(fadt_addr + fadt_bytes_len);
    let madt = madt(vcpus);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let dsdt = dsdt();
    let fadt = fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_AREA_END {
        return Err(AcpiError::TooLarge {
            needed: end - RSDP_ADDR,
        });
    }
    Ok(Tables {
        tables: vec![
            (RSDP_ADDR, bytes_of(&Rsdp::new(OEM_ID, xsdt_addr))),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    })
}

/// Writes the tables of a VM with `vcpus` vCPUs into guest memory; returns
/// the RSDP's address (for `boot_params.acpi_rsdp_addr`).
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<u64, AcpiError> {
    for (addr, bytes) in build(vcpus)?.tables {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn table<'a>(tables: &'a Tables, signature: &[u8]) -> (u64, &'a [u8]) {
        tables
            .tables
            .iter()
            .find(|(_, b)| b.starts_with(signature))
            .map(|(a, b)| (*a, b.as_slice()))
            .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(signature)))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn every_table_checksums_to_zero_and_has_its_length() {
        let tables = build(4).unwrap();
        let (rsdp_addr, rsdp) = table(&tables, b"RSD PTR ");
        assert_eq!(rsdp_addr, RSDP_ADDR);
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP 1.0 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        for sig in [&b"XSDT"[..], b"FACP", b"APIC", b"DSDT"] {
            let (_, t) = table(&tables, sig);
            assert_eq!(u32_at(t, 4) as usize, t.len(), "{sig:?} length");
            assert_eq!(sum(t), 0, "{sig:?} checksum");
        }
        // No table overlaps the next, and all stay in the BIOS area.
        let mut spans: Vec<(u64, u64)> = tables
            .tables
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{spans:x?}");
        }
        assert!(spans.last().unwrap().1 <= ACPI_AREA_END);
    }

    #[test]
    fn the_pointers_lead_from_the_rsdp_to_every_table() {
        let tables = build(2).unwrap();
        let (_, rsdp) = table(&tables, b"RSD PTR ");
        let (xsdt_addr, xsdt) = table(&tables, b"XSDT");
        assert_eq!(u64_at(rsdp, 24), xsdt_addr);
        let listed: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|at| u64_at(xsdt, at))
            .collect();
        let (fadt_addr, fadt) = table(&tables, b"FACP");
        let (madt_addr, _) = table(&tables, b"APIC");
        assert_eq!(listed, vec![fadt_addr, madt_addr]);
        let (dsdt_addr, _) = table(&tables, b"DSDT");
        assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
        // Hardware-reduced, with a reset register.
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // Sleep control register: one byte of I/O space at the power-off port.
        assert_eq!(fadt[244], 1, "sleep control in I/O space");
        assert_eq!(u64_at(fadt, 248), u64::from(devices::POWER_PORT));
        // Reset register: the i8042 command port, value 0xfe.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(fadt, 120), RESET_PORT);
        assert_eq!(fadt[128], RESET_VALUE);
    }

    #[test]
    fn the_madt_lists_every_vcpu_and_the_ioapic() {
        for vcpus in [1u8, 2, 8] {
            let tables = build(vcpus).unwrap();
            let (_, madt) = table(&tables, b"APIC");
            assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
            let mut apics = Vec::new();
            let mut ioapics = 0;
            let mut at = 44;
            while at < madt.len() {
                let (kind, len) = (madt[at], madt[at + 1] as usize);
                match kind {
                    0 => {
                        assert_eq!(u32_at(madt, at + 4) & 1, 1, "enabled");
                        apics.push((madt[at + 2], madt[at + 3]));
                    }
                    1 => {
                        ioapics += 1;
                        assert_eq!(u32_at(madt, at + 4), IOAPIC_ADDR);
                    }
                    other => panic!("unexpected MADT entry type {other}"),
                }
                at += len;
            }
            let want: Vec<(u8, u8)> = (0..vcpus).map(|i| (i, i)).collect();
            assert_eq!(apics, want, "processor uid and APIC id per vCPU");
            assert_eq!(ioapics, 1);
        }
    }

    #[test]
    fn the_dsdt_names_s5_and_the_devices() {
        let tables = build(1).unwrap();
        let (_, dsdt) = table(&tables, b"DSDT");
        let body = &dsdt[36..];
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_S5_"));
        for name in [&b"COM1"[..], b"COM2", b"PEVT", b"QEMU0001"] {
            assert!(has(name), "{}", String::from_utf8_lossy(name));
        }
    }
}
