//! The purgatory area, built at boot for the crash path: the blob
//! (`kexec-loader/purgatory/`, built into a flat image by `hv/build.rs`),
//! its parameters, descriptor tables, identity page tables and its own copy
//! of the digest table, sealed with the table's digest algorithm (XXH64 or
//! SHA-256, [`crate::digest::Algorithm`]). The kernel only copies bytes:
//! [`build`] lays the whole area out in a buffer.
//!
//! At crash time the purgatory checks the seal and every segment itself
//! before it enters the capture kernel, with no dependency on the crashed
//! kernel's memory. The kernel keeps its own copy of the table for a fast
//! refusal of its own; [`SealedTable`] makes a stray write into that copy
//! show (a zeroed count no longer verifies vacuously).
//!
//! The area's map is [`abi`]; [`check`] and [`sha256`] are the blob's own
//! check and hash (with `crate::digest::xxh64`), compiled here too so that
//! the host tests run them.

#[path = "../purgatory/abi.rs"]
pub mod abi;
#[path = "../purgatory/check.rs"]
pub mod check;
#[path = "../purgatory/sha256.rs"]
pub mod sha256;
// `check` names it beside `sha256`.
use crate::digest::xxh64;

use core::fmt;

use crate::PhysRange;
use crate::digest::{Algorithm, Digest, DigestTable, SegmentDigest, VerifyError};

pub use abi::{
    AREA_BYTES, BOOT_DATA_BYTES, BOOT_DATA_OFFSET, BUILT_BYTES, DIGESTED_BYTES, MAX_SEGMENTS,
};

/// How the purgatory enters the capture kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Linux 64-bit boot protocol: `entry` in long mode, RSI = zero page.
    Linux64 {
        /// `startup_64`.
        entry: u64,
        /// The zero page.
        zero_page: u64,
    },
    /// PVH: `entry` in 32-bit protected mode, EBX = `hvm_start_info`.
    Pvh32 {
        /// The 32-bit PVH entry.
        entry: u32,
        /// The start info.
        start_info: u32,
    },
}

/// What else the purgatory is told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// On a refusal, end the emulator after the report line (test runs).
    pub exit_emulator: bool,
    /// Test knob: NMI itself at every step and wait until each was taken.
    pub self_nmi: bool,
    /// How the segments were summed; the seal uses it too.
    pub digest: Algorithm,
    /// The crash words mailbox ([`abi::mailbox`]) to print on a refusal;
    /// 0 for none.
    pub mailbox: u64,
}

/// Why the area cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildError {
    /// The output holds fewer than [`BUILT_BYTES`].
    BufferTooSmall(usize),
    /// The area is not 4 KiB aligned.
    AreaMisaligned(u64),
    /// The area does not lie below 4 GiB (the PVH path runs with paging
    /// off, the IDT and GDT bases are 32-bit there).
    AreaAbove4GiB(u64),
    /// The blob outgrows its room.
    BlobTooLarge(usize),
    /// The blob's header is missing or points outside it.
    BlobHeader(&'static str),
    /// Nothing to check: the purgatory refuses an empty table.
    NoSegments,
    /// More segments than the table holds.
    TooManySegments(usize),
    /// A segment overlaps the built part of the area (which the seal
    /// covers instead).
    SegmentInArea {
        /// Its index.
        index: usize,
        /// Where it is.
        range: PhysRange,
    },
    /// A segment lies beyond the purgatory's identity map (4 GiB).
    SegmentAbove4GiB {
        /// Its index.
        index: usize,
        /// Where it is.
        range: PhysRange,
    },
    /// The mailbox is not 8-byte aligned, lies beyond 4 GiB or overlaps
    /// the area's built part or a segment.
    BadMailbox(u64),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall(len) => write!(
                f,
                "the purgatory needs {BUILT_BYTES} bytes to be built in, got {len}"
            ),
            Self::AreaMisaligned(at) => write!(f, "the purgatory area {at:#x} is not page aligned"),
            Self::AreaAbove4GiB(at) => {
                write!(f, "the purgatory area {at:#x} does not lie below 4 GiB")
            }
            Self::BlobTooLarge(len) => write!(
                f,
                "the purgatory blob takes {len} bytes, more than its {}",
                abi::BLOB_MAX
            ),
            Self::BlobHeader(why) => write!(f, "the purgatory blob's header: {why}"),
            Self::NoSegments => f.write_str("no segment for the purgatory to check"),
            Self::TooManySegments(n) => write!(
                f,
                "{n} segments for the purgatory to check, more than its {MAX_SEGMENTS}"
            ),
            Self::SegmentInArea { index, range } => write!(
                f,
                "segment {index} at {range} overlaps the purgatory's own code and tables"
            ),
            Self::SegmentAbove4GiB { index, range } => write!(
                f,
                "segment {index} at {range} lies beyond the purgatory's 4 GiB identity map"
            ),
            Self::BadMailbox(at) => write!(
                f,
                "the crash words mailbox at {at:#x} is misaligned, beyond 4 GiB, or overlaps \
                 the purgatory or a checked segment"
            ),
        }
    }
}

