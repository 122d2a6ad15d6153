//! Randomized robustness tests on stable Rust: valid inputs mutated by a
//! seeded PRNG are fed to every parser, which must return `Ok` or `Err` but
//! never panic, and whose `Ok` results must keep their invariants. The same
//! targets exist for cargo-fuzz under `fuzz/` (nightly only); these run in
//! every `cargo test`. Seeds are fixed, so a failure reproduces; a failing
//! input found here or by the fuzzer becomes a named regression test below.

use crate::boot_params::{E820Entry, E820Table, ZERO_PAGE_SIZE, ZeroPageConfig, build_zero_page};
use crate::bzimage::BzImage;
use crate::cmdline::write_capture_cmdline;
use crate::crash_note::CrashNote;
use crate::elfcore::{CoreDump, Placement};
use crate::layout::CaptureLayout;
use crate::pvh::{BootDataConfig, PvhImage, write_boot_data};
use crate::testutil::{FakeBzImage, Rng};
use crate::{PhysRange, elfcore};

const ITERATIONS: usize = 4000;

/// Values that tend to break size arithmetic.
const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0xff,
    0x1000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Applies 1 to 8 random mutations; `hot` is the byte range most fields
/// live in, targeted half of the time.
fn mutate(rng: &mut Rng, input: &[u8], hot: core::ops::Range<usize>) -> Vec<u8> {
    let mut bytes = input.to_vec();
    let mutations = 1 + rng.below(8);
    for _ in 0..mutations {
        if bytes.is_empty() {
            bytes.push(rng.next_u64() as u8);
            continue;
        }
        let offset = if rng.below(2) == 0 && hot.end > hot.start && hot.end <= bytes.len() {
            hot.start + rng.below(hot.end - hot.start)
        } else {
            rng.below(bytes.len())
        };
        match rng.below(6) {
            0 => bytes[offset] ^= 1 << rng.below(8),
            1 => bytes[offset] = rng.next_u64() as u8,
            2 | 3 => {
                let value = INTERESTING[rng.below(INTERESTING.len())];
                let width = [1, 2, 4, 8][rng.below(4)];
                let end = (offset + width).min(bytes.len());
                let le = value.to_le_bytes();
                bytes[offset..end].copy_from_slice(&le[..end - offset]);
            }
            4 => bytes.truncate(rng.below(bytes.len() + 1)),
            _ => {
                let extra = rng.below(64);
                bytes.extend((0..extra).map(|_| rng.next_u64() as u8));
            }
        }
    }
    bytes
}

/// Everything the boot path does with an image that parsed.
fn exercise_bzimage(bytes: &[u8]) {
    let Ok(image) = BzImage::parse(bytes) else {
        return;
    };
    let range = image.kernel_file_range();
    assert!(range.start < range.end && range.end == bytes.len());
    assert_eq!(image.kernel_bytes().len(), range.len());
    assert!(!image.payload().is_empty());
    assert!(image.load_footprint() >= image.kernel_bytes().len() as u64);
    assert!(image.alignment().is_power_of_two());
    let _ = (
        image.kernel_version(),
        image.compression(),
        image.setup_header(),
    );

    let reservation = PhysRange::new(0x4000_0000, 0x1000_0000);
    let Ok(layout) = CaptureLayout::plan(reservation, &image, 0x10_0000, 0x3000) else {
        return;
    };
    assert!(reservation.contains(&layout.kernel));
    let firmware = [
        E820Entry::new(0, 0x9_f000, 1),
        E820Entry::new(0x10_0000, 0x7ff0_0000, 1),
    ];
    let table = E820Table::for_capture(&firmware, reservation, layout.elfcorehdr).unwrap();
    let mut cmdline = [0u8; 4096];
    let len = write_capture_cmdline(
        &mut cmdline,
        "console=ttyS0",
        layout.elfcorehdr,
        image.cmdline_size(),
    );
    let Ok(len) = len else {
        return;
    };
    let mut page = [0u8; ZERO_PAGE_SIZE];
    let config = ZeroPageConfig {
        cmdline_addr: layout.cmdline.start,
        cmdline_len: len,
        initrd: layout.initrd,
        acpi_rsdp_addr: None,
        e820: &table,
    };
    build_zero_page(&image, &config, &mut page).unwrap();
}

