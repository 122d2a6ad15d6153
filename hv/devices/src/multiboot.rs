//! Multiboot1 guest loader (the boot protocol of kvm-unit-tests' `.flat`
//! kernels): a hostile-input parser, a load plan validated in full before
//! the first byte is written, and the multiboot information structure.
//!
//! 1. [`MultibootImage::parse`] finds the header in the first 8 KiB, checks
//!    its checksum and flags, and reads the segments from the ELF32 program
//!    headers, or from the header's address fields when flag 16 asks for
//!    them ("a.out kludge").
//! 2. [`LoadPlan::new`] places the segments, the modules (page-aligned after
//!    the kernel, as GRUB and QEMU do) and the boot information (in low
//!    memory, where the kernel's own allocator does not reach, as QEMU
//!    does) inside a [`GuestLayout`], refusing anything outside RAM, over a
//!    reserved range or over another piece.
//! 3. [`LoadPlan::load`] writes it all through [`GuestMemory`] and returns
//!    the [`MultibootEntryState`] of the boot vCPU.
//!
//! The kernel command line is passed as given. kvm-unit-tests read their
//! `argv[0]` from it, as QEMU makes it the image's file name: give
//! `"NAME.flat ARGS"`.

use core::fmt;

use crate::cpu_state::{MultibootEntryState, SegmentState};
use crate::memory::{GpaRange, GuestMemory, MemoryError};

/// The multiboot1 header magic.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// EAX at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie in the image's first 8 KiB, 4-byte aligned.
pub const HEADER_SEARCH_LEN: usize = 8192;
/// Most `PT_LOAD` segments an image may have.
pub const MAX_SEGMENTS: usize = 16;
/// Most modules a guest may be given.
pub const MAX_MODULES: usize = 4;
/// Longest kernel command line, NUL excluded.
pub const MAX_CMDLINE: usize = 4095;
/// Longest module string (its "command line"), NUL excluded.
pub const MAX_MODULE_STRING: usize = 255;
/// Most reserved ranges a layout may have.
pub const MAX_RESERVED: usize = 8;
/// Smallest guest RAM the loader accepts.
pub const MIN_RAM: u64 = 2 << 20;
/// Largest guest RAM: it must end below the 32-bit MMIO hole (local APIC at
/// 0xFEE0_0000, I/O APIC at 0xFEC0_0000, a relocated APIC at 0xFED4_0000...).
pub const MAX_RAM: u64 = 0xC000_0000;

const PAGE: u64 = 4096;
const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Bits 0-15 are requirements: a loader that does not understand one must
/// refuse the image. We honour 0 and 1; 2 (a video mode) we cannot.
const SUPPORTED_REQUIRED_FLAGS: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO;

/// Why an image cannot be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadError {
    /// No multiboot1 header in the first 8 KiB.
    NotMultiboot,
    /// A header whose checksum does not add up to zero.
    BadChecksum {
        /// File offset of the header.
        offset: usize,
    },
    /// Required flags (bits 0-15) this loader cannot honour.
    UnsupportedFlags(u32),
    /// Flag 16 clear and the file is not a little-endian ELF32 executable.
    NotElf32,
    /// A malformed ELF header or program header table.
    BadElf(&'static str),
    /// The a.out-kludge address fields contradict each other or the file.
    BadAddressFields(&'static str),
    /// More `PT_LOAD` segments than [`MAX_SEGMENTS`].
    TooManySegments,
    /// No segment with a non-zero memory size.
    NoLoadableSegment,
    /// A segment's file bytes lie outside the file.
    SegmentOutsideFile {
        /// Index of the program header.
        index: usize,
    },
    /// A segment's memory size is smaller than its file size.
    SegmentFileLargerThanMemory {
        /// Index of the program header.
        index: usize,
    },
    /// A segment wraps around the 32-bit address space.
    SegmentWraps {
        /// Index of the program header.
        index: usize,
    },
    /// Two segments share memory.
    SegmentsOverlap {
        /// One of them.
        first: GpaRange,
        /// The other.
        second: GpaRange,
    },
    /// The entry point is not inside a loaded segment.
    EntryOutsideImage(u32),
    /// The guest RAM size is below [`MIN_RAM`], above [`MAX_RAM`] or not a
    /// whole number of pages.
    BadRamSize(u64),
    /// More reserved ranges than [`MAX_RESERVED`], or one outside RAM.
    BadLayout,
    /// A piece (segment, module, boot information) does not fit in RAM.
    OutsideGuestMemory {
        /// The piece.
        range: GpaRange,
        /// End of guest RAM.
        ram_end: u64,
    },
    /// A piece overlaps a reserved range of the layout.
    OverlapsReserved {
        /// The piece.
        range: GpaRange,
        /// The reserved range.
        reserved: GpaRange,
    },
    /// More modules than [`MAX_MODULES`].
    TooManyModules,
    /// The kernel command line is longer than [`MAX_CMDLINE`] or holds a NUL.
    BadCommandLine,
    /// A module string is longer than [`MAX_MODULE_STRING`] or holds a NUL.
    BadModuleString,
    /// No room for the boot information anywhere in RAM.
    NoRoomForBootInfo,
    /// Writing guest memory failed (a [`GuestMemory`] smaller than the
    /// layout said).
    Memory(MemoryError),
}

impl From<MemoryError> for LoadError {
    fn from(error: MemoryError) -> Self {
        Self::Memory(error)
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotMultiboot => {
                write!(f, "not a multiboot1 image (no header in the first 8 KiB)")
            }
            Self::BadChecksum { offset } => {
                write!(
                    f,
                    "multiboot1 header at offset {offset:#x} has a bad checksum"
                )
            }
            Self::UnsupportedFlags(flags) => {
                write!(
                    f,
                    "multiboot1 header requires unsupported features {flags:#x}"
                )
            }
            Self::NotElf32 => write!(
                f,
                "image is not an ELF32 executable and has no load addresses"
            ),
            Self::BadElf(what) => write!(f, "malformed ELF32 image: {what}"),
            Self::BadAddressFields(what) => write!(f, "bad multiboot1 address fields: {what}"),
            Self::TooManySegments => write!(f, "more than {MAX_SEGMENTS} loadable segments"),
            Self::NoLoadableSegment => write!(f, "no loadable segment"),
            Self::SegmentOutsideFile { index } => {
                write!(f, "segment {index} extends past the end of the file")
            }
            Self::SegmentFileLargerThanMemory { index } => {
                write!(f, "segment {index} has more file bytes than memory bytes")
            }
            Self::SegmentWraps { index } => write!(f, "segment {index} wraps around 4 GiB"),
            Self::SegmentsOverlap { first, second } => write!(
                f,
                "segments {:#x}..{:#x} and {:#x}..{:#x} overlap",
                first.start, first.end, second.start, second.end
            ),
            Self::EntryOutsideImage(entry) => {
                write!(f, "entry point {entry:#x} is outside every loaded segment")
            }
            Self::BadRamSize(size) => write!(f, "guest RAM size {size:#x} is not usable"),
            Self::BadLayout => write!(f, "bad guest memory layout"),
            Self::OutsideGuestMemory { range, ram_end } => write!(
                f,
                "{:#x}..{:#x} does not fit in guest RAM (ends at {ram_end:#x})",
                range.start, range.end
            ),
            Self::OverlapsReserved { range, reserved } => write!(
                f,
                "{:#x}..{:#x} overlaps reserved guest memory {:#x}..{:#x}",
                range.start, range.end, reserved.start, reserved.end
            ),
            Self::TooManyModules => write!(f, "more than {MAX_MODULES} modules"),
            Self::BadCommandLine => write!(f, "command line too long or holds a NUL"),
            Self::BadModuleString => write!(f, "module string too long or holds a NUL"),
            Self::NoRoomForBootInfo => write!(f, "no room for the multiboot information"),
            Self::Memory(error) => write!(f, "{error}"),
        }
    }
}

