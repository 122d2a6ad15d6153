//! x86-64 four-level page tables, built and changed through a small trait.
//!
//! [`AddressSpace`] holds the physical address of a PML4 and changes the
//! tables under it only through [`TableMemory`]: allocate a zeroed frame,
//! read or write one 64-bit entry of a table. The kernel implements the
//! trait over identity-mapped physical memory; host tests implement it over
//! a map of fake frames and check the result with
//! [`AddressSpace::translate`], the same walk the MMU does.
//!
//! # What it can do
//! - [`AddressSpace::identity`] builds the kernel's identity map of
//!   `[0, end)` with 2 MiB pages, asking a closure for each 2 MiB page's
//!   [`Access`] (today: RAM write-back, device holes uncached, everything
//!   writable and executable).
//! - [`AddressSpace::map`] maps any page-aligned range with an [`Access`],
//!   using 2 MiB pages where virtual and physical addresses both allow it.
//! - [`AddressSpace::protect`] changes the access of a mapped range after the
//!   fact (hv's text read-only, its data and stacks no-execute, the crash
//!   reservation read-only after loading).
//! - [`AddressSpace::unmap`] removes a range (guard pages, the reservation).
//!
//! A large page that a range covers only in part is split first: a new
//! table of 512 smaller pages with the same translation and attributes
//! replaces it, so the rest of the large page is unchanged. Splits need
//! frames; nothing is ever merged back or freed (the kernel never frees
//! page tables, and [`TableMemory`] has no way to).
//!
//! # What the caller must do
//! - **NX needs `EFER.NXE`.** Bit 63 of an entry is reserved while
//!   `EFER.NXE` (MSR `0xC000_0080`, bit 11) is clear: every access through
//!   such an entry then faults with a reserved-bit page fault. Every CPU,
//!   the boot CPU and each AP in its trampoline, must set `EFER.NXE` before
//!   it loads tables built with `no_execute = true`. A CPU without NX
//!   (`CPUID.80000001h:EDX[20]` clear, or disabled by firmware in
//!   `IA32_MISC_ENABLE`) needs tables built with `no_execute = false`,
//!   which never set the bit.
//! - **Read-only needs `CR0.WP`** for it to hold in ring 0 (hv sets it).
//! - **TLBs.** Nothing here flushes. After [`AddressSpace::protect`] or
//!   [`AddressSpace::unmap`] on live tables, flush the changed pages
//!   (`invlpg`, or reload CR3) on this CPU and on every other CPU that runs
//!   on these tables.
//! - **Concurrency.** Not synchronized: one writer at a time. A walker (the
//!   MMU of another CPU) may run meanwhile: a split writes the whole new
//!   table before the entry that points to it, so every state a walker can
//!   see translates each page to the same frame as before.
//! - **Failure part-way.** Ranges are checked (alignment, limits, and for
//!   `protect` that every page is mapped) before anything is written. Only
//!   running out of frames can stop an operation half-way; the pages before
//!   that point have changed, the others have not, and every table stays
//!   well formed.

use core::fmt;

/// A 4 KiB page.
pub const PAGE_SIZE: u64 = 4096;
/// A 2 MiB page.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
/// A 1 GiB page: never created here, but split when found (adopted tables).
pub const HUGE_PAGE_SIZE: u64 = 1 << 30;
/// Entries in one table.
pub const ENTRIES: usize = 512;
/// Virtual addresses mapped here lie below this: the lower canonical half
/// of a 48-bit address space.
pub const VIRTUAL_LIMIT: u64 = 1 << 47;
/// Physical addresses have at most 52 bits.
pub const PHYSICAL_LIMIT: u64 = 1 << 52;

/// Bits of a page-table entry (Intel SDM Vol. 3A, 4.5).
pub mod entry {
    /// The entry is valid.
    pub const PRESENT: u64 = 1 << 0;
    /// Writes are allowed (with CR0.WP, also in ring 0).
    pub const WRITABLE: u64 = 1 << 1;
    /// Ring 3 may access: never set by this module.
    pub const USER: u64 = 1 << 2;
    /// Page-level write-through (PAT index bit 0).
    pub const WRITE_THROUGH: u64 = 1 << 3;
    /// Page-level cache disable (PAT index bit 1).
    pub const CACHE_DISABLE: u64 = 1 << 4;
    /// In a PDPT or PD entry: this entry maps a 1 GiB or 2 MiB page.
    pub const HUGE: u64 = 1 << 7;
    /// In a 4 KiB page's entry: PAT index bit 2.
    pub const PAT_SMALL: u64 = 1 << 7;
    /// In a 1 GiB or 2 MiB page's entry: PAT index bit 2.
    pub const PAT_LARGE: u64 = 1 << 12;
    /// Instruction fetches are not allowed (needs EFER.NXE).
    pub const NO_EXECUTE: u64 = 1 << 63;
    /// The address bits of an entry that points to a table or a 4 KiB page.
    pub const ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;
}

