//! Physical frame allocator (4 KiB frames) over the usable memory of a
//! [`MemoryMap`].
//!
//! Free memory is kept as a sorted list of disjoint, page-aligned ranges with
//! a fixed capacity; freeing coalesces with the neighbours. This is slow for
//! many small allocations but the hypervisor allocates few, mostly large,
//! blocks (VMCS/VMXON pages, stacks, EPT tables, the crash-kernel area).
//!
//! [`FrameAllocator::alloc`] never returns memory below 1 MiB: that memory is
//! precious (the AP start-up trampoline must live there) and often holds
//! firmware data. [`FrameAllocator::alloc_below`] asks for it explicitly.
//! Frame 0 is never handed out at all, so that an address of 0 can keep
//! meaning "nothing".

use crate::memmap::MemoryMap;
use core::fmt;

/// Size of a frame.
pub const FRAME_SIZE: u64 = 4096;

/// [`FrameAllocator::alloc`] returns nothing below this address.
pub const LOW_MEMORY_END: u64 = 1 << 20;

/// How many disjoint free ranges the allocator tracks.
pub const MAX_FREE_RANGES: usize = 512;

/// A half-open range `[start, end)` of free, page-aligned memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    start: u64,
    end: u64,
}

/// Why [`FrameAllocator::free`] refused a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeError {
    /// The address is not 4 KiB-aligned, `pages` is 0, the range wraps, or
    /// it includes frame 0.
    BadRange,
    /// Part of the range is already free (a double free).
    AlreadyFree,
    /// The range cannot be merged with a neighbour and the list is full.
    TooManyRanges,
}

impl fmt::Display for FreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRange => write!(
                f,
                "freed range is empty, unaligned, wrapping or includes frame 0"
            ),
            Self::AlreadyFree => write!(f, "freed range overlaps free memory (double free)"),
            Self::TooManyRanges => write!(f, "free list full ({MAX_FREE_RANGES} ranges)"),
        }
    }
}

/// The frame allocator. Not synchronized: wrap it in a lock to share it.
#[derive(Clone)]
pub struct FrameAllocator {
    ranges: [Range; MAX_FREE_RANGES],
    len: usize,
    free_bytes: u64,
    /// Usable memory that did not fit in the free list (from the map only).
    lost_bytes: u64,
}

impl fmt::Debug for FrameAllocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameAllocator")
            .field("free_bytes", &self.free_bytes)
            .field("ranges", &self.len)
            .field("lost_bytes", &self.lost_bytes)
            .finish()
    }
}

impl Default for FrameAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameAllocator {
    /// An allocator without memory, usable in a `static`.
    pub const fn new() -> Self {
        Self {
            ranges: [Range { start: 0, end: 0 }; MAX_FREE_RANGES],
            len: 0,
            free_bytes: 0,
            lost_bytes: 0,
        }
    }

    /// An allocator owning the usable memory of `map`, each region shrunk
    /// to whole frames (and frame 0 left out).
    pub fn from_map(map: &MemoryMap) -> Self {
        let mut this = Self::new();
        for region in map.usable() {
            let Some(start) = align_up(region.start.max(FRAME_SIZE), FRAME_SIZE) else {
                continue;
            };
            let end = region.end() & !(FRAME_SIZE - 1);
            if start >= end {
                continue;
            }
            // The map's regions are disjoint and sorted, so this only fails
            // when the list is full; count what is lost rather than fail.
            if this.insert(Range { start, end }).is_err() {
                this.lost_bytes += end - start;
            }
        }
        this
    }

    /// Bytes currently free.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    /// Usable bytes of the map that did not fit in the free list.
    pub fn lost_bytes(&self) -> u64 {
        self.lost_bytes
    }

    /// Number of disjoint free ranges (a fragmentation measure).
    pub fn free_ranges(&self) -> usize {
        self.len
    }

    /// `pages` contiguous frames at or above 1 MiB, aligned to
    /// `align_pages` frames (a power of two; 0 counts as 1). Lowest fit first.
    pub fn alloc(&mut self, pages: u64, align_pages: u64) -> Option<u64> {
        self.alloc_in(LOW_MEMORY_END, u64::MAX, pages, align_pages)
    }

