//! The ELF core header: written at crash time, read by Linux's
//! `/proc/vmcore`, by `gdb`, and by `cargo xtask dump`.
//!
//! # Layout
//! `Elf64_Ehdr` (64 bytes), then the program headers (56 bytes each: one
//! `PT_NOTE`, then one `PT_LOAD` per memory segment), then the notes (each
//! 4-byte aligned: one `NT_PRSTATUS` named "CORE" per CPU, in the order
//! given; when the hypervisor's [`LoadedImage`] is given, an `NT_AUXV` and
//! an `NT_FILE` note named "CORE" that tell drgn where hv's ELF headers are
//! in memory ([`image`]); then the hypervisor's [`crate::crash_note`]), then
//! an empty note header (12 zero bytes) that ends the list.
//!
//! # Two placements of the same header
//! - [`Placement::OldMemory`]: the header as the crash path leaves it in
//!   RAM for a Linux capture kernel (`elfcorehdr=`). As in the headers
//!   kexec-tools and `kexec_file_load` build, every `p_offset` is a
//!   *physical address* in the crashed machine's memory: `PT_LOAD`'s is the
//!   segment's own address, `PT_NOTE`'s is where the notes lie inside this
//!   header. `/proc/vmcore` reads them from there and rewrites the offsets
//!   for its file. Its note scan (`update_note_header_size_elf64`) walks
//!   `p_memsz` bytes until a note with `n_namesz == 0`, so `p_memsz`
//!   includes the empty terminating note.
//! - [`Placement::File`]: the header of a dump file, as gdb reads it (and as
//!   the built-in capture mode streams it): `p_offset`s are file offsets.
//!   The segments' bytes follow the header from the first page boundary
//!   after it, in order, with no gaps. [`CoreDump::write_file_header`] turns
//!   an old-memory header into exactly this.
//!
//! Linux's sanity checks (`parse_crash_elf64_headers` in `fs/proc/vmcore.c`)
//! are: ELF magic, `ET_CORE`, `EM_X86_64`, `ELFCLASS64`, `EV_CURRENT` in
//! both version fields, `e_ehsize` 64, `e_phentsize` 56 and at least one
//! program header; it also reads the program headers from right after the
//! ELF header, whatever `e_phoff` says. [`CoreDump::parse`] checks all of
//! these and more.

use core::fmt;
use core::ops::Range;

use crate::bytes::{self, OutOfBounds, align_up, align_up_usize, u16_at, u32_at, u64_at};
use crate::crash_note::{CRASH_NOTE_NAME, CrashNote, CrashNoteError, CrashRecord, NT_HV_CRASH};

pub mod image;
pub use image::{
    AUXV_DESC_LEN, FileMapping, ImageError, ImageNotes, LoadedImage, NT_AUXV, NT_FILE, NtFile,
};

/// Size of `Elf64_Ehdr`.
pub const EHDR_LEN: usize = 64;
/// Size of `Elf64_Phdr`.
pub const PHDR_LEN: usize = 56;
/// Size of `Elf64_Nhdr`.
pub const NHDR_LEN: usize = 12;
/// `e_type` of a core file.
pub const ET_CORE: u16 = 4;
/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;
/// `ELFCLASS64`.
pub const ELFCLASS64: u8 = 2;
/// `ELFDATA2LSB`.
pub const ELFDATA2LSB: u8 = 1;
/// `EV_CURRENT`.
pub const EV_CURRENT: u8 = 1;
/// `e_ident[EI_OSABI]` of the core: `ELFOSABI_GNU` (also called
/// `ELFOSABI_LINUX`). Linux writes `ELFOSABI_NONE` in its own cores, and
/// lldb then refuses them ("Unsupported OS") unless a note names Linux;
/// with this one it opens hv's dumps as the Linux-layout cores they are.
/// Nobody else reads the byte: Linux's `/proc/vmcore`, gdb, drgn and
/// makedumpfile take the core as before.
pub const ELFOSABI_GNU: u8 = 3;
/// Program header type: loadable segment.
pub const PT_LOAD: u32 = 1;
/// Program header type: notes.
pub const PT_NOTE: u32 = 4;
/// Segment flags: executable.
pub const PF_X: u32 = 1;
/// Segment flags: writable.
pub const PF_W: u32 = 2;
/// Segment flags: readable.
pub const PF_R: u32 = 4;
/// Note type of `struct elf_prstatus`.
pub const NT_PRSTATUS: u32 = 1;
/// Name of the `NT_PRSTATUS` notes.
pub const CORE_NOTE_NAME: &str = "CORE";
/// Size of `struct elf_prstatus` on x86-64.
pub const PRSTATUS_LEN: usize = 336;
/// Offset of `pr_pid` in `struct elf_prstatus`.
pub const PR_PID_OFFSET: usize = 32;
/// Offset of `pr_reg` (a `user_regs_struct`) in `struct elf_prstatus`.
pub const PR_REG_OFFSET: usize = 112;
/// Registers in `user_regs_struct`.
pub const PR_REG_COUNT: usize = 27;
/// Most program headers: `e_phnum` is 16 bits and 0xffff means "look in
/// section 0" (`PN_XNUM`), which this format does not use.
pub const MAX_PHNUM: usize = 0xfffe;
/// Where the segment data of a file starts: the header rounded up to this.
pub const FILE_DATA_ALIGN: u64 = 4096;

pub use hv_abi::regs::CpuRegisters;

