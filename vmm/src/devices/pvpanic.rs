//! The pvpanic ISA device: the guest kernel reports a panic.
//!
//! # Design
//!
//! QEMU's pvpanic protocol at port 0x505 (one byte). A read returns the
//! events the device supports, [`PVPANIC_PANICKED`] | [`PVPANIC_CRASH_LOADED`];
//! Linux's `pvpanic` driver (built in with `CONFIG_PVPANIC`) reads it at
//! probe and, on panic, writes the event:
//!
//! - bit 0, "panicked": the guest is dead. The device writes its `panic`
//!   eventfd; the VMM stops the VM and exits with the panic status.
//! - bit 1, "crash loaded": a kdump kernel is taking over, so the guest will
//!   keep running; the event is recorded in [`PvPanic::last_event`] but does
//!   not stop the VM.
//!
//! Unsupported bits are ignored, as is a write with no supported bit.

use vmm_sys_util::eventfd::EventFd;

use super::bus::PioDevice;

/// The guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest panicked and a crash kernel was loaded.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// Events this device supports, returned by reads.
pub const PVPANIC_CAPABILITIES: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

/// The pvpanic device on the port-I/O bus; see the module docs.
#[derive(Debug)]
pub struct PvPanic {
    panic_evt: EventFd,
    last_event: u8,
    signal_failures: u64,
}

impl PvPanic {
    /// A device that writes `panic_evt` when the guest reports a panic.
    pub fn new(panic_evt: EventFd) -> Self {
        Self {
            panic_evt,
            last_event: 0,
            signal_failures: 0,
        }
    }

    /// The last event the guest reported (supported bits only; 0 if none).
    pub fn last_event(&self) -> u8 {
        self.last_event
    }

    /// The eventfd written on a panic.
    pub fn panic_evt(&self) -> &EventFd {
        &self.panic_evt
    }

    /// Panics whose eventfd could not be written.
    pub fn signal_failures(&self) -> u64 {
        self.signal_failures
    }
}

impl PioDevice for PvPanic {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (offset, data) {
            (0, [byte]) => *byte = PVPANIC_CAPABILITIES,
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (0, &[value]) = (offset, data) else {
            return;
        };
        let event = value & PVPANIC_CAPABILITIES;
        if event == 0 {
            return;
        }
        self.last_event = event;
        if event & PVPANIC_PANICKED != 0 && self.panic_evt.write(1).is_err() {
            self.signal_failures += 1;
        }
    }
}

/// Saved state of the pvpanic device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PvPanicSnapshot {
    /// The last event bits the guest wrote.
    pub last_event: u8,
}

impl crate::persist::Persist for PvPanic {
    type State = PvPanicSnapshot;
    type RestoreArgs = EventFd;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<PvPanicSnapshot, Self::Error> {
        Ok(PvPanicSnapshot {
            last_event: self.last_event,
        })
    }

    fn restore(panic_evt: EventFd, state: &PvPanicSnapshot) -> Result<Self, Self::Error> {
        let mut dev = PvPanic::new(panic_evt);
        dev.last_event = state.last_event;
        Ok(dev)
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

    fn pvpanic() -> PvPanic {
        PvPanic::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn read_returns_capabilities() {
        let mut dev = pvpanic();
        let mut data = [0u8; 1];
        dev.read(0, &mut data);
        assert_eq!(data, [PVPANIC_PANICKED | PVPANIC_CRASH_LOADED]);
        assert_eq!(data, [3]);
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn panicked_signals_the_panic_eventfd() {
        let mut dev = pvpanic();
        dev.write(0, &[PVPANIC_PANICKED]);
        assert!(signalled(dev.panic_evt()));
        assert_eq!(dev.last_event(), PVPANIC_PANICKED);
        assert_eq!(dev.signal_failures(), 0);
    }

    #[test]
    fn crash_loaded_is_recorded_without_signalling() {
        let mut dev = pvpanic();
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        assert!(!signalled(dev.panic_evt()));
        assert_eq!(dev.last_event(), PVPANIC_CRASH_LOADED);
    }

    #[test]
    fn unsupported_writes_are_ignored() {
        let mut dev = pvpanic();
        dev.write(0, &[0]);
        dev.write(0, &[0xf0]);
        dev.write(0, &[PVPANIC_PANICKED, 0]);
        dev.write(1, &[PVPANIC_PANICKED]);
        assert!(!signalled(dev.panic_evt()));
        assert_eq!(dev.last_event(), 0);

        // Unknown bits are masked off.
        dev.write(0, &[0xf1]);
        assert!(signalled(dev.panic_evt()));
        assert_eq!(dev.last_event(), PVPANIC_PANICKED);
    }

    #[test]
    fn pvpanic_state_passes_the_persist_conformance_check() {
        use crate::persist::conformance;
        let mut dev = PvPanic::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        conformance::check(
            &dev,
            EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
            |restored| restored.write(0, &[PVPANIC_PANICKED]),
        );
    }
}
