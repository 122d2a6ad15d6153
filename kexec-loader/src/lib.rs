//! Capture-kernel reservation, image parsing and purgatory digests.
//!
//! Everything the hypervisor needs to kexec into a capture kernel after a
//! crash, the way Linux kdump does it, as hostile-input parsers and
//! allocation-free builders that write into caller-provided buffers:
//!
//! - [`bzimage`]: validates a Linux bzImage for the 64-bit boot protocol;
//! - [`layout`]: places the kernel, zero page, command line, ELF core header
//!   and initrd inside the `crashkernel=` reservation;
//! - [`boot_params`]: builds the zero page and the capture kernel's e820 map;
//! - [`cmdline`]: appends `elfcorehdr=` and `memmap=` to the user's arguments;
//! - [`elfcore`]: writes and reads the ELF core header (`/proc/vmcore` and
//!   `gdb` read it), with [`crash_note`] for the hypervisor's private note;
//! - [`digest`]: SHA-256 of every loaded segment, verified before the jump;
//! - [`purgatory`]: the purgatory area (blob, tables, its own digest
//!   table, seal), and the kernel's own sealed copy of the table;
//! - [`pvh`]: the other capture kernel, hv itself in capture mode: its ELF
//!   image, its placement and its PVH start info and memory map;
//! - [`segments`]: the RAM a dump describes, as the core header's segments.
//!
//! # At boot
//! 0. [`segments::ram_outside_reservation`]: the memory the dump will
//!    describe, which sizes the core header;
//! 1. [`bzimage::BzImage::parse`] the `capture` module (or, for the hv
//!    image, follow [`pvh`]'s steps instead of 1 to 3);
//! 2. [`layout::CaptureLayout::plan`] it into the reservation, sizing the
//!    core header with [`elfcore::core_header_len`] for the worst case;
//! 3. copy [`bzimage::BzImage::kernel_bytes`] and the initrd to their
//!    places, write the command line with
//!    [`cmdline::write_capture_cmdline`], the e820 map with
//!    [`boot_params::E820Table::for_capture`] and the zero page with
//!    [`boot_params::build_zero_page`];
//! 4. [`digest::DigestTable::record`] every placed segment except the core
//!    header.
//!
//! # In the crash path
//! 1. [`elfcore::write_core_header`] with [`elfcore::Placement::OldMemory`]
//!    into the core-header region;
//! 2. [`digest::DigestTable::verify`]; on a mismatch, refuse to jump;
//! 3. jump to [`layout::CaptureLayout::entry`] with RSI = the zero page, in
//!    64-bit mode with an identity map, as the 64-bit boot protocol asks.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod boot_params;
use hv_abi::bytes;
pub mod bzimage;
pub mod cmdline;
pub use hv_abi::crash_note;
pub mod digest;
pub mod elfcore;
pub mod layout;
pub mod purgatory;
pub mod pvh;
pub mod segments;

#[cfg(test)]
mod end_to_end;
#[cfg(test)]
mod robustness;
#[cfg(test)]
mod testutil;

use core::fmt;

/// The page size the capture kernel's pieces are aligned to.
pub const PAGE_SIZE: u64 = 4096;

/// A range of physical memory, `[start, start + len)`.
///
/// Any values can be held; the functions that take one check that it is
/// non-empty and that its end does not overflow before they use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PhysRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl PhysRange {
    /// The range `[start, start + len)`.
    pub const fn new(start: u64, len: u64) -> Self {
        Self { start, len }
    }

    /// One past the last byte, `None` if that overflows.
    pub const fn end(&self) -> Option<u64> {
        self.start.checked_add(self.len)
    }

    /// Whether `other` lies entirely inside `self` (both ends checked).
    pub fn contains(&self, other: &PhysRange) -> bool {
        match (self.end(), other.end()) {
            (Some(end), Some(other_end)) => other.start >= self.start && other_end <= end,
            _ => false,
        }
    }

    /// Whether both ends lie on page boundaries.
    pub const fn is_page_aligned(&self) -> bool {
        self.start.is_multiple_of(PAGE_SIZE) && self.len.is_multiple_of(PAGE_SIZE)
    }

    /// Whether the two ranges share at least one byte. Empty ranges overlap
    /// nothing; an end that overflows counts as the end of the address space.
    pub fn overlaps(&self, other: &PhysRange) -> bool {
        if self.len == 0 || other.len == 0 {
            return false;
        }
        let end = self.start.saturating_add(self.len);
        let other_end = other.start.saturating_add(other.len);
        self.start < other_end && other.start < end
    }
}