/// One CPU's `NT_PRSTATUS` note: `pr_pid` = `cpu_index + 1` (0 means "no
/// process" to gdb, and every thread needs its own pid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuState {
    /// CPU index.
    pub cpu_index: u32,
    /// Its interrupted context.
    pub regs: CpuRegisters,
}

/// A range of the crashed machine's memory to dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySegment {
    /// Physical address (`p_paddr`, and `p_offset` in old memory).
    pub phys: u64,
    /// Where the hypervisor maps it (`p_vaddr`), so gdb resolves symbols;
    /// the physical address where it is identity-mapped.
    pub virt: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Where the `p_offset`s point (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// In RAM at `header_phys`, for a Linux capture kernel.
    OldMemory {
        /// Physical address the header is written to.
        header_phys: u64,
    },
    /// At the start of a dump file.
    File,
}

/// What [`write_core_header`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreHeaderLayout {
    /// Bytes written: headers, notes and the terminating empty note.
    pub len: usize,
    /// Where the notes are, terminator excluded.
    pub notes: Range<usize>,
    /// [`Placement::File`]: offset of the first segment's bytes; the others
    /// follow it back to back. 0 for [`Placement::OldMemory`].
    pub data_offset: u64,
}

/// Why a core header could not be written or read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfCoreError {
    /// The output buffer is too small.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        len: usize,
    },
    /// More segments than `e_phnum` can count.
    TooManySegments(usize),
    /// A segment has length 0.
    EmptySegment(usize),
    /// A segment's physical or virtual end overflows.
    SegmentOverflows(usize),
    /// A segment starts before the previous one ends: segments must be
    /// sorted by physical address and disjoint (which keeps the check
    /// linear in the crash path).
    SegmentsOutOfOrder(usize),
    /// `cpu_index + 1` does not fit `pr_pid`.
    CpuIndexTooLarge(u32),
    /// Two CPU states have the same index, so gdb would see one thread.
    DuplicateCpu(u32),
    /// The crash note could not be written or read.
    CrashNote(CrashNoteError),
    /// An `NT_FILE` or `NT_AUXV` note is malformed.
    Image(ImageError),
    /// The header's size overflows.
    TooLarge,
    /// The input ends before `needed` bytes.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        len: usize,
    },
    /// No ELF magic.
    BadMagic,
    /// Not `ELFCLASS64`.
    BadClass(u8),
    /// Not little-endian.
    BadDataEncoding(u8),
    /// `e_ident[EI_VERSION]` or `e_version` is not `EV_CURRENT`.
    BadVersion(u32),
    /// Not `ET_CORE`.
    NotCore(u16),
    /// Not `EM_X86_64`.
    BadMachine(u16),
    /// `e_ehsize` is not 64.
    BadEhsize(u16),
    /// `e_phentsize` is not 56.
    BadPhentsize(u16),
    /// `e_phoff` is not 64: Linux reads the program headers from there.
    BadPhoff(u64),
    /// `e_phnum` is 0.
    NoProgramHeaders,
    /// No `PT_NOTE` program header.
    NoNoteSegment,
    /// More than one `PT_NOTE` program header.
    MultipleNoteSegments,
    /// The `PT_NOTE` segment lies outside the input.
    NoteSegmentOutOfBounds,
    /// A note at this offset inside the note segment runs past its end.
    MalformedNote(usize),
    /// An `NT_PRSTATUS` note is not 336 bytes.
    BadPrstatusSize(u32),
    /// A `PT_LOAD`'s offset, physical or virtual end overflows.
    LoadSegmentOverflows(usize),
}

impl From<CrashNoteError> for ElfCoreError {
    fn from(e: CrashNoteError) -> Self {
        Self::CrashNote(e)
    }
}

impl From<ImageError> for ElfCoreError {
    fn from(e: ImageError) -> Self {
        Self::Image(e)
    }
}

impl fmt::Display for ElfCoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BufferTooSmall { needed, len } => {
                write!(
                    f,
                    "the core header needs {needed} bytes, the buffer holds {len}"
                )
            }
            Self::TooManySegments(n) => {
                write!(f, "{n} program headers, more than {MAX_PHNUM}")
            }
            Self::EmptySegment(i) => write!(f, "memory segment {i} is empty"),
            Self::SegmentOverflows(i) => {
                write!(f, "memory segment {i} overflows the address space")
            }
            Self::SegmentsOutOfOrder(i) => write!(
                f,
                "memory segment {i} starts before the previous one ends (segments must be sorted and disjoint)"
            ),
            Self::CpuIndexTooLarge(cpu) => {
                write!(f, "CPU index {cpu} is too large for pr_pid")
            }
            Self::DuplicateCpu(cpu) => write!(f, "CPU {cpu} has two NT_PRSTATUS notes"),
            Self::CrashNote(e) => write!(f, "crash note: {e}"),
            Self::Image(e) => write!(f, "image notes: {e}"),
            Self::TooLarge => write!(f, "the core header is too large"),
            Self::Truncated { needed, len } => {
                write!(f, "truncated: {len} bytes, {needed} needed")
            }
            Self::BadMagic => write!(f, "no ELF magic"),
            Self::BadClass(c) => write!(f, "ELF class {c}, not ELFCLASS64"),
            Self::BadDataEncoding(d) => write!(f, "ELF data encoding {d}, not little-endian"),
            Self::BadVersion(v) => write!(f, "ELF version {v}, not EV_CURRENT"),
            Self::NotCore(t) => write!(f, "ELF type {t}, not ET_CORE"),
            Self::BadMachine(m) => write!(f, "ELF machine {m}, not EM_X86_64"),
            Self::BadEhsize(s) => write!(f, "e_ehsize {s}, not {EHDR_LEN}"),
            Self::BadPhentsize(s) => write!(f, "e_phentsize {s}, not {PHDR_LEN}"),
            Self::BadPhoff(o) => write!(
                f,
                "e_phoff {o:#x}: program headers must follow the ELF header"
            ),
            Self::NoProgramHeaders => write!(f, "no program headers"),
            Self::NoNoteSegment => write!(f, "no PT_NOTE program header"),
            Self::MultipleNoteSegments => write!(f, "more than one PT_NOTE program header"),
            Self::NoteSegmentOutOfBounds => {
                write!(f, "the PT_NOTE segment lies outside the header")
            }
            Self::MalformedNote(offset) => write!(
                f,
                "the note at offset {offset:#x} of the note segment runs past its end"
            ),
            Self::BadPrstatusSize(size) => {
                write!(f, "NT_PRSTATUS note of {size} bytes, not {PRSTATUS_LEN}")
            }
            Self::LoadSegmentOverflows(i) => {
                write!(f, "PT_LOAD program header {i} overflows")
            }
        }
    }
}

