//! The hv capture image: hv itself, linked inside the crash reservation
//! (`HV_LINK_BASE`) and entered through the Xen PVH ABI, as QEMU's
//! `-kernel` enters it at boot.
//!
//! # At boot
//! 1. [`PvhImage::parse`] the boot module: an ELF64 x86_64 executable whose
//!    program headers are all checked (count, entry size, file ranges,
//!    `p_memsz >= p_filesz`, no wrap, no two `PT_LOAD`s overlapping) and
//!    whose `PT_NOTE`s carry `XEN_ELFNOTE_PHYS32_ENTRY` (name `"Xen"`,
//!    type 18, a 4- or 8-byte entry below 4 GiB, inside a loaded segment);
//! 2. [`PvhImage::place`] it: every `PT_LOAD` goes to its own physical
//!    address, which must lie in the usable part of the reservation, and
//!    the ELF core header region follows the image, page-aligned;
//! 3. copy each segment with [`PvhImage::write_segment`];
//! 4. [`write_boot_data`]: the `hvm_start_info`, its memory map and the
//!    command line, written where the purgatory hands them over in EBX.
//!
//! # The memory map the capture image gets
//! Like the Linux capture kernel's ([`crate::boot_params`]), it keeps the
//! crashed hypervisor's memory away from the capture image's allocator, but
//! it lists everything (hv in capture mode reads the old memory through the
//! core header, and needs the firmware ranges to know what is not RAM):
//! - every firmware range outside the reservation, with usable RAM turned
//!   into reserved (the capture image reads old memory, never allocates
//!   from it) and types another kernel may not know turned into reserved;
//! - the reservation as RAM, except the core header region, reserved.
//!
//! A map that does not fit is an error, never a shorter map.

use core::fmt::{self, Write};

use hv_abi::e820::{E820_RAM, E820_RESERVED, E820Kind};
use hv_abi::pvh::{
    MEMMAP_ENTRY_LEN, MemmapEntry, START_INFO_LEN, START_INFO_VERSION, StartInfo, WireEntry,
};

use crate::boot_params::{self, BootParamsError, E820Entry};
use crate::bytes::{self, SliceWriter};
use crate::{PAGE_SIZE, PhysRange};

/// Program headers accepted (hv has 4).
pub const MAX_PROGRAM_HEADERS: usize = 64;
/// `PT_LOAD` segments accepted (hv has 3).
pub const MAX_LOAD_SEGMENTS: usize = 16;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// Why the hv capture image cannot be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvhLoadError {
    /// The file is shorter than an ELF64 header.
    TooShort(usize),
    /// No ELF magic.
    NotElf,
    /// Not ELF64 little-endian (`EI_CLASS`, `EI_DATA`).
    NotElf64LittleEndian {
        /// `EI_CLASS`.
        class: u8,
        /// `EI_DATA`.
        data: u8,
    },
    /// `EI_VERSION` or `e_version` is not 1.
    BadElfVersion(u32),
    /// `e_type` is not `ET_EXEC`.
    NotExecutable(u16),
    /// `e_machine` is not x86_64.
    NotX86_64(u16),
    /// `e_phentsize` is not 56.
    BadProgramHeaderSize(u16),
    /// No program headers, or more than [`MAX_PROGRAM_HEADERS`].
    BadProgramHeaderCount(u16),
    /// The program header table runs past the end of the file.
    ProgramHeadersOutsideFile {
        /// `e_phoff`.
        offset: u64,
        /// `e_phnum`.
        count: u16,
    },
    /// A segment's file bytes run past the end of the file.
    SegmentOutsideFile {
        /// Its program header's index.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        filesz: u64,
    },
    /// A `PT_LOAD` with `p_memsz < p_filesz`.
    MemSmallerThanFile {
        /// Its program header's index.
        index: usize,
        /// `p_filesz`.
        filesz: u64,
        /// `p_memsz`.
        memsz: u64,
    },
    /// A `PT_LOAD` whose physical end overflows.
    SegmentWraps {
        /// Its program header's index.
        index: usize,
        /// `p_paddr`.
        paddr: u64,
        /// `p_memsz`.
        memsz: u64,
    },
    /// More than [`MAX_LOAD_SEGMENTS`] non-empty `PT_LOAD`s.
    TooManyLoadSegments,
    /// No non-empty `PT_LOAD`.
    NoLoadSegments,
    /// Two `PT_LOAD`s share physical memory.
    SegmentsOverlap {
        /// The earlier one in the table.
        first: PhysRange,
        /// The later one.
        second: PhysRange,
    },
    /// A note in a `PT_NOTE` segment runs past the segment.
    MalformedNote {
        /// The segment's program header index.
        index: usize,
    },
    /// The PVH entry note's descriptor is neither 4 nor 8 bytes.
    BadEntryNote {
        /// Its `n_descsz`.
        descsz: u32,
    },
    /// The PVH entry point does not fit 32 bits.
    EntryAbove4GiB(u64),
    /// No `XEN_ELFNOTE_PHYS32_ENTRY` note: the image has no PVH entry.
    NoEntryNote,
    /// The PVH entry point lies in no `PT_LOAD`.
    EntryNotLoaded(u32),
    /// The usable part of the reservation is empty or its end overflows.
    BadUsableRange(PhysRange),
    /// A segment lies outside the usable part of the reservation (hv was
    /// linked for another `HV_LINK_BASE`, or `crashkernel=` differs).
    SegmentOutsideReservation {
        /// The segment.
        segment: PhysRange,
        /// The usable part of the reservation.
        usable: PhysRange,
    },
    /// The core header region was asked for with length 0.
    EmptyCoreHeader,
    /// The image and the core header region after it do not fit.
    ReservationTooSmall {
        /// The usable part of the reservation.
        usable: PhysRange,
        /// Where the core header region would end (`None`: overflows).
        needed_end: Option<u64>,
    },
    /// [`PvhImage::write_segment`] got a destination of the wrong length.
    DestinationLength {
        /// The segment's `p_memsz`.
        expected: u64,
        /// The destination's length.
        len: usize,
    },
    /// The crash reservation is empty or its end overflows.
    BadReservation(PhysRange),
    /// The core header region is empty, not page-aligned or not inside the
    /// reservation.
    BadCoreHeaderRange {
        /// The region.
        elfcorehdr: PhysRange,
        /// The reservation.
        reservation: PhysRange,
    },
    /// The keep-out range is not inside the reservation, or overlaps the
    /// core header region.
    BadKeepOut {
        /// The range.
        keep_out: PhysRange,
        /// The reservation.
        reservation: PhysRange,
    },
    /// The reservation is not all RAM in the firmware map.
    ReservationNotRam(BootParamsError),
    /// The boot data's physical address is not 8-byte aligned.
    BootDataMisaligned(u64),
    /// The start info would lie above 4 GiB (EBX holds its address), or
    /// the boot data's end overflows.
    BootDataOutOfReach(u64),
    /// The memory map has more entries than the buffer or the ABI's `u32`
    /// count holds.
    TooManyMemmapEntries {
        /// Entries the map needs.
        needed: usize,
        /// Entries the buffer holds after the start info.
        capacity: usize,
    },
    /// The command line does not fit after the memory map.
    CmdlineTooLong {
        /// Bytes it needs, with its NUL.
        needed: usize,
        /// Bytes left in the buffer.
        room: usize,
    },
    /// The command line contains a NUL.
    CmdlineContainsNul,
}

