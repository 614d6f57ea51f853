//! The i8042 keyboard controller, reduced to its CPU reset line.
//!
//! # Design
//!
//! The model is `vm_superio::I8042Device`, which only implements the "pulse
//! reset line" command: a guest write of 0xFE to the command port (0x64)
//! triggers the reset [`EventFdTrigger`], which the VMM turns into a reboot
//! or exit. Linux uses it for `reboot=k` and as a fallback of every reboot.
//!
//! [`I8042`] sits on the bus at port 0x60 with length 5, so the data port is
//! offset 0 and the command/status port offset 4. Offsets 1..=3 are other
//! legacy devices' ports (0x61 is handled by KVM's in-kernel PIT) and read as
//! unclaimed (`0xff`). Both registers read as 0: no output is ever pending,
//! so the guest driver's probe finds no keyboard or mouse.

use std::fmt;

use vm_superio::I8042Device;

use super::bus::PioDevice;
use super::serial::EventFdTrigger;

/// Offset of the data port (0x60) in the device's range.
const DATA_OFFSET: u16 = 0;
/// Offset of the command/status port (0x64) in the device's range.
const COMMAND_OFFSET: u16 = 4;

/// i8042 controller on the port-I/O bus; see the module docs.
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
    reset_failures: u64,
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042")
            .field("reset_evt", self.device.reset_evt())
            .field("reset_failures", &self.reset_failures)
            .finish()
    }
}

impl I8042 {
    /// A controller that triggers `reset_evt` when the guest pulses the
    /// reset line.
    pub fn new(reset_evt: EventFdTrigger) -> Self {
        Self {
            device: I8042Device::new(reset_evt),
            reset_failures: 0,
        }
    }

    /// The reset line.
    pub fn reset_evt(&self) -> &EventFdTrigger {
        self.device.reset_evt()
    }

    /// Reset requests whose eventfd could not be written.
    pub fn reset_failures(&self) -> u64 {
        self.reset_failures
    }
}

/// The vm-superio register offset of a valid guest access.
fn register(offset: u16, len: usize) -> Option<u8> {
    match (offset, len) {
        (DATA_OFFSET | COMMAND_OFFSET, 1) => u8::try_from(offset).ok(),
        _ => None,
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (register(offset, data.len()), data.first_mut()) {
            (Some(reg), Some(byte)) => *byte = self.device.read(reg),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (Some(reg), Some(&value)) = (register(offset, data.len()), data.first()) else {
            return;
        };
        if self.device.write(reg, value).is_err() {
            self.reset_failures += 1;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test fails by panicking on an unexpected error.
mod tests {
    use std::io;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    fn signalled(evt: &EventFd) -> bool {
        match evt.read() {
            Ok(n) => n > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("eventfd read failed: {e}"),
        }
    }

    fn i8042() -> (I8042, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        (dev, evt)
    }

    #[test]
    fn reset_command_signals_the_reset_line() {
        let (mut dev, evt) = i8042();
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert!(signalled(&evt));
        assert!(!signalled(dev.reset_evt()));
        assert_eq!(dev.reset_failures(), 0);
    }

    #[test]
    fn other_writes_do_not_reset() {
        let (mut dev, evt) = i8042();
        dev.write(COMMAND_OFFSET, &[0xaa]);
        dev.write(DATA_OFFSET, &[0xfe]);
        dev.write(COMMAND_OFFSET, &[0xfe, 0x00]);
        dev.write(2, &[0xfe]);
        assert!(!signalled(&evt));
    }

    #[test]
    fn reads() {
        let (mut dev, _evt) = i8042();
        let mut data = [0x55u8; 1];
        dev.read(DATA_OFFSET, &mut data);
        assert_eq!(data, [0]);
        dev.read(COMMAND_OFFSET, &mut data);
        assert_eq!(data, [0]);
        dev.read(1, &mut data);
        assert_eq!(data, [0xff]);
        let mut wide = [0u8; 2];
        dev.read(DATA_OFFSET, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
