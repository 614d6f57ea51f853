//! The agent channel: a line protocol over COM2.
//!
//! # Protocol
//!
//! Both directions carry lines of printable ASCII (0x20..=0x7e) terminated
//! by `'\n'`.
//!
//! - Guest to host: the guest agent writes lines to COM2. [`AgentWriter`]
//!   is the COM2 UART's output; it frames the bytes into lines, sends each
//!   line as a `String` over an `mpsc` channel and writes the "line ready"
//!   `EventFd` to wake the host's event loop, which then drains the channel
//!   with `try_recv`.
//! - Host to guest: [`encode_command`] validates one command line (at most
//!   [`MAX_COMMAND_LEN`] bytes) and appends the `'\n'`; the host feeds the
//!   bytes to `SerialDevice::enqueue`.
//! - After every restore (cold or into a standby) of a guest whose `ready`
//!   line asked for it (`notices=restored`), the VMM sends one
//!   [`restored_notice`]: `restored time=NS entropy=HEX`, the host's
//!   `CLOCK_REALTIME` in ns and [`RESTORED_ENTROPY_BYTES`] fresh random
//!   bytes, so that a guest agent can step its clock (it stood still while
//!   the VM was an image) and reseed its RNG (every restore of one image
//!   would otherwise draw the same numbers). `relive-agent` does both and
//!   answers `restored reseeded=B clock_step_ms=D`. The bundled guest, with
//!   neither an RNG nor a wall clock, does not ask (it would take the notice
//!   silently).
//!
//! # Defending the host
//!
//! The guest is untrusted, and its bytes are sanitised before the host
//! sees them:
//!
//! - `'\r'` is dropped anywhere, so CRLF and LF framing both work;
//! - any other byte outside printable ASCII becomes `'?'`, so a line is
//!   always valid ASCII and safe to log;
//! - a line longer than [`MAX_LINE_LEN`] bytes is cut: the first
//!   [`MAX_LINE_LEN`] bytes are delivered and the rest, up to the next
//!   `'\n'`, is dropped (counted in `truncated_lines`);
//! - complete lines pass a token bucket ([`LineRateLimiter`], by default
//!   [`DEFAULT_LINES_PER_SEC`] lines/s with a burst of [`DEFAULT_BURST`]);
//!   lines over the limit are dropped and counted in `dropped_lines`.
//!
//! So the host spends bounded memory and bounded work per second on a guest
//! that floods the channel, however fast it writes.
//!
//! # Testability
//!
//! [`LineFramer`] and [`LineRateLimiter`] are pure (the limiter takes the
//! current time as an argument); [`AgentWriter`] takes an injectable clock.

use std::fmt;
use std::io::{self, Write};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Longest guest-to-host line delivered, in bytes (without the `'\n'`).
pub const MAX_LINE_LEN: usize = 512;
/// Longest host-to-guest command, in bytes (without the `'\n'`).
pub const MAX_COMMAND_LEN: usize = 256;
/// Default sustained rate of guest-to-host lines.
pub const DEFAULT_LINES_PER_SEC: u32 = 200;
/// Default burst of guest-to-host lines.
pub const DEFAULT_BURST: u32 = 200;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Whether `byte` may appear in a line of the protocol.
fn is_printable(byte: u8) -> bool {
    (0x20..=0x7e).contains(&byte)
}

/// Splits a byte stream into sanitised lines (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct LineFramer {
    /// The line being assembled; always printable ASCII.
    line: String,
    /// Set after a line was cut: drop bytes until the next `'\n'`.
    discarding: bool,
    truncated_lines: u64,
}

impl LineFramer {
    /// A framer at the start of a line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one byte; returns the line it completes, if any.
    ///
    /// A `'\n'` completes a line; so does the byte that makes a line exceed
    /// [`MAX_LINE_LEN`], in which case the line is delivered cut and the rest
    /// of it is dropped.
    pub fn push_byte(&mut self, byte: u8) -> Option<String> {
        match byte {
            b'\n' if self.discarding => {
                self.discarding = false;
                None
            }
            b'\n' => Some(std::mem::take(&mut self.line)),
            b'\r' => None,
            _ if self.discarding => None,
            _ if self.line.len() == MAX_LINE_LEN => {
                self.discarding = true;
                self.truncated_lines += 1;
                Some(std::mem::take(&mut self.line))
            }
            _ => {
                self.line.push(if is_printable(byte) {
                    char::from(byte)
                } else {
                    '?'
                });
                None
            }
        }
    }

