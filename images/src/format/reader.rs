//! [`ImageReader`]: header and section checks, lazy sections, memory regions for mapping.

use super::*;

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
