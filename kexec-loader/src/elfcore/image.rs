//! The hypervisor's own image in a dump, described the way a userspace core
//! describes its executable, so that debuggers which match an ELF file to a
//! core's memory by build ID (drgn) find it.
//!
//! drgn treats an ELF core without a `VMCOREINFO` note as a userspace core
//! and finds its main module like this (libdrgn `debug_info.c`,
//! `userspace_loaded_module_iterator_yield_main`):
//! 1. `AT_PHDR` and `AT_PHNUM` from the `NT_AUXV` note: where the
//!    executable's program headers are in memory;
//! 2. the `NT_FILE` note: which file is mapped at `AT_PHDR`, and at which
//!    file offset (that names the module, and gives `e_phoff`);
//! 3. the program headers, read from the core's memory: the `PT_LOAD` that
//!    holds `e_phoff` gives the load bias, every `PT_LOAD` the address
//!    range, and each `PT_NOTE`, read from memory too, the GNU build ID;
//! 4. a file given with `-s` whose build ID matches is the module's file.
//!
//! So the image must load its ELF header and program headers with it, and
//! its build-ID note (hv's `linker.ld` does both); this module turns those
//! loaded headers into the two notes. gdb reads both notes too (`info auxv`,
//! `info proc mappings`) and needs neither for symbols.

use core::fmt;

use super::{EHDR_LEN, ELFCLASS64, ELFDATA2LSB, EM_X86_64, PHDR_LEN, PT_LOAD};
use crate::bytes::{self, OutOfBounds, u16_at, u32_at, u64_at};

/// Note type of the auxiliary vector (`NT_AUXV`), name "CORE".
pub const NT_AUXV: u32 = 6;
/// Note type of the mapped-files table (`NT_FILE`), name "CORE".
pub const NT_FILE: u32 = 0x4649_4c45;
/// Auxiliary vector: end.
pub const AT_NULL: u64 = 0;
/// Auxiliary vector: address of the program headers in memory.
pub const AT_PHDR: u64 = 3;
/// Auxiliary vector: size of one program header.
pub const AT_PHENT: u64 = 4;
/// Auxiliary vector: number of program headers.
pub const AT_PHNUM: u64 = 5;
/// Auxiliary vector: page size.
pub const AT_PAGESZ: u64 = 6;
/// Auxiliary vector: entry point.
pub const AT_ENTRY: u64 = 9;
/// The page size `NT_FILE` counts file offsets in.
pub const MAPPING_PAGE: u64 = 4096;
/// Most `PT_LOAD` segments an image may have here.
pub const MAX_IMAGE_MAPPINGS: usize = 8;
/// Longest file name in `NT_FILE`.
pub const MAX_IMAGE_NAME: usize = 64;
/// Entries of the auxiliary vector written: `AT_PHDR`, `AT_PHENT`,
/// `AT_PHNUM`, `AT_PAGESZ`, `AT_ENTRY`, `AT_NULL`.
const AUXV_ENTRIES: usize = 6;
/// Bytes of the `NT_AUXV` descriptor.
pub const AUXV_DESC_LEN: usize = AUXV_ENTRIES * 16;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;

/// One file-backed mapping of the image (an `NT_FILE` entry): memory
/// `[start, end)` holds the file from `file_offset` on. All three are
/// multiples of [`MAPPING_PAGE`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileMapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// File offset of `start`, in bytes.
    pub file_offset: u64,
}