/// Memory that holds page tables: physical frames addressed by their
/// physical address.
///
/// [`AddressSpace`] only passes `table` values it got from
/// [`TableMemory::alloc_table`], the root given to
/// [`AddressSpace::from_root`], or addresses read from the entries of those
/// tables, and `index < ENTRIES`. An implementation over raw physical
/// memory relies on that.
pub trait TableMemory {
    /// A zeroed, 4 KiB-aligned frame for a new table, or `None` when memory
    /// is exhausted.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Entry `index` of the table at physical address `table`.
    fn read_entry(&self, table: u64, index: usize) -> u64;
    /// Sets entry `index` of the table at `table`. A single aligned 64-bit
    /// store, so a concurrent walker sees the old or the new entry.
    fn write_entry(&mut self, table: u64, index: usize, value: u64);
}

/// How a page is cached (with the power-on PAT: index 0 WB, 1 WT, 3 UC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Caching {
    /// Write-back: RAM.
    WriteBack,
    /// Write-through.
    WriteThrough,
    /// Uncached: device registers (the APICs, the HPET, PCI holes).
    Uncached,
}

/// What a mapping allows. Every mapping is supervisor-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// Writes are allowed.
    pub writable: bool,
    /// Instruction fetches are allowed.
    pub executable: bool,
    /// How the page is cached.
    pub caching: Caching,
}

impl Access {
    /// What hv maps all RAM with today: read, write, execute, write-back.
    pub const RWX: Self = Self {
        writable: true,
        executable: true,
        caching: Caching::WriteBack,
    };
    /// Code: read and execute.
    pub const TEXT: Self = Self {
        writable: false,
        executable: true,
        caching: Caching::WriteBack,
    };
    /// Constants, and memory that must not change (a loaded capture image).
    pub const READ_ONLY: Self = Self {
        writable: false,
        executable: false,
        caching: Caching::WriteBack,
    };
    /// Data and stacks: read and write, no execute.
    pub const DATA: Self = Self {
        writable: true,
        executable: false,
        caching: Caching::WriteBack,
    };
    /// Device registers: read, write, no execute, uncached.
    pub const DEVICE: Self = Self {
        writable: true,
        executable: false,
        caching: Caching::Uncached,
    };
    /// What hv maps device holes with today: uncached, but executable.
    pub const DEVICE_RWX: Self = Self {
        writable: true,
        executable: true,
        caching: Caching::Uncached,
    };

    /// The attribute bits of a leaf entry (not PRESENT, HUGE or PAT).
    fn bits(self, no_execute: bool) -> u64 {
        let mut bits = 0;
        if self.writable {
            bits |= entry::WRITABLE;
        }
        if !self.executable && no_execute {
            bits |= entry::NO_EXECUTE;
        }
        bits |= match self.caching {
            Caching::WriteBack => 0,
            Caching::WriteThrough => entry::WRITE_THROUGH,
            Caching::Uncached => entry::CACHE_DISABLE | entry::WRITE_THROUGH,
        };
        bits
    }
}

/// The size of a page a translation went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB.
    Small,
    /// 2 MiB.
    Large,
    /// 1 GiB.
    Huge,
}

impl PageSize {
    /// Bytes.
    pub fn bytes(self) -> u64 {
        match self {
            Self::Small => PAGE_SIZE,
            Self::Large => LARGE_PAGE_SIZE,
            Self::Huge => HUGE_PAGE_SIZE,
        }
    }
}

/// What the MMU would do with one virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address the virtual address maps to.
    pub physical: u64,
    /// The page it lies in.
    pub page_size: PageSize,
    /// The effective access: writable only if every level allows writes,
    /// executable only if no level forbids it.
    pub access: Access,
}

/// Why a mapping change failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingError {
    /// No frame was left for a page table.
    OutOfFrames,
    /// An address or length is not a multiple of 4 KiB.
    Unaligned(u64),
    /// A range wraps, or reaches past [`VIRTUAL_LIMIT`] (virtual) or
    /// [`PHYSICAL_LIMIT`] (physical). Holds the range's start.
    OutOfRange(u64),
    /// `protect` found this page unmapped.
    NotMapped(u64),
}

impl fmt::Display for PagingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfFrames => f.write_str("no frame left for a page table"),
            Self::Unaligned(value) => write!(f, "{value:#x} is not a multiple of 4 KiB"),
            Self::OutOfRange(start) => {
                write!(
                    f,
                    "the range at {start:#x} wraps or is beyond the address limit"
                )
            }
            Self::NotMapped(address) => write!(f, "{address:#x} is not mapped"),
        }
    }
}

/// What one pass over a range does to each page.
#[derive(Clone, Copy)]
enum Op {
    /// Map `virtual_start + n` to `physical_start + n`.
    Map {
        virtual_start: u64,
        physical_start: u64,
        access: Access,
    },
    /// Fail at the first unmapped page; change nothing.
    CheckMapped,
    /// Replace the access of mapped pages.
    Protect(Access),
    /// Remove every mapping.
    Unmap,
}

/// Bytes one entry of a table at `level` covers (0 = page table).
const fn entry_size(level: u32) -> u64 {
    PAGE_SIZE << (9 * level)
}

fn index(address: u64, level: u32) -> usize {
    ((address >> (12 + 9 * level)) & 0x1FF) as usize
}

/// Whether `value` is a leaf at `level`.
fn is_leaf(value: u64, level: u32) -> bool {
    level == 0 || value & entry::HUGE != 0
}

