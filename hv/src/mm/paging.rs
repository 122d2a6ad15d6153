//! The kernel's own page tables.
//!
//! Everything is identity-mapped (virtual == physical) with 2 MiB pages, from
//! 0 to the end of RAM or 4 GiB, whichever is higher, so the local APIC, the
//! I/O APICs and the ACPI tables are reachable. A 2 MiB page is split into
//! 4 KiB pages only where a single page must differ: the guard page under
//! every stack is unmapped, so an overflow faults instead of corrupting.
//! Tables are read and written through `mm::phys`.

use super::FrameSource;
use super::phys::{set_table_entry, table_entry};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const PAGE: u64 = 4096;
const LARGE_PAGE: u64 = 2 * 1024 * 1024;
const ENTRIES: usize = 512;

/// Why a mapping change failed.
#[derive(Debug, Clone, Copy)]
pub enum PagingError {
    /// No frame was left for a page table.
    OutOfFrames,
    /// The address is not mapped at all.
    NotMapped(u64),
}

impl core::fmt::Display for PagingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfFrames => f.write_str("no frame left for a page table"),
            Self::NotMapped(address) => write!(f, "{address:#x} is not mapped"),
        }
    }
}

/// A set of page tables.
#[derive(Debug)]
pub struct AddressSpace {
    pml4: u64,
}

fn index(address: u64, level: u32) -> usize {
    ((address >> (12 + 9 * level)) & 0x1FF) as usize
}

fn new_table(frames: &mut impl FrameSource) -> Result<u64, PagingError> {
    frames.alloc_zeroed_frame().ok_or(PagingError::OutOfFrames)
}

impl AddressSpace {
    /// Builds tables that identity-map `[0, end)` with 2 MiB pages; pages
    /// for which `is_ram(start, end)` is false (device holes) are uncached.
    pub fn identity(
        end: u64,
        frames: &mut impl FrameSource,
        is_ram: impl Fn(u64, u64) -> bool,
    ) -> Result<Self, PagingError> {
        let space = Self {
            pml4: new_table(frames)?,
        };
        let end = end.div_ceil(LARGE_PAGE) * LARGE_PAGE;
        let mut address = 0;
        while address < end {
            let pd = space.walk_create(address, 1, frames)?;
            let caching = if is_ram(address, address + LARGE_PAGE) {
                0
            } else {
                CACHE_DISABLE | WRITE_THROUGH
            };
            set_table_entry(
                pd,
                index(address, 1),
                address | PRESENT | WRITABLE | HUGE | caching,
            );
            address += LARGE_PAGE;
        }
        Ok(space)
    }

    /// Walks down to the table at `level` (1 = page directory) that maps
    /// `address`, creating missing tables on the way.
    fn walk_create(
        &self,
        address: u64,
        level: u32,
        frames: &mut impl FrameSource,
    ) -> Result<u64, PagingError> {
        let mut table = self.pml4;
        for current in (level + 1..=3).rev() {
            let slot = index(address, current);
            let mut entry = table_entry(table, slot);
            if entry & PRESENT == 0 {
                entry = new_table(frames)? | PRESENT | WRITABLE;
                set_table_entry(table, slot, entry);
            }
            table = entry & ADDRESS_MASK;
        }
        Ok(table)
    }

    /// Unmaps one 4 KiB page, splitting its 2 MiB page first if needed.
    /// The caller flushes the TLB entry if these tables are live.
    pub fn unmap_page(
        &mut self,
        address: u64,
        frames: &mut impl FrameSource,
    ) -> Result<(), PagingError> {
        let address = address & !(PAGE - 1);
        let pd = self.walk_create(address, 1, frames)?;
        let slot = index(address, 1);
        let pd_entry = table_entry(pd, slot);
        if pd_entry & PRESENT == 0 {
            return Err(PagingError::NotMapped(address));
        }
        let pt = if pd_entry & HUGE != 0 {
            let base = pd_entry & ADDRESS_MASK & !(LARGE_PAGE - 1);
            let flags = pd_entry & (PRESENT | WRITABLE | CACHE_DISABLE | WRITE_THROUGH);
            let pt = new_table(frames)?;
            for entry in 0..ENTRIES {
                set_table_entry(pt, entry, (base + entry as u64 * PAGE) | flags);
            }
            set_table_entry(pd, slot, pt | PRESENT | WRITABLE);
            pt
        } else {
            pd_entry & ADDRESS_MASK
        };
        set_table_entry(pt, index(address, 0), 0);
        Ok(())
    }

    /// Makes these tables the CPU's. They map everything the kernel uses at
    /// the same address as before (they identity-map all RAM, and only
    /// guard pages are holes).
    pub fn activate(&self) {
        super::phys::activate_page_tables(self.pml4);
    }
}
