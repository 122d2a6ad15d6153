//! QEMU's `pc-testdev`, which kvm-unit-tests are run with:
//!
//! - 0xE0-0xE3: a 32-bit register that reads back what was written, at any
//!   width and byte offset (`realmode`'s I/O tests);
//! - 0xE4-0xE7: "flush page": under QEMU, a write of a guest-physical
//!   address makes the host drop that page's mapping (`eventinj` uses it to
//!   take an EPT/NPT fault during event delivery). Here it is reported to
//!   the caller, which may drop the page from the EPT;
//! - 0x2000-0x2017: IRQ lines: writing `v` to `0x2000 + n` sets GSI `n` to
//!   `v != 0` (`ioapic`, `realmode`'s STI-shadow test).

/// The data register's first port.
pub const DATA_PORT: u16 = 0xE0;
/// The flush-page port.
pub const FLUSH_PAGE_PORT: u16 = 0xE4;
/// The first IRQ-line port.
pub const IRQ_PORT: u16 = 0x2000;
/// IRQ lines (GSIs 0-23).
pub const IRQ_LINES: u16 = 24;

/// The device's one piece of state.
#[derive(Debug, Clone, Default)]
pub struct PcTestdev {
    data: u32,
}

fn mask(offset: u16, size: u8) -> (u32, u32) {
    let shift = u32::from(offset & 3) * 8;
    let bits = (u32::from(size) * 8).min(32 - shift);
    let mask = if bits == 32 {
        u32::MAX
    } else {
        ((1u32 << bits) - 1) << shift
    };
    (mask, shift)
}

impl PcTestdev {
    /// A read of `size` bytes at `DATA_PORT + offset`.
    pub fn read_data(&self, offset: u16, size: u8) -> u32 {
        let (mask, shift) = mask(offset, size);
        (self.data & mask) >> shift
    }

    /// A write of `size` bytes at `DATA_PORT + offset`.
    pub fn write_data(&mut self, offset: u16, size: u8, value: u32) {
        let (mask, shift) = mask(offset, size);
        self.data = (self.data & !mask) | ((value << shift) & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_register_reads_back_at_every_width() {
        let mut dev = PcTestdev::default();
        dev.write_data(0, 4, 0x1234_5678);
        assert_eq!(dev.read_data(0, 4), 0x1234_5678);
        assert_eq!(dev.read_data(0, 2), 0x5678);
        assert_eq!(dev.read_data(2, 2), 0x1234);
        assert_eq!(dev.read_data(3, 1), 0x12);
        dev.write_data(1, 1, 0xAB);
        assert_eq!(dev.read_data(0, 4), 0x1234_AB78);
        dev.write_data(0, 1, 0xEF);
        assert_eq!(dev.read_data(0, 1), 0xEF);
        // A 4-byte access at offset 2 sees only the bytes that exist.
        assert_eq!(dev.read_data(2, 4), 0x1234);
    }
}
