//! The PVH boot ABI's wire format: Xen's `hvm_start_info` (version 1), its
//! module list and its memory map, as QEMU's `-kernel` hands them to hv and
//! as hv's capture loader hands them to hv in capture mode.
//!
//! ```text
//! hvm_start_info                      hvm_modlist_entry      hvm_memmap_table_entry
//!  0 magic          u32 0x336ec578     0 paddr         u64    0 addr     u64
//!  4 version        u32                8 size          u64    8 size     u64
//!  8 flags          u32               16 cmdline_paddr u64   16 type     u32 (e820)
//! 12 nr_modules     u32               24 reserved      u64   20 reserved u32
//! 16 modlist_paddr  u64               32                     24
//! 24 cmdline_paddr  u64
//! 32 rsdp_paddr     u64
//! 40 memmap_paddr   u64  version 1 and later only
//! 48 memmap_entries u32  version 1 and later only
//! 52 reserved       u32
//! 56
//! ```
//!
//! All fields are little-endian. An address of 0 means "not present" (the
//! ABI never loads anything at physical address 0). Command lines are
//! NUL-terminated strings.
//!
//! [`decode`] reads all of it from loader memory through a reader closure,
//! so the kernel can parse it with no raw pointer of its own: every count
//! is turned into a byte length with checked arithmetic and every range is
//! read through the closure, which refuses what is not readable.

use core::fmt;
use core::marker::PhantomData;

use crate::bytes::{self, OutOfBounds};

/// `hvm_start_info.magic` (`XEN_HVM_START_MAGIC_VALUE`).
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// The version [`StartInfo::encode`] writes: the first with a memory map.
pub const START_INFO_VERSION: u32 = 1;
/// Bytes of a version 0 start info (no memory map fields).
pub const START_INFO_V0_LEN: usize = 40;
/// Bytes of a version 1 start info.
pub const START_INFO_LEN: usize = 56;
/// Bytes of one `hvm_modlist_entry`.
pub const MODLIST_ENTRY_LEN: usize = 32;
/// Bytes of one `hvm_memmap_table_entry`.
pub const MEMMAP_ENTRY_LEN: usize = 24;

/// Field offsets in `hvm_start_info`.
mod start {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const FLAGS: usize = 8;
    pub const NR_MODULES: usize = 12;
    pub const MODLIST_PADDR: usize = 16;
    pub const CMDLINE_PADDR: usize = 24;
    pub const RSDP_PADDR: usize = 32;
    pub const MEMMAP_PADDR: usize = 40;
    pub const MEMMAP_ENTRIES: usize = 48;
    pub const RESERVED: usize = 52;
}

/// Why PVH boot information could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvhError {
    /// The start info's magic is not [`START_INFO_MAGIC`].
    BadMagic(u32),
    /// Fewer bytes than a start info (or an entry) needs.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        len: usize,
    },
    /// The reader could not give `len` bytes at `paddr`.
    Unreadable {
        /// Physical address.
        paddr: u64,
        /// Bytes asked for.
        len: usize,
    },
    /// A table's byte length, or its end, overflows.
    TableTooLarge {
        /// Which table: `"module list"` or `"memory map"`.
        table: &'static str,
        /// Its address.
        paddr: u64,
        /// Its entry count.
        count: u32,
    },
    /// No NUL within `max` bytes of a string at `paddr`.
    StringTooLong {
        /// Physical address of the string.
        paddr: u64,
        /// The longest accepted length, without the NUL.
        max: usize,
    },
}

impl fmt::Display for PvhError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadMagic(magic) => write!(
                f,
                "PVH start info magic {magic:#x}, expected {START_INFO_MAGIC:#x}"
            ),
            Self::Truncated { needed, len } => {
                write!(f, "PVH structure of {len} bytes, {needed} needed")
            }
            Self::Unreadable { paddr, len } => {
                write!(f, "cannot read {len} bytes of PVH boot data at {paddr:#x}")
            }
            Self::TableTooLarge {
                table,
                paddr,
                count,
            } => write!(
                f,
                "the PVH {table} of {count} entries at {paddr:#x} overflows the address space"
            ),
            Self::StringTooLong { paddr, max } => write!(
                f,
                "the PVH string at {paddr:#x} has no NUL within {max} bytes"
            ),
        }
    }
}

impl core::error::Error for PvhError {}

