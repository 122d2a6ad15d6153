//! Purgatory digests: a checksum of every segment loaded into the crash
//! reservation, taken at boot and checked in the crash path before the
//! jump. Two algorithms ([`Algorithm`]): XXH64, the default, fast enough
//! to check a whole capture image in the crash path's budget, and SHA-256
//! (`capture_digest=sha256`).
//!
//! A crash usually means something wrote where it should not have; the
//! capture kernel may be among the victims. Jumping into a corrupted kernel
//! would lose the dump and hide the cause, so the crash path recomputes
//! each digest from memory and refuses to jump on the first mismatch,
//! naming the segment.
//!
//! The ELF core header region is excluded by design: it is written at
//! crash time, after the digests were taken. A table built with
//! [`DigestTable::excluding`] refuses to record any segment overlapping it,
//! so the exclusion cannot be broken by accident.

use core::fmt;

use sha2::{Digest as _, Sha256};

use crate::PhysRange;

#[path = "../purgatory/xxh64.rs"]
pub mod xxh64;

/// A digest field: SHA-256, or XXH64 in its first 8 bytes (little-endian)
/// and zeros after.
pub type Digest = [u8; 32];

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Sha256Digest {
    Sha256::digest(bytes).into()
}

/// How a segment's bytes are summed. The purgatory's parameters carry the
/// same choice ([`Algorithm::code`]), so it checks with what was recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// XXH64 with seed 0: detects stray writes, about twenty times faster
    /// than SHA-256 under QEMU's TCG.
    #[default]
    Xxh64,
    /// SHA-256.
    Sha256,
}

impl Algorithm {
    /// The digest of `bytes`.
    pub fn digest(self, bytes: &[u8]) -> Digest {
        match self {
            Self::Xxh64 => xxh64::digest(bytes),
            Self::Sha256 => sha256(bytes),
        }
    }

    /// Its name in reports and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Xxh64 => "xxh64",
            Self::Sha256 => "sha256",
        }
    }

    /// Its value in the purgatory's parameters.
    pub const fn code(self) -> u64 {
        match self {
            Self::Xxh64 => crate::purgatory::abi::DIGEST_XXH64,
            Self::Sha256 => crate::purgatory::abi::DIGEST_SHA256,
        }
    }
}

/// One loaded segment and its digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentDigest {
    /// Where it was loaded.
    pub range: PhysRange,
    /// The table's [`Algorithm`] over its bytes at load time.
    pub digest: Digest,
}

/// Why a segment could not be recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestError {
    /// The table already holds its capacity.
    TableFull(usize),
    /// The segment has no bytes.
    EmptySegment(u64),
    /// The segment's end overflows the address space.
    SegmentOverflows(PhysRange),
    /// The segment overlaps one already recorded (at this index).
    OverlapsSegment {
        /// The new segment.
        range: PhysRange,
        /// Index of the recorded one.
        index: usize,
    },
    /// The segment overlaps the excluded (crash-time) region.
    OverlapsExcluded {
        /// The new segment.
        range: PhysRange,
        /// The excluded region.
        excluded: PhysRange,
    },
}

impl fmt::Display for DigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TableFull(n) => write!(f, "the digest table already holds {n} segments"),
            Self::EmptySegment(at) => write!(f, "the segment at {at:#x} is empty"),
            Self::SegmentOverflows(r) => write!(f, "the segment {r} overflows the address space"),
            Self::OverlapsSegment { range, index } => {
                write!(f, "the segment {range} overlaps recorded segment {index}")
            }
            Self::OverlapsExcluded { range, excluded } => write!(
                f,
                "the segment {range} overlaps {excluded}, which is written at crash time"
            ),
        }
    }
}

