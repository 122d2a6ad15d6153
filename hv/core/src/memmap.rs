//! The boot memory map, independent of the boot protocol.
//!
//! Boot loaders hand over memory maps that may be unsorted, overlapping, hold
//! zero-length entries or entries whose end wraps around the address space.
//! [`MemoryMap`] turns such a list into sorted, disjoint regions:
//!
//! - where regions of different kinds overlap, the more restrictive kind wins
//!   (usable memory never wins against anything else, see [`RegionKind`]);
//! - adjacent or overlapping regions of the same kind are merged;
//! - zero-length regions are dropped and ends are clipped to the address
//!   space; usable memory is also clipped to the architectural 52-bit
//!   physical address limit, since nothing above it can be RAM.
//!
//! [`MemoryMap::exclude`] then carves ranges (the hypervisor image, boot
//! modules, the crash-kernel reservation...) out of the usable set. Excluded
//! ranges disappear from the map, so keep a copy first if the firmware's
//! view of RAM is still needed (e.g. for a crash dump).
//!
//! Capacity is fixed; running out is an error and leaves the map unchanged.

use core::fmt;

/// How many disjoint regions a [`MemoryMap`] holds.
pub const MAX_REGIONS: usize = 256;

use hv_abi::e820::E820Kind;

/// Usable memory ends below this: x86-64 physical addresses have at most 52 bits.
pub const MAX_PHYS_ADDR: u64 = 1 << 52;

/// What a range of physical memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// RAM free for the hypervisor to use.
    Usable,
    /// Not to be touched.
    Reserved,
    /// Holds ACPI tables; reusable once they are read.
    AcpiReclaimable,
    /// ACPI non-volatile storage: must be preserved.
    AcpiNvs,
    /// Defective RAM.
    Bad,
    /// A boot-protocol type this map does not know; treated as reserved.
    Other(u32),
}

impl From<E820Kind> for RegionKind {
    fn from(kind: E820Kind) -> Self {
        match kind {
            E820Kind::Ram => Self::Usable,
            E820Kind::Reserved => Self::Reserved,
            E820Kind::Acpi => Self::AcpiReclaimable,
            E820Kind::Nvs => Self::AcpiNvs,
            E820Kind::Unusable => Self::Bad,
            E820Kind::Other(raw) => Self::Other(raw),
        }
    }
}

impl From<RegionKind> for E820Kind {
    fn from(kind: RegionKind) -> Self {
        match kind {
            RegionKind::Usable => Self::Ram,
            RegionKind::Reserved => Self::Reserved,
            RegionKind::AcpiReclaimable => Self::Acpi,
            RegionKind::AcpiNvs => Self::Nvs,
            RegionKind::Bad => Self::Unusable,
            RegionKind::Other(raw) => Self::Other(raw),
        }
    }
}

impl RegionKind {
    /// The kind of a raw e820 type number.
    pub fn from_e820(raw: u32) -> Self {
        E820Kind::from_raw(raw).into()
    }

    /// The e820 type number to hand to another kernel (unknown types
    /// become reserved).
    pub fn e820_for_handover(self) -> u32 {
        E820Kind::from(self).raw_for_handover()
    }

    /// Which kind wins where two overlap: higher is more restrictive.
    fn rank(self) -> u8 {
        match self {
            Self::Usable => 0,
            Self::AcpiReclaimable => 1,
            Self::Other(_) => 2,
            Self::Reserved => 3,
            Self::AcpiNvs => 4,
            Self::Bad => 5,
        }
    }

    /// The kind of a range covered by both `self` and `other`.
    fn combine(self, other: Self) -> Self {
        match (self, other) {
            // Deterministic whatever the insertion order.
            (Self::Other(a), Self::Other(b)) => Self::Other(a.max(b)),
            _ if other.rank() > self.rank() => other,
            _ => self,
        }
    }
}

/// A range of physical memory. In a [`MemoryMap`], `len > 0` and
/// `start + len` does not overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the range is.
    pub kind: RegionKind,
}

impl MemoryRegion {
    /// A region; any values are accepted here, [`MemoryMap`] sanitizes them.
    pub const fn new(start: u64, len: u64, kind: RegionKind) -> Self {
        Self { start, len, kind }
    }

