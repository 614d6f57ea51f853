//! How guest memory is described: present-page runs, the regions a writer is given, and the memory map section.

use super::*;

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

pub(super) fn encode_memory_map(regions: &[(RegionPlan, u64)]) -> Vec<u8> {
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
pub(super) fn decode_memory_map(
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
