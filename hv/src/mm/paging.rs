//! The kernel's own page tables, built by `hv_core::paging` (host-tested)
//! over frames read and written through `mm::phys`.
//!
//! Everything is identity-mapped (virtual == physical), from 0 to the end
//! of RAM or 4 GiB, whichever is higher, so the local APIC, the I/O APICs
//! and the ACPI tables are reachable; device holes are uncached. The
//! kernel's text is read-only and executable, its read-only data
//! read-only, everything else no-execute (with EFER.NXE, on CPUs that have
//! NX); the guard page under every stack is unmapped, so an overflow
//! faults instead of corrupting; the crash reservation is read-only once
//! the capture kernel is loaded (`mm::protect_reservation`).

use hv_core::paging::TableMemory;
pub use hv_core::paging::{Access, AddressSpace, PagingError};

use super::FrameSource;
use super::phys::{set_table_entry, table_entry};

/// Page-table memory: frames from the kernel's allocator, entries through
/// `mm::phys`.
pub struct Tables<'a, F: FrameSource> {
    /// Where new tables come from.
    pub frames: &'a mut F,
}

impl<F: FrameSource> TableMemory for Tables<'_, F> {
    fn alloc_table(&mut self) -> Option<u64> {
        self.frames.alloc_zeroed_frame()
    }

    fn read_entry(&self, table: u64, index: usize) -> u64 {
        table_entry(table, index)
    }

    fn write_entry(&mut self, table: u64, index: usize, value: u64) {
        set_table_entry(table, index, value);
    }
}

/// Makes `space` the CPU's. Its tables map everything the kernel uses at
/// the same address as before (they identity-map all RAM, and only guard
/// pages are holes).
pub fn activate(space: &AddressSpace) {
    super::phys::activate_page_tables(space.root());
}
