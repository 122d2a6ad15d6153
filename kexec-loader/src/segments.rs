//! The memory a dump describes: the firmware's RAM outside the crash
//! reservation, as the `PT_LOAD` segments of the ELF core header
//! ([`crate::elfcore::write_core_header`]).
//!
//! The reservation is the capture kernel's own memory, so it is left out;
//! everything else that was RAM (the crashed hypervisor, its guests) is in.
//! The hypervisor runs identity-mapped, so each segment's virtual address
//! is its physical one and gdb resolves symbols against the dump.
//!
//! The list is built into a caller-provided slice, sized at boot (no
//! allocation in the crash path); a list that does not fit is an error,
//! never a shorter list: a dump silently missing memory is worse than no
//! capture kernel, which the boot log names.

use core::fmt;

use hv_abi::e820::E820_RAM;

use crate::PhysRange;
use crate::boot_params::E820Entry;
use crate::elfcore::MemorySegment;

/// Why the segment list could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentsError {
    /// The crash reservation is empty or its end overflows.
    BadReservation(PhysRange),
    /// The RAM outside the reservation needs more segments than the
    /// output holds.
    TooManySegments {
        /// Segments needed.
        needed: usize,
        /// Segments the output holds.
        capacity: usize,
    },
}

impl fmt::Display for SegmentsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadReservation(range) => {
                write!(f, "the crash reservation {range} is empty or overflows")
            }
            Self::TooManySegments { needed, capacity } => write!(
                f,
                "the RAM outside the crash reservation needs {needed} dump segments, room was \
                 made for {capacity}"
            ),
        }
    }
}

