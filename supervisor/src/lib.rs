//! relive-supervisor: runs a fleet of relive microVMs from one YAML file and
//! keeps every VM alive.
//!
//! - [`config`]: the fleet file, checked whole before anything starts (the
//!   only module that knows YAML).
//! - [`policy`]: the failover policy (consistency image, then boot image, then
//!   `failed`), health and checkpoint timing; pure, time passed in.
//! - [`cluster`]: cluster mode on etcd: the host's session lease and
//!   fencing, each VM's ownership and fencing token.
//! - [`record`]: the per-VM record for the next supervisor, which a full
//!   disk cannot keep stale (two preallocated slots written in turn).
#![forbid(unsafe_code)]
pub mod api;
pub mod applog;
pub mod client;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod events;
pub mod fleet;
pub mod metrics;
pub mod policy;
pub mod record;
pub mod replication;
pub mod vmm;
