//! A small record that a full disk cannot stop: what the supervisor knows of
//! a VM (`vmm.json` before), kept for the next supervisor.
//!
//! Two slot files, `<name>.a` and `<name>.b`, each [`SLOT_SIZE`] bytes written
//! in full when created, so their blocks are allocated. An update overwrites
//! the slot holding the older generation in place: overwriting allocated
//! blocks needs no free space (ext4, xfs, tmpfs alike), so once the slots
//! exist a full disk cannot keep the record stale. A write torn by a crash
//! leaves the other slot, one generation older, intact.
//!
//! A slot is text: one header line, then the payload, then zero padding:
//!
//! ```text
//! relive-record gen=42 len=311 crc=1c2f3a4b
//! {"pid":1234,...}
//! ```
//!
//! `crc` is the CRC-32C of the generation (8 bytes, little-endian) followed
//! by the payload. The reader takes the valid slot with the higher
//! generation; a slot that does not parse or check is ignored.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of each slot file: the header line and the payload must fit.
pub const SLOT_SIZE: usize = 64 * 1024;

const MAGIC: &str = "relive-record";

/// The two slots of one record, and the generation last read or written.
#[derive(Debug)]
pub struct Record {
    slots: [PathBuf; 2],
    generation: u64,
    /// The slot holding `generation`: the next write goes to the other.
    newest: Option<usize>,
}

/// A slot's header line and payload, or why it is not one.
fn parse_slot(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let end = bytes.iter().position(|b| *b == b'\n')?;
    let header = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut words = header.split(' ');
    if words.next()? != MAGIC {
        return None;
    }
    let mut field = |key: &str| words.next()?.strip_prefix(key)?.strip_prefix('=');
    let generation: u64 = field("gen")?.parse().ok()?;
    let len: usize = field("len")?.parse().ok()?;
    let crc = u32::from_str_radix(field("crc")?, 16).ok()?;
    let payload = bytes.get(end + 1..end + 1 + len)?;
    (checksum(generation, payload) == crc).then_some((generation, payload))
}

fn checksum(generation: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&generation.to_le_bytes()), payload)
}

impl Record {
    /// The record `<dir>/<name>.a|b` (nothing is read or created yet).
    pub fn new(dir: &Path, name: &str) -> Record {
        Record {
            slots: [dir.join(format!("{name}.a")), dir.join(format!("{name}.b"))],
            generation: 0,
            newest: None,
        }
    }

    /// The slot files.
    pub fn slots(&self) -> &[PathBuf; 2] {
        &self.slots
    }

    /// The newest valid payload, if any slot holds one; later writes go on
    /// from its generation.
    pub fn read(&mut self) -> Option<Vec<u8>> {
        let mut best: Option<(u64, Vec<u8>, usize)> = None;
        for (slot, path) in self.slots.iter().enumerate() {
            let mut bytes = Vec::new();
            let read = File::open(path).and_then(|mut f| f.read_to_end(&mut bytes));
            if read.is_err() {
                continue;
            }
            if let Some((generation, payload)) = parse_slot(&bytes) {
                if best.as_ref().is_none_or(|(g, _, _)| generation > *g) {
                    best = Some((generation, payload.to_vec(), slot));
                }
            }
        }
        let (generation, payload, slot) = best?;
        if generation >= self.generation {
            self.generation = generation;
            self.newest = Some(slot);
        }
        Some(payload)
    }

    /// Writes `payload` as the next generation, over the slot that does not
    /// hold the newest one (so a torn write always leaves that one).
    pub fn write(&mut self, payload: &[u8]) -> io::Result<()> {
        let generation = self.generation + 1;
        let header = format!(
            "{MAGIC} gen={generation} len={} crc={:08x}\n",
            payload.len(),
            checksum(generation, payload)
        );
        let size = header.len() + payload.len();
        if size > SLOT_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a record of {size} bytes does not fit a slot of {SLOT_SIZE}"),
            ));
        }
        let slot = self
            .newest
            .map_or((generation % 2) as usize, |newest| 1 - newest);
        let path = &self.slots[slot];
        let file = open_slot(path)?;
        let mut bytes = Vec::with_capacity(size + 1);
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(payload);
        // A NUL after the payload: a reader of an older, longer slot content
        // never mistakes leftovers for part of this one (len says where it
        // ends anyway).
        bytes.push(0);
        file.write_all_at(&bytes, 0)?;
        self.generation = generation;
        self.newest = Some(slot);
        Ok(())
    }
}

/// Opens a slot for writing, creating it at full size (blocks allocated)
/// when it does not exist yet.
fn open_slot(path: &Path) -> io::Result<File> {
    match OpenOptions::new().write(true).open(path) {
        Ok(file) => Ok(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let tmp = path.with_extension("new");
            let mut file = relive_images::private::create_file(&tmp)?;
            file.write_all(&vec![0u8; SLOT_SIZE])?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            OpenOptions::new().write(true).open(path)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("relive-record-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_one_is_ignored() {
        let d = dir("ab");
        let mut r = Record::new(&d, "vmm");
        assert_eq!(r.read(), None);
        r.write(b"{\"n\":1}").unwrap();
        r.write(b"{\"n\":2, \"longer\": true}").unwrap();
        r.write(b"{\"n\":3}").unwrap();
        assert_eq!(Record::new(&d, "vmm").read().unwrap(), b"{\"n\":3}");
        // Both slots exist at full size.
        for slot in r.slots() {
            assert_eq!(std::fs::metadata(slot).unwrap().len(), SLOT_SIZE as u64);
        }
        // A crash in the middle of the next write tears its slot: the
        // other one, a generation older, is read.
        let next = &r.slots()[0]; // generation 4 goes to slot a
        let mut torn = std::fs::read(next).unwrap();
        torn[30] ^= 0xff;
        std::fs::write(next, &torn).unwrap();
        let mut again = Record::new(&d, "vmm");
        assert_eq!(again.read().unwrap(), b"{\"n\":3}");
        // Writing goes on past the highest generation seen, into the torn
        // slot: the good one stays until the new one is whole.
        again.write(b"{\"n\":4}").unwrap();
        assert_eq!(Record::new(&d, "vmm").read().unwrap(), b"{\"n\":4}");
        let other = std::fs::read(&r.slots()[1]).unwrap();
        assert!(
            other.starts_with(b"relive-record gen=3 "),
            "slot b still holds generation 3"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// An update overwrites a slot in place: no file grows and none is
    /// created, so no free block is needed (the chaos soak updates records
    /// on a full tmpfs).
    #[test]
    fn an_update_rewrites_a_slot_in_place() {
        let d = dir("inplace");
        let mut r = Record::new(&d, "vmm");
        r.write(b"one").unwrap();
        r.write(b"two").unwrap();
        let inode = |p: &PathBuf| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(p).unwrap();
            (m.ino(), m.len())
        };
        let before: Vec<_> = r.slots().iter().map(inode).collect();
        r.write(b"three").unwrap();
        r.write(b"four").unwrap();
        let after: Vec<_> = r.slots().iter().map(inode).collect();
        assert_eq!(before, after, "the same files, the same size");
        assert_eq!(Record::new(&d, "vmm").read().unwrap(), b"four");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_record_too_big_for_a_slot_is_refused() {
        let d = dir("big");
        let mut r = Record::new(&d, "vmm");
        let err = r.write(&vec![b'x'; SLOT_SIZE]).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
