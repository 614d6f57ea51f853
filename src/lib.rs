//! relive keeps virtual machines alive.
//!
//! This root package carries the end-to-end tests (`tests/`) and benchmarks
//! (`benches/`) that drive the real binaries; the code lives in the workspace
//! crates it re-exports:
//! - [`relive_vmm`]: the KVM microVM monitor (`relive-vmm`),
//! - [`relive_images`]: failover images and the bundled guest.
//!
//! The supervisor (`relive` binary) comes with its own crate.
#![forbid(unsafe_code)]

pub use relive_images;
pub use relive_vmm;
