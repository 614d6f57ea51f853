//! relive-images: relive's on-disk failover images and the bundled guest.
//!
//! This crate never depends on the VMM: images are a format, readable by tools
//! that know nothing of KVM.
#![forbid(unsafe_code)]

pub mod guest;