/// Why an image's loaded headers could not be described.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// The bytes end before the headers do.
    Truncated,
    /// No ELF magic: the image was loaded without its file header.
    BadMagic,
    /// Not a little-endian x86-64 ELF64 executable.
    NotX86_64Executable,
    /// `e_phentsize` is not 56.
    BadPhentsize(u16),
    /// A `PT_LOAD` wraps, or its offset and address disagree modulo a page.
    BadSegment(usize),
    /// More `PT_LOAD` segments than [`MAX_IMAGE_MAPPINGS`].
    TooManyMappings(usize),
    /// No `PT_LOAD` maps the program headers to where they were read from.
    HeadersNotLoaded,
    /// The file name is empty, longer than [`MAX_IMAGE_NAME`] or holds a NUL.
    BadName,
    /// An `NT_FILE` or `NT_AUXV` descriptor is malformed.
    MalformedNote,
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated => f.write_str("the image's loaded headers are truncated"),
            Self::BadMagic => f.write_str("no ELF file header at the image's start"),
            Self::NotX86_64Executable => {
                f.write_str("the image is not a little-endian x86-64 ELF64 executable")
            }
            Self::BadPhentsize(size) => write!(f, "e_phentsize {size}, not {PHDR_LEN}"),
            Self::BadSegment(i) => write!(
                f,
                "PT_LOAD {i} wraps, or its offset and address differ modulo a page"
            ),
            Self::TooManyMappings(n) => {
                write!(f, "{n} PT_LOAD segments, more than {MAX_IMAGE_MAPPINGS}")
            }
            Self::HeadersNotLoaded => {
                f.write_str("no PT_LOAD maps the program headers where they were read")
            }
            Self::BadName => write!(
                f,
                "the image's file name must be 1 to {MAX_IMAGE_NAME} bytes without NUL"
            ),
            Self::MalformedNote => f.write_str("malformed NT_FILE or NT_AUXV note"),
        }
    }
}

/// The image as loaded: what [`super::write_core_header`] turns into an
/// `NT_AUXV` and an `NT_FILE` note.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedImage<'a> {
    name: &'a str,
    entry: u64,
    phdr_addr: u64,
    phnum: u16,
    mappings: [FileMapping; MAX_IMAGE_MAPPINGS],
    mapping_count: usize,
}

impl<'a> LoadedImage<'a> {
    /// Reads the ELF file header and program headers the image loaded at
    /// `load_addr` (`headers` are the bytes there, at least up to the end
    /// of the program headers) and names the file `name` (`NT_FILE`).
    ///
    /// The program headers must be loaded where they were read: a
    /// `PT_LOAD` must map file offset `e_phoff` to `load_addr + e_phoff`.
    pub fn from_loaded_headers(
        name: &'a str,
        load_addr: u64,
        headers: &[u8],
    ) -> Result<Self, ImageError> {
        use ImageError as E;
        if name.is_empty() || name.len() > MAX_IMAGE_NAME || name.bytes().any(|b| b == 0) {
            return Err(E::BadName);
        }
        if headers.len() < EHDR_LEN {
            return Err(E::Truncated);
        }
        if headers.get(..4) != Some(b"\x7fELF".as_slice()) {
            return Err(E::BadMagic);
        }
        let e_type = u16_at(headers, 16).ok_or(E::Truncated)?;
        if headers.get(4) != Some(&ELFCLASS64)
            || headers.get(5) != Some(&ELFDATA2LSB)
            || u16_at(headers, 18) != Some(EM_X86_64)
            || (e_type != ET_EXEC && e_type != ET_DYN)
        {
            return Err(E::NotX86_64Executable);
        }
        let entry = u64_at(headers, 24).ok_or(E::Truncated)?;
        let phoff = u64_at(headers, 32).ok_or(E::Truncated)?;
        let phentsize = u16_at(headers, 54).ok_or(E::Truncated)?;
        if usize::from(phentsize) != PHDR_LEN {
            return Err(E::BadPhentsize(phentsize));
        }
        let phnum = u16_at(headers, 56).ok_or(E::Truncated)?;
        let phoff_usize = usize::try_from(phoff).map_err(|_| E::Truncated)?;
        let table_len = usize::from(phnum) * PHDR_LEN; // < 2^22
        let table = bytes::slice_at(headers, phoff_usize, table_len).ok_or(E::Truncated)?;
        let phdr_addr = load_addr.checked_add(phoff).ok_or(E::HeadersNotLoaded)?;

        let mut mappings = [FileMapping::default(); MAX_IMAGE_MAPPINGS];
        let mut mapping_count = 0;
        let mut headers_loaded = false;
        for i in 0..usize::from(phnum) {
            let at = i * PHDR_LEN;
            let field = |offset: usize| u64_at(table, at + offset).ok_or(E::Truncated);
            if u32_at(table, at).ok_or(E::Truncated)? != PT_LOAD {
                continue;
            }
            let (p_offset, p_vaddr, p_filesz) = (field(8)?, field(16)?, field(32)?);
            let page_offset = p_vaddr % MAPPING_PAGE;
            if p_offset % MAPPING_PAGE != page_offset {
                return Err(E::BadSegment(i));
            }
            let file_end = p_offset.checked_add(p_filesz).ok_or(E::BadSegment(i))?;
            let end = p_vaddr
                .checked_add(p_filesz)
                .and_then(|end| bytes::align_up(end, MAPPING_PAGE))
                .ok_or(E::BadSegment(i))?;
            // The headers were read at `load_addr`: this segment must put
            // file offset `phoff` exactly at `phdr_addr`.
            if p_offset <= phoff
                && phoff + table_len as u64 <= file_end
                && p_vaddr.checked_add(phoff - p_offset) == Some(phdr_addr)
            {
                headers_loaded = true;
            }
            if p_filesz == 0 {
                continue; // nothing of the file is mapped (all .bss)
            }
            let slot = mappings
                .get_mut(mapping_count)
                .ok_or(E::TooManyMappings(mapping_count + 1))?;
            *slot = FileMapping {
                start: p_vaddr - page_offset,
                end,
                file_offset: p_offset - page_offset,
            };
            mapping_count += 1;
        }
        if !headers_loaded {
            return Err(E::HeadersNotLoaded);
        }
        Ok(Self {
            name,
            entry,
            phdr_addr,
            phnum,
            mappings,
            mapping_count,
        })
    }

