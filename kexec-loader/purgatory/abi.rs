//! The purgatory area, byte by byte: what the builder
//! (`kexec_loader::purgatory`) writes and the blob (`main.rs` beside this
//! file) reads. Both compile this one file, so they cannot disagree.
//!
//! The area is the last [`AREA_BYTES`] of the crash reservation, below
//! 4 GiB, 4 KiB aligned:
//!
//! | offset | bytes | what | written by |
//! |---|---|---|---|
//! | `0x0000` | up to [`BLOB_MAX`] | the blob: entry at 0, then the [`blob_header`] fields, code, constants | builder |
//! | [`PARAMETERS_OFFSET`] | 256 | the parameters ([`param`]) | builder |
//! | [`GDT_OFFSET`] | 48 | the GDT ([`selector`]) | builder |
//! | [`IDT32_OFFSET`] | 256 | 32-bit IDT, 32 gates; its NMI gate also reads as a 64-bit one | builder |
//! | [`TABLE_OFFSET`] | up to 1168 | the digest table ([`table`]) | builder |
//! | [`IDT64_ENTRY_OFFSET`] | 512 | 64-bit IDT, gates name selector `0x08` | builder |
//! | [`IDT64_EXIT_OFFSET`] | 512 | 64-bit IDT, gates name selector `0x10` | builder |
//! | [`PAGE_TABLES_OFFSET`] | 6 pages | identity map of the first 4 GiB | builder |
//! | [`SEAL_OFFSET`] | 32 | digest of `[0, SEALED_BYTES)` | builder |
//! | [`SCRATCH_OFFSET`] | 64 | TSC stamps and NMI counts ([`scratch`]) | the purgatory, at run time |
//! | [`BOOT_DATA_OFFSET`] | [`BOOT_DATA_BYTES`] | PVH start info, memory map, command line | the kernel's loader (a digested segment) |
//! | up to [`STACK_TOP_OFFSET`] | | the stack | the purgatory, at run time |
//!
//! Everything in `[0, SEALED_BYTES)` is fixed once built. The CPU itself
//! never writes there either: the page-table entries come with their
//! accessed and dirty bits set and the code and data descriptors with
//! their accessed bit set, so the seal still holds while the purgatory
//! runs. Only the PVH path's `ltr` sets the TSS descriptor's busy bit,
//! after every check.
#![allow(dead_code)]

/// Bytes of the whole area.
pub const AREA_BYTES: u64 = 64 * 1024;
/// Most bytes the blob may take.
pub const BLOB_MAX: usize = 0x3000;
/// The parameters.
pub const PARAMETERS_OFFSET: usize = 0x3000;
/// The GDT.
pub const GDT_OFFSET: usize = 0x3100;
/// The 32-bit IDT (PVH only, loaded in compatibility mode and left to the
/// capture kernel). Vector 2 is there twice: as a 32-bit gate at byte 16
/// and as a 64-bit gate at byte 32 (in place of the 32-bit gates of
/// vectors 4 and 5), so it serves on either side of a long-mode switch.
pub const IDT32_OFFSET: usize = 0x3200;
/// The digest table.
pub const TABLE_OFFSET: usize = 0x3400;
/// The 64-bit IDT loaded first, whose gates name the crashed kernel's
/// code selector.
pub const IDT64_ENTRY_OFFSET: usize = 0x4000;
/// The 64-bit IDT left loaded for a Linux capture kernel.
pub const IDT64_EXIT_OFFSET: usize = 0x4200;
/// The page tables: PML4, PDPT, four page directories.
pub const PAGE_TABLES_OFFSET: usize = 0x5000;
/// Pages of page tables.
pub const PAGE_TABLE_PAGES: usize = 6;
/// End of what the seal covers.
pub const SEALED_BYTES: usize = PAGE_TABLES_OFFSET + PAGE_TABLE_PAGES * 4096;
/// The seal: the digest ([`param::DIGEST`]) of `[0, SEALED_BYTES)`.
pub const SEAL_OFFSET: usize = SEALED_BYTES;
/// What a kernel digests of the area before the jump: the sealed bytes
/// and the seal.
pub const DIGESTED_BYTES: usize = SEAL_OFFSET + 32;
/// Written by the purgatory while it runs; never digested.
pub const SCRATCH_OFFSET: usize = 0xB800;
/// What the builder writes: everything up to the boot data.
pub const BUILT_BYTES: usize = BOOT_DATA_OFFSET;
/// Room for the PVH start info, its memory map and command line, which
/// the kernel's loader writes and digests as a segment of its own.
pub const BOOT_DATA_OFFSET: usize = 0xC000;
/// Bytes of that room.
pub const BOOT_DATA_BYTES: usize = 0x2000;
/// The stack's top (it grows down to the boot data).
pub const STACK_TOP_OFFSET: usize = 0x10000;
/// Most segments the table holds: an hv capture image's 16 loadable
/// segments and its boot data, with room to spare.
pub const MAX_SEGMENTS: usize = 24;