impl fmt::Display for PvhLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooShort(len) => write!(f, "{len} bytes is too short for an ELF64 header"),
            Self::NotElf => f.write_str("not an ELF image"),
            Self::NotElf64LittleEndian { class, data } => write!(
                f,
                "not a little-endian ELF64 image (EI_CLASS {class}, EI_DATA {data})"
            ),
            Self::BadElfVersion(version) => write!(f, "ELF version {version}, expected 1"),
            Self::NotExecutable(kind) => write!(f, "ELF type {kind}, expected ET_EXEC (2)"),
            Self::NotX86_64(machine) => write!(f, "ELF machine {machine}, expected x86_64 (62)"),
            Self::BadProgramHeaderSize(size) => {
                write!(f, "program headers of {size} bytes, expected {PHDR_LEN}")
            }
            Self::BadProgramHeaderCount(count) => write!(
                f,
                "{count} program headers, expected 1 to {MAX_PROGRAM_HEADERS}"
            ),
            Self::ProgramHeadersOutsideFile { offset, count } => write!(
                f,
                "{count} program headers at offset {offset:#x} run past the end of the file"
            ),
            Self::SegmentOutsideFile {
                index,
                offset,
                filesz,
            } => write!(
                f,
                "segment {index} ({filesz:#x} bytes at offset {offset:#x}) runs past the end of the file"
            ),
            Self::MemSmallerThanFile {
                index,
                filesz,
                memsz,
            } => write!(
                f,
                "segment {index} has p_memsz {memsz:#x} below p_filesz {filesz:#x}"
            ),
            Self::SegmentWraps {
                index,
                paddr,
                memsz,
            } => write!(
                f,
                "segment {index} ({memsz:#x} bytes at {paddr:#x}) wraps around the address space"
            ),
            Self::TooManyLoadSegments => {
                write!(f, "more than {MAX_LOAD_SEGMENTS} loadable segments")
            }
            Self::NoLoadSegments => f.write_str("no loadable segment"),
            Self::SegmentsOverlap { first, second } => {
                write!(f, "loadable segments {first} and {second} overlap")
            }
            Self::MalformedNote { index } => {
                write!(f, "a note in segment {index} runs past the segment")
            }
            Self::BadEntryNote { descsz } => write!(
                f,
                "the PVH entry note has a {descsz}-byte descriptor, expected 4 or 8"
            ),
            Self::EntryAbove4GiB(entry) => {
                write!(f, "the PVH entry point {entry:#x} is above 4 GiB")
            }
            Self::NoEntryNote => {
                f.write_str("no PVH entry note (Xen XEN_ELFNOTE_PHYS32_ENTRY): not a PVH image")
            }
            Self::EntryNotLoaded(entry) => {
                write!(
                    f,
                    "the PVH entry point {entry:#x} lies in no loadable segment"
                )
            }
            Self::BadUsableRange(range) => {
                write!(
                    f,
                    "the reservation's usable part {range} is empty or overflows"
                )
            }
            Self::SegmentOutsideReservation { segment, usable } => write!(
                f,
                "segment {segment} lies outside the reservation's usable part {usable} \
                 (wrong HV_LINK_BASE or crashkernel=)"
            ),
            Self::EmptyCoreHeader => f.write_str("an empty ELF core header region"),
            Self::ReservationTooSmall { usable, needed_end } => match needed_end {
                Some(end) => write!(
                    f,
                    "the reservation's usable part {usable} is too small for the image and the \
                     core header, which need it to reach {end:#x}"
                ),
                None => write!(
                    f,
                    "the image and the core header overflow the address space after {usable}"
                ),
            },
            Self::DestinationLength { expected, len } => write!(
                f,
                "a {len}-byte destination for a segment of {expected:#x} bytes"
            ),
            Self::BadReservation(range) => {
                write!(f, "the crash reservation {range} is empty or overflows")
            }
            Self::BadCoreHeaderRange {
                elfcorehdr,
                reservation,
            } => write!(
                f,
                "the ELF core header region {elfcorehdr} is empty, not page-aligned or outside \
                 the reservation {reservation}"
            ),
            Self::BadKeepOut {
                keep_out,
                reservation,
            } => write!(
                f,
                "the keep-out range {keep_out} is outside the reservation {reservation} or \
                 overlaps the ELF core header region"
            ),
            Self::ReservationNotRam(error) => write!(f, "{error}"),
            Self::BootDataMisaligned(addr) => {
                write!(f, "the PVH boot data at {addr:#x} is not 8-byte aligned")
            }
            Self::BootDataOutOfReach(addr) => write!(
                f,
                "the PVH start info at {addr:#x} is not below 4 GiB with its data"
            ),
            Self::TooManyMemmapEntries { needed, capacity } => write!(
                f,
                "the capture image's memory map needs {needed} entries, the boot data room \
                 holds {capacity}"
            ),
            Self::CmdlineTooLong { needed, room } => write!(
                f,
                "the capture image's command line needs {needed} bytes, {room} are left"
            ),
            Self::CmdlineContainsNul => f.write_str("the capture image's command line has a NUL"),
        }
    }
}

/// One `PT_LOAD`: `file_len` bytes of the file at `file_offset`, then
/// zeros up to `mem_len`, at physical address `phys`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    /// `p_paddr`.
    pub phys: u64,
    /// `p_offset`.
    pub file_offset: usize,
    /// `p_filesz`.
    pub file_len: usize,
    /// `p_memsz` (at least `file_len`; `phys + mem_len` does not overflow).
    pub mem_len: u64,
}

impl LoadSegment {
    const EMPTY: Self = Self {
        phys: 0,
        file_offset: 0,
        file_len: 0,
        mem_len: 0,
    };

    /// The physical memory it occupies.
    pub const fn range(&self) -> PhysRange {
        PhysRange::new(self.phys, self.mem_len)
    }
}

/// A validated PVH ELF image.
#[derive(Clone)]
pub struct PvhImage<'a> {
    image: &'a [u8],
    loads: [LoadSegment; MAX_LOAD_SEGMENTS],
    load_count: usize,
    entry: u32,
}

impl fmt::Debug for PvhImage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the image's bytes: megabytes of them.
        f.debug_struct("PvhImage")
            .field("len", &self.image.len())
            .field("load_segments", &self.load_segments())
            .field("entry", &format_args!("{:#x}", self.entry))
            .finish()
    }
}

/// A program header's fields.
struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

impl Phdr {
    fn read(bytes: &[u8]) -> Option<Self> {
        Some(Self {
            kind: bytes::u32_at(bytes, 0)?,
            offset: bytes::u64_at(bytes, 8)?,
            paddr: bytes::u64_at(bytes, 24)?,
            filesz: bytes::u64_at(bytes, 32)?,
            memsz: bytes::u64_at(bytes, 40)?,
            align: bytes::u64_at(bytes, 48)?,
        })
    }
}

impl<'a> PvhImage<'a> {
    /// Validates `image` (see the module docs). Everything [`Self::place`]
    /// and [`Self::write_segment`] later rely on is checked here.
    pub fn parse(image: &'a [u8]) -> Result<Self, PvhLoadError> {
        use PvhLoadError as E;
        let header = image.get(..EHDR_LEN).ok_or(E::TooShort(image.len()))?;
        // In bounds below: `header` is EHDR_LEN bytes.
        let u16_at = |at| bytes::u16_at(header, at).unwrap_or(0);
        if header.get(..4) != Some(b"\x7fELF") {
            return Err(E::NotElf);
        }
        let (class, data) = (header[4], header[5]);
        if (class, data) != (2, 1) {
            return Err(E::NotElf64LittleEndian { class, data });
        }
        if header[6] != 1 {
            return Err(E::BadElfVersion(u32::from(header[6])));
        }
        let e_version = bytes::u32_at(header, 20).unwrap_or(0);
        if e_version != 1 {
            return Err(E::BadElfVersion(e_version));
        }
        if u16_at(16) != ET_EXEC {
            return Err(E::NotExecutable(u16_at(16)));
        }
        if u16_at(18) != EM_X86_64 {
            return Err(E::NotX86_64(u16_at(18)));
        }
        let phoff = bytes::u64_at(header, 32).unwrap_or(0);
        let phentsize = u16_at(54);
        let phnum = u16_at(56);
        if usize::from(phentsize) != PHDR_LEN {
            return Err(E::BadProgramHeaderSize(phentsize));
        }
        if phnum == 0 || usize::from(phnum) > MAX_PROGRAM_HEADERS {
            return Err(E::BadProgramHeaderCount(phnum));
        }
        let table = usize::try_from(phoff)
            .ok()
            .and_then(|offset| bytes::slice_at(image, offset, usize::from(phnum) * PHDR_LEN))
            .ok_or(E::ProgramHeadersOutsideFile {
                offset: phoff,
                count: phnum,
            })?;

        let mut parsed = Self {
            image,
            loads: [LoadSegment::EMPTY; MAX_LOAD_SEGMENTS],
            load_count: 0,
            entry: 0,
        };
        let mut entry = None;
        for (index, raw) in table.chunks_exact(PHDR_LEN).enumerate() {
            // Always some: the chunk is PHDR_LEN bytes.
            let Some(phdr) = Phdr::read(raw) else {
                continue;
            };
            let file = file_range(image, &phdr).ok_or(E::SegmentOutsideFile {
                index,
                offset: phdr.offset,
                filesz: phdr.filesz,
            })?;
            match phdr.kind {
                PT_LOAD => parsed.add_load(index, &phdr, file)?,
                PT_NOTE if entry.is_none() => {
                    let notes = image.get(file).unwrap_or_default();
                    entry = find_entry_note(notes, phdr.align, index)?;
                }
                _ => {}
            }
        }
        if parsed.load_count == 0 {
            return Err(E::NoLoadSegments);
        }
        let entry = entry.ok_or(E::NoEntryNote)?;
        let loaded = parsed.load_segments().iter().any(|segment| {
            segment.phys <= u64::from(entry) && u64::from(entry) - segment.phys < segment.mem_len
        });
        if !loaded {
            return Err(E::EntryNotLoaded(entry));
        }
        parsed.entry = entry;
        Ok(parsed)
    }