    /// The file name in `NT_FILE`.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// `AT_PHDR`: where the program headers are in memory.
    pub fn phdr_addr(&self) -> u64 {
        self.phdr_addr
    }

    /// `AT_PHNUM`.
    pub fn phnum(&self) -> u16 {
        self.phnum
    }

    /// `AT_ENTRY`.
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// The file-backed mappings, one per `PT_LOAD` with file bytes.
    pub fn mappings(&self) -> &[FileMapping] {
        &self.mappings[..self.mapping_count]
    }

    /// Bytes of the `NT_FILE` descriptor.
    pub fn nt_file_desc_len(&self) -> usize {
        // count <= 8, name <= 64 bytes: no overflow.
        16 + self.mapping_count * (24 + self.name.len() + 1)
    }

    /// Writes the `NT_AUXV` descriptor into `desc` ([`AUXV_DESC_LEN`]
    /// bytes).
    pub(super) fn write_auxv(&self, desc: &mut [u8]) -> Result<(), OutOfBounds> {
        let entries = [
            (AT_PHDR, self.phdr_addr),
            (AT_PHENT, PHDR_LEN as u64),
            (AT_PHNUM, u64::from(self.phnum)),
            (AT_PAGESZ, MAPPING_PAGE),
            (AT_ENTRY, self.entry),
            (AT_NULL, 0),
        ];
        for (i, (key, value)) in entries.into_iter().enumerate() {
            bytes::put_u64(desc, i * 16, key)?;
            bytes::put_u64(desc, i * 16 + 8, value)?;
        }
        Ok(())
    }