/// A piece of the image to copy into guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// Guest-physical load address.
    pub gpa: u64,
    /// File offset of the bytes to copy.
    pub file_offset: usize,
    /// Bytes copied from the file.
    pub file_len: usize,
    /// Bytes in memory; `mem_len - file_len` are zeroed.
    pub mem_len: u64,
}

impl Segment {
    /// The guest memory the segment covers.
    pub fn range(&self) -> GpaRange {
        GpaRange::new(self.gpa, self.gpa + self.mem_len)
    }
}

/// A parsed multiboot1 image: where its pieces go and where it starts.
#[derive(Clone, Copy)]
pub struct MultibootImage<'a> {
    bytes: &'a [u8],
    segments: [Segment; MAX_SEGMENTS],
    count: usize,
    entry: u32,
    flags: u32,
}

impl fmt::Debug for MultibootImage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultibootImage")
            .field("len", &self.bytes.len())
            .field("segments", &self.segments())
            .field("entry", &self.entry)
            .field("flags", &self.flags)
            .finish()
    }
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let end = offset.checked_add(4)?;
    Some(u32::from_le_bytes(bytes.get(offset..end)?.try_into().ok()?))
}

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    let end = offset.checked_add(2)?;
    Some(u16::from_le_bytes(bytes.get(offset..end)?.try_into().ok()?))
}