/// Why the crash path must not jump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyError {
    /// A segment's bytes changed since load time.
    Mismatch {
        /// Its index in the table.
        index: usize,
        /// Where it is.
        range: PhysRange,
    },
    /// A segment's bytes could not be read (the reader returned `None` or
    /// a slice of the wrong length).
    Unreadable {
        /// Its index in the table.
        index: usize,
        /// Where it is.
        range: PhysRange,
    },
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mismatch { index, range } => write!(
                f,
                "segment {index} at {range} changed since it was loaded: refusing to jump"
            ),
            Self::Unreadable { index, range } => write!(
                f,
                "segment {index} at {range} cannot be read: refusing to jump"
            ),
        }
    }
}

/// Up to `N` segment digests, in a fixed array: usable in a `static`, no
/// allocation, nothing to set up in the crash path.
#[derive(Clone, Debug)]
pub struct DigestTable<const N: usize> {
    entries: [SegmentDigest; N],
    len: usize,
    excluded: Option<PhysRange>,
    algorithm: Algorithm,
}

impl<const N: usize> Default for DigestTable<N> {
    fn default() -> Self {
        Self::new()
    }
}

const EMPTY: SegmentDigest = SegmentDigest {
    range: PhysRange::new(0, 0),
    digest: [0; 32],
};

impl<const N: usize> DigestTable<N> {
    /// An empty table, summing with the default [`Algorithm`].
    pub const fn new() -> Self {
        Self {
            entries: [EMPTY; N],
            len: 0,
            excluded: None,
            algorithm: Algorithm::Xxh64,
        }
    }

    /// An empty table that refuses segments overlapping `excluded` (the
    /// ELF core header region).
    pub const fn excluding(excluded: PhysRange) -> Self {
        Self {
            excluded: Some(excluded),
            ..Self::new()
        }
    }

    /// The same (empty) table, summing with `algorithm`.
    pub const fn with_algorithm(self, algorithm: Algorithm) -> Self {
        Self { algorithm, ..self }
    }

    /// How this table sums segments.
    pub const fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Records `bytes`, as just loaded at `start`.
    pub fn record(&mut self, start: u64, bytes: &[u8]) -> Result<(), DigestError> {
        let range = PhysRange::new(start, bytes.len() as u64);
        if bytes.is_empty() {
            return Err(DigestError::EmptySegment(start));
        }
        if range.end().is_none() {
            return Err(DigestError::SegmentOverflows(range));
        }
        if let Some(excluded) = self.excluded.filter(|e| e.overlaps(&range)) {
            return Err(DigestError::OverlapsExcluded { range, excluded });
        }
        if let Some(index) = self.entries().iter().position(|e| e.range.overlaps(&range)) {
            return Err(DigestError::OverlapsSegment { range, index });
        }
        let slot = self
            .entries
            .get_mut(self.len)
            .ok_or(DigestError::TableFull(N))?;
        *slot = SegmentDigest {
            range,
            digest: self.algorithm.digest(bytes),
        };
        self.len += 1;
        Ok(())
    }

    /// The recorded segments, in recording order.
    pub fn entries(&self) -> &[SegmentDigest] {
        self.entries.get(..self.len).unwrap_or_default()
    }