/// The handlers' addresses, from the blob's header.
#[derive(Debug, Clone, Copy)]
struct Handlers {
    nmi64: u64,
    fault64: u64,
    fault64_stride: u64,
    nmi32: u64,
    fault32: u64,
}

fn handlers(blob: &[u8], area: u64) -> Result<Handlers, BuildError> {
    use abi::blob_header as header;
    if blob.len() > abi::BLOB_MAX {
        return Err(BuildError::BlobTooLarge(blob.len()));
    }
    if blob.get(header::MAGIC..header::MAGIC + 8) != Some(&header::MAGIC_VALUE[..]) {
        return Err(BuildError::BlobHeader("no magic"));
    }
    let offset = |field: usize| {
        abi::u32_at(blob, field)
            .map(u64::from)
            .ok_or(BuildError::BlobHeader("cut short"))
    };
    let within = |at: u64, len: u64| {
        at.checked_add(len)
            .filter(|end| *end <= blob.len() as u64 && at >= header::END as u64)
            .map(|_| area + at)
            .ok_or(BuildError::BlobHeader("a handler lies outside the blob"))
    };
    let stride = offset(header::FAULT64_STRIDE)?;
    if stride == 0 {
        return Err(BuildError::BlobHeader("the exception stubs have no stride"));
    }
    Ok(Handlers {
        nmi64: within(offset(header::NMI64)?, 1)?,
        fault64: within(offset(header::FAULT64)?, 32 * stride)?,
        fault64_stride: stride,
        nmi32: within(offset(header::NMI32)?, 1)?,
        fault32: within(offset(header::FAULT32)?, 1)?,
    })
}

/// A 64-bit interrupt gate: present, DPL 0, IST 0.
fn gate64(handler: u64, selector: u16) -> [u8; 16] {
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&selector.to_le_bytes());
    gate[5] = 0x8E;
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    gate
}

/// A 32-bit interrupt gate: present, DPL 0.
fn gate32(handler: u64, selector: u16) -> [u8; 8] {
    let mut gate = [0u8; 8];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&selector.to_le_bytes());
    gate[5] = 0x8E;
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate
}

/// An `lgdt`/`lidt` operand: limit, then base.
fn table_pointer(out: &mut [u8], field: usize, base: u64, bytes: usize) {
    let at = abi::PARAMETERS_OFFSET + field;
    out[at..at + 2].copy_from_slice(&((bytes - 1) as u16).to_le_bytes());
    out[at + 2..at + 10].copy_from_slice(&base.to_le_bytes());
}

