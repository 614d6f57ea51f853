//! relive-images: relive's on-disk failover images and the bundled guest.
//!
//! This crate never depends on the VMM: images are a format, readable by tools
//! that know nothing of KVM.
//!
//! - [`format`]: one image file, its layout (the written contract, also in
//!   `images/FORMAT.md`), [`ImageWriter`] and [`ImageReader`].
//! - [`store`]: a VM's image directory: listing, picking the latest good
//!   image, retention and merging incremental layers.
//! - [`guest`]: the bundled guest kernel.
//! - [`private`]: owner-only files and directories, and the restore's
//!   refusal of images others can write.
#![forbid(unsafe_code)]

pub mod format;
pub mod guest;
pub mod private;
pub mod store;

pub use format::{
    CommittedImage, Header, ImageId, ImageKind, ImageReader, ImageWriter, MemoryRegionLayout,
    MemoryRegionSource, PageRun, ReadError, SectionEntry, SectionKind, WriteError,
};
pub use store::{ImageEntry, ImageStatus, ImageStore, Selection, Skipped, StoreError};