/// The frame (or large page) an entry at `level` points to.
fn entry_address(value: u64, level: u32) -> u64 {
    if is_leaf(value, level) {
        value & entry::ADDRESS & !(entry_size(level) - 1)
    } else {
        value & entry::ADDRESS
    }
}

/// The access bits that `protect` replaces.
const ACCESS_BITS: u64 =
    entry::WRITABLE | entry::NO_EXECUTE | entry::CACHE_DISABLE | entry::WRITE_THROUGH;

/// A four-level address space.
#[derive(Debug)]
pub struct AddressSpace {
    root: u64,
    no_execute: bool,
}

impl AddressSpace {
    /// Empty tables. `no_execute`: whether non-executable mappings set bit
    /// 63 (see the module docs: needs EFER.NXE on every CPU that uses them);
    /// when false every mapping is executable.
    pub fn new(memory: &mut impl TableMemory, no_execute: bool) -> Result<Self, PagingError> {
        let root = memory.alloc_table().ok_or(PagingError::OutOfFrames)?;
        Ok(Self { root, no_execute })
    }

    /// Adopts existing tables rooted at `root`, which must be well formed
    /// and live in `memory`.
    pub fn from_root(root: u64, no_execute: bool) -> Self {
        Self { root, no_execute }
    }

    /// The PML4's physical address: the value for CR3.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Whether non-executable mappings set the NX bit.
    pub fn no_execute(&self) -> bool {
        self.no_execute
    }

    /// Identity-maps `[0, end)` (`end` rounded up to 2 MiB) with 2 MiB
    /// pages; `access(start, end)` gives each 2 MiB page's access, or `None`
    /// to leave it unmapped. hv's map today is
    /// `identity(memory, max(RAM end, 4 GiB), false, |s, e| Some(if is_ram(s, e) { Access::RWX } else { Access::DEVICE_RWX }))`.
    pub fn identity(
        memory: &mut impl TableMemory,
        end: u64,
        no_execute: bool,
        mut access: impl FnMut(u64, u64) -> Option<Access>,
    ) -> Result<Self, PagingError> {
        let mut space = Self::new(memory, no_execute)?;
        let end = end
            .checked_next_multiple_of(LARGE_PAGE_SIZE)
            .filter(|&end| end <= VIRTUAL_LIMIT)
            .ok_or(PagingError::OutOfRange(0))?;
        let mut start = 0;
        while start < end {
            let next = start + LARGE_PAGE_SIZE;
            if let Some(access) = access(start, next) {
                space.map(memory, start, start, LARGE_PAGE_SIZE, access)?;
            }
            start = next;
        }
        Ok(space)
    }

    /// Maps `[virtual_start, virtual_start + len)` to physical memory from
    /// `physical_start` on, replacing whatever was mapped there. Uses 2 MiB
    /// pages where both addresses are 2 MiB-aligned and the range covers
    /// the whole page.
    pub fn map(
        &mut self,
        memory: &mut impl TableMemory,
        virtual_start: u64,
        physical_start: u64,
        len: u64,
        access: Access,
    ) -> Result<(), PagingError> {
        let end = check_range(virtual_start, len, VIRTUAL_LIMIT)?;
        check_range(physical_start, len, PHYSICAL_LIMIT)?;
        let op = Op::Map {
            virtual_start,
            physical_start,
            access,
        };
        self.apply(memory, self.root, 3, virtual_start, end, op)
    }

    /// Identity-maps `[start, start + len)`.
    pub fn map_identity(
        &mut self,
        memory: &mut impl TableMemory,
        start: u64,
        len: u64,
        access: Access,
    ) -> Result<(), PagingError> {
        self.map(memory, start, start, len, access)
    }

    /// Gives every page of `[start, start + len)` the access `access`,
    /// keeping its translation. Every page must be mapped; if one is not,
    /// nothing changes and the error names it.
    pub fn protect(
        &mut self,
        memory: &mut impl TableMemory,
        start: u64,
        len: u64,
        access: Access,
    ) -> Result<(), PagingError> {
        let end = check_range(start, len, VIRTUAL_LIMIT)?;
        self.apply(memory, self.root, 3, start, end, Op::CheckMapped)?;
        self.apply(memory, self.root, 3, start, end, Op::Protect(access))
    }

    /// Unmaps every page of `[start, start + len)`; pages already unmapped
    /// are fine.
    pub fn unmap(
        &mut self,
        memory: &mut impl TableMemory,
        start: u64,
        len: u64,
    ) -> Result<(), PagingError> {
        let end = check_range(start, len, VIRTUAL_LIMIT)?;
        self.apply(memory, self.root, 3, start, end, Op::Unmap)
    }

