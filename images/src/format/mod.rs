//! The failover image file: its layout, [`ImageWriter`] and [`ImageReader`].
//!
//! This module is the written contract of a relive image; `images/FORMAT.md`
//! says the same in prose for readers who are not Rust programmers. Everything
//! is little-endian.
//!
//! # Layout
//!
//! ```text
//! offset 0      header (4096 bytes, fixed layout, crc32c-protected)
//! offset 4096   section payloads, in the order they were added (8-byte aligned)
//!   ...         Memory: page-aligned, each region at memory_offset + region.file_offset;
//!               pages not present are holes of a sparse file
//!   ...         MemoryMap: the regions and their present page runs
//! ```
//!
//! Sections are found only through the header's table: their order in the file
//! carries no meaning.
//!
//! # Header (first 4096 bytes)
//!
//! | offset | size | field |
//! | ---: | ---: | --- |
//! | 0 | 8 | magic `RELIVEIM` |
//! | 8 | 4 | `format_version` (1) |
//! | 12 | 4 | `header_len` (4096) |
//! | 16 | 4 | `flags` (none defined: written 0, ignored) |
//! | 20 | 4 | `kind`: 1 consistency full, 2 consistency incremental layer, 3 boot |
//! | 24 | 16 | `image_id` (UUIDv7 layout: 48-bit ms timestamp, random rest) |
//! | 40 | 16 | `parent_id`: the image an incremental layer applies to; zero otherwise |
//! | 56 | 8 | `created_unix_ms`: when the captured state was taken |
//! | 64 | 4 | `section_count` (at most [`MAX_SECTIONS`]) |
//! | 68 | 4 | reserved, zero |
//! | 72 | 16 | `merged_from`: for a full image written by a merge, the layer whose state it holds; zero otherwise |
//! | 88 | 32 × n | section table |
//! | 4092 | 4 | `header_checksum`: crc32c of the 4096 header bytes with this field zeroed |
//!
//! Unused bytes are zero. `magic`, `format_version`, `header_len` and the
//! position of the checksum (the last 4 bytes of `header_len` bytes) are frozen
//! for all versions, so any reader can check any header's integrity before it
//! trusts the version.
//!
//! A section table entry (32 bytes): `kind` u32, `version` u32, `offset` u64
//! (absolute), `length` u64, `checksum` u32 (crc32c of the payload), `flags`
//! u32 (bit 0 [`SECTION_OPTIONAL`]: a reader that does not know this kind may
//! skip it; other bits written 0, ignored).
//!
//! # Sections
//!
//! [`SectionKind`] lists them. The JSON sections (config, limits, vm-state,
//! device-state, app-status) are opaque bytes to this crate: the VMM defines
//! their contents and evolves them with the per-section version. This crate
//! frames, checksums and limits them: a non-memory section longer than
//! [`SECTION_SIZE_LIMIT`] is refused before anything is allocated.
//!
//! **Memory** holds guest RAM: region `i` occupies `len_i` bytes at
//! `memory_offset + file_offset_i`, both page-aligned, so each region can be
//! mapped `MAP_PRIVATE` straight from the file for a lazy restore. Only present
//! pages are written; the others are holes that cost neither disk nor time and
//! read as zeros. The section's checksum is crc32c over the present pages only,
//! region by region in run order, so verifying costs time in proportion to
//! what the guest touched, not to its size.
//!
//! **MemoryMap** (version 1) describes that layout:
//!
//! ```text
//! page_size u32 (4096) | region_count u32
//! per region: guest_addr u64 | len u64 | file_offset u64 (relative to Memory) | run_count u64
//!             run_count x { first_page u64 | page_count u64 }   (ascending, disjoint)
//! ```
//!
//! A consistency image (full or incremental) always has both; a boot image may
//! have neither. An incremental layer lists the same regions as its base, with
//! only the pages dirtied since the base present.
//!
//! # Compatibility
//!
//! - A reader accepts `format_version` up to its own and refuses a newer one
//!   with [`ReadError::NewerVersion`], which tells the operator to upgrade.
//! - A section kind the reader does not know is skipped if its entry is marked
//!   [`SECTION_OPTIONAL`], else the image is refused ([`ReadError::UnknownSection`]).
//! - A section evolves through its own version; Memory and MemoryMap are read
//!   at version 1 and a newer one is refused ([`ReadError::NewerSection`]).
//! - A change old readers must not ignore bumps `format_version`.
//!
//! # Writing
//!
//! [`ImageWriter`] writes a temporary file `.tmp-<id>-<pid>` in the target
//! directory, payloads first and the header last; [`ImageWriter::commit`]
//! fsyncs it, renames it to `<created_ms>-<id>.rimg` and fsyncs the directory,
//! so a crash at any point leaves either no new image or a complete one, and
//! never touches existing images. Guest memory costs one `pwrite` per present
//! run. Any error removes the temporary file at once (a full disk gets its
//! space back) and leaves the writer unusable; so does dropping it uncommitted.

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The 8 bytes every image starts with.
pub const MAGIC: [u8; 8] = *b"RELIVEIM";
/// The format version this crate writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the fixed header in format version 1.
pub const HEADER_LEN: u32 = 4096;
/// Guest page size; memory regions and the Memory section are aligned to it.
pub const PAGE_SIZE: u64 = 4096;
/// How many section table entries fit in the header.
pub const MAX_SECTIONS: usize = (OFF_CHECKSUM - OFF_TABLE) / ENTRY_LEN;
/// Largest payload of a non-memory section, for both writer and reader.
pub const SECTION_SIZE_LIMIT: u64 = 16 << 20;
/// Section flag: a reader that does not know the section's kind may skip it.
pub const SECTION_OPTIONAL: u32 = 1;
/// Extension of committed image files.
pub const IMAGE_EXTENSION: &str = "rimg";
/// Prefix of temporary files of writers in progress (or left by a crash).
pub const TEMP_PREFIX: &str = ".tmp-";