    /// Feeds `bytes`; returns the lines they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        bytes.iter().filter_map(|&b| self.push_byte(b)).collect()
    }

    /// The incomplete line buffered so far (empty while discarding).
    pub fn pending(&self) -> &str {
        &self.line
    }

    /// Lines cut because they were longer than [`MAX_LINE_LEN`].
    pub fn truncated_lines(&self) -> u64 {
        self.truncated_lines
    }
}

/// Token bucket: `rate` tokens per second, at most `burst` stored.
///
/// Pure: the caller passes the current time, so tests are deterministic.
/// Integer arithmetic; the fractional part of a token is kept across calls.
#[derive(Debug, Clone)]
pub struct LineRateLimiter {
    rate: u32,
    burst: u32,
    tokens: u32,
    /// The time up to which tokens have been credited.
    credited_until: Instant,
}

impl LineRateLimiter {
    /// A full bucket at `now`. With `rate` 0 the bucket never refills; with
    /// `burst` 0 everything is refused.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            credited_until: now,
        }
    }

    /// Takes one token if there is one at `now`.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    fn refill(&mut self, now: Instant) {
        if self.rate == 0 {
            return;
        }
        let rate = u128::from(self.rate);
        let elapsed = now
            .saturating_duration_since(self.credited_until)
            .as_nanos();
        let earned = elapsed * rate / NANOS_PER_SEC;
        let room = u128::from(self.burst - self.tokens);
        if earned >= room {
            self.tokens = self.burst;
            self.credited_until = now;
        } else if earned > 0 {
            // `earned < room <= u32::MAX`, and the time it took is at most
            // `elapsed`, so neither conversion can fail in practice.
            self.tokens += u32::try_from(earned).unwrap_or(0);
            let spent = u64::try_from(earned * NANOS_PER_SEC / rate).unwrap_or(u64::MAX);
            self.credited_until = self
                .credited_until
                .checked_add(Duration::from_nanos(spent))
                .unwrap_or(now);
        }
    }
}

/// Rate limit of the guest-to-host direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentConfig {
    /// Sustained lines per second (0: no refill after the first burst).
    pub lines_per_sec: u32,
    /// Lines accepted back to back.
    pub burst: u32,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            lines_per_sec: DEFAULT_LINES_PER_SEC,
            burst: DEFAULT_BURST,
        }
    }
}

/// Counters of the guest-to-host direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Lines delivered to the host.
    pub lines: u64,
    /// Complete lines dropped: over the rate limit, or the host's receiver
    /// is gone.
    pub dropped_lines: u64,
    /// Lines cut at [`MAX_LINE_LEN`] bytes.
    pub truncated_lines: u64,
}

/// Source of the current time for [`AgentWriter`]'s rate limit.
pub type Clock = Box<dyn Fn() -> Instant + Send>;

/// Output of the COM2 UART: frames guest bytes into lines and hands them to
/// the host (see the module docs).
///
/// `write` never fails and never blocks: every byte is consumed, delivered
/// or counted as dropped.
pub struct AgentWriter {
    framer: LineFramer,
    limiter: LineRateLimiter,
    clock: Clock,
    lines_tx: Sender<String>,
    wake_evt: EventFd,
    lines: u64,
    dropped_lines: u64,
    wake_failures: u64,
}

