//! The agent line port: one VM exit per agent line instead of one per byte.
//!
//! A UART takes one byte per `out`, and every `out` is a VM exit (about 35 µs
//! on nested KVM, 1-2 µs on bare metal); KVM does not batch `rep outsb`. A
//! guest that knows this port hands the VMM a whole line at once instead:
//!
//! - a 4-byte read at offset 0 returns [`LINE_PORT_MAGIC`] ("RLV1"), so a guest
//!   can probe for the port (an absent port reads as all ones) and fall back
//!   to the UART on any other VMM;
//! - a 4-byte write at offset 0 gives the guest-physical address of a line
//!   (below 4 GiB). The device copies up to [`MAX_LINE_LEN`] + 1 bytes from
//!   there, up to and including the first `'\n'`, into the COM2 output path:
//!   the same framing, length limit and rate limit as bytes written to the
//!   UART, so the host sees no difference.
//!
//! Host-to-guest commands still arrive through the UART's receive FIFO.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::{Bytes, GuestAddress};

use super::agent::MAX_LINE_LEN;
use super::bus::PioDevice;
use super::serial::SerialDevice;
use crate::memory::GuestMemoryMmap;

/// What a read of the port returns: "RLV1" little-endian.
pub const LINE_PORT_MAGIC: u32 = u32::from_le_bytes(*b"RLV1");

/// The agent line port, feeding the COM2 device's output.
pub struct LinePort<W: Write + Send> {
    mem: GuestMemoryMmap,
    uart: Arc<Mutex<SerialDevice<W>>>,
    /// Writes whose address was not in guest memory.
    bad_addresses: u64,
}

impl<W: Write + Send> LinePort<W> {
    /// A port that reads lines from `mem` and writes them to `uart`'s output.
    pub fn new(mem: GuestMemoryMmap, uart: Arc<Mutex<SerialDevice<W>>>) -> Self {
        LinePort {
            mem,
            uart,
            bad_addresses: 0,
        }
    }

    /// Writes whose address was outside guest memory.
    pub fn bad_addresses(&self) -> u64 {
        self.bad_addresses
    }
}

impl<W: Write + Send> PioDevice for LinePort<W> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&LINE_PORT_MAGIC.to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Ok(raw) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset != 0 {
            return;
        }
        let addr = GuestAddress(u64::from(u32::from_le_bytes(raw)));
        let mut buf = [0u8; MAX_LINE_LEN + 1];
        let n = match self.mem.read(&mut buf, addr) {
            Ok(n) if n > 0 => n,
            _ => {
                self.bad_addresses += 1;
                return;
            }
        };
        let len = buf[..n]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(n, |i| i + 1);
        let mut uart = self.uart.lock().unwrap_or_else(PoisonError::into_inner);
        // The writer is the agent framer; it does not fail.
        let _ = uart.writer_mut().write_all(&buf[..len]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::{EventFdTrigger, SerialEventsSink};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    type Uart = Arc<Mutex<SerialDevice<Vec<u8>>>>;

    fn port() -> (LinePort<Vec<u8>>, Uart, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let uart = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            SerialEventsSink::new(),
            Vec::new(),
        )));
        (LinePort::new(mem.clone(), uart.clone()), uart, mem)
    }

    #[test]
    fn probe_reads_the_magic() {
        let (mut p, _, _) = port();
        let mut data = [0u8; 4];
        p.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), LINE_PORT_MAGIC);
        let mut byte = [0u8; 1];
        p.read(0, &mut byte);
        assert_eq!(byte, [0xff]);
    }

    #[test]
    fn a_write_passes_one_line_to_the_uart_output() {
        let (mut p, uart, mem) = port();
        mem.write_slice(b"hb seq=1\nnext line\n", GuestAddress(0x1000))
            .unwrap();
        p.write(0, &0x1000u32.to_le_bytes());
        assert_eq!(uart.lock().unwrap().writer().as_slice(), b"hb seq=1\n");
    }

    #[test]
    fn a_line_without_newline_is_cut_at_the_limit_and_bad_addresses_count() {
        let (mut p, uart, mem) = port();
        mem.write_slice(&[b'x'; 2 * MAX_LINE_LEN], GuestAddress(0x2000))
            .unwrap();
        p.write(0, &0x2000u32.to_le_bytes());
        assert_eq!(uart.lock().unwrap().writer().len(), MAX_LINE_LEN + 1);
        p.write(0, &0x4000_0000u32.to_le_bytes());
        assert_eq!(p.bad_addresses(), 1);
        p.write(0, &[1, 2]);
        assert_eq!(p.bad_addresses(), 1);
    }
}
