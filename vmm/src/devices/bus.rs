//! The port-I/O bus: maps port ranges to devices.
//!
//! # Design
//!
//! [`PioBus`] keeps a `Vec` of non-overlapping ranges sorted by their first
//! port; a lookup is a binary search (`partition_point`) for the last range
//! starting at or below the port, followed by a bounds check. Ranges are
//! inserted while the VM is built and the bus is read-only afterwards, so
//! lookups need no lock; only the device found is locked, for the duration of
//! one access.
//!
//! An access to a port nobody owns reads as all ones (`0xff` bytes), like an
//! unclaimed ISA port on real hardware, and writes are discarded. Both
//! [`PioBus::read`] and [`PioBus::write`] return `false` in that case so the
//! caller can count such accesses; the bus itself never logs.
//!
//! # Poisoning
//!
//! A device whose mutex is poisoned (a previous access panicked) is still
//! called: [`PoisonError::into_inner`] recovers the guard. Propagating the
//! panic would kill every vCPU that touches the port, which is worse than
//! talking to a device whose last access was interrupted.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

/// A device reachable through port I/O.
///
/// Implementations know nothing of KVM or of absolute port numbers; they
/// must not block and must not panic on any guest input.
pub trait PioDevice: Send {
    /// Handles a guest `in`: fills `data` with the value read.
    ///
    /// `offset` is relative to the first port of the range the device was
    /// inserted at; `data.len()` is 1, 2 or 4.
    fn read(&mut self, offset: u16, data: &mut [u8]);

    /// Handles a guest `out` of `data`.
    ///
    /// `offset` is relative to the first port of the range the device was
    /// inserted at; `data.len()` is 1, 2 or 4.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// Errors from [`PioBus::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The range overlaps a range already on the bus.
    #[error("port range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// First port of the rejected range.
        base: u16,
        /// Length of the rejected range.
        len: u16,
    },
    /// The range is empty.
    #[error("port range at {base:#x} has zero length")]
    ZeroLength {
        /// First port of the rejected range.
        base: u16,
    },
    /// The range runs past port 0xffff.
    #[error("port range {base:#x}+{len:#x} runs past the end of the port space")]
    OutOfRange {
        /// First port of the rejected range.
        base: u16,
        /// Length of the rejected range.
        len: u16,
    },
}

/// One device's range on the bus.
#[derive(Clone)]
struct BusRange {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

impl BusRange {
    /// One past the last port, computed without overflow.
    fn end(&self) -> u32 {
        u32::from(self.base) + u32::from(self.len)
    }

    fn contains(&self, port: u16) -> bool {
        port >= self.base && u32::from(port) < self.end()
    }
}

/// Port-I/O bus: sorted, non-overlapping port ranges, each owned by one
/// device.
///
/// Cloning is cheap (the devices are shared), so each vCPU thread can hold
/// its own copy.
#[derive(Clone, Default)]
pub struct PioBus {
    /// Sorted by `base`; ranges never overlap.
    ranges: Vec<BusRange>,
}

impl fmt::Debug for PioBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.ranges
                    .iter()
                    .map(|r| format!("{:#x}+{:#x}", r.base, r.len)),
            )
            .finish()
    }
}

