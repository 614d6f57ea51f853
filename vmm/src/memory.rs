//! Guest physical memory: layout, allocation and registration with KVM.
//!
//! Layout (x86_64, all addresses guest-physical):
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00   RAM (boot structures: GDT, page tables, zero page, cmdline)
//! 0x0009_fc00 .. 0x0010_0000   reserved (MP table in the EBDA, legacy BIOS area)
//! 0x0010_0000 .. low_end       RAM (kernel at 1 MiB, initrd at the top)
//! 0xc000_0000 .. 0x1_0000_0000 MMIO hole (LAPIC 0xfee0_0000, IOAPIC 0xfec0_0000)
//! 0x1_0000_0000 .. ...         RAM above 4 GiB, when the VM has more than 3 GiB
//! ```
//!
//! Guest memory is one anonymous private mapping per region (vm-memory's
//! `GuestMemoryMmap`); each region is one KVM memory slot, numbered from 0 in
//! address order.

use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The guest memory type used throughout the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// End of conventional memory usable by the guest (the EBDA starts here).
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of high memory (the kernel is loaded at or above this address).
pub const HIMEM_START: u64 = 0x10_0000;
/// Smallest guest memory we accept: room for boot structures and a kernel.
pub const MIN_MEM_MIB: u64 = 16;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is below the minimum.
    #[error("guest memory of {mib} MiB is too small: use --mem-mib {MIN_MEM_MIB} or more")]
    TooSmall {
        /// Requested size in MiB.
        mib: u64,
    },
    /// The requested size exceeds what the host has.
    #[error("guest memory of {mib} MiB exceeds the host's {host_mib} MiB of RAM: use a smaller --mem-mib")]
    TooLarge {
        /// Requested size in MiB.
        mib: u64,
        /// Host RAM in MiB.
        host_mib: u64,
    },
    /// The anonymous mapping could not be created.
    #[error("cannot allocate {mib} MiB of guest memory")]
    Allocate {
        /// Requested size in MiB.
        mib: u64,
        /// The mapping error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// An image's memory layout differs from this VM's.
    #[error("the image's memory regions {theirs} differ from this VM's {ours}")]
    LayoutMismatch {
        /// This VM's (address, length) regions.
        ours: String,
        /// The image's.
        theirs: String,
    },
    /// Mapping an image over guest memory failed.
    #[error("cannot map the image over guest memory at {addr:#x}")]
    MapOver {
        /// Guest address of the region.
        addr: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot}")]
    SetRegion {
        /// Slot number.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The (start, length) RAM ranges of a guest with `mem_bytes` of memory.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(HIGH_RAM_START),
                (mem_bytes - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// Total RAM of the host in bytes, from sysinfo(2).
pub fn host_ram_bytes() -> u64 {
    // SAFETY: `info` is a plain C struct that sysinfo(2) fills in; zeroed is a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct that outlives the call.
    let rc = unsafe { libc::sysinfo(&mut info) };
    if rc != 0 {
        return u64::MAX;
    }
    (info.totalram as u64).saturating_mul(u64::from(info.mem_unit))
}

/// Checks a requested guest memory size against the minimum and the host.
pub fn validate_size(mib: u64) -> Result<u64, MemoryError> {
    if mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall { mib });
    }
    let host_mib = host_ram_bytes() / MIB;
    if mib > host_mib {
        return Err(MemoryError::TooLarge { mib, host_mib });
    }
    Ok(mib * MIB)
}

/// Allocates anonymous guest memory of `mib` MiB laid out as [`ram_ranges`].
pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let bytes = validate_size(mib)?;
    GuestMemoryMmap::from_ranges(&ram_ranges(bytes))
        .map_err(|source| MemoryError::Allocate { mib, source })
}

/// Registers every region of `mem` as a KVM memory slot, in address order.
///
/// `flags` are the KVM memory region flags (e.g. `KVM_MEM_LOG_DIRTY_PAGES`).
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap, flags: u32) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let kvm_region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range [as_ptr, as_ptr + len) is a live mapping owned by
        // `mem`, which the VM keeps alive for as long as the slot is registered.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::SetRegion { slot, source })?;
    }
    Ok(())
}

