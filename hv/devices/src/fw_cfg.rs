//! QEMU's fw_cfg, legacy I/O interface: a 16-bit selector at 0x510, a byte
//! data port at 0x511 that walks the selected item. No DMA interface.
//!
//! The items are those `lib/x86/fwcfg.c` of kvm-unit-tests reads (number of
//! CPUs, RAM size), the signature and interface ID a prober checks first,
//! and an empty file directory. Unknown keys read as zeros, as under QEMU.

/// Selector port.
pub const SELECTOR_PORT: u16 = 0x510;
/// Data port.
pub const DATA_PORT: u16 = 0x511;

/// "QEMU".
pub const KEY_SIGNATURE: u16 = 0x00;
/// Interface features: bit 0 = the traditional interface.
pub const KEY_ID: u16 = 0x01;
/// RAM size in bytes, u64.
pub const KEY_RAM_SIZE: u16 = 0x03;
/// No graphics console, u16.
pub const KEY_NOGRAPHIC: u16 = 0x04;
/// Number of CPUs, u16 (read by `fwcfg_get_nb_cpus`).
pub const KEY_NB_CPUS: u16 = 0x05;
/// Maximum number of CPUs, u16.
pub const KEY_MAX_CPUS: u16 = 0x0F;
/// File directory: a big-endian count, then entries.
pub const KEY_FILE_DIR: u16 = 0x19;

/// The device.
#[derive(Debug, Clone)]
pub struct FwCfg {
    selector: u16,
    offset: u32,
    cpus: u16,
    ram_bytes: u64,
}

impl FwCfg {
    /// A device describing `cpus` vCPUs and `ram_bytes` of RAM.
    pub const fn new(cpus: u16, ram_bytes: u64) -> Self {
        Self {
            selector: 0,
            offset: 0,
            cpus,
            ram_bytes,
        }
    }

    /// A write to the selector port: selects an item, rewinds the data port.
    pub fn select(&mut self, key: u16) {
        self.selector = key;
        self.offset = 0;
    }

    /// The selected key.
    pub fn selector(&self) -> u16 {
        self.selector
    }

    /// A byte read from the data port: the next byte of the selected item,
    /// 0 past its end.
    pub fn read_data(&mut self) -> u8 {
        let byte = self.item_byte(self.selector, self.offset);
        self.offset = self.offset.saturating_add(1);
        byte
    }

    fn item_byte(&self, key: u16, offset: u32) -> u8 {
        let mut item = [0u8; 8];
        let len = match key {
            KEY_SIGNATURE => {
                item[..4].copy_from_slice(b"QEMU");
                4
            }
            KEY_ID => {
                item[..4].copy_from_slice(&1u32.to_le_bytes());
                4
            }
            KEY_RAM_SIZE => {
                item = self.ram_bytes.to_le_bytes();
                8
            }
            KEY_NOGRAPHIC => {
                item[..2].copy_from_slice(&1u16.to_le_bytes());
                2
            }
            KEY_NB_CPUS | KEY_MAX_CPUS => {
                item[..2].copy_from_slice(&self.cpus.to_le_bytes());
                2
            }
            // Zero files, big-endian.
            KEY_FILE_DIR => 4,
            _ => 0,
        };
        usize::try_from(offset)
            .ok()
            .filter(|&o| o < len)
            .map_or(0, |o| item[o])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `fwcfg_get_u()` does: select, then `bytes` byte reads.
    fn get(cfg: &mut FwCfg, key: u16, bytes: usize) -> u64 {
        cfg.select(key);
        (0..bytes).fold(0, |acc, i| acc | u64::from(cfg.read_data()) << (8 * i))
    }

    #[test]
    fn the_entries_kvm_unit_tests_read() {
        let mut cfg = FwCfg::new(3, 64 << 20);
        assert_eq!(get(&mut cfg, KEY_NB_CPUS, 2), 3);
        assert_eq!(get(&mut cfg, KEY_MAX_CPUS, 2), 3);
        assert_eq!(get(&mut cfg, KEY_RAM_SIZE, 8), 64 << 20);
        // FW_CFG_MAX_RAM (0x11) is a kvm-unit-tests "dummy" key: zero, so
        // find_highmem() takes "no limit".
        assert_eq!(get(&mut cfg, 0x11, 8), 0);
        assert_eq!(
            get(&mut cfg, KEY_SIGNATURE, 4),
            u64::from(u32::from_le_bytes(*b"QEMU"))
        );
        assert_eq!(get(&mut cfg, KEY_ID, 4), 1);
        assert_eq!(get(&mut cfg, KEY_FILE_DIR, 4), 0);
    }

    #[test]
    fn reads_past_an_item_are_zero_and_selecting_rewinds() {
        let mut cfg = FwCfg::new(2, 1 << 30);
        cfg.select(KEY_NB_CPUS);
        assert_eq!(
            [cfg.read_data(), cfg.read_data(), cfg.read_data()],
            [2, 0, 0]
        );
        cfg.select(KEY_NB_CPUS);
        assert_eq!(cfg.read_data(), 2);
        assert_eq!(cfg.selector(), KEY_NB_CPUS);
    }
}
