//! 16550A UARTs (COM1 console, COM2 agent channel) built on vm-superio.
//!
//! # Design
//!
//! The register model is `vm_superio::Serial`; this module only supplies the
//! glue it is generic over:
//!
//! - [`EventFdTrigger`], the interrupt line: an `EventFd` the VMM registers
//!   as an irqfd for the UART's IRQ, written on every interrupt edge.
//! - [`SerialEventsSink`], the `SerialEvents` observer: lock-free counters
//!   plus an optional "RX drained" `EventFd`, signalled when the guest empties
//!   the receive FIFO, so the host can push the next chunk of queued input
//!   (the FIFO holds only [`FIFO_SIZE`] bytes).
//! - the output `W: Write`: [`ConsoleWriter`] for COM1,
//!   [`AgentWriter`](super::agent::AgentWriter) for COM2.
//!
//! [`SerialDevice`] adapts the result to [`PioDevice`]: the 8 registers sit
//! at offsets 0..=7 and only 1-byte accesses are meaningful; wider or
//! out-of-range accesses read as `0xff` and are otherwise ignored.
//!
//! # Flushing
//!
//! vm-superio calls `write_all` then `flush` on the writer for every byte the
//! guest transmits. [`ConsoleWriter`] therefore treats `Write::flush` as a
//! no-op and buffers by line; the host calls [`ConsoleWriter::flush_buffered`]
//! (for example when the VM stops) to push out a trailing partial line.
//!
//! # Errors inside guest accesses
//!
//! A guest access cannot return an error. A writer that fails (closed
//! stdout) is counted in `tx_lost_bytes` by vm-superio; an interrupt that
//! cannot be signalled is counted in `interrupt_failures`. Nothing is logged
//! from the vCPU thread.

