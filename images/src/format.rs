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
use std::fs::{self, File, OpenOptions};
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

// ---------------------------------------------------------------------------
// Identifiers and kinds
// ---------------------------------------------------------------------------

/// A unique image id: 16 bytes in the UUIDv7 layout (48-bit Unix ms timestamp,
/// then random bits), printed as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ImageId(pub [u8; 16]);

impl ImageId {
    /// The all-zero id, meaning "none" in the header.
    pub const ZERO: ImageId = ImageId([0; 16]);

    /// A fresh id: time-ordered prefix, random suffix.
    pub fn generate() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        // RandomState is seeded from the OS's randomness once per thread and
        // differs per instance: two 64-bit random words without a file read.
        let state = RandomState::new();
        let mut h = state.build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(now.as_nanos());
        h.write_u32(std::process::id());
        let a = h.finish();
        h.write_u64(a);
        let b = h.finish();
        let mut bytes = [0u8; 16];
        let ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        bytes[6..8].copy_from_slice(&a.to_le_bytes()[..2]);
        bytes[8..].copy_from_slice(&b.to_le_bytes());
        bytes[6] = 0x70 | (bytes[6] & 0x0f);
        bytes[8] = 0x80 | (bytes[8] & 0x3f);
        ImageId(bytes)
    }

    /// True for [`ImageId::ZERO`].
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    fn nonzero(self) -> Option<Self> {
        (!self.is_zero()).then_some(self)
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageId({self})")
    }
}

/// An image id that is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an image id (32 hex digits)")]
pub struct ParseIdError {
    /// The text that failed to parse.
    pub text: String,
}

impl FromStr for ImageId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseIdError { text: s.to_owned() };
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(ImageId(out))
    }
}

impl Serialize for ImageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ImageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageKind {
    /// A consistency image holding the whole VM.
    Full,
    /// A consistency image holding only what changed since `parent`.
    Incremental {
        /// The image this layer applies to.
        parent: ImageId,
    },
    /// A boot image: the clean start (optionally a snapshot taken at `ready`).
    Boot,
}

impl ImageKind {
    /// The header's `kind` code.
    pub fn code(&self) -> u32 {
        match self {
            ImageKind::Full => 1,
            ImageKind::Incremental { .. } => 2,
            ImageKind::Boot => 3,
        }
    }

    /// `full`, `incremental` or `boot`.
    pub fn name(&self) -> &'static str {
        match self {
            ImageKind::Full => "full",
            ImageKind::Incremental { .. } => "incremental",
            ImageKind::Boot => "boot",
        }
    }

    /// Full and incremental images are consistency images; boot images not.
    pub fn is_consistency(&self) -> bool {
        !matches!(self, ImageKind::Boot)
    }

    /// The parent of an incremental layer.
    pub fn parent(&self) -> Option<ImageId> {
        match self {
            ImageKind::Incremental { parent } => Some(*parent),
            _ => None,
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageKind::Incremental { parent } => write!(f, "incremental on {parent}"),
            other => f.write_str(other.name()),
        }
    }
}

/// The sections this version of the format knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SectionKind {
    /// VM configuration (JSON, defined by the VMM).
    Config,
    /// Host resource limits re-applied on restore (JSON).
    Limits,
    /// vCPU and VM state (JSON).
    VmState,
    /// Device state (JSON).
    DeviceState,
    /// Application status the guest last reported (JSON).
    AppStatus,
    /// Guest memory layout: regions and present page runs (binary).
    MemoryMap,
    /// Guest pages (binary, page-aligned, sparse).
    Memory,
}

impl SectionKind {
    /// Every known kind, in code order.
    pub const ALL: [SectionKind; 7] = [
        SectionKind::Config,
        SectionKind::Limits,
        SectionKind::VmState,
        SectionKind::DeviceState,
        SectionKind::AppStatus,
        SectionKind::MemoryMap,
        SectionKind::Memory,
    ];

    /// The table's `kind` code.
    pub fn code(self) -> u32 {
        match self {
            SectionKind::Config => 1,
            SectionKind::Limits => 2,
            SectionKind::VmState => 3,
            SectionKind::DeviceState => 4,
            SectionKind::AppStatus => 5,
            SectionKind::MemoryMap => 6,
            SectionKind::Memory => 7,
        }
    }

    /// The kind with this code, if this version knows it.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    /// Short name used in messages (`vm-state`).
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Config => "config",
            SectionKind::Limits => "limits",
            SectionKind::VmState => "vm-state",
            SectionKind::DeviceState => "device-state",
            SectionKind::AppStatus => "app-status",
            SectionKind::MemoryMap => "memory-map",
            SectionKind::Memory => "memory",
        }
    }

    fn is_memory(self) -> bool {
        matches!(self, SectionKind::Memory | SectionKind::MemoryMap)
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------

/// One entry of the section table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SectionEntry {
    /// Kind code; see [`SectionEntry::kind`].
    pub code: u32,
    /// Version of this section's payload.
    pub version: u32,
    /// Absolute offset of the payload in the file.
    pub offset: u64,
    /// Payload length (for Memory: all regions, holes included).
    pub length: u64,
    /// crc32c of the payload (for Memory: of the present pages).
    pub checksum: u32,
    /// Flags ([`SECTION_OPTIONAL`]).
    pub flags: u32,
}

impl SectionEntry {
    /// The kind, if this version knows the code.
    pub fn kind(&self) -> Option<SectionKind> {
        SectionKind::from_code(self.code)
    }

    /// Whether a reader that does not know the kind may skip the section.
    pub fn is_optional(&self) -> bool {
        self.flags & SECTION_OPTIONAL != 0
    }

    fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }
}

/// The decoded fixed header of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Header {
    /// Format version the image was written with.
    pub format_version: u32,
    /// Header length in bytes.
    pub header_len: u32,
    /// Header flags (none defined).
    pub flags: u32,
    /// Image kind (with the parent of a layer).
    pub kind: ImageKind,
    /// This image's id.
    pub id: ImageId,
    /// For a full image written by a merge: the layer whose state it holds.
    pub merged_from: Option<ImageId>,
    /// When the captured state was taken, Unix milliseconds.
    pub created_unix_ms: u64,
    /// The section table, in table order.
    pub sections: Vec<SectionEntry>,
}

impl Header {
    /// The table entry of a known section.
    pub fn section(&self, kind: SectionKind) -> Option<&SectionEntry> {
        self.sections.iter().find(|e| e.code == kind.code())
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN as usize];
        b[..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, OFF_VERSION, self.format_version);
        put_u32(&mut b, OFF_HEADER_LEN, HEADER_LEN);
        put_u32(&mut b, OFF_FLAGS, self.flags);
        put_u32(&mut b, OFF_KIND, self.kind.code());
        b[OFF_ID..OFF_ID + 16].copy_from_slice(&self.id.0);
        let parent = self.kind.parent().unwrap_or(ImageId::ZERO);
        b[OFF_PARENT..OFF_PARENT + 16].copy_from_slice(&parent.0);
        put_u64(&mut b, OFF_CREATED, self.created_unix_ms);
        put_u32(&mut b, OFF_COUNT, self.sections.len() as u32);
        let merged = self.merged_from.unwrap_or(ImageId::ZERO);
        b[OFF_MERGED..OFF_MERGED + 16].copy_from_slice(&merged.0);
        for (i, e) in self.sections.iter().enumerate() {
            let at = OFF_TABLE + i * ENTRY_LEN;
            put_u32(&mut b, at, e.code);
            put_u32(&mut b, at + 4, e.version);
            put_u64(&mut b, at + 8, e.offset);
            put_u64(&mut b, at + 16, e.length);
            put_u32(&mut b, at + 24, e.checksum);
            put_u32(&mut b, at + 28, e.flags);
        }
        let crc = crc32c::crc32c(&b);
        put_u32(&mut b, OFF_CHECKSUM, crc);
        b
    }

    /// Reads and checks the header of `file` (of length `file_len`).
    fn read(file: &File, file_len: u64, path: &Path) -> Result<Header, ReadError> {
        let io_err = |source| ReadError::Io {
            path: path.to_owned(),
            source,
        };
        let mut start = [0u8; 16];
        if file_len < 8 {
            return Err(ReadError::NotAnImage {
                path: path.to_owned(),
            });
        }
        let have = file_len.min(16) as usize;
        file.read_exact_at(&mut start[..have], 0).map_err(io_err)?;
        if start[..8] != MAGIC {
            return Err(ReadError::NotAnImage {
                path: path.to_owned(),
            });
        }
        let corrupt = |reason: String| ReadError::CorruptHeader {
            path: path.to_owned(),
            reason,
        };
        if file_len < 16 {
            return Err(ReadError::TruncatedHeader {
                path: path.to_owned(),
                file_len,
                header_len: u64::from(HEADER_LEN),
            });
        }
        let header_len = get_u32(&start, OFF_HEADER_LEN);
        if !(HEADER_LEN..=MAX_HEADER_LEN).contains(&header_len)
            || u64::from(header_len) % PAGE_SIZE != 0
        {
            return Err(corrupt(format!("impossible header length {header_len}")));
        }
        if file_len < u64::from(header_len) {
            return Err(ReadError::TruncatedHeader {
                path: path.to_owned(),
                file_len,
                header_len: u64::from(header_len),
            });
        }
        let mut b = vec![0u8; header_len as usize];
        file.read_exact_at(&mut b, 0).map_err(io_err)?;
        let sum_at = header_len as usize - 4;
        let stored = get_u32(&b, sum_at);
        put_u32(&mut b, sum_at, 0);
        let computed = crc32c::crc32c(&b);
        if stored != computed {
            return Err(ReadError::HeaderChecksum {
                path: path.to_owned(),
                stored,
                computed,
            });
        }
        let format_version = get_u32(&b, OFF_VERSION);
        if format_version == 0 {
            return Err(corrupt("format version 0".into()));
        }
        if format_version > FORMAT_VERSION {
            return Err(ReadError::NewerVersion {
                path: path.to_owned(),
                found: format_version,
                supported: FORMAT_VERSION,
            });
        }
        if header_len != HEADER_LEN {
            return Err(corrupt(format!(
                "header length {header_len} in a version {format_version} image"
            )));
        }
        let id = ImageId(id_at(&b, OFF_ID));
        let parent = ImageId(id_at(&b, OFF_PARENT));
        let kind = match get_u32(&b, OFF_KIND) {
            1 => ImageKind::Full,
            2 if !parent.is_zero() => ImageKind::Incremental { parent },
            2 => return Err(corrupt("incremental image without a parent".into())),
            3 => ImageKind::Boot,
            other => return Err(corrupt(format!("unknown image kind {other}"))),
        };
        if id.is_zero() {
            return Err(corrupt("zero image id".into()));
        }
        let count = get_u32(&b, OFF_COUNT) as usize;
        if count > MAX_SECTIONS {
            return Err(corrupt(format!(
                "{count} sections, at most {MAX_SECTIONS} fit"
            )));
        }
        let sections = (0..count)
            .map(|i| {
                let at = OFF_TABLE + i * ENTRY_LEN;
                SectionEntry {
                    code: get_u32(&b, at),
                    version: get_u32(&b, at + 4),
                    offset: get_u64(&b, at + 8),
                    length: get_u64(&b, at + 16),
                    checksum: get_u32(&b, at + 24),
                    flags: get_u32(&b, at + 28),
                }
            })
            .collect();
        Ok(Header {
            format_version,
            header_len,
            flags: get_u32(&b, OFF_FLAGS),
            kind,
            id,
            merged_from: ImageId(id_at(&b, OFF_MERGED)).nonzero(),
            created_unix_ms: get_u64(&b, OFF_CREATED),
            sections,
        })
    }
}