impl<'a> MultibootImage<'a> {
    /// Parses `bytes` as a multiboot1 kernel. Nothing in the file is
    /// trusted: every offset and size is checked before use.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, LoadError> {
        let header = Self::find_header(bytes)?;
        let flags = u32_at(bytes, header + 4).ok_or(LoadError::NotMultiboot)?;
        let unsupported = flags & 0xFFFF & !SUPPORTED_REQUIRED_FLAGS;
        if unsupported != 0 {
            return Err(LoadError::UnsupportedFlags(unsupported));
        }
        let mut image = Self {
            bytes,
            segments: [Segment::default(); MAX_SEGMENTS],
            count: 0,
            entry: 0,
            flags,
        };
        if flags & FLAG_AOUT_KLUDGE != 0 {
            image.read_address_fields(header)?;
        } else {
            image.read_elf()?;
        }
        image.check_segments()?;
        Ok(image)
    }

    fn find_header(bytes: &[u8]) -> Result<usize, LoadError> {
        let search = bytes.len().min(HEADER_SEARCH_LEN);
        let mut offset = 0;
        while offset + 12 <= search {
            if u32_at(bytes, offset) == Some(HEADER_MAGIC) {
                let flags = u32_at(bytes, offset + 4).ok_or(LoadError::NotMultiboot)?;
                let checksum = u32_at(bytes, offset + 8).ok_or(LoadError::NotMultiboot)?;
                if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
                    return Err(LoadError::BadChecksum { offset });
                }
                return Ok(offset);
            }
            offset += 4;
        }
        Err(LoadError::NotMultiboot)
    }

    /// Flag 16: header_addr, load_addr, load_end_addr, bss_end_addr and
    /// entry_addr follow the checksum.
    fn read_address_fields(&mut self, header: usize) -> Result<(), LoadError> {
        let field = |n: usize| {
            u32_at(self.bytes, header + 12 + 4 * n)
                .ok_or(LoadError::BadAddressFields("header truncated"))
        };
        let header_addr = field(0)?;
        let load_addr = field(1)?;
        let load_end_addr = field(2)?;
        let bss_end_addr = field(3)?;
        let entry = field(4)?;
        if load_addr > header_addr {
            return Err(LoadError::BadAddressFields("load_addr above header_addr"));
        }
        let lead = (header_addr - load_addr) as usize;
        let file_offset = header.checked_sub(lead).ok_or(LoadError::BadAddressFields(
            "load_addr before the file's start",
        ))?;
        let file_len = if load_end_addr == 0 {
            self.bytes.len() - file_offset
        } else {
            if load_end_addr < load_addr {
                return Err(LoadError::BadAddressFields("load_end_addr below load_addr"));
            }
            (load_end_addr - load_addr) as usize
        };
        if file_offset
            .checked_add(file_len)
            .is_none_or(|end| end > self.bytes.len())
        {
            return Err(LoadError::SegmentOutsideFile { index: 0 });
        }
        let load_end = u64::from(load_addr) + file_len as u64;
        let mem_end = if bss_end_addr == 0 {
            load_end
        } else if u64::from(bss_end_addr) < load_end {
            return Err(LoadError::BadAddressFields(
                "bss_end_addr below load_end_addr",
            ));
        } else {
            u64::from(bss_end_addr)
        };
        self.segments[0] = Segment {
            gpa: u64::from(load_addr),
            file_offset,
            file_len,
            mem_len: mem_end - u64::from(load_addr),
        };
        self.count = 1;
        self.entry = entry;
        Ok(())
    }

    fn read_elf(&mut self) -> Result<(), LoadError> {
        let b = self.bytes;
        if b.len() < 52 || b[0..4] != *b"\x7fELF" || b[4] != 1 || b[5] != 1 {
            return Err(LoadError::NotElf32);
        }
        if b[6] != 1 || u32_at(b, 20) != Some(1) {
            return Err(LoadError::BadElf("unknown ELF version"));
        }
        if u16_at(b, 16) != Some(2) {
            return Err(LoadError::BadElf("not an executable (ET_EXEC)"));
        }
        if u16_at(b, 18) != Some(3) {
            return Err(LoadError::BadElf("not for i386 (EM_386)"));
        }
        let entry = u32_at(b, 24).ok_or(LoadError::NotElf32)?;
        let phoff = u32_at(b, 28).ok_or(LoadError::NotElf32)? as usize;
        let phentsize = u16_at(b, 42).ok_or(LoadError::NotElf32)? as usize;
        let phnum = u16_at(b, 44).ok_or(LoadError::NotElf32)? as usize;
        if phentsize < 32 {
            return Err(LoadError::BadElf(
                "program header entries smaller than 32 bytes",
            ));
        }
        let table_len = phentsize
            .checked_mul(phnum)
            .ok_or(LoadError::BadElf("program header table too large"))?;
        if phoff.checked_add(table_len).is_none_or(|end| end > b.len()) {
            return Err(LoadError::BadElf("program header table outside the file"));
        }
        // Virtual-to-physical offsets of the loaded segments, to translate
        // an entry point given as a virtual address.
        let mut virtual_starts = [0u64; MAX_SEGMENTS];
        for index in 0..phnum {
            let ph = phoff + index * phentsize;
            let field = |n: usize| u32_at(b, ph + 4 * n).ok_or(LoadError::NotElf32);
            const PT_LOAD: u32 = 1;
            if field(0)? != PT_LOAD {
                continue;
            }
            let (offset, vaddr, paddr) = (field(1)?, field(2)?, field(3)?);
            let (filesz, memsz) = (field(4)?, field(5)?);
            if memsz == 0 {
                continue;
            }
            if filesz > memsz {
                return Err(LoadError::SegmentFileLargerThanMemory { index });
            }
            if (offset as usize)
                .checked_add(filesz as usize)
                .is_none_or(|end| end > b.len())
            {
                return Err(LoadError::SegmentOutsideFile { index });
            }
            if paddr.checked_add(memsz).is_none() || vaddr.checked_add(memsz).is_none() {
                return Err(LoadError::SegmentWraps { index });
            }
            if self.count == MAX_SEGMENTS {
                return Err(LoadError::TooManySegments);
            }
            virtual_starts[self.count] = u64::from(vaddr);
            self.segments[self.count] = Segment {
                gpa: u64::from(paddr),
                file_offset: offset as usize,
                file_len: filesz as usize,
                mem_len: u64::from(memsz),
            };
            self.count += 1;
        }
        // GRUB and QEMU load at p_paddr and accept an entry given either
        // physically or virtually; translate a virtual one.
        self.entry = entry;
        let physical = self.segments[..self.count]
            .iter()
            .any(|s| s.range().contains(u64::from(entry)));
        if !physical {
            for (segment, &vstart) in self.segments[..self.count].iter().zip(&virtual_starts) {
                let virt = GpaRange::new(vstart, vstart + segment.mem_len);
                if virt.contains(u64::from(entry)) {
                    // In range: the difference fits in the segment, and the
                    // segment fits below 4 GiB (checked above).
                    self.entry = (segment.gpa + (u64::from(entry) - vstart)) as u32;
                    break;
                }
            }
        }
        Ok(())
    }

    fn check_segments(&self) -> Result<(), LoadError> {
        if self.count == 0 {
            return Err(LoadError::NoLoadableSegment);
        }
        let segments = self.segments();
        for (i, a) in segments.iter().enumerate() {
            if a.gpa + a.mem_len > 1 << 32 {
                return Err(LoadError::SegmentWraps { index: i });
            }
            for b in &segments[i + 1..] {
                if a.range().overlaps(&b.range()) {
                    return Err(LoadError::SegmentsOverlap {
                        first: a.range(),
                        second: b.range(),
                    });
                }
            }
        }
        if !segments
            .iter()
            .any(|s| s.range().contains(u64::from(self.entry)))
        {
            return Err(LoadError::EntryOutsideImage(self.entry));
        }
        Ok(())
    }

    /// The loadable segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments[..self.count]
    }

    /// The physical entry point.
    pub fn entry(&self) -> u32 {
        self.entry
    }

    /// The header's flags.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// One past the highest byte any segment occupies.
    pub fn end(&self) -> u64 {
        self.segments()
            .iter()
            .map(|s| s.gpa + s.mem_len)
            .max()
            .unwrap_or(0)
    }
}

/// Type of a multiboot memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryType {
    /// Usable RAM.
    Available = 1,
    /// Not usable (firmware, ACPI tables, holes).
    Reserved = 2,
}

/// The guest's physical memory: RAM `[0, ram_bytes)` with some ranges
/// reserved (the EBDA, the legacy VGA/ROM hole where the ACPI tables live).
#[derive(Debug, Clone, Copy)]
pub struct GuestLayout {
    ram_bytes: u64,
    reserved: [GpaRange; MAX_RESERVED],
    reserved_count: usize,
}

/// Start of the EBDA: the end of conventional memory (`mem_lower` = 639).
pub const EBDA_START: u64 = 0x9_FC00;
/// First byte above the legacy hole.
pub const HIGH_MEMORY: u64 = 0x10_0000;

impl GuestLayout {
    /// A layout with the given reserved ranges (each inside RAM, any order).
    pub fn new(ram_bytes: u64, reserved: &[GpaRange]) -> Result<Self, LoadError> {
        if !(MIN_RAM..=MAX_RAM).contains(&ram_bytes) || !ram_bytes.is_multiple_of(PAGE) {
            return Err(LoadError::BadRamSize(ram_bytes));
        }
        if reserved.len() > MAX_RESERVED {
            return Err(LoadError::BadLayout);
        }
        let mut layout = Self {
            ram_bytes,
            reserved: [GpaRange::default(); MAX_RESERVED],
            reserved_count: 0,
        };
        for range in reserved {
            if range.is_empty() || range.end > ram_bytes {
                return Err(LoadError::BadLayout);
            }
            layout.reserved[layout.reserved_count] = *range;
            layout.reserved_count += 1;
        }
        layout.reserved[..layout.reserved_count].sort_unstable_by_key(|r| r.start);
        for pair in layout.reserved[..layout.reserved_count].windows(2) {
            if pair[0].overlaps(&pair[1]) {
                return Err(LoadError::BadLayout);
            }
        }
        Ok(layout)
    }

    /// The PC layout hv's guests get: conventional memory up to the EBDA,
    /// `[0x9FC00, 0x100000)` reserved (EBDA, VGA hole, the BIOS area that
    /// holds the ACPI tables), RAM above.
    pub fn pc(ram_bytes: u64) -> Result<Self, LoadError> {
        Self::new(ram_bytes, &[GpaRange::new(EBDA_START, HIGH_MEMORY)])
    }