/// Length of a note with a `name_len`-byte name (NUL excluded) and a
/// `desc_len`-byte descriptor, padding included.
pub fn note_len(name_len: usize, desc_len: usize) -> Option<usize> {
    NHDR_LEN
        .checked_add(align_up_usize(name_len.checked_add(1)?, 4)?)?
        .checked_add(align_up_usize(desc_len, 4)?)
}

/// Bytes [`write_core_header`] needs for `cpu_count` CPUs, `segment_count`
/// segments, a crash note descriptor of `crash_desc_len` bytes
/// ([`crate::crash_note::desc_len_for`]) and the image's notes, if any:
/// size the core-header region at boot with the worst case.
pub fn core_header_len(
    cpu_count: usize,
    segment_count: usize,
    crash_desc_len: usize,
    image: Option<&LoadedImage<'_>>,
) -> Option<usize> {
    let cpu_notes = note_len(CORE_NOTE_NAME.len(), PRSTATUS_LEN)?.checked_mul(cpu_count)?;
    let crash_note = note_len(CRASH_NOTE_NAME.len(), crash_desc_len)?;
    prepared_len(segment_count, image)?
        .checked_add(cpu_notes)?
        .checked_add(crash_note)?
        .checked_add(NHDR_LEN)
}

fn validate_inputs(cpus: &[CpuState], segments: &[MemorySegment]) -> Result<(), ElfCoreError> {
    use ElfCoreError as E;
    let phnum = segments.len().checked_add(1).ok_or(E::TooLarge)?;
    if phnum > MAX_PHNUM {
        return Err(E::TooManySegments(phnum));
    }
    for (i, cpu) in cpus.iter().enumerate() {
        if i32::try_from(cpu.cpu_index).is_err() || cpu.cpu_index == i32::MAX as u32 {
            return Err(E::CpuIndexTooLarge(cpu.cpu_index));
        }
        if cpus[..i]
            .iter()
            .any(|other| other.cpu_index == cpu.cpu_index)
        {
            return Err(E::DuplicateCpu(cpu.cpu_index));
        }
    }
    for (i, segment) in segments.iter().enumerate() {
        if segment.len == 0 {
            return Err(E::EmptySegment(i));
        }
        if segment.phys.checked_add(segment.len).is_none()
            || segment.virt.checked_add(segment.len).is_none()
        {
            return Err(E::SegmentOverflows(i));
        }
        let previous_end = i
            .checked_sub(1)
            .and_then(|j| segments.get(j))
            .map_or(0, |p| p.phys.saturating_add(p.len));
        if i > 0 && segment.phys < previous_end {
            return Err(E::SegmentsOutOfOrder(i));
        }
    }
    Ok(())
}

/// Writes one note at `at` and returns the offset after it. `too_small`
/// reports a write past the end of `out` (a bug: `out` was sized first).
fn put_note(
    out: &mut [u8],
    at: usize,
    name: &str,
    n_type: u32,
    desc_len: usize,
    too_small: impl Fn(OutOfBounds) -> ElfCoreError,
    fill_desc: impl FnOnce(&mut [u8]) -> Result<(), ElfCoreError>,
) -> Result<usize, ElfCoreError> {
    let len = note_len(name.len(), desc_len).ok_or(ElfCoreError::TooLarge)?;
    let namesz = u32::try_from(name.len() + 1).map_err(|_| ElfCoreError::TooLarge)?;
    let descsz = u32::try_from(desc_len).map_err(|_| ElfCoreError::TooLarge)?;
    let next = at.checked_add(len).ok_or(ElfCoreError::TooLarge)?;
    bytes::put_u32(out, at, namesz).map_err(&too_small)?;
    bytes::put_u32(out, at + 4, descsz).map_err(&too_small)?;
    bytes::put_u32(out, at + 8, n_type).map_err(&too_small)?;
    bytes::put(out, at + NHDR_LEN, name.as_bytes()).map_err(&too_small)?;
    // namesz + 1 was rounded without overflow by `note_len`.
    let desc_at = at + NHDR_LEN + (name.len() + 1).next_multiple_of(4);
    let desc = desc_at
        .checked_add(desc_len)
        .and_then(|end| out.get_mut(desc_at..end))
        .ok_or(too_small(OutOfBounds))?;
    fill_desc(desc)?;
    Ok(next)
}