    /// Walks the tables for `virtual_address` as the MMU does. `None` if it
    /// is not mapped (or not canonical).
    pub fn translate(
        &self,
        memory: &impl TableMemory,
        virtual_address: u64,
    ) -> Option<Translation> {
        if virtual_address >= VIRTUAL_LIMIT {
            return None;
        }
        let mut table = self.root;
        let mut writable = true;
        let mut executable = true;
        for level in (0..=3).rev() {
            let value = memory.read_entry(table, index(virtual_address, level));
            if value & entry::PRESENT == 0 {
                return None;
            }
            writable &= value & entry::WRITABLE != 0;
            executable &= !(self.no_execute && value & entry::NO_EXECUTE != 0);
            if level < 3 && is_leaf(value, level) {
                let size = entry_size(level);
                let caching = match (
                    value & entry::CACHE_DISABLE != 0,
                    value & entry::WRITE_THROUGH != 0,
                ) {
                    (true, _) => Caching::Uncached,
                    (false, true) => Caching::WriteThrough,
                    (false, false) => Caching::WriteBack,
                };
                return Some(Translation {
                    physical: entry_address(value, level) + (virtual_address & (size - 1)),
                    page_size: match level {
                        0 => PageSize::Small,
                        1 => PageSize::Large,
                        _ => PageSize::Huge,
                    },
                    access: Access {
                        writable,
                        executable,
                        caching,
                    },
                });
            }
            table = value & entry::ADDRESS;
        }
        None
    }

    /// Applies `op` to `[start, end)`, which lies inside the range `table`
    /// (at `level`) covers.
    fn apply(
        &self,
        memory: &mut impl TableMemory,
        table: u64,
        level: u32,
        start: u64,
        end: u64,
        op: Op,
    ) -> Result<(), PagingError> {
        let size = entry_size(level);
        let mut address = start;
        while address < end {
            let slot = index(address, level);
            let entry_start = address & !(size - 1);
            let chunk_end = end.min(entry_start + size);
            let whole = address == entry_start && chunk_end == entry_start + size;
            let value = memory.read_entry(table, slot);
            let present = value & entry::PRESENT != 0;
            // A PML4 entry is never a leaf (bit 7 is reserved there).
            let leaf = present && level < 3 && is_leaf(value, level);
            match op {
                Op::Map {
                    virtual_start,
                    physical_start,
                    access,
                } => {
                    let physical = physical_start + (address - virtual_start);
                    if whole && level <= 1 && physical.is_multiple_of(size) {
                        let huge = if level == 1 { entry::HUGE } else { 0 };
                        let new = physical | entry::PRESENT | huge | access.bits(self.no_execute);
                        memory.write_entry(table, slot, new);
                    } else {
                        let next = self.descend(memory, table, slot, level)?;
                        self.apply(memory, next, level - 1, address, chunk_end, op)?;
                    }
                }
                Op::CheckMapped => {
                    if !present {
                        return Err(PagingError::NotMapped(address));
                    }
                    if !leaf {
                        let next = value & entry::ADDRESS;
                        self.apply(memory, next, level - 1, address, chunk_end, op)?;
                    }
                }
                Op::Protect(access) => {
                    if leaf && whole {
                        let new = (value & !ACCESS_BITS) | access.bits(self.no_execute);
                        memory.write_entry(table, slot, new);
                    } else if present {
                        let next = self.descend(memory, table, slot, level)?;
                        self.apply(memory, next, level - 1, address, chunk_end, op)?;
                    }
                }
                Op::Unmap => {
                    if whole {
                        // A table this pointed to is no longer reachable
                        // and is not freed (see the module docs).
                        memory.write_entry(table, slot, 0);
                    } else if present {
                        let next = self.descend(memory, table, slot, level)?;
                        self.apply(memory, next, level - 1, address, chunk_end, op)?;
                    }
                }
            }
            address = chunk_end;
        }
        Ok(())
    }

    /// The table entry `slot` of `table` (at `level` > 0) points to:
    /// created empty if the entry is not present, made by splitting if it
    /// is a large page.
    fn descend(
        &self,
        memory: &mut impl TableMemory,
        table: u64,
        slot: usize,
        level: u32,
    ) -> Result<u64, PagingError> {
        let value = memory.read_entry(table, slot);
        if value & entry::PRESENT == 0 {
            let next = memory.alloc_table().ok_or(PagingError::OutOfFrames)?;
            memory.write_entry(table, slot, next | entry::PRESENT | entry::WRITABLE);
            return Ok(next);
        }
        if level == 3 || !is_leaf(value, level) {
            return Ok(value & entry::ADDRESS);
        }
        // Split: 512 pages of the next size down, same frames, same bits.
        let next = memory.alloc_table().ok_or(PagingError::OutOfFrames)?;
        let base = entry_address(value, level);
        let pat = value & entry::PAT_LARGE != 0;
        let mut flags = value & !entry::ADDRESS & !entry::HUGE;
        let child_size = entry_size(level - 1);
        if level - 1 == 0 {
            if pat {
                flags |= entry::PAT_SMALL;
            }
        } else {
            flags |= entry::HUGE;
            if pat {
                flags |= entry::PAT_LARGE;
            }
        }
        for child in 0..ENTRIES {
            memory.write_entry(next, child, (base + child as u64 * child_size) | flags);
        }
        // Published only once complete: a concurrent walk sees the large
        // page or the full table, both with the same translations.
        memory.write_entry(table, slot, next | entry::PRESENT | entry::WRITABLE);
        Ok(next)
    }
}

