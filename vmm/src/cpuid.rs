//! The CPUID a microVM guest sees, derived per vCPU from what KVM supports.
//!
//! `KVM_GET_SUPPORTED_CPUID` describes what KVM *can* virtualize, mostly the
//! host's own values: the host's APIC ids, core counts, cache sharing and power
//! management. [`filter_cpuid`] turns it into the CPUID of one vCPU of a small
//! machine with a single package of `vcpu_count` cores, one thread per core,
//! where vCPU `i` has (x2)APIC id `i`, the same ids the MP table
//! ([`crate::mptable`]) gives the processors.
//!
//! The rules, by leaf (others are kept as KVM reports them):
//!
//! | leaf | vendor | rule |
//! | --- | --- | --- |
//! | 0x1 | all | EBX: APIC id = vCPU id, logical processors = `vcpu_count`, CLFLUSH line = 8 (64 bytes); ECX: hypervisor bit set, MONITOR/MWAIT cleared, TSC-deadline kept as KVM reports it; EDX: HTT set iff `vcpu_count > 1` |
//! | 0x4 | Intel | per cache: cores per package - 1 = `vcpu_count - 1` (at most 63); threads sharing the cache - 1 = 0 for L1/L2, `vcpu_count - 1` beyond |
//! | 0x6 | all | only ARAT (EAX bit 2) stays; no turbo, HWP, EPB, APERF/MPERF or thermal sensor |
//! | 0xA | all | zero: no PMU |
//! | 0xB | all | rebuilt when leaf 0 covers it: SMT level (1 thread, shift 0), core level (`vcpu_count` cores, shift = bits for `vcpu_count`), then an invalid level; EDX = x2APIC id = vCPU id in every subleaf |
//! | 0x1F | all | if KVM reports it, the same subleafs as 0xB; else left out |
//! | 0x4000_0000 | all | kept as KVM reports it, added with the KVM signature if missing |
//! | 0x8000_0008 | AMD | ECX: cores - 1 = `vcpu_count - 1`, APIC id size = bits for `vcpu_count` |
//! | 0x8000_001D | AMD | per cache: threads sharing the cache - 1, as for leaf 0x4 |
//! | 0x8000_001E | AMD | extended APIC id = vCPU id, core id = vCPU id, 1 thread per core, 1 node |
//!
//! The vendor comes from leaf 0 (`GenuineIntel`, `AuthenticAMD`, and
//! `HygonGenuine`, which uses AMD's topology leaves); any other vendor gets the
//! rules marked "all". The same function serves every vCPU: only the APIC ids
//! differ between the results for two vCPUs of one machine.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// The machine the guest should see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidConfig {
    /// Number of vCPUs of the VM, `1..=MAX_VCPUS`.
    pub vcpu_count: u8,
}

/// The most vCPUs [`filter_cpuid`] describes: xAPIC ids are 8 bits and 0xff is
/// the broadcast id (the MP table has the same limit).
pub const MAX_VCPUS: u8 = 254;

/// Failure to derive a vCPU's CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// `vcpu_count` is 0 or above [`MAX_VCPUS`].
    #[error("cannot describe a machine of {vcpu_count} vCPUs (1 to {max})")]
    VcpuCount {
        /// The requested count.
        vcpu_count: u8,
        /// [`MAX_VCPUS`].
        max: u8,
    },
    /// The vCPU id is not below the vCPU count.
    #[error("vCPU id {vcpu_id} is out of range for {vcpu_count} vCPUs")]
    VcpuId {
        /// The requested id.
        vcpu_id: u8,
        /// The configured count.
        vcpu_count: u8,
    },
    /// The filtered entries do not fit in a `kvm_cpuid2`.
    #[error("the filtered CPUID has {entries} entries, more than KVM accepts")]
    TooManyEntries {
        /// Entries after filtering.
        entries: usize,
        /// What the FAM wrapper reported.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
}

/// CPU vendor, as leaf 0 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vendor {
    Intel,
    /// AMD, and Hygon, which follows AMD's topology leaves.
    Amd,
    Other,
}

