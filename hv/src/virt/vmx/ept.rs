//! Extended page tables: each guest sees guest-physical memory starting at
//! 0, backed by frames the hypervisor allocated for it and nothing else.
//! The hypervisor image and the crash-kernel reservation are never in the
//! frame allocator, so they can never be mapped into a guest.

use crate::mm::phys;

/// Read, write, execute.
const ALL_ACCESS: u64 = 0b111;
/// Leaf memory type: write-back.
const WRITE_BACK: u64 = 6 << 3;
const LARGE_PAGE: u64 = 1 << 7;
const TWO_MIB: u64 = 2 * 1024 * 1024;

/// A guest's EPT: guest-physical `[0, bytes)` maps to the given host
/// chunk with 2 MiB pages, and nothing else does: every other access is an
/// EPT violation.
#[derive(Debug, Clone, Copy)]
pub struct Ept {
    /// The EPT pointer for the VMCS.
    pub pointer: u64,
}

/// Most guest memory one EPT maps: 4 GiB (four page directories).
pub const MAX_BYTES: u64 = 4 * 512 * TWO_MIB;

impl Ept {
    /// Builds the tables (zeroed frames from `alloc_page`: two, plus one
    /// per GiB) for `bytes` of guest memory at host `backing` (2 MiB
    /// aligned, at most [`MAX_BYTES`]).
    pub fn new(
        backing: u64,
        bytes: u64,
        mut alloc_page: impl FnMut() -> Option<u64>,
    ) -> Option<Self> {
        if !backing.is_multiple_of(TWO_MIB) || bytes == 0 || bytes > MAX_BYTES {
            return None;
        }
        let pml4 = alloc_page()?;
        let pdpt = alloc_page()?;
        // The frames are fresh, zeroed and owned by this EPT alone.
        phys::write(pml4, &(pdpt | ALL_ACCESS).to_le_bytes());
        let large_pages = bytes.div_ceil(TWO_MIB);
        for directory in 0..large_pages.div_ceil(512) {
            let pd = alloc_page()?;
            phys::write(pdpt + directory * 8, &(pd | ALL_ACCESS).to_le_bytes());
            let first = directory * 512;
            for index in first..large_pages.min(first + 512) {
                let entry = (backing + index * TWO_MIB) | ALL_ACCESS | WRITE_BACK | LARGE_PAGE;
                phys::write(pd + (index - first) * 8, &entry.to_le_bytes());
            }
        }
        // Write-back paging structures, 4-level walk.
        Some(Self {
            pointer: pml4 | 6 | (3 << 3),
        })
    }
}