impl fmt::Display for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end() {
            Some(end) => write!(f, "[{:#x}, {:#x})", self.start, end),
            None => write!(f, "[{:#x}, +{:#x} overflowing)", self.start, self.len),
        }
    }
}

/// Any error of this crate, for callers that just report and disable
/// capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The capture kernel image was rejected.
    BzImage(bzimage::BzImageError),
    /// The pieces do not fit the reservation.
    Layout(layout::LayoutError),
    /// The zero page or its e820 map could not be built.
    BootParams(boot_params::BootParamsError),
    /// The capture kernel's command line could not be built.
    Cmdline(cmdline::CmdlineError),
    /// The ELF core header could not be written or read.
    ElfCore(elfcore::ElfCoreError),
    /// The hypervisor's crash note could not be written or read.
    CrashNote(crash_note::CrashNoteError),
    /// A segment digest could not be recorded.
    Digest(digest::DigestError),
    /// A loaded segment changed since its digest was taken.
    Verify(digest::VerifyError),
    /// The hv capture image or its PVH boot data was rejected.
    Pvh(pvh::PvhLoadError),
    /// The purgatory area could not be built.
    Purgatory(purgatory::BuildError),
    /// The dump's segment list could not be built.
    Segments(segments::SegmentsError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BzImage(e) => write!(f, "capture kernel image: {e}"),
            Self::Layout(e) => write!(f, "capture kernel layout: {e}"),
            Self::BootParams(e) => write!(f, "capture kernel boot_params: {e}"),
            Self::Cmdline(e) => write!(f, "capture kernel command line: {e}"),
            Self::ElfCore(e) => write!(f, "ELF core header: {e}"),
            Self::CrashNote(e) => write!(f, "crash note: {e}"),
            Self::Digest(e) => write!(f, "segment digest: {e}"),
            Self::Verify(e) => write!(f, "purgatory check: {e}"),
            Self::Pvh(e) => write!(f, "hv capture image: {e}"),
            Self::Purgatory(e) => write!(f, "purgatory: {e}"),
            Self::Segments(e) => write!(f, "dump segments: {e}"),
        }
    }
}

macro_rules! impl_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Self::$variant(e)
            }
        })*
    };
}

impl_from!(
    BzImage(bzimage::BzImageError),
    Layout(layout::LayoutError),
    BootParams(boot_params::BootParamsError),
    Cmdline(cmdline::CmdlineError),
    ElfCore(elfcore::ElfCoreError),
    CrashNote(crash_note::CrashNoteError),
    Digest(digest::DigestError),
    Verify(digest::VerifyError),
    Pvh(pvh::PvhLoadError),
    Purgatory(purgatory::BuildError),
    Segments(segments::SegmentsError),
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phys_range_end_is_checked() {
        assert_eq!(PhysRange::new(0x1000, 0x1000).end(), Some(0x2000));
        assert_eq!(PhysRange::new(u64::MAX, 1).end(), None);
    }

    #[test]
    fn phys_range_contains_checks_both_ends() {
        let outer = PhysRange::new(0x1000, 0x3000);
        assert!(outer.contains(&PhysRange::new(0x1000, 0x3000)));
        assert!(outer.contains(&PhysRange::new(0x2000, 0x1000)));
        assert!(!outer.contains(&PhysRange::new(0xfff, 0x10)));
        assert!(!outer.contains(&PhysRange::new(0x3fff, 2)));
        assert!(!outer.contains(&PhysRange::new(0x2000, u64::MAX)));
        assert!(!PhysRange::new(1, u64::MAX).contains(&PhysRange::new(2, 1)));
    }

    #[test]
    fn phys_range_overlap_ignores_empty_ranges_and_touching_ends() {
        let a = PhysRange::new(0x1000, 0x1000);
        assert!(a.overlaps(&PhysRange::new(0x1fff, 1)));
        assert!(!a.overlaps(&PhysRange::new(0x2000, 1)));
        assert!(!a.overlaps(&PhysRange::new(0x0, 0x1000)));
        assert!(!a.overlaps(&PhysRange::new(0x1800, 0)));
        assert!(a.overlaps(&PhysRange::new(0, u64::MAX)));
        assert!(PhysRange::new(u64::MAX - 1, 10).overlaps(&PhysRange::new(u64::MAX - 1, 1)));
    }

    #[test]
    fn errors_convert_and_name_their_module() {
        let e: Error = bzimage::BzImageError::NotRelocatable.into();
        let text = e.to_string();
        assert!(text.starts_with("capture kernel image: "), "{text}");
        assert!(text.contains("relocatable"), "{text}");
        assert_eq!(
            PhysRange::new(0x1000, 0x1000).to_string(),
            "[0x1000, 0x2000)"
        );
    }
}
