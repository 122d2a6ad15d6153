//! Nested page tables: each guest sees guest-physical memory starting at
//! 0, backed by frames the hypervisor allocated for it and nothing else
//! (as the VMX backend's EPT does). They have the format of ordinary
//! x86-64 page tables, walked as user accesses, so every entry carries
//! U/S; the leaves are 2 MiB pages, write-back through PAT entry 0.

use crate::mm::phys;

/// Present, writable, user (every nested walk is a user access).
const TABLE: u64 = 0b111;
/// A 2 MiB leaf.
const LARGE_PAGE: u64 = 1 << 7;
const TWO_MIB: u64 = 2 * 1024 * 1024;

/// A guest's nested page tables: guest-physical `[0, pages * 2 MiB)` maps
/// to the given host chunk.
#[derive(Debug, Clone, Copy)]
pub struct Npt {
    /// The nested CR3 for the VMCB.
    pub root: u64,
}

impl Npt {
    /// Builds the tables (three zeroed frames from `alloc_page`) for
    /// `bytes` of guest memory at host `backing` (2 MiB aligned, at most
    /// 1 GiB).
    pub fn new(
        backing: u64,
        bytes: u64,
        mut alloc_page: impl FnMut() -> Option<u64>,
    ) -> Option<Self> {
        if !backing.is_multiple_of(TWO_MIB) || bytes == 0 || bytes > 512 * TWO_MIB {
            return None;
        }
        let pml4 = alloc_page()?;
        let pdpt = alloc_page()?;
        let pd = alloc_page()?;
        // The three frames are fresh, zeroed and owned by these tables alone.
        phys::write(pml4, &(pdpt | TABLE).to_le_bytes());
        phys::write(pdpt, &(pd | TABLE).to_le_bytes());
        for index in 0..bytes.div_ceil(TWO_MIB) {
            let entry = (backing + index * TWO_MIB) | TABLE | LARGE_PAGE;
            phys::write(pd + index * 8, &entry.to_le_bytes());
        }
        Some(Self { root: pml4 })
    }
}
