//! The power-off port: how a guest asks to be switched off.
//!
//! # Design
//!
//! A one-byte port at 0x600 with the semantics of Cloud Hypervisor's ACPI
//! shutdown device: the guest writes the value it would put in the ACPI
//! PM1 control register to enter S5, `SLP_TYP = 5` in bits 2..=4 and
//! `SLP_EN` (bit 5), i.e. [`POWER_OFF_S5`] = `(5 << 2) | (1 << 5)` = 0x34.
//! That write signals the `poweroff` eventfd and the VMM stops the VM with
//! the "powered off" exit status. Any other value is ignored (Cloud
//! Hypervisor's reset value, 1, is not implemented: resets go through the
//! i8042). Reads return 0.
//!
//! This is the bundled guest's `exit` path: it writes 0x34 to port 0x600.
//! A Linux guest reaches the port only through ACPI tables whose `PM1a_CNT`
//! points here; without them it ends with a reset through the i8042.

use vmm_sys_util::eventfd::EventFd;

use super::bus::PioDevice;

/// ACPI sleep type of S5 ("soft off").
const SLP_TYP_S5: u8 = 5;
/// Bit position of `SLP_TYP` in PM1 control.
const SLP_TYP_SHIFT: u8 = 2;
/// `SLP_EN` bit of PM1 control.
const SLP_EN: u8 = 1 << 5;
/// The value that powers the VM off: S5 with `SLP_EN`, 0x34.
pub const POWER_OFF_S5: u8 = (SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN;

/// The power-off port on the port-I/O bus; see the module docs.
#[derive(Debug)]
pub struct PowerOff {
    poweroff_evt: EventFd,
    signal_failures: u64,
}

impl PowerOff {
    /// A port that writes `poweroff_evt` when the guest powers off.
    pub fn new(poweroff_evt: EventFd) -> Self {
        Self {
            poweroff_evt,
            signal_failures: 0,
        }
    }

    /// The eventfd written on power-off.
    pub fn poweroff_evt(&self) -> &EventFd {
        &self.poweroff_evt
    }

    /// Power-off requests whose eventfd could not be written.
    pub fn signal_failures(&self) -> u64 {
        self.signal_failures
    }
}

impl PioDevice for PowerOff {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (offset, data) {
            (0, [byte]) => *byte = 0,
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (0, &[POWER_OFF_S5]) = (offset, data) {
            if self.poweroff_evt.write(1).is_err() {
                self.signal_failures += 1;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test fails by panicking on an unexpected error.
mod tests {
    use std::io;

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    fn signalled(evt: &EventFd) -> bool {
        match evt.read() {
            Ok(n) => n > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("eventfd read failed: {e}"),
        }
    }

    fn power() -> PowerOff {
        PowerOff::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn s5_value_is_0x34() {
        assert_eq!(POWER_OFF_S5, 0x34);
    }

    #[test]
    fn s5_write_signals_power_off() {
        let mut dev = power();
        dev.write(0, &[0x34]);
        assert!(signalled(dev.poweroff_evt()));
        assert_eq!(dev.signal_failures(), 0);
    }

    #[test]
    fn other_writes_are_ignored() {
        let mut dev = power();
        for value in [0x00, 0x01, 0x14, 0x20, 0x35, 0xff] {
            dev.write(0, &[value]);
        }
        dev.write(0, &[0x34, 0x00]);
        dev.write(1, &[0x34]);
        dev.write(0, &[]);
        assert!(!signalled(dev.poweroff_evt()));
    }

    #[test]
    fn reads_return_zero() {
        let mut dev = power();
        let mut data = [0xaau8; 1];
        dev.read(0, &mut data);
        assert_eq!(data, [0]);
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
    }
}