    /// Size of RAM.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// The reserved ranges, sorted.
    pub fn reserved(&self) -> &[GpaRange] {
        &self.reserved[..self.reserved_count]
    }

    /// Checks that `range` lies in RAM and off every reserved range.
    pub fn check_usable(&self, range: GpaRange) -> Result<(), LoadError> {
        if range.end > self.ram_bytes || range.start > range.end {
            return Err(LoadError::OutsideGuestMemory {
                range,
                ram_end: self.ram_bytes,
            });
        }
        if let Some(reserved) = self.reserved().iter().find(|r| r.overlaps(&range)) {
            return Err(LoadError::OverlapsReserved {
                range,
                reserved: *reserved,
            });
        }
        Ok(())
    }

    /// The multiboot memory map: RAM cut by the reserved ranges. At most
    /// `2 * MAX_RESERVED + 1` entries.
    pub fn memory_map(&self) -> ([(GpaRange, MemoryType); 2 * MAX_RESERVED + 1], usize) {
        let mut map = [(GpaRange::default(), MemoryType::Reserved); 2 * MAX_RESERVED + 1];
        let mut n = 0;
        let mut at = 0;
        for reserved in self.reserved() {
            if reserved.start > at {
                map[n] = (GpaRange::new(at, reserved.start), MemoryType::Available);
                n += 1;
            }
            map[n] = (*reserved, MemoryType::Reserved);
            n += 1;
            at = reserved.end;
        }
        if at < self.ram_bytes {
            map[n] = (GpaRange::new(at, self.ram_bytes), MemoryType::Available);
            n += 1;
        }
        (map, n)
    }

    /// `mem_lower`: KiB of available memory from 0 (at most 640).
    pub fn mem_lower_kib(&self) -> u32 {
        let end = self
            .reserved()
            .iter()
            .map(|r| r.start)
            .find(|&s| s < HIGH_MEMORY)
            .unwrap_or(HIGH_MEMORY)
            .min(0xA_0000);
        (end / 1024) as u32
    }

    /// `mem_upper`: KiB of available memory contiguous from 1 MiB.
    pub fn mem_upper_kib(&self) -> u32 {
        let end = self
            .reserved()
            .iter()
            .filter(|r| r.end > HIGH_MEMORY)
            .map(|r| r.start.max(HIGH_MEMORY))
            .min()
            .unwrap_or(self.ram_bytes);
        ((end - HIGH_MEMORY) / 1024).min(u64::from(u32::MAX)) as u32
    }
}

/// A module: its bytes and its string (GRUB's "command line" of the
/// module; QEMU gives the file name).
#[derive(Debug, Clone, Copy)]
pub struct Module<'a> {
    /// Contents (kvm-unit-tests: the environment file).
    pub bytes: &'a [u8],
    /// String, without NUL.
    pub string: &'a [u8],
}

const MBI_LEN: u64 = 120;
const MODULE_ENTRY_LEN: u64 = 16;
const MMAP_ENTRY_LEN: u64 = 24;
const BOOTLOADER_NAME: &[u8] = b"hv\0";

/// Where everything goes, decided before anything is written.
#[derive(Debug, Clone, Copy)]
pub struct LoadPlan<'a> {
    image: MultibootImage<'a>,
    layout: GuestLayout,
    cmdline: &'a [u8],
    modules: [Option<Module<'a>>; MAX_MODULES],
    module_gpas: [u64; MAX_MODULES],
    boot_info: GpaRange,
}

/// Offsets inside the boot-information block.
struct BootInfoLayout {
    modules: u64,
    mmap: u64,
    mmap_len: u64,
    cmdline: u64,
    module_strings: [u64; MAX_MODULES],
    name: u64,
    len: u64,
}

impl<'a> LoadPlan<'a> {
    /// Places `image`, its `cmdline` and `modules` in `layout`.
    pub fn new(
        image: MultibootImage<'a>,
        cmdline: &'a [u8],
        modules: &[Module<'a>],
        layout: GuestLayout,
    ) -> Result<Self, LoadError> {
        if cmdline.len() > MAX_CMDLINE || cmdline.contains(&0) {
            return Err(LoadError::BadCommandLine);
        }
        if modules.len() > MAX_MODULES {
            return Err(LoadError::TooManyModules);
        }
        for module in modules {
            if module.string.len() > MAX_MODULE_STRING || module.string.contains(&0) {
                return Err(LoadError::BadModuleString);
            }
        }
        for segment in image.segments() {
            layout.check_usable(segment.range())?;
        }
        let mut plan = Self {
            image,
            layout,
            cmdline,
            modules: [None; MAX_MODULES],
            module_gpas: [0; MAX_MODULES],
            boot_info: GpaRange::default(),
        };
        // Modules: page-aligned, one after the other, after the kernel.
        let mut at = align_up(image.end(), PAGE).ok_or(LoadError::OutsideGuestMemory {
            range: GpaRange::new(image.end(), u64::MAX),
            ram_end: layout.ram_bytes,
        })?;
        for (i, module) in modules.iter().enumerate() {
            let range = GpaRange::new(at, at + module.bytes.len() as u64);
            plan.place_module(range)?;
            plan.modules[i] = Some(*module);
            plan.module_gpas[i] = at;
            at = align_up(range.end, PAGE).unwrap_or(u64::MAX);
        }
        let len = plan.boot_info_layout().len;
        plan.boot_info = plan.find_boot_info_room(len, at)?;
        Ok(plan)
    }

    fn place_module(&self, range: GpaRange) -> Result<(), LoadError> {
        // Modules go above the kernel, which is above 1 MiB in every image
        // we know; one that would run into a reserved range is refused.
        self.layout.check_usable(range)
    }

    fn boot_info_layout(&self) -> BootInfoLayout {
        let modules = MBI_LEN;
        let module_count = self.module_count() as u64;
        let mmap = modules + module_count * MODULE_ENTRY_LEN;
        let (_, map_entries) = self.layout.memory_map();
        let mmap_len = map_entries as u64 * MMAP_ENTRY_LEN;
        let cmdline = mmap + mmap_len;
        let mut next = cmdline + self.cmdline.len() as u64 + 1;
        let mut module_strings = [0; MAX_MODULES];
        for (slot, module) in module_strings.iter_mut().zip(self.modules.iter().flatten()) {
            *slot = next;
            next += module.string.len() as u64 + 1;
        }
        BootInfoLayout {
            modules,
            mmap,
            mmap_len,
            cmdline,
            module_strings,
            name: next,
            len: next + BOOTLOADER_NAME.len() as u64,
        }
    }

    /// Low memory first (page 0 is left to the guest: kvm-unit-tests put
    /// their AP trampoline there), from 0x9000 as QEMU does, then below
    /// it, then after the modules.
    fn find_boot_info_room(&self, len: u64, after_modules: u64) -> Result<GpaRange, LoadError> {
        let windows = [
            (0x9000, EBDA_START),
            (0x1000, 0x9000),
            (after_modules, self.layout.ram_bytes),
        ];
        for (start, end) in windows {
            let mut at = start;
            while at.checked_add(len).is_some_and(|e| e <= end) {
                let range = GpaRange::new(at, at + len);
                if self.layout.check_usable(range).is_ok() && !self.collides(range) {
                    return Ok(range);
                }
                at += PAGE;
            }
        }
        Err(LoadError::NoRoomForBootInfo)
    }

    fn collides(&self, range: GpaRange) -> bool {
        self.image
            .segments()
            .iter()
            .any(|s| s.range().overlaps(&range))
            || self.modules.iter().zip(self.module_gpas).any(|(m, gpa)| {
                m.is_some_and(|m| GpaRange::new(gpa, gpa + m.bytes.len() as u64).overlaps(&range))
            })
    }

    fn module_count(&self) -> usize {
        self.modules.iter().flatten().count()
    }

    /// The image's segments.
    pub fn segments(&self) -> &[Segment] {
        self.image.segments()
    }

    /// Guest-physical ranges of the modules, in order.
    pub fn module_ranges(&self) -> impl Iterator<Item = GpaRange> + '_ {
        self.modules
            .iter()
            .zip(self.module_gpas)
            .filter_map(|(m, gpa)| m.map(|m| GpaRange::new(gpa, gpa + m.bytes.len() as u64)))
    }