    fn add_load(
        &mut self,
        index: usize,
        phdr: &Phdr,
        file: core::ops::Range<usize>,
    ) -> Result<(), PvhLoadError> {
        use PvhLoadError as E;
        if phdr.memsz < phdr.filesz {
            return Err(E::MemSmallerThanFile {
                index,
                filesz: phdr.filesz,
                memsz: phdr.memsz,
            });
        }
        if phdr.paddr.checked_add(phdr.memsz).is_none() {
            return Err(E::SegmentWraps {
                index,
                paddr: phdr.paddr,
                memsz: phdr.memsz,
            });
        }
        if phdr.memsz == 0 {
            // Nothing to load (and so nothing to overlap).
            return Ok(());
        }
        let segment = LoadSegment {
            phys: phdr.paddr,
            file_offset: file.start,
            file_len: file.len(),
            mem_len: phdr.memsz,
        };
        if let Some(other) = self
            .load_segments()
            .iter()
            .find(|other| other.range().overlaps(&segment.range()))
        {
            return Err(E::SegmentsOverlap {
                first: other.range(),
                second: segment.range(),
            });
        }
        let slot = self
            .loads
            .get_mut(self.load_count)
            .ok_or(E::TooManyLoadSegments)?;
        *slot = segment;
        self.load_count += 1;
        Ok(())
    }

    /// The PVH entry point (physical, 32-bit protected mode, EBX = start
    /// info).
    pub fn entry(&self) -> u32 {
        self.entry
    }

    /// The non-empty `PT_LOAD`s, in program header order.
    pub fn load_segments(&self) -> &[LoadSegment] {
        self.loads.get(..self.load_count).unwrap_or_default()
    }

    /// The file bytes of `segment` (one of [`Self::load_segments`]).
    pub fn segment_bytes(&self, segment: &LoadSegment) -> &'a [u8] {
        bytes::slice_at(self.image, segment.file_offset, segment.file_len).unwrap_or_default()
    }

    /// From the lowest segment start to the highest segment end.
    pub fn footprint(&self) -> PhysRange {
        let segments = self.load_segments();
        let start = segments.iter().map(|s| s.phys).min().unwrap_or(0);
        // Ends do not overflow: checked by `parse`.
        let end = segments
            .iter()
            .map(|s| s.phys.saturating_add(s.mem_len))
            .max()
            .unwrap_or(0);
        PhysRange::new(start, end - start)
    }

    /// Checks that every segment lies inside `usable` (the reservation
    /// less what the caller keeps for itself, such as the purgatory) and
    /// places the core header region, `core_header_len` bytes rounded up
    /// to whole pages, on the first page boundary after the image.
    pub fn place(
        &self,
        usable: PhysRange,
        core_header_len: u64,
    ) -> Result<PvhLayout, PvhLoadError> {
        use PvhLoadError as E;
        let usable_end = match usable.end() {
            Some(end) if usable.len > 0 => end,
            _ => return Err(E::BadUsableRange(usable)),
        };
        if core_header_len == 0 {
            return Err(E::EmptyCoreHeader);
        }
        for segment in self.load_segments() {
            if !usable.contains(&segment.range()) {
                return Err(E::SegmentOutsideReservation {
                    segment: segment.range(),
                    usable,
                });
            }
        }
        let image = self.footprint();
        let image_end = image.start + image.len; // inside `usable`: no overflow
        let start = bytes::align_up(image_end, PAGE_SIZE);
        let len = bytes::align_up(core_header_len, PAGE_SIZE);
        let needed_end = start
            .zip(len)
            .and_then(|(start, len)| start.checked_add(len));
        match (start, len, needed_end) {
            (Some(start), Some(len), Some(end)) if end <= usable_end => Ok(PvhLayout {
                image,
                elfcorehdr: PhysRange::new(start, len),
                entry: self.entry,
            }),
            _ => Err(E::ReservationTooSmall { usable, needed_end }),
        }
    }

    /// Copies `segment` (one of [`Self::load_segments`]) into
    /// `destination`, the `mem_len` bytes at its physical address: the
    /// file bytes, then zeros.
    pub fn write_segment(
        &self,
        segment: &LoadSegment,
        destination: &mut [u8],
    ) -> Result<(), PvhLoadError> {
        let wrong_length = PvhLoadError::DestinationLength {
            expected: segment.mem_len,
            len: destination.len(),
        };
        if u64::try_from(destination.len()) != Ok(segment.mem_len) {
            return Err(wrong_length);
        }
        let file = self.segment_bytes(segment);
        let (loaded, zeroed) = destination
            .split_at_mut_checked(file.len())
            .ok_or(wrong_length)?;
        loaded.copy_from_slice(file);
        zeroed.fill(0);
        Ok(())
    }
}

/// `p_offset..p_offset + p_filesz`, if it lies in the file.
fn file_range(image: &[u8], phdr: &Phdr) -> Option<core::ops::Range<usize>> {
    let start = usize::try_from(phdr.offset).ok()?;
    let end = start.checked_add(usize::try_from(phdr.filesz).ok()?)?;
    (end <= image.len()).then_some(start..end)
}

/// Walks the notes of the `PT_NOTE` segment `index` and returns the PVH
/// entry point, if its note is there.
fn find_entry_note(notes: &[u8], p_align: u64, index: usize) -> Result<Option<u32>, PvhLoadError> {
    let malformed = PvhLoadError::MalformedNote { index };
    // gABI notes are 4-byte aligned; a segment aligned to 8 holds notes
    // padded to 8 (as GNU property notes are).
    let align = if p_align == 8 { 8 } else { 4 };
    let mut at = 0usize;
    while at < notes.len() {
        let header = bytes::slice_at(notes, at, 12).ok_or(malformed)?;
        let field = |offset| bytes::u32_at(header, offset).ok_or(malformed);
        let (namesz, descsz, kind) = (field(0)?, field(4)?, field(8)?);
        let name_at = at.checked_add(12).ok_or(malformed)?;
        let name_len = usize::try_from(namesz).map_err(|_| malformed)?;
        let desc_len = usize::try_from(descsz).map_err(|_| malformed)?;
        let name = bytes::slice_at(notes, name_at, name_len).ok_or(malformed)?;
        // In bounds, so neither addition overflows.
        let desc_at = bytes::align_up_usize(name_at + name_len, align).ok_or(malformed)?;
        let desc = bytes::slice_at(notes, desc_at, desc_len).ok_or(malformed)?;
        if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            let entry = match *desc {
                [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
                [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
                _ => return Err(PvhLoadError::BadEntryNote { descsz }),
            };
            return u32::try_from(entry)
                .map(Some)
                .map_err(|_| PvhLoadError::EntryAbove4GiB(entry));
        }
        // The last note's padding may be cut by the segment's end.
        at = bytes::align_up_usize(desc_at + desc_len, align).ok_or(malformed)?;
    }
    Ok(None)
}

/// Where [`PvhImage::place`] put things.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PvhLayout {
    /// From the lowest segment start to the highest segment end.
    pub image: PhysRange,
    /// The ELF core header region: page-aligned, after the image, left out
    /// of the digests and reserved in the capture image's memory map.
    pub elfcorehdr: PhysRange,
    /// The PVH entry point.
    pub entry: u32,
}

/// What [`write_boot_data`] needs.
#[derive(Clone, Copy)]
pub struct BootDataConfig<'a> {
    /// The firmware's memory map, as the boot loader gave it (any order).
    pub firmware: &'a [E820Entry],
    /// The whole crash reservation.
    pub reservation: PhysRange,
    /// The core header region ([`PvhLayout::elfcorehdr`]).
    pub elfcorehdr: PhysRange,
    /// A part of the reservation the capture image must not allocate from
    /// (the purgatory area, whose IDT it still runs on at entry): marked
    /// reserved in its map. Empty for none.
    pub keep_out: PhysRange,
    /// The ACPI RSDP, if known.
    pub rsdp: Option<u64>,
    /// The capture image's command line, formatted straight into the
    /// buffer (`&format_args!(..)` works); it must not contain a NUL.
    pub cmdline: &'a dyn fmt::Display,
}