#[test]
fn mutated_bzimages_never_panic_the_boot_path() {
    let valid = FakeBzImage::default().build();
    exercise_bzimage(&valid);
    let mut rng = Rng::new(0x6b65_7865_6331);
    let mut accepted = 0;
    for _ in 0..ITERATIONS {
        let input = mutate(&mut rng, &valid, 0x1f0..0x270);
        if BzImage::parse(&input).is_ok() {
            accepted += 1;
        }
        exercise_bzimage(&input);
    }
    // The mutations must also reach the code behind a successful parse.
    assert!(accepted > ITERATIONS / 20, "only {accepted} mutants parsed");
}

/// Everything `cargo xtask dump` and the capture mode do with a dump.
fn exercise_dump(dump: &CoreDump<'_>) {
    for note in dump.notes() {
        let _ = (note.name, note.n_type, note.desc.len());
    }
    for cpu in dump.cpus() {
        let _ = cpu.cpu_index();
    }
    if let Some(crash) = dump.crash_note() {
        let _ = (
            crash.reason(),
            crash.coordinator(),
            crash.stragglers().count(),
        );
        for cpu in crash.cpus() {
            assert_eq!(cpu.vmclears().count(), cpu.vmclear_count());
        }
    }
    for segment in dump.load_segments() {
        let _ = dump.segment_data(&segment);
    }
    if let Some(image) = dump.image_notes() {
        for (mapping, name) in image.files.entries() {
            let _ = (mapping.start, mapping.end, mapping.file_offset, name.len());
        }
    }
    let mut out = vec![0u8; 64 * 1024];
    if let Ok(layout) = dump.write_file_header(&mut out) {
        // What we write, we must read back.
        let reread = CoreDump::parse(&out[..layout.len]).unwrap();
        assert_eq!(reread.notes().count(), dump.notes().count());
    }
}

#[test]
fn mutated_dump_files_never_panic_the_reader() {
    let valid = elfcore::tests::dump_file();
    let (_, layout) = elfcore::tests::write(Placement::File);
    exercise_dump(&CoreDump::parse(&valid).unwrap());
    let mut rng = Rng::new(0x636f_7265_6669);
    let mut accepted = 0;
    for _ in 0..ITERATIONS {
        let input = mutate(&mut rng, &valid, 0..layout.notes.end);
        if let Ok(dump) = CoreDump::parse(&input) {
            accepted += 1;
            exercise_dump(&dump);
        }
    }
    assert!(accepted > ITERATIONS / 20, "only {accepted} mutants parsed");
}

#[test]
fn mutated_old_memory_headers_never_panic_the_reader() {
    let (valid, layout) = elfcore::tests::write(Placement::OldMemory {
        header_phys: elfcore::tests::HEADER_PHYS,
    });
    let mut rng = Rng::new(0x6f6c_646d_656d);
    let mut accepted = 0;
    for _ in 0..ITERATIONS {
        let input = mutate(&mut rng, &valid, 0..layout.notes.end);
        if let Ok(dump) = CoreDump::parse_elfcorehdr(&input, elfcore::tests::HEADER_PHYS) {
            accepted += 1;
            exercise_dump(&dump);
        }
    }
    assert!(accepted > ITERATIONS / 20, "only {accepted} mutants parsed");
}

