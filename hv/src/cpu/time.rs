//! Time from the TSC, calibrated against the PIT at boot.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::cpu::rdtsc;
use crate::arch::port::{inb, outb};

static TSC_PER_MICROSECOND: AtomicU64 = AtomicU64::new(1000);

const PIT_HZ: u64 = 1_193_182;
const CALIBRATION_MS: u64 = 10;

/// Measures the TSC rate with PIT channel 2 over 10 ms. Returns the rate in
/// kHz, or `None` if the PIT never finished (then 1 GHz is assumed).
pub fn calibrate() -> Option<u64> {
    let count = PIT_HZ * CALIBRATION_MS / 1000;
    // Gate channel 2 off, speaker off; mode 0, lobyte/hibyte, binary.
    let control = inb(0x61) & !0x03;
    outb(0x61, control);
    outb(0x43, 0xB0);
    outb(0x42, count as u8);
    outb(0x42, (count >> 8) as u8);
    outb(0x61, control | 0x01);
    let start = rdtsc();
    let mut finished = false;
    for _ in 0..50_000_000u64 {
        if inb(0x61) & 0x20 != 0 {
            finished = true;
            break;
        }
    }
    let elapsed = rdtsc().wrapping_sub(start);
    outb(0x61, control);
    if !finished || elapsed == 0 {
        return None;
    }
    let per_microsecond = (elapsed / (CALIBRATION_MS * 1000)).max(1);
    TSC_PER_MICROSECOND.store(per_microsecond, Ordering::Relaxed);
    Some(elapsed / CALIBRATION_MS)
}

/// Microseconds since the TSC's origin.
pub fn now_us() -> u64 {
    rdtsc() / TSC_PER_MICROSECOND.load(Ordering::Relaxed)
}

/// Spins for at least `us` microseconds.
pub fn delay_us(us: u64) {
    let end = now_us().saturating_add(us);
    while now_us() < end {
        core::hint::spin_loop();
    }
}

/// TSC ticks in `us` microseconds.
pub fn us_to_tsc(us: u64) -> u64 {
    us.saturating_mul(TSC_PER_MICROSECOND.load(Ordering::Relaxed))
}
