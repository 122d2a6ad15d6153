//! Where the crash-kernel reservation (`crashkernel=SIZE[@BASE]`) goes.
//!
//! [`reserve`] takes the reservation out of the usable memory of a
//! [`MemoryMap`] that by then only holds memory nothing else uses (the
//! kernel has already excluded its image, the boot modules and the loader's
//! data). With an explicit base the whole range must lie inside one usable
//! region. Without one it goes as high as it fits below 4 GiB, on a 16 MiB
//! boundary and never below 16 MiB:
//!
//! - below 4 GiB, because the purgatory and a 32-bit capture entry (PVH,
//!   the Linux boot protocol's 32-bit path) run with paging off or with
//!   32-bit tables and must reach the whole image;
//! - on 16 MiB boundaries, because a Linux capture kernel decompresses at
//!   or above its preferred load address, 16 MiB on Debian, and the
//!   reservation's start is where it will be loaded;
//! - as high as possible, because low memory is scarcer (the DMA zone of a
//!   capture kernel, the AP trampoline below 1 MiB).

use core::fmt;

use crate::cmdline::CrashKernelSpec;
use crate::memmap::MemoryMap;

/// An automatically placed reservation starts on a multiple of this.
pub const RESERVATION_ALIGN: u64 = 16 << 20;

/// An automatically placed reservation ends at or below this.
pub const PLACEMENT_LIMIT: u64 = 4 << 30;

/// Why no reservation was made. The map is unchanged in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashKernelError {
    /// The size is 0.
    EmptySize,
    /// `base + size` does not fit in 64 bits.
    Overflow,
    /// The explicit range is not inside one free usable region.
    NotUsableRam,
    /// No usable region below 4 GiB holds the reservation.
    NoFit,
    /// Excluding the range would need more regions than the map holds.
    MapFull,
}

impl CrashKernelError {
    /// The message the kernel logs and reports (`crashkernel.error`).
    pub fn message(self) -> &'static str {
        match self {
            Self::EmptySize => "the reservation's size is 0",
            Self::Overflow => "base + size overflows",
            Self::NotUsableRam => "the requested range is not free usable RAM",
            Self::NoFit => "no free RAM below 4 GiB holds the reservation",
            Self::MapFull => "the memory map is full",
        }
    }
}

impl fmt::Display for CrashKernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// Where `spec` would go in `map`, without changing it: the base address.
pub fn place(map: &MemoryMap, spec: CrashKernelSpec) -> Result<u64, CrashKernelError> {
    let size = spec.size;
    if size == 0 {
        return Err(CrashKernelError::EmptySize);
    }
    match spec.base {
        Some(base) => {
            let end = base.checked_add(size).ok_or(CrashKernelError::Overflow)?;
            map.usable()
                .any(|region| region.start <= base && end <= region.end())
                .then_some(base)
                .ok_or(CrashKernelError::NotUsableRam)
        }
        None => map
            .usable()
            .filter_map(|region| highest_fit(region.start, region.end(), size))
            .max()
            .ok_or(CrashKernelError::NoFit),
    }
}

/// The highest aligned base in `[start, end)` (clipped to the placement
/// limit, never below one alignment unit) that leaves room for `size` bytes.
fn highest_fit(start: u64, end: u64, size: u64) -> Option<u64> {
    let end = end.min(PLACEMENT_LIMIT);
    let base = end.checked_sub(size)? & !(RESERVATION_ALIGN - 1);
    (base >= start.max(RESERVATION_ALIGN)).then_some(base)
}