    /// Where the multiboot information, the module list, the memory map
    /// and the strings go.
    pub fn boot_info(&self) -> GpaRange {
        self.boot_info
    }

    /// Writes the plan into `memory` (whose size must be the layout's) and
    /// returns the boot vCPU's entry state.
    pub fn load(&self, memory: &mut impl GuestMemory) -> Result<MultibootEntryState, LoadError> {
        if memory.size() < self.layout.ram_bytes {
            return Err(LoadError::Memory(MemoryError {
                gpa: memory.size(),
                len: self.layout.ram_bytes - memory.size(),
            }));
        }
        for segment in self.image.segments() {
            // In the file: checked by `parse`.
            let bytes =
                &self.image.bytes[segment.file_offset..segment.file_offset + segment.file_len];
            memory.write(segment.gpa, bytes)?;
            memory.zero(
                segment.gpa + segment.file_len as u64,
                segment.mem_len - segment.file_len as u64,
            )?;
        }
        for (module, gpa) in self.modules.iter().zip(self.module_gpas) {
            if let Some(module) = module {
                memory.write(gpa, module.bytes)?;
            }
        }
        self.write_boot_info(memory)?;
        Ok(MultibootEntryState {
            eip: self.image.entry(),
            eax: BOOTLOADER_MAGIC,
            // Below MAX_RAM < 4 GiB.
            ebx: self.boot_info.start as u32,
            cr0: 0x11,
            eflags: 0x2,
            cs: SegmentState::flat_code32(0x08),
            data: SegmentState::flat_data32(0x10),
        })
    }