/// `hvm_start_info`, magic aside.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartInfo {
    /// Structure version; 0 has no memory map fields.
    pub version: u32,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Entries in the module list.
    pub nr_modules: u32,
    /// The module list, 0 if none.
    pub modlist_paddr: u64,
    /// The NUL-terminated command line, 0 if none.
    pub cmdline_paddr: u64,
    /// The ACPI RSDP, 0 if not given.
    pub rsdp_paddr: u64,
    /// The memory map, 0 if none (always 0 in version 0).
    pub memmap_paddr: u64,
    /// Entries in the memory map (always 0 in version 0).
    pub memmap_entries: u32,
}

impl StartInfo {
    /// Writes the [`START_INFO_LEN`] bytes of a start info (magic, these
    /// fields, reserved 0) to `out[..START_INFO_LEN]`. Nothing is written
    /// if `out` is shorter.
    pub fn encode(&self, out: &mut [u8]) -> Result<(), OutOfBounds> {
        let out = out.get_mut(..START_INFO_LEN).ok_or(OutOfBounds)?;
        bytes::put_u32(out, start::MAGIC, START_INFO_MAGIC)?;
        bytes::put_u32(out, start::VERSION, self.version)?;
        bytes::put_u32(out, start::FLAGS, self.flags)?;
        bytes::put_u32(out, start::NR_MODULES, self.nr_modules)?;
        bytes::put_u64(out, start::MODLIST_PADDR, self.modlist_paddr)?;
        bytes::put_u64(out, start::CMDLINE_PADDR, self.cmdline_paddr)?;
        bytes::put_u64(out, start::RSDP_PADDR, self.rsdp_paddr)?;
        bytes::put_u64(out, start::MEMMAP_PADDR, self.memmap_paddr)?;
        bytes::put_u32(out, start::MEMMAP_ENTRIES, self.memmap_entries)?;
        bytes::put_u32(out, start::RESERVED, 0)
    }

    /// Reads a start info. Version 0 needs [`START_INFO_V0_LEN`] bytes and
    /// has no memory map; version 1 and later (backwards compatible by the
    /// ABI's promise) need [`START_INFO_LEN`].
    pub fn decode(input: &[u8]) -> Result<Self, PvhError> {
        let truncated = |needed| PvhError::Truncated {
            needed,
            len: input.len(),
        };
        let magic = bytes::u32_at(input, start::MAGIC).ok_or(truncated(START_INFO_V0_LEN))?;
        if magic != START_INFO_MAGIC {
            return Err(PvhError::BadMagic(magic));
        }
        let version = bytes::u32_at(input, start::VERSION).ok_or(truncated(START_INFO_V0_LEN))?;
        let needed = Self::len_for_version(version);
        if input.len() < needed {
            return Err(truncated(needed));
        }
        // In bounds: `input` holds at least `needed` bytes.
        let u32_at = |at| bytes::u32_at(input, at).unwrap_or(0);
        let u64_at = |at| bytes::u64_at(input, at).unwrap_or(0);
        let mut info = Self {
            version,
            flags: u32_at(start::FLAGS),
            nr_modules: u32_at(start::NR_MODULES),
            modlist_paddr: u64_at(start::MODLIST_PADDR),
            cmdline_paddr: u64_at(start::CMDLINE_PADDR),
            rsdp_paddr: u64_at(start::RSDP_PADDR),
            memmap_paddr: 0,
            memmap_entries: 0,
        };
        if version >= 1 {
            info.memmap_paddr = u64_at(start::MEMMAP_PADDR);
            info.memmap_entries = u32_at(start::MEMMAP_ENTRIES);
        }
        Ok(info)
    }

    /// Bytes a start info of `version` occupies.
    pub const fn len_for_version(version: u32) -> usize {
        if version == 0 {
            START_INFO_V0_LEN
        } else {
            START_INFO_LEN
        }
    }
}

/// A table entry of fixed size on the wire.
pub trait WireEntry: Sized {
    /// Bytes of one entry.
    const LEN: usize;
    /// What a table of these is called in errors.
    const TABLE: &'static str;
    /// Reads one entry from `input[..Self::LEN]`.
    fn decode(input: &[u8]) -> Result<Self, PvhError>;
    /// Writes one entry to `out[..Self::LEN]` (reserved fields 0).
    fn encode(&self, out: &mut [u8]) -> Result<(), OutOfBounds>;
}