    /// Writes the `NT_FILE` descriptor into `desc`
    /// ([`Self::nt_file_desc_len`] bytes), in the kernel's layout
    /// (`fill_files_note` in `fs/binfmt_elf.c`): count, page size, then
    /// `start, end, file offset in pages` per mapping, then one
    /// NUL-terminated file name per mapping.
    pub(super) fn write_nt_file(&self, desc: &mut [u8]) -> Result<(), OutOfBounds> {
        let mappings = self.mappings();
        bytes::put_u64(desc, 0, mappings.len() as u64)?;
        bytes::put_u64(desc, 8, MAPPING_PAGE)?;
        for (i, mapping) in mappings.iter().enumerate() {
            let at = 16 + i * 24;
            bytes::put_u64(desc, at, mapping.start)?;
            bytes::put_u64(desc, at + 8, mapping.end)?;
            bytes::put_u64(desc, at + 16, mapping.file_offset / MAPPING_PAGE)?;
        }
        let mut at = 16 + mappings.len() * 24;
        for _ in mappings {
            bytes::put(desc, at, self.name.as_bytes())?;
            bytes::put_u8(desc, at + self.name.len(), 0)?;
            at += self.name.len() + 1;
        }
        Ok(())
    }
}

/// The image a dump describes, as read back from its `NT_AUXV` and
/// `NT_FILE` notes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageNotes<'a> {
    /// `AT_PHDR`.
    pub phdr_addr: u64,
    /// `AT_PHNUM`.
    pub phnum: u64,
    /// `AT_ENTRY`.
    pub entry: u64,
    /// The `NT_FILE` entries: mapping and file name.
    pub files: NtFile<'a>,
}

/// Reads an `NT_AUXV` descriptor: `(AT_PHDR, AT_PHNUM, AT_ENTRY)`, 0 for
/// those missing.
pub fn read_auxv(desc: &[u8]) -> Result<(u64, u64, u64), ImageError> {
    if !desc.len().is_multiple_of(16) {
        return Err(ImageError::MalformedNote);
    }
    let (mut phdr, mut phnum, mut entry) = (0, 0, 0);
    for pair in desc.chunks_exact(16) {
        let key = u64_at(pair, 0).ok_or(ImageError::MalformedNote)?;
        let value = u64_at(pair, 8).ok_or(ImageError::MalformedNote)?;
        match key {
            AT_NULL => break,
            AT_PHDR => phdr = value,
            AT_PHNUM => phnum = value,
            AT_ENTRY => entry = value,
            _ => {}
        }
    }
    Ok((phdr, phnum, entry))
}

/// A validated `NT_FILE` descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NtFile<'a> {
    desc: &'a [u8],
    count: usize,
    page_size: u64,
}

impl<'a> NtFile<'a> {
    /// Validates an `NT_FILE` descriptor: every entry and every name lies
    /// inside it.
    pub fn parse(desc: &'a [u8]) -> Result<Self, ImageError> {
        let malformed = ImageError::MalformedNote;
        let count = u64_at(desc, 0).ok_or(malformed)?;
        let page_size = u64_at(desc, 8).ok_or(malformed)?;
        // Each entry takes 24 bytes and a name of at least one byte.
        let count = usize::try_from(count)
            .ok()
            .filter(|&c| c <= desc.len() / 25)
            .ok_or(malformed)?;
        let mut at = 16 + count * 24;
        for _ in 0..count {
            let rest = desc.get(at..).ok_or(malformed)?;
            let len = rest.iter().position(|&b| b == 0).ok_or(malformed)?;
            at += len + 1;
        }
        Ok(Self {
            desc,
            count,
            page_size,
        })
    }

    /// The entries: mapping (file offset in bytes) and file name.
    pub fn entries(&self) -> impl Iterator<Item = (FileMapping, &'a [u8])> + 'a {
        let (desc, count, page_size) = (self.desc, self.count, self.page_size);
        let mut name_at = 16 + count * 24;
        (0..count).map(move |i| {
            // Bounds checked by `parse`.
            let field = |offset: usize| u64_at(desc, 16 + i * 24 + offset).unwrap_or(0);
            let rest = desc.get(name_at..).unwrap_or_default();
            let len = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            name_at += len + 1;
            let mapping = FileMapping {
                start: field(0),
                end: field(8),
                file_offset: field(16).saturating_mul(page_size),
            };
            (mapping, &rest[..len])
        })
    }
}