    /// Recomputes every digest from memory, in recording order, and returns
    /// the first segment that differs. `read(start, len)` gives the `len`
    /// bytes at physical address `start` (in the crash path: a slice over
    /// the identity map); `None` or a slice of another length counts as
    /// unreadable. An empty table verifies trivially.
    pub fn verify<'m, F>(&self, mut read: F) -> Result<(), VerifyError>
    where
        F: FnMut(u64, usize) -> Option<&'m [u8]>,
    {
        for (index, entry) in self.entries().iter().enumerate() {
            let range = entry.range;
            let unreadable = VerifyError::Unreadable { index, range };
            let len = usize::try_from(range.len).map_err(|_| unreadable)?;
            let bytes = read(range.start, len).ok_or(unreadable)?;
            if bytes.len() != len {
                return Err(unreadable);
            }
            if self.algorithm.digest(bytes) != entry.digest {
                return Err(VerifyError::Mismatch { index, range });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake physical memory window starting at `base`.
    struct Memory {
        base: u64,
        bytes: Vec<u8>,
    }

    impl Memory {
        fn new(base: u64, len: usize) -> Self {
            Self {
                base,
                bytes: (0..len).map(|i| (i * 31 % 251) as u8).collect(),
            }
        }

        fn slice(&self, start: u64, len: usize) -> &[u8] {
            let offset = (start - self.base) as usize;
            &self.bytes[offset..offset + len]
        }

        fn read(&self, start: u64, len: usize) -> Option<&[u8]> {
            let offset = usize::try_from(start.checked_sub(self.base)?).ok()?;
            self.bytes.get(offset..offset.checked_add(len)?)
        }
    }

    const BASE: u64 = 0x4000_0000;

    fn loaded(memory: &Memory) -> DigestTable<4> {
        loaded_with(memory, Algorithm::default())
    }

    fn loaded_with(memory: &Memory, algorithm: Algorithm) -> DigestTable<4> {
        let mut table =
            DigestTable::excluding(PhysRange::new(BASE + 0x3000, 0x1000)).with_algorithm(algorithm);
        table.record(BASE, memory.slice(BASE, 0x2000)).unwrap();
        table
            .record(BASE + 0x4000, memory.slice(BASE + 0x4000, 0x1800))
            .unwrap();
        table
            .record(BASE + 0x6000, memory.slice(BASE + 0x6000, 1))
            .unwrap();
        table
    }

    #[test]
    fn sha256_matches_the_standard_test_vector() {
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let hex: String = sha256(b"abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
    }

    #[test]
    fn xxh64_matches_an_independent_implementation() {
        assert_eq!(xxh64::xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        let data: Vec<u8> = (0..4099u32).map(|i| (i * 7 + i / 13) as u8).collect();
        // Every tail shape (stripes, 8-, 4- and 1-byte steps), two seeds.
        for len in (0..200).chain([1023, 1024, 4096, 4099]) {
            for seed in [0, 0x1234_5678_9abc_def0] {
                assert_eq!(
                    xxh64::xxh64(&data[..len], seed),
                    xxhash_rust::xxh64::xxh64(&data[..len], seed),
                    "len {len} seed {seed:#x}"
                );
            }
        }
        let digest = Algorithm::Xxh64.digest(b"abc");
        assert_eq!(
            digest[..8],
            xxhash_rust::xxh64::xxh64(b"abc", 0).to_le_bytes()
        );
        assert!(digest[8..].iter().all(|&b| b == 0));
        assert_eq!(Algorithm::Sha256.digest(b"abc"), sha256(b"abc"));
    }

    #[test]
    fn the_table_sums_with_its_algorithm() {
        let memory = Memory::new(BASE, 0x8000);
        for algorithm in [Algorithm::Xxh64, Algorithm::Sha256] {
            let table = loaded_with(&memory, algorithm);
            assert_eq!(table.algorithm(), algorithm);
            assert_eq!(
                table.entries()[0].digest,
                algorithm.digest(memory.slice(BASE, 0x2000))
            );
        }
        assert_eq!(Algorithm::default(), Algorithm::Xxh64);
        assert_ne!(Algorithm::Xxh64.code(), Algorithm::Sha256.code());
    }

    #[test]
    fn untouched_memory_verifies() {
        let memory = Memory::new(BASE, 0x8000);
        let table = loaded(&memory);
        assert_eq!(table.entries().len(), 3);
        assert_eq!(table.verify(|s, l| memory.read(s, l)), Ok(()));
    }

    #[test]
    fn writes_to_the_excluded_region_do_not_matter() {
        let mut memory = Memory::new(BASE, 0x8000);
        let table = loaded(&memory);
        memory.bytes[0x3000..0x4000].fill(0xEE); // the crash-time core header
        assert_eq!(table.verify(|s, l| memory.read(s, l)), Ok(()));
    }

    #[test]
    fn one_flipped_bit_is_found_and_named() {
        for (offset, index, range) in [
            (0x0, 0, PhysRange::new(BASE, 0x2000)),
            (0x1fff, 0, PhysRange::new(BASE, 0x2000)),
            (0x4abc, 1, PhysRange::new(BASE + 0x4000, 0x1800)),
            (0x6000, 2, PhysRange::new(BASE + 0x6000, 1)),
        ] {
            for algorithm in [Algorithm::Xxh64, Algorithm::Sha256] {
                let mut memory = Memory::new(BASE, 0x8000);
                let table = loaded_with(&memory, algorithm);
                memory.bytes[offset] ^= 0x10;
                assert_eq!(
                    table.verify(|s, l| memory.read(s, l)),
                    Err(VerifyError::Mismatch { index, range }),
                    "flip at {offset:#x} ({algorithm:?})"
                );
            }
        }
    }

    #[test]
    fn the_first_mismatch_is_reported() {
        let mut memory = Memory::new(BASE, 0x8000);
        let table = loaded(&memory);
        memory.bytes[0x6000] ^= 1;
        memory.bytes[0x4000] ^= 1;
        assert!(matches!(
            table.verify(|s, l| memory.read(s, l)),
            Err(VerifyError::Mismatch { index: 1, .. })
        ));
    }

    #[test]
    fn unreadable_or_short_memory_refuses_the_jump() {
        let memory = Memory::new(BASE, 0x8000);
        let table = loaded(&memory);
        assert_eq!(
            table.verify(|_, _| None),
            Err(VerifyError::Unreadable {
                index: 0,
                range: PhysRange::new(BASE, 0x2000)
            })
        );
        assert_eq!(
            table.verify(|s, l| memory.read(s, l - 1)),
            Err(VerifyError::Unreadable {
                index: 0,
                range: PhysRange::new(BASE, 0x2000)
            })
        );
    }

    #[test]
    fn an_empty_table_verifies_without_reading() {
        let table = DigestTable::<4>::new();
        let mut reads = 0;
        assert_eq!(
            table.verify(|_, _| {
                reads += 1;
                None
            }),
            Ok(())
        );
        assert_eq!(reads, 0);
    }

    #[test]
    fn bad_segments_are_refused() {
        let memory = Memory::new(BASE, 0x8000);
        let mut table = loaded(&memory);
        let bytes = memory.slice(BASE, 0x1000);
        assert_eq!(
            table.record(BASE + 0x3800, &bytes[..0x100]),
            Err(DigestError::OverlapsExcluded {
                range: PhysRange::new(BASE + 0x3800, 0x100),
                excluded: PhysRange::new(BASE + 0x3000, 0x1000)
            })
        );
        assert_eq!(
            table.record(BASE + 0x1fff, &bytes[..2]),
            Err(DigestError::OverlapsSegment {
                range: PhysRange::new(BASE + 0x1fff, 2),
                index: 0
            })
        );
        assert_eq!(
            table.record(BASE, &[]),
            Err(DigestError::EmptySegment(BASE))
        );
        assert_eq!(
            table.record(u64::MAX, &bytes[..2]),
            Err(DigestError::SegmentOverflows(PhysRange::new(u64::MAX, 2)))
        );
        table.record(BASE + 0x7000, &bytes[..16]).unwrap();
        assert_eq!(
            table.record(BASE + 0x7800, &bytes[..16]),
            Err(DigestError::TableFull(4))
        );
        assert_eq!(table.entries().len(), 4);
    }

    #[test]
    fn every_digest_error_has_a_message() {
        let r = PhysRange::new(0x1000, 0x1000);
        let texts = [
            DigestError::TableFull(1).to_string(),
            DigestError::EmptySegment(0).to_string(),
            DigestError::SegmentOverflows(r).to_string(),
            DigestError::OverlapsSegment { range: r, index: 0 }.to_string(),
            DigestError::OverlapsExcluded {
                range: r,
                excluded: r,
            }
            .to_string(),
            VerifyError::Mismatch { index: 0, range: r }.to_string(),
            VerifyError::Unreadable { index: 0, range: r }.to_string(),
        ];
        for text in texts {
            assert!(text.len() > 10, "{text}");
        }
        assert!(
            VerifyError::Mismatch { index: 2, range: r }
                .to_string()
                .contains("refusing to jump")
        );
    }
}