#[allow(clippy::too_many_arguments)]
fn put_phdr(
    out: &mut [u8],
    at: usize,
    p_type: u32,
    p_flags: u32,
    p_offset: u64,
    p_vaddr: u64,
    p_paddr: u64,
    size: u64,
) -> Result<(), OutOfBounds> {
    bytes::put_u32(out, at, p_type)?;
    bytes::put_u32(out, at + 4, p_flags)?;
    bytes::put_u64(out, at + 8, p_offset)?;
    bytes::put_u64(out, at + 16, p_vaddr)?;
    bytes::put_u64(out, at + 24, p_paddr)?;
    bytes::put_u64(out, at + 32, size)?; // p_filesz
    bytes::put_u64(out, at + 40, size)?; // p_memsz
    bytes::put_u64(out, at + 48, 0) // p_align
}

fn put_ehdr(out: &mut [u8], phnum: u16) -> Result<(), OutOfBounds> {
    let mut ident = [0u8; 16];
    ident[..4].copy_from_slice(b"\x7fELF");
    ident[4] = ELFCLASS64;
    ident[5] = ELFDATA2LSB;
    ident[6] = EV_CURRENT;
    ident[7] = ELFOSABI_GNU;
    bytes::put(out, 0, &ident)?;
    bytes::put_u16(out, 16, ET_CORE)?;
    bytes::put_u16(out, 18, EM_X86_64)?;
    bytes::put_u32(out, 20, u32::from(EV_CURRENT))?;
    bytes::put_u64(out, 24, 0)?; // e_entry
    bytes::put_u64(out, 32, EHDR_LEN as u64)?; // e_phoff
    bytes::put_u64(out, 40, 0)?; // e_shoff
    bytes::put_u32(out, 48, 0)?; // e_flags
    bytes::put_u16(out, 52, EHDR_LEN as u16)?;
    bytes::put_u16(out, 54, PHDR_LEN as u16)?;
    bytes::put_u16(out, 56, phnum)?;
    bytes::put_u16(out, 58, 0)?; // e_shentsize
    bytes::put_u16(out, 60, 0)?; // e_shnum
    bytes::put_u16(out, 62, 0) // e_shstrndx
}

/// Offsets of the `PT_LOAD` data in a file whose header is `header_len`
/// bytes: the first page boundary after it.
fn file_data_offset(header_len: usize) -> Result<u64, ElfCoreError> {
    align_up(header_len as u64, FILE_DATA_ALIGN).ok_or(ElfCoreError::TooLarge)
}

/// Writes the core header for `cpus` (gdb's first thread is the first CPU:
/// put the one that crashed first), the `crash` record, `segments` (sorted
/// by physical address, disjoint) and the hypervisor's loaded `image` (its
/// `NT_AUXV` and `NT_FILE` notes, for drgn) into `out`. Nothing is written
/// unless everything fits and is valid.
///
/// The notes come in this order: the image's, one `NT_PRSTATUS` per CPU,
/// the crash note. The same bytes as [`prepare_core_header`] followed by
/// [`complete_core_header`].
pub fn write_core_header(
    out: &mut [u8],
    cpus: &[CpuState],
    crash: &CrashRecord<'_>,
    segments: &[MemorySegment],
    image: Option<&LoadedImage<'_>>,
    placement: Placement,
) -> Result<CoreHeaderLayout, ElfCoreError> {
    use ElfCoreError as E;
    validate_inputs(cpus, segments)?;
    let crash_desc_len = crash.desc_len()?;
    let len =
        core_header_len(cpus.len(), segments.len(), crash_desc_len, image).ok_or(E::TooLarge)?;
    if out.len() < len {
        return Err(E::BufferTooSmall {
            needed: len,
            len: out.len(),
        });
    }
    let first_data_offset = match placement {
        Placement::OldMemory { .. } => 0,
        Placement::File => file_data_offset(len)?,
    };
    let prepared = prepare(out, segments, image, placement, first_data_offset)?;
    complete_core_header(out, &prepared, cpus, crash)
}

/// The parts of a core header that do not depend on the crash, as
/// [`prepare_core_header`] wrote them: what [`complete_core_header`] adds
/// to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreparedHeader {
    placement: Placement,
    /// Where the notes begin: right after the program headers.
    notes_start: usize,
    /// Where the crash's notes begin: after the image's.
    crash_notes_at: usize,
    /// A file's first data offset (0 in old memory).
    data_offset: u64,
}

impl PreparedHeader {
    /// The bytes [`prepare_core_header`] wrote: `out[..fixed_len()]`.
    pub fn fixed_len(&self) -> usize {
        self.crash_notes_at
    }
}

/// The bytes [`prepare_core_header`] writes for `segments` and `image`,
/// to size a buffer with.
pub fn prepared_len(segments: usize, image: Option<&LoadedImage<'_>>) -> Option<usize> {
    let phdrs = segments.checked_add(1)?.checked_mul(PHDR_LEN)?;
    let image_notes = match image {
        Some(image) => note_len(CORE_NOTE_NAME.len(), AUXV_DESC_LEN)?
            .checked_add(note_len(CORE_NOTE_NAME.len(), image.nt_file_desc_len())?)?,
        None => 0,
    };
    EHDR_LEN.checked_add(phdrs)?.checked_add(image_notes)
}

