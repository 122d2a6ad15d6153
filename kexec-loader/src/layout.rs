//! Placement of the capture kernel's pieces inside the crash reservation.
//!
//! Everything the capture kernel needs lives inside the `crashkernel=`
//! reservation, which no guest and no hypervisor allocation ever touches:
//! the protected-mode kernel (with room for its `init_size`), the zero page,
//! the command line, the ELF core header written at crash time, and the
//! initrd. The rest of the reservation is the RAM the capture kernel runs in.
//!
//! The kernel goes first, at the lowest address that is
//! - inside the reservation,
//! - a multiple of `kernel_alignment`, and
//! - at or above `pref_address`: the 64-bit entry of a relocatable kernel
//!   decompresses to `max(align_up(load, kernel_alignment), pref_address)`
//!   (`arch/x86/boot/compressed/head_64.S`), so loading it lower would make
//!   it write below the reservation, into the memory being dumped.
//!
//! The other pieces are page-aligned and packed first-fit, largest first,
//! into the gaps below and above `[load, load + init_size)`.

use core::fmt;

use crate::bytes::align_up;
use crate::bzimage::BzImage;
use crate::{PAGE_SIZE, PhysRange};

/// Size of the zero page (`struct boot_params`).
pub const ZERO_PAGE_LEN: u64 = 4096;

/// One of the pieces placed next to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// The initrd.
    Initrd,
    /// The ELF core header region.
    ElfCoreHeader,
    /// The command line.
    Cmdline,
    /// The zero page.
    ZeroPage,
}

impl fmt::Display for Piece {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Initrd => "initrd",
            Self::ElfCoreHeader => "ELF core header",
            Self::Cmdline => "command line",
            Self::ZeroPage => "zero page",
        })
    }
}

/// Why the pieces could not be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The reservation is empty.
    EmptyReservation,
    /// The reservation does not start and end on page boundaries.
    ReservationMisaligned(PhysRange),
    /// The reservation's end overflows the address space.
    ReservationOverflows(PhysRange),
    /// No properly aligned address at or above `pref_address` leaves room
    /// for `init_size` inside the reservation.
    KernelDoesNotFit {
        /// The reservation.
        reservation: PhysRange,
        /// The lowest address the kernel may be loaded at.
        lowest_load: u64,
        /// Bytes the kernel needs there.
        footprint: u64,
    },
    /// The ELF core header region was asked for with length 0.
    EmptyElfCoreHeader,
    /// A piece's length overflows when rounded up to a page.
    PieceTooLarge(Piece),
    /// No gap left in the reservation holds the piece.
    PieceDoesNotFit {
        /// Which piece.
        piece: Piece,
        /// Its page-rounded length.
        len: u64,
    },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyReservation => write!(f, "the crash reservation is empty"),
            Self::ReservationMisaligned(r) => {
                write!(f, "the crash reservation {r} is not page-aligned")
            }
            Self::ReservationOverflows(r) => {
                write!(f, "the crash reservation {r} overflows the address space")
            }
            Self::KernelDoesNotFit {
                reservation,
                lowest_load,
                footprint,
            } => write!(
                f,
                "the kernel needs {footprint:#x} bytes from {lowest_load:#x} (aligned, at or above pref_address), outside the reservation {reservation}"
            ),
            Self::EmptyElfCoreHeader => write!(f, "the ELF core header region has length 0"),
            Self::PieceTooLarge(piece) => write!(f, "the {piece} is too large"),
            Self::PieceDoesNotFit { piece, len } => write!(
                f,
                "no room left in the reservation for the {len:#x}-byte {piece}"
            ),
        }
    }
}

/// Where everything goes, all inside [`CaptureLayout::reservation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureLayout {
    /// The crash reservation.
    pub reservation: PhysRange,
    /// Load address of the protected-mode kernel and its footprint
    /// (`init_size` rounded up to a page).
    pub kernel: PhysRange,
    /// The 64-bit entry point: `kernel.start + 0x200`.
    pub entry: u64,
    /// The zero page: RSI at the jump.
    pub zero_page: PhysRange,
    /// The command line region: `cmdline_size + 1` bytes, page-rounded.
    pub cmdline: PhysRange,
    /// The ELF core header region, page-rounded. Excluded from the digests
    /// and marked reserved for the capture kernel.
    pub elfcorehdr: PhysRange,
    /// The initrd, with its exact length (its region is page-rounded).
    pub initrd: Option<PhysRange>,
}

/// A free range being carved from its start.
#[derive(Clone, Copy, Debug)]
struct Gap {
    start: u64,
    end: u64,
}

impl Gap {
    fn take(&mut self, len: u64) -> Option<PhysRange> {
        let end = self.start.checked_add(len)?;
        if end > self.end {
            return None;
        }
        let range = PhysRange::new(self.start, len);
        self.start = end;
        Some(range)
    }
}