/// `hvm_modlist_entry`: one boot module.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModlistEntry {
    /// Physical address of the module.
    pub paddr: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Its NUL-terminated command line, 0 if none.
    pub cmdline_paddr: u64,
}

impl WireEntry for ModlistEntry {
    const LEN: usize = MODLIST_ENTRY_LEN;
    const TABLE: &'static str = "module list";

    fn decode(input: &[u8]) -> Result<Self, PvhError> {
        let entry: [u8; MODLIST_ENTRY_LEN] = bytes::array(input, 0).ok_or(PvhError::Truncated {
            needed: MODLIST_ENTRY_LEN,
            len: input.len(),
        })?;
        let u64_at = |at| bytes::u64_at(&entry, at).unwrap_or(0);
        Ok(Self {
            paddr: u64_at(0),
            size: u64_at(8),
            cmdline_paddr: u64_at(16),
        })
    }

    fn encode(&self, out: &mut [u8]) -> Result<(), OutOfBounds> {
        let out = out.get_mut(..MODLIST_ENTRY_LEN).ok_or(OutOfBounds)?;
        bytes::put_u64(out, 0, self.paddr)?;
        bytes::put_u64(out, 8, self.size)?;
        bytes::put_u64(out, 16, self.cmdline_paddr)?;
        bytes::put_u64(out, 24, 0)
    }
}

/// `hvm_memmap_table_entry`: one memory range with its e820 type
/// ([`crate::e820`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemmapEntry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type.
    pub kind: u32,
}

impl WireEntry for MemmapEntry {
    const LEN: usize = MEMMAP_ENTRY_LEN;
    const TABLE: &'static str = "memory map";

    fn decode(input: &[u8]) -> Result<Self, PvhError> {
        let entry: [u8; MEMMAP_ENTRY_LEN] = bytes::array(input, 0).ok_or(PvhError::Truncated {
            needed: MEMMAP_ENTRY_LEN,
            len: input.len(),
        })?;
        Ok(Self {
            addr: bytes::u64_at(&entry, 0).unwrap_or(0),
            size: bytes::u64_at(&entry, 8).unwrap_or(0),
            kind: bytes::u32_at(&entry, 16).unwrap_or(0),
        })
    }

    fn encode(&self, out: &mut [u8]) -> Result<(), OutOfBounds> {
        let out = out.get_mut(..MEMMAP_ENTRY_LEN).ok_or(OutOfBounds)?;
        bytes::put_u64(out, 0, self.addr)?;
        bytes::put_u64(out, 8, self.size)?;
        bytes::put_u32(out, 16, self.kind)?;
        bytes::put_u32(out, 20, 0)
    }
}

/// A table read from loader memory: its address and its bytes, whose
/// length is a whole number of entries.
#[derive(Clone, Copy, Debug)]
pub struct Table<'a, T> {
    paddr: u64,
    bytes: &'a [u8],
    entry: PhantomData<T>,
}

impl<'a, T: WireEntry> Table<'a, T> {
    /// A table with no entries.
    pub const fn empty() -> Self {
        Self {
            paddr: 0,
            bytes: &[],
            entry: PhantomData,
        }
    }

    /// A table over `bytes`, read at `paddr`; a partial entry at the end is
    /// left out.
    pub fn new(paddr: u64, bytes: &'a [u8]) -> Self {
        let whole = bytes.len() - bytes.len() % T::LEN;
        Self {
            paddr,
            bytes: bytes.get(..whole).unwrap_or_default(),
            entry: PhantomData,
        }
    }

    /// Its physical address (0 if absent).
    pub fn paddr(&self) -> u64 {
        self.paddr
    }

