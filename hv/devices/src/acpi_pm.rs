//! The ACPI fixed-hardware registers the FADT points at: PM1a event block
//! (status, enable), PM1a control block and the 24-bit PM timer, at QEMU
//! Q35's ports (0x600, 0x604, 0x608). kvm-unit-tests' `vmexit_inl_pmtimer`
//! finds the timer port in the FADT and reads it in a loop.

use crate::time::scale;

/// PM1a event block: PM1_STS (2 bytes), PM1_EN (2 bytes).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// PM1a control block (2 bytes).
pub const PM1A_CNT_PORT: u16 = 0x604;
/// PM timer (4 bytes).
pub const PM_TMR_PORT: u16 = 0x608;
/// Ports from `PM1A_EVT_PORT` on that the block answers.
pub const PORTS: u16 = 12;
/// The PM timer's rate.
pub const PM_TIMER_HZ: u64 = 3_579_545;

const SCI_EN: u16 = 1;

/// The registers.
#[derive(Debug, Clone)]
pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
}

impl Default for AcpiPm {
    fn default() -> Self {
        Self::new()
    }
}

impl AcpiPm {
    /// ACPI mode already on (SCI_EN), as firmware leaves it; no SMI_CMD.
    pub const fn new() -> Self {
        Self {
            status: 0,
            enable: 0,
            control: SCI_EN,
        }
    }

    /// A read of `size` bytes at `port` (in `PM1A_EVT_PORT..+PORTS`), at
    /// host TSC `now` with a TSC of `tsc_hz`.
    pub fn read(&self, port: u16, size: u8, now: u64, tsc_hz: u64) -> u32 {
        let offset = port.wrapping_sub(PM1A_EVT_PORT);
        let block: u32 = match offset & !3 {
            0 => u32::from(self.status) | u32::from(self.enable) << 16,
            4 => u32::from(self.control),
            8 => (scale(now, tsc_hz, PM_TIMER_HZ) & 0xFF_FFFF) as u32,
            _ => 0,
        };
        let shifted = block >> (8 * u32::from(offset & 3));
        match size {
            1 => shifted & 0xFF,
            2 => shifted & 0xFFFF,
            _ => shifted,
        }
    }

    /// A write of `size` bytes at `port`. PM1_STS bits are cleared by
    /// writing ones; the timer is read-only; sleep requests (SLP_EN) are
    /// not honoured: the guest has no sleep states.
    pub fn write(&mut self, port: u16, size: u8, value: u32) {
        let offset = port.wrapping_sub(PM1A_EVT_PORT);
        for i in 0..u16::from(size.min(4)) {
            self.write_byte(offset.wrapping_add(i), (value >> (8 * i)) as u8);
        }
    }

    fn write_byte(&mut self, offset: u16, byte: u8) {
        const SLP_EN: u16 = 1 << 13;
        let shift = 8 * (offset & 1);
        let bits = u16::from(byte) << shift;
        let mask = 0xFF << shift;
        match offset & !1 {
            0 => self.status &= !bits,
            2 => self.enable = (self.enable & !mask) | bits,
            4 => self.control = (((self.control & !mask) | bits) & !SLP_EN) | SCI_EN,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pm_timer_counts_at_its_rate_and_wraps_at_24_bits() {
        let pm = AcpiPm::new();
        let tsc_hz = 2_000_000_000;
        assert_eq!(pm.read(PM_TMR_PORT, 4, 0, tsc_hz), 0);
        assert_eq!(
            pm.read(PM_TMR_PORT, 4, tsc_hz, tsc_hz),
            (PM_TIMER_HZ & 0xFF_FFFF) as u32
        );
        // 2^24 ticks later it has wrapped to where it was.
        let wrap = scale(1 << 24, PM_TIMER_HZ, tsc_hz) + 1;
        let a = pm.read(PM_TMR_PORT, 4, 1000, tsc_hz);
        let b = pm.read(PM_TMR_PORT, 4, 1000 + wrap, tsc_hz);
        assert!(b.wrapping_sub(a) & 0xFF_FFFF <= 1);
    }

    #[test]
    fn status_bits_clear_on_write_and_sci_stays_enabled() {
        let mut pm = AcpiPm::new();
        pm.status = 0x8001;
        pm.write(PM1A_EVT_PORT, 2, 0x0001);
        assert_eq!(pm.read(PM1A_EVT_PORT, 2, 0, 1), 0x8000);
        pm.write(PM1A_EVT_PORT + 2, 2, 0x0100);
        assert_eq!(pm.read(PM1A_EVT_PORT + 2, 2, 0, 1), 0x0100);
        pm.write(PM1A_CNT_PORT, 2, 0);
        assert_eq!(pm.read(PM1A_CNT_PORT, 2, 0, 1) & 1, 1);
    }
}
