//! The purgatory's SHA-256 against `sha2` (its XXH64 is checked in
//! `digest`'s tests), the area's layout byte by byte,
//! the purgatory's own check (the blob's code, compiled for the host) on
//! built areas, every refusal, and the kernel's sealed table.

use super::check::{Line, Memory, Refusal, check, mailbox_text, refusal_lines};
use super::*;
use crate::digest::sha256 as sha2_256;

const MIB: u64 = 1 << 20;
/// The fake machine's memory: `[BASE, BASE + SIZE)`.
const BASE: u64 = 0x1000_0000;
const SIZE: u64 = 4 * MIB;
/// The area: the reservation's end, as the kernel places it.
const AREA: u64 = BASE + SIZE - AREA_BYTES;

/// Offsets of the fake blob's handlers.
const NMI64: u32 = 0x100;
const NMI32: u32 = 0x110;
const FAULT32: u32 = 0x120;
const FAULT64: u32 = 0x200;

/// A blob with a valid header and filler bytes.
fn fake_blob() -> Vec<u8> {
    let mut blob: Vec<u8> = (0..0x600u32).map(|i| (i * 7 % 251) as u8).collect();
    blob[..2].copy_from_slice(&[0xEB, 0x2E]);
    blob[0x10..0x18].copy_from_slice(b"HVPURGAT");
    for (at, value) in [
        (0x18, NMI64),
        (0x1C, FAULT64),
        (0x20, NMI32),
        (0x24, FAULT32),
        (0x28, 16),
        (0x2C, 0),
    ] {
        blob[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
    blob
}

/// Physical memory of the fake machine.
struct Machine {
    bytes: Vec<u8>,
}

impl Memory for Machine {
    fn bytes(&self, start: u64, len: u64) -> Option<&[u8]> {
        let offset = usize::try_from(start.checked_sub(BASE)?).ok()?;
        self.bytes
            .get(offset..offset.checked_add(usize::try_from(len).ok()?)?)
    }
}

impl Machine {
    fn at(&mut self, address: u64) -> &mut u8 {
        &mut self.bytes[(address - BASE) as usize]
    }

    fn slice(&self, start: u64, len: u64) -> &[u8] {
        Memory::bytes(self, start, len).unwrap()
    }
}

/// Three loaded segments and the boot data room, digested with `sha2`,
/// and the area built over them.
struct Loaded {
    machine: Machine,
    segments: Vec<SegmentDigest>,
}

fn segments_of(machine: &Machine, ranges: &[(u64, u64)]) -> Vec<SegmentDigest> {
    segments_with(machine, ranges, Algorithm::default())
}

fn segments_with(
    machine: &Machine,
    ranges: &[(u64, u64)],
    algorithm: Algorithm,
) -> Vec<SegmentDigest> {
    let mut table = DigestTable::<MAX_SEGMENTS>::new().with_algorithm(algorithm);
    for &(start, len) in ranges {
        table.record(start, machine.slice(start, len)).unwrap();
    }
    table.entries().to_vec()
}

fn loaded(entry: Entry, options: Options) -> Loaded {
    let mut machine = Machine {
        bytes: (0..SIZE).map(|i| (i * 131 % 253) as u8).collect(),
    };
    let ranges = [
        (BASE, 1_234_567),
        (BASE + 2 * MIB, 4096),
        (BASE + 3 * MIB, 77),
        (AREA + BOOT_DATA_OFFSET as u64, 300),
    ];
    let segments = segments_with(&machine, &ranges, options.digest);
    let offset = (AREA - BASE) as usize;
    build(
        &mut machine.bytes[offset..offset + BUILT_BYTES],
        &fake_blob(),
        AREA,
        entry,
        &segments,
        options,
    )
    .unwrap();
    Loaded { machine, segments }
}

const LINUX: Entry = Entry::Linux64 {
    entry: BASE + 0x200,
    zero_page: BASE + 2 * MIB,
};
const PVH: Entry = Entry::Pvh32 {
    entry: (BASE + 0x1000) as u32,
    start_info: (AREA + BOOT_DATA_OFFSET as u64) as u32,
};

fn area_u64(machine: &Machine, offset: usize) -> u64 {
    abi::u64_at(machine.slice(AREA + offset as u64, 8), 0).unwrap()
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_purgatory_sha256_matches_sha2_at_every_padding_length() {
    // Every length across one and two padding blocks, then sizes that
    // cross many blocks, on patterned and on zero bytes.
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for len in (0..=200).chain([511, 512, 513, 4095, 4096, 65_537, 299_999, 300_000]) {
        assert_eq!(
            hex(&sha256::digest(&data[..len])),
            hex(&sha2_256(&data[..len])),
            "length {len}"
        );
    }
    let zeros = vec![0u8; 1 << 20];
    assert_eq!(sha256::digest(&zeros), sha2_256(&zeros));
    assert_eq!(
        hex(&sha256::digest(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        hex(&sha256::digest(b"")),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn a_built_area_passes_the_purgatorys_own_check() {
    for entry in [LINUX, PVH] {
        for digest in [Algorithm::Xxh64, Algorithm::Sha256] {
            let options = Options {
                digest,
                ..Options::default()
            };
            let loaded = loaded(entry, options);
            assert_eq!(check(AREA, &loaded.machine), Ok(()), "{entry:?} {digest:?}");
            let code = area_u64(&loaded.machine, abi::PARAMETERS_OFFSET + abi::param::DIGEST);
            assert_eq!(code, digest.code());
        }
    }
}

#[test]
fn the_purgatory_sums_with_the_algorithm_its_parameters_name() {
    // Segments summed with SHA-256 but an area that says XXH64: the seal
    // holds (it was taken with XXH64) and the first segment is refused.
    let mut machine = Machine {
        bytes: (0..SIZE).map(|i| (i * 131 % 253) as u8).collect(),
    };
    let segments = segments_with(&machine, &[(BASE, 4096)], Algorithm::Sha256);
    let offset = (AREA - BASE) as usize;
    build(
        &mut machine.bytes[offset..offset + BUILT_BYTES],
        &fake_blob(),
        AREA,
        LINUX,
        &segments,
        Options::default(),
    )
    .unwrap();
    assert_eq!(
        check(AREA, &machine),
        Err(Refusal::SegmentChanged {
            index: 0,
            start: BASE,
            len: 4096
        })
    );
    // A parameter naming no algorithm (0 included) is refused before the
    // seal is read.
    for code in [0u64, 3, u64::MAX] {
        let mut loaded = loaded(LINUX, Options::default());
        let at = AREA + (abi::PARAMETERS_OFFSET + abi::param::DIGEST) as u64;
        for (i, byte) in code.to_le_bytes().into_iter().enumerate() {
            *loaded.machine.at(at + i as u64) = byte;
        }
        assert_eq!(
            check(AREA, &loaded.machine),
            Err(Refusal::UnknownDigest { code })
        );
    }
}

#[test]
fn the_parameters_say_where_to_go() {
    let loaded = loaded(
        PVH,
        Options {
            exit_emulator: true,
            self_nmi: false,
            digest: Algorithm::Xxh64,
            mailbox: 0,
        },
    );
    let m = &loaded.machine;
    let p = |field| area_u64(m, abi::PARAMETERS_OFFSET + field);
    assert_eq!(p(abi::param::MAGIC), abi::MAGIC);
    assert_eq!(p(abi::param::AREA), AREA);
    assert_eq!(p(abi::param::MODE), abi::MODE_PVH32);
    assert_eq!(p(abi::param::ENTRY), BASE + 0x1000);
    assert_eq!(p(abi::param::ARGUMENT), AREA + BOOT_DATA_OFFSET as u64);
    assert_eq!(p(abi::param::CR3), AREA + abi::PAGE_TABLES_OFFSET as u64);
    assert_eq!(p(abi::param::FLAGS), abi::flags::EXIT_EMULATOR);

    let loaded = loaded_linux_with_nmi();
    let m = &loaded.machine;
    let p = |field| area_u64(m, abi::PARAMETERS_OFFSET + field);
    assert_eq!(p(abi::param::MODE), abi::MODE_LINUX64);
    assert_eq!(p(abi::param::ENTRY), BASE + 0x200);
    assert_eq!(p(abi::param::ARGUMENT), BASE + 2 * MIB);
    assert_eq!(p(abi::param::FLAGS), abi::flags::SELF_NMI);
}

fn loaded_linux_with_nmi() -> Loaded {
    loaded(
        LINUX,
        Options {
            exit_emulator: false,
            self_nmi: true,
            digest: Algorithm::Sha256,
            mailbox: 0,
        },
    )
}

/// The base and limit of an `lgdt`/`lidt` operand in the parameters.
fn pointer(machine: &Machine, field: usize) -> (u64, u16) {
    let bytes = machine.slice(AREA + (abi::PARAMETERS_OFFSET + field) as u64, 10);
    (
        u64::from_le_bytes(bytes[2..10].try_into().unwrap()),
        u16::from_le_bytes([bytes[0], bytes[1]]),
    )
}

/// (handler, selector, type byte, IST) of a 64-bit gate.
fn decode64(gate: &[u8]) -> (u64, u16, u8, u8) {
    let handler = u64::from(u16::from_le_bytes([gate[0], gate[1]]))
        | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16
        | u64::from(u32::from_le_bytes(gate[8..12].try_into().unwrap())) << 32;
    (
        handler,
        u16::from_le_bytes([gate[2], gate[3]]),
        gate[5],
        gate[4] & 7,
    )
}

/// (handler, selector, type byte) of a 32-bit gate.
fn decode32(gate: &[u8]) -> (u64, u16, u8) {
    let handler = u64::from(u16::from_le_bytes([gate[0], gate[1]]))
        | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16;
    (handler, u16::from_le_bytes([gate[2], gate[3]]), gate[5])
}

#[test]
fn every_idt_points_each_vector_at_the_blob_with_the_right_selector() {
    let loaded = loaded(LINUX, Options::default());
    let m = &loaded.machine;
    let handler = |offset: u32| AREA + u64::from(offset);
    for (field, offset, selector) in [
        (abi::param::IDTR64_ENTRY, abi::IDT64_ENTRY_OFFSET, 0x08),
        (abi::param::IDTR64_EXIT, abi::IDT64_EXIT_OFFSET, 0x10),
    ] {
        assert_eq!(pointer(m, field), (AREA + offset as u64, 511));
        for vector in 0..32u64 {
            let gate = m.slice(AREA + offset as u64 + vector * 16, 16);
            let expected = if vector == 2 {
                handler(NMI64)
            } else {
                handler(FAULT64) + vector * 16
            };
            assert_eq!(
                decode64(gate),
                (expected, selector, 0x8E, 0),
                "vector {vector}"
            );
        }
    }
    // The 32-bit IDT: every vector's 32-bit gate, but for 4 and 5, whose
    // bytes hold the NMI gate read as a 64-bit one (16-byte gates).
    let idt32 = AREA + abi::IDT32_OFFSET as u64;
    assert_eq!(pointer(m, abi::param::IDTR32), (idt32, 255));
    for vector in (0..32u64).filter(|v| !matches!(v, 4 | 5)) {
        let gate = m.slice(idt32 + vector * 8, 8);
        let expected = if vector == 2 {
            handler(NMI32)
        } else {
            handler(FAULT32)
        };
        assert_eq!(decode32(gate), (expected, 0x20, 0x8E), "vector {vector}");
    }
    assert_eq!(
        decode64(m.slice(idt32 + 2 * 16, 16)),
        (handler(NMI64), 0x08, 0x8E, 0)
    );
}

#[test]
fn the_gdt_holds_the_boot_protocols_segments_with_accessed_bits_set() {
    let loaded = loaded(PVH, Options::default());
    let m = &loaded.machine;
    assert_eq!(
        pointer(m, abi::param::GDTR),
        (AREA + abi::GDT_OFFSET as u64, 0x2F)
    );
    let descriptor = |selector: u16| area_u64(m, abi::GDT_OFFSET + usize::from(selector));
    let kind = |selector: u16| (descriptor(selector) >> 40) & 0xFF;
    let long = |selector: u16| descriptor(selector) >> 53 & 1 == 1;
    let default32 = |selector: u16| descriptor(selector) >> 54 & 1 == 1;
    // Both 64-bit code selectors (0x08: the crashed hv's too, 0x10:
    // Linux's __BOOT_CS), flat data (__BOOT_DS), 32-bit code for PVH.
    for code64 in [0x08, 0x10] {
        assert_eq!(kind(code64), 0x9B);
        assert!(long(code64) && !default32(code64));
    }
    assert_eq!(kind(0x18), 0x93);
    assert_eq!(kind(0x20), 0x9B);
    assert!(!long(0x20) && default32(0x20));
    // Base 0 and limit 4 GiB (granularity 4 KiB, limit 0xFFFFF).
    for selector in [0x18, 0x20] {
        let d = descriptor(selector);
        assert_eq!(d & 0xFFFF | (d >> 32 & 0xF_0000), 0xF_FFFF);
        assert_eq!(d >> 16 & 0xFF_FFFF | (d >> 56) << 24, 0);
        assert_eq!(d >> 55 & 1, 1);
    }
    // The PVH ABI's TR: an available 32-bit TSS, base 0, limit 0x67.
    assert_eq!(descriptor(0x28), 0x0000_8900_0000_0067);
}

#[test]
fn the_page_tables_map_the_first_four_gib_one_to_one() {
    let loaded = loaded(LINUX, Options::default());
    let m = &loaded.machine;
    let entry = |table: u64, index: u64| abi::u64_at(m.slice(table + index * 8, 8), 0).unwrap();
    let pml4 = area_u64(m, abi::PARAMETERS_OFFSET + abi::param::CR3);
    let translate = |virtual_address: u64| -> Option<u64> {
        let e = entry(pml4, virtual_address >> 39 & 511);
        if e & 1 == 0 {
            return None;
        }
        assert_eq!(e & 0xFFF, 0x23, "PML4 entries come accessed");
        let e = entry(e & !0xFFF, virtual_address >> 30 & 511);
        if e & 1 == 0 {
            return None;
        }
        assert_eq!(e & 0xFFF, 0x23);
        let e = entry(e & !0xFFF, virtual_address >> 21 & 511);
        assert_eq!(e & 0xFFF, 0xE3, "2 MiB pages come accessed and dirty");
        Some((e & !0x1F_FFFF) | (virtual_address & 0x1F_FFFF))
    };
    for address in [
        0,
        0x1234_5678,
        AREA,
        AREA + 0xFFFF,
        (4 << 30) - 1,
        0xFEE0_0300,
    ] {
        assert_eq!(translate(address), Some(address), "{address:#x}");
    }
    assert_eq!(translate(4 << 30), None);
    assert_eq!(translate(1 << 39), None);
}

#[test]
fn the_table_and_seal_are_where_the_purgatory_reads_them() {
    let loaded = loaded(LINUX, Options::default());
    let m = &loaded.machine;
    let table = abi::TABLE_OFFSET;
    assert_eq!(area_u64(m, table), 4);
    assert_eq!(area_u64(m, table + 8), !4);
    for (index, segment) in loaded.segments.iter().enumerate() {
        let slot = table + abi::table::ENTRIES + index * abi::table::ENTRY_BYTES;
        assert_eq!(area_u64(m, slot), segment.range.start);
        assert_eq!(area_u64(m, slot + 8), segment.range.len);
        assert_eq!(m.slice(AREA + slot as u64 + 16, 32), segment.digest);
    }
    let sealed = m.slice(AREA, abi::SEALED_BYTES as u64);
    assert_eq!(
        m.slice(AREA + abi::SEAL_OFFSET as u64, 32),
        crate::digest::xxh64::digest(sealed)
    );
    assert!(
        m.slice(AREA + abi::SCRATCH_OFFSET as u64, abi::scratch::END as u64)
            .iter()
            .all(|&b| b == 0)
    );
    // The blob is at the start, and nothing past the built part was
    // touched (the boot data room belongs to the kernel's loader).
    assert_eq!(m.slice(AREA, 0x600), fake_blob());
    let untouched = BASE + SIZE - AREA_BYTES + BUILT_BYTES as u64;
    assert_eq!(
        m.slice(untouched, 16),
        (untouched - BASE..untouched - BASE + 16)
            .map(|i| (i * 131 % 253) as u8)
            .collect::<Vec<_>>()
    );
}

/// The refusal for `damage` done to a freshly built area.
fn refusal_after(damage: impl FnOnce(&mut Loaded)) -> Refusal {
    let mut loaded = loaded(PVH, Options::default());
    damage(&mut loaded);
    check(AREA, &loaded.machine).expect_err("the damage must be refused")
}

/// Overwrites a `u64` of the area.
fn poke(loaded: &mut Loaded, offset: usize, value: u64) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        *loaded.machine.at(AREA + (offset + i) as u64) = byte;
    }
}

#[test]
fn each_damage_is_refused_and_named() {
    let table = abi::TABLE_OFFSET;
    assert_eq!(
        refusal_after(|l| {
            poke(l, table, 0);
            poke(l, table + 8, 0);
        }),
        Refusal::EmptyTable
    );
    assert_eq!(refusal_after(|l| poke(l, table, 0)), Refusal::EmptyTable);
    assert_eq!(
        refusal_after(|l| poke(l, table, 3)),
        Refusal::CountDisagrees {
            count: 3,
            check: !4
        }
    );
    assert_eq!(
        refusal_after(|l| {
            poke(l, table, MAX_SEGMENTS as u64 + 1);
            poke(l, table + 8, !(MAX_SEGMENTS as u64 + 1));
        }),
        Refusal::TooManySegments {
            count: MAX_SEGMENTS as u64 + 1
        }
    );
    // A consistent but shorter count, a changed digest, a byte of code,
    // a parameter, an IDT gate, a page-table entry: all under the seal.
    for offset in [
        abi::TABLE_OFFSET + abi::table::ENTRIES + 20,
        0x40,
        abi::PARAMETERS_OFFSET + abi::param::ENTRY,
        abi::IDT64_ENTRY_OFFSET + 2 * 16,
        abi::PAGE_TABLES_OFFSET + 0x2000,
        abi::SEAL_OFFSET + 31,
    ] {
        assert_eq!(
            refusal_after(|l| *l.machine.at(AREA + offset as u64) ^= 1),
            Refusal::SealMismatch,
            "a bit flipped at {offset:#x}"
        );
    }
    assert_eq!(
        refusal_after(|l| {
            poke(l, table, 3);
            poke(l, table + 8, !3);
        }),
        Refusal::SealMismatch
    );
    assert_eq!(
        refusal_after(|l| *l.machine.at(BASE + 2 * MIB + 4095) ^= 0x80),
        Refusal::SegmentChanged {
            index: 1,
            start: BASE + 2 * MIB,
            len: 4096
        }
    );
    // The boot data room is a segment of its own.
    assert_eq!(
        refusal_after(|l| *l.machine.at(AREA + BOOT_DATA_OFFSET as u64) ^= 1),
        Refusal::SegmentChanged {
            index: 3,
            start: AREA + BOOT_DATA_OFFSET as u64,
            len: 300
        }
    );
    assert_eq!(
        refusal_after(|l| poke(l, abi::PARAMETERS_OFFSET, 0)),
        Refusal::BadMagic
    );
    assert_eq!(
        refusal_after(|l| poke(l, abi::PARAMETERS_OFFSET + abi::param::AREA, AREA + 4096)),
        Refusal::WrongArea {
            built_for: AREA + 4096,
            running_at: AREA
        }
    );
}

#[test]
fn segments_the_purgatory_cannot_read_are_refused() {
    let mut loaded = loaded(LINUX, Options::default());
    // A machine whose first segment's memory is gone.
    loaded.machine.bytes.drain(..0x1000);
    let shifted = Machine {
        bytes: loaded.machine.bytes,
    };
    // The area moved with the drain: check it where it now sits, with a
    // memory view that puts it back.
    struct Holed<'a>(&'a Machine);
    impl Memory for Holed<'_> {
        fn bytes(&self, start: u64, len: u64) -> Option<&[u8]> {
            Memory::bytes(self.0, start.checked_sub(0x1000)?, len)
                .filter(|_| start >= BASE + 0x1000)
        }
    }
    assert_eq!(
        check(AREA, &Holed(&shifted)),
        Err(Refusal::SegmentUnreadable {
            index: 0,
            start: BASE,
            len: 1_234_567
        })
    );
    struct Nothing;
    impl Memory for Nothing {
        fn bytes(&self, _: u64, _: u64) -> Option<&[u8]> {
            None
        }
    }
    assert_eq!(check(AREA, &Nothing), Err(Refusal::AreaUnreadable));
}

/// The text between the report line's quotes.
fn reported(refusal: &Refusal) -> String {
    let mut line = Line::new();
    refusal_lines(refusal, &mut line);
    let text = String::from_utf8(line.as_bytes().to_vec()).unwrap();
    let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 2, "{text:?}");
    assert!(lines[0].starts_with("*** purgatory: "), "{text:?}");
    assert!(
        lines[0].ends_with("; not entering the capture kernel"),
        "{text:?}"
    );
    let prefix = "@hv {\"capture\":{\"purgatory_refused\":\"";
    let reason = lines[1]
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix("\"}}"))
        .unwrap_or_else(|| panic!("not a report line: {:?}", lines[1]));
    assert!(!reason.contains(['"', '\\']), "{reason}");
    assert!(lines[0].contains(reason));
    reason.to_owned()
}

#[test]
fn every_refusal_writes_a_report_line_that_names_it() {
    let cases = [
        (Refusal::AreaUnreadable, "cannot be read"),
        (Refusal::BadMagic, "no magic"),
        (
            Refusal::WrongArea {
                built_for: 0x1000,
                running_at: 0x2000,
            },
            "built for 0x1000 but runs at 0x2000",
        ),
        (Refusal::EmptyTable, "the digest table is empty (count 0)"),
        (
            Refusal::CountDisagrees { count: 0, check: 0 },
            "count 0x0 disagrees with its check word 0x0",
        ),
        (
            Refusal::TooManySegments { count: 25 },
            "count 25 exceeds its 24 entries",
        ),
        (
            Refusal::UnknownDigest { code: 7 },
            "name no digest algorithm (7)",
        ),
        (Refusal::SealMismatch, "changed since it was built"),
        (
            Refusal::SegmentUnreadable {
                index: 12,
                start: 0x1_0000_0000,
                len: 0x10,
            },
            "segment 12 at 0x100000000 (0x10 bytes) lies outside",
        ),
        (
            Refusal::SegmentChanged {
                index: 0,
                start: 0x1f00_0000,
                len: 0x7_a120,
            },
            "segment 0 at 0x1f000000 (0x7a120 bytes) changed since it was loaded",
        ),
        (
            Refusal::Exception {
                vector: 13,
                rip: 0xffff_ffff_ffff_ffff,
            },
            "exception 13 at 0xffffffffffffffff",
        ),
    ];
    for (refusal, words) in cases {
        let reason = reported(&refusal);
        assert!(reason.contains(words), "{refusal:?}: {reason}");
    }
    // The longest line still ends whole.
    let mut line = Line::new();
    refusal_lines(&Refusal::SealMismatch, &mut line);
    assert!(line.as_bytes().ends_with(b"\"}}\r\n"));
}

#[test]
fn bad_inputs_are_build_errors() {
    let machine = Machine {
        bytes: vec![0; SIZE as usize],
    };
    let segments = segments_of(&machine, &[(BASE, 4096)]);
    let blob = fake_blob();
    let mut out = vec![0u8; BUILT_BYTES];
    let mut try_build = |blob: &[u8], area: u64, segments: &[SegmentDigest]| {
        build(&mut out, blob, area, LINUX, segments, Options::default())
    };
    assert_eq!(try_build(&blob, AREA, &segments), Ok(()));
    assert_eq!(
        try_build(&blob, AREA + 8, &segments),
        Err(BuildError::AreaMisaligned(AREA + 8))
    );
    assert_eq!(
        try_build(&blob, (4 << 30) - 4096, &segments),
        Err(BuildError::AreaAbove4GiB((4 << 30) - 4096))
    );
    assert_eq!(try_build(&blob, AREA, &[]), Err(BuildError::NoSegments));
    let many = vec![segments[0]; MAX_SEGMENTS + 1];
    assert_eq!(
        try_build(&blob, AREA, &many),
        Err(BuildError::TooManySegments(MAX_SEGMENTS + 1))
    );
    let inside = SegmentDigest {
        range: PhysRange::new(AREA + 0x100, 16),
        digest: [0; 32],
    };
    assert_eq!(
        try_build(&blob, AREA, &[segments[0], inside]),
        Err(BuildError::SegmentInArea {
            index: 1,
            range: inside.range
        })
    );
    let high = SegmentDigest {
        range: PhysRange::new((4 << 30) - 8, 16),
        digest: [0; 32],
    };
    assert_eq!(
        try_build(&blob, AREA, &[high]),
        Err(BuildError::SegmentAbove4GiB {
            index: 0,
            range: high.range
        })
    );
    assert_eq!(
        try_build(&vec![0; abi::BLOB_MAX + 1], AREA, &segments),
        Err(BuildError::BlobTooLarge(abi::BLOB_MAX + 1))
    );
    assert_eq!(
        try_build(&blob[..0x20], AREA, &segments),
        Err(BuildError::BlobHeader("cut short"))
    );
    let mut no_magic = blob.clone();
    no_magic[0x10] = 0;
    assert_eq!(
        try_build(&no_magic, AREA, &segments),
        Err(BuildError::BlobHeader("no magic"))
    );
    assert!(matches!(
        try_build(&blob[..0x300], AREA, &segments),
        Err(BuildError::BlobHeader(_))
    ));
    let mut small = vec![0u8; BUILT_BYTES - 1];
    assert_eq!(
        build(
            &mut small,
            &blob,
            AREA,
            LINUX,
            &segments,
            Options::default()
        ),
        Err(BuildError::BufferTooSmall(BUILT_BYTES - 1))
    );
    for error in [
        BuildError::BufferTooSmall(1),
        BuildError::NoSegments,
        BuildError::SegmentInArea {
            index: 1,
            range: inside.range,
        },
        BuildError::BadMailbox(3),
    ] {
        assert!(error.to_string().len() > 20, "{error}");
    }
}

#[test]
fn a_mailbox_must_lie_apart_and_within_reach() {
    let machine = Machine {
        bytes: vec![0; SIZE as usize],
    };
    let segments = segments_of(&machine, &[(BASE, 4096)]);
    let mut out = vec![0u8; BUILT_BYTES];
    let with_mailbox = |mailbox| Options {
        mailbox,
        ..Options::default()
    };
    for bad in [
        BASE + 2 * MIB + 4, // misaligned
        BASE + 0x800,       // over a segment
        AREA - 0x1000,      // runs into the area
        AREA + 0x100,       // inside it
        (4 << 30) - 0x1000, // past 4 GiB
    ] {
        assert_eq!(
            build(
                &mut out,
                &fake_blob(),
                AREA,
                LINUX,
                &segments,
                with_mailbox(bad)
            ),
            Err(BuildError::BadMailbox(bad)),
            "{bad:#x}"
        );
    }
    let good = BASE + 2 * MIB;
    build(
        &mut out,
        &fake_blob(),
        AREA,
        LINUX,
        &segments,
        with_mailbox(good),
    )
    .unwrap();
    let at = abi::PARAMETERS_OFFSET + abi::param::MAILBOX;
    assert_eq!(abi::u64_at(&out, at), Some(good));
}

#[test]
fn the_mailbox_text_is_read_only_when_intact() {
    use abi::mailbox::*;
    let mailbox = BASE + 2 * MIB;
    let write = |machine: &mut Machine, magic: u64, len: u64, text: &[u8]| {
        let offset = (mailbox - BASE) as usize;
        machine.bytes[offset..offset + 8].copy_from_slice(&magic.to_le_bytes());
        machine.bytes[offset + 8..offset + 16].copy_from_slice(&len.to_le_bytes());
        machine.bytes[offset + 16..offset + 16 + text.len()].copy_from_slice(text);
    };
    let mut machine = Machine {
        bytes: vec![0; SIZE as usize],
    };
    let text = b"*** hv: shootdown\n@hv {\"crash\":{}}\n";
    assert_eq!(mailbox_text(mailbox, &machine), None, "no magic");
    write(&mut machine, MAGIC, text.len() as u64, text);
    assert_eq!(mailbox_text(mailbox, &machine), Some(&text[..]));
    assert_eq!(mailbox_text(0, &machine), None, "no mailbox");
    // A length beyond the box, or none, reads nothing.
    write(&mut machine, MAGIC, MAX_TEXT as u64 + 1, text);
    assert_eq!(mailbox_text(mailbox, &machine), None);
    write(&mut machine, MAGIC, 0, text);
    assert_eq!(mailbox_text(mailbox, &machine), None);
    write(&mut machine, MAGIC ^ 1, text.len() as u64, text);
    assert_eq!(mailbox_text(mailbox, &machine), None);
    // A byte that is not text ends it.
    let mut damaged = text.to_vec();
    damaged[9] = 0x1B;
    write(&mut machine, MAGIC, damaged.len() as u64, &damaged);
    assert_eq!(mailbox_text(mailbox, &machine), Some(&text[..9]));
    // Beyond the machine's memory: nothing.
    assert_eq!(mailbox_text(BASE + SIZE - 8, &machine), None);
}

#[test]
fn the_layout_fits_its_area() {
    use abi::*;
    let regions = [
        (0, BLOB_MAX),
        (PARAMETERS_OFFSET, param::END),
        (GDT_OFFSET, selector::GDT_BYTES),
        (IDT32_OFFSET, 32 * 8),
        (TABLE_OFFSET, table::MAX_BYTES),
        (IDT64_ENTRY_OFFSET, 32 * 16),
        (IDT64_EXIT_OFFSET, 32 * 16),
        (PAGE_TABLES_OFFSET, PAGE_TABLE_PAGES * 4096),
        (SEAL_OFFSET, 32),
        (SCRATCH_OFFSET, scratch::END),
        (BOOT_DATA_OFFSET, BOOT_DATA_BYTES),
    ];
    for pair in regions.windows(2) {
        let ((start, len), (next, _)) = (pair[0], pair[1]);
        assert!(
            start + len <= next,
            "{start:#x}+{len:#x} runs into {next:#x}"
        );
    }
    // And abi.rs's own compile-time checks hold the rest (stack room,
    // alignment, the seal before the scratch fields).
    assert_eq!(STACK_TOP_OFFSET as u64, AREA_BYTES);
    assert_eq!(BUILT_BYTES, BOOT_DATA_OFFSET);
}

fn sealed_table() -> (Machine, SealedTable<MAX_SEGMENTS>) {
    let machine = Machine {
        bytes: (0..SIZE).map(|i| (i % 241) as u8).collect(),
    };
    let mut table = DigestTable::new();
    table.record(BASE, machine.slice(BASE, 8192)).unwrap();
    table
        .record(BASE + MIB, machine.slice(BASE + MIB, 100))
        .unwrap();
    (machine, SealedTable::seal(table))
}

#[test]
fn the_kernels_sealed_table_verifies_when_intact() {
    let (machine, table) = sealed_table();
    assert_eq!(table.entries().len(), 2);
    assert_eq!(table.checked_entries().map(<[_]>::len), Ok(2));
    assert_eq!(
        table.verify(|start, len| Memory::bytes(&machine, start, len as u64)),
        Ok(())
    );
}

#[test]
fn a_zeroed_kernel_table_is_refused_not_trusted() {
    let (machine, mut table) = sealed_table();
    table.zero();
    assert!(table.entries().is_empty());
    let verdict = table.verify(|start, len| Memory::bytes(&machine, start, len as u64));
    assert_eq!(verdict, Err(CheckError::Table(TableError::Empty)));
    let text = verdict.unwrap_err().to_string();
    assert!(text.contains("digest table was damaged"), "{text}");
    assert!(text.contains("refusing to jump"), "{text}");
}

#[test]
fn each_damage_to_the_kernels_table_shows() {
    let (machine, table) = sealed_table();
    let read = |start, len: usize| Memory::bytes(&machine, start, len as u64);
    // The count alone zeroed: its check word disagrees.
    let count_zeroed = SealedTable {
        count: 0,
        ..table.clone()
    };
    assert_eq!(
        count_zeroed.verify(read),
        Err(CheckError::Table(TableError::Empty))
    );
    let count_changed = SealedTable {
        count: 1,
        ..table.clone()
    };
    assert_eq!(
        count_changed.verify(read),
        Err(CheckError::Table(TableError::CountDisagrees {
            count: 1,
            check: !2
        }))
    );
    // One entry lost, count and check word rewritten to match: the length
    // still disagrees with the sealed count, then the seal.
    let mut shorter = DigestTable::new();
    shorter.record(BASE, machine.slice(BASE, 8192)).unwrap();
    let lost = SealedTable {
        table: shorter.clone(),
        ..table.clone()
    };
    assert_eq!(
        lost.verify(read),
        Err(CheckError::Table(TableError::LengthChanged {
            now: 1,
            sealed: 2
        }))
    );
    let resealed_count = SealedTable {
        table: shorter,
        count: 1,
        count_check: !1,
        ..table.clone()
    };
    assert_eq!(
        resealed_count.verify(read),
        Err(CheckError::Table(TableError::SealMismatch))
    );
    // The memory changed, the table did not.
    let mut changed = machine.bytes.clone();
    changed[17] ^= 1;
    let changed = Machine { bytes: changed };
    let verdict = table.verify(|start, len| Memory::bytes(&changed, start, len as u64));
    assert!(matches!(
        verdict,
        Err(CheckError::Verify(VerifyError::Mismatch { index: 0, .. }))
    ));
    assert!(
        verdict
            .unwrap_err()
            .to_string()
            .contains("refusing to jump")
    );
}

#[test]
fn the_seal_sees_one_changed_entry_in_either_algorithm() {
    for algorithm in [Algorithm::Xxh64, Algorithm::Sha256] {
        let machine = Machine {
            bytes: (0..16384u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        };
        let mut digests = DigestTable::<MAX_SEGMENTS>::new().with_algorithm(algorithm);
        digests.record(BASE, machine.slice(BASE, 8192)).unwrap();
        digests
            .record(BASE + 8192, machine.slice(BASE + 8192, 4096))
            .unwrap();
        let sealed = SealedTable::seal(digests.clone());
        assert_eq!(sealed.checked_entries().map(<[_]>::len), Ok(2));
        // The same ranges, one digest changed after sealing.
        let mut other = DigestTable::<MAX_SEGMENTS>::new().with_algorithm(algorithm);
        other.record(BASE, machine.slice(BASE, 8192)).unwrap();
        other
            .record(BASE + 8192, machine.slice(BASE + 4096, 4096))
            .unwrap();
        let changed = SealedTable {
            table: other,
            ..sealed.clone()
        };
        assert_eq!(
            changed.checked_entries().unwrap_err(),
            TableError::SealMismatch,
            "{algorithm:?}"
        );
    }
}