/// Replaces guest memory with private (copy-on-write) mappings of `file`,
/// placed exactly over the existing regions, for a standby restore: the KVM
/// slots stay registered and KVM follows the new mapping through its MMU
/// notifiers, so no `KVM_SET_USER_MEMORY_REGION` (about 5 ms on nested KVM)
/// is on the restore path. `layouts` are (guest address, length, file offset)
/// and must match the regions one for one.
///
/// The caller must keep every vCPU out of `KVM_RUN` while the mappings change.
pub fn map_file_over(
    mem: &GuestMemoryMmap,
    file: &std::fs::File,
    layouts: &[(u64, u64, u64)],
) -> Result<(), MemoryError> {
    use std::os::fd::AsRawFd;
    let regions: Vec<_> = mem.iter().collect();
    let shape = |r: &&vm_memory::GuestRegionMmap<()>| (r.start_addr().raw_value(), r.len());
    let ours: Vec<(u64, u64)> = regions.iter().map(shape).collect();
    let theirs: Vec<(u64, u64)> = layouts.iter().map(|l| (l.0, l.1)).collect();
    if ours != theirs {
        return Err(MemoryError::LayoutMismatch {
            ours: format!("{ours:x?}"),
            theirs: format!("{theirs:x?}"),
        });
    }
    for (region, &(_, len, offset)) in regions.iter().zip(layouts) {
        // SAFETY: the target range [as_ptr, as_ptr + len) is exactly one of our
        // own guest memory mappings (checked above), so MAP_FIXED replaces
        // nothing else; no Rust reference into guest memory is alive across
        // this call (vCPUs are parked and devices only access it through
        // vm-memory's volatile accessors, which re-read the pointer's pages).
        let ptr = unsafe {
            libc::mmap(
                region.as_ptr().cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED || ptr.cast::<u8>() != region.as_ptr() {
            return Err(MemoryError::MapOver {
                addr: region.start_addr().raw_value(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Maps, for each region, the page runs `present` of `file` (at the
/// region's `file_offset`) over guest memory: one private, copy-on-write
/// MAP_FIXED mapping per run, so a layer's pages replace its base's where it
/// has them. `layouts` are (guest address, length, file offset, runs) and
/// must match the regions one for one.
///
/// The caller must keep every vCPU out of `KVM_RUN` while the mappings change.
pub fn map_runs_over(
    mem: &GuestMemoryMmap,
    file: &std::fs::File,
    layouts: &[(u64, u64, u64, &[relive_images::format::PageRun])],
) -> Result<(), MemoryError> {
    use std::os::fd::AsRawFd;
    let regions: Vec<_> = mem.iter().collect();
    let ours: Vec<(u64, u64)> = regions
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect();
    let theirs: Vec<(u64, u64)> = layouts.iter().map(|l| (l.0, l.1)).collect();
    if ours != theirs {
        return Err(MemoryError::LayoutMismatch {
            ours: format!("{ours:x?}"),
            theirs: format!("{theirs:x?}"),
        });
    }
    const PAGE: u64 = 4096;
    for (region, &(_, len, offset, runs)) in regions.iter().zip(layouts) {
        for run in runs {
            if (run.first_page + run.count) * PAGE > len {
                return Err(MemoryError::LayoutMismatch {
                    ours: format!("a region of {len:#x} bytes"),
                    theirs: format!("pages {}+{}", run.first_page, run.count),
                });
            }
            let at = run.first_page * PAGE;
            let target = region.as_ptr() as usize + at as usize;
            // SAFETY: the target range lies inside one of our own guest
            // memory mappings (checked above), so MAP_FIXED replaces nothing
            // else; no Rust reference into guest memory is alive across this
            // call (vCPUs are parked; devices use vm-memory's volatile
            // accessors, which re-read the pointer's pages).
            let ptr = unsafe {
                libc::mmap(
                    target as *mut libc::c_void,
                    (run.count * PAGE) as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    (offset + at) as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED || ptr as usize != target {
                return Err(MemoryError::MapOver {
                    addr: region.start_addr().raw_value() + at,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(())
}

/// `/proc/self/smaps`, opened by [`keep_smaps`] before a jail without
/// `/proc`.
static SMAPS: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// Opens `/proc/self/smaps` now and keeps it for [`resident_bytes`]: a
/// jailed VMM has no `/proc` ([`crate::jail`]). The file is read again from
/// its start each time (procfs makes it afresh).
pub fn keep_smaps() {
    if let Ok(file) = std::fs::File::open("/proc/self/smaps") {
        *SMAPS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(file);
    }
}

fn read_smaps() -> Option<String> {
    use std::io::{Read, Seek};
    let mut kept = SMAPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match kept.as_mut() {
        Some(file) => {
            let mut text = String::new();
            file.rewind().ok()?;
            file.read_to_string(&mut text).ok()?;
            Some(text)
        }
        None => std::fs::read_to_string("/proc/self/smaps").ok(),
    }
}

/// Bytes of guest memory this process has in RAM: the `Rss` of each guest
/// memory mapping in `/proc/self/smaps`. The kernel counts only pages mapped
/// into this process (it walks the present page-table entries, so the cost
/// follows what the guest touched, not its size), which for a VM restored from
/// an image file excludes the file's other cached pages.
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    let Some(smaps) = read_smaps() else {
        return 0;
    };
    let starts: Vec<u64> = mem.iter().map(|r| r.as_ptr() as u64).collect();
    let mut total = 0;
    let mut in_region = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, _end)) = first.split_once('-') {
            if let Ok(start) = u64::from_str_radix(start, 16) {
                in_region = starts.contains(&start);
                continue;
            }
        }
        if in_region {
            if let Some(kib) = line.strip_prefix("Rss:") {
                let kib = kib.trim().trim_end_matches("kB").trim();
                total += kib.parse::<u64>().unwrap_or(0) * 1024;
                in_region = false;
            }
        }
    }
    total
}

/// Highest guest-physical address of RAM below the MMIO hole, plus one.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(
            ram_ranges(128 * MIB),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let r = ram_ranges(4096 * MIB);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(r[1].0, GuestAddress(HIGH_RAM_START));
        assert_eq!(r[0].1 + r[1].1, (4096 * MIB) as usize);
    }

    #[test]
    fn sizes_are_validated() {
        assert!(matches!(
            validate_size(0),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            validate_size(u64::MAX / MIB),
            Err(MemoryError::TooLarge { .. })
        ));
        assert_eq!(validate_size(64).ok(), Some(64 * MIB));
    }

    #[test]
    fn resident_bytes_counts_touched_pages() {
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)]).unwrap();
        let before = resident_bytes(&mem);
        for i in 0..64u64 {
            mem.write_obj(1u8, GuestAddress(i * 4096)).unwrap();
        }
        let after = resident_bytes(&mem);
        assert!(after >= before + 64 * 4096, "before {before} after {after}");
    }
}