/// Checks that `[start, start + len)` is page-aligned, does not wrap and
/// ends at or below `limit`; returns its end.
fn check_range(start: u64, len: u64, limit: u64) -> Result<u64, PagingError> {
    if !start.is_multiple_of(PAGE_SIZE) {
        return Err(PagingError::Unaligned(start));
    }
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(PagingError::Unaligned(len));
    }
    start
        .checked_add(len)
        .filter(|&end| end <= limit)
        .ok_or(PagingError::OutOfRange(start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::vec::Vec;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// Page tables in a hash map; every access to something that is not a
    /// table panics, so a walk into a bad address fails the test.
    struct FakeMemory {
        tables: HashMap<u64, [u64; ENTRIES]>,
        next_frame: u64,
        frames_left: usize,
    }

    impl FakeMemory {
        fn new(frames: usize) -> Self {
            Self {
                tables: HashMap::new(),
                // Far from any address the tests map, so a table address
                // taken for a data page would stand out.
                next_frame: 0x7_0000_0000,
                frames_left: frames,
            }
        }

        fn allocated(&self) -> usize {
            self.tables.len()
        }
    }

    impl TableMemory for FakeMemory {
        fn alloc_table(&mut self) -> Option<u64> {
            self.frames_left = self.frames_left.checked_sub(1)?;
            let frame = self.next_frame;
            self.next_frame += PAGE_SIZE;
            self.tables.insert(frame, [0; ENTRIES]);
            Some(frame)
        }

        fn read_entry(&self, table: u64, index: usize) -> u64 {
            self.tables.get(&table).expect("read of a non-table")[index]
        }

        fn write_entry(&mut self, table: u64, index: usize, value: u64) {
            self.tables.get_mut(&table).expect("write to a non-table")[index] = value;
        }
    }

    /// hv's map today over a QEMU-like layout: RAM to 3 GiB, a device hole
    /// to 4 GiB, RAM to 6 GiB.
    fn kernel_like(memory: &mut FakeMemory, no_execute: bool) -> AddressSpace {
        let is_ram = |start: u64, _end: u64| !(3 * GIB..4 * GIB).contains(&start);
        AddressSpace::identity(memory, 6 * GIB, no_execute, |start, end| {
            Some(if is_ram(start, end) {
                Access::RWX
            } else {
                Access::DEVICE_RWX
            })
        })
        .unwrap()
    }

    fn translate(space: &AddressSpace, memory: &FakeMemory, address: u64) -> Option<Translation> {
        space.translate(memory, address)
    }

    /// Every 4 KiB page of `[start, end)` translates to itself with `access`.
    fn assert_identity(
        space: &AddressSpace,
        memory: &FakeMemory,
        start: u64,
        end: u64,
        access: Access,
    ) {
        for page in (start..end).step_by(PAGE_SIZE as usize) {
            let translation = translate(space, memory, page + 0x123)
                .unwrap_or_else(|| panic!("{page:#x} not mapped"));
            assert_eq!(translation.physical, page + 0x123, "{page:#x}");
            assert_eq!(translation.access, access, "{page:#x}");
        }
    }

    fn assert_unmapped(space: &AddressSpace, memory: &FakeMemory, start: u64, end: u64) {
        for page in (start..end).step_by(PAGE_SIZE as usize) {
            assert_eq!(translate(space, memory, page), None, "{page:#x}");
        }
    }

    #[test]
    fn identity_map_uses_large_pages_and_uncaches_device_holes() {
        let mut memory = FakeMemory::new(64);
        let space = kernel_like(&mut memory, false);
        // PML4 + one PDPT + six page directories.
        assert_eq!(memory.allocated(), 8);
        for address in [0, 0x1234_5678, 3 * GIB - 1, 4 * GIB, 6 * GIB - 1] {
            let translation = translate(&space, &memory, address).unwrap();
            assert_eq!(translation.physical, address);
            assert_eq!(translation.page_size, PageSize::Large);
            assert_eq!(translation.access, Access::RWX, "{address:#x}");
        }
        for address in [3 * GIB, 0xfee0_0000, 0xfed0_00f0, 4 * GIB - 1] {
            let translation = translate(&space, &memory, address).unwrap();
            assert_eq!(
                translation.access.caching,
                Caching::Uncached,
                "{address:#x}"
            );
        }
        assert_eq!(translate(&space, &memory, 6 * GIB), None);
        assert_eq!(translate(&space, &memory, VIRTUAL_LIMIT + 4096), None);
    }

    #[test]
    fn identity_end_is_rounded_up_to_a_large_page() {
        let mut memory = FakeMemory::new(8);
        let space =
            AddressSpace::identity(&mut memory, 5 * MIB, true, |_, _| Some(Access::DATA)).unwrap();
        assert!(translate(&space, &memory, 6 * MIB - 1).is_some());
        assert_eq!(translate(&space, &memory, 6 * MIB), None);
    }

    #[test]
    fn identity_can_leave_pages_unmapped() {
        let mut memory = FakeMemory::new(8);
        let space = AddressSpace::identity(&mut memory, 8 * MIB, true, |start, _| {
            (start != 2 * MIB).then_some(Access::DATA)
        })
        .unwrap();
        assert!(translate(&space, &memory, 2 * MIB - 1).is_some());
        assert_unmapped(&space, &memory, 2 * MIB, 4 * MIB);
        assert!(translate(&space, &memory, 4 * MIB).is_some());
    }

    #[test]
    fn guard_page_is_unmapped_and_its_neighbours_keep_their_mapping() {
        let mut memory = FakeMemory::new(64);
        let mut space = kernel_like(&mut memory, false);
        let before = memory.allocated();
        let guard = 2 * GIB + 6 * MIB + 5 * PAGE_SIZE;
        space.unmap(&mut memory, guard, PAGE_SIZE).unwrap();
        // Splitting the 2 MiB page took exactly one page table.
        assert_eq!(memory.allocated(), before + 1);
        assert_eq!(translate(&space, &memory, guard), None);
        assert_eq!(translate(&space, &memory, guard + PAGE_SIZE - 1), None);
        let large = guard & !(LARGE_PAGE_SIZE - 1);
        assert_identity(&space, &memory, large, guard, Access::RWX);
        assert_identity(
            &space,
            &memory,
            guard + PAGE_SIZE,
            large + LARGE_PAGE_SIZE,
            Access::RWX,
        );
        assert_eq!(
            translate(&space, &memory, large).unwrap().page_size,
            PageSize::Small
        );
        // The neighbouring large pages were not split.
        for other in [large - LARGE_PAGE_SIZE, large + LARGE_PAGE_SIZE] {
            assert_eq!(
                translate(&space, &memory, other).unwrap().page_size,
                PageSize::Large
            );
        }
        // A second guard in the same large page needs no new table.
        space
            .unmap(&mut memory, guard + 8 * PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        assert_eq!(memory.allocated(), before + 1);
        // Unmapping again is harmless.
        space.unmap(&mut memory, guard, PAGE_SIZE).unwrap();
    }

    #[test]
    fn split_keeps_uncached_device_pages_uncached() {
        let mut memory = FakeMemory::new(64);
        let mut space = kernel_like(&mut memory, false);
        space.unmap(&mut memory, 0xfec0_1000, PAGE_SIZE).unwrap();
        let neighbour = translate(&space, &memory, 0xfec0_0000).unwrap();
        assert_eq!(neighbour.access, Access::DEVICE_RWX);
        assert_eq!(neighbour.page_size, PageSize::Small);
    }

    #[test]
    fn kernel_image_gets_read_only_text_and_no_execute_data() {
        let mut memory = FakeMemory::new(64);
        let mut space = kernel_like(&mut memory, true);
        // An image at 1 MiB: text, read-only data, then data and stacks
        // running into the next large page.
        let text = (MIB, MIB + 600 * 1024);
        let rodata = (text.1, text.1 + 200 * 1024);
        let data = (rodata.1, 3 * MIB + 64 * 1024);
        space
            .protect(&mut memory, text.0, text.1 - text.0, Access::TEXT)
            .unwrap();
        space
            .protect(
                &mut memory,
                rodata.0,
                rodata.1 - rodata.0,
                Access::READ_ONLY,
            )
            .unwrap();
        space
            .protect(&mut memory, data.0, data.1 - data.0, Access::DATA)
            .unwrap();
        assert_identity(&space, &memory, 0, text.0, Access::RWX);
        assert_identity(&space, &memory, text.0, text.1, Access::TEXT);
        assert_identity(&space, &memory, rodata.0, rodata.1, Access::READ_ONLY);
        assert_identity(&space, &memory, data.0, data.1, Access::DATA);
        assert_identity(&space, &memory, data.1, 4 * MIB, Access::RWX);
        // The raw entries carry the bits the MMU reads.
        let text_entry = leaf_entry(&space, &memory, text.0);
        assert_eq!(text_entry & entry::WRITABLE, 0);
        assert_eq!(text_entry & entry::NO_EXECUTE, 0);
        let data_entry = leaf_entry(&space, &memory, data.0);
        assert_ne!(data_entry & entry::WRITABLE, 0);
        assert_ne!(data_entry & entry::NO_EXECUTE, 0);
    }

    /// The raw leaf entry that maps `address`.
    fn leaf_entry(space: &AddressSpace, memory: &FakeMemory, address: u64) -> u64 {
        let mut table = space.root();
        for level in (0..=3).rev() {
            let value = memory.read_entry(table, index(address, level));
            if level < 3 && is_leaf(value, level) {
                return value;
            }
            table = value & entry::ADDRESS;
        }
        unreachable!()
    }

    #[test]
    fn protecting_whole_large_pages_does_not_split_them() {
        let mut memory = FakeMemory::new(64);
        let mut space = kernel_like(&mut memory, true);
        let before = memory.allocated();
        space
            .protect(&mut memory, 512 * MIB, 256 * MIB, Access::READ_ONLY)
            .unwrap();
        assert_eq!(memory.allocated(), before);
        let translation = translate(&space, &memory, 600 * MIB).unwrap();
        assert_eq!(translation.page_size, PageSize::Large);
        assert_eq!(translation.access, Access::READ_ONLY);
        assert_eq!(
            translate(&space, &memory, 768 * MIB).unwrap().access,
            Access::RWX
        );
    }

    #[test]
    fn crash_reservation_read_only_after_loading_then_unmapped() {
        let mut memory = FakeMemory::new(64);
        let mut space = kernel_like(&mut memory, true);
        // Not 2 MiB-aligned at either end.
        let (base, len) = (2 * GIB + 3 * MIB + 4 * PAGE_SIZE, 64 * MIB + 12 * PAGE_SIZE);
        space
            .protect(&mut memory, base, len, Access::READ_ONLY)
            .unwrap();
        assert_identity(&space, &memory, base - 4 * PAGE_SIZE, base, Access::RWX);
        assert_identity(&space, &memory, base, base + len, Access::READ_ONLY);
        assert_identity(
            &space,
            &memory,
            base + len,
            base + len + 4 * PAGE_SIZE,
            Access::RWX,
        );
        space.unmap(&mut memory, base, len).unwrap();
        assert_unmapped(&space, &memory, base, base + len);
        assert_identity(&space, &memory, base - 4 * PAGE_SIZE, base, Access::RWX);
        assert_identity(
            &space,
            &memory,
            base + len,
            base + len + 4 * PAGE_SIZE,
            Access::RWX,
        );
    }

    #[test]
    fn device_range_mapped_uncached_inside_ram_mapping() {
        let mut memory = FakeMemory::new(64);
        let mut space = kernel_like(&mut memory, true);
        space
            .map_identity(&mut memory, 0xfed0_0000, PAGE_SIZE, Access::DEVICE)
            .unwrap();
        let translation = translate(&space, &memory, 0xfed0_00f0).unwrap();
        assert_eq!(translation.access, Access::DEVICE);
        assert_eq!(translation.physical, 0xfed0_00f0);
    }

    #[test]
    fn protect_of_a_range_with_a_hole_changes_nothing() {
        let mut memory = FakeMemory::new(64);
        let mut space = kernel_like(&mut memory, true);
        let hole = 100 * MIB + 7 * PAGE_SIZE;
        space.unmap(&mut memory, hole, PAGE_SIZE).unwrap();
        let snapshot = memory.tables.clone();
        assert_eq!(
            space.protect(&mut memory, 96 * MIB, 16 * MIB, Access::READ_ONLY),
            Err(PagingError::NotMapped(hole))
        );
        assert_eq!(memory.tables, snapshot);
        assert_eq!(
            space.protect(&mut memory, 6 * GIB, PAGE_SIZE, Access::READ_ONLY),
            Err(PagingError::NotMapped(6 * GIB))
        );
    }

    #[test]
    fn map_uses_small_pages_when_physical_is_not_large_aligned() {
        let mut memory = FakeMemory::new(16);
        let mut space = AddressSpace::new(&mut memory, true).unwrap();
        let (virt, phys) = (64 * GIB, 3 * GIB + 4 * PAGE_SIZE);
        space
            .map(&mut memory, virt, phys, 2 * LARGE_PAGE_SIZE, Access::DATA)
            .unwrap();
        for offset in [0, 0x1234, LARGE_PAGE_SIZE + 0x5678, 2 * LARGE_PAGE_SIZE - 1] {
            let translation = translate(&space, &memory, virt + offset).unwrap();
            assert_eq!(translation.physical, phys + offset);
            assert_eq!(translation.page_size, PageSize::Small);
        }
        assert_eq!(translate(&space, &memory, virt + 2 * LARGE_PAGE_SIZE), None);
        // Aligned on both sides: large pages.
        space
            .map(
                &mut memory,
                66 * GIB,
                4 * GIB,
                LARGE_PAGE_SIZE,
                Access::DATA,
            )
            .unwrap();
        let translation = translate(&space, &memory, 66 * GIB + 17).unwrap();
        assert_eq!(translation.physical, 4 * GIB + 17);
        assert_eq!(translation.page_size, PageSize::Large);
    }

    #[test]
    fn remapping_part_of_a_large_page_keeps_the_rest() {
        let mut memory = FakeMemory::new(16);
        let mut space =
            AddressSpace::identity(&mut memory, 4 * MIB, true, |_, _| Some(Access::DATA)).unwrap();
        space
            .map(
                &mut memory,
                2 * MIB + PAGE_SIZE,
                0x1234_5000,
                PAGE_SIZE,
                Access::READ_ONLY,
            )
            .unwrap();
        let moved = translate(&space, &memory, 2 * MIB + PAGE_SIZE + 8).unwrap();
        assert_eq!(moved.physical, 0x1234_5008);
        assert_eq!(moved.access, Access::READ_ONLY);
        assert_identity(&space, &memory, 2 * MIB, 2 * MIB + PAGE_SIZE, Access::DATA);
        assert_identity(
            &space,
            &memory,
            2 * MIB + 2 * PAGE_SIZE,
            4 * MIB,
            Access::DATA,
        );
    }

    #[test]
    fn without_nx_no_entry_has_bit_63() {
        let mut memory = FakeMemory::new(64);
        let mut space = kernel_like(&mut memory, false);
        space
            .protect(&mut memory, MIB, 3 * MIB, Access::DATA)
            .unwrap();
        for table in memory.tables.values() {
            assert!(table.iter().all(|value| value & entry::NO_EXECUTE == 0));
        }
        // Reported as it would behave: executable.
        let translation = translate(&space, &memory, 2 * MIB).unwrap();
        assert!(translation.access.executable);
        assert!(!space.no_execute());
    }

    #[test]
    fn splitting_an_adopted_huge_page_keeps_its_attributes() {
        // Boot-style tables made by hand: one 1 GiB page at 1 GiB, uncached
        // with PAT index 7 (PAT, PCD, PWT), read-only, no-execute.
        let mut memory = FakeMemory::new(16);
        let root = memory.alloc_table().unwrap();
        let pdpt = memory.alloc_table().unwrap();
        memory.write_entry(root, 0, pdpt | entry::PRESENT | entry::WRITABLE);
        let huge_bits = entry::PRESENT
            | entry::HUGE
            | entry::PAT_LARGE
            | entry::CACHE_DISABLE
            | entry::WRITE_THROUGH
            | entry::NO_EXECUTE;
        memory.write_entry(pdpt, 1, GIB | huge_bits);
        let mut space = AddressSpace::from_root(root, true);
        assert_eq!(
            translate(&space, &memory, GIB + 5).unwrap().page_size,
            PageSize::Huge
        );
        space
            .unmap(&mut memory, GIB + LARGE_PAGE_SIZE + PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        // 1 GiB -> 2 MiB pages -> 4 KiB pages: two new tables.
        assert_eq!(memory.allocated(), 4);
        let large = leaf_entry(&space, &memory, GIB + 5 * LARGE_PAGE_SIZE);
        assert_eq!(large & !entry::ADDRESS, huge_bits & !entry::ADDRESS);
        assert_ne!(large & entry::PAT_LARGE, 0);
        assert_eq!(
            large & entry::ADDRESS & !(LARGE_PAGE_SIZE - 1),
            GIB + 5 * LARGE_PAGE_SIZE
        );
        let small = leaf_entry(&space, &memory, GIB + LARGE_PAGE_SIZE);
        assert_eq!(small & entry::ADDRESS, GIB + LARGE_PAGE_SIZE);
        assert_ne!(small & entry::PAT_SMALL, 0, "PAT moves to bit 7");
        assert_eq!(small & entry::HUGE & !entry::PAT_SMALL, 0);
        let translation =
            translate(&space, &memory, GIB + LARGE_PAGE_SIZE + 2 * PAGE_SIZE).unwrap();
        assert_eq!(translation.physical, GIB + LARGE_PAGE_SIZE + 2 * PAGE_SIZE);
        assert_eq!(
            translation.access,
            Access {
                writable: false,
                executable: false,
                caching: Caching::Uncached,
            }
        );
        assert_eq!(
            translate(&space, &memory, GIB + LARGE_PAGE_SIZE + PAGE_SIZE),
            None
        );
    }

    #[test]
    fn running_out_of_frames_is_an_error() {
        // Room for the PML4 and a PDPT only.
        let mut memory = FakeMemory::new(2);
        assert_eq!(
            AddressSpace::identity(&mut memory, 4 * MIB, true, |_, _| Some(Access::DATA)).err(),
            Some(PagingError::OutOfFrames)
        );
        let mut memory = FakeMemory::new(3);
        let mut space =
            AddressSpace::identity(&mut memory, 4 * MIB, true, |_, _| Some(Access::DATA)).unwrap();
        assert_eq!(
            space.unmap(&mut memory, PAGE_SIZE, PAGE_SIZE),
            Err(PagingError::OutOfFrames)
        );
        // The failed split left the large page as it was.
        assert_eq!(
            translate(&space, &memory, PAGE_SIZE).unwrap().page_size,
            PageSize::Large
        );
    }

    #[test]
    fn bad_ranges_are_refused() {
        let mut memory = FakeMemory::new(8);
        let mut space = AddressSpace::new(&mut memory, true).unwrap();
        let cases: Vec<(Result<(), PagingError>, PagingError)> = vec![
            (
                space.map(&mut memory, 0x1001, 0x1000, PAGE_SIZE, Access::DATA),
                PagingError::Unaligned(0x1001),
            ),
            (
                space.map(&mut memory, 0x1000, 0x1000, 100, Access::DATA),
                PagingError::Unaligned(100),
            ),
            (
                space.map(
                    &mut memory,
                    VIRTUAL_LIMIT - PAGE_SIZE,
                    0,
                    2 * PAGE_SIZE,
                    Access::DATA,
                ),
                PagingError::OutOfRange(VIRTUAL_LIMIT - PAGE_SIZE),
            ),
            (
                space.map(
                    &mut memory,
                    0,
                    PHYSICAL_LIMIT - PAGE_SIZE,
                    2 * PAGE_SIZE,
                    Access::DATA,
                ),
                PagingError::OutOfRange(PHYSICAL_LIMIT - PAGE_SIZE),
            ),
            (
                space.unmap(&mut memory, u64::MAX - 4095, 8192),
                PagingError::OutOfRange(u64::MAX - 4095),
            ),
            (
                space.protect(&mut memory, 0x2000, 0x800, Access::DATA),
                PagingError::Unaligned(0x800),
            ),
        ];
        for (result, expected) in cases {
            assert_eq!(result, Err(expected));
        }
        // Nothing was mapped by the refused calls.
        assert_eq!(memory.allocated(), 1);
    }
}
