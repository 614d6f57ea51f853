//! What a failover image holds for a VM, and the bridge to the image format.
//!
//! The image format itself (header, sections, checksums, atomic commit) lives
//! in `relive-images`, which knows nothing of KVM. This module decides what
//! goes into each section:
//!
//! | section       | contents (JSON unless noted)                                  |
//! |---------------|----------------------------------------------------------------|
//! | `Config`      | [`ImageConfig`]: vCPUs, memory, kernel, cmdline                |
//! | `Limits`      | [`ResourceLimits`]: cgroup limits to re-apply on restore       |
//! | `VmState`     | [`MachineState`]: VM-wide KVM state and every vCPU's state     |
//! | `DeviceState` | [`DeviceState`]: UARTs, agent framing, pending input, pvpanic  |
//! | `AppStatus`   | [`AppStatus`]: what the guest last said on the agent channel   |
//! | `MemoryMap` + `Memory` | guest RAM, sparse: only pages the guest touched (binary) |
//!
//! Which pages are written ([`candidate_runs`]): a full image holds the pages
//! resident in the VMM (mincore), those of the image the VM was restored
//! from, and those the dirty log reports, so untouched memory costs neither
//! disk nor time; a layer holds the dirty pages. Images are written live
//! (`vm/live.rs`). Restore maps each memory region of the image file privately
//! (copy-on-write), so it does not read guest memory at all up front: its
//! latency does not grow with the VM's memory size.

use std::fs::File;
use std::path::{Path, PathBuf};

pub use relive_control::{AppStatus, ResourceLimits};
use relive_images::format::{ImageKind, ImageReader, ImageWriter, PageRun, SectionKind};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::pvpanic::PvPanicSnapshot;
use crate::devices::serial::SerialSnapshot;
use crate::memory::GuestMemoryMmap;
use crate::persist::{VcpuState, VmState};
use crate::vcpu::Paused;

/// Version of each JSON section this build writes.
pub const SECTION_VERSION: u32 = 1;
const PAGE: usize = 4096;

/// The VM's configuration, as recorded in an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Kernel (`bundled` or a path).
    pub kernel: String,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// The relive version that wrote the image.
    pub relive_version: String,
    /// The VM's name (its cgroup is `relive/<name>`), when it has one.
    #[serde(default)]
    pub name: Option<String>,
}

/// KVM state of the whole machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// VM-wide state.
    pub vm: VmState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
}

/// State of the devices and of the host side of the agent channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// COM1.
    pub com1: SerialSnapshot,
    /// COM2.
    pub com2: SerialSnapshot,
    /// A guest line on COM2 not yet complete.
    pub agent_partial_line: String,
    /// Host-to-guest bytes not yet in the COM2 FIFO.
    pub agent_pending_input: Vec<u8>,
    /// pvpanic.
    pub pvpanic: PvPanicSnapshot,
}