// The map holds together: page tables page-aligned, the seal after what
// it covers and before the scratch fields, a stack of at least 4 KiB.
const _: () = assert!(PAGE_TABLES_OFFSET.is_multiple_of(4096));
const _: () = assert!(PARAMETERS_OFFSET + param::END <= GDT_OFFSET);
const _: () = assert!(TABLE_OFFSET + table::MAX_BYTES <= IDT64_ENTRY_OFFSET);
const _: () = assert!(SEALED_BYTES <= SEAL_OFFSET && DIGESTED_BYTES <= SCRATCH_OFFSET);
const _: () = assert!(SCRATCH_OFFSET + scratch::END <= BOOT_DATA_OFFSET);
const _: () = assert!(BOOT_DATA_OFFSET + BOOT_DATA_BYTES + 4096 <= STACK_TOP_OFFSET);
const _: () = assert!(STACK_TOP_OFFSET as u64 == AREA_BYTES);
const _: () = assert!(TABLE_OFFSET + table::MAX_BYTES <= IDT64_ENTRY_OFFSET);

/// `parameters.magic`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"HVPURG01");

/// The blob's own header, right after the 16-byte jump at its start: the
/// offsets of the handlers the builder points the IDTs at.
pub mod blob_header {
    /// `"HVPURGAT"`: this is a purgatory blob.
    pub const MAGIC: usize = 0x10;
    /// `u32`: the 64-bit NMI handler.
    pub const NMI64: usize = 0x18;
    /// `u32`: the first of the 64-bit exception stubs, one per vector.
    pub const FAULT64: usize = 0x1C;
    /// `u32`: the 32-bit NMI handler.
    pub const NMI32: usize = 0x20;
    /// `u32`: the 32-bit exception handler (all vectors).
    pub const FAULT32: usize = 0x24;
    /// `u32`: bytes between two 64-bit exception stubs.
    pub const FAULT64_STRIDE: usize = 0x28;
    /// Bytes of the header, jump included.
    pub const END: usize = 0x30;
    /// The value at [`MAGIC`].
    pub const MAGIC_VALUE: [u8; 8] = *b"HVPURGAT";
}

/// The parameters' fields, as offsets from [`PARAMETERS_OFFSET`]; each is
/// a little-endian `u64` unless said otherwise.
pub mod param {
    /// [`super::MAGIC`].
    pub const MAGIC: usize = 0;
    /// The area's physical address, as built (the IDTs, GDT and page
    /// tables hold absolute addresses).
    pub const AREA: usize = 8;
    /// [`super::MODE_LINUX64`] or [`super::MODE_PVH32`].
    pub const MODE: usize = 16;
    /// Where the capture kernel is entered.
    pub const ENTRY: usize = 24;
    /// RSI (Linux: the zero page) or EBX (PVH: the start info).
    pub const ARGUMENT: usize = 32;
    /// The page tables' PML4.
    pub const CR3: usize = 40;
    /// [`super::flags`].
    pub const FLAGS: usize = 48;
    /// How segments and the seal are summed: [`super::DIGEST_XXH64`] or
    /// [`super::DIGEST_SHA256`].
    pub const DIGEST: usize = 56;
    /// `lgdt` operand (2-byte limit, 8-byte base).
    pub const GDTR: usize = 64;
    /// `lidt` operand of the entry IDT.
    pub const IDTR64_ENTRY: usize = 80;
    /// `lidt` operand of the exit IDT (Linux).
    pub const IDTR64_EXIT: usize = 96;
    /// `lidt` operand of the 32-bit IDT.
    pub const IDTR32: usize = 112;
    /// The crash words mailbox ([`super::mailbox`]) the purgatory prints
    /// when it refuses; 0 for none.
    pub const MAILBOX: usize = 128;
    /// Bytes of the parameters.
    pub const END: usize = 136;
}

/// The crash words mailbox: what the crashed kernel said during the crash,
/// kept in memory instead of printed, so that the way to the capture
/// kernel does not wait on a 115200-baud UART. The capture kernel prints
/// it when it starts; the purgatory prints it when it refuses. It lies in
/// the crash-time part of the reservation (the core header region), never
/// digested: bytes `[0, 8)` the magic, `[8, 16)` the text's length, then
/// the text (whole lines, ASCII).
pub mod mailbox {
    /// The magic, first.
    pub const MAGIC: u64 = u64::from_le_bytes(*b"HVWORDS1");
    /// `u64`: the magic.
    pub const MAGIC_OFFSET: usize = 0;
    /// `u64`: bytes of text.
    pub const LEN_OFFSET: usize = 8;
    /// The text.
    pub const TEXT_OFFSET: usize = 16;
    /// Bytes of the whole mailbox.
    pub const BYTES: usize = 32 * 1024;
    /// Most bytes of text.
    pub const MAX_TEXT: usize = BYTES - TEXT_OFFSET;