fn put_u64(out: &mut [u8], at: usize, value: u64) {
    out[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// Page-table entry bits: present, writable, accessed (set ahead so the
/// CPU never writes the sealed tables).
const TABLE_LINK: u64 = 0x23;
/// A 2 MiB page: present, writable, accessed, dirty, large.
const LARGE_PAGE: u64 = 0xE3;

/// Lays the area at physical `area` out in `out[..BUILT_BYTES]`: the blob,
/// parameters, GDT, IDTs, digest table (`segments`), page tables, seal and
/// zeroed scratch fields. The boot data room and the stack after it are
/// left alone. The kernel copies `out` to `area` and digests the first
/// [`DIGESTED_BYTES`] of it with everything else it checks before the
/// jump.
pub fn build(
    out: &mut [u8],
    blob: &[u8],
    area: u64,
    entry: Entry,
    segments: &[SegmentDigest],
    options: Options,
) -> Result<(), BuildError> {
    let given = out.len();
    let out = out
        .get_mut(..BUILT_BYTES)
        .ok_or(BuildError::BufferTooSmall(given))?;
    if !area.is_multiple_of(4096) {
        return Err(BuildError::AreaMisaligned(area));
    }
    if area.checked_add(AREA_BYTES).is_none_or(|end| end > 1 << 32) {
        return Err(BuildError::AreaAbove4GiB(area));
    }
    let handlers = handlers(blob, area)?;
    if segments.is_empty() {
        return Err(BuildError::NoSegments);
    }
    if segments.len() > MAX_SEGMENTS {
        return Err(BuildError::TooManySegments(segments.len()));
    }
    let built = PhysRange::new(area, BUILT_BYTES as u64);
    for (index, segment) in segments.iter().enumerate() {
        let range = segment.range;
        if range.overlaps(&built) {
            return Err(BuildError::SegmentInArea { index, range });
        }
        if range.end().is_none_or(|end| end > 1 << 32) {
            return Err(BuildError::SegmentAbove4GiB { index, range });
        }
    }

    if options.mailbox != 0 {
        let mailbox = PhysRange::new(options.mailbox, abi::mailbox::BYTES as u64);
        let whole_area = PhysRange::new(area, AREA_BYTES);
        if !options.mailbox.is_multiple_of(8)
            || mailbox.end().is_none_or(|end| end > 1 << 32)
            || mailbox.overlaps(&whole_area)
            || segments
                .iter()
                .any(|segment| segment.range.overlaps(&mailbox))
        {
            return Err(BuildError::BadMailbox(options.mailbox));
        }
    }

    out.fill(0);
    out[..blob.len()].copy_from_slice(blob);

    let parameters = abi::PARAMETERS_OFFSET;
    let (mode, entry_address, argument) = match entry {
        Entry::Linux64 { entry, zero_page } => (abi::MODE_LINUX64, entry, zero_page),
        Entry::Pvh32 { entry, start_info } => {
            (abi::MODE_PVH32, u64::from(entry), u64::from(start_info))
        }
    };
    let mut flags = 0;
    if options.exit_emulator {
        flags |= abi::flags::EXIT_EMULATOR;
    }
    if options.self_nmi {
        flags |= abi::flags::SELF_NMI;
    }
    for (field, value) in [
        (abi::param::MAGIC, abi::MAGIC),
        (abi::param::AREA, area),
        (abi::param::MODE, mode),
        (abi::param::ENTRY, entry_address),
        (abi::param::ARGUMENT, argument),
        (abi::param::CR3, area + abi::PAGE_TABLES_OFFSET as u64),
        (abi::param::FLAGS, flags),
        (abi::param::DIGEST, options.digest.code()),
        (abi::param::MAILBOX, options.mailbox),
    ] {
        put_u64(out, parameters + field, value);
    }
    let at = |offset: usize| area + offset as u64;
    table_pointer(
        out,
        abi::param::GDTR,
        at(abi::GDT_OFFSET),
        abi::selector::GDT_BYTES,
    );
    table_pointer(
        out,
        abi::param::IDTR64_ENTRY,
        at(abi::IDT64_ENTRY_OFFSET),
        32 * 16,
    );
    table_pointer(
        out,
        abi::param::IDTR64_EXIT,
        at(abi::IDT64_EXIT_OFFSET),
        32 * 16,
    );
    table_pointer(out, abi::param::IDTR32, at(abi::IDT32_OFFSET), 32 * 8);

    for (index, descriptor) in abi::GDT.iter().enumerate() {
        put_u64(out, abi::GDT_OFFSET + index * 8, *descriptor);
    }

    for (idt, selector) in [
        (abi::IDT64_ENTRY_OFFSET, abi::selector::CODE64_ENTRY),
        (abi::IDT64_EXIT_OFFSET, abi::selector::CODE64_LINUX),
    ] {
        for vector in 0..32u64 {
            let handler = if vector == 2 {
                handlers.nmi64
            } else {
                handlers.fault64 + vector * handlers.fault64_stride
            };
            let slot = idt + vector as usize * 16;
            out[slot..slot + 16].copy_from_slice(&gate64(handler, selector));
        }
    }
    for vector in 0..32usize {
        let handler = if vector == 2 {
            handlers.nmi32
        } else {
            handlers.fault32
        };
        let slot = abi::IDT32_OFFSET + vector * 8;
        out[slot..slot + 8].copy_from_slice(&gate32(handler, abi::selector::CODE32));
    }
    // Vector 2 as a 64-bit gate too, in place of the 32-bit gates of
    // vectors 4 and 5: the table serves on either side of a long-mode
    // switch (the purgatory's way out, the capture kernel's way in).
    let nmi64 = abi::IDT32_OFFSET + 2 * 16;
    out[nmi64..nmi64 + 16].copy_from_slice(&gate64(handlers.nmi64, abi::selector::CODE64_ENTRY));

    let table = abi::TABLE_OFFSET;
    let count = segments.len() as u64;
    put_u64(out, table + abi::table::COUNT, count);
    put_u64(out, table + abi::table::COUNT_CHECK, !count);
    for (index, segment) in segments.iter().enumerate() {
        let slot = table + abi::table::ENTRIES + index * abi::table::ENTRY_BYTES;
        put_u64(out, slot, segment.range.start);
        put_u64(out, slot + 8, segment.range.len);
        out[slot + 16..slot + 48].copy_from_slice(&segment.digest);
    }

    let pml4 = abi::PAGE_TABLES_OFFSET;
    let pdpt = pml4 + 4096;
    put_u64(out, pml4, at(pdpt) | TABLE_LINK);
    for directory in 0..4usize {
        let pd = pdpt + (1 + directory) * 4096;
        put_u64(out, pdpt + directory * 8, at(pd) | TABLE_LINK);
        for slot in 0..512usize {
            let address = ((directory * 512 + slot) as u64) << 21;
            put_u64(out, pd + slot * 8, address | LARGE_PAGE);
        }
    }

    let seal = options.digest.digest(&out[..abi::SEALED_BYTES]);
    out[abi::SEAL_OFFSET..abi::SEAL_OFFSET + 32].copy_from_slice(&seal);
    Ok(())
}

/// Why the kernel's own copy of the table cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableError {
    /// It holds no segment: a zeroed count would verify vacuously.
    Empty,
    /// Its count and the count's complement disagree.
    CountDisagrees {
        /// The count.
        count: u64,
        /// The check word (`!count` when intact).
        check: u64,
    },
    /// The table holds another number of entries than was sealed.
    LengthChanged {
        /// Entries now.
        now: u64,
        /// Entries when sealed.
        sealed: u64,
    },
    /// The entries changed since they were sealed.
    SealMismatch,
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the hypervisor's digest table was damaged (")?;
        match self {
            Self::Empty => f.write_str("it holds no segment")?,
            Self::CountDisagrees { count, check } => write!(
                f,
                "its count {count:#x} disagrees with the check word {check:#x}"
            )?,
            Self::LengthChanged { now, sealed } => {
                write!(f, "it holds {now} segments, {sealed} were sealed")?
            }
            Self::SealMismatch => f.write_str("its entries no longer match their seal")?,
        }
        f.write_str("): refusing to jump")
    }
}