impl CaptureLayout {
    /// Places `image`, an initrd of `initrd_len` bytes (0: none) and an ELF
    /// core header region of `elfcorehdr_len` bytes inside `reservation`.
    pub fn plan(
        reservation: PhysRange,
        image: &BzImage<'_>,
        initrd_len: u64,
        elfcorehdr_len: u64,
    ) -> Result<Self, LayoutError> {
        if reservation.len == 0 {
            return Err(LayoutError::EmptyReservation);
        }
        let res_end = reservation
            .end()
            .ok_or(LayoutError::ReservationOverflows(reservation))?;
        if !reservation.is_page_aligned() {
            return Err(LayoutError::ReservationMisaligned(reservation));
        }
        if elfcorehdr_len == 0 {
            return Err(LayoutError::EmptyElfCoreHeader);
        }

        let footprint = image.load_footprint();
        let lowest_load = align_up(
            reservation.start.max(image.pref_address()),
            image.alignment(),
        );
        let kernel_end = lowest_load.and_then(|load| load.checked_add(footprint));
        let (load, kernel_end) = match (lowest_load, kernel_end) {
            (Some(load), Some(end)) if end <= res_end => (load, end),
            _ => {
                return Err(LayoutError::KernelDoesNotFit {
                    reservation,
                    lowest_load: lowest_load.unwrap_or(u64::MAX),
                    footprint,
                });
            }
        };
        let mut gaps = [
            Gap {
                start: reservation.start,
                end: load,
            },
            Gap {
                start: kernel_end,
                end: res_end,
            },
        ];
        let mut place = |piece: Piece, len: u64| -> Result<PhysRange, LayoutError> {
            let rounded = align_up(len, PAGE_SIZE).ok_or(LayoutError::PieceTooLarge(piece))?;
            gaps.iter_mut()
                .find_map(|gap| gap.take(rounded))
                .ok_or(LayoutError::PieceDoesNotFit {
                    piece,
                    len: rounded,
                })
        };

        // Largest first packs best; the initrd is by far the largest.
        let initrd = if initrd_len == 0 {
            None
        } else {
            let region = place(Piece::Initrd, initrd_len)?;
            Some(PhysRange::new(region.start, initrd_len))
        };
        let elfcorehdr = place(Piece::ElfCoreHeader, elfcorehdr_len)?;
        let cmdline_len = u64::from(image.cmdline_size()) + 1;
        let cmdline = place(Piece::Cmdline, cmdline_len)?;
        let zero_page = place(Piece::ZeroPage, ZERO_PAGE_LEN)?;

        Ok(Self {
            reservation,
            kernel: PhysRange::new(load, footprint),
            // load + footprint did not overflow and footprint >= 0x200.
            entry: load.saturating_add(image.entry_offset()),
            zero_page,
            cmdline,
            elfcorehdr,
            initrd,
        })
    }

