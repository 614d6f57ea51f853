//! Devices on the port-I/O bus.
//!
//! # Design
//!
//! Nothing in this module knows about KVM. The vCPU loop hands every PIO exit
//! to a [`PioBus`], which finds the device owning the port by binary search
//! over sorted, non-overlapping ranges and calls it with the *offset* inside
//! that range. Devices therefore never see absolute port numbers, and the
//! port map lives in exactly one place: the constants below, which the VMM
//! uses when it builds the bus. They must not appear in the vCPU loop.
//!
//! Devices talk back to the VMM only through `EventFd`s (interrupt lines,
//! "reset", "panic", "power off", "agent line ready"), so every device is
//! unit-tested here without `/dev/kvm`, and a device never blocks or prints
//! on a vCPU thread.
//!
//! | module      | device                               | ports              | signals             |
//! |-------------|--------------------------------------|--------------------|---------------------|
//! | [`serial`]  | 16550A UART (vm-superio), COM1/COM2  | 0x3f8 / 0x2f8, 8   | IRQ 4 / IRQ 3       |
//! | [`agent`]   | line protocol carried over COM2      | (COM2)             | "line ready" eventfd|
//! | [`i8042`]   | i8042 reset line (vm-superio)        | 0x60 and 0x64      | reset eventfd       |
//! | [`pvpanic`] | QEMU pvpanic ISA device              | 0x505, 1           | panic eventfd       |
//! | [`power`]   | ACPI-style S5 power-off port         | 0x600, 1           | power-off eventfd   |
//! | [`line_port`] | agent lines by address, one exit each | 0x2f0, 4         | (COM2 output)       |
//!
//! # Threading and locking
//!
//! Each device sits behind its own `Arc<Mutex<_>>` on the bus; the bus itself
//! is immutable once the vCPUs run and is shared (cheap `Clone`) between the
//! vCPU threads. A vCPU holds exactly one device lock at a time, for the
//! duration of one access. The host side (event loop) locks a device to push
//! input (`SerialDevice::enqueue`) or read its counters, and must not hold a
//! device lock while taking another one. A poisoned device mutex is
//! recovered, not propagated: a panic in one access must not take down the
//! other vCPUs.
//!
//! # Guest-triggerable work
//!
//! Everything a guest can trigger is bounded: the agent channel frames and
//! rate-limits lines ([`agent`]), the console is line-buffered
//! ([`serial::ConsoleWriter`]), and failures inside a device access (an
//! eventfd that cannot be written, a closed console) are counted instead of
//! logged, so a misbehaving guest cannot flood the host's logs.

pub mod agent;
pub mod bus;
pub mod i8042;
pub mod line_port;
pub mod power;
pub mod pvpanic;
pub mod serial;

pub use agent::{encode_command, AgentConfig, AgentError, AgentStats, AgentWriter, LineFramer};
pub use bus::{BusError, PioBus, PioDevice};
pub use i8042::I8042;
pub use line_port::{LinePort, LINE_PORT_MAGIC};
pub use power::PowerOff;
pub use pvpanic::PvPanic;
pub use serial::{ConsoleWriter, EventFdTrigger, SerialDevice, SerialError, SerialEventsSink};

/// The agent line port (see [`line_port`]).
pub const LINE_PORT: u16 = 0x2f0;
/// Length of the agent line port.
pub const LINE_PORT_LEN: u16 = 4;
/// First port of COM1, the console UART.
pub const COM1_PORT_BASE: u16 = 0x3f8;
/// First port of COM2, the UART that carries the agent channel.
pub const COM2_PORT_BASE: u16 = 0x2f8;
/// Number of ports of a 16550A UART.
pub const SERIAL_PORT_LEN: u16 = 8;
/// Legacy (ISA) interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;
/// Legacy (ISA) interrupt line of COM2.
pub const COM2_IRQ: u32 = 3;
/// First port of the i8042 range: data port 0x60 (offset 0) up to the
/// command/status port 0x64 (offset 4).
pub const I8042_PORT_BASE: u16 = 0x60;
/// Length of the i8042 range (0x60..=0x64).
pub const I8042_PORT_LEN: u16 = 5;
/// The pvpanic ISA device port (QEMU's default).
pub const PVPANIC_PORT: u16 = 0x505;
/// Length of the pvpanic range.
pub const PVPANIC_PORT_LEN: u16 = 1;
/// The power-off port (Cloud Hypervisor's ACPI shutdown device port).
pub const POWER_PORT: u16 = 0x600;
/// Length of the power-off range.
pub const POWER_PORT_LEN: u16 = 1;