/// Writes the parts of an old-memory core header that do not depend on
/// the crash: the ELF header, the memory's program headers and the
/// image's notes (Linux's kexec tools build the whole header when the
/// capture kernel is loaded). At the crash, [`complete_core_header`] adds
/// only the CPUs' notes, the crash note and the note segment's size.
pub fn prepare_core_header(
    out: &mut [u8],
    segments: &[MemorySegment],
    image: Option<&LoadedImage<'_>>,
    header_phys: u64,
) -> Result<PreparedHeader, ElfCoreError> {
    validate_inputs(&[], segments)?;
    prepare(
        out,
        segments,
        image,
        Placement::OldMemory { header_phys },
        0,
    )
}

fn prepare(
    out: &mut [u8],
    segments: &[MemorySegment],
    image: Option<&LoadedImage<'_>>,
    placement: Placement,
    first_data_offset: u64,
) -> Result<PreparedHeader, ElfCoreError> {
    use ElfCoreError as E;
    let phnum = segments.len() + 1; // <= MAX_PHNUM: validated
    let notes_start = EHDR_LEN + phnum * PHDR_LEN;
    let fixed_len = prepared_len(segments.len(), image).ok_or(E::TooLarge)?;
    let out_len = out.len();
    let too_small = |OutOfBounds| E::BufferTooSmall {
        needed: fixed_len,
        len: out_len,
    };
    out.get_mut(..fixed_len)
        .ok_or(E::BufferTooSmall {
            needed: fixed_len,
            len: out_len,
        })?
        .fill(0);
    put_ehdr(out, phnum as u16).map_err(too_small)?;
    let mut data_offset = first_data_offset;
    for (i, segment) in segments.iter().enumerate() {
        let p_offset = match placement {
            Placement::OldMemory { .. } => segment.phys,
            Placement::File => {
                let offset = data_offset;
                data_offset = data_offset.checked_add(segment.len).ok_or(E::TooLarge)?;
                offset
            }
        };
        put_phdr(
            out,
            EHDR_LEN + (i + 1) * PHDR_LEN,
            PT_LOAD,
            PF_R | PF_W | PF_X,
            p_offset,
            segment.virt,
            segment.phys,
            segment.len,
        )
        .map_err(too_small)?;
    }
    let mut at = notes_start;
    if let Some(image) = image {
        at = put_note(
            out,
            at,
            CORE_NOTE_NAME,
            NT_AUXV,
            AUXV_DESC_LEN,
            too_small,
            |desc| image.write_auxv(desc).map_err(too_small),
        )?;
        at = put_note(
            out,
            at,
            CORE_NOTE_NAME,
            NT_FILE,
            image.nt_file_desc_len(),
            too_small,
            |desc| image.write_nt_file(desc).map_err(too_small),
        )?;
    }
    Ok(PreparedHeader {
        placement,
        notes_start,
        crash_notes_at: at,
        data_offset: first_data_offset,
    })
}

/// Completes a header [`prepare_core_header`] wrote into `out`: one
/// `NT_PRSTATUS` note per CPU of `cpus` (the first is gdb's first thread:
/// put the one that crashed first), the `crash` record, the terminating
/// empty note, and the `PT_NOTE` program header. Writes that program
/// header and what lies from [`PreparedHeader::fixed_len`] on, nothing else
/// of the prepared part; and nothing at all unless everything fits and is
/// valid.
pub fn complete_core_header(
    out: &mut [u8],
    prepared: &PreparedHeader,
    cpus: &[CpuState],
    crash: &CrashRecord<'_>,
) -> Result<CoreHeaderLayout, ElfCoreError> {
    use ElfCoreError as E;
    validate_inputs(cpus, &[])?;
    let crash_desc_len = crash.desc_len()?;
    let len = note_len(CORE_NOTE_NAME.len(), PRSTATUS_LEN)
        .and_then(|note| note.checked_mul(cpus.len()))
        .and_then(|notes| notes.checked_add(prepared.crash_notes_at))
        .and_then(|at| at.checked_add(note_len(CRASH_NOTE_NAME.len(), crash_desc_len)?))
        .and_then(|at| at.checked_add(NHDR_LEN))
        .ok_or(E::TooLarge)?;
    let out_len = out.len();
    let out = out.get_mut(..len).ok_or(E::BufferTooSmall {
        needed: len,
        len: out_len,
    })?;
    let too_small = |OutOfBounds| E::BufferTooSmall {
        needed: len,
        len: out_len,
    };
    out.get_mut(prepared.crash_notes_at..)
        .ok_or(E::BufferTooSmall {
            needed: len,
            len: out_len,
        })?
        .fill(0);
    let mut at = prepared.crash_notes_at;
    for cpu in cpus {
        at = put_note(
            out,
            at,
            CORE_NOTE_NAME,
            NT_PRSTATUS,
            PRSTATUS_LEN,
            too_small,
            |desc| {
                // cpu_index < i32::MAX: checked by validate_inputs.
                let pid = (cpu.cpu_index as i32).saturating_add(1);
                bytes::put(desc, PR_PID_OFFSET, &pid.to_le_bytes()).map_err(too_small)?;
                for (i, reg) in cpu.regs.to_array().into_iter().enumerate() {
                    bytes::put_u64(desc, PR_REG_OFFSET + i * 8, reg).map_err(too_small)?;
                }
                Ok(())
            },
        )?;
    }
    at = put_note(
        out,
        at,
        CRASH_NOTE_NAME,
        NT_HV_CRASH,
        crash_desc_len,
        too_small,
        |desc| {
            crash.write(desc)?;
            Ok(())
        },
    )?;
    let notes_end = at;
    // The terminating empty note: already zero.
    let header_len = notes_end + NHDR_LEN;
    debug_assert_eq!(header_len, len);

    let notes_start = prepared.notes_start;
    let notes_len = (notes_end - notes_start) as u64;
    let (note_offset, note_size) = match prepared.placement {
        Placement::OldMemory { header_phys } => (
            header_phys
                .checked_add(notes_start as u64)
                .ok_or(E::TooLarge)?,
            notes_len + NHDR_LEN as u64,
        ),
        Placement::File => (notes_start as u64, notes_len),
    };
    put_phdr(out, EHDR_LEN, PT_NOTE, 0, note_offset, 0, 0, note_size).map_err(too_small)?;
    Ok(CoreHeaderLayout {
        len: header_len,
        notes: notes_start..notes_end,
        data_offset: prepared.data_offset,
    })
}