    /// Bytes of the reservation not used by any piece: the capture kernel's
    /// RAM beyond its own footprint.
    pub fn free_bytes(&self) -> u64 {
        let used = [
            Some(self.kernel),
            Some(self.zero_page),
            Some(self.cmdline),
            Some(self.elfcorehdr),
            self.initrd
                .map(|r| PhysRange::new(r.start, align_up(r.len, PAGE_SIZE).unwrap_or(r.len))),
        ]
        .into_iter()
        .flatten()
        .fold(0u64, |sum, r| sum.saturating_add(r.len));
        self.reservation.len.saturating_sub(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::FakeBzImage;

    const MIB: u64 = 1 << 20;

    fn image_bytes() -> Vec<u8> {
        FakeBzImage::default().build()
    }

    fn all_pieces(layout: &CaptureLayout) -> Vec<(Piece, PhysRange)> {
        let mut pieces = vec![
            (Piece::ZeroPage, layout.zero_page),
            (Piece::Cmdline, layout.cmdline),
            (Piece::ElfCoreHeader, layout.elfcorehdr),
        ];
        if let Some(initrd) = layout.initrd {
            pieces.push((Piece::Initrd, initrd));
        }
        pieces
    }

    fn assert_disjoint_and_inside(layout: &CaptureLayout) {
        let mut ranges = vec![layout.kernel];
        ranges.extend(all_pieces(layout).into_iter().map(|(_, r)| r));
        for (i, a) in ranges.iter().enumerate() {
            assert!(layout.reservation.contains(a), "{a} outside");
            for b in &ranges[i + 1..] {
                assert!(!a.overlaps(b), "{a} overlaps {b}");
            }
        }
    }

    #[test]
    fn a_high_reservation_puts_the_kernel_at_its_aligned_start() {
        let bytes = image_bytes();
        let image = BzImage::parse(&bytes).unwrap();
        let reservation = PhysRange::new(0x1_0000_0000 - 256 * MIB, 256 * MIB);
        let layout = CaptureLayout::plan(reservation, &image, 3 * MIB + 5, 0x2345).unwrap();
        assert_eq!(layout.kernel.start, reservation.start);
        assert_eq!(layout.entry, reservation.start + 0x200);
        assert_eq!(layout.kernel.len, image.load_footprint());
        let initrd = layout.initrd.unwrap();
        assert_eq!(initrd.len, 3 * MIB + 5);
        assert_eq!(layout.elfcorehdr.len, 0x3000);
        assert_eq!(layout.cmdline.len, 0x1000);
        assert_eq!(layout.zero_page.len, 0x1000);
        for (piece, range) in all_pieces(&layout) {
            assert_eq!(range.start % PAGE_SIZE, 0, "{piece}");
        }
        assert_disjoint_and_inside(&layout);
        assert_eq!(
            layout.free_bytes(),
            256 * MIB - image.load_footprint() - (3 * MIB + 0x1000) - 0x3000 - 0x2000
        );
    }

    #[test]
    fn a_misaligned_reservation_start_is_rounded_up_to_kernel_alignment() {
        let bytes = image_bytes();
        let image = BzImage::parse(&bytes).unwrap();
        let reservation = PhysRange::new(0x2000_1000, 64 * MIB);
        let layout = CaptureLayout::plan(reservation, &image, 0, 0x1000).unwrap();
        assert_eq!(layout.kernel.start, 0x2020_0000);
        assert_eq!(layout.initrd, None);
        // The small pieces fill the gap below the kernel first.
        assert!(layout.zero_page.start < layout.kernel.start);
        assert_disjoint_and_inside(&layout);
    }

    #[test]
    fn a_low_reservation_never_loads_the_kernel_below_pref_address() {
        let bytes = image_bytes();
        let image = BzImage::parse(&bytes).unwrap();
        let reservation = PhysRange::new(8 * MIB, 64 * MIB);
        let layout = CaptureLayout::plan(reservation, &image, MIB, 0x1000).unwrap();
        assert_eq!(layout.kernel.start, image.pref_address());
        assert_disjoint_and_inside(&layout);
    }

    #[test]
    fn a_reservation_ending_below_pref_address_is_refused() {
        let bytes = image_bytes();
        let image = BzImage::parse(&bytes).unwrap();
        let reservation = PhysRange::new(4 * MIB, 8 * MIB);
        assert_eq!(
            CaptureLayout::plan(reservation, &image, 0, 0x1000).unwrap_err(),
            LayoutError::KernelDoesNotFit {
                reservation,
                lowest_load: 16 * MIB,
                footprint: image.load_footprint()
            }
        );
    }

    #[test]
    fn bad_reservations_are_refused() {
        let bytes = image_bytes();
        let image = BzImage::parse(&bytes).unwrap();
        assert_eq!(
            CaptureLayout::plan(PhysRange::new(64 * MIB, 0), &image, 0, 1).unwrap_err(),
            LayoutError::EmptyReservation
        );
        let odd = PhysRange::new(64 * MIB + 1, 64 * MIB);
        assert_eq!(
            CaptureLayout::plan(odd, &image, 0, 1).unwrap_err(),
            LayoutError::ReservationMisaligned(odd)
        );
        let wrapping = PhysRange::new(u64::MAX - 0xfff, 0x2000);
        assert_eq!(
            CaptureLayout::plan(wrapping, &image, 0, 1).unwrap_err(),
            LayoutError::ReservationOverflows(wrapping)
        );
        let at_the_top = PhysRange::new(0xffff_ffff_fffb_f000, 0x4_0000);
        assert!(matches!(
            CaptureLayout::plan(at_the_top, &image, 0, 1).unwrap_err(),
            LayoutError::KernelDoesNotFit { .. }
        ));
    }

    #[test]
    fn pieces_that_do_not_fit_are_named() {
        let bytes = image_bytes();
        let image = BzImage::parse(&bytes).unwrap();
        let reservation = PhysRange::new(16 * MIB, 2 * MIB);
        assert_eq!(
            CaptureLayout::plan(reservation, &image, 4 * MIB, 0x1000).unwrap_err(),
            LayoutError::PieceDoesNotFit {
                piece: Piece::Initrd,
                len: 4 * MIB
            }
        );
        assert_eq!(
            CaptureLayout::plan(reservation, &image, u64::MAX, 0x1000).unwrap_err(),
            LayoutError::PieceTooLarge(Piece::Initrd)
        );
        assert_eq!(
            CaptureLayout::plan(reservation, &image, 0, 0).unwrap_err(),
            LayoutError::EmptyElfCoreHeader
        );
        // Room for everything but the last piece, the zero page.
        let tight = PhysRange::new(16 * MIB, image.load_footprint() + 0x1000 + 0x1000);
        assert_eq!(
            CaptureLayout::plan(tight, &image, 0, 0x1000).unwrap_err(),
            LayoutError::PieceDoesNotFit {
                piece: Piece::ZeroPage,
                len: 0x1000
            }
        );
        let errors = [
            LayoutError::EmptyReservation,
            LayoutError::ReservationMisaligned(reservation),
            LayoutError::ReservationOverflows(reservation),
            LayoutError::KernelDoesNotFit {
                reservation,
                lowest_load: 0,
                footprint: 0,
            },
            LayoutError::EmptyElfCoreHeader,
            LayoutError::PieceTooLarge(Piece::Cmdline),
            LayoutError::PieceDoesNotFit {
                piece: Piece::ElfCoreHeader,
                len: 1,
            },
        ];
        for error in errors {
            assert!(error.to_string().len() > 10, "{error:?}");
        }
    }
}
