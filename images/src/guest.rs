//! The bundled guest kernel, assembled from `images/guest/guest.S` by this
//! crate's build script. See that file for the guest's design, its agent
//! protocol and its command-line parameters.

/// The bundled guest as an ELF image (one PT_LOAD at 1 MiB, entry `_start`).
pub const KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/relive-guest.elf"));

/// Default heartbeat interval of the bundled guest, in milliseconds.
pub const DEFAULT_HB_MS: u64 = 100;

/// FNV-1a offset basis: the hash of a workload that has done nothing.
pub const HASH_INIT: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV prime used by the workload's hash.
pub const HASH_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Replays the workload from (`counter`, `hash`) up to `to`, returning the
/// hash the guest must report at counter `to`. Tests use it to prove that a
/// guest continued exactly from a given state.
pub fn replay_hash(counter: u64, hash: u64, to: u64) -> u64 {
    let mut h = hash;
    let mut c = counter;
    while c < to {
        c += 1;
        h = (h ^ c).wrapping_mul(HASH_PRIME);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_an_x86_64_elf_loaded_at_1mib() {
        assert_eq!(&KERNEL[..4], b"\x7fELF");
        assert_eq!(KERNEL[4], 2, "ELF64");
        assert_eq!(u16::from_le_bytes([KERNEL[18], KERNEL[19]]), 62, "x86_64");
        let entry = u64::from_le_bytes(KERNEL[24..32].try_into().unwrap());
        assert_eq!(entry, 0x10_0000);
    }

    #[test]
    fn replay_is_the_fnv_chain() {
        assert_eq!(replay_hash(0, HASH_INIT, 0), HASH_INIT);
        let one = (HASH_INIT ^ 1).wrapping_mul(HASH_PRIME);
        assert_eq!(replay_hash(0, HASH_INIT, 1), one);
        assert_eq!(replay_hash(1, one, 3), replay_hash(0, HASH_INIT, 3));
    }
}
