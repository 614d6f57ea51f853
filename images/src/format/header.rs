//! The fixed header: its fields, the section table, encoding and decoding, and the `inspect` view.

use super::*;

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

    pub(super) fn end(&self) -> Option<u64> {
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

    pub(super) fn encode(&self) -> Vec<u8> {
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
    pub(super) fn read(file: &File, file_len: u64, path: &Path) -> Result<Header, ReadError> {
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

/// Unix milliseconds shown as an RFC 3339 UTC time (by `humantime`).
pub(crate) struct UtcTime(pub u64);

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(self.0);
        write!(f, "{}", humantime::format_rfc3339_millis(at))
    }
}