impl fmt::Display for Header {
    /// The `inspect` view: fields, then the section table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image     {}", self.id)?;
        writeln!(f, "format    version {}", self.format_version)?;
        writeln!(f, "kind      {}", self.kind)?;
        if let Some(m) = self.merged_from {
            writeln!(f, "merged    from layer {m}")?;
        }
        writeln!(
            f,
            "created   {} ({} ms)",
            UtcTime(self.created_unix_ms),
            self.created_unix_ms
        )?;
        writeln!(
            f,
            "{:<14} {:>7} {:>14} {:>14} {:>10}  flags",
            "section", "version", "offset", "length", "crc32c"
        )?;
        for e in &self.sections {
            let name = match e.kind() {
                Some(k) => k.name().to_owned(),
                None => format!("unknown({})", e.code),
            };
            let flags = if e.is_optional() { "optional" } else { "-" };
            writeln!(
                f,
                "{name:<14} {:>7} {:>14} {:>14} {:#010x}  {flags}",
                e.version, e.offset, e.length, e.checksum
            )?;
        }
        Ok(())
    }
}

/// Unix milliseconds shown as an ISO 8601 UTC time.
pub(crate) struct UtcTime(pub u64);

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 / 1000;
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            self.0 % 1000
        )
    }
}

// ---------------------------------------------------------------------------
// Memory description
// ---------------------------------------------------------------------------

/// A guest memory region given as its present pages only (see
/// [`ImageWriter::add_memory_packed`]).
#[derive(Debug, Clone)]
pub struct PackedRegion<'a> {
    /// Guest-physical address of the region.
    pub guest_addr: u64,
    /// Length of the region in bytes (a multiple of the page size).
    pub len: u64,
    /// Present pages, ascending and disjoint.
    pub present: Vec<PageRun>,
    /// The present pages' bytes, concatenated in run order.
    pub data: &'a [u8],
}

/// A run of consecutive pages within a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct PageRun {
    /// First page, counted from the start of the region.
    pub first_page: u64,
    /// Number of pages.
    pub count: u64,
}

impl PageRun {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.first_page.saturating_add(self.count)
    }

    /// Every page of a region of `len` bytes.
    pub fn all(len: u64) -> Vec<PageRun> {
        let pages = len.div_ceil(PAGE_SIZE);
        if pages == 0 {
            Vec::new()
        } else {
            vec![PageRun {
                first_page: 0,
                count: pages,
            }]
        }
    }

    /// Runs of the set bits among the first `pages` bits of a bitmap in the
    /// KVM dirty-log layout (bit `i % 64` of word `i / 64` is page `i`).
    pub fn from_bitmap(bitmap: &[u64], pages: u64) -> Vec<PageRun> {
        let mut runs: Vec<PageRun> = Vec::new();
        for (w, &word) in bitmap.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if page >= pages {
                    return runs;
                }
                push_page(&mut runs, page);
            }
        }
        runs
    }

    /// Runs of the pages of `bytes` that are not all zero: the present set
    /// of a full image when nothing better is known.
    pub fn nonzero(bytes: &[u8]) -> Vec<PageRun> {
        let mut runs = Vec::new();
        for (i, page) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
            let zero = page
                .chunks(64)
                .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0);
            if !zero {
                push_page(&mut runs, i as u64);
            }
        }
        runs
    }
}

fn push_page(runs: &mut Vec<PageRun>, page: u64) {
    match runs.last_mut() {
        Some(last) if last.end() == page => last.count += 1,
        _ => runs.push(PageRun {
            first_page: page,
            count: 1,
        }),
    }
}

/// A guest memory region handed to [`ImageWriter::add_memory`].
#[derive(Debug, Clone)]
pub struct MemoryRegionSource<'a> {
    /// Guest physical address of the region.
    pub guest_addr: u64,
    /// The whole region (a multiple of [`PAGE_SIZE`]).
    pub bytes: &'a [u8],
    /// The pages to write, ascending and disjoint; the others become holes.
    pub present: Vec<PageRun>,
}

/// Where a region lives in an image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryRegionLayout {
    /// Guest physical address of the region.
    pub guest_addr: u64,
    /// Region length in bytes (a multiple of [`PAGE_SIZE`]).
    pub len: u64,
    /// Absolute, page-aligned file offset of the region's first byte.
    pub file_offset: u64,
    /// Present pages, ascending and disjoint; the rest read as zeros.
    pub present: Vec<PageRun>,
}

impl MemoryRegionLayout {
    /// Number of present pages.
    pub fn present_pages(&self) -> u64 {
        self.present.iter().map(|r| r.count).sum()
    }
}

/// A region as planned by the writer (file offset relative to Memory).
#[derive(Debug, Clone)]
pub(crate) struct RegionPlan {
    pub guest_addr: u64,
    pub len: u64,
    pub present: Vec<PageRun>,
}

fn encode_memory_map(regions: &[(RegionPlan, u64)]) -> Vec<u8> {
    let runs: usize = regions.iter().map(|(r, _)| r.present.len()).sum();
    let mut b = Vec::with_capacity(8 + regions.len() * 32 + runs * 16);
    b.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for (r, rel) in regions {
        b.extend_from_slice(&r.guest_addr.to_le_bytes());
        b.extend_from_slice(&r.len.to_le_bytes());
        b.extend_from_slice(&rel.to_le_bytes());
        b.extend_from_slice(&(r.present.len() as u64).to_le_bytes());
        for run in &r.present {
            b.extend_from_slice(&run.first_page.to_le_bytes());
            b.extend_from_slice(&run.count.to_le_bytes());
        }
    }
    b
}

