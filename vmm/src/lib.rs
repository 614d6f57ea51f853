//! relive-vmm: a small KVM virtual machine monitor, one process per VM.
//!
//! Module map (one module per concept, x86_64 only):
//! - [`memory`]: guest memory layout (e820), allocation and the KVM memory slots.
//! - [`acpi`]: the ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) a Linux guest
//!   finds its CPUs, devices and power-off through.
//! - [`boot`]: kernel loading (ELF vmlinux, bzImage), boot_params, page tables, GDT,
//!   initial registers; [`mptable`] and [`cpuid`] describe the machine to the guest.
//! - [`devices`]: the port-I/O bus and the devices on it (UARTs, agent channel,
//!   i8042, pvpanic, power-off port). Devices know nothing of KVM.
//! - [`vcpu`]: the vCPU thread state machine and its handle.
//! - [`vm`]: the KVM VM, its vCPUs and devices, and the event loop.
//! - [`control`]: the per-VM control socket server (the protocol and the
//!   clients are the `relive-control` crate).
//! - [`persist`]: the save/restore trait and the saved state of vCPUs and the VM.
//! - [`cgroup`]: host resource limits (cpu, memory, pids) of a VM process, cgroup v2 or v1.
//! - [`seccomp`] and [`jail`]: the VMM's confinement: per-thread system call
//!   filters; namespaces, a minimal root and no privilege.

pub mod acpi;
pub mod boot;
pub mod cgroup;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod jail;
pub mod memory;
pub mod mptable;
pub mod persist;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