#[test]
fn mutated_dumps_with_image_notes_never_panic_the_reader() {
    let (valid, layout) = elfcore::tests::loaded_image::write_with_image(Placement::File);
    let dump = CoreDump::parse(&valid).unwrap();
    assert!(dump.image_notes().is_some());
    exercise_dump(&dump);
    let mut rng = Rng::new(0x6e74_6669_6c65);
    let mut accepted = 0;
    // The image notes sit between the CPU notes and the crash note.
    let image_notes = layout.notes.start + 3 * (12 + 8 + 336)..layout.notes.end;
    for _ in 0..ITERATIONS {
        let input = mutate(&mut rng, &valid, image_notes.clone());
        if let Ok(dump) = CoreDump::parse(&input) {
            accepted += 1;
            exercise_dump(&dump);
        }
    }
    assert!(accepted > ITERATIONS / 20, "only {accepted} mutants parsed");
}

#[test]
fn mutated_image_headers_never_panic_and_keep_their_invariants() {
    use crate::elfcore::image::{MAPPING_PAGE, MAX_IMAGE_MAPPINGS};
    use crate::elfcore::tests::loaded_image::{LOAD_ADDR, image_bytes};
    use crate::elfcore::{LoadedImage, core_header_len, write_core_header};
    let valid = image_bytes();
    let mut rng = Rng::new(0x6876_6864_7273);
    let mut accepted = 0;
    for _ in 0..ITERATIONS {
        let input = mutate(&mut rng, &valid, 0..valid.len());
        let Ok(image) = LoadedImage::from_loaded_headers("hv", LOAD_ADDR, &input) else {
            continue;
        };
        accepted += 1;
        assert!(image.mappings().len() <= MAX_IMAGE_MAPPINGS);
        for mapping in image.mappings() {
            assert!(mapping.start < mapping.end);
            assert_eq!(mapping.start % MAPPING_PAGE, 0);
            assert_eq!(mapping.end % MAPPING_PAGE, 0);
            assert_eq!(mapping.file_offset % MAPPING_PAGE, 0);
        }
        // Whatever parsed must write a core that reads back.
        let len = core_header_len(0, 0, 0, Some(&image)).unwrap();
        elfcore::tests::with_crash_record(|record| {
            let len = len + record.desc_len().unwrap();
            let mut out = vec![0u8; len];
            let layout =
                write_core_header(&mut out, &[], record, &[], Some(&image), Placement::File)
                    .unwrap();
            let dump = CoreDump::parse(&out[..layout.len]).unwrap();
            let notes = dump.image_notes().unwrap();
            assert_eq!(notes.phdr_addr, image.phdr_addr());
            assert_eq!(notes.files.entries().count(), image.mappings().len());
        });
    }
    assert!(accepted > ITERATIONS / 20, "only {accepted} mutants parsed");
}

#[test]
fn mutated_crash_notes_never_panic_the_reader() {
    let valid = elfcore::tests::with_crash_record(|record| {
        let mut desc = vec![0u8; record.desc_len().unwrap()];
        record.write(&mut desc).unwrap();
        desc
    });
    let mut rng = Rng::new(0x6876_6372_6173);
    let mut accepted = 0;
    for _ in 0..ITERATIONS {
        let input = mutate(&mut rng, &valid, 0..32);
        if let Ok(note) = CrashNote::parse(&input) {
            accepted += 1;
            let _ = (note.reason(), note.stragglers().count());
            for cpu in note.cpus() {
                assert_eq!(cpu.vmclears().count(), cpu.vmclear_count());
            }
        }
    }
    assert!(accepted > ITERATIONS / 20, "only {accepted} mutants parsed");
}

#[test]
fn random_firmware_maps_never_panic_the_e820_builder() {
    let mut rng = Rng::new(0x6538_3230_6d61);
    let reservation = PhysRange::new(0x4000_0000, 0x1000_0000);
    let elfcorehdr = PhysRange::new(0x4000_0000, 0x1000);
    for _ in 0..ITERATIONS {
        let count = rng.below(140);
        let firmware: Vec<E820Entry> = (0..count)
            .map(|_| {
                let pick = |rng: &mut Rng| {
                    if rng.below(3) == 0 {
                        INTERESTING[rng.below(INTERESTING.len())]
                    } else {
                        rng.next_u64() >> rng.below(64)
                    }
                };
                E820Entry::new(pick(&mut rng), pick(&mut rng), rng.below(8) as u32)
            })
            .collect();
        if let Ok(table) = E820Table::for_capture(&firmware, reservation, elfcorehdr) {
            let entries = table.entries();
            assert!(entries.windows(2).all(|w| w[0].addr <= w[1].addr));
            assert!(entries.iter().all(|e| e.size > 0));
        }
    }
}