/// Decodes a MemoryMap payload against a Memory section at `memory` (offset,
/// length); returns absolute layouts.
fn decode_memory_map(
    b: &[u8],
    memory_offset: u64,
    memory_len: u64,
) -> Result<Vec<MemoryRegionLayout>, String> {
    let mut r = Cursor { b, at: 0 };
    let page_size = r.u32()?;
    if u64::from(page_size) != PAGE_SIZE {
        return Err(format!("page size {page_size}, expected {PAGE_SIZE}"));
    }
    let count = r.u32()? as usize;
    if count > r.remaining() / 32 {
        return Err(format!("{count} regions do not fit in {} bytes", b.len()));
    }
    let mut regions = Vec::with_capacity(count);
    let mut file_end = 0u64;
    for i in 0..count {
        let guest_addr = r.u64()?;
        let len = r.u64()?;
        let rel = r.u64()?;
        let runs = r.u64()?;
        if len % PAGE_SIZE != 0 || rel % PAGE_SIZE != 0 {
            return Err(format!("region {i} is not page-aligned"));
        }
        guest_addr
            .checked_add(len)
            .ok_or_else(|| format!("region {i} wraps the guest address space"))?;
        if rel < file_end {
            return Err(format!(
                "region {i} overlaps the previous region in the file"
            ));
        }
        file_end = rel
            .checked_add(len)
            .filter(|&end| end <= memory_len)
            .ok_or_else(|| format!("region {i} lies beyond the memory section"))?;
        if runs > (r.remaining() / 16) as u64 {
            return Err(format!("region {i}: {runs} runs do not fit"));
        }
        let pages = len / PAGE_SIZE;
        let mut present = Vec::with_capacity(runs as usize);
        let mut next_free = 0u64;
        for _ in 0..runs {
            let run = PageRun {
                first_page: r.u64()?,
                count: r.u64()?,
            };
            if run.count == 0
                || run.first_page < next_free
                || run
                    .first_page
                    .checked_add(run.count)
                    .is_none_or(|e| e > pages)
            {
                return Err(format!(
                    "region {i}: bad page run {}+{}",
                    run.first_page, run.count
                ));
            }
            next_free = run.end();
            present.push(run);
        }
        regions.push(MemoryRegionLayout {
            guest_addr,
            len,
            file_offset: memory_offset + rel,
            present,
        });
    }
    if r.remaining() != 0 {
        return Err(format!("{} trailing bytes", r.remaining()));
    }
    let mut by_addr: Vec<_> = regions.iter().map(|r| (r.guest_addr, r.len)).collect();
    by_addr.sort_unstable();
    if by_addr.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err("regions overlap in guest memory".into());
    }
    Ok(regions)
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn remaining(&self) -> usize {
        self.b.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.remaining() < n {
            return Err(format!("ends early at byte {}", self.at));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(get_u32(self.take(4)?, 0))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(get_u64(self.take(8)?, 0))
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why an image could not be written. The temporary file is gone by the time
/// the caller sees one of these; existing images are untouched.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The temporary file could not be created.
    #[error("cannot create a temporary image file in {}", dir.display())]
    Create {
        /// Target directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A write, sync or rename failed (a full disk, an I/O error).
    #[error("cannot write {what} to {}", path.display())]
    Io {
        /// The file being written.
        path: PathBuf,
        /// What was being written ("section vm-state", "memory region 0x0 pages 0+16").
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A section payload is over the decode limit.
    #[error("section {section} of {} is {len} bytes, over the {limit}-byte limit", path.display())]
    SectionTooLarge {
        /// The file being written.
        path: PathBuf,
        /// The section.
        section: SectionKind,
        /// Its length.
        len: u64,
        /// [`SECTION_SIZE_LIMIT`].
        limit: u64,
    },
    /// The caller asked for something the format does not allow.
    #[error("cannot write {}: {reason}", path.display())]
    Invalid {
        /// The file being written.
        path: PathBuf,
        /// What is wrong ("section config added twice").
        reason: String,
    },
    /// An earlier call failed, so the writer was abandoned.
    #[error("the writer of {} failed earlier and was abandoned; start a new image", path.display())]
    Abandoned {
        /// The temporary file that was removed.
        path: PathBuf,
    },
}

/// Why an image could not be read or verified. Every message names the file
/// and, where one is to blame, the section.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The OS refused a read.
    #[error("cannot read image {}", path.display())]
    Io {
        /// The image file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the magic.
    #[error("{} is not a relive image (no RELIVEIM magic)", path.display())]
    NotAnImage {
        /// The file.
        path: PathBuf,
    },
    /// The file ends inside the header.
    #[error("image {} is truncated inside its header ({file_len} of {header_len} bytes)", path.display())]
    TruncatedHeader {
        /// The image file.
        path: PathBuf,
        /// Its length.
        file_len: u64,
        /// The header's length.
        header_len: u64,
    },
    /// The header's checksum does not match its bytes.
    #[error("image {} has a corrupt header: checksum {stored:#010x} stored, {computed:#010x} computed", path.display())]
    HeaderChecksum {
        /// The image file.
        path: PathBuf,
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// The header is intact but describes something impossible.
    #[error("image {} has a corrupt header: {reason}", path.display())]
    CorruptHeader {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Written by a newer relive.
    #[error("image {} has format version {found}, this relive reads up to version {supported}: upgrade relive to use it", path.display())]
    NewerVersion {
        /// The image file.
        path: PathBuf,
        /// Its format version.
        found: u32,
        /// [`FORMAT_VERSION`].
        supported: u32,
    },
    /// A required section of a kind this version does not know.
    #[error("image {} has a required section of kind {code} that this relive does not know: upgrade relive to use it", path.display())]
    UnknownSection {
        /// The image file.
        path: PathBuf,
        /// The section's kind code.
        code: u32,
    },
    /// A section this crate decodes has a newer version than it reads.
    #[error("image {} has a {section} section of version {found}, this relive reads up to version {supported}: upgrade relive to use it", path.display())]
    NewerSection {
        /// The image file.
        path: PathBuf,
        /// The section.
        section: SectionKind,
        /// Its version.
        found: u32,
        /// The newest this crate reads.
        supported: u32,
    },
    /// A section the image's kind requires is absent.
    #[error("image {} has no {section} section", path.display())]
    MissingSection {
        /// The image file.
        path: PathBuf,
        /// The missing section.
        section: SectionKind,
    },
    /// A non-memory section claims more than the decode limit.
    #[error("image {} is corrupt: its {section} section claims {length} bytes, over the {limit}-byte limit", path.display())]
    SectionTooLarge {
        /// The image file.
        path: PathBuf,
        /// The section.
        section: SectionKind,
        /// The length it claims.
        length: u64,
        /// [`SECTION_SIZE_LIMIT`].
        limit: u64,
    },
    /// The file ends before a section does.
    #[error("image {} is truncated: its {section} section ends at byte {end} but the file has {file_len} bytes", path.display())]
    Truncated {
        /// The image file.
        path: PathBuf,
        /// The first section (in file order) cut short.
        section: SectionKind,
        /// Where the section should end.
        end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A section's bytes do not match its checksum.
    #[error("image {} is corrupt: checksum mismatch in its {section} section ({stored:#010x} stored, {computed:#010x} computed)", path.display())]
    Checksum {
        /// The image file.
        path: PathBuf,
        /// The section.
        section: SectionKind,
        /// Checksum in the table.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// A section's checksum matches but its content is impossible.
    #[error("image {} is corrupt: its {section} section is invalid: {reason}", path.display())]
    CorruptSection {
        /// The image file.
        path: PathBuf,
        /// The section.
        section: SectionKind,
        /// What is wrong.
        reason: String,
    },
}

impl ReadError {
    /// The section the error blames, if it blames one.
    pub fn section(&self) -> Option<SectionKind> {
        match self {
            ReadError::NewerSection { section, .. }
            | ReadError::MissingSection { section, .. }
            | ReadError::SectionTooLarge { section, .. }
            | ReadError::Truncated { section, .. }
            | ReadError::Checksum { section, .. }
            | ReadError::CorruptSection { section, .. } => Some(*section),
            _ => None,
        }
    }

    /// True when the header itself is missing, foreign, damaged or impossible.
    pub fn is_header(&self) -> bool {
        matches!(
            self,
            ReadError::NotAnImage { .. }
                | ReadError::TruncatedHeader { .. }
                | ReadError::HeaderChecksum { .. }
                | ReadError::CorruptHeader { .. }
        )
    }
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

/// Names of this process's temporary files still being written, so that a
/// store opened in the same process never takes them for crash leftovers.
static LIVE_TEMPS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn live_temps() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    LIVE_TEMPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How old a temporary file of a live process must be before it counts as
/// abandoned anyway (its pid may have been reused): no write takes this long.
const TEMP_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Whether a `.tmp-<id>-<pid>` file in an image directory was left by a
/// writer that is gone. Writers and the store must share a pid namespace.
pub(crate) fn temp_is_stale(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return true;
    };
    let Some(pid) = name
        .rsplit_once('-')
        .and_then(|(_, pid)| pid.parse::<u32>().ok())
    else {
        return true;
    };
    if pid == std::process::id() {
        return !live_temps().contains(name);
    }
    let old = fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > TEMP_MAX_AGE);
    let proc_mounted = Path::new("/proc/self").exists();
    old || (proc_mounted && !Path::new("/proc").join(pid.to_string()).exists())
}

/// What [`ImageWriter::commit`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommittedImage {
    /// Final path, `<dir>/<created_ms>-<id>.rimg`.
    pub path: PathBuf,
    /// The image's id.
    pub id: ImageId,
    /// The image's kind.
    pub kind: ImageKind,
    /// `created_unix_ms` in the header.
    pub created_unix_ms: u64,
    /// Bytes actually written: header, sections, present pages.
    pub bytes_written: u64,
    /// File length (holes included).
    pub file_len: u64,
}

/// Memory writing in progress: the plan and the next byte expected.
#[derive(Debug)]
struct MemoryPlan {
    offset: u64,
    len: u64,
    regions: Vec<(RegionPlan, u64)>,
    crc: u32,
    region: usize,
    run: usize,
    done_in_run: u64,
}

impl MemoryPlan {
    /// Skips finished runs and regions; returns the next (region, run) to write.
    fn settle(&mut self) -> Option<(usize, PageRun)> {
        while let Some((r, _)) = self.regions.get(self.region) {
            match r.present.get(self.run) {
                Some(run) if self.done_in_run < run.count * PAGE_SIZE => {
                    return Some((self.region, *run));
                }
                Some(_) => {
                    self.run += 1;
                    self.done_in_run = 0;
                }
                None => {
                    self.region += 1;
                    self.run = 0;
                    self.done_in_run = 0;
                }
            }
        }
        None
    }
}

#[derive(Debug)]
enum MemoryState {
    None,
    Writing(MemoryPlan),
    Done,
}

/// Writes one image into a temporary file and commits it atomically.
///
/// Call [`add_section`](Self::add_section) and [`add_memory`](Self::add_memory)
/// in any order, then [`commit`](Self::commit). Consistency images must have
/// memory. The writer keeps no copy of guest memory: each present run goes
/// from the caller's slice to the file in one `pwrite`.
#[derive(Debug)]
pub struct ImageWriter {
    dir: PathBuf,
    tmp: PathBuf,
    tmp_name: String,
    file: Option<File>,
    header: Header,
    cursor: u64,
    bytes_written: u64,
    memory: MemoryState,
    committed: bool,
}

impl ImageWriter {
    /// Starts an image of `kind` in `dir` (which must exist), in a temporary
    /// file `.tmp-<id>-<pid>` there.
    pub fn create(dir: &Path, kind: ImageKind) -> Result<Self, WriteError> {
        Self::create_with(dir, kind, next_created_ms(), None)
    }

    /// [`create`](Self::create) with an explicit creation time and the layer
    /// a merged image stands for.
    pub(crate) fn create_with(
        dir: &Path,
        kind: ImageKind,
        created_unix_ms: u64,
        merged_from: Option<ImageId>,
    ) -> Result<Self, WriteError> {
        let id = ImageId::generate();
        let tmp_name = format!("{TEMP_PREFIX}{id}-{}", std::process::id());
        let tmp = dir.join(&tmp_name);
        live_temps().insert(tmp_name.clone());
        let file = match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => f,
            Err(source) => {
                live_temps().remove(&tmp_name);
                return Err(WriteError::Create {
                    dir: dir.to_owned(),
                    source,
                });
            }
        };
        Ok(ImageWriter {
            dir: dir.to_owned(),
            tmp,
            tmp_name,
            file: Some(file),
            header: Header {
                format_version: FORMAT_VERSION,
                header_len: HEADER_LEN,
                flags: 0,
                kind,
                id,
                merged_from,
                created_unix_ms,
                sections: Vec::new(),
            },
            cursor: u64::from(HEADER_LEN),
            bytes_written: 0,
            memory: MemoryState::None,
            committed: false,
        })
    }

    /// The new image's id.
    pub fn id(&self) -> ImageId {
        self.header.id
    }

    /// The temporary file being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Adds a non-memory section. `Memory` and `MemoryMap` come from
    /// [`add_memory`](Self::add_memory); each kind may appear once.
    pub fn add_section(
        &mut self,
        kind: SectionKind,
        version: u32,
        payload: &[u8],
    ) -> Result<(), WriteError> {
        if kind.is_memory() {
            return Err(self.invalid(format!("the {kind} section is written by add_memory")));
        }
        self.push_section(kind.code(), version, 0, payload)
    }

    /// Adds a section by raw code and flags (also for kinds this version does
    /// not know, as a newer writer would).
    pub(crate) fn push_section(
        &mut self,
        code: u32,
        version: u32,
        flags: u32,
        payload: &[u8],
    ) -> Result<(), WriteError> {
        self.usable()?;
        let name = SectionKind::from_code(code)
            .map(|k| k.name().to_owned())
            .unwrap_or_else(|| format!("kind {code}"));
        if self.header.sections.iter().any(|e| e.code == code) {
            return Err(self.invalid(format!("section {name} added twice")));
        }
        if self.header.sections.len() >= MAX_SECTIONS {
            return Err(self.invalid(format!("more than {MAX_SECTIONS} sections")));
        }
        let len = payload.len() as u64;
        if let Some(section) = SectionKind::from_code(code).filter(|k| *k != SectionKind::Memory) {
            if len > SECTION_SIZE_LIMIT {
                let err = WriteError::SectionTooLarge {
                    path: self.tmp.clone(),
                    section,
                    len,
                    limit: SECTION_SIZE_LIMIT,
                };
                self.abandon();
                return Err(err);
            }
        }
        let offset = self.cursor.next_multiple_of(8);
        self.write_at(payload, offset, || format!("section {name}"))?;
        self.cursor = offset + len;
        self.header.sections.push(SectionEntry {
            code,
            version,
            offset,
            length: len,
            checksum: crc32c::crc32c(payload),
            flags,
        });
        Ok(())
    }

    /// Writes guest memory: the Memory section (one `pwrite` per present run,
    /// the rest left as holes) and its MemoryMap. Call at most once; each
    /// region must be page-multiple long with ascending, disjoint runs.
    pub fn add_memory(&mut self, regions: &[MemoryRegionSource<'_>]) -> Result<(), WriteError> {
        let plans = regions
            .iter()
            .map(|r| RegionPlan {
                guest_addr: r.guest_addr,
                len: r.bytes.len() as u64,
                present: r.present.clone(),
            })
            .collect();
        self.begin_memory(plans)?;
        for (i, region) in regions.iter().enumerate() {
            let runs = match &self.memory {
                MemoryState::Writing(plan) => plan.regions[i].0.present.clone(),
                _ => Vec::new(),
            };
            for run in runs {
                let start = (run.first_page * PAGE_SIZE) as usize;
                let end = (run.end() * PAGE_SIZE) as usize;
                self.write_memory(i, start as u64, &region.bytes[start..end])?;
            }
        }
        self.end_memory()
    }

    /// Like [`add_memory`](Self::add_memory), but each region's present pages
    /// come packed: `data` holds exactly the pages of `present`, in run order.
    /// A VMM copies dirty pages into such a buffer while the guest is paused
    /// and writes the image after it runs again.
    pub fn add_memory_packed(&mut self, regions: &[PackedRegion<'_>]) -> Result<(), WriteError> {
        for (i, r) in regions.iter().enumerate() {
            let pages: u64 = r.present.iter().map(|run| run.count).sum();
            if pages * PAGE_SIZE != r.data.len() as u64 {
                return Err(self.invalid(format!(
                    "packed memory region {i}: {} bytes of data for {pages} present pages",
                    r.data.len()
                )));
            }
        }
        let plans = regions
            .iter()
            .map(|r| RegionPlan {
                guest_addr: r.guest_addr,
                len: r.len,
                present: r.present.clone(),
            })
            .collect();
        self.begin_memory(plans)?;
        for (i, region) in regions.iter().enumerate() {
            let mut at = 0usize;
            for run in &region.present {
                let len = (run.count * PAGE_SIZE) as usize;
                self.write_memory(i, run.first_page * PAGE_SIZE, &region.data[at..at + len])?;
                at += len;
            }
        }
        self.end_memory()
    }

    /// Validates the regions, normalises their runs (sorted check, adjacent
    /// runs joined) and reserves the page-aligned Memory section.
    pub(crate) fn begin_memory(&mut self, regions: Vec<RegionPlan>) -> Result<(), WriteError> {
        self.usable()?;
        if !matches!(self.memory, MemoryState::None) {
            return Err(self.invalid("memory added twice".into()));
        }
        if self.header.sections.len() + 2 > MAX_SECTIONS {
            return Err(self.invalid(format!("more than {MAX_SECTIONS} sections")));
        }
        let mut placed = Vec::with_capacity(regions.len());
        let mut rel = 0u64;
        let mut spans = Vec::with_capacity(regions.len());
        for (i, mut r) in regions.into_iter().enumerate() {
            let bad = |reason: &str| format!("memory region {i} at {:#x}: {reason}", r.guest_addr);
            if r.len % PAGE_SIZE != 0 {
                return Err(self.invalid(bad("length is not a multiple of the page size")));
            }
            let Some(end) = r.guest_addr.checked_add(r.len) else {
                return Err(self.invalid(bad("wraps the address space")));
            };
            spans.push((r.guest_addr, end));
            let pages = r.len / PAGE_SIZE;
            let mut runs: Vec<PageRun> = Vec::with_capacity(r.present.len());
            for run in r.present.iter().filter(|run| run.count > 0) {
                if run
                    .first_page
                    .checked_add(run.count)
                    .is_none_or(|e| e > pages)
                {
                    return Err(self.invalid(bad("a page run lies beyond the region")));
                }
                match runs.last_mut() {
                    Some(last) if run.first_page < last.end() => {
                        return Err(self.invalid(bad("page runs are not ascending and disjoint")));
                    }
                    Some(last) if run.first_page == last.end() => last.count += run.count,
                    _ => runs.push(*run),
                }
            }
            r.present = runs;
            let len = r.len;
            placed.push((r, rel));
            rel = match rel.checked_add(len) {
                Some(v) => v,
                None => return Err(self.invalid("memory regions too large".into())),
            };
        }
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err(self.invalid("memory regions overlap".into()));
        }
        let offset = self.cursor.next_multiple_of(PAGE_SIZE);
        self.cursor = offset + rel;
        self.memory = MemoryState::Writing(MemoryPlan {
            offset,
            len: rel,
            regions: placed,
            crc: 0,
            region: 0,
            run: 0,
            done_in_run: 0,
        });
        Ok(())
    }

    /// Writes the next `bytes` of present memory, which must start where the
    /// previous call stopped (runs in order) and stay within one run.
    pub(crate) fn write_memory(
        &mut self,
        region: usize,
        offset_in_region: u64,
        bytes: &[u8],
    ) -> Result<(), WriteError> {
        self.usable()?;
        let MemoryState::Writing(plan) = &mut self.memory else {
            return Err(self.invalid("memory written outside add_memory".into()));
        };
        let next = plan.settle();
        let Some((at_region, run)) = next.filter(|(r, _)| *r == region) else {
            return Err(self.invalid(format!("memory region {region} written out of order")));
        };
        let expected = run.first_page * PAGE_SIZE + plan.done_in_run;
        let left = run.count * PAGE_SIZE - plan.done_in_run;
        if offset_in_region != expected || bytes.len() as u64 > left {
            return Err(self.invalid(format!(
                "memory region {region} written out of order at {offset_in_region:#x}"
            )));
        }
        let (r, rel) = &plan.regions[at_region];
        let pos = plan.offset + rel + offset_in_region;
        let guest = r.guest_addr + offset_in_region;
        plan.crc = crc32c::crc32c_append(plan.crc, bytes);
        plan.done_in_run += bytes.len() as u64;
        self.write_at(bytes, pos, || {
            format!(
                "guest memory at {guest:#x} ({} pages)",
                bytes.len() as u64 / PAGE_SIZE
            )
        })
    }

    /// Checks that every present page was written, then records the Memory
    /// section and writes the MemoryMap.
    pub(crate) fn end_memory(&mut self) -> Result<(), WriteError> {
        self.usable()?;
        let MemoryState::Writing(plan) = &mut self.memory else {
            return Err(self.invalid("memory finished outside add_memory".into()));
        };
        if plan.settle().is_some() {
            return Err(self.invalid("not all present memory pages were written".into()));
        }
        let map = encode_memory_map(&plan.regions);
        let entry = SectionEntry {
            code: SectionKind::Memory.code(),
            version: MEMORY_SECTION_VERSION,
            offset: plan.offset,
            length: plan.len,
            checksum: plan.crc,
            flags: 0,
        };
        self.memory = MemoryState::Done;
        self.header.sections.push(entry);
        self.push_section(
            SectionKind::MemoryMap.code(),
            MEMORY_SECTION_VERSION,
            0,
            &map,
        )
    }

    /// Makes the image durable and visible: header, fsync, rename to
    /// `<created_ms>-<id>.rimg`, fsync of the directory.
    pub fn commit(mut self) -> Result<CommittedImage, WriteError> {
        self.usable()?;
        match self.memory {
            MemoryState::Done => {}
            MemoryState::Writing(_) => {
                return Err(self.invalid("memory was not finished".into()));
            }
            MemoryState::None if self.header.kind.is_consistency() => {
                return Err(self.invalid(format!(
                    "a {} image needs guest memory",
                    self.header.kind.name()
                )));
            }
            MemoryState::None => {}
        }
        let header = self.header.encode();
        self.write_at(&header, 0, || "the header".into())?;
        let len = self.cursor;
        let path = self.dir.join(format!(
            "{:013}-{}.{IMAGE_EXTENSION}",
            self.header.created_unix_ms, self.header.id
        ));
        let file = self.file.take();
        let result = file
            .as_ref()
            .map_or(Ok(()), |f| f.set_len(len))
            .map_err(|e| ("the file length", e))
            .and_then(|()| {
                file.as_ref()
                    .map_or(Ok(()), File::sync_all)
                    .map_err(|e| ("fsync", e))
            })
            .and_then(|()| {
                if path.exists() {
                    Err((
                        "rename",
                        io::Error::new(io::ErrorKind::AlreadyExists, "target exists"),
                    ))
                } else {
                    fs::rename(&self.tmp, &path).map_err(|e| ("rename", e))
                }
            });
        drop(file);
        if let Err((what, source)) = result {
            self.abandon();
            return Err(WriteError::Io {
                path: self.tmp.clone(),
                what: what.into(),
                source,
            });
        }
        self.committed = true;
        live_temps().remove(&self.tmp_name);
        sync_dir(&self.dir).map_err(|source| WriteError::Io {
            path: path.clone(),
            what: "its directory entry (fsync of the directory)".into(),
            source,
        })?;
        Ok(CommittedImage {
            path,
            id: self.header.id,
            kind: self.header.kind,
            created_unix_ms: self.header.created_unix_ms,
            bytes_written: self.bytes_written,
            file_len: len,
        })
    }

    fn usable(&self) -> Result<(), WriteError> {
        if self.file.is_some() {
            Ok(())
        } else {
            Err(WriteError::Abandoned {
                path: self.tmp.clone(),
            })
        }
    }

    fn write_at(
        &mut self,
        bytes: &[u8],
        offset: u64,
        what: impl FnOnce() -> String,
    ) -> Result<(), WriteError> {
        let Some(file) = &self.file else {
            return Err(WriteError::Abandoned {
                path: self.tmp.clone(),
            });
        };
        match file.write_all_at(bytes, offset) {
            Ok(()) => {
                self.bytes_written += bytes.len() as u64;
                Ok(())
            }
            Err(source) => {
                self.abandon();
                Err(WriteError::Io {
                    path: self.tmp.clone(),
                    what: what(),
                    source,
                })
            }
        }
    }

    /// A usage error: the image would be wrong, so it is abandoned.
    fn invalid(&mut self, reason: String) -> WriteError {
        self.abandon();
        WriteError::Invalid {
            path: self.tmp.clone(),
            reason,
        }
    }

    /// Closes and removes the temporary file; the writer is unusable after.
    fn abandon(&mut self) {
        if self.committed {
            return;
        }
        self.file = None;
        let _ = fs::remove_file(&self.tmp);
        live_temps().remove(&self.tmp_name);
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// fsync of a directory, making renames and unlinks in it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn next_created_ms() -> u64 {
    // Strictly increasing within a process, so two images written in the same
    // millisecond still sort in the order they were taken.
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

// ---------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------

/// An open image whose header and non-memory sections have been verified.
///
/// Guest pages are not read by [`open`](Self::open); [`verify_memory`](Self::verify_memory)
/// checks them, and a restore maps them through [`file`](Self::file) at the
/// offsets of [`memory_map`](Self::memory_map).
pub struct ImageReader {
    path: PathBuf,
    file: File,
    file_len: u64,
    header: Header,
    sections: Vec<(SectionKind, Vec<u8>)>,
    memory: Vec<MemoryRegionLayout>,
}

impl fmt::Debug for ImageReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageReader")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl ImageReader {
    /// Opens an image: checks the header (magic, checksum, version), the
    /// table against the file's length, and the checksums of all non-memory
    /// sections, which it keeps in memory. Does not read guest pages.
    pub fn open(path: &Path) -> Result<Self, ReadError> {
        let io_err = |source| ReadError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        let header = Header::read(&file, file_len, path)?;
        let err_path = || path.to_owned();

        // Known sections in file order; unknown ones skipped or refused.
        let mut known: Vec<(SectionKind, SectionEntry)> = Vec::new();
        for e in &header.sections {
            match e.kind() {
                Some(k) if known.iter().any(|(seen, _)| *seen == k) => {
                    return Err(ReadError::CorruptSection {
                        path: err_path(),
                        section: k,
                        reason: "it appears twice in the table".into(),
                    });
                }
                Some(k) => known.push((k, *e)),
                None if e.is_optional() => {}
                None => {
                    return Err(ReadError::UnknownSection {
                        path: err_path(),
                        code: e.code,
                    })
                }
            }
        }
        known.sort_by_key(|(_, e)| (e.offset, e.length));
        let mut prev: Option<(SectionKind, u64)> = None;
        for (k, e) in &known {
            if *k != SectionKind::Memory && e.length > SECTION_SIZE_LIMIT {
                return Err(ReadError::SectionTooLarge {
                    path: err_path(),
                    section: *k,
                    length: e.length,
                    limit: SECTION_SIZE_LIMIT,
                });
            }
            let end = e.end().filter(|&end| end <= file_len);
            let Some(end) = end else {
                return Err(ReadError::Truncated {
                    path: err_path(),
                    section: *k,
                    end: e.end().unwrap_or(u64::MAX),
                    file_len,
                });
            };
            if e.offset < u64::from(header.header_len) {
                return Err(ReadError::CorruptSection {
                    path: err_path(),
                    section: *k,
                    reason: "it starts inside the header".into(),
                });
            }
            if let Some((pk, _)) = prev.filter(|(_, pend)| *pend > e.offset) {
                return Err(ReadError::CorruptSection {
                    path: err_path(),
                    section: *k,
                    reason: format!("it overlaps the {pk} section"),
                });
            }
            prev = Some((*k, end));
        }

        let entry = |kind: SectionKind| known.iter().find(|(k, _)| *k == kind).map(|(_, e)| *e);
        let memory = entry(SectionKind::Memory);
        let map = entry(SectionKind::MemoryMap);
        match (memory, map) {
            (Some(_), None) => {
                return Err(ReadError::MissingSection {
                    path: err_path(),
                    section: SectionKind::MemoryMap,
                })
            }
            (None, Some(_)) => {
                return Err(ReadError::MissingSection {
                    path: err_path(),
                    section: SectionKind::Memory,
                })
            }
            (None, None) if header.kind.is_consistency() => {
                return Err(ReadError::MissingSection {
                    path: err_path(),
                    section: SectionKind::Memory,
                })
            }
            _ => {}
        }
        for e in [memory, map].into_iter().flatten() {
            let section = e.kind().unwrap_or(SectionKind::Memory);
            if e.version > MEMORY_SECTION_VERSION {
                return Err(ReadError::NewerSection {
                    path: err_path(),
                    section,
                    found: e.version,
                    supported: MEMORY_SECTION_VERSION,
                });
            }
        }
        if let Some(m) = memory.filter(|m| m.offset % PAGE_SIZE != 0) {
            return Err(ReadError::CorruptSection {
                path: err_path(),
                section: SectionKind::Memory,
                reason: format!("offset {} is not page-aligned", m.offset),
            });
        }

        let mut sections = Vec::with_capacity(known.len());
        for (k, e) in known.iter().filter(|(k, _)| *k != SectionKind::Memory) {
            let mut payload = vec![0u8; e.length as usize];
            file.read_exact_at(&mut payload, e.offset).map_err(io_err)?;
            let computed = crc32c::crc32c(&payload);
            if computed != e.checksum {
                return Err(ReadError::Checksum {
                    path: err_path(),
                    section: *k,
                    stored: e.checksum,
                    computed,
                });
            }
            sections.push((*k, payload));
        }

        let layout = match memory {
            None => Vec::new(),
            Some(m) => {
                let raw = sections
                    .iter()
                    .find(|(k, _)| *k == SectionKind::MemoryMap)
                    .map(|(_, p)| p.as_slice())
                    .unwrap_or_default();
                decode_memory_map(raw, m.offset, m.length).map_err(|reason| {
                    ReadError::CorruptSection {
                        path: err_path(),
                        section: SectionKind::MemoryMap,
                        reason,
                    }
                })?
            }
        };
        Ok(ImageReader {
            path: path.to_owned(),
            file,
            file_len,
            header,
            sections,
            memory: layout,
        })
    }

    /// Reads and checks only the header (magic, checksum, version): enough to
    /// show an image's table even when a section is damaged.
    pub fn read_header(path: &Path) -> Result<Header, ReadError> {
        let io_err = |source| ReadError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        Header::read(&file, len, path)
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image's id.
    pub fn id(&self) -> ImageId {
        self.header.id
    }

    /// The image's kind.
    pub fn kind(&self) -> ImageKind {
        self.header.kind
    }

    /// The payload of a non-memory section, already verified. `None` for
    /// absent sections and for `Memory` (see [`memory_map`](Self::memory_map)).
    pub fn section(&self, kind: SectionKind) -> Option<&[u8]> {
        self.sections
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, p)| p.as_slice())
    }

    /// The version of a section, if present.
    pub fn section_version(&self, kind: SectionKind) -> Option<u32> {
        self.header.section(kind).map(|e| e.version)
    }

    /// Where each guest memory region is in the file (empty without memory).
    pub fn memory_map(&self) -> &[MemoryRegionLayout] {
        &self.memory
    }

    /// Reads every present page and checks the Memory section's checksum.
    /// Costs time in proportion to the present pages, not the guest's size.
    pub fn verify_memory(&self) -> Result<(), ReadError> {
        let Some(entry) = self.header.section(SectionKind::Memory) else {
            return Ok(());
        };
        let mut crc = 0u32;
        let mut buf = Vec::new();
        for region in &self.memory {
            for run in &region.present {
                let mut pos = region.file_offset + run.first_page * PAGE_SIZE;
                let mut left = run.count * PAGE_SIZE;
                while left > 0 {
                    let n = left.min(COPY_CHUNK as u64) as usize;
                    if buf.len() < n {
                        buf.resize(n, 0);
                    }
                    self.file
                        .read_exact_at(&mut buf[..n], pos)
                        .map_err(|source| self.read_error(source))?;
                    crc = crc32c::crc32c_append(crc, &buf[..n]);
                    pos += n as u64;
                    left -= n as u64;
                }
            }
        }
        if crc != entry.checksum {
            return Err(ReadError::Checksum {
                path: self.path.clone(),
                section: SectionKind::Memory,
                stored: entry.checksum,
                computed: crc,
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of guest memory at `offset` within `region`
    /// (holes read as zeros).
    pub fn read_memory(
        &self,
        region: &MemoryRegionLayout,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ReadError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > region.len)
        {
            return Err(ReadError::CorruptSection {
                path: self.path.clone(),
                section: SectionKind::Memory,
                reason: format!(
                    "read of {} bytes at {offset:#x} is beyond the {}-byte region",
                    buf.len(),
                    region.len
                ),
            });
        }
        self.file
            .read_exact_at(buf, region.file_offset + offset)
            .map_err(|source| self.read_error(source))
    }

    /// The open file (read-only), for mapping memory regions.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length, holes included.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes the file occupies on disk (allocated blocks).
    pub fn bytes_on_disk(&self) -> Result<u64, ReadError> {
        let meta = self.file.metadata().map_err(|e| self.read_error(e))?;
        Ok(meta.blocks() * 512)
    }

    fn read_error(&self, source: io::Error) -> ReadError {
        ReadError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

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
mod tests {
    use super::test_support::*;
    use super::*;

    const MIB: u64 = 1 << 20;

    fn sections_by_offset(path: &Path) -> Vec<(SectionKind, SectionEntry)> {
        let h = ImageReader::read_header(path).unwrap();
        let mut v: Vec<_> = h.sections.iter().map(|e| (e.kind().unwrap(), *e)).collect();
        v.sort_by_key(|(_, e)| e.offset);
        v
    }

    fn copy_to(src: &Path, dir: &TempDir, name: &str) -> PathBuf {
        let dst = dir.path().join(name);
        fs::copy(src, &dst).unwrap();
        dst
    }

    #[test]
    fn packed_memory_reads_back_like_a_full_region() {
        let dir = TempDir::new("packed");
        let whole = region(16, |p| p as u8 + 1);
        let runs = vec![run(2, 2), run(4, 1), run(10, 1)];
        let mut data = Vec::new();
        for r in &runs {
            data.extend_from_slice(
                &whole[(r.first_page * PAGE_SIZE) as usize..(r.end() * PAGE_SIZE) as usize],
            );
        }
        let mut w = ImageWriter::create(dir.path(), ImageKind::Full).unwrap();
        // Data that does not match the runs is refused.
        assert!(w
            .add_memory_packed(&[PackedRegion {
                guest_addr: 0,
                len: 16 * PAGE_SIZE,
                present: runs.clone(),
                data: &data[..PAGE_SIZE as usize],
            }])
            .is_err());
        let mut w = ImageWriter::create(dir.path(), ImageKind::Full).unwrap();
        w.add_memory_packed(&[PackedRegion {
            guest_addr: 0,
            len: 16 * PAGE_SIZE,
            present: runs.clone(),
            data: &data,
        }])
        .unwrap();
        let c = w.commit().unwrap();
        let r = ImageReader::open(&c.path).unwrap();
        r.verify_memory().unwrap();
        let layout = r.memory_map()[0].clone();
        assert_eq!(layout.present_pages(), 4);
        for page in [2u64, 3, 4, 10] {
            let mut buf = vec![0u8; PAGE_SIZE as usize];
            r.read_memory(&layout, page * PAGE_SIZE, &mut buf).unwrap();
            assert_eq!(
                buf,
                whole[(page * PAGE_SIZE) as usize..((page + 1) * PAGE_SIZE) as usize]
            );
        }
    }

    #[test]
    fn round_trip_of_sections_and_sparse_memory() {
        let dir = TempDir::new("roundtrip");
        let low = region(256, |p| if p % 3 == 0 { 0 } else { p as u8 | 1 });
        let mut high = vec![0u8; (64 * MIB) as usize];
        let runs = vec![run(0, 1), run(100, 3), run(16_383, 1)];
        for r in &runs {
            for p in r.first_page..r.end() {
                let at = (p * PAGE_SIZE) as usize;
                high[at..at + PAGE_SIZE as usize].fill((p % 251) as u8 + 1);
            }
        }
        let mut w = ImageWriter::create(dir.path(), ImageKind::Full).unwrap();
        let id = w.id();
        w.add_section(SectionKind::Config, 3, br#"{"vcpus":2}"#)
            .unwrap();
        w.add_section(SectionKind::AppStatus, 1, b"").unwrap();
        w.add_memory(&[
            MemoryRegionSource {
                guest_addr: 0,
                bytes: &low,
                present: PageRun::nonzero(&low),
            },
            MemoryRegionSource {
                guest_addr: 1 << 32,
                bytes: &high,
                present: runs.clone(),
            },
        ])
        .unwrap();
        w.add_section(SectionKind::VmState, 1, br#"{"regs":[]}"#)
            .unwrap();
        let c = w.commit().unwrap();

        assert_eq!(c.id, id);
        let name = c.path.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("{:013}-{id}.rimg", c.created_unix_ms));
        assert_eq!(dir.names(), vec![name.to_owned()], "no temp file left");

        let r = ImageReader::open(&c.path).unwrap();
        assert_eq!(r.id(), id);
        assert_eq!(r.kind(), ImageKind::Full);
        assert_eq!(r.section(SectionKind::Config), Some(&br#"{"vcpus":2}"#[..]));
        assert_eq!(r.section_version(SectionKind::Config), Some(3));
        assert_eq!(r.section(SectionKind::AppStatus), Some(&b""[..]));
        assert_eq!(
            r.section(SectionKind::VmState),
            Some(&br#"{"regs":[]}"#[..])
        );
        assert_eq!(r.section(SectionKind::Limits), None);
        assert_eq!(r.section(SectionKind::Memory), None);
        r.verify_memory().unwrap();
        assert_eq!(r.file_len(), c.file_len);

        let map = r.memory_map();
        assert_eq!(map.len(), 2);
        assert_eq!((map[0].guest_addr, map[0].len), (0, 256 * PAGE_SIZE));
        assert_eq!((map[1].guest_addr, map[1].len), (1 << 32, 64 * MIB));
        assert_eq!(map[1].present, runs);
        assert_eq!(map[0].present_pages(), 256 - 86);
        for m in map {
            assert_eq!(m.file_offset % PAGE_SIZE, 0);
            assert!(m.file_offset + m.len <= r.file_len());
        }
        // Every byte, read through the layout, equals the source: zeros in holes.
        for (m, src) in map.iter().zip([&low[..], &high[..]]) {
            let mut back = vec![0xffu8; m.len as usize];
            r.read_memory(m, 0, &mut back).unwrap();
            assert!(back == src, "region at {:#x} differs", m.guest_addr);
            let mut raw = vec![0xffu8; m.len as usize];
            r.file().read_exact_at(&mut raw, m.file_offset).unwrap();
            assert!(
                raw == src,
                "raw file bytes of region {:#x} differ",
                m.guest_addr
            );
        }
        // Sparse: 64 MiB of guest memory, a few pages on disk.
        let on_disk = r.bytes_on_disk().unwrap();
        assert!(r.file_len() > 64 * MIB);
        assert!(on_disk < 4 * MIB, "{on_disk} bytes allocated");
        assert_eq!(on_disk, fs::metadata(&c.path).unwrap().blocks() * 512);
        assert!(c.bytes_written < 2 * MIB);
    }

    #[test]
    fn boot_image_without_memory_round_trips() {
        let dir = TempDir::new("boot");
        let mut w = ImageWriter::create(dir.path(), ImageKind::Boot).unwrap();
        w.add_section(SectionKind::Config, 1, b"{}").unwrap();
        let c = w.commit().unwrap();
        let r = ImageReader::open(&c.path).unwrap();
        assert_eq!(r.kind(), ImageKind::Boot);
        assert!(r.memory_map().is_empty());
        r.verify_memory().unwrap();
        assert_eq!(c.file_len, u64::from(HEADER_LEN) + 2);
    }

    #[test]
    fn incremental_header_names_its_parent() {
        let dir = TempDir::new("incr");
        let parent = ImageId::generate();
        let mem = region(4, |p| p as u8);
        let c = write_image(
            dir.path(),
            ImageKind::Incremental { parent },
            "l",
            &mem,
            vec![run(1, 2)],
        );
        let r = ImageReader::open(&c.path).unwrap();
        assert_eq!(r.kind(), ImageKind::Incremental { parent });
        assert_eq!(r.kind().parent(), Some(parent));
        assert_eq!(r.header().merged_from, None);
    }

    #[test]
    fn truncation_at_every_section_boundary_names_the_section() {
        let dir = TempDir::new("trunc");
        let mem = region(64, |p| p as u8 + 1);
        let c = write_image(
            dir.path(),
            ImageKind::Full,
            "t",
            &mem,
            vec![run(0, 10), run(20, 5)],
        );
        let sections = sections_by_offset(&c.path);
        assert_eq!(sections.len(), 7);
        for (kind, e) in &sections {
            for cut in [e.offset, e.offset + e.length / 2, e.offset + e.length - 1] {
                let p = copy_to(&c.path, &dir, "cut.rimg");
                File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(cut)
                    .unwrap();
                match ImageReader::open(&p) {
                    Err(ReadError::Truncated {
                        section, file_len, ..
                    }) => {
                        assert_eq!(section, *kind, "cut at {cut}");
                        assert_eq!(file_len, cut);
                    }
                    other => panic!("cut at {cut} in {kind}: {other:?}"),
                }
            }
        }
        for cut in [0, 7] {
            let p = copy_to(&c.path, &dir, "cut.rimg");
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(cut)
                .unwrap();
            assert!(matches!(
                ImageReader::open(&p),
                Err(ReadError::NotAnImage { .. })
            ));
        }
        for cut in [8, 100, 4095] {
            let p = copy_to(&c.path, &dir, "cut.rimg");
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(cut)
                .unwrap();
            let err = ImageReader::open(&p).unwrap_err();
            assert!(matches!(err, ReadError::TruncatedHeader { .. }), "{err:?}");
            assert!(err.is_header());
        }
    }

    #[test]
    fn a_flipped_byte_in_each_section_names_the_section() {
        let dir = TempDir::new("flip");
        let mem = region(64, |p| p as u8 + 1);
        let c = write_image(
            dir.path(),
            ImageKind::Full,
            "f",
            &mem,
            vec![run(0, 10), run(20, 5)],
        );
        for (kind, e) in sections_by_offset(&c.path) {
            for at in [e.offset, e.offset + e.length / 2, e.offset + e.length - 1] {
                let p = copy_to(&c.path, &dir, "flip.rimg");
                if kind == SectionKind::Memory {
                    // Flip inside a present page (the first and last run).
                    let at = if at == e.offset + e.length / 2 {
                        e.offset + 22 * PAGE_SIZE + 7
                    } else if at == e.offset {
                        at
                    } else {
                        e.offset + 25 * PAGE_SIZE - 1
                    };
                    flip(&p, at);
                    let r = ImageReader::open(&p).unwrap();
                    let err = r.verify_memory().unwrap_err();
                    assert!(
                        matches!(
                            err,
                            ReadError::Checksum {
                                section: SectionKind::Memory,
                                ..
                            }
                        ),
                        "{err:?}"
                    );
                    assert!(err.to_string().contains("memory section"), "{err}");
                    continue;
                }
                flip(&p, at);
                let err = ImageReader::open(&p).unwrap_err();
                match &err {
                    ReadError::Checksum { section, .. } => assert_eq!(*section, kind),
                    other => panic!("flip at {at} in {kind}: {other:?}"),
                }
                assert_eq!(err.section(), Some(kind));
                let msg = err.to_string();
                assert!(
                    msg.contains(&format!("{kind} section")) && msg.contains("flip.rimg"),
                    "{msg}"
                );
            }
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_in_the_header_is_caught() {
        let dir = TempDir::new("hdr");
        let mem = region(4, |p| p as u8 + 1);
        let c = write_image(dir.path(), ImageKind::Full, "h", &mem, vec![run(0, 4)]);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&c.path)
            .unwrap();
        for at in 0..u64::from(HEADER_LEN) {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
            let err = ImageReader::open(&c.path).unwrap_err();
            let ok = match at {
                0..8 => matches!(err, ReadError::NotAnImage { .. }),
                12..16 => matches!(
                    err,
                    ReadError::CorruptHeader { .. } | ReadError::TruncatedHeader { .. }
                ),
                _ => matches!(err, ReadError::HeaderChecksum { .. }),
            };
            assert!(ok && err.is_header(), "flip at {at}: {err:?}");
            f.write_all_at(&b, at).unwrap();
        }
        ImageReader::open(&c.path).unwrap();
    }

    #[test]
    fn a_newer_format_is_refused_with_an_upgrade_message() {
        let dir = TempDir::new("newer");
        let mem = region(4, |_| 1);
        let c = write_image(dir.path(), ImageKind::Full, "n", &mem, vec![run(0, 4)]);
        rewrite_header(&c.path, |h| h.format_version = FORMAT_VERSION + 1);
        let err = ImageReader::open(&c.path).unwrap_err();
        assert!(
            matches!(
                err,
                ReadError::NewerVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("upgrade relive"), "{err}");

        let c = write_image(dir.path(), ImageKind::Full, "n", &mem, vec![run(0, 4)]);
        rewrite_header(&c.path, |h| {
            h.sections
                .iter_mut()
                .find(|e| e.code == SectionKind::MemoryMap.code())
                .unwrap()
                .version = 2;
        });
        let err = ImageReader::open(&c.path).unwrap_err();
        assert!(
            matches!(
                err,
                ReadError::NewerSection {
                    section: SectionKind::MemoryMap,
                    found: 2,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_sections_are_skipped_only_when_optional() {
        let dir = TempDir::new("unknown");
        for (flags, ok) in [(SECTION_OPTIONAL, true), (0, false)] {
            let mut w = ImageWriter::create(dir.path(), ImageKind::Boot).unwrap();
            w.add_section(SectionKind::Config, 1, b"{}").unwrap();
            w.push_section(99, 1, flags, b"future").unwrap();
            let c = w.commit().unwrap();
            match ImageReader::open(&c.path) {
                Ok(r) => {
                    assert!(ok);
                    assert_eq!(r.section(SectionKind::Config), Some(&b"{}"[..]));
                    assert_eq!(r.header().sections.len(), 2);
                    assert!(r.header().to_string().contains("unknown(99)"));
                }
                Err(err) => {
                    assert!(!ok);
                    assert!(
                        matches!(err, ReadError::UnknownSection { code: 99, .. }),
                        "{err:?}"
                    );
                    assert!(err.to_string().contains("upgrade relive"));
                }
            }
        }
    }

    #[test]
    fn impossible_tables_are_errors_not_panics() {
        let dir = TempDir::new("table");
        let mem = region(8, |p| p as u8 + 1);
        let base = write_image(dir.path(), ImageKind::Full, "x", &mem, vec![run(0, 8)]);
        fn entry(h: &mut Header, k: SectionKind) -> &mut SectionEntry {
            h.sections.iter_mut().find(|e| e.code == k.code()).unwrap()
        }
        type Edit = Box<dyn Fn(&mut Header)>;
        type Expect = fn(&ReadError) -> bool;
        let cases: Vec<(Edit, Expect)> = vec![
            (
                Box::new(move |h| entry(h, SectionKind::Config).length = SECTION_SIZE_LIMIT + 1),
                |e| {
                    matches!(
                        e,
                        ReadError::SectionTooLarge {
                            section: SectionKind::Config,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(move |h| entry(h, SectionKind::Limits).offset = u64::MAX - 2),
                |e| {
                    matches!(
                        e,
                        ReadError::Truncated {
                            section: SectionKind::Limits,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(move |h| entry(h, SectionKind::Limits).offset = 100),
                |e| {
                    matches!(
                        e,
                        ReadError::CorruptSection {
                            section: SectionKind::Limits,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(move |h| {
                    let o = entry(h, SectionKind::Config).offset;
                    entry(h, SectionKind::Limits).offset = o + 1;
                }),
                |e| {
                    matches!(
                        e,
                        ReadError::CorruptSection {
                            section: SectionKind::Limits,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(move |h| entry(h, SectionKind::Memory).offset -= 8),
                |e| {
                    matches!(
                        e,
                        ReadError::CorruptSection {
                            section: SectionKind::Memory,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(move |h| {
                    h.sections
                        .retain(|e| e.code != SectionKind::MemoryMap.code())
                }),
                |e| {
                    matches!(
                        e,
                        ReadError::MissingSection {
                            section: SectionKind::MemoryMap,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(move |h| {
                    h.sections
                        .retain(|e| !SectionKind::from_code(e.code).unwrap().is_memory())
                }),
                |e| {
                    matches!(
                        e,
                        ReadError::MissingSection {
                            section: SectionKind::Memory,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(move |h| {
                    let dup = *entry(h, SectionKind::Config);
                    h.sections.push(dup);
                }),
                |e| {
                    matches!(
                        e,
                        ReadError::CorruptSection {
                            section: SectionKind::Config,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(move |h| entry(h, SectionKind::Memory).length -= PAGE_SIZE),
                |e| {
                    matches!(
                        e,
                        ReadError::CorruptSection {
                            section: SectionKind::MemoryMap,
                            ..
                        }
                    )
                },
            ),
        ];
        for (i, (edit, expected)) in cases.into_iter().enumerate() {
            let p = copy_to(&base.path, &dir, "table.rimg");
            rewrite_header(&p, edit);
            let err = ImageReader::open(&p).unwrap_err();
            assert!(expected(&err), "case {i}: {err:?}");
        }
    }

    #[test]
    fn a_memory_map_that_lies_is_corrupt() {
        // Valid checksums over an impossible map: each must be refused.
        let mem = region(8, |p| p as u8 + 1);
        let good = encode_memory_map(&[(
            RegionPlan {
                guest_addr: 0,
                len: 8 * PAGE_SIZE,
                present: vec![run(0, 2), run(4, 4)],
            },
            0,
        )]);
        assert!(decode_memory_map(&good, 4096, mem.len() as u64).is_ok());
        let mut bad_cases = Vec::new();
        let mut b = good.clone();
        b[1] = 0; // page size
        bad_cases.push(b);
        bad_cases.push(good[..good.len() - 1].to_vec());
        let mut b = good.clone();
        b.push(0);
        bad_cases.push(b);
        let mut b = good.clone();
        b[4] = 200; // region count
        bad_cases.push(b);
        let mut b = good.clone();
        b[8 + 24] = 0xff; // run count
        bad_cases.push(b);
        let mut b = good.clone();
        b[8 + 32] = 3; // first run 3+2 now overlaps the second (4+4)
        bad_cases.push(b);
        let mut b = good.clone();
        b[8 + 32 + 24] = 5; // second run's count goes beyond the region
        bad_cases.push(b);
        let mut b = good.clone();
        b[8 + 32 + 8] = 0; // zero-length run
        bad_cases.push(b);
        let mut b = good.clone();
        b[8 + 8] = 1; // region length not page-aligned
        bad_cases.push(b);
        for (i, b) in bad_cases.iter().enumerate() {
            assert!(
                decode_memory_map(b, 4096, mem.len() as u64).is_err(),
                "case {i}"
            );
        }
        assert!(decode_memory_map(&good, 4096, mem.len() as u64 - PAGE_SIZE).is_err());
    }

    #[test]
    fn dropping_an_uncommitted_writer_removes_its_temp_file() {
        let dir = TempDir::new("drop");
        let mut w = ImageWriter::create(dir.path(), ImageKind::Full).unwrap();
        w.add_section(SectionKind::Config, 1, b"{}").unwrap();
        let tmp = w.temp_path().to_owned();
        assert!(tmp
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(TEMP_PREFIX));
        assert!(tmp.exists());
        assert!(!temp_is_stale(&tmp), "a live writer's file is not stale");
        drop(w);
        assert!(!tmp.exists());
        assert!(dir.names().is_empty());
    }

    #[test]
    fn misuse_abandons_the_image_and_removes_the_temp_file() {
        let dir = TempDir::new("misuse");
        let mem = region(4, |_| 1);
        type Attempt<'a> = Box<dyn Fn(&mut ImageWriter) -> Result<(), WriteError> + 'a>;
        let attempts: Vec<Attempt<'_>> = vec![
            Box::new(|w| {
                w.add_section(SectionKind::Config, 1, b"a")?;
                w.add_section(SectionKind::Config, 1, b"b")
            }),
            Box::new(|w| w.add_section(SectionKind::Memory, 1, b"")),
            Box::new(|w| {
                let big = vec![0u8; (SECTION_SIZE_LIMIT + 1) as usize];
                w.add_section(SectionKind::DeviceState, 1, &big)
            }),
            Box::new(|w| {
                w.add_memory(&[MemoryRegionSource {
                    guest_addr: 0,
                    bytes: &mem[..100],
                    present: vec![],
                }])
            }),
            Box::new(|w| {
                w.add_memory(&[MemoryRegionSource {
                    guest_addr: 0,
                    bytes: &mem,
                    present: vec![run(2, 1), run(1, 1)],
                }])
            }),
            Box::new(|w| {
                w.add_memory(&[MemoryRegionSource {
                    guest_addr: 0,
                    bytes: &mem,
                    present: vec![run(3, 2)],
                }])
            }),
            Box::new(|w| {
                let r = MemoryRegionSource {
                    guest_addr: 0,
                    bytes: &mem,
                    present: vec![],
                };
                w.add_memory(&[r.clone(), r])
            }),
            Box::new(|w| {
                let r = MemoryRegionSource {
                    guest_addr: 0,
                    bytes: &mem,
                    present: vec![],
                };
                w.add_memory(std::slice::from_ref(&r))?;
                w.add_memory(&[r])
            }),
        ];
        for (i, attempt) in attempts.iter().enumerate() {
            let mut w = ImageWriter::create(dir.path(), ImageKind::Full).unwrap();
            let tmp = w.temp_path().to_owned();
            let err = attempt(&mut w).unwrap_err();
            assert!(
                matches!(
                    err,
                    WriteError::Invalid { .. } | WriteError::SectionTooLarge { .. }
                ),
                "case {i}: {err:?}"
            );
            assert!(err.to_string().contains(&*tmp.to_string_lossy()), "{err}");
            assert!(!tmp.exists(), "case {i}: temp file left");
            let again = w.add_section(SectionKind::Limits, 1, b"{}").unwrap_err();
            assert!(matches!(again, WriteError::Abandoned { .. }), "{again:?}");
        }
        // A consistency image without memory cannot be committed.
        let w = ImageWriter::create(dir.path(), ImageKind::Full).unwrap();
        let err = w.commit().unwrap_err();
        assert!(err.to_string().contains("needs guest memory"), "{err}");
        assert!(dir.names().is_empty());
    }

    #[test]
    fn a_failed_commit_names_the_file_and_leaves_nothing() {
        let dir = TempDir::new("commitfail");
        let keep = write_image(
            dir.path(),
            ImageKind::Boot,
            "k",
            &region(1, |_| 9),
            vec![run(0, 1)],
        );
        let mut w = ImageWriter::create(dir.path(), ImageKind::Boot).unwrap();
        w.add_section(SectionKind::Config, 1, b"{}").unwrap();
        let tmp = w.temp_path().to_owned();
        fs::remove_file(&tmp).unwrap(); // as if someone deleted it mid-write
        let err = w.commit().unwrap_err();
        match &err {
            WriteError::Io { path, what, .. } => {
                assert_eq!(path, &tmp);
                assert_eq!(what, "rename");
            }
            other => panic!("{other:?}"),
        }
        assert!(std::error::Error::source(&err).is_some());
        let name = keep.path.file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(dir.names(), vec![name]);
        ImageReader::open(&keep.path).unwrap();
    }

    #[test]
    fn write_errors_name_the_file_and_the_part() {
        // /dev/full fails every write with ENOSPC, like a full disk.
        let Ok(full) = OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let dir = TempDir::new("enospc");
        let mut w = ImageWriter::create(dir.path(), ImageKind::Full).unwrap();
        let tmp = w.temp_path().to_owned();
        w.file = Some(full);
        let err = w.add_section(SectionKind::VmState, 1, b"{}").unwrap_err();
        match &err {
            WriteError::Io { path, what, source } => {
                assert_eq!(path, &tmp);
                assert_eq!(what, "section vm-state");
                assert_eq!(source.raw_os_error(), Some(28));
            }
            other => panic!("{other:?}"),
        }
        assert!(!tmp.exists());
        assert!(dir.names().is_empty());
    }

    #[test]
    fn page_run_helpers() {
        assert_eq!(PageRun::all(0), vec![]);
        assert_eq!(PageRun::all(3 * PAGE_SIZE), vec![run(0, 3)]);
        let bitmap = [0b1011_0000_0000_0111u64, 1 << 63, 0b11];
        assert_eq!(
            PageRun::from_bitmap(&bitmap, 130),
            vec![run(0, 3), run(12, 2), run(15, 1), run(127, 3)]
        );
        assert_eq!(
            PageRun::from_bitmap(&bitmap, 128),
            vec![run(0, 3), run(12, 2), run(15, 1), run(127, 1)]
        );
        let mut mem = region(6, |p| u8::from(p == 1 || p == 2 || p == 5));
        assert_eq!(PageRun::nonzero(&mem), vec![run(1, 2), run(5, 1)]);
        mem[4 * PAGE_SIZE as usize + 4095] = 1;
        assert_eq!(PageRun::nonzero(&mem), vec![run(1, 2), run(4, 2)]);
    }

    #[test]
    fn ids_print_and_parse_as_32_hex_digits() {
        let a = ImageId::generate();
        let b = ImageId::generate();
        assert_ne!(a, b);
        assert!(!a.is_zero());
        let text = a.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<ImageId>().unwrap(), a);
        assert_eq!(&text[12..13], "7", "UUIDv7 layout");
        assert!("xyz".parse::<ImageId>().is_err());
        assert!("zz".repeat(16).parse::<ImageId>().is_err());
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, format!("\"{a}\""));
        assert_eq!(serde_json::from_str::<ImageId>(&json).unwrap(), a);
    }

    #[test]
    fn header_display_shows_kind_time_and_table() {
        let dir = TempDir::new("display");
        let c = write_image(
            dir.path(),
            ImageKind::Full,
            "d",
            &region(2, |_| 1),
            vec![run(0, 2)],
        );
        let h = ImageReader::read_header(&c.path).unwrap();
        let text = h.to_string();
        for needle in [
            "image     ",
            "kind      full",
            "memory-map",
            "vm-state",
            "crc32c",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        assert!(text.contains(&c.id.to_string()));
        assert_eq!(UtcTime(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            UtcTime(951_782_400_123).to_string(),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            UtcTime(1_767_225_599_999).to_string(),
            "2025-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn checksums_are_crc32c_as_format_md_says() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(MAX_SECTIONS, 125);
        assert_eq!(OFF_TABLE + MAX_SECTIONS * ENTRY_LEN, 4088);
    }

    #[test]
    fn created_times_increase_within_a_process() {
        let a = next_created_ms();
        let b = next_created_ms();
        assert!(b > a);
    }
}