    fn write_boot_info(&self, memory: &mut impl GuestMemory) -> Result<(), LoadError> {
        const FLAG_MEM: u32 = 1 << 0;
        const FLAG_CMDLINE: u32 = 1 << 2;
        const FLAG_MODS: u32 = 1 << 3;
        const FLAG_MMAP: u32 = 1 << 6;
        const FLAG_LOADER_NAME: u32 = 1 << 9;
        let base = self.boot_info.start;
        let at = self.boot_info_layout();
        // All addresses below are below MAX_RAM < 4 GiB: `as u32` is exact.
        let mut mbi = [0u8; MBI_LEN as usize];
        let mut put = |offset: usize, value: u32| {
            mbi[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        };
        put(
            0,
            FLAG_MEM | FLAG_CMDLINE | FLAG_MODS | FLAG_MMAP | FLAG_LOADER_NAME,
        );
        put(4, self.layout.mem_lower_kib());
        put(8, self.layout.mem_upper_kib());
        put(16, (base + at.cmdline) as u32);
        put(20, self.module_count() as u32);
        put(24, (base + at.modules) as u32);
        put(44, at.mmap_len as u32);
        put(48, (base + at.mmap) as u32);
        put(64, (base + at.name) as u32);
        memory.write(base, &mbi)?;

        let mut slot = base + at.modules;
        for ((module, gpa), string) in self
            .modules
            .iter()
            .zip(self.module_gpas)
            .zip(at.module_strings)
        {
            let Some(module) = module else { continue };
            let mut entry = [0u8; MODULE_ENTRY_LEN as usize];
            entry[0..4].copy_from_slice(&(gpa as u32).to_le_bytes());
            entry[4..8].copy_from_slice(&((gpa + module.bytes.len() as u64) as u32).to_le_bytes());
            entry[8..12].copy_from_slice(&((base + string) as u32).to_le_bytes());
            memory.write(slot, &entry)?;
            write_c_string(memory, base + string, module.string)?;
            slot += MODULE_ENTRY_LEN;
        }

        let (map, count) = self.layout.memory_map();
        for (i, (range, kind)) in map[..count].iter().enumerate() {
            let mut entry = [0u8; MMAP_ENTRY_LEN as usize];
            // `size` counts the bytes after itself.
            entry[0..4].copy_from_slice(&((MMAP_ENTRY_LEN - 4) as u32).to_le_bytes());
            entry[4..12].copy_from_slice(&range.start.to_le_bytes());
            entry[12..20].copy_from_slice(&range.len().to_le_bytes());
            entry[20..24].copy_from_slice(&(*kind as u32).to_le_bytes());
            memory.write(base + at.mmap + i as u64 * MMAP_ENTRY_LEN, &entry)?;
        }
        write_c_string(memory, base + at.cmdline, self.cmdline)?;
        memory.write(base + at.name, BOOTLOADER_NAME)?;
        debug_assert_eq!(at.name + BOOTLOADER_NAME.len() as u64, at.len);
        Ok(())
    }
}

fn write_c_string(memory: &mut impl GuestMemory, gpa: u64, s: &[u8]) -> Result<(), MemoryError> {
    memory.write(gpa, s)?;
    memory.write(gpa + s.len() as u64, &[0])
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

/// Parses, plans and loads in one step; nothing is written unless the whole
/// plan is valid.
pub fn load<'a>(
    image: &'a [u8],
    cmdline: &'a [u8],
    modules: &[Module<'a>],
    layout: GuestLayout,
    memory: &mut impl GuestMemory,
) -> Result<MultibootEntryState, LoadError> {
    let image = MultibootImage::parse(image)?;
    LoadPlan::new(image, cmdline, modules, layout)?.load(memory)
}

#[cfg(test)]
pub(crate) mod testutil {
    /// Builds multiboot1 ELF32 images for tests.
    pub struct ElfBuilder {
        pub segments: Vec<(u32, Vec<u8>, u32)>, // (paddr, file bytes, memsz)
        pub entry: u32,
        pub flags: u32,
    }

    impl ElfBuilder {
        /// A kvm-unit-tests-like image: text at 4 MiB + 0xb0 with the
        /// header at its start, data + BSS at 4 MiB + 32 KiB.
        pub fn kvm_unit_test_like() -> Self {
            let mut text = Vec::new();
            text.extend_from_slice(&super::HEADER_MAGIC.to_le_bytes());
            text.extend_from_slice(&0u32.to_le_bytes());
            text.extend_from_slice(&0u32.wrapping_sub(super::HEADER_MAGIC).to_le_bytes());
            text.extend_from_slice(&[0x90; 100]);
            Self {
                segments: vec![
                    (0x40_00b0, text, 0),
                    (0x40_8000, vec![0x5A; 0x200], 0x1_0000),
                ],
                entry: 0x40_00bc,
                flags: 0,
            }
        }

        pub fn build(&self) -> Vec<u8> {
            let phnum = self.segments.len();
            let phoff = 52usize;
            let mut data_offset = phoff + 32 * phnum;
            let mut out = vec![0u8; data_offset];
            out[0..4].copy_from_slice(b"\x7fELF");
            out[4] = 1; // ELFCLASS32
            out[5] = 1; // little endian
            out[6] = 1;
            out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
            out[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
            out[20..24].copy_from_slice(&1u32.to_le_bytes());
            out[24..28].copy_from_slice(&self.entry.to_le_bytes());
            out[28..32].copy_from_slice(&(phoff as u32).to_le_bytes());
            out[40..42].copy_from_slice(&52u16.to_le_bytes());
            out[42..44].copy_from_slice(&32u16.to_le_bytes());
            out[44..46].copy_from_slice(&(phnum as u16).to_le_bytes());
            let mut bodies = Vec::new();
            for (i, (paddr, bytes, memsz)) in self.segments.iter().enumerate() {
                let memsz = (*memsz).max(bytes.len() as u32);
                let ph = phoff + 32 * i;
                let fields = [
                    1,
                    data_offset as u32,
                    *paddr,
                    *paddr,
                    bytes.len() as u32,
                    memsz,
                    7,
                    0x1000,
                ];
                for (n, v) in fields.iter().enumerate() {
                    out[ph + 4 * n..ph + 4 * n + 4].copy_from_slice(&v.to_le_bytes());
                }
                data_offset += bytes.len();
                bodies.extend_from_slice(bytes);
            }
            out.extend_from_slice(&bodies);
            // Patch the header flags (and checksum) in place.
            let header = out
                .windows(4)
                .position(|w| w == super::HEADER_MAGIC.to_le_bytes())
                .unwrap();
            out[header + 4..header + 8].copy_from_slice(&self.flags.to_le_bytes());
            let checksum = 0u32
                .wrapping_sub(super::HEADER_MAGIC)
                .wrapping_sub(self.flags);
            out[header + 8..header + 12].copy_from_slice(&checksum.to_le_bytes());
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::ElfBuilder;
    use super::*;
    use crate::memory::fake::VecMemory;

    const RAM: u64 = 32 << 20;

    fn env() -> Module<'static> {
        Module {
            bytes: b"NR_CPUS=2\nMEMSIZE=32\n",
            string: b"env",
        }
    }

    #[test]
    fn loads_segments_zeroes_bss_and_builds_the_boot_information() {
        let image = ElfBuilder::kvm_unit_test_like().build();
        let mut mem = VecMemory(vec![0xEE; RAM as usize]);
        let state = load(
            &image,
            b"vmexit.flat ipi",
            &[env()],
            GuestLayout::pc(RAM).unwrap(),
            &mut mem,
        )
        .unwrap();

        assert_eq!(state.eax, BOOTLOADER_MAGIC);
        assert_eq!(state.eip, 0x40_00bc);
        assert_eq!(state.cr0 & 1, 1, "protected mode");
        assert_eq!(state.cr0 >> 31, 0, "paging off");
        assert_eq!(state.eflags & (1 << 9), 0, "interrupts off");
        assert_eq!(state.cs.vmx_access_rights(), 0xC09B);

        // Text copied, data copied, BSS zeroed, memory after the BSS untouched.
        assert_eq!(mem.u32_at(0x40_00b0), HEADER_MAGIC);
        assert_eq!(mem.bytes(0x40_8000, 0x200), &[0x5A; 0x200][..]);
        assert!(
            mem.bytes(0x40_8200, 0x1_0000 - 0x200)
                .iter()
                .all(|&b| b == 0)
        );
        let module_end = 0x41_8000 + env().bytes.len() as u64;
        assert_eq!(
            mem.bytes(module_end, 1),
            &[0xEE],
            "nothing written after the module"
        );

        let mbi = u64::from(state.ebx);
        assert_eq!(
            mbi, 0x9000,
            "boot information in low memory, as QEMU puts it"
        );
        let flags = mem.u32_at(mbi);
        assert_eq!(flags, 1 | 4 | 8 | 64 | 512);
        assert_eq!(mem.u32_at(mbi + 4), 639);
        assert_eq!(u64::from(mem.u32_at(mbi + 8)), (RAM - HIGH_MEMORY) / 1024);
        assert_eq!(
            mem.c_str(u64::from(mem.u32_at(mbi + 16))),
            b"vmexit.flat ipi"
        );
        assert_eq!(mem.c_str(u64::from(mem.u32_at(mbi + 64))), b"hv");

        // One module, page-aligned after the kernel's BSS.
        assert_eq!(mem.u32_at(mbi + 20), 1);
        let entry = u64::from(mem.u32_at(mbi + 24));
        let (start, end) = (mem.u32_at(entry), mem.u32_at(entry + 4));
        assert_eq!(start, 0x41_8000);
        assert_eq!(
            mem.bytes(u64::from(start), (end - start) as usize),
            env().bytes
        );
        assert_eq!(mem.c_str(u64::from(mem.u32_at(entry + 8))), b"env");

        // Memory map: conventional, reserved legacy hole, extended.
        let (mmap_len, mmap) = (mem.u32_at(mbi + 44), u64::from(mem.u32_at(mbi + 48)));
        assert_eq!(mmap_len, 3 * 24);
        let entry = |i: u64| {
            let at = mmap + i * 24;
            (
                mem.u32_at(at),
                mem.u64_at(at + 4),
                mem.u64_at(at + 12),
                mem.u32_at(at + 20),
            )
        };
        assert_eq!(entry(0), (20, 0, EBDA_START, 1));
        assert_eq!(entry(1), (20, EBDA_START, HIGH_MEMORY - EBDA_START, 2));
        assert_eq!(entry(2), (20, HIGH_MEMORY, RAM - HIGH_MEMORY, 1));
    }

    #[test]
    fn boot_information_moves_out_of_the_way_of_a_low_kernel() {
        // realmode.flat: segments at 0x8000..0xda30.
        let mut builder = ElfBuilder::kvm_unit_test_like();
        builder.segments[0] = (0x8000, builder.segments[0].1.clone(), 0x286c);
        builder.segments[1] = (0xb000, vec![1; 0x100], 0x2a30);
        builder.entry = 0x8018;
        let image = builder.build();
        let mut mem = VecMemory::new(RAM as usize);
        let state = load(
            &image,
            b"realmode.flat",
            &[],
            GuestLayout::pc(RAM).unwrap(),
            &mut mem,
        )
        .unwrap();
        assert_eq!(
            state.ebx, 0xe000,
            "first free page after the kernel, below the EBDA"
        );
        assert_eq!(mem.u32_at(0xe000 + 20), 0, "no module");
    }

    #[test]
    fn an_entry_given_virtually_is_translated_to_its_load_address() {
        let mut builder = ElfBuilder::kvm_unit_test_like();
        builder.entry = 0xC040_00BC;
        let mut image = builder.build();
        // Make segment 0's vaddr 0xC04000b0 (paddr stays 0x4000b0).
        image[52 + 8..52 + 12].copy_from_slice(&0xC040_00B0_u32.to_le_bytes());
        let parsed = MultibootImage::parse(&image).unwrap();
        assert_eq!(parsed.entry(), 0x40_00bc);
    }

    #[test]
    fn aout_kludge_loads_from_the_header_address_fields() {
        // Header at file offset 0, loaded at 1 MiB; 0x100 bytes; BSS to 0x2000.
        let mut image = Vec::new();
        let flags = FLAG_AOUT_KLUDGE | FLAG_PAGE_ALIGN;
        for v in [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
            0x10_0000,
            0x10_0000,
            0x10_0100,
            0x10_2000,
            0x10_0020,
        ] {
            image.extend_from_slice(&v.to_le_bytes());
        }
        image.resize(0x180, 0xCC);
        let parsed = MultibootImage::parse(&image).unwrap();
        assert_eq!(
            parsed.segments(),
            &[Segment {
                gpa: 0x10_0000,
                file_offset: 0,
                file_len: 0x100,
                mem_len: 0x2000
            }]
        );
        assert_eq!(parsed.entry(), 0x10_0020);
        let mut mem = VecMemory(vec![0xEE; RAM as usize]);
        load(&image, b"", &[], GuestLayout::pc(RAM).unwrap(), &mut mem).unwrap();
        assert_eq!(mem.bytes(0x10_00FF, 2), &[0xCC, 0]);
    }

    fn parse_error(image: &[u8]) -> LoadError {
        MultibootImage::parse(image).unwrap_err()
    }

    #[test]
    fn refuses_what_is_not_a_multiboot_image() {
        assert_eq!(parse_error(b""), LoadError::NotMultiboot);
        assert_eq!(parse_error(&[0u8; 9000]), LoadError::NotMultiboot);
        // A header past the first 8 KiB does not count.
        let mut late = vec![0u8; 8192];
        late.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
        late.extend_from_slice(&[0; 8]);
        assert_eq!(parse_error(&late), LoadError::NotMultiboot);

        let mut image = ElfBuilder::kvm_unit_test_like().build();
        let header = image
            .windows(4)
            .position(|w| w == HEADER_MAGIC.to_le_bytes())
            .unwrap();
        image[header + 8] ^= 1;
        assert_eq!(
            parse_error(&image),
            LoadError::BadChecksum { offset: header }
        );
    }

    #[test]
    fn refuses_required_features_it_cannot_honour() {
        let mut builder = ElfBuilder::kvm_unit_test_like();
        // Bit 2: a video mode, which hv's guests cannot have.
        builder.flags = 1 << 2;
        assert_eq!(
            parse_error(&builder.build()),
            LoadError::UnsupportedFlags(1 << 2)
        );
        builder.flags = 1 << 15 | FLAG_MEMORY_INFO;
        assert_eq!(
            parse_error(&builder.build()),
            LoadError::UnsupportedFlags(1 << 15)
        );
        // Optional bits (17-31) are ignored.
        builder.flags = 1 << 20 | FLAG_MEMORY_INFO | FLAG_PAGE_ALIGN;
        assert!(MultibootImage::parse(&builder.build()).is_ok());
    }

    #[test]
    fn refuses_malformed_elf() {
        let image = ElfBuilder::kvm_unit_test_like().build();
        let mut not_elf = image.clone();
        not_elf[0] = 0;
        assert_eq!(parse_error(&not_elf), LoadError::NotElf32);
        let mut elf64 = image.clone();
        elf64[4] = 2;
        assert_eq!(parse_error(&elf64), LoadError::NotElf32);
        let mut x86_64 = image.clone();
        x86_64[18] = 62;
        assert!(matches!(parse_error(&x86_64), LoadError::BadElf(_)));
        let mut phoff = image.clone();
        phoff[28..32].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(matches!(parse_error(&phoff), LoadError::BadElf(_)));
        let mut filesz = image.clone();
        filesz[52 + 16..52 + 20].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(matches!(
            parse_error(&filesz),
            LoadError::SegmentFileLargerThanMemory { index: 0 }
                | LoadError::SegmentOutsideFile { index: 0 }
        ));
        let mut wrap = image.clone();
        wrap[52 + 12..52 + 16].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert_eq!(parse_error(&wrap), LoadError::SegmentWraps { index: 0 });
        let mut entry = image;
        entry[24..28].copy_from_slice(&0x1234u32.to_le_bytes());
        assert_eq!(parse_error(&entry), LoadError::EntryOutsideImage(0x1234));
    }

    #[test]
    fn refuses_overlapping_segments() {
        let mut builder = ElfBuilder::kvm_unit_test_like();
        builder.segments[1].0 = 0x40_0100;
        assert!(matches!(
            parse_error(&builder.build()),
            LoadError::SegmentsOverlap { .. }
        ));
    }

    #[test]
    fn refuses_images_larger_than_guest_memory_or_over_reserved_ranges() {
        let image = ElfBuilder::kvm_unit_test_like().build();
        let parsed = MultibootImage::parse(&image).unwrap();
        // 4 MiB of RAM: the kernel at 4 MiB does not fit.
        let err = LoadPlan::new(parsed, b"", &[], GuestLayout::pc(4 << 20).unwrap()).unwrap_err();
        assert!(matches!(err, LoadError::OutsideGuestMemory { ram_end, .. } if ram_end == 4 << 20));

        // A reserved range over the kernel (e.g. memory hv keeps).
        let layout = GuestLayout::new(RAM, &[GpaRange::new(0x40_0000, 0x40_1000)]).unwrap();
        assert!(matches!(
            LoadPlan::new(parsed, b"", &[], layout).unwrap_err(),
            LoadError::OverlapsReserved { .. }
        ));

        // A kernel in the legacy hole.
        let mut low = ElfBuilder::kvm_unit_test_like();
        low.segments = vec![(0xF_0000, low.segments[0].1.clone(), 0)];
        low.entry = 0xF_000C;
        let low = low.build();
        let parsed = MultibootImage::parse(&low).unwrap();
        assert!(matches!(
            LoadPlan::new(parsed, b"", &[], GuestLayout::pc(RAM).unwrap()).unwrap_err(),
            LoadError::OverlapsReserved { reserved, .. } if reserved == GpaRange::new(EBDA_START, HIGH_MEMORY)
        ));
    }

    #[test]
    fn refuses_modules_that_do_not_fit_and_bad_strings() {
        let image = ElfBuilder::kvm_unit_test_like().build();
        let parsed = MultibootImage::parse(&image).unwrap();
        let layout = GuestLayout::pc(RAM).unwrap();
        let big = vec![0u8; RAM as usize];
        let module = Module {
            bytes: &big,
            string: b"big",
        };
        assert!(matches!(
            LoadPlan::new(parsed, b"", &[module], layout).unwrap_err(),
            LoadError::OutsideGuestMemory { .. }
        ));
        let five = [env(); 5];
        assert_eq!(
            LoadPlan::new(parsed, b"", &five, layout).unwrap_err(),
            LoadError::TooManyModules
        );
        assert_eq!(
            LoadPlan::new(parsed, b"a\0b", &[], layout).unwrap_err(),
            LoadError::BadCommandLine
        );
        let long = [b'x'; MAX_CMDLINE + 1];
        assert_eq!(
            LoadPlan::new(parsed, &long, &[], layout).unwrap_err(),
            LoadError::BadCommandLine
        );
        let bad = Module {
            bytes: b"",
            string: b"a\0",
        };
        assert_eq!(
            LoadPlan::new(parsed, b"", &[bad], layout).unwrap_err(),
            LoadError::BadModuleString
        );
    }

    #[test]
    fn a_bad_plan_writes_nothing() {
        let image = ElfBuilder::kvm_unit_test_like().build();
        let mut mem = VecMemory(vec![0xEE; RAM as usize]);
        let big = vec![0u8; RAM as usize];
        let module = Module {
            bytes: &big,
            string: b"big",
        };
        assert!(
            load(
                &image,
                b"",
                &[module],
                GuestLayout::pc(RAM).unwrap(),
                &mut mem
            )
            .is_err()
        );
        assert!(mem.0.iter().all(|&b| b == 0xEE));
    }

    #[test]
    fn layouts_are_validated() {
        assert_eq!(
            GuestLayout::pc(1 << 20).unwrap_err(),
            LoadError::BadRamSize(1 << 20)
        );
        assert_eq!(
            GuestLayout::pc(MAX_RAM + PAGE).unwrap_err(),
            LoadError::BadRamSize(MAX_RAM + PAGE)
        );
        assert_eq!(
            GuestLayout::pc(RAM + 1).unwrap_err(),
            LoadError::BadRamSize(RAM + 1)
        );
        assert_eq!(
            GuestLayout::new(
                RAM,
                &[GpaRange::new(0x1000, 0x3000), GpaRange::new(0x2000, 0x4000)]
            )
            .unwrap_err(),
            LoadError::BadLayout
        );
        assert_eq!(
            GuestLayout::new(RAM, &[GpaRange::new(0, RAM + 1)]).unwrap_err(),
            LoadError::BadLayout
        );
        let layout = GuestLayout::new(RAM, &[GpaRange::new(0x20_0000, 0x30_0000)]).unwrap();
        assert_eq!(
            layout.mem_upper_kib(),
            1024,
            "mem_upper stops at the first hole above 1 MiB"
        );
        assert_eq!(layout.mem_lower_kib(), 640);
    }

    #[test]
    fn memory_smaller_than_the_layout_is_an_error_not_a_panic() {
        let image = ElfBuilder::kvm_unit_test_like().build();
        let mut mem = VecMemory::new(8 << 20);
        let err = load(&image, b"", &[], GuestLayout::pc(RAM).unwrap(), &mut mem).unwrap_err();
        assert!(matches!(err, LoadError::Memory(_)));
    }

    /// The real images, when this machine has them (`HV_KVM_UNIT_TESTS` or
    /// the shared folder): every `.flat` must load into 128 MiB.
    #[test]
    fn real_kvm_unit_tests_images_load() {
        let dir = std::env::var("HV_KVM_UNIT_TESTS")
            .unwrap_or_else(|_| "/work/shared/guests/kvm-unit-tests".into());
        let Ok(entries) = std::fs::read_dir(format!("{dir}/x86")) else {
            eprintln!("no kvm-unit-tests images at {dir}: real-image check not run");
            return;
        };
        let mut loaded = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "flat") {
                continue;
            }
            let image = std::fs::read(&path).unwrap();
            let mut mem = VecMemory::new(128 << 20);
            let state = load(
                &image,
                b"x.flat",
                &[env()],
                GuestLayout::pc(128 << 20).unwrap(),
                &mut mem,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let parsed = MultibootImage::parse(&image).unwrap();
            assert!(
                parsed
                    .segments()
                    .iter()
                    .any(|s| s.range().contains(u64::from(state.eip)))
            );
            // The boot information lands where QEMU puts it, except for
            // realmode.flat, which occupies 0x8000-0xDA30 and has its
            // module in the next page.
            let expected = if path.ends_with("realmode.flat") {
                0xF000
            } else {
                0x9000
            };
            assert_eq!(state.ebx, expected, "{}", path.display());
            loaded += 1;
        }
        assert!(loaded >= 40, "only {loaded} images found in {dir}");
    }
}
