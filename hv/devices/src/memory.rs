//! Guest-physical memory as the loader and the ACPI builder see it.

use core::fmt;

/// A guest-physical memory the platform writes boot data into.
///
/// The kernel implements it over the guest's EPT-backed frames; the tests
/// over a `Vec<u8>`. Accesses are bounds-checked by the implementation: an
/// access that is not entirely inside guest RAM returns an error and writes
/// nothing.
pub trait GuestMemory {
    /// Size of guest RAM in bytes; RAM is `[0, size)`.
    fn size(&self) -> u64;
    /// Writes `bytes` at guest-physical `gpa`.
    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError>;
    /// Reads `buf.len()` bytes from guest-physical `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Writes `len` zero bytes at `gpa` (a BSS), in page-sized pieces.
    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        const ZEROS: [u8; 4096] = [0; 4096];
        let end = gpa.checked_add(len).ok_or(MemoryError { gpa, len })?;
        let mut at = gpa;
        while at < end {
            let chunk = (end - at).min(ZEROS.len() as u64);
            self.write(at, &ZEROS[..chunk as usize])?;
            at += chunk;
        }
        Ok(())
    }
}

/// An access outside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryError {
    /// First guest-physical address of the access.
    pub gpa: u64,
    /// Its length in bytes.
    pub len: u64,
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest-physical access {:#x}+{:#x} is outside guest RAM",
            self.gpa, self.len
        )
    }
}

/// A half-open guest-physical range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpaRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl GpaRange {
    /// `[start, end)`; an empty or inverted range holds nothing.
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    /// Whether the two ranges share a byte.
    pub fn overlaps(&self, other: &GpaRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn contains_range(&self, other: &GpaRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Length in bytes (0 for an inverted range).
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod fake {
    use super::{GuestMemory, MemoryError};

    /// Guest RAM backed by a vector, for tests.
    pub struct VecMemory(pub Vec<u8>);

    impl VecMemory {
        pub fn new(size: usize) -> Self {
            Self(vec![0; size])
        }

        fn range(&self, gpa: u64, len: usize) -> Result<core::ops::Range<usize>, MemoryError> {
            let error = MemoryError {
                gpa,
                len: len as u64,
            };
            let start = usize::try_from(gpa).map_err(|_| error)?;
            let end = start.checked_add(len).ok_or(error)?;
            if end > self.0.len() {
                return Err(error);
            }
            Ok(start..end)
        }

        pub fn u32_at(&self, gpa: u64) -> u32 {
            let mut b = [0; 4];
            self.read(gpa, &mut b).unwrap();
            u32::from_le_bytes(b)
        }

        pub fn u64_at(&self, gpa: u64) -> u64 {
            let mut b = [0; 8];
            self.read(gpa, &mut b).unwrap();
            u64::from_le_bytes(b)
        }

        pub fn bytes(&self, gpa: u64, len: usize) -> &[u8] {
            &self.0[gpa as usize..gpa as usize + len]
        }

        /// The NUL-terminated string at `gpa`.
        pub fn c_str(&self, gpa: u64) -> &[u8] {
            let start = gpa as usize;
            let len = self.0[start..].iter().position(|&b| b == 0).unwrap();
            &self.0[start..start + len]
        }
    }

    impl GuestMemory for VecMemory {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }

        fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
            let range = self.range(gpa, bytes.len())?;
            self.0[range].copy_from_slice(bytes);
            Ok(())
        }

        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            let range = self.range(gpa, buf.len())?;
            buf.copy_from_slice(&self.0[range]);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::VecMemory;
    use super::*;

    #[test]
    fn zero_fills_across_pages_and_refuses_out_of_range() {
        let mut mem = VecMemory(vec![0xAA; 3 * 4096]);
        mem.zero(100, 2 * 4096 + 5).unwrap();
        assert_eq!(mem.0[99], 0xAA);
        assert!(mem.0[100..100 + 2 * 4096 + 5].iter().all(|&b| b == 0));
        assert_eq!(mem.0[100 + 2 * 4096 + 5], 0xAA);
        assert!(mem.zero(3 * 4096 - 1, 2).is_err());
        assert!(mem.zero(u64::MAX, 2).is_err());
    }

    #[test]
    fn ranges_overlap_only_when_they_share_a_byte() {
        let a = GpaRange::new(0x1000, 0x2000);
        assert!(a.overlaps(&GpaRange::new(0x1fff, 0x3000)));
        assert!(!a.overlaps(&GpaRange::new(0x2000, 0x3000)));
        assert!(!a.overlaps(&GpaRange::new(0x0, 0x1000)));
        assert!(a.contains_range(&GpaRange::new(0x1000, 0x2000)));
        assert!(!a.contains_range(&GpaRange::new(0x1000, 0x2001)));
        assert_eq!(GpaRange::new(5, 1).len(), 0);
    }
}