/// Places `spec` (see [`place`]) and takes it out of `map`'s usable memory.
/// Returns `(base, size)`. On error the map is unchanged.
pub fn reserve(map: &mut MemoryMap, spec: CrashKernelSpec) -> Result<(u64, u64), CrashKernelError> {
    let base = place(map, spec)?;
    map.exclude(base, spec.size)
        .map_err(|_| CrashKernelError::MapFull)?;
    Ok((base, spec.size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memmap::{MAX_REGIONS, MemoryRegion, RegionKind};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn map(regions: &[(u64, u64, RegionKind)]) -> MemoryMap {
        MemoryMap::from_regions(
            regions
                .iter()
                .map(|&(start, len, kind)| MemoryRegion::new(start, len, kind)),
        )
        .unwrap()
    }

    fn spec(size: u64, base: Option<u64>) -> CrashKernelSpec {
        CrashKernelSpec { size, base }
    }

    /// Whether any byte of `[start, start + len)` is still usable.
    fn overlaps_usable(map: &MemoryMap, start: u64, len: u64) -> bool {
        map.usable()
            .any(|region| region.start < start + len && start < region.end())
    }

    /// A QEMU-like map: low RAM, a hole below 4 GiB, RAM above 4 GiB.
    fn qemu_like() -> MemoryMap {
        map(&[
            (0, 0x9_fc00, RegionKind::Usable),
            (MIB, 3 * GIB - MIB, RegionKind::Usable),
            (3 * GIB, GIB, RegionKind::Reserved),
            (4 * GIB, 4 * GIB, RegionKind::Usable),
        ])
    }

    #[test]
    fn explicit_base_inside_usable_ram_is_taken_out_of_the_map() {
        let mut map = qemu_like();
        let before = map.usable_bytes();
        assert_eq!(
            reserve(&mut map, spec(256 * MIB, Some(512 * MIB))),
            Ok((512 * MIB, 256 * MIB))
        );
        assert!(!overlaps_usable(&map, 512 * MIB, 256 * MIB));
        assert_eq!(map.usable_bytes(), before - 256 * MIB);
        // Both neighbours stay usable.
        assert!(overlaps_usable(&map, 512 * MIB - 4096, 4096));
        assert!(overlaps_usable(&map, 768 * MIB, 4096));
    }

    #[test]
    fn explicit_base_may_be_unaligned_and_above_4_gib() {
        // The user's choice is honoured as given: only the free-RAM check
        // applies, not the automatic placement's rules.
        let mut map = qemu_like();
        assert_eq!(
            reserve(&mut map, spec(64 * MIB, Some(5 * GIB + 4096))),
            Ok((5 * GIB + 4096, 64 * MIB))
        );
    }

    #[test]
    fn explicit_base_outside_usable_ram_is_refused_and_the_map_unchanged() {
        for base in [
            3 * GIB,            // inside the reserved hole
            3 * GIB - 16 * MIB, // straddles the end of RAM into the hole
            0x9_0000,           // straddles low RAM and the gap above it
            16 * GIB,           // beyond everything
        ] {
            let mut map = qemu_like();
            let before = map.clone();
            assert_eq!(
                reserve(&mut map, spec(64 * MIB, Some(base))),
                Err(CrashKernelError::NotUsableRam),
                "base {base:#x}"
            );
            assert_eq!(map.regions(), before.regions());
        }
    }

    #[test]
    fn explicit_range_across_two_touching_regions_of_another_kind_is_refused() {
        // Usable, then ACPI tables, then usable: the range covers all three.
        let map = map(&[
            (MIB, 63 * MIB, RegionKind::Usable),
            (64 * MIB, MIB, RegionKind::AcpiReclaimable),
            (65 * MIB, 63 * MIB, RegionKind::Usable),
        ]);
        assert_eq!(
            place(&map, spec(32 * MIB, Some(48 * MIB))),
            Err(CrashKernelError::NotUsableRam)
        );
    }

    #[test]
    fn base_plus_size_overflow_is_an_error() {
        let map = qemu_like();
        assert_eq!(
            place(&map, spec(8192, Some(u64::MAX - 4095))),
            Err(CrashKernelError::Overflow)
        );
        assert_eq!(
            place(&map, spec(u64::MAX, Some(4096))),
            Err(CrashKernelError::Overflow)
        );
    }

    #[test]
    fn zero_size_is_an_error() {
        let map = qemu_like();
        assert_eq!(place(&map, spec(0, None)), Err(CrashKernelError::EmptySize));
        assert_eq!(
            place(&map, spec(0, Some(MIB))),
            Err(CrashKernelError::EmptySize)
        );
    }

    #[test]
    fn automatic_placement_is_the_highest_fit_below_4_gib() {
        let mut map = qemu_like();
        // RAM above 4 GiB is bigger and higher, but out of reach.
        assert_eq!(
            reserve(&mut map, spec(256 * MIB, None)),
            Ok((3 * GIB - 256 * MIB, 256 * MIB))
        );
        assert!(!overlaps_usable(&map, 3 * GIB - 256 * MIB, 256 * MIB));
    }

    #[test]
    fn automatic_placement_clips_a_region_that_crosses_4_gib() {
        let map = map(&[(MIB, 8 * GIB, RegionKind::Usable)]);
        assert_eq!(place(&map, spec(64 * MIB, None)), Ok(4 * GIB - 64 * MIB));
    }

    #[test]
    fn automatic_placement_is_16_mib_aligned() {
        // RAM ends 1 MiB + 4 KiB past a 16 MiB boundary.
        let end = 2 * GIB + MIB + 4096;
        let map = map(&[(MIB, end - MIB, RegionKind::Usable)]);
        let base = place(&map, spec(100 * MIB, None)).unwrap();
        assert_eq!(base % RESERVATION_ALIGN, 0);
        assert!(base + 100 * MIB <= end);
        // The highest aligned base that fits, not merely an aligned one.
        assert_eq!(
            base,
            (end - 100 * MIB) / RESERVATION_ALIGN * RESERVATION_ALIGN
        );
        assert!(base + RESERVATION_ALIGN + 100 * MIB > end);
    }

    #[test]
    fn automatic_placement_prefers_a_lower_region_when_the_higher_cannot_hold_it() {
        // The high region is too small once aligned; the low one fits.
        let map = map(&[
            (16 * MIB, 512 * MIB, RegionKind::Usable),
            (2 * GIB + 8 * MIB, 40 * MIB, RegionKind::Usable),
        ]);
        assert_eq!(place(&map, spec(64 * MIB, None)), Ok(528 * MIB - 64 * MIB));
    }

    #[test]
    fn automatic_placement_never_goes_below_16_mib() {
        // 15 MiB of RAM at 1 MiB would hold 8 MiB, but only below 16 MiB.
        let map = map(&[(MIB, 15 * MIB, RegionKind::Usable)]);
        assert_eq!(
            place(&map, spec(8 * MIB, None)),
            Err(CrashKernelError::NoFit)
        );
    }

    #[test]
    fn no_fit_leaves_the_map_unchanged() {
        let mut map = map(&[
            (MIB, 100 * MIB, RegionKind::Usable),
            (4 * GIB, 64 * GIB, RegionKind::Usable),
        ]);
        let before = map.clone();
        assert_eq!(
            reserve(&mut map, spec(512 * MIB, None)),
            Err(CrashKernelError::NoFit)
        );
        assert_eq!(map.regions(), before.regions());
        assert_eq!(
            CrashKernelError::NoFit.message(),
            "no free RAM below 4 GiB holds the reservation"
        );
    }

    #[test]
    fn a_full_map_is_reported_and_left_unchanged() {
        // MAX_REGIONS regions alternating usable and reserved: carving a
        // hole out of the middle of a usable one needs one region more.
        let regions: std::vec::Vec<_> = (0..MAX_REGIONS as u64)
            .map(|i| {
                let kind = if i % 2 == 0 {
                    RegionKind::Usable
                } else {
                    RegionKind::Reserved
                };
                (i * 64 * MIB, 64 * MIB, kind)
            })
            .collect();
        let mut map = map(&regions);
        assert_eq!(map.len(), MAX_REGIONS);
        let before = map.clone();
        assert_eq!(
            reserve(&mut map, spec(16 * MIB, Some(16 * MIB))),
            Err(CrashKernelError::MapFull)
        );
        assert_eq!(map.regions(), before.regions());
    }
}