impl fmt::Debug for AgentWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentWriter")
            .field("framer", &self.framer)
            .field("limiter", &self.limiter)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl AgentWriter {
    /// Sends each complete line over `lines_tx` and writes 1 to `wake_evt`.
    pub fn new(config: AgentConfig, lines_tx: Sender<String>, wake_evt: EventFd) -> Self {
        Self::with_clock(config, lines_tx, wake_evt, Box::new(Instant::now))
    }

    /// Like [`new`](Self::new), reading the time from `clock`.
    pub fn with_clock(
        config: AgentConfig,
        lines_tx: Sender<String>,
        wake_evt: EventFd,
        clock: Clock,
    ) -> Self {
        let limiter = LineRateLimiter::new(config.lines_per_sec, config.burst, clock());
        Self {
            framer: LineFramer::new(),
            limiter,
            clock,
            lines_tx,
            wake_evt,
            lines: 0,
            dropped_lines: 0,
            wake_failures: 0,
        }
    }

    /// Counters since creation.
    pub fn stats(&self) -> AgentStats {
        AgentStats {
            lines: self.lines,
            dropped_lines: self.dropped_lines,
            truncated_lines: self.framer.truncated_lines(),
        }
    }

    /// Times the wake-up eventfd could not be written (the line was still
    /// delivered).
    pub fn wake_failures(&self) -> u64 {
        self.wake_failures
    }

    /// The incomplete line buffered so far.
    pub fn pending(&self) -> &str {
        self.framer.pending()
    }

    fn deliver(&mut self, line: String) {
        if !self.limiter.try_acquire((self.clock)()) || self.lines_tx.send(line).is_err() {
            self.dropped_lines += 1;
            return;
        }
        self.lines += 1;
        if self.wake_evt.write(1).is_err() {
            self.wake_failures += 1;
        }
    }
}

impl Write for AgentWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            if let Some(line) = self.framer.push_byte(byte) {
                self.deliver(line);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Errors from [`encode_command`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// The command contains `'\n'` or `'\r'`.
    #[error("agent command has a line break at byte {position}")]
    LineBreak {
        /// Index of the first line break.
        position: usize,
    },
    /// The command is longer than [`MAX_COMMAND_LEN`].
    #[error("agent command is {len} bytes long, the limit is {MAX_COMMAND_LEN}")]
    TooLong {
        /// Length of the command in bytes.
        len: usize,
    },
    /// The command contains a byte outside printable ASCII.
    #[error("agent command has non-printable byte {byte:#04x} at byte {position}")]
    NotPrintable {
        /// The offending byte.
        byte: u8,
        /// Its index.
        position: usize,
    },
}

/// Encodes one host-to-guest command: validates it and appends `'\n'`.
///
/// # Errors
///
/// [`AgentError::LineBreak`] if `line` contains `'\n'` or `'\r'`,
/// [`AgentError::TooLong`] if it is longer than [`MAX_COMMAND_LEN`] bytes,
/// [`AgentError::NotPrintable`] if it has a byte outside 0x20..=0x7e.
pub fn encode_command(line: &str) -> Result<Vec<u8>, AgentError> {
    let bytes = line.as_bytes();
    if let Some(position) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
        return Err(AgentError::LineBreak { position });
    }
    if bytes.len() > MAX_COMMAND_LEN {
        return Err(AgentError::TooLong { len: bytes.len() });
    }
    if let Some((position, &byte)) = bytes.iter().enumerate().find(|(_, &b)| !is_printable(b)) {
        return Err(AgentError::NotPrintable { byte, position });
    }
    let mut encoded = Vec::with_capacity(bytes.len() + 1);
    encoded.extend_from_slice(bytes);
    encoded.push(b'\n');
    Ok(encoded)
}

/// Random bytes in a [`restored_notice`]: a full CRNG seed (256 bits).
pub const RESTORED_ENTROPY_BYTES: usize = 32;