    /// Its bytes (to keep the range out of an allocator, for instance).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.bytes.len() / T::LEN
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Entry `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<T> {
        let at = index.checked_mul(T::LEN)?;
        T::decode(bytes::slice_at(self.bytes, at, T::LEN)?).ok()
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = T> + 'a {
        self.bytes
            .chunks_exact(T::LEN)
            .filter_map(|chunk| T::decode(chunk).ok())
    }
}

/// Everything a PVH start info points at, read from loader memory.
#[derive(Clone, Copy, Debug)]
pub struct PvhBootInfo<'a> {
    /// Where the start info is.
    pub start_info_paddr: u64,
    /// The start info's fields.
    pub start_info: StartInfo,
    /// The boot modules (empty if `modlist_paddr` is 0).
    pub modules: Table<'a, ModlistEntry>,
    /// The memory map (empty if absent or version 0).
    pub memmap: Table<'a, MemmapEntry>,
}

/// Asks `read` for exactly `len` bytes at `paddr`; a reader that gives
/// fewer is treated as a refusal, one that gives more is cut to `len`.
fn read_exact<'a>(
    read: &mut impl FnMut(u64, usize) -> Option<&'a [u8]>,
    paddr: u64,
    len: usize,
) -> Result<&'a [u8], PvhError> {
    let unreadable = PvhError::Unreadable { paddr, len };
    u64::try_from(len)
        .ok()
        .and_then(|len| paddr.checked_add(len))
        .ok_or(unreadable)?;
    read(paddr, len)
        .and_then(|bytes| bytes.get(..len))
        .ok_or(unreadable)
}

/// Reads a table of `count` entries at `paddr` (absent if `paddr` is 0).
fn read_table<'a, T: WireEntry>(
    read: &mut impl FnMut(u64, usize) -> Option<&'a [u8]>,
    paddr: u64,
    count: u32,
) -> Result<Table<'a, T>, PvhError> {
    if paddr == 0 || count == 0 {
        return Ok(Table::empty());
    }
    let too_large = PvhError::TableTooLarge {
        table: T::TABLE,
        paddr,
        count,
    };
    let len = usize::try_from(count)
        .ok()
        .and_then(|count| count.checked_mul(T::LEN))
        .ok_or(too_large)?;
    u64::try_from(len)
        .ok()
        .and_then(|len| paddr.checked_add(len))
        .ok_or(too_large)?;
    Ok(Table::new(paddr, read_exact(read, paddr, len)?))
}

/// Reads the start info at `start_info_paddr` and the module list and
/// memory map it points at, through `read(paddr, len)`, which returns the
/// `len` bytes of loader memory at `paddr` or `None` if they cannot be read
/// (outside RAM, outside the identity map, ...).
///
/// Counts are checked before use: a table whose length or end overflows is
/// refused, and one the reader refuses is an error, never a shorter table.
/// Strings are read separately, with [`read_c_string`].
pub fn decode<'a>(
    start_info_paddr: u64,
    mut read: impl FnMut(u64, usize) -> Option<&'a [u8]>,
) -> Result<PvhBootInfo<'a>, PvhError> {
    let head = read_exact(&mut read, start_info_paddr, START_INFO_V0_LEN)?;
    let version = bytes::u32_at(head, start::VERSION).unwrap_or(0);
    let magic = bytes::u32_at(head, start::MAGIC).unwrap_or(0);
    if magic != START_INFO_MAGIC {
        return Err(PvhError::BadMagic(magic));
    }
    let whole = read_exact(
        &mut read,
        start_info_paddr,
        StartInfo::len_for_version(version),
    )?;
    let start_info = StartInfo::decode(whole)?;
    let modules = read_table(&mut read, start_info.modlist_paddr, start_info.nr_modules)?;
    let memmap = read_table(
        &mut read,
        start_info.memmap_paddr,
        start_info.memmap_entries,
    )?;
    Ok(PvhBootInfo {
        start_info_paddr,
        start_info,
        modules,
        memmap,
    })
}

/// Reads the NUL-terminated string at `paddr` through `read` (as for
/// [`decode`]) and returns its bytes without the NUL; an address of 0 is
/// the empty string. At most `max` bytes before the NUL are accepted.
///
/// The string is searched for in steps that never cross a 4 KiB boundary,
/// so the reader is never asked for a page past the one the NUL is in.
pub fn read_c_string<'a>(
    paddr: u64,
    max: usize,
    mut read: impl FnMut(u64, usize) -> Option<&'a [u8]>,
) -> Result<&'a [u8], PvhError> {
    const PAGE: u64 = 4096;
    if paddr == 0 {
        return Ok(&[]);
    }
    let too_long = PvhError::StringTooLong { paddr, max };
    let mut len = 0usize;
    loop {
        let at = u64::try_from(len)
            .ok()
            .and_then(|len| paddr.checked_add(len))
            .ok_or(too_long)?;
        // Up to the end of this page, and at most one byte past `max`
        // (`len <= max` holds here: the loop leaves as soon as it does not).
        let to_page_end = usize::try_from(PAGE - at % PAGE).unwrap_or(usize::MAX);
        let budget = max.saturating_sub(len).saturating_add(1);
        let step = to_page_end.min(budget);
        let chunk = read_exact(&mut read, at, step)?;
        if let Some(nul) = chunk.iter().position(|&byte| byte == 0) {
            let total = len.checked_add(nul).ok_or(too_long)?;
            if total > max {
                return Err(too_long);
            }
            return read_exact(&mut read, paddr, total);
        }
        len = len.checked_add(step).ok_or(too_long)?;
        if len > max {
            return Err(too_long);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loader memory from `base` on, readable only inside.
    struct Memory {
        base: u64,
        bytes: Vec<u8>,
    }

    impl Memory {
        fn new(base: u64, len: usize) -> Self {
            Self {
                base,
                bytes: vec![0; len],
            }
        }

        fn at(&mut self, paddr: u64) -> &mut [u8] {
            &mut self.bytes[(paddr - self.base) as usize..]
        }

        fn reader<'m>(&'m self) -> impl FnMut(u64, usize) -> Option<&'m [u8]> + 'm {
            |paddr, len| {
                let offset = usize::try_from(paddr.checked_sub(self.base)?).ok()?;
                bytes::slice_at(&self.bytes, offset, len)
            }
        }
    }

    const BASE: u64 = 0x10_0000;

    /// A start info at BASE, its command line, two modules and a 3-entry
    /// memory map, as QEMU lays them out.
    fn qemu_like() -> Memory {
        let mut memory = Memory::new(BASE, 0x3000);
        let info = StartInfo {
            version: 1,
            flags: 0,
            nr_modules: 2,
            modlist_paddr: BASE + 0x100,
            cmdline_paddr: BASE + 0x200,
            rsdp_paddr: 0xf_5000,
            memmap_paddr: BASE + 0x400,
            memmap_entries: 3,
        };
        info.encode(memory.at(BASE)).unwrap();
        let modules = [
            ModlistEntry {
                paddr: 0x20_0000,
                size: 0x1234,
                cmdline_paddr: BASE + 0x300,
            },
            ModlistEntry {
                paddr: 0x40_0000,
                size: 0x10,
                cmdline_paddr: 0,
            },
        ];
        for (i, module) in modules.iter().enumerate() {
            module
                .encode(memory.at(BASE + 0x100 + (i * MODLIST_ENTRY_LEN) as u64))
                .unwrap();
        }
        memory.at(BASE + 0x200)[..12].copy_from_slice(b"log=debug x\0");
        memory.at(BASE + 0x300)[..8].copy_from_slice(b"capture\0");
        let map = [
            MemmapEntry {
                addr: 0,
                size: 0x9_fc00,
                kind: 1,
            },
            MemmapEntry {
                addr: 0xf_0000,
                size: 0x1_0000,
                kind: 2,
            },
            MemmapEntry {
                addr: 0x10_0000,
                size: 0x7ff0_0000,
                kind: 1,
            },
        ];
        for (i, entry) in map.iter().enumerate() {
            entry
                .encode(memory.at(BASE + 0x400 + (i * MEMMAP_ENTRY_LEN) as u64))
                .unwrap();
        }
        memory
    }

    #[test]
    fn start_info_round_trips_at_the_abi_offsets() {
        let info = StartInfo {
            version: 1,
            flags: 0x11,
            nr_modules: 2,
            modlist_paddr: 0x1122_3344_5566_7788,
            cmdline_paddr: 0x8000,
            rsdp_paddr: 0xe_0000,
            memmap_paddr: 0x9000,
            memmap_entries: 7,
        };
        let mut out = [0xAAu8; START_INFO_LEN];
        info.encode(&mut out).unwrap();
        assert_eq!(&out[0..4], &0x336e_c578u32.to_le_bytes());
        assert_eq!(&out[4..8], &1u32.to_le_bytes());
        assert_eq!(&out[12..16], &2u32.to_le_bytes());
        assert_eq!(&out[16..24], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&out[40..48], &0x9000u64.to_le_bytes());
        assert_eq!(&out[48..52], &7u32.to_le_bytes());
        assert_eq!(&out[52..56], &[0; 4], "reserved is zeroed");
        assert_eq!(StartInfo::decode(&out), Ok(info));
        let mut short = [0u8; START_INFO_LEN - 1];
        assert_eq!(info.encode(&mut short), Err(OutOfBounds));
        assert_eq!(short, [0; START_INFO_LEN - 1], "nothing written");
    }

    #[test]
    fn version_0_has_no_memory_map_and_is_40_bytes() {
        let mut out = [0u8; START_INFO_LEN];
        StartInfo {
            version: 0,
            memmap_paddr: 0x9000,
            memmap_entries: 3,
            ..StartInfo::default()
        }
        .encode(&mut out)
        .unwrap();
        let info = StartInfo::decode(&out[..START_INFO_V0_LEN]).unwrap();
        assert_eq!((info.memmap_paddr, info.memmap_entries), (0, 0));
        out[4] = 1;
        assert_eq!(
            StartInfo::decode(&out[..START_INFO_V0_LEN]),
            Err(PvhError::Truncated {
                needed: START_INFO_LEN,
                len: START_INFO_V0_LEN
            })
        );
        assert_eq!(StartInfo::decode(&out).unwrap().memmap_entries, 3);
        out[0] ^= 1;
        assert_eq!(
            StartInfo::decode(&out),
            Err(PvhError::BadMagic(0x336e_c579))
        );
    }

    #[test]
    fn entries_round_trip_at_the_abi_offsets() {
        let module = ModlistEntry {
            paddr: 1,
            size: 2,
            cmdline_paddr: 3,
        };
        let mut out = [0xFFu8; MODLIST_ENTRY_LEN];
        module.encode(&mut out).unwrap();
        assert_eq!(&out[16..24], &3u64.to_le_bytes());
        assert_eq!(&out[24..32], &[0; 8]);
        assert_eq!(ModlistEntry::decode(&out), Ok(module));
        let entry = MemmapEntry {
            addr: 0x1000,
            size: 0x2000,
            kind: 4,
        };
        let mut out = [0xFFu8; MEMMAP_ENTRY_LEN];
        entry.encode(&mut out).unwrap();
        assert_eq!(&out[16..20], &4u32.to_le_bytes());
        assert_eq!(&out[20..24], &[0; 4]);
        assert_eq!(MemmapEntry::decode(&out), Ok(entry));
        assert!(MemmapEntry::decode(&out[..23]).is_err());
        assert_eq!(entry.encode(&mut [0u8; 23]), Err(OutOfBounds));
    }

    #[test]
    fn decode_reads_everything_the_start_info_points_at() {
        let memory = qemu_like();
        let boot = decode(BASE, memory.reader()).unwrap();
        assert_eq!(boot.start_info.rsdp_paddr, 0xf_5000);
        assert_eq!(boot.modules.len(), 2);
        assert_eq!(boot.modules.paddr(), BASE + 0x100);
        assert_eq!(boot.modules.bytes().len(), 2 * MODLIST_ENTRY_LEN);
        let first = boot.modules.get(0).unwrap();
        assert_eq!((first.paddr, first.size), (0x20_0000, 0x1234));
        assert_eq!(boot.modules.get(2), None);
        let map: Vec<_> = boot.memmap.iter().collect();
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].size, 0x7ff0_0000);
        assert_eq!(
            read_c_string(boot.start_info.cmdline_paddr, 4096, memory.reader()),
            Ok(&b"log=debug x"[..])
        );
        assert_eq!(
            read_c_string(first.cmdline_paddr, 4096, memory.reader()),
            Ok(&b"capture"[..])
        );
        assert_eq!(read_c_string(0, 4096, memory.reader()), Ok(&b""[..]));
    }

    #[test]
    fn absent_tables_are_empty() {
        let mut memory = qemu_like();
        let mut info = StartInfo::decode(memory.at(BASE)).unwrap();
        info.modlist_paddr = 0;
        info.memmap_entries = 0;
        info.encode(memory.at(BASE)).unwrap();
        let boot = decode(BASE, memory.reader()).unwrap();
        assert!(boot.modules.is_empty() && boot.memmap.is_empty());
        assert_eq!(boot.memmap.iter().count(), 0);
    }

    #[test]
    fn counts_past_readable_memory_are_refused_not_cut() {
        let mut memory = qemu_like();
        let mut info = StartInfo::decode(memory.at(BASE)).unwrap();
        // 0x3000 bytes of memory: 0x400 + 600 * 24 runs past them.
        info.memmap_entries = 600;
        info.encode(memory.at(BASE)).unwrap();
        assert_eq!(
            decode(BASE, memory.reader()).unwrap_err(),
            PvhError::Unreadable {
                paddr: BASE + 0x400,
                len: 600 * MEMMAP_ENTRY_LEN
            }
        );
        info.memmap_entries = 3;
        info.nr_modules = u32::MAX;
        info.encode(memory.at(BASE)).unwrap();
        assert!(matches!(
            decode(BASE, memory.reader()).unwrap_err(),
            PvhError::Unreadable { .. }
        ));
        info.nr_modules = 1;
        info.modlist_paddr = u64::MAX - 8;
        info.encode(memory.at(BASE)).unwrap();
        assert_eq!(
            decode(BASE, memory.reader()).unwrap_err(),
            PvhError::TableTooLarge {
                table: "module list",
                paddr: u64::MAX - 8,
                count: 1
            }
        );
    }

    #[test]
    fn a_start_info_that_cannot_be_read_or_has_a_wrong_magic_is_refused() {
        let memory = qemu_like();
        assert_eq!(
            decode(BASE + 0x3000 - 20, memory.reader()).unwrap_err(),
            PvhError::Unreadable {
                paddr: BASE + 0x3000 - 20,
                len: START_INFO_V0_LEN
            }
        );
        assert_eq!(
            decode(BASE + 0x200, memory.reader()).unwrap_err(),
            PvhError::BadMagic(u32::from_le_bytes(*b"log="))
        );
        assert!(decode(u64::MAX - 4, memory.reader()).is_err());
        // A reader that hands back too few bytes is a refusal.
        let short = |_: u64, _: usize| Some(&[0x78u8, 0xc5, 0x6e, 0x33][..]);
        assert!(matches!(
            decode(BASE, short),
            Err(PvhError::Unreadable { .. })
        ));
    }

    #[test]
    fn strings_stop_at_their_nul_and_never_read_a_page_past_it() {
        // Readable memory ends at 0x3000; the string crosses into its last
        // page and ends on the last byte, so any read past that page fails.
        let mut memory = Memory::new(0x1000, 0x2000);
        memory.at(0x2000 - 2)[..2].copy_from_slice(b"ab");
        memory.at(0x2000)[..0xfff].fill(b'c');
        let text = read_c_string(0x2000 - 2, 0x2000, memory.reader()).unwrap();
        assert_eq!(text.len(), 2 + 0xfff);
        assert!(text.starts_with(b"abccc") && text.ends_with(b"ccc"));
        assert_eq!(
            read_c_string(0x2000, usize::MAX, memory.reader()).map(<[u8]>::len),
            Ok(0xfff)
        );
        // Exactly `max` is fine, one less is too long.
        assert_eq!(
            read_c_string(0x2000, 0xfff, memory.reader()).map(<[u8]>::len),
            Ok(0xfff)
        );
        assert_eq!(
            read_c_string(0x2000, 0xffe, memory.reader()),
            Err(PvhError::StringTooLong {
                paddr: 0x2000,
                max: 0xffe
            })
        );
        assert_eq!(
            read_c_string(0x1ffe, 16, memory.reader()),
            Err(PvhError::StringTooLong {
                paddr: 0x1ffe,
                max: 16
            })
        );
        // Without a NUL before the end of memory: unreadable, not cut.
        memory.at(0x2fff)[0] = b'c';
        assert_eq!(
            read_c_string(0x2000, 0x10_0000, memory.reader()),
            Err(PvhError::Unreadable {
                paddr: 0x3000,
                len: 0x1000
            })
        );
        assert!(read_c_string(u64::MAX - 1, 16, memory.reader()).is_err());
    }

    #[test]
    fn every_error_has_a_message() {
        for error in [
            PvhError::BadMagic(1),
            PvhError::Truncated { needed: 2, len: 1 },
            PvhError::Unreadable { paddr: 1, len: 2 },
            PvhError::TableTooLarge {
                table: "memory map",
                paddr: 1,
                count: 2,
            },
            PvhError::StringTooLong { paddr: 1, max: 2 },
        ] {
            assert!(error.to_string().len() > 10, "{error:?}");
        }
    }
}