impl fmt::Debug for BootDataConfig<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootDataConfig")
            .field("firmware", &self.firmware)
            .field("reservation", &self.reservation)
            .field("elfcorehdr", &self.elfcorehdr)
            .field("keep_out", &self.keep_out)
            .field("rsdp", &self.rsdp)
            .field("cmdline", &format_args!("{}", self.cmdline))
            .finish()
    }
}

/// What [`write_boot_data`] wrote, and where it will be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootData {
    /// Physical address of the `hvm_start_info` (EBX at the PVH entry).
    pub start_info: u32,
    /// Physical address of the memory map.
    pub memmap_paddr: u64,
    /// Its entries.
    pub memmap_entries: u32,
    /// Physical address of the command line.
    pub cmdline_paddr: u64,
    /// Bytes written from the start of the buffer (digest these).
    pub len: usize,
}

/// Calls `emit` with every entry of the capture image's memory map (see
/// the module docs), in firmware order, then the reservation's three.
fn for_each_memmap_entry(
    firmware: &[E820Entry],
    reservation: PhysRange,
    elfcorehdr: PhysRange,
    keep_out: PhysRange,
    mut emit: impl FnMut(MemmapEntry),
) {
    let mut add = |addr: u64, end: u64, kind: u32| {
        if end > addr {
            emit(MemmapEntry {
                addr,
                size: end - addr,
                kind,
            });
        }
    };
    // All ends checked by the caller.
    let reservation_end = reservation.start + reservation.len;
    let header_end = elfcorehdr.start + elfcorehdr.len;
    let keep_end = keep_out.start + keep_out.len;
    for entry in firmware {
        let end = entry.addr.saturating_add(entry.size);
        let kind = if entry.kind == E820_RAM {
            E820_RESERVED
        } else {
            E820Kind::from_raw(entry.kind).raw_for_handover()
        };
        add(entry.addr, end.min(reservation.start), kind);
        add(entry.addr.max(reservation_end), end, kind);
    }
    // RAM in the reservation, less the keep-out range (which the caller
    // checked does not overlap the header).
    let mut add_ram = |start: u64, end: u64| {
        if keep_out.len == 0 || keep_end <= start || keep_out.start >= end {
            add(start, end, E820_RAM);
        } else {
            add(start, keep_out.start.max(start), E820_RAM);
            add(keep_out.start.max(start), keep_end.min(end), E820_RESERVED);
            add(keep_end.min(end), end, E820_RAM);
        }
    };
    add_ram(reservation.start, elfcorehdr.start);
    add_ram(header_end, reservation_end);
    add(elfcorehdr.start, header_end, E820_RESERVED);
}

/// Counts what would be written.
struct Counter(usize);

impl Write for Counter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 = self.0.checked_add(s.len()).ok_or(fmt::Error)?;
        Ok(())
    }
}

/// Writes the PVH boot data for the capture image into `out`, which will
/// sit at physical address `out_phys`: the `hvm_start_info` (version 1) at
/// its start, the memory map (sorted by address) right after it, then the
/// NUL-terminated command line. Nothing is cut: a map or command line that
/// does not fit is an error.
pub fn write_boot_data(
    out: &mut [u8],
    out_phys: u64,
    config: &BootDataConfig<'_>,
) -> Result<BootData, PvhLoadError> {
    use PvhLoadError as E;
    let BootDataConfig {
        firmware,
        reservation,
        elfcorehdr,
        keep_out,
        ..
    } = *config;
    let reservation_end = match reservation.end() {
        Some(end) if reservation.len > 0 => end,
        _ => return Err(E::BadReservation(reservation)),
    };
    if elfcorehdr.len == 0 || !elfcorehdr.is_page_aligned() || !reservation.contains(&elfcorehdr) {
        return Err(E::BadCoreHeaderRange {
            elfcorehdr,
            reservation,
        });
    }
    if keep_out.len > 0 && (!reservation.contains(&keep_out) || keep_out.overlaps(&elfcorehdr)) {
        return Err(E::BadKeepOut {
            keep_out,
            reservation,
        });
    }
    boot_params::check_reservation_is_ram(firmware, reservation, reservation_end)
        .map_err(E::ReservationNotRam)?;
    if !out_phys.is_multiple_of(8) {
        return Err(E::BootDataMisaligned(out_phys));
    }
    let start_info = u32::try_from(out_phys).map_err(|_| E::BootDataOutOfReach(out_phys))?;
    u64::try_from(out.len())
        .ok()
        .and_then(|len| out_phys.checked_add(len))
        .ok_or(E::BootDataOutOfReach(out_phys))?;

    let mut needed = 0usize;
    for_each_memmap_entry(firmware, reservation, elfcorehdr, keep_out, |_| needed += 1);
    let capacity = out.len().saturating_sub(START_INFO_LEN) / MEMMAP_ENTRY_LEN;
    let entries = u32::try_from(needed)
        .ok()
        .filter(|_| needed <= capacity)
        .ok_or(E::TooManyMemmapEntries { needed, capacity })?;
    // Fits `out` (checked just above), so none of these overflow.
    let memmap_len = needed * MEMMAP_ENTRY_LEN;
    let memmap_offset = START_INFO_LEN;
    let cmdline_offset = memmap_offset + memmap_len;

    let mut counter = Counter(0);
    let room = out.len() - cmdline_offset;
    let too_long = |needed| E::CmdlineTooLong { needed, room };
    write!(counter, "{}", config.cmdline).map_err(|_| too_long(usize::MAX))?;
    let cmdline_len = counter.0;
    let len = cmdline_offset
        .checked_add(cmdline_len)
        .and_then(|end| end.checked_add(1))
        .filter(|&len| len <= out.len())
        .ok_or(too_long(cmdline_len.saturating_add(1)))?;

    // Everything fits: write.
    let memmap = &mut out[memmap_offset..cmdline_offset];
    let mut written = 0;
    for_each_memmap_entry(firmware, reservation, elfcorehdr, keep_out, |entry| {
        if let Some(slot) = memmap.get_mut(written..written + MEMMAP_ENTRY_LEN) {
            // The slot is MEMMAP_ENTRY_LEN bytes: cannot fail.
            let _ = entry.encode(slot);
            written += MEMMAP_ENTRY_LEN;
        }
    });
    sort_memmap(memmap);
    let cmdline = &mut out[cmdline_offset..len];
    let (text, nul) = cmdline.split_at_mut(cmdline_len);
    write!(SliceWriter::new(text), "{}", config.cmdline).map_err(|_| too_long(cmdline_len + 1))?;
    if text.contains(&0) {
        return Err(E::CmdlineContainsNul);
    }
    nul.fill(0);

    // `out_phys + out.len()` does not overflow, so neither do these.
    let memmap_paddr = out_phys + memmap_offset as u64;
    let cmdline_paddr = out_phys + cmdline_offset as u64;
    let info = StartInfo {
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: 0,
        modlist_paddr: 0,
        cmdline_paddr,
        rsdp_paddr: config.rsdp.unwrap_or(0),
        memmap_paddr,
        memmap_entries: entries,
    };
    // `out` holds at least START_INFO_LEN bytes (the capacity check).
    info.encode(out)
        .map_err(|_| E::TooManyMemmapEntries { needed, capacity })?;
    Ok(BootData {
        start_info,
        memmap_paddr,
        memmap_entries: entries,
        cmdline_paddr,
        len,
    })
}