/// Why the kernel's pre-jump check refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckError {
    /// The table itself is damaged.
    Table(TableError),
    /// A segment changed.
    Verify(VerifyError),
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Table(error) => error.fmt(f),
            Self::Verify(error) => {
                write!(f, "{error} (the capture kernel was damaged after boot)")
            }
        }
    }
}

/// The kernel's copy of the digest table, with a count stored twice and
/// a seal over the count and entries (in the table's own algorithm), so
/// that a stray write into it is seen instead of trusted.
#[derive(Debug, Clone)]
pub struct SealedTable<const N: usize> {
    table: DigestTable<N>,
    count: u64,
    count_check: u64,
    seal: Digest,
}

/// The seal over `entries`, in `algorithm`: a chain, each link the digest
/// of the previous link and one entry. The table's own algorithm, so that
/// checking the seal at crash time runs no code the segments' check does
/// not (under QEMU's TCG, the first run of SHA-256's code alone cost more
/// than XXH64 over the whole hv capture image).
fn table_seal(algorithm: Algorithm, entries: &[SegmentDigest]) -> Digest {
    let mut seal = algorithm.digest(&(entries.len() as u64).to_le_bytes());
    for entry in entries {
        let mut link = [0u8; 32 + 8 + 8 + 32];
        link[..32].copy_from_slice(&seal);
        link[32..40].copy_from_slice(&entry.range.start.to_le_bytes());
        link[40..48].copy_from_slice(&entry.range.len.to_le_bytes());
        link[48..].copy_from_slice(&entry.digest);
        seal = algorithm.digest(&link);
    }
    seal
}