/// One program header, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramHeader {
    /// `p_type`.
    pub p_type: u32,
    /// `p_flags`.
    pub p_flags: u32,
    /// `p_offset`.
    pub p_offset: u64,
    /// `p_vaddr`.
    pub p_vaddr: u64,
    /// `p_paddr`.
    pub p_paddr: u64,
    /// `p_filesz`.
    pub p_filesz: u64,
    /// `p_memsz`.
    pub p_memsz: u64,
    /// `p_align`.
    pub p_align: u64,
}

impl ProgramHeader {
    fn read(bytes: &[u8], at: usize) -> Option<Self> {
        Some(Self {
            p_type: u32_at(bytes, at)?,
            p_flags: u32_at(bytes, at + 4)?,
            p_offset: u64_at(bytes, at + 8)?,
            p_vaddr: u64_at(bytes, at + 16)?,
            p_paddr: u64_at(bytes, at + 24)?,
            p_filesz: u64_at(bytes, at + 32)?,
            p_memsz: u64_at(bytes, at + 40)?,
            p_align: u64_at(bytes, at + 48)?,
        })
    }
}

/// One note, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Note<'a> {
    /// The name, without its NUL terminator.
    pub name: &'a [u8],
    /// `n_type`.
    pub n_type: u32,
    /// The descriptor, without padding.
    pub desc: &'a [u8],
}

/// A CPU's `NT_PRSTATUS`, as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrStatus {
    /// `pr_pid`.
    pub pid: i32,
    /// `pr_reg`.
    pub regs: CpuRegisters,
}

impl PrStatus {
    /// The CPU index this crate's writer encoded in `pr_pid`.
    pub fn cpu_index(&self) -> Option<u32> {
        u32::try_from(self.pid).ok()?.checked_sub(1)
    }
}

/// Reads the note at `at` in `notes`: `Ok(None)` at the end (no bytes
/// left, or a note with `n_namesz == 0`, as Linux stops there).
fn read_note(notes: &[u8], at: usize) -> Result<Option<(Note<'_>, usize)>, ElfCoreError> {
    let malformed = ElfCoreError::MalformedNote(at);
    if at >= notes.len() {
        return Ok(None);
    }
    let namesz = u32_at(notes, at).ok_or(malformed)? as usize;
    let descsz = u32_at(notes, at + 4).ok_or(malformed)? as usize;
    let n_type = u32_at(notes, at + 8).ok_or(malformed)?;
    if namesz == 0 {
        return Ok(None);
    }
    let name_at = at.checked_add(NHDR_LEN).ok_or(malformed)?;
    let desc_at = name_at
        .checked_add(align_up_usize(namesz, 4).ok_or(malformed)?)
        .ok_or(malformed)?;
    let next = desc_at
        .checked_add(align_up_usize(descsz, 4).ok_or(malformed)?)
        .ok_or(malformed)?;
    if next > notes.len() {
        return Err(malformed);
    }
    let name = bytes::slice_at(notes, name_at, namesz).ok_or(malformed)?;
    let name = name.strip_suffix(&[0]).unwrap_or(name);
    let desc = bytes::slice_at(notes, desc_at, descsz).ok_or(malformed)?;
    Ok(Some((Note { name, n_type, desc }, next)))
}

/// Iterator over the notes of a [`CoreDump`] (already validated).
#[derive(Clone, Debug)]
pub struct Notes<'a> {
    notes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Notes<'a> {
    type Item = Note<'a>;

    fn next(&mut self) -> Option<Note<'a>> {
        let (note, next) = read_note(self.notes, self.at).ok()??;
        self.at = next;
        Some(note)
    }
}

/// A validated ELF core header, borrowed from its bytes.
#[derive(Clone, Copy, Debug)]
pub struct CoreDump<'a> {
    bytes: &'a [u8],
    phnum: usize,
    /// The notes up to the end or the terminator, all validated.
    notes: &'a [u8],
    /// Offset of `notes` in `bytes`.
    notes_offset: usize,
}

