//! PCI configuration mechanism #1 (0xCF8 address, 0xCFC-0xCFF data) with
//! no device behind it: every configuration read returns all ones, so a
//! scan (kvm-unit-tests' `pci_find_dev`) finds nothing.

/// The address port.
pub const ADDRESS_PORT: u16 = 0xCF8;
/// The first data port.
pub const DATA_PORT: u16 = 0xCFC;

/// The host bridge's address latch.
#[derive(Debug, Clone, Default)]
pub struct PciNoDevices {
    address: u32,
}

impl PciNoDevices {
    /// A read of `size` bytes at `port` (0xCF8-0xCFF).
    pub fn read(&self, port: u16, size: u8) -> u32 {
        match port {
            // Only dword accesses reach the address register.
            ADDRESS_PORT if size == 4 => self.address,
            _ => all_ones(size),
        }
    }

    /// A write of `size` bytes at `port`: the address latch keeps the
    /// enable bit and the register number's dword alignment.
    pub fn write(&mut self, port: u16, size: u8, value: u32) {
        if port == ADDRESS_PORT && size == 4 {
            self.address = value & 0x80FF_FFFC;
        }
    }
}

/// All ones of `size` bytes: what a read of nothing returns.
pub fn all_ones(size: u8) -> u32 {
    match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => u32::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bus_scan_finds_no_device() {
        let mut pci = PciNoDevices::default();
        for devfn in 0..256u32 {
            pci.write(ADDRESS_PORT, 4, 1 << 31 | devfn << 8);
            assert_eq!(pci.read(DATA_PORT, 2), 0xFFFF, "vendor ID");
        }
        assert_eq!(pci.read(ADDRESS_PORT, 4), 1 << 31 | 255 << 8);
        assert_eq!(pci.read(DATA_PORT + 1, 1), 0xFF);
        pci.write(ADDRESS_PORT, 1, 0);
        assert_eq!(
            pci.read(ADDRESS_PORT, 4),
            1 << 31 | 255 << 8,
            "byte writes miss the latch"
        );
    }
}
