//! A fixed-size set of dense CPU indices (0 is the boot CPU), for the
//! rendezvous: which CPUs are expected, which checked in, which did not.
//!
//! A bitmap rather than a slice or a `Vec`: the crash path runs without an
//! allocator, on a small NMI stack, and copies these sets around by value.

use core::fmt;

/// The most CPUs the crash path handles. Must equal `smp_boot::madt::MAX_CPUS`
/// (the kernel asserts this); kept here so this crate does not depend on the
/// bring-up crate.
pub const MAX_CPUS: usize = 512;

const WORDS: usize = MAX_CPUS / 64;

/// A CPU index was at or beyond [`CpuSet::CAPACITY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuOutOfRange {
    /// The offending index.
    pub cpu: usize,
}

impl fmt::Display for CpuOutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CPU index {} is beyond the {} CPUs the crash path handles",
            self.cpu, MAX_CPUS
        )
    }
}

impl core::error::Error for CpuOutOfRange {}

/// A set of CPU indices below [`CpuSet::CAPACITY`], iterated in ascending order.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuSet {
    words: [u64; WORDS],
}

impl CpuSet {
    /// How many CPU indices a set can hold.
    pub const CAPACITY: usize = MAX_CPUS;

    /// The empty set.
    pub const fn new() -> Self {
        Self { words: [0; WORDS] }
    }

    /// CPUs `0..count` (capped at [`Self::CAPACITY`]): every CPU of a run
    /// that numbers its CPUs densely.
    pub fn first(count: usize) -> Self {
        let mut set = Self::new();
        for cpu in 0..count.min(Self::CAPACITY) {
            set.words[cpu / 64] |= 1 << (cpu % 64);
        }
        set
    }

    /// The set holding exactly `cpus`.
    pub fn from_cpus(cpus: &[usize]) -> Result<Self, CpuOutOfRange> {
        let mut set = Self::new();
        for &cpu in cpus {
            set.insert(cpu)?;
        }
        Ok(set)
    }

    /// Adds `cpu`. Adding a CPU that is already present changes nothing.
    pub fn insert(&mut self, cpu: usize) -> Result<(), CpuOutOfRange> {
        if cpu >= Self::CAPACITY {
            return Err(CpuOutOfRange { cpu });
        }
        self.words[cpu / 64] |= 1 << (cpu % 64);
        Ok(())
    }

    /// Removes `cpu`; returns whether it was present.
    pub fn remove(&mut self, cpu: usize) -> bool {
        let present = self.contains(cpu);
        if present {
            self.words[cpu / 64] &= !(1 << (cpu % 64));
        }
        present
    }

    /// Whether `cpu` is in the set (never for indices beyond the capacity).
    pub fn contains(&self, cpu: usize) -> bool {
        cpu < Self::CAPACITY && self.words[cpu / 64] & (1 << (cpu % 64)) != 0
    }

    /// How many CPUs the set holds.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The CPUs in `self` but not in `other`.
    pub fn difference(&self, other: &Self) -> Self {
        let mut out = *self;
        for (word, other) in out.words.iter_mut().zip(other.words) {
            *word &= !other;
        }
        out
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> CpuSetIter {
        CpuSetIter {
            words: self.words,
            word: 0,
        }
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl IntoIterator for &CpuSet {
    type Item = usize;
    type IntoIter = CpuSetIter;

    fn into_iter(self) -> CpuSetIter {
        self.iter()
    }
}

/// Iterator over a [`CpuSet`] (a copy of it: the set may change meanwhile).
#[derive(Debug, Clone)]
pub struct CpuSetIter {
    words: [u64; WORDS],
    word: usize,
}

impl Iterator for CpuSetIter {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.word < WORDS {
            let bits = self.words[self.word];
            if bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                self.words[self.word] = bits & (bits - 1);
                return Some(self.word * 64 + bit);
            }
            self.word += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterates_in_ascending_order_across_words() {
        let set = CpuSet::from_cpus(&[511, 0, 64, 63, 130]).unwrap();
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 63, 64, 130, 511]);
        assert_eq!(set.len(), 5);
        assert_eq!(format!("{set:?}"), "{0, 63, 64, 130, 511}");
    }

    #[test]
    fn rejects_indices_beyond_capacity_instead_of_dropping_them() {
        let mut set = CpuSet::new();
        assert_eq!(set.insert(512), Err(CpuOutOfRange { cpu: 512 }));
        assert!(set.is_empty());
        assert!(!set.contains(512));
        assert!(!set.remove(10_000));
        assert!(CpuSet::from_cpus(&[1, 600]).is_err());
    }

    #[test]
    fn first_and_difference_give_everyone_but_self() {
        let everyone = CpuSet::first(5);
        let others = everyone.difference(&CpuSet::from_cpus(&[2]).unwrap());
        assert_eq!(others.iter().collect::<Vec<_>>(), [0, 1, 3, 4]);
        assert_eq!(CpuSet::first(100_000).len(), MAX_CPUS);
    }

    #[test]
    fn remove_reports_presence_and_insert_is_idempotent() {
        let mut set = CpuSet::new();
        set.insert(7).unwrap();
        set.insert(7).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.remove(7));
        assert!(!set.remove(7));
        assert!(set.is_empty());
    }
}