    /// Whether `byte` may be printed from the mailbox: what a report or a
    /// console line holds. The first other byte ends the text.
    pub const fn printable(byte: u8) -> bool {
        matches!(byte, b' '..=b'~' | b'\n' | b'\r' | b'\t')
    }
}

/// `parameters.digest` (0 is no algorithm: a zeroed field is refused): XXH64, seed 0, little-endian in the digest
/// field's first 8 bytes, zeros after.
pub const DIGEST_XXH64: u64 = 1;
/// `parameters.digest`: SHA-256.
pub const DIGEST_SHA256: u64 = 2;

/// `parameters.mode`: Linux 64-bit boot protocol.
pub const MODE_LINUX64: u64 = 0;
/// `parameters.mode`: PVH 32-bit entry.
pub const MODE_PVH32: u64 = 1;

/// `parameters.flags` bits.
pub mod flags {
    /// On a refusal or a fault, end the emulator (QEMU `isa-debug-exit`,
    /// Bochs port 0x8900) after the report line instead of halting.
    pub const EXIT_EMULATOR: u64 = 1 << 0;
    /// Test knob: send this CPU an NMI at each step of the way and wait
    /// until it was taken.
    pub const SELF_NMI: u64 = 1 << 1;
}

/// The digest table, as offsets from [`TABLE_OFFSET`].
pub mod table {
    /// `u64`: how many entries follow.
    pub const COUNT: usize = 0;
    /// `u64`: `!count`, so a zeroed or half-written count shows.
    pub const COUNT_CHECK: usize = 8;
    /// The first entry.
    pub const ENTRIES: usize = 16;
    /// Bytes of one entry: start (`u64`), length (`u64`), digest field.
    pub const ENTRY_BYTES: usize = 48;
    /// Bytes of the table at its largest.
    pub const MAX_BYTES: usize = ENTRIES + super::MAX_SEGMENTS * ENTRY_BYTES;
}

/// The scratch fields, as offsets from [`SCRATCH_OFFSET`], each a `u64`.
/// A capture kernel reads them in old memory: hv's capture mode reports
/// the time spent in the purgatory from the two stamps.
pub mod scratch {
    /// TSC at the purgatory's entry (its third instruction).
    pub const ENTRY_TSC: usize = 0;
    /// TSC when every check had passed.
    pub const VERIFIED_TSC: usize = 8;
    /// TSC just before the jump into the capture kernel.
    pub const JUMP_TSC: usize = 16;
    /// NMIs the 64-bit handler took.
    pub const NMI64_COUNT: usize = 24;
    /// NMIs the 32-bit handler took.
    pub const NMI32_COUNT: usize = 32;
    /// 1 once the purgatory jumped: a fault after it is the capture
    /// kernel's.
    pub const JUMPED: usize = 40;
    /// Bytes of the scratch fields.
    pub const END: usize = 48;
}

/// GDT selectors.
pub mod selector {
    /// 64-bit code: the crashed hv's own code selector too, so the entry
    /// IDT is valid under either GDT.
    pub const CODE64_ENTRY: u16 = 0x08;
    /// 64-bit code: Linux's `__BOOT_CS`.
    pub const CODE64_LINUX: u16 = 0x10;
    /// Flat data, 32 and 64-bit: Linux's `__BOOT_DS`, PVH's data segments.
    pub const DATA: u16 = 0x18;
    /// 32-bit flat code (PVH).
    pub const CODE32: u16 = 0x20;
    /// 32-bit TSS, base 0, limit 0x67 (PVH).
    pub const TSS32: u16 = 0x28;
    /// Bytes of the GDT.
    pub const GDT_BYTES: usize = 0x30;
}

/// The GDT's descriptors, in selector order. The accessed bits are set
/// so that loading a segment never writes the (sealed) GDT.
pub const GDT: [u64; 6] = [
    0,
    0x00AF_9B00_0000_FFFF,
    0x00AF_9B00_0000_FFFF,
    0x00CF_9300_0000_FFFF,
    0x00CF_9B00_0000_FFFF,
    // Present, DPL 0, available 32-bit TSS, base 0, limit 0x67.
    0x0000_8900_0000_0067,
];

/// Where COM1's registers are.
pub const COM1: u16 = 0x3F8;
/// QEMU `isa-debug-exit` port and the value a refusal writes (QEMU exits
/// with status 0x25, the code of a crash path that ended without a
/// capture).
pub const QEMU_EXIT_PORT: u16 = 0xF4;
/// See [`QEMU_EXIT_PORT`].
pub const QEMU_EXIT_REFUSED: u8 = 0x12;
/// Bochs shuts down when it reads `Shutdown` here.
pub const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// A little-endian `u64` at `at`, `None` past the end.
pub fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at..at.checked_add(8)?)?;
    let mut value = [0u8; 8];
    value.copy_from_slice(field);
    Some(u64::from_le_bytes(value))
}

/// A little-endian `u32` at `at`, `None` past the end.
pub fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    let mut value = [0u8; 4];
    value.copy_from_slice(field);
    Some(u32::from_le_bytes(value))
}
