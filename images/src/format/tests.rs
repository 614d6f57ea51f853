//! Unit tests of the image format.

use super::test_support::*;
use super::*;
use std::fs::OpenOptions;

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

/// Pages written in any order and more than once (a live checkpoint's
/// rounds): the image holds each page's last write, every page written is
/// present, and the checksum is exactly the one a single in-order write of
/// the same pages gives.
#[test]
fn pages_written_out_of_order_and_twice_hold_the_last_write() {
    let dir = TempDir::new("pages");
    let first = region(32, |p| p as u8 + 1);
    let last = region(32, |p| 200 - p as u8);
    let mut w = ImageWriter::create(dir.path(), ImageKind::Full).unwrap();
    w.begin_pages(&[(0, 32 * PAGE_SIZE)]).unwrap();
    let page = |m: &[u8], p: u64, n: u64| -> Vec<u8> {
        m[(p * PAGE_SIZE) as usize..((p + n) * PAGE_SIZE) as usize].to_vec()
    };
    // Round 0: pages 20..24, then 2..6 (out of order); round 1: 3 and 21 again.
    w.write_pages(0, 20, &page(&first, 20, 4)).unwrap();
    w.write_pages(0, 2, &page(&first, 2, 4)).unwrap();
    w.write_pages(0, 3, &page(&last, 3, 1)).unwrap();
    w.write_pages(0, 21, &page(&last, 21, 1)).unwrap();
    // Not whole pages, or beyond the region: refused (and the writer with it).
    let mut bad = ImageWriter::create(dir.path(), ImageKind::Full).unwrap();
    bad.begin_pages(&[(0, 32 * PAGE_SIZE)]).unwrap();
    assert!(bad.write_pages(0, 31, &page(&first, 0, 2)).is_err());
    w.finish_pages().unwrap();
    let c = w.commit().unwrap();

    let r = ImageReader::open(&c.path).unwrap();
    r.verify_memory().unwrap();
    let layout = r.memory_map()[0].clone();
    assert_eq!(layout.present, vec![run(2, 4), run(20, 4)]);
    let mut expected = first.clone();
    for p in [3u64, 21] {
        let at = (p * PAGE_SIZE) as usize;
        expected[at..at + PAGE_SIZE as usize].copy_from_slice(&page(&last, p, 1));
    }
    for p in [2u64, 3, 4, 5, 20, 21, 22, 23] {
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        r.read_memory(&layout, p * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(buf, page(&expected, p, 1), "page {p}");
    }
    // The same content written once, in order, has the same checksum.
    let once = write_image(
        dir.path(),
        ImageKind::Full,
        "once",
        &expected,
        vec![run(2, 4), run(20, 4)],
    );
    let crc = |path: &Path| {
        ImageReader::read_header(path)
            .unwrap()
            .section(SectionKind::Memory)
            .unwrap()
            .checksum
    };
    assert_eq!(crc(&c.path), crc(&once.path));
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