    /// `pages` contiguous frames ending at or below `limit`, at any address
    /// but 0 (e.g. below 1 MiB for the real-mode AP trampoline).
    pub fn alloc_below(&mut self, limit: u64, pages: u64) -> Option<u64> {
        self.alloc_in(0, limit, pages, 1)
    }

    /// Returns `pages` frames at `addr` to the free list.
    pub fn free(&mut self, addr: u64, pages: u64) -> Result<(), FreeError> {
        let end = pages
            .checked_mul(FRAME_SIZE)
            .and_then(|len| addr.checked_add(len))
            .ok_or(FreeError::BadRange)?;
        if pages == 0 || addr == 0 || !addr.is_multiple_of(FRAME_SIZE) {
            return Err(FreeError::BadRange);
        }
        self.insert(Range { start: addr, end })
    }

    fn alloc_in(&mut self, floor: u64, limit: u64, pages: u64, align_pages: u64) -> Option<u64> {
        let align = align_pages.max(1);
        if pages == 0 || !align.is_power_of_two() {
            return None;
        }
        let size = pages.checked_mul(FRAME_SIZE)?;
        let align = align.checked_mul(FRAME_SIZE)?;
        for i in 0..self.len {
            let range = self.ranges[i];
            let Some(start) = align_up(range.start.max(floor), align) else {
                continue;
            };
            let Some(end) = start.checked_add(size) else {
                continue;
            };
            if end > range.end || end > limit {
                continue;
            }
            if self.take(i, start, end) {
                return Some(start);
            }
        }
        None
    }

    /// Removes `[start, end)` from range `i` (which contains it). Fails only
    /// when that would split the range and the list is full.
    fn take(&mut self, i: usize, start: u64, end: u64) -> bool {
        let range = self.ranges[i];
        let left = (start > range.start).then_some(Range {
            start: range.start,
            end: start,
        });
        let right = (end < range.end).then_some(Range {
            start: end,
            end: range.end,
        });
        match (left, right) {
            (None, None) => self.remove(i),
            (Some(r), None) | (None, Some(r)) => self.ranges[i] = r,
            (Some(l), Some(r)) => {
                if self.len == MAX_FREE_RANGES {
                    return false;
                }
                self.ranges[i] = l;
                self.insert_at(i + 1, r);
            }
        }
        self.free_bytes -= end - start;
        true
    }

    /// Adds a free range, merging it with touching neighbours.
    fn insert(&mut self, new: Range) -> Result<(), FreeError> {
        let i = self.ranges[..self.len].partition_point(|r| r.end <= new.start);
        if self.ranges[..self.len]
            .get(i)
            .is_some_and(|next| next.start < new.end)
        {
            return Err(FreeError::AlreadyFree);
        }
        let merge_left = i > 0 && self.ranges[i - 1].end == new.start;
        let merge_right = i < self.len && self.ranges[i].start == new.end;
        match (merge_left, merge_right) {
            (true, true) => {
                self.ranges[i - 1].end = self.ranges[i].end;
                self.remove(i);
            }
            (true, false) => self.ranges[i - 1].end = new.end,
            (false, true) => self.ranges[i].start = new.start,
            (false, false) => {
                if self.len == MAX_FREE_RANGES {
                    return Err(FreeError::TooManyRanges);
                }
                self.insert_at(i, new);
            }
        }
        self.free_bytes += new.end - new.start;
        Ok(())
    }

    fn insert_at(&mut self, i: usize, range: Range) {
        self.ranges.copy_within(i..self.len, i + 1);
        self.ranges[i] = range;
        self.len += 1;
    }

    fn remove(&mut self, i: usize) {
        self.ranges.copy_within(i + 1..self.len, i);
        self.len -= 1;
    }
}

