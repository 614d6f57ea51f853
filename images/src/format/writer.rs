//! [`ImageWriter`]: sections, sparse memory, atomic durable commit; temporary files and their cleanup.

use super::*;

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

/// Memory written by page, in any order and any number of times.
#[derive(Debug)]
struct PagePlan {
    offset: u64,
    len: u64,
    /// (guest address, length, offset in the section) per region.
    regions: Vec<(u64, u64, u64)>,
    /// Per region, the CRC-32C of each page as last written.
    crcs: Vec<Vec<u32>>,
    /// Per region, one bit per page: written at least once.
    written: Vec<Vec<u64>>,
}

#[derive(Debug)]
enum MemoryState {
    None,
    Writing(MemoryPlan),
    Pages(PagePlan),
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
    pub(super) file: Option<File>,
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
        let file = match crate::private::open_options()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
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

    /// Starts guest memory that is written page by page, in any order and
    /// any number of times: the way a live checkpoint copies it, while the
    /// guest runs and then again for the pages it wrote meanwhile. Each page
    /// has its fixed place in the file (holes read as zero), so the last
    /// write of a page is what the image holds. `regions` are (guest
    /// address, length); [`finish_pages`](Self::finish_pages) makes every
    /// page written present and settles the checksum.
    pub fn begin_pages(&mut self, regions: &[(u64, u64)]) -> Result<(), WriteError> {
        let plans = regions
            .iter()
            .map(|&(guest_addr, len)| RegionPlan {
                guest_addr,
                len,
                present: Vec::new(),
            })
            .collect();
        self.begin_memory(plans)?;
        let MemoryState::Writing(plan) = std::mem::replace(&mut self.memory, MemoryState::None)
        else {
            return Err(self.invalid("memory plan missing".into()));
        };
        let pages = |len: u64| (len / PAGE_SIZE) as usize;
        self.memory = MemoryState::Pages(PagePlan {
            offset: plan.offset,
            len: plan.len,
            crcs: plan
                .regions
                .iter()
                .map(|(r, _)| vec![0; pages(r.len)])
                .collect(),
            written: plan
                .regions
                .iter()
                .map(|(r, _)| vec![0; pages(r.len).div_ceil(64)])
                .collect(),
            regions: plan
                .regions
                .into_iter()
                .map(|(r, rel)| (r.guest_addr, r.len, rel))
                .collect(),
        });
        Ok(())
    }

    /// Writes whole pages of `region` from `first_page` on (see
    /// [`begin_pages`](Self::begin_pages)); a page written before is replaced.
    pub fn write_pages(
        &mut self,
        region: usize,
        first_page: u64,
        bytes: &[u8],
    ) -> Result<(), WriteError> {
        self.usable()?;
        let MemoryState::Pages(plan) = &mut self.memory else {
            return Err(self.invalid("pages written outside begin_pages".into()));
        };
        let Some(&(guest_addr, len, rel)) = plan.regions.get(region) else {
            return Err(self.invalid(format!("no memory region {region}")));
        };
        let count = bytes.len() as u64 / PAGE_SIZE;
        if bytes.len() as u64 % PAGE_SIZE != 0
            || first_page
                .checked_add(count)
                .is_none_or(|end| end * PAGE_SIZE > len)
        {
            return Err(self.invalid(format!(
                "pages {first_page}+{count} of region {region}: not whole pages inside it"
            )));
        }
        for (i, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
            let p = first_page as usize + i;
            plan.crcs[region][p] = crc32c::crc32c(page);
            plan.written[region][p / 64] |= 1 << (p % 64);
        }
        let pos = plan.offset + rel + first_page * PAGE_SIZE;
        let guest = guest_addr + first_page * PAGE_SIZE;
        self.write_at(bytes, pos, || {
            format!("guest memory at {guest:#x} ({count} pages)")
        })
    }

    /// Ends page-by-page memory: every page written is present, and the
    /// section's checksum is that of the present pages in order (combined
    /// from the pages' own, no page is read again).
    pub fn finish_pages(&mut self) -> Result<(), WriteError> {
        self.usable()?;
        let MemoryState::Pages(plan) = std::mem::replace(&mut self.memory, MemoryState::None)
        else {
            return Err(self.invalid("finish_pages without begin_pages".into()));
        };
        let mut crc = 0u32;
        let mut regions = Vec::with_capacity(plan.regions.len());
        for (ri, &(guest_addr, len, rel)) in plan.regions.iter().enumerate() {
            let mut present: Vec<PageRun> = Vec::new();
            for p in 0..(len / PAGE_SIZE) as usize {
                if plan.written[ri][p / 64] & (1 << (p % 64)) == 0 {
                    continue;
                }
                crc = crc32c::crc32c_combine(crc, plan.crcs[ri][p], PAGE_SIZE as usize);
                match present.last_mut() {
                    Some(run) if run.end() == p as u64 => run.count += 1,
                    _ => present.push(PageRun {
                        first_page: p as u64,
                        count: 1,
                    }),
                }
            }
            regions.push((
                RegionPlan {
                    guest_addr,
                    len,
                    present,
                },
                rel,
            ));
        }
        let map = encode_memory_map(&regions);
        self.header.sections.push(SectionEntry {
            code: SectionKind::Memory.code(),
            version: MEMORY_SECTION_VERSION,
            offset: plan.offset,
            length: plan.len,
            checksum: crc,
            flags: 0,
        });
        self.memory = MemoryState::Done;
        self.push_section(
            SectionKind::MemoryMap.code(),
            MEMORY_SECTION_VERSION,
            0,
            &map,
        )
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
            MemoryState::Writing(_) | MemoryState::Pages(_) => {
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

pub(super) fn next_created_ms() -> u64 {
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