use std::fmt;
use std::io::{self, LineWriter, Write};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::{Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::PioDevice;

/// Size of vm-superio's receive FIFO, in bytes.
pub const FIFO_SIZE: usize = 64;

/// Number of UART registers, i.e. the length of the device's port range.
const UART_REGISTERS: u16 = 8;

/// Capacity of the console's line buffer: a line longer than this is
/// written out in pieces.
pub const CONSOLE_BUFFER_SIZE: usize = 4096;

/// An `EventFd` used as a vm-superio interrupt or reset line.
///
/// Triggering writes 1 to the eventfd; the VMM registers it as an irqfd (for
/// a UART) or polls it (for the i8042 reset line).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// Duplicates the file descriptor; both share one kernel counter.
    ///
    /// # Errors
    ///
    /// The `dup` error, for instance when the process is out of descriptors.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// The wrapped eventfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }

    /// Unwraps the eventfd.
    pub fn into_inner(self) -> EventFd {
        self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl Deref for EventFdTrigger {
    type Target = EventFd;

    fn deref(&self) -> &EventFd {
        &self.0
    }
}

/// Counters of a UART, as returned by [`SerialDevice::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SerialStats {
    /// Bytes the guest transmitted that reached the writer.
    pub out_bytes: u64,
    /// Bytes the guest transmitted that the writer refused.
    pub tx_lost_bytes: u64,
    /// Guest reads of the receive buffer register.
    pub buffer_reads: u64,
    /// Times the guest found the receive FIFO empty after a read.
    pub rx_drained: u64,
    /// Interrupts (or "RX drained" notifications) that could not be signalled.
    pub interrupt_failures: u64,
}

/// vm-superio `SerialEvents` observer: counters, plus an optional eventfd
/// signalled when the guest drains the receive FIFO.
#[derive(Debug, Default)]
pub struct SerialEventsSink {
    rx_drained_evt: Option<EventFd>,
    out_bytes: AtomicU64,
    tx_lost_bytes: AtomicU64,
    buffer_reads: AtomicU64,
    rx_drained: AtomicU64,
    signal_failures: AtomicU64,
}

impl SerialEventsSink {
    /// A sink that only counts.
    pub fn new() -> Self {
        Self::default()
    }

    /// A sink that also writes 1 to `evt` whenever the guest empties the
    /// receive FIFO, so the host can enqueue more input.
    pub fn with_rx_drained(evt: EventFd) -> Self {
        Self {
            rx_drained_evt: Some(evt),
            ..Self::default()
        }
    }

    /// The "RX drained" eventfd, if any.
    pub fn rx_drained_evt(&self) -> Option<&EventFd> {
        self.rx_drained_evt.as_ref()
    }

    fn stats(&self) -> SerialStats {
        SerialStats {
            out_bytes: self.out_bytes.load(Ordering::Relaxed),
            tx_lost_bytes: self.tx_lost_bytes.load(Ordering::Relaxed),
            buffer_reads: self.buffer_reads.load(Ordering::Relaxed),
            rx_drained: self.rx_drained.load(Ordering::Relaxed),
            interrupt_failures: self.signal_failures.load(Ordering::Relaxed),
        }
    }
}

impl SerialEvents for SerialEventsSink {
    fn buffer_read(&self) {
        self.buffer_reads.fetch_add(1, Ordering::Relaxed);
    }

    fn out_byte(&self) {
        self.out_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        self.tx_lost_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        self.rx_drained.fetch_add(1, Ordering::Relaxed);
        if let Some(evt) = &self.rx_drained_evt {
            if evt.write(1).is_err() {
                self.signal_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Errors of [`SerialDevice`] operations driven by the host.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Host input was queued but the guest could not be interrupted.
    #[error("queued {queued} input bytes but could not signal the serial interrupt")]
    InputInterrupt {
        /// Bytes that are in the FIFO despite the error; do not send them again.
        queued: usize,
        /// The eventfd error.
        #[source]
        source: io::Error,
    },
    /// A saved state holds more input than the FIFO.
    #[error("serial state holds {len} input bytes, more than the {FIFO_SIZE}-byte FIFO")]
    StateFifoOverflow {
        /// Input bytes in the rejected state.
        len: usize,
    },
    /// The interrupt pending in a restored state could not be signalled.
    #[error("could not signal the serial interrupt pending in the restored state")]
    RestoreInterrupt(#[source] io::Error),
}

/// The vm-superio UART type wrapped by [`SerialDevice`].
pub type Uart<W> = Serial<EventFdTrigger, SerialEventsSink, W>;

/// A 16550A UART on the port-I/O bus, writing guest output to `W`.
pub struct SerialDevice<W: Write + Send> {
    serial: Uart<W>,
    interrupt_failures: u64,
}

impl<W: Write + Send> fmt::Debug for SerialDevice<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialDevice")
            .field("state", &self.serial.state())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART in its power-on state.
    ///
    /// `interrupt` is the IRQ line (an irqfd), `events` observes the FIFO,
    /// `out` receives what the guest transmits.
    pub fn new(interrupt: EventFdTrigger, events: SerialEventsSink, out: W) -> Self {
        Self {
            serial: Serial::with_events(interrupt, events, out),
            interrupt_failures: 0,
        }
    }

    /// A UART restored from `state`; re-signals any interrupt pending in it.
    ///
    /// # Errors
    ///
    /// [`SerialError::StateFifoOverflow`] if the state holds more than
    /// [`FIFO_SIZE`] input bytes, [`SerialError::RestoreInterrupt`] if the
    /// pending interrupt cannot be signalled.
    pub fn from_state(
        state: &SerialState,
        interrupt: EventFdTrigger,
        events: SerialEventsSink,
        out: W,
    ) -> Result<Self, SerialError> {
        let serial = Serial::from_state(state, interrupt, events, out).map_err(|e| match e {
            UartError::Trigger(source) | UartError::IOError(source) => {
                SerialError::RestoreInterrupt(source)
            }
            UartError::FullFifo => SerialError::StateFifoOverflow {
                len: state.in_buffer.len(),
            },
        })?;
        Ok(Self {
            serial,
            interrupt_failures: 0,
        })
    }

    /// The register state, including unread input.
    pub fn state(&self) -> SerialState {
        self.serial.state()
    }

    /// Queues host bytes for the guest to read and raises the receive
    /// interrupt if the guest enabled it.
    ///
    /// Returns how many bytes fit in the FIFO (0 when it is full, or when
    /// the guest put the UART in loopback mode); queue the rest and retry
    /// when the "RX drained" eventfd fires.
    ///
    /// # Errors
    ///
    /// [`SerialError::InputInterrupt`] if the interrupt cannot be
    /// signalled; the bytes it reports as queued are in the FIFO.
    pub fn enqueue(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        let before = self.serial.fifo_capacity();
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => Ok(n),
            Err(UartError::FullFifo) => Ok(0),
            Err(UartError::Trigger(source) | UartError::IOError(source)) => {
                self.interrupt_failures += 1;
                Err(SerialError::InputInterrupt {
                    queued: before.saturating_sub(self.serial.fifo_capacity()),
                    source,
                })
            }
        }
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// The output writer.
    pub fn writer(&self) -> &W {
        self.serial.writer()
    }

    /// The output writer, mutably (to flush it, or read its counters).
    pub fn writer_mut(&mut self) -> &mut W {
        self.serial.writer_mut()
    }

    /// The wrapped vm-superio UART.
    pub fn inner(&self) -> &Uart<W> {
        &self.serial
    }

    /// The interrupt line.
    pub fn interrupt_evt(&self) -> &EventFdTrigger {
        self.serial.interrupt_evt()
    }

    /// Counters since creation.
    pub fn stats(&self) -> SerialStats {
        let mut stats = self.serial.events().stats();
        stats.interrupt_failures += self.interrupt_failures;
        stats
    }
}

/// The UART register addressed by a guest access, if the access is valid.
fn register(offset: u16, len: usize) -> Option<u8> {
    if len != 1 || offset >= UART_REGISTERS {
        return None;
    }
    u8::try_from(offset).ok()
}

impl<W: Write + Send> PioDevice for SerialDevice<W> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (register(offset, data.len()), data.first_mut()) {
            (Some(reg), Some(byte)) => *byte = self.serial.read(reg),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (Some(reg), Some(&value)) = (register(offset, data.len()), data.first()) else {
            return;
        };
        match self.serial.write(reg, value) {
            // Output errors are counted by the events sink (tx_lost_byte).
            Ok(()) | Err(UartError::IOError(_) | UartError::FullFifo) => {}
            Err(UartError::Trigger(_)) => self.interrupt_failures += 1,
        }
    }
}

/// COM1 output: line-buffered writes to stdout or a file.
///
/// Guest bytes are buffered until a `'\n'` or until the buffer holds
/// [`CONSOLE_BUFFER_SIZE`] bytes. `Write::flush` does nothing, because
/// vm-superio flushes after every byte; call
/// [`flush_buffered`](Self::flush_buffered) to push out a partial line.
/// Dropping the writer flushes it.
pub struct ConsoleWriter {
    out: LineWriter<Box<dyn Write + Send>>,
}

impl fmt::Debug for ConsoleWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleWriter").finish_non_exhaustive()
    }
}

impl ConsoleWriter {
    /// Line-buffers writes to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out: LineWriter::with_capacity(CONSOLE_BUFFER_SIZE, out),
        }
    }

    /// Line-buffers writes to the process's stdout.
    pub fn stdout() -> Self {
        Self::new(Box::new(io::stdout()))
    }

    /// Writes out everything buffered, including a partial line.
    ///
    /// # Errors
    ///
    /// The error of the underlying writer.
    pub fn flush_buffered(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }

    /// Does nothing: see the type's documentation.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Saved state of a UART: our mirror of vm-superio's `SerialState`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received from the host that the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl<W: Write + Send> crate::persist::Persist for SerialDevice<W> {
    type State = SerialSnapshot;
    type RestoreArgs = (EventFdTrigger, SerialEventsSink, W);
    type Error = SerialError;

    fn save(&self) -> Result<SerialSnapshot, SerialError> {
        let s = self.state();
        Ok(SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    fn restore(
        (interrupt, events, out): Self::RestoreArgs,
        s: &SerialSnapshot,
    ) -> Result<Self, SerialError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        SerialDevice::from_state(&state, interrupt, events, out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test fails by panicking on an unexpected error.
mod tests {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    // UART register offsets and bits (16550A).
    const RBR_THR: u16 = 0;
    const IER: u16 = 1;
    const LCR: u16 = 3;
    const MCR: u16 = 4;
    const LSR: u16 = 5;
    const IER_RDA: u8 = 0x01;
    const LSR_DATA_READY: u8 = 0x01;
    const MCR_LOOP: u8 = 0x10;

    fn evt() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    fn signalled(evt: &EventFd) -> bool {
        match evt.read() {
            Ok(n) => n > 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("eventfd read failed: {e}"),
        }
    }

    struct Uart {
        dev: SerialDevice<Vec<u8>>,
        irq: EventFd,
        drained: EventFd,
    }

    fn uart() -> Uart {
        let irq = evt();
        let drained = evt();
        let dev = SerialDevice::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            SerialEventsSink::with_rx_drained(drained.try_clone().unwrap()),
            Vec::new(),
        );
        Uart { dev, irq, drained }
    }

    fn read_reg(dev: &mut impl PioDevice, offset: u16) -> u8 {
        let mut data = [0u8; 1];
        dev.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let mut u = uart();
        for &b in b"ok\n" {
            u.dev.write(RBR_THR, &[b]);
        }
        assert_eq!(u.dev.writer(), b"ok\n");
        assert_eq!(u.dev.stats().out_bytes, 3);
        u.dev.writer_mut().clear();
        assert!(u.dev.writer().is_empty());
    }

    #[test]
    fn host_input_is_readable_through_rbr() {
        let mut u = uart();
        assert_eq!(read_reg(&mut u.dev, LSR) & LSR_DATA_READY, 0);

        assert_eq!(u.dev.enqueue(b"hi").unwrap(), 2);
        assert_eq!(u.dev.fifo_capacity(), FIFO_SIZE - 2);
        assert_eq!(read_reg(&mut u.dev, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(read_reg(&mut u.dev, RBR_THR), b'h');
        assert!(!signalled(&u.drained));
        assert_eq!(read_reg(&mut u.dev, RBR_THR), b'i');
        assert_eq!(read_reg(&mut u.dev, LSR) & LSR_DATA_READY, 0);
        // The guest drained the FIFO: the host is told to push more.
        assert!(signalled(&u.drained));
        let stats = u.dev.stats();
        assert_eq!((stats.buffer_reads, stats.rx_drained), (2, 1));
    }

    #[test]
    fn enqueue_reports_what_fits() {
        let mut u = uart();
        let input = [b'x'; FIFO_SIZE + 10];
        assert_eq!(u.dev.enqueue(&input).unwrap(), FIFO_SIZE);
        assert_eq!(u.dev.fifo_capacity(), 0);
        assert_eq!(u.dev.enqueue(b"more").unwrap(), 0);
        assert_eq!(u.dev.enqueue(b"").unwrap(), 0);
    }

    #[test]
    fn enqueue_in_loopback_mode_queues_nothing() {
        let mut u = uart();
        u.dev.write(MCR, &[MCR_LOOP]);
        assert_eq!(u.dev.enqueue(b"abc").unwrap(), 0);
        // Loopback: transmitted bytes come back, nothing reaches the writer.
        u.dev.write(RBR_THR, b"z");
        assert_eq!(read_reg(&mut u.dev, RBR_THR), b'z');
        assert!(u.dev.writer().is_empty());
    }

    #[test]
    fn rx_interrupt_fires_only_when_enabled() {
        let mut u = uart();
        assert_eq!(u.dev.enqueue(b"a").unwrap(), 1);
        assert!(!signalled(&u.irq));
        assert_eq!(read_reg(&mut u.dev, RBR_THR), b'a');

        u.dev.write(IER, &[IER_RDA]);
        assert_eq!(read_reg(&mut u.dev, IER), IER_RDA);
        assert!(!signalled(&u.irq));
        assert_eq!(u.dev.enqueue(b"b").unwrap(), 1);
        assert!(signalled(&u.irq));
        assert!(u.dev.interrupt_evt().read().is_err());
    }

    #[test]
    fn non_byte_and_out_of_range_accesses_are_ignored() {
        let mut u = uart();
        u.dev.write(LCR, &[0x03]);
        let mut wide = [0u8; 2];
        u.dev.read(LCR, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        let mut past = [0u8; 1];
        u.dev.read(UART_REGISTERS, &mut past);
        assert_eq!(past, [0xff]);

        u.dev.write(RBR_THR, b"ab");
        u.dev.write(UART_REGISTERS, b"c");
        u.dev.write(LCR, &[]);
        assert!(u.dev.writer().is_empty());
        assert_eq!(read_reg(&mut u.dev, LCR), 0x03);
    }

    #[test]
    fn state_round_trips_through_from_state() {
        let mut u = uart();
        u.dev.write(IER, &[IER_RDA]);
        u.dev.write(LCR, &[0x03]);
        assert_eq!(u.dev.enqueue(b"xyz").unwrap(), 3);
        let state = u.dev.state();
        assert_eq!(state.in_buffer, b"xyz");
        assert_eq!(u.dev.inner().state(), state);

        let irq = evt();
        let mut restored = SerialDevice::from_state(
            &state,
            EventFdTrigger::new(irq.try_clone().unwrap()),
            SerialEventsSink::new(),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(restored.state(), state);
        // The pending receive interrupt is re-signalled.
        assert!(signalled(&irq));
        assert_eq!(read_reg(&mut restored, RBR_THR), b'x');
    }

    #[test]
    fn from_state_rejects_an_oversized_fifo() {
        let state = SerialState {
            in_buffer: vec![0; FIFO_SIZE + 1],
            ..SerialState::default()
        };
        let err = SerialDevice::from_state(
            &state,
            EventFdTrigger::new(evt()),
            SerialEventsSink::new(),
            Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            SerialError::StateFifoOverflow { len } if len == FIFO_SIZE + 1
        ));
    }

    #[test]
    fn trigger_clones_share_the_counter() {
        let trigger = EventFdTrigger::new(evt());
        let clone = trigger.try_clone().unwrap();
        trigger.trigger().unwrap();
        assert_eq!(clone.read().unwrap(), 1);
        assert!(!signalled(clone.event_fd()));
        let _fd: EventFd = clone.into_inner();
    }

    /// A writer whose contents the test can inspect while the console owns it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Shared {
        fn contents(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn console_buffers_by_line() {
        let out = Shared::default();
        let mut console = ConsoleWriter::new(Box::new(out.clone()));
        // Byte by byte with a flush after each, as vm-superio does.
        for &b in b"boot\nlogin: " {
            console.write_all(&[b]).unwrap();
            console.flush().unwrap();
        }
        assert_eq!(out.contents(), b"boot\n");
        console.flush_buffered().unwrap();
        assert_eq!(out.contents(), b"boot\nlogin: ");
    }

    #[test]
    fn console_flushes_a_full_buffer_without_newline() {
        let out = Shared::default();
        let mut console = ConsoleWriter::new(Box::new(out.clone()));
        for _ in 0..CONSOLE_BUFFER_SIZE {
            console.write_all(b"a").unwrap();
        }
        assert!(out.contents().is_empty());
        console.write_all(b"a").unwrap();
        assert_eq!(out.contents().len(), CONSOLE_BUFFER_SIZE);
        drop(console);
        assert_eq!(out.contents().len(), CONSOLE_BUFFER_SIZE + 1);
    }

    #[test]
    fn console_behind_a_uart() {
        let out = Shared::default();
        let mut dev = SerialDevice::new(
            EventFdTrigger::new(evt()),
            SerialEventsSink::new(),
            ConsoleWriter::new(Box::new(out.clone())),
        );
        for &b in b"line\npartial" {
            dev.write(RBR_THR, &[b]);
        }
        assert_eq!(out.contents(), b"line\n");
        dev.writer_mut().flush_buffered().unwrap();
        assert_eq!(out.contents(), b"line\npartial");
    }

    #[test]
    fn serial_state_passes_the_persist_conformance_check() {
        use crate::persist::conformance;
        let mut dev = SerialDevice::new(
            EventFdTrigger::new(evt()),
            SerialEventsSink::new(),
            Vec::new(),
        );
        dev.write(3, &[0x03]); // LCR: 8 data bits
        dev.write(7, &[0x5a]); // scratch
        dev.enqueue(b"pending").unwrap();
        let state = conformance::check(
            &dev,
            (
                EventFdTrigger::new(evt()),
                SerialEventsSink::new(),
                Vec::new(),
            ),
            |restored| restored.write(7, &[0xa5]),
        );
        assert_eq!(state.in_buffer, b"pending");
        assert_eq!(state.scratch, 0x5a);
    }
}