/// Insertion sort of encoded memory map entries by address (stable; a
/// few hundred entries at most, no allocation).
fn sort_memmap(memmap: &mut [u8]) {
    let addr =
        |memmap: &[u8], index: usize| bytes::u64_at(memmap, index * MEMMAP_ENTRY_LEN).unwrap_or(0);
    let count = memmap.len() / MEMMAP_ENTRY_LEN;
    for i in 1..count {
        let mut j = i;
        while j > 0 && addr(memmap, j - 1) > addr(memmap, j) {
            let pair = (j - 1) * MEMMAP_ENTRY_LEN..(j + 1) * MEMMAP_ENTRY_LEN;
            memmap[pair].rotate_left(MEMMAP_ENTRY_LEN);
            j -= 1;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hv_abi::pvh::{self, MemmapEntry};

    pub(crate) const MIB: u64 = 1 << 20;
    pub(crate) const GIB: u64 = 1 << 30;
    /// Where the test image is linked: 1 GiB, like `HV_LINK_BASE` in the
    /// capture tests.
    pub(crate) const LINK_BASE: u64 = GIB;

    /// One program header of a synthetic image.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct TestPhdr {
        pub kind: u32,
        pub offset: u64,
        pub paddr: u64,
        pub filesz: u64,
        pub memsz: u64,
        pub align: u64,
    }

    /// A synthetic hv-like image: the ELF header, its program headers, and
    /// `body` up to the file's end. Offsets are the caller's.
    pub(crate) fn elf(phdrs: &[TestPhdr], file_len: usize) -> Vec<u8> {
        let mut image = vec![0u8; file_len.max(EHDR_LEN + phdrs.len() * PHDR_LEN)];
        image[..4].copy_from_slice(b"\x7fELF");
        image[4..7].copy_from_slice(&[2, 1, 1]);
        image[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        image[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        image[20..24].copy_from_slice(&1u32.to_le_bytes());
        image[24..32].copy_from_slice(&(LINK_BASE + 0x20).to_le_bytes());
        image[32..40].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes());
        image[52..54].copy_from_slice(&(EHDR_LEN as u16).to_le_bytes());
        image[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        image[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for (i, p) in phdrs.iter().enumerate() {
            let at = EHDR_LEN + i * PHDR_LEN;
            let h = &mut image[at..at + PHDR_LEN];
            h[0..4].copy_from_slice(&p.kind.to_le_bytes());
            h[8..16].copy_from_slice(&p.offset.to_le_bytes());
            h[16..24].copy_from_slice(&p.paddr.to_le_bytes());
            h[24..32].copy_from_slice(&p.paddr.to_le_bytes());
            h[32..40].copy_from_slice(&p.filesz.to_le_bytes());
            h[40..48].copy_from_slice(&p.memsz.to_le_bytes());
            h[48..56].copy_from_slice(&p.align.to_le_bytes());
        }
        image
    }

    /// A note: name, type, descriptor, 4-byte padded.
    pub(crate) fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(name);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(desc);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    /// The PVH entry point of [`hv_like`].
    pub(crate) const ENTRY: u64 = LINK_BASE + 0x2b;

    /// An image laid out like hv's (see `hv/linker.ld`): text, rodata with
    /// the PVH note, data+bss, and the PT_NOTE, with recognisable bytes.
    pub(crate) fn hv_like() -> Vec<u8> {
        let notes = [
            note(b"GNU\0", 1, &[0; 16]),
            note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &ENTRY.to_le_bytes()),
        ]
        .concat();
        let phdrs = [
            TestPhdr {
                kind: PT_LOAD,
                offset: 0x1000,
                paddr: LINK_BASE,
                filesz: 0x2000,
                memsz: 0x2000,
                align: 0x1000,
            },
            TestPhdr {
                kind: PT_LOAD,
                offset: 0x3000,
                paddr: LINK_BASE + 0x2000,
                filesz: 0x800,
                memsz: 0x800,
                align: 0x1000,
            },
            TestPhdr {
                kind: PT_LOAD,
                offset: 0x4000,
                paddr: LINK_BASE + 0x3000,
                filesz: 0x100,
                memsz: 0x5000,
                align: 0x1000,
            },
            TestPhdr {
                kind: PT_NOTE,
                offset: 0x3700,
                paddr: LINK_BASE + 0x2700,
                filesz: notes.len() as u64,
                memsz: notes.len() as u64,
                align: 4,
            },
            TestPhdr {
                kind: 0x6474_e551, // PT_GNU_STACK: ignored
                offset: 0,
                paddr: 0,
                filesz: 0,
                memsz: 0,
                align: 16,
            },
        ];
        let mut image = elf(&phdrs, 0x4100);
        for (i, byte) in image[0x1000..].iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(13) | 1;
        }
        image[0x3700..0x3700 + notes.len()].copy_from_slice(&notes);
        image
    }

    /// The reservation the tests load into: 256 MiB at 1 GiB, the last
    /// 64 KiB kept for the purgatory.
    pub(crate) fn reservation() -> PhysRange {
        PhysRange::new(GIB, 256 * MIB)
    }

    pub(crate) fn usable() -> PhysRange {
        PhysRange::new(GIB, 256 * MIB - 0x1_0000)
    }

    /// A QEMU-like firmware map (as in `boot_params`' tests).
    pub(crate) fn firmware_map() -> Vec<E820Entry> {
        vec![
            E820Entry::new(0, 0x9fc00, E820_RAM),
            E820Entry::new(0x9fc00, 0x400, E820_RESERVED),
            E820Entry::new(0xf0000, 0x10000, E820_RESERVED),
            E820Entry::new(0x10_0000, 3 * GIB - 0x10_0000 - 2 * MIB, E820_RAM),
            E820Entry::new(3 * GIB - 2 * MIB, MIB, hv_abi::e820::E820_ACPI),
            E820Entry::new(3 * GIB - MIB, MIB, hv_abi::e820::E820_NVS),
            E820Entry::new(0xfeff_c000, 0x4000, E820_RESERVED),
            E820Entry::new(4 * GIB, 4 * GIB, E820_RAM),
        ]
    }

    fn phdr_at(image: &mut [u8], index: usize) -> &mut [u8] {
        let at = EHDR_LEN + index * PHDR_LEN;
        &mut image[at..at + PHDR_LEN]
    }

    #[test]
    fn an_hv_like_image_parses_with_its_segments_and_entry() {
        let bytes = hv_like();
        let image = PvhImage::parse(&bytes).unwrap();
        assert_eq!(u64::from(image.entry()), ENTRY);
        let ranges: Vec<_> = image.load_segments().iter().map(|s| s.range()).collect();
        assert_eq!(
            ranges,
            [
                PhysRange::new(GIB, 0x2000),
                PhysRange::new(GIB + 0x2000, 0x800),
                PhysRange::new(GIB + 0x3000, 0x5000),
            ]
        );
        let bss = image.load_segments()[2];
        assert_eq!(image.segment_bytes(&bss), &bytes[0x4000..0x4100]);
        assert_eq!(image.footprint(), PhysRange::new(GIB, 0x8000));
    }

    /// The PVH entry and the PT_LOADs (paddr, memsz) as an ELF reader we
    /// did not write sees them.
    fn read_with_object(bytes: &[u8]) -> (u64, Vec<(u64, u64)>) {
        use object::LittleEndian;
        use object::elf::FileHeader64;
        use object::read::elf::{FileHeader as _, ProgramHeader as _};
        let header = FileHeader64::<LittleEndian>::parse(bytes).unwrap();
        let endian = header.endian().unwrap();
        let mut entry = None;
        let mut loads = Vec::new();
        for phdr in header.program_headers(endian, bytes).unwrap() {
            if phdr.p_type(endian) == object::elf::PT_LOAD && phdr.p_memsz(endian) > 0 {
                loads.push((phdr.p_paddr(endian), phdr.p_memsz(endian)));
            }
            let Some(mut notes) = phdr.notes(endian, bytes).unwrap() else {
                continue;
            };
            while let Some(note) = notes.next().unwrap() {
                if note.name() == b"Xen" && note.n_type(endian) == XEN_ELFNOTE_PHYS32_ENTRY {
                    let desc = note.desc();
                    let mut word = [0u8; 8];
                    word[..desc.len()].copy_from_slice(desc);
                    entry.get_or_insert(u64::from_le_bytes(word));
                }
            }
        }
        (entry.unwrap(), loads)
    }

    #[test]
    fn the_synthetic_image_reads_the_same_with_an_independent_parser() {
        let bytes = hv_like();
        let image = PvhImage::parse(&bytes).unwrap();
        let (entry, loads) = read_with_object(&bytes);
        assert_eq!(u64::from(image.entry()), entry);
        let ours: Vec<_> = image
            .load_segments()
            .iter()
            .map(|s| (s.phys, s.mem_len))
            .collect();
        assert_eq!(ours, loads);
    }

    /// A built hv, read by this loader and by `object`:
    /// `HV_ELF=target/x86_64-unknown-none/release/hv cargo test -p
    /// kexec-loader -- --ignored a_real_hv_image`.
    #[test]
    #[ignore = "needs HV_ELF, the path of a built hv image"]
    fn a_real_hv_image_parses_and_places() {
        let path = std::env::var("HV_ELF").expect("HV_ELF names a built hv image");
        let bytes = std::fs::read(&path).unwrap();
        let image = PvhImage::parse(&bytes).unwrap();
        let (entry, loads) = read_with_object(&bytes);
        assert_eq!(u64::from(image.entry()), entry);
        let ours: Vec<_> = image
            .load_segments()
            .iter()
            .map(|s| (s.phys, s.mem_len))
            .collect();
        assert_eq!(ours, loads);
        let footprint = image.footprint();
        assert!(footprint.start.is_multiple_of(2 * MIB), "{footprint}");
        let usable = PhysRange::new(footprint.start, 256 * MIB - 0x1_0000);
        let layout = image.place(usable, 0x1_2345).unwrap();
        assert_eq!(layout.elfcorehdr.len, 0x1_3000);
        assert!(layout.elfcorehdr.start >= footprint.start + footprint.len);
        for segment in image.load_segments() {
            let mut memory = vec![0u8; segment.mem_len as usize];
            image.write_segment(segment, &mut memory).unwrap();
            assert_eq!(&memory[..segment.file_len], image.segment_bytes(segment));
        }
        eprintln!(
            "{path}: {} segments, footprint {footprint}, PVH entry {:#x}, core header at {}",
            image.load_segments().len(),
            image.entry(),
            layout.elfcorehdr
        );
    }

    #[test]
    fn debug_output_names_the_segments_not_the_bytes() {
        let bytes = hv_like();
        let text = format!("{:?}", PvhImage::parse(&bytes).unwrap());
        assert!(
            text.contains("len: 16640") && text.contains("0x4000002b"),
            "{text}"
        );
        assert!(text.len() < 1000, "{text}");
    }

    #[test]
    fn placing_puts_the_core_header_on_the_page_after_the_image() {
        let bytes = hv_like();
        let image = PvhImage::parse(&bytes).unwrap();
        let layout = image.place(usable(), 0x2345).unwrap();
        assert_eq!(
            layout,
            PvhLayout {
                image: PhysRange::new(GIB, 0x8000),
                elfcorehdr: PhysRange::new(GIB + 0x8000, 0x3000),
                entry: ENTRY as u32,
            }
        );
        // The last byte of the usable part may be used, not one more.
        let tight = PhysRange::new(GIB, 0xb000);
        assert!(image.place(tight, 0x3000).is_ok());
        assert_eq!(
            image.place(tight, 0x3001).unwrap_err(),
            PvhLoadError::ReservationTooSmall {
                usable: tight,
                needed_end: Some(GIB + 0xc000)
            }
        );
        assert_eq!(
            image.place(tight, u64::MAX).unwrap_err(),
            PvhLoadError::ReservationTooSmall {
                usable: tight,
                needed_end: None
            }
        );
        assert_eq!(
            image.place(usable(), 0).unwrap_err(),
            PvhLoadError::EmptyCoreHeader
        );
    }

    #[test]
    fn a_segment_outside_the_usable_part_is_refused() {
        let bytes = hv_like();
        let image = PvhImage::parse(&bytes).unwrap();
        // Linked for another base.
        let elsewhere = PhysRange::new(2 * GIB, 256 * MIB);
        assert_eq!(
            image.place(elsewhere, 0x1000).unwrap_err(),
            PvhLoadError::SegmentOutsideReservation {
                segment: PhysRange::new(GIB, 0x2000),
                usable: elsewhere
            }
        );
        // The bss runs 1 byte past the end.
        let short = PhysRange::new(GIB, 0x7fff);
        assert_eq!(
            image.place(short, 0x1000).unwrap_err(),
            PvhLoadError::SegmentOutsideReservation {
                segment: PhysRange::new(GIB + 0x3000, 0x5000),
                usable: short
            }
        );
        for bad in [PhysRange::new(GIB, 0), PhysRange::new(u64::MAX, 2)] {
            assert_eq!(
                image.place(bad, 0x1000).unwrap_err(),
                PvhLoadError::BadUsableRange(bad)
            );
        }
    }

    #[test]
    fn write_segment_copies_the_file_bytes_and_zeroes_the_rest() {
        let bytes = hv_like();
        let image = PvhImage::parse(&bytes).unwrap();
        let bss = image.load_segments()[2];
        let mut memory = vec![0xEEu8; 0x5000];
        image.write_segment(&bss, &mut memory).unwrap();
        assert_eq!(&memory[..0x100], &bytes[0x4000..0x4100]);
        assert!(memory[0x100..].iter().all(|&b| b == 0));
        let mut short = vec![0u8; 0x4fff];
        assert_eq!(
            image.write_segment(&bss, &mut short).unwrap_err(),
            PvhLoadError::DestinationLength {
                expected: 0x5000,
                len: 0x4fff
            }
        );
        assert!(short.iter().all(|&b| b == 0), "nothing written");
    }

    #[test]
    fn elf_header_rejections() {
        use PvhLoadError as E;
        let valid = hv_like();
        let with = |at: usize, bytes: &[u8]| {
            let mut image = valid.clone();
            image[at..at + bytes.len()].copy_from_slice(bytes);
            PvhImage::parse(&image).unwrap_err()
        };
        assert_eq!(PvhImage::parse(&valid[..63]).unwrap_err(), E::TooShort(63));
        assert_eq!(with(0, b"\x7fELG"), E::NotElf);
        assert_eq!(with(4, &[1]), E::NotElf64LittleEndian { class: 1, data: 1 });
        assert_eq!(with(5, &[2]), E::NotElf64LittleEndian { class: 2, data: 2 });
        assert_eq!(with(6, &[0]), E::BadElfVersion(0));
        assert_eq!(with(20, &[2]), E::BadElfVersion(2));
        assert_eq!(with(16, &[3]), E::NotExecutable(3)); // ET_DYN
        assert_eq!(with(18, &[3]), E::NotX86_64(3));
        assert_eq!(with(54, &[64]), E::BadProgramHeaderSize(64));
        assert_eq!(with(56, &[0]), E::BadProgramHeaderCount(0));
        assert_eq!(with(56, &[65]), E::BadProgramHeaderCount(65));
        assert_eq!(with(56, &[0xff, 0xff]), E::BadProgramHeaderCount(0xffff));
        assert_eq!(
            with(32, &0x4000u64.to_le_bytes()),
            E::ProgramHeadersOutsideFile {
                offset: 0x4000,
                count: 5
            }
        );
        assert_eq!(
            with(32, &u64::MAX.to_le_bytes()),
            E::ProgramHeadersOutsideFile {
                offset: u64::MAX,
                count: 5
            }
        );
    }

    #[test]
    fn program_header_rejections() {
        use PvhLoadError as E;
        let valid = hv_like();
        let with = |index: usize, at: usize, value: u64| {
            let mut image = valid.clone();
            phdr_at(&mut image, index)[at..at + 8].copy_from_slice(&value.to_le_bytes());
            PvhImage::parse(&image).map(|image| image.load_segments().len())
        };
        // p_offset + p_filesz past the file, and wrapping.
        assert_eq!(
            with(0, 32, 0x3101).unwrap_err(),
            E::SegmentOutsideFile {
                index: 0,
                offset: 0x1000,
                filesz: 0x3101
            }
        );
        assert!(matches!(
            with(1, 8, u64::MAX).unwrap_err(),
            E::SegmentOutsideFile { index: 1, .. }
        ));
        // Even a header type the loader ignores must point inside the file.
        assert!(matches!(
            with(4, 32, 0x10_0000).unwrap_err(),
            E::SegmentOutsideFile { index: 4, .. }
        ));
        assert_eq!(
            with(2, 40, 0xff).unwrap_err(),
            E::MemSmallerThanFile {
                index: 2,
                filesz: 0x100,
                memsz: 0xff
            }
        );
        assert_eq!(
            with(2, 24, u64::MAX - 0x1000).unwrap_err(),
            E::SegmentWraps {
                index: 2,
                paddr: u64::MAX - 0x1000,
                memsz: 0x5000
            }
        );
        // The rodata segment moved onto the text segment.
        assert_eq!(
            with(1, 24, GIB + 0x1800).unwrap_err(),
            E::SegmentsOverlap {
                first: PhysRange::new(GIB, 0x2000),
                second: PhysRange::new(GIB + 0x1800, 0x800)
            }
        );
        // Touching segments are fine; so is an empty PT_LOAD anywhere.
        assert_eq!(with(1, 24, GIB + 0x2800), Ok(3));
        let mut empty = valid.clone();
        phdr_at(&mut empty, 4)[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        let image = PvhImage::parse(&empty).unwrap();
        assert_eq!(image.load_segments().len(), 3);
    }

    #[test]
    fn too_many_or_no_load_segments_are_refused() {
        let notes = note(b"Xen\0", 18, &ENTRY.to_le_bytes());
        let segment = |i: u64| TestPhdr {
            kind: PT_LOAD,
            offset: 0x1000,
            paddr: LINK_BASE + i * 0x1000,
            filesz: 0x10,
            memsz: 0x1000,
            align: 0x1000,
        };
        let note_phdr = TestPhdr {
            kind: PT_NOTE,
            offset: 0x1000,
            paddr: 0,
            filesz: notes.len() as u64,
            memsz: 0,
            align: 4,
        };
        let build = |loads: u64| {
            let mut phdrs: Vec<_> = (0..loads).map(segment).collect();
            phdrs.push(note_phdr);
            let mut image = elf(&phdrs, 0x2000);
            image[0x1000..0x1000 + notes.len()].copy_from_slice(&notes);
            image
        };
        let full = build(MAX_LOAD_SEGMENTS as u64);
        assert_eq!(
            PvhImage::parse(&full).unwrap().load_segments().len(),
            MAX_LOAD_SEGMENTS
        );
        assert_eq!(
            PvhImage::parse(&build(MAX_LOAD_SEGMENTS as u64 + 1)).unwrap_err(),
            PvhLoadError::TooManyLoadSegments
        );
        assert_eq!(
            PvhImage::parse(&build(0)).unwrap_err(),
            PvhLoadError::NoLoadSegments
        );
    }

    /// `hv_like` with its PT_NOTE segment holding `notes` instead.
    fn with_notes(notes: &[u8], align: u64) -> Result<u32, PvhLoadError> {
        let mut image = hv_like();
        image[0x3700..0x3800].fill(0);
        image[0x3700..0x3700 + notes.len()].copy_from_slice(notes);
        let phdr = phdr_at(&mut image, 3);
        phdr[32..40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        phdr[48..56].copy_from_slice(&align.to_le_bytes());
        PvhImage::parse(&image).map(|image| image.entry())
    }

    #[test]
    fn the_entry_note_is_found_among_others_with_a_4_or_8_byte_descriptor() {
        use PvhLoadError as E;
        let entry = ENTRY as u32;
        let xen = |desc: &[u8]| note(b"Xen\0", 18, desc);
        assert_eq!(with_notes(&xen(&entry.to_le_bytes()), 4), Ok(entry));
        assert_eq!(with_notes(&xen(&ENTRY.to_le_bytes()), 4), Ok(entry));
        // Other Xen notes and other owners' type 18 are not the entry.
        let others = [
            note(b"Xen\0", 1, b"linux\0\0\0"),
            note(b"Xe\0", 18, &0x1234u64.to_le_bytes()),
            note(b"XenX", 18, &0x1234u64.to_le_bytes()),
            xen(&ENTRY.to_le_bytes()),
        ]
        .concat();
        assert_eq!(with_notes(&others, 4), Ok(entry));
        assert_eq!(
            with_notes(&xen(&[0; 6]), 4),
            Err(E::BadEntryNote { descsz: 6 })
        );
        assert_eq!(
            with_notes(&xen(&(1u64 << 32).to_le_bytes()), 4),
            Err(E::EntryAbove4GiB(1 << 32))
        );
        assert_eq!(
            with_notes(&xen(&0x1000u64.to_le_bytes()), 4),
            Err(E::EntryNotLoaded(0x1000))
        );
        // Past the bss end: not loaded.
        assert_eq!(
            with_notes(&xen(&(GIB + 0x8000).to_le_bytes()), 4),
            Err(E::EntryNotLoaded((GIB + 0x8000) as u32))
        );
        assert_eq!(
            with_notes(&note(b"GNU\0", 1, &[0; 4]), 4),
            Err(E::NoEntryNote)
        );
        // The last note's padding may be cut off; its descriptor may not.
        let cut = xen(&ENTRY.to_le_bytes());
        let longer_name = note(b"Xenon\0", 18, &ENTRY.to_le_bytes());
        assert_eq!(with_notes(&longer_name, 4), Err(E::NoEntryNote));
        assert_eq!(
            with_notes(&cut[..cut.len() - 1], 4),
            Err(E::MalformedNote { index: 3 })
        );
        let mut huge = cut.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(with_notes(&huge, 4), Err(E::MalformedNote { index: 3 }));
        assert_eq!(
            with_notes(&cut[..11], 4),
            Err(E::MalformedNote { index: 3 })
        );
    }

    #[test]
    fn notes_in_an_8_aligned_segment_are_padded_to_8() {
        // A note with a 5-byte name: its descriptor starts at 24 (12 + 5
        // rounded up to 8), and the next note at 32. The Xen note after it
        // has the same layout either way ("Xen\0" ends at 16).
        let mut notes = Vec::new();
        notes.extend_from_slice(&5u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&1u32.to_le_bytes());
        notes.extend_from_slice(b"GNU!\0");
        notes.extend_from_slice(&[0; 7]);
        notes.extend_from_slice(&[1, 2, 3, 4, 0, 0, 0, 0]);
        assert_eq!(notes.len(), 32);
        notes.extend_from_slice(&note(b"Xen\0", 18, &ENTRY.to_le_bytes()));
        assert_eq!(with_notes(&notes, 8), Ok(ENTRY as u32));
        // Read with 4-byte padding the second note is garbage.
        assert_ne!(with_notes(&notes, 4), Ok(ENTRY as u32));
    }

    /// Loader memory for the boot data: `BootData` decoded back through
    /// `hv_abi::pvh::decode`, as hv in capture mode reads it.
    fn decode_back(out: &[u8], out_phys: u64) -> (pvh::StartInfo, Vec<MemmapEntry>, Vec<u8>) {
        let read = |paddr: u64, len: usize| {
            let offset = usize::try_from(paddr.checked_sub(out_phys)?).ok()?;
            bytes::slice_at(out, offset, len)
        };
        let boot = pvh::decode(out_phys, read).unwrap();
        let cmdline = pvh::read_c_string(boot.start_info.cmdline_paddr, 4096, read).unwrap();
        (
            boot.start_info,
            boot.memmap.iter().collect(),
            cmdline.to_vec(),
        )
    }

    const DATA: u64 = GIB + 256 * MIB - 0x1_0000 + 0x7000;

    fn config<'a>(firmware: &'a [E820Entry], cmdline: &'a dyn fmt::Display) -> BootDataConfig<'a> {
        BootDataConfig {
            firmware,
            reservation: reservation(),
            elfcorehdr: PhysRange::new(GIB + 0x8000, 0x3000),
            keep_out: PhysRange::new(GIB + 256 * MIB - 0x1_0000, 0x1_0000),
            rsdp: Some(0xf_5a40),
            cmdline,
        }
    }

    #[test]
    fn boot_data_carries_the_map_the_command_line_and_the_rsdp() {
        let firmware = firmware_map();
        let mut out = vec![0xCCu8; 0x2000];
        let mode = GIB + 0x8000;
        let args = format_args!("capture_mode={mode:#x} capture_sink=debugcon");
        let data = write_boot_data(&mut out, DATA, &config(&firmware, &args)).unwrap();
        let (info, map, cmdline) = decode_back(&out, DATA);
        assert_eq!(info.version, 1);
        assert_eq!(info.rsdp_paddr, 0xf_5a40);
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert_eq!(u64::from(data.start_info), DATA);
        assert_eq!(data.memmap_paddr, DATA + 56);
        assert_eq!(info.memmap_paddr, data.memmap_paddr);
        assert_eq!(info.cmdline_paddr, data.cmdline_paddr);
        assert_eq!(cmdline, b"capture_mode=0x40008000 capture_sink=debugcon");
        assert_eq!(data.len, 56 + map.len() * 24 + cmdline.len() + 1);
        assert!(
            out[data.len..].iter().all(|&b| b == 0xCC),
            "nothing past len"
        );
        let e = |addr, size, kind| MemmapEntry { addr, size, kind };
        assert_eq!(
            map,
            [
                e(0, 0x9fc00, 2),
                e(0x9fc00, 0x400, 2),
                e(0xf0000, 0x10000, 2),
                e(0x10_0000, GIB - 0x10_0000, 2),
                e(GIB, 0x8000, 1),
                e(GIB + 0x8000, 0x3000, 2),
                e(GIB + 0xb000, 256 * MIB - 0xb000 - 0x1_0000, 1),
                e(GIB + 256 * MIB - 0x1_0000, 0x1_0000, 2),
                e(GIB + 256 * MIB, 2 * GIB - 256 * MIB - 2 * MIB, 2),
                e(3 * GIB - 2 * MIB, MIB, 3),
                e(3 * GIB - MIB, MIB, 4),
                e(0xfeff_c000, 0x4000, 2),
                e(4 * GIB, 4 * GIB, 2),
            ]
        );
        assert_eq!(data.memmap_entries as usize, map.len());
    }

    #[test]
    fn unknown_firmware_types_become_reserved_and_empty_entries_vanish() {
        let firmware = [
            E820Entry::new(0x10_0000, 2 * GIB, E820_RAM),
            E820Entry::new(3 * GIB, MIB, 7), // persistent memory
            E820Entry::new(3 * GIB + MIB, 0, E820_RESERVED), // empty
            E820Entry::new(3 * GIB + 2 * MIB, MIB, hv_abi::e820::E820_UNUSABLE),
            E820Entry::new(u64::MAX - 0xfff, 0x2000, E820_RESERVED), // wraps: clipped
        ];
        let mut out = vec![0u8; 0x2000];
        write_boot_data(&mut out, DATA, &config(&firmware, &"")).unwrap();
        let (_, map, cmdline) = decode_back(&out, DATA);
        assert!(cmdline.is_empty());
        let kinds: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
        assert_eq!(
            kinds,
            [
                (0x10_0000, GIB - 0x10_0000, 2),
                (GIB, 0x8000, 1),
                (GIB + 0x8000, 0x3000, 2),
                (GIB + 0xb000, 256 * MIB - 0xb000 - 0x1_0000, 1),
                (GIB + 256 * MIB - 0x1_0000, 0x1_0000, 2),
                (GIB + 256 * MIB, GIB - 256 * MIB + 0x10_0000, 2),
                (3 * GIB, MIB, 2),
                (3 * GIB + 2 * MIB, MIB, 5),
                (u64::MAX - 0xfff, 0xfff, 2),
            ]
        );
    }

    #[test]
    fn a_map_that_does_not_fit_is_an_error_not_a_shorter_map() {
        // 400 reserved ranges above 4 GiB: the old loader kept 64.
        let mut firmware = firmware_map();
        for i in 0..400u64 {
            firmware.push(E820Entry::new(
                16 * GIB + i * 0x10_0000,
                0x1000,
                E820_RESERVED,
            ));
        }
        let mut out = vec![0u8; 0x2000];
        let error = write_boot_data(&mut out, DATA, &config(&firmware, &"x")).unwrap_err();
        assert_eq!(
            error,
            PvhLoadError::TooManyMemmapEntries {
                needed: 413,
                capacity: (0x2000 - 56) / 24
            }
        );
        assert!(out.iter().all(|&b| b == 0), "nothing written");
        // A buffer big enough takes all of them.
        let mut big = vec![0u8; 0x3000];
        write_boot_data(&mut big, DATA, &config(&firmware, &"x")).unwrap();
        let (_, map, _) = decode_back(&big, DATA);
        assert_eq!(map.len(), 413);
        assert!(map.windows(2).all(|w| w[0].addr <= w[1].addr), "sorted");
        assert_eq!(map.last().unwrap().addr, 16 * GIB + 399 * 0x10_0000);
    }

    #[test]
    fn a_command_line_that_does_not_fit_or_holds_a_nul_is_refused() {
        let firmware = firmware_map();
        let used = 56 + 13 * 24;
        let mut out = vec![0u8; used + 8];
        // 7 bytes and the NUL fit exactly.
        let data = write_boot_data(&mut out, DATA, &config(&firmware, &"1234567")).unwrap();
        assert_eq!(data.len, used + 8);
        assert_eq!(
            write_boot_data(&mut out, DATA, &config(&firmware, &"12345678")).unwrap_err(),
            PvhLoadError::CmdlineTooLong { needed: 9, room: 8 }
        );
        assert_eq!(
            write_boot_data(&mut out, DATA, &config(&firmware, &"a\0b")).unwrap_err(),
            PvhLoadError::CmdlineContainsNul
        );
    }

    #[test]
    fn boot_data_placement_and_range_rejections() {
        use PvhLoadError as E;
        let firmware = firmware_map();
        let mut out = vec![0u8; 0x2000];
        let cfg = config(&firmware, &"x");
        assert_eq!(
            write_boot_data(&mut out, DATA + 4, &cfg).unwrap_err(),
            E::BootDataMisaligned(DATA + 4)
        );
        assert_eq!(
            write_boot_data(&mut out, 4 * GIB, &cfg).unwrap_err(),
            E::BootDataOutOfReach(4 * GIB)
        );
        for reservation in [PhysRange::new(GIB, 0), PhysRange::new(u64::MAX, 2)] {
            let cfg = BootDataConfig { reservation, ..cfg };
            assert_eq!(
                write_boot_data(&mut out, DATA, &cfg).unwrap_err(),
                E::BadReservation(reservation)
            );
        }
        for elfcorehdr in [
            PhysRange::new(GIB + 0x8000, 0),
            PhysRange::new(GIB + 0x8001, 0x1000),
            PhysRange::new(GIB - 0x1000, 0x2000),
            PhysRange::new(GIB + 256 * MIB, 0x1000),
        ] {
            let cfg = BootDataConfig { elfcorehdr, ..cfg };
            assert_eq!(
                write_boot_data(&mut out, DATA, &cfg).unwrap_err(),
                E::BadCoreHeaderRange {
                    elfcorehdr,
                    reservation: reservation()
                }
            );
        }
        for keep_out in [
            PhysRange::new(GIB - 0x1000, 0x2000),
            PhysRange::new(GIB + 0x9000, 0x1000),
            PhysRange::new(GIB + 256 * MIB, 0x1000),
        ] {
            let cfg = BootDataConfig { keep_out, ..cfg };
            assert_eq!(
                write_boot_data(&mut out, DATA, &cfg).unwrap_err(),
                E::BadKeepOut {
                    keep_out,
                    reservation: reservation()
                }
            );
        }
        // A reservation over the ACPI tables, or over a hole.
        let over_acpi = PhysRange::new(3 * GIB - 4 * MIB, 4 * MIB);
        let cfg = BootDataConfig {
            reservation: over_acpi,
            elfcorehdr: PhysRange::new(3 * GIB - 4 * MIB, 0x1000),
            keep_out: PhysRange::new(0, 0),
            ..cfg
        };
        assert!(matches!(
            write_boot_data(&mut out, DATA, &cfg).unwrap_err(),
            E::ReservationNotRam(BootParamsError::ReservationOverlapsFirmwareRange { .. })
        ));
        assert!(out.iter().all(|&b| b == 0), "nothing written");
    }

    #[test]
    fn every_error_has_a_message() {
        use PvhLoadError as E;
        let r = PhysRange::new(1, 2);
        for error in [
            E::TooShort(1),
            E::NotElf,
            E::NotElf64LittleEndian { class: 1, data: 2 },
            E::BadElfVersion(0),
            E::NotExecutable(3),
            E::NotX86_64(3),
            E::BadProgramHeaderSize(1),
            E::BadProgramHeaderCount(0),
            E::ProgramHeadersOutsideFile {
                offset: 1,
                count: 1,
            },
            E::SegmentOutsideFile {
                index: 0,
                offset: 1,
                filesz: 2,
            },
            E::MemSmallerThanFile {
                index: 0,
                filesz: 2,
                memsz: 1,
            },
            E::SegmentWraps {
                index: 0,
                paddr: 1,
                memsz: 2,
            },
            E::TooManyLoadSegments,
            E::NoLoadSegments,
            E::SegmentsOverlap {
                first: r,
                second: r,
            },
            E::MalformedNote { index: 3 },
            E::BadEntryNote { descsz: 6 },
            E::EntryAbove4GiB(1 << 32),
            E::NoEntryNote,
            E::EntryNotLoaded(1),
            E::BadUsableRange(r),
            E::SegmentOutsideReservation {
                segment: r,
                usable: r,
            },
            E::EmptyCoreHeader,
            E::ReservationTooSmall {
                usable: r,
                needed_end: Some(5),
            },
            E::ReservationTooSmall {
                usable: r,
                needed_end: None,
            },
            E::DestinationLength {
                expected: 1,
                len: 2,
            },
            E::BadReservation(r),
            E::BadCoreHeaderRange {
                elfcorehdr: r,
                reservation: r,
            },
            E::BadKeepOut {
                keep_out: r,
                reservation: r,
            },
            E::ReservationNotRam(BootParamsError::ReservationNotRam {
                reservation: r,
                hole: 2,
            }),
            E::BootDataMisaligned(1),
            E::BootDataOutOfReach(1),
            E::TooManyMemmapEntries {
                needed: 2,
                capacity: 1,
            },
            E::CmdlineTooLong { needed: 2, room: 1 },
            E::CmdlineContainsNul,
        ] {
            assert!(error.to_string().len() > 10, "{error:?}");
        }
    }
}