/// Version of the MemoryMap and Memory sections this crate writes and reads.
const MEMORY_SECTION_VERSION: u32 = 1;
/// Upper bound on `header_len` that any version may use.
const MAX_HEADER_LEN: u32 = 1 << 20;

const OFF_VERSION: usize = 8;
const OFF_HEADER_LEN: usize = 12;
const OFF_FLAGS: usize = 16;
const OFF_KIND: usize = 20;
const OFF_ID: usize = 24;
const OFF_PARENT: usize = 40;
const OFF_CREATED: usize = 56;
const OFF_COUNT: usize = 64;
const OFF_MERGED: usize = 72;
const OFF_TABLE: usize = 88;
const ENTRY_LEN: usize = 32;
const OFF_CHECKSUM: usize = HEADER_LEN as usize - 4;

/// Largest buffer used to stream memory pages through (verify, merge).
pub(crate) const COPY_CHUNK: usize = 8 << 20;

mod error;
mod header;
mod ids;
mod memory_map;
mod reader;
mod writer;

pub use error::*;
pub use header::*;
pub use ids::*;
pub use memory_map::*;
pub use reader::*;
pub use writer::*;

// ---------------------------------------------------------------------------
// Little-endian helpers
// ---------------------------------------------------------------------------

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn id_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    a
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Temporary directories and image builders shared by the unit tests.

    use super::*;
    use std::fs::OpenOptions;

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "relive-images-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }

        /// Names of the files in the directory, sorted.
        pub fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A region of `pages` pages whose page `p` is filled with `fill(p)`.
    pub fn region(pages: u64, fill: impl Fn(u64) -> u8) -> Vec<u8> {
        let mut v = vec![0u8; (pages * PAGE_SIZE) as usize];
        for (p, page) in v.chunks_mut(PAGE_SIZE as usize).enumerate() {
            page.fill(fill(p as u64));
        }
        v
    }

    pub fn run(first_page: u64, count: u64) -> PageRun {
        PageRun { first_page, count }
    }

    /// Writes an image of `kind` with all JSON sections (tagged by `tag`) and
    /// one memory region at guest address 0.
    pub fn write_image(
        dir: &Path,
        kind: ImageKind,
        tag: &str,
        mem: &[u8],
        present: Vec<PageRun>,
    ) -> CommittedImage {
        let mut w = ImageWriter::create(dir, kind).unwrap();
        for k in SectionKind::ALL.into_iter().filter(|k| !k.is_memory()) {
            let payload = format!("{{\"section\":\"{k}\",\"tag\":\"{tag}\"}}");
            w.add_section(k, 1, payload.as_bytes()).unwrap();
        }
        w.add_memory(&[MemoryRegionSource {
            guest_addr: 0,
            bytes: mem,
            present,
        }])
        .unwrap();
        w.commit().unwrap()
    }

    /// Rewrites an image's header through `edit`, with a valid checksum.
    pub fn rewrite_header(path: &Path, edit: impl FnOnce(&mut Header)) {
        let mut h = ImageReader::read_header(path).unwrap();
        edit(&mut h);
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&h.encode(), 0).unwrap();
    }

    /// XORs one byte of a file.
    pub fn flip(path: &Path, at: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0xa5;
        f.write_all_at(&b, at).unwrap();
    }
}

#[cfg(test)]
mod tests;