impl PioBus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` on the ports `base..base + len`.
    ///
    /// # Errors
    ///
    /// [`BusError::ZeroLength`] if `len` is 0, [`BusError::OutOfRange`] if
    /// the range runs past port 0xffff, [`BusError::Overlap`] if any port of
    /// the range already belongs to a device.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn PioDevice>>,
        base: u16,
        len: u16,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let new = BusRange { base, len, device };
        if new.end() > u32::from(u16::MAX) + 1 {
            return Err(BusError::OutOfRange { base, len });
        }
        // Index of the first range starting after `base`; only the ranges
        // right before and at this index can overlap the new one.
        let idx = self.ranges.partition_point(|r| r.base <= base);
        let overlaps_prev = idx
            .checked_sub(1)
            .and_then(|i| self.ranges.get(i))
            .is_some_and(|prev| prev.end() > u32::from(base));
        let overlaps_next = self
            .ranges
            .get(idx)
            .is_some_and(|next| u32::from(next.base) < new.end());
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(idx, new);
        Ok(())
    }

    /// Finds the range holding `port`.
    fn find(&self, port: u16) -> Option<&BusRange> {
        let idx = self.ranges.partition_point(|r| r.base <= port);
        let range = self.ranges.get(idx.checked_sub(1)?)?;
        range.contains(port).then_some(range)
    }

    /// Dispatches a guest `in` from `port`.
    ///
    /// Returns `false`, with `data` filled with `0xff`, when no device owns
    /// the port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some(range) => {
                let mut device = range.device.lock().unwrap_or_else(PoisonError::into_inner);
                device.read(port - range.base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a guest `out` to `port`.
    ///
    /// Returns `false`, discarding the data, when no device owns the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some(range) => {
                let mut device = range.device.lock().unwrap_or_else(PoisonError::into_inner);
                device.write(port - range.base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test fails by panicking on an unexpected error.
mod tests {
    use super::*;

    /// Records the last access; reads return the offset in every byte.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u16, Vec<u8>)>,
        last_read: Option<(u16, usize)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            self.last_read = Some((offset, data.len()));
            data.fill(offset as u8);
        }

        fn write(&mut self, offset: u16, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn insert_rejects_overlaps_and_bad_ranges() {
        let mut bus = PioBus::new();
        bus.insert(recorder(), 0x3f8, 8).unwrap();
        bus.insert(recorder(), 0x2f8, 8).unwrap();
        // Adjacent ranges on both sides are fine.
        bus.insert(recorder(), 0x3f0, 8).unwrap();
        bus.insert(recorder(), 0x400, 1).unwrap();

        for (base, len) in [
            (0x3f8, 8),
            (0x3f9, 1),
            (0x3f4, 5),
            (0x3ff, 2),
            (0x300, 0x200),
        ] {
            assert_eq!(
                bus.insert(recorder(), base, len),
                Err(BusError::Overlap { base, len })
            );
        }
        assert_eq!(
            bus.insert(recorder(), 0x500, 0),
            Err(BusError::ZeroLength { base: 0x500 })
        );
        assert_eq!(
            bus.insert(recorder(), 0xfff0, 0x11),
            Err(BusError::OutOfRange {
                base: 0xfff0,
                len: 0x11
            })
        );
        // The very last port is usable.
        bus.insert(recorder(), 0xfff0, 0x10).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0xffff, &mut data));
        assert_eq!(data, [0x0f]);
    }

    #[test]
    fn dispatches_to_the_right_device_with_offsets() {
        let com1 = recorder();
        let com2 = recorder();
        let mut bus = PioBus::new();
        bus.insert(com1.clone(), 0x3f8, 8).unwrap();
        bus.insert(com2.clone(), 0x2f8, 8).unwrap();

        assert!(bus.write(0x3fd, &[0xab]));
        assert_eq!(com1.lock().unwrap().last_write, Some((5, vec![0xab])));
        assert_eq!(com2.lock().unwrap().last_write, None);

        let mut data = [0u8; 2];
        assert!(bus.read(0x2f8 + 7, &mut data));
        assert_eq!(data, [7, 7]);
        assert_eq!(com2.lock().unwrap().last_read, Some((7, 2)));
        assert_eq!(com1.lock().unwrap().last_read, None);

        let mut data = [0u8; 4];
        assert!(bus.read(0x3f8, &mut data));
        assert_eq!(com1.lock().unwrap().last_read, Some((0, 4)));
    }

    #[test]
    fn unknown_ports_read_all_ones_and_report_false() {
        let dev = recorder();
        let mut bus = PioBus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();

        for port in [0, 0x3f7, 0x400, 0xffff] {
            let mut data = [0u8; 4];
            assert!(!bus.read(port, &mut data));
            assert_eq!(data, [0xff; 4]);
            assert!(!bus.write(port, &[1]));
        }
        assert!(dev.lock().unwrap().last_write.is_none());
        assert!(dev.lock().unwrap().last_read.is_none());

        let empty = PioBus::new();
        let mut data = [0u8; 1];
        assert!(!empty.read(0x3f8, &mut data));
        assert_eq!(data, [0xff]);
    }

    #[test]
    fn poisoned_device_is_still_reachable() {
        let dev = recorder();
        let mut bus = PioBus::new();
        bus.insert(dev.clone(), 0x60, 5).unwrap();

        let poisoner = dev.clone();
        let result = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison the device mutex");
        })
        .join();
        assert!(result.is_err());
        assert!(dev.is_poisoned());

        assert!(bus.write(0x64, &[0xfe]));
        let mut data = [0u8; 1];
        assert!(bus.read(0x64, &mut data));
        assert_eq!(data, [4]);
        let last = dev
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_write
            .clone();
        assert_eq!(last, Some((4, vec![0xfe])));
    }

    #[test]
    fn clones_share_devices() {
        let dev = recorder();
        let mut bus = PioBus::new();
        bus.insert(dev.clone(), 0x505, 1).unwrap();
        let copy = bus.clone();
        assert!(copy.write(0x505, &[1]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0, vec![1])));
        assert_eq!(format!("{bus:?}"), "[\"0x505+0x1\"]");
    }
}