impl<const N: usize> SealedTable<N> {
    /// Seals `table` as it is now.
    pub fn seal(table: DigestTable<N>) -> Self {
        let count = table.entries().len() as u64;
        let seal = table_seal(table.algorithm(), table.entries());
        Self {
            table,
            count,
            count_check: !count,
            seal,
        }
    }

    /// How its segments were summed.
    pub fn algorithm(&self) -> Algorithm {
        self.table.algorithm()
    }

    /// The entries as they are, unchecked (for reports).
    pub fn entries(&self) -> &[SegmentDigest] {
        self.table.entries()
    }

    /// The entries, once the count, its check word and the seal agree.
    pub fn checked_entries(&self) -> Result<&[SegmentDigest], TableError> {
        let entries = self.table.entries();
        if self.count == 0 || entries.is_empty() {
            return Err(TableError::Empty);
        }
        if self.count != !self.count_check {
            return Err(TableError::CountDisagrees {
                count: self.count,
                check: self.count_check,
            });
        }
        if entries.len() as u64 != self.count {
            return Err(TableError::LengthChanged {
                now: entries.len() as u64,
                sealed: self.count,
            });
        }
        if table_seal(self.table.algorithm(), entries) != self.seal {
            return Err(TableError::SealMismatch);
        }
        Ok(entries)
    }

    /// Checks the table, then every segment (see [`DigestTable::verify`]).
    pub fn verify<'m, F>(&self, read: F) -> Result<(), CheckError>
    where
        F: FnMut(u64, usize) -> Option<&'m [u8]>,
    {
        self.checked_entries().map_err(CheckError::Table)?;
        self.table.verify(read).map_err(CheckError::Verify)
    }

    /// Test knob: what a stray write of zeros over the whole table does.
    pub fn zero(&mut self) {
        self.table = DigestTable::new();
        self.count = 0;
        self.count_check = 0;
        self.seal = [0; 32];
    }
}

#[cfg(test)]
mod tests;