    /// One past the last byte, saturating at `u64::MAX`.
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    const EMPTY: Self = Self::new(0, 0, RegionKind::Reserved);
}

/// Errors of [`MemoryMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemMapError {
    /// The result would need more than [`MAX_REGIONS`] regions.
    TooManyRegions,
}

impl fmt::Display for MemMapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyRegions => write!(f, "memory map needs more than {MAX_REGIONS} regions"),
        }
    }
}

/// Sorted, disjoint, coalesced memory regions (see the module docs).
#[derive(Clone)]
pub struct MemoryMap {
    regions: [MemoryRegion; MAX_REGIONS],
    len: usize,
}

impl fmt::Debug for MemoryMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.regions()).finish()
    }
}

impl Default for MemoryMap {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryMap {
    /// An empty map, usable in a `static`.
    pub const fn new() -> Self {
        Self {
            regions: [MemoryRegion::EMPTY; MAX_REGIONS],
            len: 0,
        }
    }

    /// Builds a map from boot-loader regions in any order.
    pub fn from_regions<I>(regions: I) -> Result<Self, MemMapError>
    where
        I: IntoIterator<Item = MemoryRegion>,
    {
        let mut map = Self::new();
        for region in regions {
            map.insert(region)?;
        }
        Ok(map)
    }

    /// Adds a region. Where it overlaps existing regions, the more
    /// restrictive kind wins. On error the map is unchanged.
    pub fn insert(&mut self, region: MemoryRegion) -> Result<(), MemMapError> {
        let mut end = region.end();
        if region.kind == RegionKind::Usable {
            end = end.min(MAX_PHYS_ADDR);
        }
        let kind = region.kind;
        self.paint(region.start, end, |old| match old {
            None => Some(kind),
            Some(old) => Some(old.combine(kind)),
        })
    }

    /// Removes `[start, start + len)` from the usable memory, splitting regions
    /// as needed; other kinds are left alone. The end saturates at `u64::MAX`.
    /// On error the map is unchanged.
    pub fn exclude(&mut self, start: u64, len: u64) -> Result<(), MemMapError> {
        self.paint(start, start.saturating_add(len), |old| match old {
            Some(RegionKind::Usable) | None => None,
            Some(other) => Some(other),
        })
    }

    /// All regions, sorted by address.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions[..self.len]
    }

    /// The usable regions, sorted by address.
    pub fn usable(&self) -> impl Iterator<Item = MemoryRegion> + '_ {
        self.regions()
            .iter()
            .copied()
            .filter(|r| r.kind == RegionKind::Usable)
    }

    /// Total usable bytes (cannot overflow: the regions are disjoint).
    pub fn usable_bytes(&self) -> u64 {
        self.usable().map(|r| r.len).sum()
    }

    /// One past the last usable byte, 0 if there is no usable memory.
    pub fn highest_usable_end(&self) -> u64 {
        self.usable().last().map_or(0, |r| r.end())
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map has no regions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rewrites the kinds of `[start, end)`: `f` maps the kind currently there
    /// (`None` where nothing is mapped) to the new one (`None` to remove).
    ///
    /// The new map is built beside the old one (about 6 KiB of stack) and
    /// coalesced as it is built, so running out of slots is detected exactly
    /// and leaves the map as it was.
    fn paint<F>(&mut self, start: u64, end: u64, f: F) -> Result<(), MemMapError>
    where
        F: Fn(Option<RegionKind>) -> Option<RegionKind>,
    {
        if start >= end {
            return Ok(());
        }
        let mut out = Builder {
            regions: [MemoryRegion::EMPTY; MAX_REGIONS],
            len: 0,
        };
        // Everything below `cursor` inside `[start, end)` has been emitted.
        let mut cursor = start;
        for &r in self.regions() {
            if r.end() <= start {
                out.push(r.start, r.end(), Some(r.kind))?;
                continue;
            }
            if r.start >= end {
                if cursor < end {
                    out.push(cursor, end, f(None))?;
                    cursor = end;
                }
                out.push(r.start, r.end(), Some(r.kind))?;
                continue;
            }
            // `r` overlaps `[start, end)`.
            if r.start > cursor {
                out.push(cursor, r.start, f(None))?;
            }
            let (lo, hi) = (r.start.max(start), r.end().min(end));
            out.push(r.start, lo, Some(r.kind))?;
            out.push(lo, hi, f(Some(r.kind)))?;
            out.push(hi, r.end(), Some(r.kind))?;
            cursor = hi;
        }
        if cursor < end {
            out.push(cursor, end, f(None))?;
        }
        self.regions[..out.len].copy_from_slice(&out.regions[..out.len]);
        self.len = out.len;
        Ok(())
    }
}