/// Writes the firmware's RAM (`firmware` entries of type 1, in any order,
/// overlapping or not) less `reservation` into `out` as identity-mapped
/// segments, sorted by address, with overlapping or touching ranges merged.
/// Returns how many it wrote; if they do not all fit, nothing usable is
/// left in `out` and the error says how many are needed.
///
/// An entry whose end overflows is clipped to the end of the address space.
pub fn ram_outside_reservation(
    firmware: &[E820Entry],
    reservation: PhysRange,
    out: &mut [MemorySegment],
) -> Result<usize, SegmentsError> {
    let reservation_end = match reservation.end() {
        Some(end) if reservation.len > 0 => end,
        _ => return Err(SegmentsError::BadReservation(reservation)),
    };
    // The RAM pieces on either side of the reservation, unmerged.
    let pieces = || {
        firmware
            .iter()
            .filter(|entry| entry.kind == E820_RAM)
            .flat_map(move |entry| {
                let end = entry.addr.saturating_add(entry.size);
                [
                    (entry.addr, end.min(reservation.start)),
                    (entry.addr.max(reservation_end), end),
                ]
            })
            .filter(|&(start, end)| end > start)
    };
    // A sweep up the address space: each round emits the lowest merged
    // range above the previous one. Quadratic in the pieces at worst, a few
    // hundred at boot; no sorting, no allocation.
    let mut count = 0usize;
    let mut cursor: Option<u64> = None;
    loop {
        let above = |start: u64| cursor.is_none_or(|cursor| start > cursor);
        let Some(start) = pieces().map(|(start, _)| start).filter(|&s| above(s)).min() else {
            break;
        };
        // Grow the range while a piece starts inside it or touches its end.
        let mut end = start;
        loop {
            let grown = pieces()
                .filter(|&(s, e)| s <= end && e > end)
                .map(|(_, e)| e)
                .max();
            match grown {
                Some(grown) => end = grown,
                None => break,
            }
        }
        if let Some(slot) = out.get_mut(count) {
            *slot = MemorySegment {
                phys: start,
                virt: start,
                len: end - start,
            };
        }
        count += 1;
        cursor = Some(end);
    }
    if count > out.len() {
        return Err(SegmentsError::TooManySegments {
            needed: count,
            capacity: out.len(),
        });
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot_params::{E820_ACPI, E820_RESERVED};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const EMPTY: MemorySegment = MemorySegment {
        phys: 0,
        virt: 0,
        len: 0,
    };

    fn ranges(segments: &[MemorySegment]) -> Vec<(u64, u64)> {
        segments
            .iter()
            .inspect(|s| assert_eq!(s.virt, s.phys, "identity-mapped"))
            .map(|s| (s.phys, s.len))
            .collect()
    }

    fn build(
        firmware: &[E820Entry],
        reservation: PhysRange,
        capacity: usize,
    ) -> Result<Vec<(u64, u64)>, SegmentsError> {
        let mut out = vec![EMPTY; capacity];
        let count = ram_outside_reservation(firmware, reservation, &mut out)?;
        Ok(ranges(&out[..count]))
    }

    #[test]
    fn the_dump_has_all_ram_but_the_reservation() {
        let firmware = [
            E820Entry::new(0, 0x9fc00, E820_RAM),
            E820Entry::new(0x9fc00, 0x400, E820_RESERVED),
            E820Entry::new(0x10_0000, 3 * GIB - 0x10_0000, E820_RAM),
            E820Entry::new(3 * GIB, MIB, E820_ACPI),
            E820Entry::new(4 * GIB, 4 * GIB, E820_RAM),
        ];
        let reservation = PhysRange::new(GIB, 256 * MIB);
        assert_eq!(
            build(&firmware, reservation, 8).unwrap(),
            [
                (0, 0x9fc00),
                (0x10_0000, GIB - 0x10_0000),
                (GIB + 256 * MIB, 2 * GIB - 256 * MIB),
                (4 * GIB, 4 * GIB),
            ]
        );
        // A reservation at the start of a RAM range leaves one piece of it.
        let at_start = PhysRange::new(4 * GIB, GIB);
        assert_eq!(
            build(&firmware, at_start, 8).unwrap(),
            [
                (0, 0x9fc00),
                (0x10_0000, 3 * GIB - 0x10_0000),
                (5 * GIB, 3 * GIB)
            ]
        );
    }

    #[test]
    fn unsorted_overlapping_and_touching_ram_is_merged() {
        let firmware = [
            E820Entry::new(2 * GIB, GIB, E820_RAM),
            E820Entry::new(8 * GIB, MIB, E820_RAM),
            E820Entry::new(MIB, GIB, E820_RAM),
            E820Entry::new(GIB + MIB, GIB - MIB, E820_RAM), // touches both
            E820Entry::new(7 * GIB, GIB, E820_RAM),         // touches the 8 GiB one
            E820Entry::new(5 * GIB, 0, E820_RAM),           // empty
            E820Entry::new(6 * GIB, MIB, E820_RESERVED),    // not RAM
        ];
        let reservation = PhysRange::new(16 * GIB, MIB);
        assert_eq!(
            build(&firmware, reservation, 2).unwrap(),
            [(MIB, 3 * GIB - MIB), (7 * GIB, GIB + MIB)]
        );
        // One range over everything merges it all.
        let mut covering = firmware.to_vec();
        covering.push(E820Entry::new(0, 9 * GIB, E820_RAM));
        assert_eq!(build(&covering, reservation, 1).unwrap(), [(0, 9 * GIB)]);
    }

    #[test]
    fn a_list_that_does_not_fit_is_an_error_not_a_shorter_list() {
        // 300 RAM ranges: the kernel's old list kept 64 of them.
        let firmware: Vec<_> = (0..300u64)
            .map(|i| E820Entry::new(4 * GIB + i * 2 * MIB, MIB, E820_RAM))
            .collect();
        let reservation = PhysRange::new(GIB, 256 * MIB);
        assert_eq!(build(&firmware, reservation, 300).unwrap().len(), 300);
        assert_eq!(
            build(&firmware, reservation, 299).unwrap_err(),
            SegmentsError::TooManySegments {
                needed: 300,
                capacity: 299
            }
        );
        assert_eq!(
            build(&firmware, reservation, 0).unwrap_err(),
            SegmentsError::TooManySegments {
                needed: 300,
                capacity: 0
            }
        );
        // The reservation splitting a range needs one more.
        let one = [E820Entry::new(0, 4 * GIB, E820_RAM)];
        assert_eq!(
            build(&one, reservation, 1).unwrap_err(),
            SegmentsError::TooManySegments {
                needed: 2,
                capacity: 1
            }
        );
        assert_eq!(build(&one, reservation, 2).unwrap().len(), 2);
    }

    #[test]
    fn bad_reservations_and_wrapping_entries() {
        let firmware = [E820Entry::new(u64::MAX - 0xfff, 0x2000, E820_RAM)];
        for bad in [PhysRange::new(GIB, 0), PhysRange::new(u64::MAX, 2)] {
            assert_eq!(
                build(&firmware, bad, 4).unwrap_err(),
                SegmentsError::BadReservation(bad)
            );
        }
        assert_eq!(
            build(&firmware, PhysRange::new(GIB, MIB), 4).unwrap(),
            [(u64::MAX - 0xfff, 0xfff)]
        );
        // A reservation covering the entry's end leaves its start.
        let end = PhysRange::new(u64::MAX - 0x7ff, 0x7ff);
        assert_eq!(
            build(&firmware, end, 4).unwrap(),
            [(u64::MAX - 0xfff, 0x800)]
        );
    }

    #[test]
    fn random_maps_match_a_page_bitmap() {
        // Addresses in pages of a 64-page space, so a bitmap is the model.
        let mut rng = crate::testutil::Rng::new(0x7365_676d_656e);
        for _ in 0..2000 {
            let count = rng.below(12);
            let firmware: Vec<_> = (0..count)
                .map(|_| {
                    let start = rng.below(64) as u64;
                    let len = rng.below(16) as u64;
                    let kind = if rng.below(4) == 0 {
                        E820_RESERVED
                    } else {
                        E820_RAM
                    };
                    E820Entry::new(start * 4096, len * 4096, kind)
                })
                .collect();
            let reservation = PhysRange::new(
                rng.below(64) as u64 * 4096,
                (1 + rng.below(8)) as u64 * 4096,
            );
            let mut model = [false; 80];
            for entry in firmware.iter().filter(|e| e.kind == E820_RAM) {
                for page in entry.addr / 4096..(entry.addr + entry.size) / 4096 {
                    model[page as usize] = true;
                }
            }
            for page in reservation.start / 4096..(reservation.start + reservation.len) / 4096 {
                model[page as usize] = false;
            }
            let mut expected = Vec::new();
            let mut page = 0;
            while page < model.len() {
                if model[page] {
                    let start = page;
                    while page < model.len() && model[page] {
                        page += 1;
                    }
                    expected.push((start as u64 * 4096, (page - start) as u64 * 4096));
                } else {
                    page += 1;
                }
            }
            let capacity = rng.below(8);
            match build(&firmware, reservation, capacity) {
                Ok(got) => assert_eq!(got, expected, "{firmware:?} less {reservation}"),
                Err(SegmentsError::TooManySegments {
                    needed,
                    capacity: c,
                }) => {
                    assert_eq!((needed, c), (expected.len(), capacity));
                    assert!(needed > capacity);
                }
                Err(error) => panic!("{error}"),
            }
        }
    }

    #[test]
    fn every_error_has_a_message() {
        for error in [
            SegmentsError::BadReservation(PhysRange::new(1, 0)),
            SegmentsError::TooManySegments {
                needed: 65,
                capacity: 64,
            },
        ] {
            assert!(error.to_string().len() > 10);
        }
    }
}