/// Everything the boot path does with an hv capture image that parsed.
fn exercise_pvh_image(bytes: &[u8]) {
    use crate::pvh::tests::{firmware_map, reservation, usable};
    let Ok(image) = PvhImage::parse(bytes) else {
        return;
    };
    let segments = image.load_segments();
    assert!(!segments.is_empty());
    for (i, segment) in segments.iter().enumerate() {
        assert!(segment.range().end().is_some());
        assert!(segment.file_len as u64 <= segment.mem_len);
        assert_eq!(image.segment_bytes(segment).len(), segment.file_len);
        assert!(segment.file_offset + segment.file_len <= bytes.len());
        for other in &segments[..i] {
            assert!(!other.range().overlaps(&segment.range()));
        }
    }
    let entry = u64::from(image.entry());
    assert!(
        segments
            .iter()
            .any(|s| s.range().contains(&PhysRange::new(entry, 1)))
    );
    let Ok(layout) = image.place(usable(), 0x2345) else {
        return;
    };
    assert!(usable().contains(&layout.image));
    assert!(usable().contains(&layout.elfcorehdr));
    assert!(layout.elfcorehdr.is_page_aligned());
    assert!(layout.elfcorehdr.start >= layout.image.start + layout.image.len);
    for segment in segments.iter().filter(|s| s.mem_len <= 1 << 20) {
        let mut memory = vec![0xAA; segment.mem_len as usize];
        image.write_segment(segment, &mut memory).unwrap();
    }
    let firmware = firmware_map();
    let mut data = vec![0u8; 0x2000];
    let config = BootDataConfig {
        firmware: &firmware,
        reservation: reservation(),
        elfcorehdr: layout.elfcorehdr,
        keep_out: PhysRange::new(0, 0),
        rsdp: None,
        cmdline: &"capture_mode=1",
    };
    let written = write_boot_data(&mut data, 0x4fff_7000, &config).unwrap();
    let read = |paddr: u64, len: usize| {
        let offset = usize::try_from(paddr.checked_sub(0x4fff_7000)?).ok()?;
        crate::bytes::slice_at(&data, offset, len)
    };
    let boot = hv_abi::pvh::decode(0x4fff_7000, read).unwrap();
    assert_eq!(boot.memmap.len(), written.memmap_entries as usize);
}

#[test]
fn mutated_pvh_images_never_panic_the_loader() {
    let valid = crate::pvh::tests::hv_like();
    exercise_pvh_image(&valid);
    let program_headers = 64 + 5 * 56;
    let mut rng = Rng::new(0x7076_6869_6d67);
    let mut accepted = 0;
    for round in 0..ITERATIONS {
        // Half the rounds aim at the headers, half at the notes.
        let hot = if round % 2 == 0 {
            0..program_headers
        } else {
            0x3700..0x3750
        };
        let input = mutate(&mut rng, &valid, hot);
        if PvhImage::parse(&input).is_ok() {
            accepted += 1;
        }
        exercise_pvh_image(&input);
    }
    assert!(accepted > ITERATIONS / 20, "only {accepted} mutants parsed");
}

#[test]
fn random_bytes_never_panic_the_pvh_parser() {
    let mut rng = Rng::new(0x7261_6e64_656c);
    let valid = crate::pvh::tests::hv_like();
    for _ in 0..ITERATIONS {
        let len = rng.below(600);
        let mut input: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        // Keep a valid ELF identification half of the time, so the
        // program header checks are reached.
        if rng.below(2) == 0 && len >= 64 {
            input[..24].copy_from_slice(&valid[..24]);
            input[54..58].copy_from_slice(&valid[54..58]);
        }
        exercise_pvh_image(&input);
    }
}