/// The `restored time=NS entropy=HEX` notice (module docs), encoded as a
/// command.
///
/// # Errors
///
/// When the host has no random bytes to give (`getrandom(2)` failed).
pub fn restored_notice() -> io::Result<Vec<u8>> {
    let mut entropy = [0u8; RESTORED_ENTROPY_BYTES];
    let mut filled = 0;
    while filled < entropy.len() {
        filled += rustix::rand::getrandom(
            &mut entropy[filled..],
            rustix::rand::GetRandomFlags::empty(),
        )?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut line = format!("restored time={now} entropy=");
    for byte in entropy {
        line.push_str(&format!("{byte:02x}"));
    }
    encode_command(&line).map_err(io::Error::other)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test fails by panicking on an unexpected error.
mod tests {
    use std::sync::mpsc::{self, Receiver};
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::devices::bus::PioDevice;
    use crate::devices::serial::{EventFdTrigger, SerialDevice, SerialEventsSink};

    #[test]
    fn framer_joins_lines_split_across_chunks() {
        let mut framer = LineFramer::new();
        assert!(framer.push(b"he").is_empty());
        assert_eq!(framer.pending(), "he");
        assert_eq!(framer.push(b"llo\nwor"), ["hello"]);
        assert_eq!(framer.push(b"ld\n\n"), ["world", ""]);
        assert_eq!(framer.pending(), "");
        assert_eq!(framer.truncated_lines(), 0);
    }

    #[test]
    fn framer_strips_carriage_returns() {
        let mut framer = LineFramer::new();
        assert_eq!(framer.push(b"a\r\nb\r\n\rc\r\r\n"), ["a", "b", "c"]);
    }

    #[test]
    fn framer_replaces_non_printable_bytes() {
        let mut framer = LineFramer::new();
        assert_eq!(
            framer.push(b"a\tb\x00\x7f\xffc\n"),
            ["a?b???c"],
            "control, DEL and high bytes"
        );
        assert_eq!(framer.push("é~ \n".as_bytes()), ["??~ "]);
    }

    #[test]
    fn framer_cuts_long_lines() {
        let mut framer = LineFramer::new();
        let exact = [b'e'; MAX_LINE_LEN];
        let lines = framer.push(&[&exact[..], b"\n"].concat());
        assert_eq!(lines, [String::from_utf8(exact.to_vec()).unwrap()]);
        assert_eq!(framer.truncated_lines(), 0);

        let long = [b'x'; MAX_LINE_LEN + 100];
        let lines = framer.push(&[&long[..], b"\nok\n"].concat());
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "x".repeat(MAX_LINE_LEN));
        assert_eq!(lines[1], "ok");
        assert_eq!(framer.truncated_lines(), 1);

        // The cut line is delivered as soon as it overflows; the rest is
        // dropped even across chunks, and the next line is intact.
        assert_eq!(framer.push(&long).len(), 1);
        assert!(framer.push(&long).is_empty());
        assert_eq!(framer.pending(), "");
        assert_eq!(framer.push(b"\nnext\n"), ["next"]);
        assert_eq!(framer.truncated_lines(), 2);
    }

    #[test]
    fn limiter_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut limiter = LineRateLimiter::new(10, 3, t0);
        assert_eq!((0..5).filter(|_| limiter.try_acquire(t0)).count(), 3);

        // 10/s: one token per 100 ms, fractions carried over.
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(!limiter.try_acquire(at(99)));
        assert!(limiter.try_acquire(at(100)));
        assert!(!limiter.try_acquire(at(150)));
        assert!(limiter.try_acquire(at(200)));
        assert!(!limiter.try_acquire(at(200)));

        // A long pause refills to the burst, not beyond.
        let later = at(60_000);
        assert_eq!((0..10).filter(|_| limiter.try_acquire(later)).count(), 3);
        // Time going backwards earns nothing and does not panic.
        assert!(!limiter.try_acquire(t0));
    }

    #[test]
    fn limiter_edge_configs() {
        let t0 = Instant::now();
        let mut no_refill = LineRateLimiter::new(0, 2, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..5).filter(|_| no_refill.try_acquire(later)).count(), 2);

        let mut closed = LineRateLimiter::new(100, 0, t0);
        assert!(!closed.try_acquire(later));
    }

    struct Harness {
        writer: AgentWriter,
        rx: Receiver<String>,
        wake: EventFd,
        now: Arc<Mutex<Instant>>,
    }

    fn harness(config: AgentConfig) -> Harness {
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let now = Arc::new(Mutex::new(Instant::now()));
        let clock_now = now.clone();
        let writer = AgentWriter::with_clock(
            config,
            tx,
            wake.try_clone().unwrap(),
            Box::new(move || *clock_now.lock().unwrap()),
        );
        Harness {
            writer,
            rx,
            wake,
            now,
        }
    }

    #[test]
    fn writer_delivers_lines_and_wakes_the_host() {
        let mut h = harness(AgentConfig::default());
        h.writer.write_all(b"ready 1\r\nstat").unwrap();
        assert_eq!(h.writer.pending(), "stat");
        h.writer.write_all(b"us ok\n").unwrap();
        assert_eq!(h.wake.read().unwrap(), 2);
        assert_eq!(
            h.rx.try_iter().collect::<Vec<_>>(),
            ["ready 1", "status ok"]
        );
        assert_eq!(
            h.writer.stats(),
            AgentStats {
                lines: 2,
                dropped_lines: 0,
                truncated_lines: 0
            }
        );
        assert_eq!(h.writer.wake_failures(), 0);
    }

    #[test]
    fn writer_rate_limits_a_flood() {
        let mut h = harness(AgentConfig {
            lines_per_sec: 2,
            burst: 2,
        });
        let flood = b"spam\n".repeat(5);
        assert_eq!(h.writer.write(&flood).unwrap(), flood.len());
        assert_eq!(h.rx.try_iter().count(), 2);
        assert_eq!(h.wake.read().unwrap(), 2);
        assert_eq!(h.writer.stats().dropped_lines, 3);

        *h.now.lock().unwrap() += Duration::from_secs(1);
        h.writer.write_all(&flood).unwrap();
        assert_eq!(h.rx.try_iter().count(), 2);
        assert_eq!(
            h.writer.stats(),
            AgentStats {
                lines: 4,
                dropped_lines: 6,
                truncated_lines: 0
            }
        );
    }

    #[test]
    fn writer_counts_truncation_and_a_gone_receiver() {
        let mut h = harness(AgentConfig::default());
        h.writer.write_all(&[b'y'; MAX_LINE_LEN * 3]).unwrap();
        h.writer.write_all(b"\n").unwrap();
        assert_eq!(h.rx.try_recv().unwrap().len(), MAX_LINE_LEN);
        assert_eq!(h.writer.stats().truncated_lines, 1);

        drop(h.rx);
        h.writer.write_all(b"nobody listens\n").unwrap();
        assert_eq!(
            h.writer.stats(),
            AgentStats {
                lines: 1,
                dropped_lines: 1,
                truncated_lines: 1
            }
        );
    }

    #[test]
    fn guest_lines_flow_through_the_com2_uart() {
        let h = harness(AgentConfig::default());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut com2 =
            SerialDevice::new(EventFdTrigger::new(irq), SerialEventsSink::new(), h.writer);
        for &b in b"hello host\n" {
            com2.write(0, &[b]);
        }
        assert_eq!(h.rx.try_recv().unwrap(), "hello host");
        assert_eq!(h.wake.read().unwrap(), 1);
        assert_eq!(com2.writer().stats().lines, 1);
    }

    #[test]
    fn encode_command_accepts_printable_lines() {
        assert_eq!(encode_command("ping 42").unwrap(), b"ping 42\n");
        assert_eq!(encode_command("").unwrap(), b"\n");
        let longest = "a".repeat(MAX_COMMAND_LEN);
        assert_eq!(encode_command(&longest).unwrap().len(), MAX_COMMAND_LEN + 1);
    }

    #[test]
    fn encode_command_rejects_bad_lines() {
        assert_eq!(
            encode_command("a\nb"),
            Err(AgentError::LineBreak { position: 1 })
        );
        assert_eq!(
            encode_command("run\r"),
            Err(AgentError::LineBreak { position: 3 })
        );
        assert_eq!(
            encode_command(&"a".repeat(MAX_COMMAND_LEN + 1)),
            Err(AgentError::TooLong {
                len: MAX_COMMAND_LEN + 1
            })
        );
        assert_eq!(
            encode_command("tab\there"),
            Err(AgentError::NotPrintable {
                byte: b'\t',
                position: 3
            })
        );
        assert_eq!(
            encode_command("café"),
            Err(AgentError::NotPrintable {
                byte: 0xc3,
                position: 3
            })
        );
        assert_eq!(
            encode_command("nul\0"),
            Err(AgentError::NotPrintable {
                byte: 0,
                position: 3
            })
        );
    }
}