impl<'a> CoreDump<'a> {
    /// Reads a dump file, or its first bytes (at least the headers and
    /// notes): `p_offset`s are file offsets.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfCoreError> {
        Self::parse_with(bytes, None)
    }

    /// Reads a header left in RAM for a capture kernel
    /// ([`Placement::OldMemory`]) at `header_phys`; `bytes` starts there.
    pub fn parse_elfcorehdr(bytes: &'a [u8], header_phys: u64) -> Result<Self, ElfCoreError> {
        Self::parse_with(bytes, Some(header_phys))
    }

    fn parse_with(bytes: &'a [u8], header_phys: Option<u64>) -> Result<Self, ElfCoreError> {
        use ElfCoreError as E;
        let truncated = |needed: usize| E::Truncated {
            needed,
            len: bytes.len(),
        };
        if bytes.len() < EHDR_LEN {
            return Err(truncated(EHDR_LEN));
        }
        let field16 = |at: usize| u16_at(bytes, at).ok_or(truncated(EHDR_LEN));
        if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
            return Err(E::BadMagic);
        }
        let ident = |i: usize| bytes.get(i).copied().ok_or(truncated(EHDR_LEN));
        if ident(4)? != ELFCLASS64 {
            return Err(E::BadClass(ident(4)?));
        }
        if ident(5)? != ELFDATA2LSB {
            return Err(E::BadDataEncoding(ident(5)?));
        }
        if ident(6)? != EV_CURRENT {
            return Err(E::BadVersion(u32::from(ident(6)?)));
        }
        let e_type = field16(16)?;
        if e_type != ET_CORE {
            return Err(E::NotCore(e_type));
        }
        let e_machine = field16(18)?;
        if e_machine != EM_X86_64 {
            return Err(E::BadMachine(e_machine));
        }
        let e_version = u32_at(bytes, 20).ok_or(truncated(EHDR_LEN))?;
        if e_version != u32::from(EV_CURRENT) {
            return Err(E::BadVersion(e_version));
        }
        let e_ehsize = field16(52)?;
        if usize::from(e_ehsize) != EHDR_LEN {
            return Err(E::BadEhsize(e_ehsize));
        }
        let e_phentsize = field16(54)?;
        if usize::from(e_phentsize) != PHDR_LEN {
            return Err(E::BadPhentsize(e_phentsize));
        }
        let e_phoff = u64_at(bytes, 32).ok_or(truncated(EHDR_LEN))?;
        if e_phoff != EHDR_LEN as u64 {
            return Err(E::BadPhoff(e_phoff));
        }
        let phnum = usize::from(field16(56)?);
        if phnum == 0 {
            return Err(E::NoProgramHeaders);
        }
        let headers_end = EHDR_LEN + phnum * PHDR_LEN; // phnum < 2^16
        if bytes.len() < headers_end {
            return Err(truncated(headers_end));
        }

        let mut note_phdr = None;
        for i in 0..phnum {
            let phdr = ProgramHeader::read(bytes, EHDR_LEN + i * PHDR_LEN)
                .ok_or(truncated(headers_end))?;
            match phdr.p_type {
                PT_NOTE if note_phdr.is_some() => return Err(E::MultipleNoteSegments),
                PT_NOTE => note_phdr = Some(phdr),
                PT_LOAD
                    if phdr.p_offset.checked_add(phdr.p_filesz).is_none()
                        || phdr.p_paddr.checked_add(phdr.p_memsz).is_none()
                        || phdr.p_vaddr.checked_add(phdr.p_memsz).is_none() =>
                {
                    return Err(E::LoadSegmentOverflows(i));
                }
                _ => {}
            }
        }
        let note_phdr = note_phdr.ok_or(E::NoNoteSegment)?;
        let (offset, size) = match header_phys {
            None => (Some(note_phdr.p_offset), note_phdr.p_filesz),
            Some(phys) => (note_phdr.p_offset.checked_sub(phys), note_phdr.p_memsz),
        };
        let notes_offset = offset
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(E::NoteSegmentOutOfBounds)?;
        let size = usize::try_from(size).map_err(|_| E::NoteSegmentOutOfBounds)?;
        let segment =
            bytes::slice_at(bytes, notes_offset, size).ok_or(E::NoteSegmentOutOfBounds)?;

        // Validate every note now, so that iterating cannot fail later.
        let mut at = 0;
        while let Some((note, next)) = read_note(segment, at)? {
            if note.name == CORE_NOTE_NAME.as_bytes()
                && note.n_type == NT_PRSTATUS
                && note.desc.len() != PRSTATUS_LEN
            {
                return Err(E::BadPrstatusSize(note.desc.len() as u32));
            }
            if note.name == CRASH_NOTE_NAME.as_bytes() && note.n_type == NT_HV_CRASH {
                CrashNote::parse(note.desc)?;
            }
            if note.name == CORE_NOTE_NAME.as_bytes() && note.n_type == NT_FILE {
                NtFile::parse(note.desc)?;
            }
            if note.name == CORE_NOTE_NAME.as_bytes() && note.n_type == NT_AUXV {
                image::read_auxv(note.desc)?;
            }
            at = next;
        }
        Ok(Self {
            bytes,
            phnum,
            notes: segment.get(..at).unwrap_or_default(),
            notes_offset,
        })
    }

    /// All program headers.
    pub fn program_headers(&self) -> impl ExactSizeIterator<Item = ProgramHeader> + 'a {
        let bytes = self.bytes;
        (0..self.phnum).map(move |i| {
            // Bounds checked by `parse`.
            ProgramHeader::read(bytes, EHDR_LEN + i * PHDR_LEN).unwrap_or(ProgramHeader {
                p_type: 0,
                p_flags: 0,
                p_offset: 0,
                p_vaddr: 0,
                p_paddr: 0,
                p_filesz: 0,
                p_memsz: 0,
                p_align: 0,
            })
        })
    }

    /// The `PT_LOAD` program headers: the memory in the dump.
    pub fn load_segments(&self) -> impl Iterator<Item = ProgramHeader> + 'a {
        self.program_headers().filter(|p| p.p_type == PT_LOAD)
    }

    /// The bytes of a `PT_LOAD` segment of a dump file, if `bytes` holds
    /// them.
    pub fn segment_data(&self, segment: &ProgramHeader) -> Option<&'a [u8]> {
        bytes::slice_at(
            self.bytes,
            usize::try_from(segment.p_offset).ok()?,
            usize::try_from(segment.p_filesz).ok()?,
        )
    }

    /// Every note, in order.
    pub fn notes(&self) -> Notes<'a> {
        Notes {
            notes: self.notes,
            at: 0,
        }
    }

    /// The CPUs' `NT_PRSTATUS` notes, in order (the first is gdb's current
    /// thread).
    pub fn cpus(&self) -> impl Iterator<Item = PrStatus> + 'a {
        self.notes()
            .filter(|n| n.name == CORE_NOTE_NAME.as_bytes() && n.n_type == NT_PRSTATUS)
            .map(|n| {
                let pid = bytes::array(n.desc, PR_PID_OFFSET).map_or(0, i32::from_le_bytes);
                let mut regs = [0u64; PR_REG_COUNT];
                for (i, reg) in regs.iter_mut().enumerate() {
                    *reg = u64_at(n.desc, PR_REG_OFFSET + i * 8).unwrap_or(0);
                }
                PrStatus {
                    pid,
                    regs: CpuRegisters::from_array(regs),
                }
            })
    }

    /// The image the dump describes (its `NT_AUXV` and `NT_FILE` notes,
    /// validated by `parse`), if it has both.
    pub fn image_notes(&self) -> Option<ImageNotes<'a>> {
        let core_note = |n_type: u32| {
            self.notes()
                .find(move |n| n.name == CORE_NOTE_NAME.as_bytes() && n.n_type == n_type)
        };
        let (phdr_addr, phnum, entry) = image::read_auxv(core_note(NT_AUXV)?.desc).ok()?;
        let files = NtFile::parse(core_note(NT_FILE)?.desc).ok()?;
        Some(ImageNotes {
            phdr_addr,
            phnum,
            entry,
            files,
        })
    }

    /// The hypervisor's crash note, if there is one (validated by `parse`).
    pub fn crash_note(&self) -> Option<CrashNote<'a>> {
        self.notes()
            .find(|n| n.name == CRASH_NOTE_NAME.as_bytes() && n.n_type == NT_HV_CRASH)
            .and_then(|n| CrashNote::parse(n.desc).ok())
    }

    /// Writes the header of a dump file ([`Placement::File`]) with the same
    /// ELF header, segments and notes into `out`: what the built-in capture
    /// mode streams before the segments' bytes, in [`Self::load_segments`]
    /// order from [`CoreHeaderLayout::data_offset`].
    pub fn write_file_header(&self, out: &mut [u8]) -> Result<CoreHeaderLayout, ElfCoreError> {
        use ElfCoreError as E;
        let headers_len = EHDR_LEN + self.phnum * PHDR_LEN;
        let notes_len = self.notes.len();
        let len = headers_len
            .checked_add(notes_len)
            .and_then(|l| l.checked_add(NHDR_LEN))
            .ok_or(E::TooLarge)?;
        let out_len = out.len();
        let too_small = |OutOfBounds| E::BufferTooSmall {
            needed: len,
            len: out_len,
        };
        let out = out.get_mut(..len).ok_or(too_small(OutOfBounds))?;
        out.fill(0);
        let ehdr = self.bytes.get(..EHDR_LEN).ok_or(E::TooLarge)?;
        bytes::put(out, 0, ehdr).map_err(too_small)?;
        bytes::put(out, headers_len, self.notes).map_err(too_small)?;
        let data_offset = file_data_offset(len)?;
        let mut next = data_offset;
        for (i, phdr) in self.program_headers().enumerate() {
            let (p_offset, p_filesz, p_memsz) = match phdr.p_type {
                PT_NOTE => (headers_len as u64, notes_len as u64, notes_len as u64),
                PT_LOAD => {
                    let offset = next;
                    next = next.checked_add(phdr.p_memsz).ok_or(E::TooLarge)?;
                    (offset, phdr.p_memsz, phdr.p_memsz)
                }
                _ => (phdr.p_offset, phdr.p_filesz, phdr.p_memsz),
            };
            let at = EHDR_LEN + i * PHDR_LEN;
            let original = self.bytes.get(at..at + PHDR_LEN).ok_or(E::TooLarge)?;
            bytes::put(out, at, original).map_err(too_small)?;
            bytes::put_u64(out, at + 8, p_offset).map_err(too_small)?;
            bytes::put_u64(out, at + 32, p_filesz).map_err(too_small)?;
            bytes::put_u64(out, at + 40, p_memsz).map_err(too_small)?;
        }
        Ok(CoreHeaderLayout {
            len,
            notes: headers_len..headers_len + notes_len,
            data_offset,
        })
    }

    /// Offset of the validated notes in the parsed bytes.
    pub fn notes_offset(&self) -> usize {
        self.notes_offset
    }
}

#[cfg(test)]
pub(crate) mod tests;