#[test]
fn random_firmware_maps_never_panic_the_pvh_boot_data_or_the_dump_segments() {
    use crate::elfcore::MemorySegment;
    use crate::segments::{SegmentsError, ram_outside_reservation};
    let mut rng = Rng::new(0x7076_6864_6174);
    let reservation = PhysRange::new(0x4000_0000, 0x1000_0000);
    let elfcorehdr = PhysRange::new(0x4000_8000, 0x3000);
    for _ in 0..ITERATIONS {
        let count = rng.below(140);
        let firmware: Vec<E820Entry> = (0..count)
            .map(|_| {
                let pick = |rng: &mut Rng| {
                    if rng.below(3) == 0 {
                        INTERESTING[rng.below(INTERESTING.len())]
                    } else {
                        rng.next_u64() >> rng.below(64)
                    }
                };
                E820Entry::new(pick(&mut rng), pick(&mut rng), rng.below(8) as u32)
            })
            .collect();
        let mut data = vec![0u8; 56 + 24 * rng.below(200) + rng.below(64)];
        let config = BootDataConfig {
            firmware: &firmware,
            reservation,
            elfcorehdr,
            keep_out: PhysRange::new(0, 0),
            rsdp: Some(0xe_0000),
            cmdline: &"capture_mode=0x40008000",
        };
        if let Ok(written) = write_boot_data(&mut data, 0x4fff_0000, &config) {
            let read = |paddr: u64, len: usize| {
                let offset = usize::try_from(paddr.checked_sub(0x4fff_0000)?).ok()?;
                crate::bytes::slice_at(&data, offset, len)
            };
            let boot = hv_abi::pvh::decode(0x4fff_0000, read).unwrap();
            let map: Vec<_> = boot.memmap.iter().collect();
            assert_eq!(map.len(), written.memmap_entries as usize);
            assert!(map.windows(2).all(|w| w[0].addr <= w[1].addr));
            assert!(map.iter().all(|e| e.size > 0));
            // Nothing outside the reservation is RAM to the capture image.
            for entry in map.iter().filter(|e| e.kind == 1) {
                assert!(reservation.contains(&PhysRange::new(entry.addr, entry.size)));
            }
        }
        let mut segments = vec![
            MemorySegment {
                phys: 0,
                virt: 0,
                len: 0
            };
            rng.below(80)
        ];
        match ram_outside_reservation(&firmware, reservation, &mut segments) {
            Ok(count) => {
                let segments = &segments[..count];
                assert!(
                    segments
                        .windows(2)
                        .all(|w| w[0].phys + w[0].len < w[1].phys)
                );
                assert!(
                    segments
                        .iter()
                        .all(|s| s.len > 0 && !s_overlaps(s, reservation))
                );
            }
            Err(SegmentsError::TooManySegments { needed, capacity }) => {
                assert!(needed > capacity)
            }
            Err(error) => panic!("{error}"),
        }
    }
}

fn s_overlaps(segment: &crate::elfcore::MemorySegment, range: PhysRange) -> bool {
    PhysRange::new(segment.phys, segment.len).overlaps(&range)
}

/// Regression inputs: each one once broke (or nearly broke) a parser.
mod regressions {
    use super::*;

    /// A note size near `u32::MAX` must not wrap the 4-byte rounding.
    #[test]
    fn a_note_size_that_would_wrap_when_rounded_is_refused() {
        let (mut bytes, layout) = elfcore::tests::write(Placement::File);
        let first = layout.notes.start;
        bytes[first + 4..first + 8].copy_from_slice(&0xffff_fffdu32.to_le_bytes());
        assert!(CoreDump::parse(&bytes).is_err());
    }
}