impl Vendor {
    /// Reads the vendor string of leaf 0 (EBX, EDX, ECX).
    fn detect(entries: &[kvm_cpuid_entry2]) -> Self {
        let Some(leaf0) = find(entries, 0, 0) else {
            return Self::Other;
        };
        let mut id = [0u8; 12];
        id[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        id[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
        match &id {
            b"GenuineIntel" => Self::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Self::Amd,
            _ => Self::Other,
        }
    }
}

// Leaf numbers.
const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_POWER: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

// Leaf 0x1 bits.
const LEAF1_ECX_MONITOR: u32 = 1 << 3;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size, in 8-byte units: 64 bytes.
const CLFLUSH_LINE_SIZE: u32 = 8;

// Leaf 0x6 bits.
const LEAF6_EAX_ARAT: u32 = 1 << 2;

// Leaf 0xB / 0x1F level types (ECX[15:8]).
const LEVEL_INVALID: u32 = 0;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Field `[lo, lo+width)` of a register.
#[derive(Clone, Copy)]
struct Field {
    lo: u32,
    width: u32,
}

impl Field {
    const fn new(lo: u32, hi: u32) -> Self {
        Self {
            lo,
            width: hi - lo + 1,
        }
    }

    fn mask(self) -> u32 {
        (u32::MAX >> (32 - self.width)) << self.lo
    }

    fn get(self, reg: u32) -> u32 {
        (reg & self.mask()) >> self.lo
    }

    /// Sets the field to `value`, which must fit in it.
    fn set(self, reg: &mut u32, value: u32) {
        debug_assert!(value <= self.mask() >> self.lo, "value {value:#x} too wide");
        *reg = (*reg & !self.mask()) | ((value << self.lo) & self.mask());
    }
}

// Leaf 0x1 EBX fields.
const LEAF1_EBX_APIC_ID: Field = Field::new(24, 31);
const LEAF1_EBX_LOGICAL_COUNT: Field = Field::new(16, 23);
const LEAF1_EBX_CLFLUSH: Field = Field::new(8, 15);
// Leaf 0x4 and 0x8000_001D EAX fields.
const CACHE_EAX_TYPE: Field = Field::new(0, 4);
const CACHE_EAX_LEVEL: Field = Field::new(5, 7);
const CACHE_EAX_SHARING: Field = Field::new(14, 25);
const LEAF4_EAX_CORES: Field = Field::new(26, 31);
// Leaf 0xB / 0x1F fields.
const TOPO_EAX_SHIFT: Field = Field::new(0, 4);
const TOPO_EBX_COUNT: Field = Field::new(0, 15);
const TOPO_ECX_LEVEL_NUMBER: Field = Field::new(0, 7);
const TOPO_ECX_LEVEL_TYPE: Field = Field::new(8, 15);
// Leaf 0x8000_0008 ECX fields.
const AMD_SIZES_ECX_NC: Field = Field::new(0, 7);
const AMD_SIZES_ECX_APIC_ID_SIZE: Field = Field::new(12, 15);
// Leaf 0x8000_001E fields.
const AMD_EXT_EBX_CORE_ID: Field = Field::new(0, 7);
const AMD_EXT_EBX_THREADS_PER_CORE: Field = Field::new(8, 15);

/// The vCPU whose CPUID is being built, and its machine.
#[derive(Clone, Copy)]
struct Topology {
    vcpu_id: u8,
    vcpu_count: u8,
}

impl Topology {
    /// APIC id bits that enumerate `vcpu_count` cores: ceil(log2(vcpu_count)).
    fn core_bits(self) -> u32 {
        (u32::from(self.vcpu_count) - 1)
            .checked_ilog2()
            .map_or(0, |log| log + 1)
    }

    /// `vcpu_count - 1`, the "count minus one" most fields hold.
    fn max_core_index(self) -> u32 {
        u32::from(self.vcpu_count) - 1
    }
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

/// Returns the CPUID to set on vCPU `vcpu_id` (with `KVM_SET_CPUID2`), derived
/// from `supported` (from `KVM_GET_SUPPORTED_CPUID`) by the rules in the module
/// docs. `supported` is not changed, so one copy serves every vCPU.
pub fn filter_cpuid(
    supported: &CpuId,
    vcpu_id: u8,
    cfg: &CpuidConfig,
) -> Result<CpuId, CpuidError> {
    let vcpu_count = cfg.vcpu_count;
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(CpuidError::VcpuCount {
            vcpu_count,
            max: MAX_VCPUS,
        });
    }
    if vcpu_id >= vcpu_count {
        return Err(CpuidError::VcpuId {
            vcpu_id,
            vcpu_count,
        });
    }
    let topo = Topology {
        vcpu_id,
        vcpu_count,
    };
    let input = supported.as_slice();
    let vendor = Vendor::detect(input);
    let max_basic_leaf = find(input, LEAF_VENDOR, 0).map_or(0, |leaf0| leaf0.eax);

    let mut entries = Vec::with_capacity(input.len() + 4);
    let mut topology_done = false;
    let mut topology_v2_done = false;
    for entry in input {
        match entry.function {
            // KVM reports the host's subleafs; ours replace them, in place.
            LEAF_TOPOLOGY => {
                if !topology_done {
                    entries.extend(topology_leaf(LEAF_TOPOLOGY, topo));
                    topology_done = true;
                }
            }
            LEAF_TOPOLOGY_V2 => {
                if !topology_v2_done {
                    entries.extend(topology_leaf(LEAF_TOPOLOGY_V2, topo));
                    topology_v2_done = true;
                }
            }
            _ => {
                let mut entry = *entry;
                update_entry(&mut entry, vendor, topo);
                entries.push(entry);
            }
        }
    }
    if !topology_done && max_basic_leaf >= LEAF_TOPOLOGY {
        entries.extend(topology_leaf(LEAF_TOPOLOGY, topo));
    }
    if find(&entries, LEAF_HYPERVISOR, 0).is_none() {
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: LEAF_KVM_FEATURES,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }

    CpuId::from_entries(&entries).map_err(|source| CpuidError::TooManyEntries {
        entries: entries.len(),
        source,
    })
}

/// Applies the rule of `entry`'s leaf, if any, except for the topology leaves
/// 0xB and 0x1F, which are rebuilt whole.
fn update_entry(entry: &mut kvm_cpuid_entry2, vendor: Vendor, topo: Topology) {
    match (entry.function, vendor) {
        (LEAF_FEATURES, _) => update_features(entry, topo),
        (LEAF_CACHE_PARAMS, Vendor::Intel) => {
            update_cache_sharing(entry, topo);
            if cache_present(entry) {
                // Capped by the 6-bit field; leaf 0xB has the real count.
                LEAF4_EAX_CORES.set(&mut entry.eax, topo.max_core_index().min(63));
            }
        }
        (LEAF_POWER, _) => {
            entry.eax &= LEAF6_EAX_ARAT;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        (LEAF_PMU, _) => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        (LEAF_AMD_SIZES, Vendor::Amd) => {
            AMD_SIZES_ECX_NC.set(&mut entry.ecx, topo.max_core_index());
            AMD_SIZES_ECX_APIC_ID_SIZE.set(&mut entry.ecx, topo.core_bits());
        }
        (LEAF_AMD_CACHE_TOPOLOGY, Vendor::Amd) => update_cache_sharing(entry, topo),
        (LEAF_AMD_EXT_APIC_ID, Vendor::Amd) => {
            entry.eax = u32::from(topo.vcpu_id);
            entry.ebx = 0;
            AMD_EXT_EBX_CORE_ID.set(&mut entry.ebx, u32::from(topo.vcpu_id));
            AMD_EXT_EBX_THREADS_PER_CORE.set(&mut entry.ebx, 0);
            // Node 0, one node per package.
            entry.ecx = 0;
            entry.edx = 0;
        }
        _ => {}
    }
}

/// Leaf 0x1: APIC id, processor count, CLFLUSH size and feature bits.
fn update_features(entry: &mut kvm_cpuid_entry2, topo: Topology) {
    LEAF1_EBX_APIC_ID.set(&mut entry.ebx, u32::from(topo.vcpu_id));
    LEAF1_EBX_LOGICAL_COUNT.set(&mut entry.ebx, u32::from(topo.vcpu_count));
    LEAF1_EBX_CLFLUSH.set(&mut entry.ebx, CLFLUSH_LINE_SIZE);
    entry.ecx |= LEAF1_ECX_HYPERVISOR;
    entry.ecx &= !LEAF1_ECX_MONITOR;
    if topo.vcpu_count > 1 {
        entry.edx |= LEAF1_EDX_HTT;
    } else {
        entry.edx &= !LEAF1_EDX_HTT;
    }
}

/// Whether a leaf 0x4 / 0x8000_001D subleaf describes a cache (type 0 ends
/// the list).
fn cache_present(entry: &kvm_cpuid_entry2) -> bool {
    CACHE_EAX_TYPE.get(entry.eax) != 0
}

/// Leaf 0x4 / 0x8000_001D: L1 and L2 are private to a core (one thread), the
/// caches beyond are shared by the whole package.
fn update_cache_sharing(entry: &mut kvm_cpuid_entry2, topo: Topology) {
    if !cache_present(entry) {
        return;
    }
    let sharing = match CACHE_EAX_LEVEL.get(entry.eax) {
        1 | 2 => 0,
        _ => topo.max_core_index(),
    };
    CACHE_EAX_SHARING.set(&mut entry.eax, sharing);
}

/// Leaf 0xB (or 0x1F, same layout): an SMT level of one thread, a core level
/// of `vcpu_count` cores, and the invalid level that ends the list.
fn topology_leaf(function: u32, topo: Topology) -> [kvm_cpuid_entry2; 3] {
    let level = |index: u32, level_type: u32, shift: u32, count: u32| {
        let mut entry = kvm_cpuid_entry2 {
            function,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            edx: u32::from(topo.vcpu_id),
            ..Default::default()
        };
        TOPO_EAX_SHIFT.set(&mut entry.eax, shift);
        TOPO_EBX_COUNT.set(&mut entry.ebx, count);
        TOPO_ECX_LEVEL_NUMBER.set(&mut entry.ecx, index);
        TOPO_ECX_LEVEL_TYPE.set(&mut entry.ecx, level_type);
        entry
    };
    [
        level(0, LEVEL_SMT, 0, 1),
        level(1, LEVEL_CORE, topo.core_bits(), u32::from(topo.vcpu_count)),
        level(2, LEVEL_INVALID, 0, 0),
    ]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn indexed(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ..entry(function, index, regs)
        }
    }

    /// Leaf 0 with `max_leaf` and a 12-byte vendor string.
    fn vendor_leaf(max_leaf: u32, vendor: &[u8; 12]) -> kvm_cpuid_entry2 {
        let reg =
            |i: usize| u32::from_le_bytes([vendor[i], vendor[i + 1], vendor[i + 2], vendor[i + 3]]);
        entry(0, 0, [max_leaf, reg(0), reg(8), reg(4)])
    }

    const HOST_LEAF1_EBX: u32 = 0x2510_0800; // APIC id 0x25, 16 logical, CLFLUSH 8
    const HOST_LEAF1_ECX: u32 = 0x7ffa_3203 | LEAF1_ECX_MONITOR | (1 << 24);
    const HOST_LEAF1_EDX: u32 = 0x078b_fbff; // no HTT
    const LEAF_0X8000_0001: [u32; 4] = [0x00a1_0f11, 0x4000_0000, 0x0040_0393, 0x23d3_fbff];
    const HOST_L3: u32 = 0x0000_4163 | (0x3f << 26); // level 3 unified, 2 sharing, 64 cores

    /// A host like an Intel server: 0x4 caches, 0xB and 0x1F from the host.
    fn intel_cpuid() -> CpuId {
        let entries = vec![
            vendor_leaf(0x1f, b"GenuineIntel"),
            entry(
                1,
                0,
                [0x000a_06a6, HOST_LEAF1_EBX, HOST_LEAF1_ECX, HOST_LEAF1_EDX],
            ),
            indexed(
                4,
                0,
                [0x0000_0121 | (0x3f << 26) | (1 << 14), 0x01c0_003f, 0x3f, 0],
            ),
            indexed(
                4,
                1,
                [0x0000_0122 | (0x3f << 26) | (1 << 14), 0x01c0_003f, 0x3f, 0],
            ),
            indexed(
                4,
                2,
                [
                    0x0000_0143 | (0x3f << 26) | (1 << 14),
                    0x01c0_003f,
                    0x3ff,
                    0,
                ],
            ),
            indexed(4, 3, [HOST_L3 | (0x7f << 14), 0x03c0_003f, 0x7fff, 4]),
            indexed(4, 4, [0, 0, 0, 0]),
            entry(6, 0, [0x0000_00f7, 2, 0x0000_0009, 0x0000_0003]),
            entry(0xa, 0, [0x0804_8305, 0, 0, 0x0000_8603]),
            indexed(0xb, 0, [1, 2, 0x100, 0x25]),
            indexed(0xb, 1, [7, 96, 0x201, 0x25]),
            indexed(0xb, 2, [0, 0, 2, 0x25]),
            indexed(0x1f, 0, [1, 2, 0x100, 0x25]),
            indexed(0x1f, 1, [6, 48, 0x201, 0x25]),
            indexed(0x1f, 2, [7, 96, 0x502, 0x25]),
            indexed(0x1f, 3, [0, 0, 3, 0x25]),
            entry(
                0x4000_0000,
                0,
                [
                    0x4000_0010,
                    KVM_SIGNATURE[0],
                    KVM_SIGNATURE[1],
                    KVM_SIGNATURE[2],
                ],
            ),
            entry(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            entry(0x8000_0001, 0, LEAF_0X8000_0001),
            entry(0x8000_0008, 0, [0x0000_3030, 0, 0x0000_7001, 0]),
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    /// A host like this machine's AMD one: leaf 0xB a single zero subleaf,
    /// no 0x1F, no hypervisor leaves.
    fn amd_cpuid() -> CpuId {
        let entries = vec![
            vendor_leaf(0x10, b"AuthenticAMD"),
            entry(
                1,
                0,
                [
                    0x00a1_0f11,
                    HOST_LEAF1_EBX,
                    HOST_LEAF1_ECX & !(1 << 24),
                    HOST_LEAF1_EDX,
                ],
            ),
            indexed(4, 0, [0x1234_5678, 0, 0, 0]),
            entry(6, 0, [0x0000_0004, 0, 0x0000_0001, 0]),
            entry(0xa, 0, [0, 0, 0, 0]),
            indexed(0xb, 0, [0, 0, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            entry(0x8000_0001, 0, LEAF_0X8000_0001),
            entry(0x8000_0008, 0, [0x0000_3030, 0x5002_0005, 0x0003_7001, 0]),
            indexed(
                0x8000_001d,
                0,
                [0x0000_0121 | (1 << 14), 0x01c0_003f, 0x3f, 0],
            ),
            indexed(
                0x8000_001d,
                1,
                [0x0000_0122 | (1 << 14), 0x01c0_003f, 0x3f, 0],
            ),
            indexed(
                0x8000_001d,
                2,
                [0x0000_0143 | (1 << 14), 0x01c0_003f, 0x7ff, 2],
            ),
            indexed(
                0x8000_001d,
                3,
                [HOST_L3 & !(0x3f << 26), 0x03c0_003f, 0x7fff, 1],
            ),
            indexed(0x8000_001d, 4, [0, 0, 0, 0]),
            entry(0x8000_001e, 0, [0x25, 0x0112, 0x0101, 0]),
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn filter(supported: &CpuId, vcpu_id: u8, vcpu_count: u8) -> Vec<kvm_cpuid_entry2> {
        filter_cpuid(supported, vcpu_id, &CpuidConfig { vcpu_count })
            .unwrap()
            .as_slice()
            .to_vec()
    }

    fn get(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *find(entries, function, index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    fn subleafs(entries: &[kvm_cpuid_entry2], function: u32) -> Vec<kvm_cpuid_entry2> {
        entries
            .iter()
            .filter(|e| e.function == function)
            .copied()
            .collect()
    }

    fn regs(e: &kvm_cpuid_entry2) -> [u32; 4] {
        [e.eax, e.ebx, e.ecx, e.edx]
    }

    #[test]
    fn detects_vendor() {
        assert_eq!(Vendor::detect(intel_cpuid().as_slice()), Vendor::Intel);
        assert_eq!(Vendor::detect(amd_cpuid().as_slice()), Vendor::Amd);
        assert_eq!(
            Vendor::detect(&[vendor_leaf(0xd, b"HygonGenuine")]),
            Vendor::Amd
        );
        assert_eq!(
            Vendor::detect(&[vendor_leaf(0xd, b"CentaurHauls")]),
            Vendor::Other
        );
        assert_eq!(Vendor::detect(&[]), Vendor::Other);
    }

    #[test]
    fn leaf1_apic_id_count_clflush_and_features() {
        for supported in [intel_cpuid(), amd_cpuid()] {
            for vcpu_id in [0, 3] {
                let leaf1 = get(&filter(&supported, vcpu_id, 4), 1, 0);
                assert_eq!(leaf1.ebx >> 24, u32::from(vcpu_id), "initial APIC id");
                assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processor count");
                assert_eq!((leaf1.ebx >> 8) & 0xff, 8, "CLFLUSH line size");
                assert_eq!(leaf1.ebx & 0xff, HOST_LEAF1_EBX & 0xff, "brand index kept");
                assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
                assert_eq!(leaf1.ecx & (1 << 3), 0, "MONITOR/MWAIT cleared");
                assert_ne!(leaf1.edx & (1 << 28), 0, "HTT with 4 vCPUs");
                assert_eq!(leaf1.eax, get(supported.as_slice(), 1, 0).eax);
            }
        }
    }

    #[test]
    fn leaf1_single_vcpu_has_no_htt() {
        let supported = intel_cpuid();
        let mut with_htt = supported.as_slice().to_vec();
        with_htt[1].edx |= LEAF1_EDX_HTT;
        let leaf1 = get(
            &filter(&CpuId::from_entries(&with_htt).unwrap(), 0, 1),
            1,
            0,
        );
        assert_eq!(leaf1.edx & (1 << 28), 0);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 1);
        assert_eq!(leaf1.ebx >> 24, 0);
    }

    #[test]
    fn leaf1_keeps_tsc_deadline_only_if_supported() {
        let intel = get(&filter(&intel_cpuid(), 0, 2), 1, 0);
        assert_ne!(intel.ecx & (1 << 24), 0, "KVM reported it");
        let amd = get(&filter(&amd_cpuid(), 0, 2), 1, 0);
        assert_eq!(amd.ecx & (1 << 24), 0, "KVM did not report it");
        let others = !((1 << 24) | (1 << 31) | (1 << 3));
        assert_eq!(
            intel.ecx & others,
            HOST_LEAF1_ECX & others,
            "other ECX bits kept"
        );
    }

    #[test]
    fn intel_leaf4_cores_and_cache_sharing() {
        let supported = intel_cpuid();
        let out = filter(&supported, 1, 4);
        let caches = subleafs(&out, 4);
        assert_eq!(caches.len(), 5);
        for (cache, host) in caches.iter().zip(subleafs(supported.as_slice(), 4)) {
            if host.eax == 0 {
                assert_eq!(regs(cache), [0; 4], "terminator untouched");
                continue;
            }
            assert_eq!(cache.eax >> 26, 3, "cores per package - 1");
            let level = (cache.eax >> 5) & 7;
            let sharing = (cache.eax >> 14) & 0xfff;
            assert_eq!(sharing, if level <= 2 { 0 } else { 3 }, "level {level}");
            assert_eq!(cache.eax & 0x3fff, host.eax & 0x3fff, "type and level kept");
            assert_eq!(
                [cache.ebx, cache.ecx, cache.edx],
                [host.ebx, host.ecx, host.edx]
            );
        }
        // The 6-bit core field saturates.
        let big = filter(&supported, 0, MAX_VCPUS);
        assert_eq!(get(&big, 4, 0).eax >> 26, 63);
        assert_eq!((get(&big, 4, 3).eax >> 14) & 0xfff, 253);
    }

    #[test]
    fn leaf4_left_alone_on_amd() {
        let out = filter(&amd_cpuid(), 0, 4);
        assert_eq!(get(&out, 4, 0).eax, 0x1234_5678);
    }

    #[test]
    fn leaf6_keeps_only_arat() {
        for supported in [intel_cpuid(), amd_cpuid()] {
            let leaf6 = get(&filter(&supported, 0, 2), 6, 0);
            assert_eq!(regs(&leaf6), [1 << 2, 0, 0, 0]);
        }
    }

    #[test]
    fn leaf_a_is_zero() {
        let leaf_a = get(&filter(&intel_cpuid(), 0, 2), 0xa, 0);
        assert_eq!(regs(&leaf_a), [0; 4]);
    }

    fn check_topology_leaf(entries: &[kvm_cpuid_entry2], function: u32, vcpu_id: u8, count: u8) {
        let levels = subleafs(entries, function);
        assert_eq!(levels.len(), 3, "SMT, core, invalid");
        let id = u32::from(vcpu_id);
        let bits = match count {
            1 => 0,
            2 => 1,
            3 | 4 => 2,
            5..=8 => 3,
            9..=16 => 4,
            129..=254 => 8,
            _ => unreachable!("not used by the tests"),
        };
        assert_eq!(regs(&levels[0]), [0, 1, 0x100, id], "SMT level");
        assert_eq!(
            regs(&levels[1]),
            [bits, u32::from(count), 0x201, id],
            "core level"
        );
        assert_eq!(regs(&levels[2]), [0, 0, 2, id], "invalid level");
        for (index, level) in levels.iter().enumerate() {
            assert_eq!(level.index as usize, index);
            assert_eq!(level.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        }
    }

    #[test]
    fn leaf_b_describes_one_thread_per_core() {
        for supported in [intel_cpuid(), amd_cpuid()] {
            for (vcpu_id, count) in [
                (0, 1),
                (1, 2),
                (2, 3),
                (3, 4),
                (4, 5),
                (7, 8),
                (8, 9),
                (253, 254),
            ] {
                let out = filter(&supported, vcpu_id, count);
                check_topology_leaf(&out, 0xb, vcpu_id, count);
            }
        }
    }

    #[test]
    fn leaf_b_added_when_leaf0_covers_it() {
        let mut entries = amd_cpuid().as_slice().to_vec();
        entries.retain(|e| e.function != 0xb);
        let out = filter(&CpuId::from_entries(&entries).unwrap(), 2, 3);
        check_topology_leaf(&out, 0xb, 2, 3);

        let old = CpuId::from_entries(&[vendor_leaf(0xa, b"AuthenticAMD")]).unwrap();
        assert!(subleafs(&filter(&old, 0, 2), 0xb).is_empty());
    }

    #[test]
    fn leaf_1f_is_a_copy_of_leaf_b_or_absent() {
        let out = filter(&intel_cpuid(), 5, 6);
        check_topology_leaf(&out, 0x1f, 5, 6);
        let b: Vec<_> = subleafs(&out, 0xb).iter().map(regs).collect();
        let v2: Vec<_> = subleafs(&out, 0x1f).iter().map(regs).collect();
        assert_eq!(b, v2);

        assert!(subleafs(&filter(&amd_cpuid(), 0, 2), 0x1f).is_empty());
    }

    #[test]
    fn hypervisor_leaf_kept_or_added() {
        let intel = filter(&intel_cpuid(), 0, 2);
        assert_eq!(
            regs(&get(&intel, 0x4000_0000, 0)),
            [
                0x4000_0010,
                KVM_SIGNATURE[0],
                KVM_SIGNATURE[1],
                KVM_SIGNATURE[2]
            ],
            "kept as KVM reported it"
        );
        assert_eq!(subleafs(&intel, 0x4000_0000).len(), 1);
        assert_eq!(get(&intel, 0x4000_0001, 0).eax, 0x0100_7efb);

        let amd = filter(&amd_cpuid(), 0, 2);
        let added = get(&amd, 0x4000_0000, 0);
        assert_eq!(added.eax, 0x4000_0001);
        let mut signature = Vec::new();
        for reg in [added.ebx, added.ecx, added.edx] {
            signature.extend_from_slice(&reg.to_le_bytes());
        }
        assert_eq!(signature, b"KVMKVMKVM\0\0\0");
    }

    #[test]
    fn extended_leaves_kept() {
        for supported in [intel_cpuid(), amd_cpuid()] {
            let out = filter(&supported, 1, 2);
            assert_eq!(regs(&get(&out, 0x8000_0001, 0)), LEAF_0X8000_0001);
            assert_eq!(
                get(&out, 0x8000_0000, 0),
                get(supported.as_slice(), 0x8000_0000, 0)
            );
            assert_eq!(get(&out, 0, 0), get(supported.as_slice(), 0, 0));
        }
        // Leaf 0x8000_0008 is AMD's topology leaf only on AMD.
        let intel = filter(&intel_cpuid(), 1, 2);
        assert_eq!(get(&intel, 0x8000_0008, 0).ecx, 0x7001);
    }

    #[test]
    fn amd_core_count_and_apic_id_size() {
        let supported = amd_cpuid();
        for (count, bits) in [(1u8, 0u32), (2, 1), (4, 2), (6, 3), (254, 8)] {
            let leaf = get(&filter(&supported, 0, count), 0x8000_0008, 0);
            assert_eq!(leaf.ecx & 0xff, u32::from(count) - 1, "NC for {count}");
            assert_eq!((leaf.ecx >> 12) & 0xf, bits, "ApicIdSize for {count}");
            assert_eq!(leaf.ecx & 0x3_0000, 0x3_0000, "PerfTscSize kept");
            assert_eq!([leaf.eax, leaf.ebx], [0x3030, 0x5002_0005]);
        }
    }

    #[test]
    fn amd_cache_sharing() {
        let out = filter(&amd_cpuid(), 0, 8);
        let caches = subleafs(&out, 0x8000_001d);
        assert_eq!(caches.len(), 5);
        let sharing: Vec<u32> = caches.iter().map(|c| (c.eax >> 14) & 0xfff).collect();
        assert_eq!(sharing, [0, 0, 0, 7, 0]);
        assert_eq!(regs(&caches[4]), [0; 4]);
    }

    #[test]
    fn amd_extended_apic_id() {
        let supported = amd_cpuid();
        for vcpu_id in [0u8, 5, 253] {
            let leaf = get(&filter(&supported, vcpu_id, 254), 0x8000_001e, 0);
            let id = u32::from(vcpu_id);
            assert_eq!(regs(&leaf), [id, id, 0, 0], "vCPU {vcpu_id}");
        }
    }

    #[test]
    fn other_vendor_gets_the_common_rules_only() {
        let mut entries = intel_cpuid().as_slice().to_vec();
        entries[0] = vendor_leaf(0x1f, b"CentaurHauls");
        let supported = CpuId::from_entries(&entries).unwrap();
        let out = filter(&supported, 2, 3);
        assert_eq!(get(&out, 1, 0).ebx >> 24, 2);
        check_topology_leaf(&out, 0xb, 2, 3);
        assert_eq!(regs(&get(&out, 0xa, 0)), [0; 4]);
        assert_eq!(
            subleafs(&out, 4),
            subleafs(supported.as_slice(), 4),
            "leaf 4 is Intel's"
        );
    }

    #[test]
    fn supported_is_not_changed() {
        let supported = intel_cpuid();
        let before = supported.as_slice().to_vec();
        filter(&supported, 1, 2);
        assert_eq!(supported.as_slice(), &before[..]);
    }

    #[test]
    fn rejects_bad_counts_and_ids() {
        let supported = intel_cpuid();
        let run =
            |vcpu_id, vcpu_count| filter_cpuid(&supported, vcpu_id, &CpuidConfig { vcpu_count });
        assert!(matches!(
            run(0, 0),
            Err(CpuidError::VcpuCount { vcpu_count: 0, .. })
        ));
        assert!(matches!(
            run(0, 255),
            Err(CpuidError::VcpuCount {
                vcpu_count: 255,
                ..
            })
        ));
        assert!(matches!(
            run(4, 4),
            Err(CpuidError::VcpuId {
                vcpu_id: 4,
                vcpu_count: 4
            })
        ));
        assert!(run(253, 254).is_ok());
    }

    #[test]
    fn too_many_entries() {
        // A full table without the hypervisor leaf: adding it overflows.
        let mut entries = vec![vendor_leaf(0x1, b"GenuineIntel")];
        entries
            .extend((1..KVM_MAX_CPUID_ENTRIES as u32).map(|i| entry(0x8000_0000 + i, 0, [0; 4])));
        let supported = CpuId::from_entries(&entries).unwrap();
        let err = filter_cpuid(&supported, 0, &CpuidConfig { vcpu_count: 1 }).unwrap_err();
        assert!(matches!(
            err,
            CpuidError::TooManyEntries { entries: 257, .. }
        ));
        assert!(std::error::Error::source(&err).is_some());
    }

    /// Filters what this host's KVM supports, for every vCPU of a 4-vCPU
    /// machine, and has KVM accept the result on a real vCPU.
    #[test]
    fn filters_real_kvm_cpuid() {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(err) => {
                if std::env::var("RELIVE_REQUIRE_KVM").as_deref() == Ok("1") {
                    panic!("RELIVE_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {err}");
                }
                eprintln!("skipping: /dev/kvm not available ({err})");
                return;
            }
        };
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vm = kvm.create_vm().unwrap();
        let cfg = CpuidConfig { vcpu_count: 4 };
        let leaf0 = get(supported.as_slice(), 0, 0);
        for vcpu_id in 0..cfg.vcpu_count {
            let cpuid = filter_cpuid(&supported, vcpu_id, &cfg).unwrap();
            let out = cpuid.as_slice();
            let leaf1 = get(out, 1, 0);
            assert_eq!(leaf1.ebx >> 24, u32::from(vcpu_id));
            assert_ne!(leaf1.ecx & (1 << 31), 0);
            assert_eq!(leaf1.ecx & (1 << 3), 0);
            if leaf0.eax >= 0xb {
                check_topology_leaf(out, 0xb, vcpu_id, 4);
            }
            assert!(find(out, 0x4000_0000, 0).is_some());

            let vcpu = vm.create_vcpu(u64::from(vcpu_id)).unwrap();
            vcpu.set_cpuid2(&cpuid).unwrap();
            let back = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
            assert_eq!(get(back.as_slice(), 1, 0).ebx >> 24, u32::from(vcpu_id));
        }
    }
}