/// Collects regions in address order, merging touching ones of equal kind.
struct Builder {
    regions: [MemoryRegion; MAX_REGIONS],
    len: usize,
}

impl Builder {
    /// Appends `[start, end)` of `kind`; empty ranges and `None` add nothing.
    fn push(&mut self, start: u64, end: u64, kind: Option<RegionKind>) -> Result<(), MemMapError> {
        let Some(kind) = kind.filter(|_| start < end) else {
            return Ok(());
        };
        if let Some(last) = self.regions[..self.len].last_mut()
            && last.kind == kind
            && last.end() == start
        {
            last.len += end - start;
            return Ok(());
        }
        let slot = self
            .regions
            .get_mut(self.len)
            .ok_or(MemMapError::TooManyRegions)?;
        *slot = MemoryRegion::new(start, end - start, kind);
        self.len += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegionKind::*;
    use std::vec::Vec;

    const MIB: u64 = 1 << 20;

    fn r(start: u64, len: u64, kind: RegionKind) -> MemoryRegion {
        MemoryRegion::new(start, len, kind)
    }

    fn triples(map: &MemoryMap) -> Vec<(u64, u64, RegionKind)> {
        map.regions()
            .iter()
            .map(|r| (r.start, r.end(), r.kind))
            .collect()
    }

    /// Sorted, disjoint, non-empty, no touching neighbours of equal kind.
    fn assert_normalized(map: &MemoryMap) {
        for r in map.regions() {
            assert!(r.len > 0);
            assert!(r.start.checked_add(r.len).is_some());
        }
        for w in map.regions().windows(2) {
            assert!(w[0].end() <= w[1].start, "{map:?}");
            assert!(
                !(w[0].end() == w[1].start && w[0].kind == w[1].kind),
                "{map:?}"
            );
        }
    }

    #[test]
    fn empty_map() {
        let map = MemoryMap::from_regions([]).unwrap();
        assert!(map.is_empty());
        assert_eq!(map.len(), 0);
        assert_eq!(map.usable_bytes(), 0);
        assert_eq!(map.highest_usable_end(), 0);
        assert_eq!(map.usable().count(), 0);
    }

    #[test]
    fn typical_bios_map_is_sorted_and_merged() {
        let map = MemoryMap::from_regions([
            r(0x10_0000, 511 * MIB, Usable),
            r(0, 0x9_fc00, Usable),
            r(0x9_fc00, 0x400, Reserved),
            r(0xf_0000, 0x1_0000, Reserved),
            r(512 * MIB, 512 * MIB, Usable), // adjacent: merges
            r(0xfffc_0000, 0x4_0000, Reserved),
        ])
        .unwrap();
        assert_normalized(&map);
        assert_eq!(
            triples(&map),
            [
                (0, 0x9_fc00, Usable),
                (0x9_fc00, 0xa_0000, Reserved),
                (0xf_0000, 0x10_0000, Reserved),
                (0x10_0000, 1024 * MIB, Usable),
                (0xfffc_0000, 0x1_0000_0000, Reserved),
            ]
        );
        assert_eq!(map.usable_bytes(), 0x9_fc00 + 1023 * MIB);
        assert_eq!(map.highest_usable_end(), 1024 * MIB);
        assert_eq!(map.usable().count(), 2);
    }

    #[test]
    fn overlapping_usable_merges() {
        let map = MemoryMap::from_regions([
            r(0x3000, 0x5000, Usable),
            r(0x1000, 0x4000, Usable),
            r(0x2000, 0x1000, Usable),
        ])
        .unwrap();
        assert_eq!(triples(&map), [(0x1000, 0x8000, Usable)]);
    }

    #[test]
    fn non_usable_wins_over_usable_in_either_order() {
        let a = [r(0, 0x10000, Usable), r(0x4000, 0x2000, Reserved)];
        let b = [a[1], a[0]];
        for input in [a, b] {
            let map = MemoryMap::from_regions(input).unwrap();
            assert_normalized(&map);
            assert_eq!(
                triples(&map),
                [
                    (0, 0x4000, Usable),
                    (0x4000, 0x6000, Reserved),
                    (0x6000, 0x10000, Usable)
                ]
            );
        }
    }

    #[test]
    fn restrictive_kinds_win() {
        let map = MemoryMap::from_regions([
            r(0, 0x4000, AcpiReclaimable),
            r(0x1000, 0x1000, AcpiNvs),
            r(0x2000, 0x1000, Bad),
            r(0x3000, 0x2000, Other(7)),
            r(0x3000, 0x1000, Reserved),
            r(0x4800, 0x100, Other(9)),
        ])
        .unwrap();
        assert_normalized(&map);
        assert_eq!(
            triples(&map),
            [
                (0, 0x1000, AcpiReclaimable),
                (0x1000, 0x2000, AcpiNvs),
                (0x2000, 0x3000, Bad),
                (0x3000, 0x4000, Reserved),
                (0x4000, 0x4800, Other(7)),
                (0x4800, 0x4900, Other(9)),
                (0x4900, 0x5000, Other(7)),
            ]
        );
    }

    #[test]
    fn zero_length_regions_are_ignored() {
        let map = MemoryMap::from_regions([
            r(0x1000, 0, Usable),
            r(u64::MAX, 0, Reserved),
            r(0x2000, 0x1000, Usable),
            r(0x2800, 0, Bad),
        ])
        .unwrap();
        assert_eq!(triples(&map), [(0x2000, 0x3000, Usable)]);
    }

    #[test]
    fn wrapping_regions_are_clipped() {
        let map = MemoryMap::from_regions([
            r(u64::MAX - 0xfff, 0x10_0000, Reserved),
            r(0xffff_0000_0000_0000, u64::MAX, Usable),
            r(1 << 40, u64::MAX, Usable),
        ])
        .unwrap();
        assert_normalized(&map);
        // Usable memory stops at the 52-bit limit; the region entirely above
        // it vanishes; the reserved one saturates at the top.
        assert_eq!(
            triples(&map),
            [
                (1 << 40, MAX_PHYS_ADDR, Usable),
                (u64::MAX - 0xfff, u64::MAX, Reserved)
            ]
        );
        assert_eq!(map.highest_usable_end(), MAX_PHYS_ADDR);
    }

    #[test]
    fn exclude_splits_and_trims() {
        let mut map =
            MemoryMap::from_regions([r(0, 0xa_0000, Usable), r(MIB, 127 * MIB, Usable)]).unwrap();
        let before = map.usable_bytes();
        // The low 1 MiB (covering one region whole and a gap).
        map.exclude(0, MIB).unwrap();
        assert_eq!(triples(&map), [(MIB, 128 * MIB, Usable)]);
        // The kernel image in the middle: split.
        map.exclude(2 * MIB, 0x3000).unwrap();
        assert_eq!(
            triples(&map),
            [
                (MIB, 2 * MIB, Usable),
                (2 * MIB + 0x3000, 128 * MIB, Usable)
            ]
        );
        // The head and the tail of a region.
        map.exclude(MIB, 0x1000).unwrap();
        map.exclude(127 * MIB, 10 * MIB).unwrap();
        assert_eq!(
            triples(&map),
            [
                (MIB + 0x1000, 2 * MIB, Usable),
                (2 * MIB + 0x3000, 127 * MIB, Usable)
            ]
        );
        assert_eq!(
            map.usable_bytes(),
            before - 0xa_0000 - 0x3000 - 0x1000 - MIB
        );
        assert_normalized(&map);
    }

    #[test]
    fn exclude_leaves_other_kinds_alone() {
        let mut map = MemoryMap::from_regions([
            r(0, 0x4000, Usable),
            r(0x4000, 0x1000, AcpiNvs),
            r(0x5000, 0x4000, Usable),
        ])
        .unwrap();
        map.exclude(0x3000, 0x3000).unwrap();
        assert_eq!(
            triples(&map),
            [
                (0, 0x3000, Usable),
                (0x4000, 0x5000, AcpiNvs),
                (0x6000, 0x9000, Usable)
            ]
        );
    }

    #[test]
    fn exclude_hostile_ranges() {
        let mut map = MemoryMap::from_regions([r(0x1000, 0x1000, Usable)]).unwrap();
        map.exclude(0x1800, 0).unwrap();
        assert_eq!(map.usable_bytes(), 0x1000);
        map.exclude(u64::MAX, u64::MAX).unwrap();
        assert_eq!(map.usable_bytes(), 0x1000);
        map.exclude(0x1800, u64::MAX).unwrap();
        assert_eq!(triples(&map), [(0x1000, 0x1800, Usable)]);
    }

    #[test]
    fn capacity_overflow_is_an_error_and_changes_nothing() {
        // Every other 4 KiB page usable: MAX_REGIONS regions that cannot merge.
        let pages = (0..MAX_REGIONS as u64).map(|i| r(i * 0x2000, 0x1000, Usable));
        let mut map = MemoryMap::from_regions(pages).unwrap();
        assert_eq!(map.len(), MAX_REGIONS);
        let snapshot = triples(&map);
        assert_eq!(
            map.insert(r(1 << 40, 0x1000, Usable)),
            Err(MemMapError::TooManyRegions)
        );
        // Splitting a region in two needs one more slot.
        assert_eq!(map.exclude(0x400, 0x100), Err(MemMapError::TooManyRegions));
        assert_eq!(triples(&map), snapshot);
        // Filling every gap makes it one region.
        map.insert(r(0, MAX_REGIONS as u64 * 0x2000, Usable))
            .unwrap();
        assert_eq!(map.len(), 1);
        // Shrinking works at capacity: removing whole regions needs no slot.
        let mut full =
            MemoryMap::from_regions((0..MAX_REGIONS as u64).map(|i| r(i * 0x2000, 0x1000, Usable)))
                .unwrap();
        full.exclude(0, 0x4000).unwrap();
        assert_eq!(full.len(), MAX_REGIONS - 2);
        let too_many = (0..MAX_REGIONS as u64 + 1).map(|i| r(i * 0x2000, 0x1000, Usable));
        assert_eq!(
            MemoryMap::from_regions(too_many).unwrap_err(),
            MemMapError::TooManyRegions
        );
        assert!(MemMapError::TooManyRegions.to_string().contains("256"));
    }

    /// The randomized test's generator: the workspace's seeded one
    /// (fastrand).
    struct Rng(fastrand::Rng);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0.u64(..)
        }
    }

    #[test]
    fn randomized_against_a_byte_model() {
        const SPACE: u64 = 64;
        let kinds = [
            Usable,
            Reserved,
            AcpiReclaimable,
            AcpiNvs,
            Bad,
            Other(1),
            Other(2),
        ];
        let mut rng = Rng(fastrand::Rng::with_seed(0x1234_5678));
        for _ in 0..2000 {
            let mut model: [Option<RegionKind>; SPACE as usize] = [None; SPACE as usize];
            let mut map = MemoryMap::new();
            for _ in 0..rng.next() % 12 {
                let start = rng.next() % SPACE;
                let len = rng.next() % (SPACE - start + 1);
                if rng.next().is_multiple_of(4) {
                    map.exclude(start, len).unwrap();
                    for cell in &mut model[start as usize..(start + len) as usize] {
                        if *cell == Some(Usable) {
                            *cell = None;
                        }
                    }
                } else {
                    let kind = kinds[(rng.next() % kinds.len() as u64) as usize];
                    map.insert(r(start, len, kind)).unwrap();
                    for cell in &mut model[start as usize..(start + len) as usize] {
                        *cell = Some(cell.map_or(kind, |old| old.combine(kind)));
                    }
                }
                assert_normalized(&map);
                let mut got: [Option<RegionKind>; SPACE as usize] = [None; SPACE as usize];
                for region in map.regions() {
                    for cell in &mut got[region.start as usize..region.end() as usize] {
                        *cell = Some(region.kind);
                    }
                }
                assert_eq!(got, model, "{map:?}");
                let usable = model.iter().filter(|k| **k == Some(Usable)).count() as u64;
                assert_eq!(map.usable_bytes(), usable);
            }
        }
    }
}