/// Errors while writing or reading an image of a VM.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Writing the image failed.
    #[error("cannot write the image")]
    Write(#[source] relive_images::format::WriteError),
    /// Reading the image failed.
    #[error("cannot read image {path}")]
    Read {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: relive_images::format::ReadError,
    },
    /// A section is missing.
    #[error("image {path} has no {section:?} section")]
    MissingSection {
        /// The image.
        path: PathBuf,
        /// Which.
        section: SectionKind,
    },
    /// A section is not what this build understands.
    #[error("image {path}: {section:?} section cannot be decoded: {reason}")]
    Decode {
        /// The image.
        path: PathBuf,
        /// Which.
        section: SectionKind,
        /// Why.
        reason: String,
    },
    /// Encoding state failed.
    #[error("cannot encode the {section:?} section")]
    Encode {
        /// Which.
        section: SectionKind,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The image, or one of its chain, may be written by others.
    #[error("refusing to restore")]
    Untrusted(#[source] relive_images::private::RestoreCheckError),
    /// A layer could not be merged into a full image.
    #[error("cannot merge layer {path} with its chain: {reason}")]
    Merge {
        /// The layer.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Guest memory could not be mapped from the image.
    #[error("cannot map guest memory from image {path}: {reason}")]
    Map {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Everything decoded from an image, ready to build a VM from.
pub struct LoadedImage {
    /// The open image.
    pub reader: ImageReader,
    /// Its config.
    pub config: ImageConfig,
    /// Its limits.
    pub limits: ResourceLimits,
    /// KVM state.
    pub machine: MachineState,
    /// Devices.
    pub devices: DeviceState,
    /// Last application status.
    pub app: AppStatus,
    /// For a layer: its chain below it, the full image first, then the
    /// layers before it, oldest first. Empty for a full image.
    pub chain: Vec<ImageReader>,
}

/// At most this many page runs are mapped over a layer's base; a chain with
/// more (scattered pages in several layers) is merged first instead, so a
/// restore never nears the kernel's limit on mappings (`vm.max_map_count`).
pub const MAX_OVERLAY_RUNS: usize = 16_384;

impl LoadedImage {
    /// The image whose memory is mapped first: the chain's full image.
    pub fn base(&self) -> &ImageReader {
        self.chain.first().unwrap_or(&self.reader)
    }

    /// The layers mapped over the base, oldest first (`reader` last when it
    /// is a layer).
    pub fn overlays(&self) -> impl Iterator<Item = &ImageReader> {
        self.chain
            .iter()
            .skip(1)
            .chain((!self.chain.is_empty()).then_some(&self.reader))
    }

    /// Per region, every page present in the base or a layer.
    pub fn present(&self) -> Vec<Vec<PageRun>> {
        let mut out: Vec<Vec<PageRun>> = self
            .base()
            .memory_map()
            .iter()
            .map(|m| m.present.clone())
            .collect();
        for layer in self.overlays() {
            for (i, m) in layer.memory_map().iter().enumerate() {
                if let Some(runs) = out.get_mut(i) {
                    *runs = union_runs(runs, &m.present);
                }
            }
        }
        out
    }
}

/// The state sections of an image ([`add_sections`]).
pub struct ImageParts<'a> {
    /// Config.
    pub config: &'a ImageConfig,
    /// Limits.
    pub limits: &'a ResourceLimits,
    /// KVM state.
    pub machine: &'a MachineState,
    /// Devices.
    pub devices: &'a DeviceState,
    /// Application status.
    pub app: &'a AppStatus,
}

fn json<T: Serialize>(section: SectionKind, value: &T) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec(value).map_err(|source| SnapshotError::Encode { section, source })
}

/// Sorted, coalesced union of page runs.
pub fn union_runs(a: &[PageRun], b: &[PageRun]) -> Vec<PageRun> {
    let mut all: Vec<PageRun> = a.iter().chain(b.iter()).copied().collect();
    all.sort_by_key(|r| r.first_page);
    let mut out: Vec<PageRun> = Vec::with_capacity(all.len());
    for run in all {
        match out.last_mut() {
            Some(last) if run.first_page <= last.first_page + last.count => {
                let end = (last.first_page + last.count).max(run.first_page + run.count);
                last.count = end - last.first_page;
            }
            _ => out.push(run),
        }
    }
    out
}

/// The pages a full image of `mem` must hold, per region: those resident
/// in this process (mincore), those `known` (the pages of the image the VM
/// was restored from, which may not be resident), and those `dirty`. Zero
/// pages are not left out: a live checkpoint copies while the guest runs.
pub fn candidate_runs(
    mem: &GuestMemoryMmap,
    known: &[Vec<PageRun>],
    dirty: &[Vec<PageRun>],
) -> Vec<Vec<PageRun>> {
    // SAFETY: only the mapping's address and length are used (mincore);
    // no guest byte is read.
    let regions = unsafe { region_slices(mem) };
    regions
        .iter()
        .enumerate()
        .map(|(i, (_, bytes))| {
            let resident = resident_runs(bytes);
            let with_known = union_runs(&resident, known.get(i).map_or(&[][..], Vec::as_slice));
            union_runs(&with_known, dirty.get(i).map_or(&[][..], Vec::as_slice))
        })
        .collect()
}

/// The pages of `bytes` resident in this process (all of them when
/// mincore(2) fails).
fn resident_runs(bytes: &[u8]) -> Vec<PageRun> {
    let pages = bytes.len() / PAGE;
    let mut flags = vec![0u8; pages];
    // SAFETY: `bytes` is a live, page-aligned mapping of `pages` pages (a guest
    // memory region); `flags` has one byte per page as mincore(2) requires.
    let rc = unsafe { libc::mincore(bytes.as_ptr() as *mut _, pages * PAGE, flags.as_mut_ptr()) };
    if rc != 0 {
        flags.fill(1);
    }
    let mut runs: Vec<PageRun> = Vec::new();
    for (page, flag) in flags.iter().enumerate() {
        if flag & 1 == 0 {
            continue;
        }
        match runs.last_mut() {
            Some(run) if run.first_page + run.count == page as u64 => run.count += 1,
            _ => runs.push(PageRun {
                first_page: page as u64,
                count: 1,
            }),
        }
    }
    runs
}

/// The bytes of each guest memory region.
///
/// # Safety
/// The caller must keep every vCPU paused while the returned slices live, so
/// that nothing writes guest memory concurrently.
unsafe fn region_slices(mem: &GuestMemoryMmap) -> Vec<(u64, &[u8])> {
    mem.iter()
        .map(|r| {
            // SAFETY: the region maps `len` bytes at `as_ptr()` for as long as
            // `mem` lives; the caller guarantees no concurrent writers.
            let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) };
            (r.start_addr().raw_value(), bytes)
        })
        .collect()
}

/// Guest pages copied out of a paused VM: per region its address, length and
/// runs, and all their bytes packed in `data` (region by region, run order).
#[derive(Debug, Default)]
pub struct PackedPages {
    /// (guest address, region length, present runs) per region.
    pub regions: Vec<(u64, u64, Vec<PageRun>)>,
    /// The pages' bytes.
    pub data: Vec<u8>,
}

/// Copies the pages of `runs` (per region) out of guest memory into `data`
/// (cleared first; pass the previous checkpoint's buffer to reuse its
/// memory), so the image can be written after the vCPUs resume. This is how
/// an incremental checkpoint keeps its pause short: one memcpy per run.
///
/// `paused` proves that no vCPU writes guest memory meanwhile.
pub fn copy_pages(
    paused: &Paused,
    mem: &GuestMemoryMmap,
    runs: Vec<Vec<PageRun>>,
    mut data: Vec<u8>,
) -> PackedPages {
    let _ = paused;
    // SAFETY: every vCPU is parked while `paused` lives (it outlives this
    // call) and the VMM's devices do no DMA: nothing writes guest memory.
    let regions = unsafe { region_slices(mem) };
    data.clear();
    let total: u64 = runs.iter().flatten().map(|r| r.count).sum();
    data.reserve((total as usize) * PAGE);
    let mut packed = Vec::with_capacity(regions.len());
    let mut runs = runs.into_iter();
    for (addr, bytes) in regions {
        let region_runs = runs.next().unwrap_or_default();
        for run in &region_runs {
            let start = (run.first_page as usize * PAGE).min(bytes.len());
            let end = ((run.first_page + run.count) as usize * PAGE).min(bytes.len());
            data.extend_from_slice(&bytes[start..end]);
        }
        packed.push((addr, bytes.len() as u64, region_runs));
    }
    PackedPages {
        regions: packed,
        data,
    }
}

pub fn add_sections(writer: &mut ImageWriter, parts: &ImageParts<'_>) -> Result<(), SnapshotError> {
    let sections = [
        (
            SectionKind::Config,
            json(SectionKind::Config, parts.config)?,
        ),
        (
            SectionKind::Limits,
            json(SectionKind::Limits, parts.limits)?,
        ),
        (
            SectionKind::VmState,
            json(SectionKind::VmState, parts.machine)?,
        ),
        (
            SectionKind::DeviceState,
            json(SectionKind::DeviceState, parts.devices)?,
        ),
        (
            SectionKind::AppStatus,
            json(SectionKind::AppStatus, parts.app)?,
        ),
    ];
    for (kind, payload) in &sections {
        writer
            .add_section(*kind, SECTION_VERSION, payload)
            .map_err(SnapshotError::Write)?;
    }
    Ok(())
}

fn section<T: for<'de> Deserialize<'de>>(
    reader: &ImageReader,
    path: &Path,
    kind: SectionKind,
) -> Result<T, SnapshotError> {
    let bytes = reader
        .section(kind)
        .ok_or_else(|| SnapshotError::MissingSection {
            path: path.to_path_buf(),
            section: kind,
        })?;
    serde_json::from_slice(bytes).map_err(|e| SnapshotError::Decode {
        path: path.to_path_buf(),
        section: kind,
        reason: e.to_string(),
    })
}

/// The full image to restore `path` from: `path` itself, or for an
/// incremental layer a new full image merged from its chain, written beside it.
pub fn resolve_full(path: &Path) -> Result<PathBuf, SnapshotError> {
    let read_err = |source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    };
    let header = ImageReader::read_header(path).map_err(read_err)?;
    if !matches!(header.kind, ImageKind::Incremental { .. }) {
        return Ok(path.to_path_buf());
    }
    let store = store_of(path)?;
    let layer = ImageReader::open(path).map_err(read_err)?;
    let merged = store.merge(&layer).map_err(|e| merge_error(path, &e))?;
    tracing::info!(layer = %path.display(), merged = %merged.path.display(), "restoring a layer through its merged image");
    Ok(merged.path)
}