/// `value` rounded up to a multiple of `align` (a power of two), if it fits.
fn align_up(value: u64, align: u64) -> Option<u64> {
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memmap::{MemoryRegion, RegionKind};
    use std::vec::Vec;

    const MIB: u64 = 1 << 20;

    fn allocator(regions: &[(u64, u64)]) -> FrameAllocator {
        let map = MemoryMap::from_regions(
            regions
                .iter()
                .map(|&(start, len)| MemoryRegion::new(start, len, RegionKind::Usable)),
        )
        .unwrap();
        FrameAllocator::from_map(&map)
    }

    fn ranges(a: &FrameAllocator) -> Vec<(u64, u64)> {
        a.ranges[..a.len].iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn from_map_trims_to_frames_and_skips_frame_zero() {
        let a = allocator(&[
            (0, 0x9_fc00),
            (MIB + 0x10, 2 * MIB - 0x20),
            (8 * MIB, 0x800),
        ]);
        assert_eq!(
            ranges(&a),
            [(0x1000, 0x9_f000), (MIB + 0x1000, 3 * MIB - 0x1000)]
        );
        assert_eq!(a.free_bytes(), 0x9_e000 + 2 * MIB - 0x2000);
        assert_eq!(a.lost_bytes(), 0);
    }

    #[test]
    fn alloc_never_goes_below_1mib() {
        let mut a = allocator(&[(0, 0xa_0000), (MIB, MIB)]);
        let before = a.free_bytes();
        let first = a.alloc(1, 1).unwrap();
        assert_eq!(first, MIB);
        assert_eq!(a.free_bytes(), before - FRAME_SIZE);
        // Only 255 frames remain above 1 MiB, low memory is not used.
        assert_eq!(a.alloc(256, 1), None);
        assert_eq!(a.alloc(255, 1), Some(MIB + FRAME_SIZE));
        assert_eq!(a.alloc(1, 1), None);
        assert!(a.free_bytes() > 0);
        // Low memory only on request.
        let low = a.alloc_below(LOW_MEMORY_END, 1).unwrap();
        assert_eq!(low, 0x1000);
        assert_eq!(a.alloc_below(0x2000, 1), None);
        assert_eq!(a.alloc_below(0x10_0000, 0x9f), None);
        assert_eq!(a.alloc_below(0x10_0000, 0x9e), Some(0x2000));
        assert_eq!(a.free_bytes(), 0);
    }

    #[test]
    fn alloc_respects_alignment() {
        let mut a = allocator(&[(MIB + 0x3000, 8 * MIB)]);
        assert_eq!(a.alloc(1, 0), Some(MIB + 0x3000));
        let big = a.alloc(4, 512).unwrap();
        assert_eq!(big, 2 * MIB);
        // The gap before the aligned block is still free and used first.
        assert_eq!(a.alloc(2, 1), Some(MIB + 0x4000));
        assert_eq!(a.alloc(1, 3), None, "alignment must be a power of two");
        assert_eq!(a.alloc(0, 1), None);
        assert_eq!(a.alloc(u64::MAX, 1), None);
        assert_eq!(a.alloc(1, 1 << 63), None);
    }

    #[test]
    fn free_coalesces_and_counts() {
        let mut a = allocator(&[(MIB, MIB)]);
        let total = a.free_bytes();
        let blocks: Vec<u64> = (0..8).map(|_| a.alloc(16, 1).unwrap()).collect();
        assert_eq!(a.free_bytes(), total - 8 * 16 * FRAME_SIZE);
        // Free every other block, then the rest: ends as one range again.
        for &b in blocks.iter().step_by(2) {
            a.free(b, 16).unwrap();
        }
        assert_eq!(a.free_ranges(), 5);
        for &b in blocks.iter().skip(1).step_by(2) {
            a.free(b, 16).unwrap();
        }
        assert_eq!(ranges(&a), [(MIB, 2 * MIB)]);
        assert_eq!(a.free_bytes(), total);
        // Freed memory is reused.
        assert_eq!(a.alloc(256, 1), Some(MIB));
    }

    #[test]
    fn free_rejects_bad_ranges() {
        let mut a = allocator(&[(MIB, MIB)]);
        let b = a.alloc(4, 1).unwrap();
        assert_eq!(a.free(b + 1, 1), Err(FreeError::BadRange));
        assert_eq!(a.free(b, 0), Err(FreeError::BadRange));
        assert_eq!(a.free(0, 1), Err(FreeError::BadRange));
        assert_eq!(a.free(!0xfff, 2), Err(FreeError::BadRange));
        assert_eq!(a.free(b, u64::MAX), Err(FreeError::BadRange));
        // Double free, whole or partial.
        a.free(b, 2).unwrap();
        assert_eq!(a.free(b, 1), Err(FreeError::AlreadyFree));
        assert_eq!(a.free(b + FRAME_SIZE, 2), Err(FreeError::AlreadyFree));
        assert_eq!(
            a.free(b + 0x10_0000 - 0x1000, 2),
            Err(FreeError::AlreadyFree)
        );
        a.free(b + 2 * FRAME_SIZE, 2).unwrap();
        assert_eq!(ranges(&a), [(MIB, 2 * MIB)]);
        // Memory outside the map may be donated.
        a.free(16 * MIB, 1).unwrap();
        assert_eq!(a.free_ranges(), 2);
        assert!(FreeError::AlreadyFree.to_string().contains("double free"));
    }

    #[test]
    fn full_free_list() {
        let mut a = FrameAllocator::new();
        for i in 0..MAX_FREE_RANGES as u64 {
            a.free(MIB + i * 2 * FRAME_SIZE, 1).unwrap();
        }
        assert_eq!(a.free_ranges(), MAX_FREE_RANGES);
        let top = MIB + MAX_FREE_RANGES as u64 * 2 * FRAME_SIZE;
        assert_eq!(a.free(top, 1), Err(FreeError::TooManyRanges));
        // Merging with a neighbour needs no slot.
        a.free(MIB + FRAME_SIZE, 1).unwrap();
        assert_eq!(a.free_ranges(), MAX_FREE_RANGES - 1);
        // Taking the middle of a range would split it: with a full list the
        // allocator looks further.
        a.free(top, 1).unwrap();
        assert_eq!(a.free_ranges(), MAX_FREE_RANGES);
        assert_eq!(a.alloc(1, 2), Some(MIB));
    }

    #[test]
    fn split_allocation_at_capacity_tries_other_ranges() {
        let mut a = FrameAllocator::new();
        // One big range first, then fill the list with single frames.
        a.free(MIB, 16).unwrap();
        for i in 0..MAX_FREE_RANGES as u64 - 1 {
            a.free(64 * MIB + i * 2 * FRAME_SIZE, 1).unwrap();
        }
        // Aligning to 8 frames inside [1 MiB, 1 MiB + 64 KiB) would split it.
        let got = a.alloc(1, 8).unwrap();
        assert_eq!(got, MIB);
        let got = a.alloc(1, 8).unwrap();
        assert_ne!(
            got,
            MIB + 8 * FRAME_SIZE,
            "would have split a range at capacity"
        );
        assert_eq!(got % (8 * FRAME_SIZE), 0);
    }

    #[test]
    fn randomized_alloc_free_keeps_accounting() {
        let mut a = allocator(&[(0, 0xa_0000), (MIB, 63 * MIB)]);
        let total = a.free_bytes();
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut next = || rng.u64(..);
        for _ in 0..5000 {
            if live.is_empty() || next() % 3 != 0 {
                let pages = 1 + next() % 64;
                let align = 1 << (next() % 5);
                if let Some(addr) = a.alloc(pages, align) {
                    assert_eq!(addr % (align * FRAME_SIZE), 0);
                    assert!(addr >= LOW_MEMORY_END);
                    let end = addr + pages * FRAME_SIZE;
                    for &(s, p) in &live {
                        assert!(end <= s || s + p * FRAME_SIZE <= addr, "overlap");
                    }
                    live.push((addr, pages));
                }
            } else {
                let (addr, pages) = live.swap_remove((next() as usize) % live.len());
                a.free(addr, pages).unwrap();
            }
            let used: u64 = live.iter().map(|&(_, p)| p * FRAME_SIZE).sum();
            assert_eq!(a.free_bytes() + used, total);
        }
        for (addr, pages) in live.drain(..) {
            a.free(addr, pages).unwrap();
        }
        assert_eq!(a.free_bytes(), total);
        assert_eq!(ranges(&a), [(0x1000, 0xa_0000), (MIB, 64 * MIB)]);
    }
}
