//! The e820 memory types, as firmware maps, the Linux zero page and the
//! PVH memory map all number them.

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;
/// ACPI tables, reclaimable after they are read.
pub const E820_ACPI: u32 = 3;
/// ACPI non-volatile storage.
pub const E820_NVS: u32 = 4;
/// Unusable (defective) memory.
pub const E820_UNUSABLE: u32 = 5;

/// A memory type by meaning; other firmware numbers are kept as they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// [`E820_RAM`].
    Ram,
    /// [`E820_RESERVED`].
    Reserved,
    /// [`E820_ACPI`].
    Acpi,
    /// [`E820_NVS`].
    Nvs,
    /// [`E820_UNUSABLE`].
    Unusable,
    /// Any other number (persistent memory, vendor types...): treated as
    /// reserved wherever a meaning is needed.
    Other(u32),
}

impl E820Kind {
    /// The kind of a raw e820 number.
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            E820_RAM => Self::Ram,
            E820_RESERVED => Self::Reserved,
            E820_ACPI => Self::Acpi,
            E820_NVS => Self::Nvs,
            E820_UNUSABLE => Self::Unusable,
            other => Self::Other(other),
        }
    }

    /// The raw e820 number.
    pub const fn raw(self) -> u32 {
        match self {
            Self::Ram => E820_RAM,
            Self::Reserved => E820_RESERVED,
            Self::Acpi => E820_ACPI,
            Self::Nvs => E820_NVS,
            Self::Unusable => E820_UNUSABLE,
            Self::Other(other) => other,
        }
    }

    /// The raw number for a map handed to another kernel: types it may not
    /// know become reserved.
    pub const fn raw_for_handover(self) -> u32 {
        match self {
            Self::Other(_) => E820_RESERVED,
            known => known.raw(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_numbers_round_trip() {
        for raw in 0..40 {
            assert_eq!(E820Kind::from_raw(raw).raw(), raw);
        }
        assert_eq!(E820Kind::from_raw(7).raw_for_handover(), E820_RESERVED);
        assert_eq!(E820Kind::Nvs.raw_for_handover(), E820_NVS);
    }
}