/// The image store of the directory `image` lies in.
fn store_of(image: &Path) -> Result<relive_images::store::ImageStore, SnapshotError> {
    let dir = image.parent().unwrap_or(Path::new("."));
    relive_images::store::ImageStore::open(dir, usize::MAX).map_err(|e| merge_error(image, &e))
}

fn merge_error(image: &Path, e: &dyn std::fmt::Display) -> SnapshotError {
    SnapshotError::Merge {
        path: image.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A boot recipe: what a boot image without a snapshot holds.
pub struct BootRecipe {
    /// How to boot.
    pub config: ImageConfig,
    /// Limits to apply.
    pub limits: ResourceLimits,
}

/// The recipe of `path` when it is a boot image without a snapshot (no VM
/// state): restoring it means booting afresh. `None` for any other image.
pub fn load_recipe(path: &Path) -> Result<Option<BootRecipe>, SnapshotError> {
    let header = ImageReader::read_header(path).map_err(|source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if header.kind != ImageKind::Boot || header.section(SectionKind::VmState).is_some() {
        return Ok(None);
    }
    let reader = ImageReader::open(path).map_err(|source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    relive_images::private::refuse_writable_by_others(reader.file(), path)
        .map_err(SnapshotError::Untrusted)?;
    Ok(Some(BootRecipe {
        config: section(&reader, path, SectionKind::Config)?,
        limits: section(&reader, path, SectionKind::Limits)?,
    }))
}

/// The config and limits `path` was taken with (headers and two small
/// sections only): what a jailed VMM must know before it enters the jail.
pub fn load_config(path: &Path) -> Result<(ImageConfig, ResourceLimits), SnapshotError> {
    let reader = ImageReader::open(path).map_err(|source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((
        section(&reader, path, SectionKind::Config)?,
        section(&reader, path, SectionKind::Limits)?,
    ))
}

/// Opens an image and decodes everything but guest memory; for a layer,
/// opens its chain (headers only: no page is read, nothing is merged). A
/// chain whose layers hold more than [`MAX_OVERLAY_RUNS`] page runs is
/// merged into a full image first ([`resolve_full`]).
pub fn load(path: &Path) -> Result<LoadedImage, SnapshotError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Read { path, source }
    };
    let header = ImageReader::read_header(path).map_err(read_err(path))?;
    if let ImageKind::Incremental { .. } = header.kind {
        let paths = store_of(path)?
            .chain(path)
            .map_err(|e| merge_error(path, &e))?;
        let mut chain = Vec::with_capacity(paths.len());
        for p in &paths[..paths.len() - 1] {
            chain.push(ImageReader::open(p).map_err(read_err(p))?);
        }
        let reader = ImageReader::open(path).map_err(read_err(path))?;
        let runs: usize = chain
            .iter()
            .skip(1)
            .chain(std::iter::once(&reader))
            .flat_map(|r| r.memory_map().iter().map(|m| m.present.len()))
            .sum();
        if runs > MAX_OVERLAY_RUNS {
            tracing::info!(layer = %path.display(), runs, "too many page runs to map: merging the chain first");
            return load_one(&resolve_full(path)?);
        }
        return decode(reader, path, chain);
    }
    load_one(path)
}

fn load_one(path: &Path) -> Result<LoadedImage, SnapshotError> {
    let reader = ImageReader::open(path).map_err(|source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    decode(reader, path, Vec::new())
}

fn decode(
    reader: ImageReader,
    path: &Path,
    chain: Vec<ImageReader>,
) -> Result<LoadedImage, SnapshotError> {
    // One fstat per file: what another user can write, another user can
    // make the guest run.
    for r in chain.iter().chain(std::iter::once(&reader)) {
        relive_images::private::refuse_writable_by_others(r.file(), r.path())
            .map_err(SnapshotError::Untrusted)?;
    }
    Ok(LoadedImage {
        config: section(&reader, path, SectionKind::Config)?,
        limits: section(&reader, path, SectionKind::Limits)?,
        machine: section(&reader, path, SectionKind::VmState)?,
        devices: section(&reader, path, SectionKind::DeviceState)?,
        app: section(&reader, path, SectionKind::AppStatus)?,
        reader,
        chain,
    })
}

/// Maps guest memory from the image: one private, copy-on-write file mapping
/// per region of its base, then, for a layer, each present run of each layer
/// over it ([`overlay`]). Nothing is read until the guest touches it.
pub fn map_memory(image: &LoadedImage) -> Result<GuestMemoryMmap, SnapshotError> {
    let mem = map_base(image)?;
    overlay(&mem, image)?;
    Ok(mem)
}

/// Maps each layer's present pages over `mem` (already holding the base),
/// oldest layer first: private, copy-on-write, nothing read.
pub fn overlay(mem: &GuestMemoryMmap, image: &LoadedImage) -> Result<(), SnapshotError> {
    for layer in image.overlays() {
        let layouts: Vec<(u64, u64, u64, &[PageRun])> = layer
            .memory_map()
            .iter()
            .map(|m| (m.guest_addr, m.len, m.file_offset, m.present.as_slice()))
            .collect();
        crate::memory::map_runs_over(mem, layer.file(), &layouts).map_err(|e| {
            SnapshotError::Map {
                path: layer.path().to_path_buf(),
                reason: e.to_string(),
            }
        })?;
    }
    Ok(())
}

fn map_base(image: &LoadedImage) -> Result<GuestMemoryMmap, SnapshotError> {
    let base = image.base();
    let path = base.path().to_path_buf();
    let map_err = |reason: String| SnapshotError::Map {
        path: path.clone(),
        reason,
    };
    let mut regions = Vec::new();
    for layout in base.memory_map() {
        let file: File = base
            .file()
            .try_clone()
            .map_err(|e| map_err(format!("cannot duplicate the image fd: {e}")))?;
        let mmap = vm_memory::mmap::MmapRegionBuilder::new(layout.len as usize)
            .with_file_offset(vm_memory::FileOffset::new(file, layout.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        let region = vm_memory::GuestRegionMmap::new(mmap, GuestAddress(layout.guest_addr))
            .ok_or_else(|| map_err("region overflows the address space".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_coalesces_overlaps_and_neighbours() {
        let r = |first_page, count| PageRun { first_page, count };
        let got = union_runs(&[r(0, 2), r(10, 1)], &[r(1, 3), r(11, 2), r(20, 1)]);
        assert_eq!(got, vec![r(0, 4), r(10, 3), r(20, 1)]);
    }
}
