//! Time from the TSC, calibrated at boot by `hv_core::tsc` (CPUID 0x15 or
//! 0x16 where given; otherwise PIT-timed gates read against the ACPI PM
//! timer or the HPET, best of several, cross-checked) over the hardware
//! below: the PIT's channel 2 gate, the PM timer's port, the HPET's main
//! counter.

use core::sync::atomic::{AtomicU64, Ordering};

use hv_core::tsc::{self, Calibration, CalibrationError, Config, CpuidLeaf, TscHardware};

use crate::arch::cpu::rdtsc;
use crate::arch::port::{inb, inl, outb};
use crate::mm::phys;

/// TSC ticks per millisecond in force (1 GHz until calibrated).
static TSC_KHZ: AtomicU64 = AtomicU64::new(1_000_000);

/// PIT channel 2's data port.
const PIT_CHANNEL_2: u16 = 0x42;
/// The PIT's mode/command port.
const PIT_COMMAND: u16 = 0x43;
/// Channel 2, low byte then high byte, mode 0 (output low until the count
/// runs out), binary.
const PIT_CHANNEL_2_MODE_0: u8 = 0b1011_0000;
/// System control port B: channel 2's gate (bit 0), the speaker's data
/// enable (bit 1) and channel 2's output (bit 5, read-only).
const PORT_B: u16 = 0x61;
const PORT_B_GATE_2: u8 = 1 << 0;
const PORT_B_SPEAKER: u8 = 1 << 1;
const PORT_B_OUT_2: u8 = 1 << 5;

/// HPET registers (HPET spec 1.0a, 2.3).
const HPET_CAPABILITIES: u64 = 0x000;
const HPET_CONFIGURATION: u64 = 0x010;
const HPET_ENABLE: u64 = 1 << 0;
const HPET_MAIN_COUNTER: u64 = 0x0F0;
/// The kernel identity-maps at least this much, device holes uncached.
const ALWAYS_MAPPED_END: u64 = 4 << 30;

/// The devices calibration reads.
#[derive(Debug)]
struct TscHw {
    pm_timer_port: Option<u16>,
    hpet_base: Option<u64>,
}

impl TscHw {
    /// The hardware and a config with a reference: the PM timer where the
    /// FADT names one (an I/O port, cheap to read), else the HPET, whose
    /// main counter is started if firmware left it off (nothing else in
    /// the kernel programs the HPET).
    fn new(rsdp: Option<u64>) -> (Self, Config) {
        let (pm_timer, hpet_base) = rsdp.map_or((None, None), phys::acpi_timers);
        if let Some(pm_timer) = pm_timer {
            let hardware = Self {
                pm_timer_port: Some(pm_timer.port),
                hpet_base: None,
            };
            return (hardware, Config::new(Some(pm_timer.reference())));
        }
        let hpet = hpet_base
            .filter(|&base| base < ALWAYS_MAPPED_END)
            .and_then(|base| {
                let capabilities = phys::mmio_read_u64(base + HPET_CAPABILITIES);
                let reference = tsc::Reference::hpet_from_capabilities(capabilities)?;
                let configuration = phys::mmio_read_u64(base + HPET_CONFIGURATION);
                if configuration & HPET_ENABLE == 0 {
                    phys::mmio_write_u64(base + HPET_CONFIGURATION, configuration | HPET_ENABLE);
                }
                Some((base, reference))
            });
        let hardware = Self {
            pm_timer_port: None,
            hpet_base: hpet.map(|(base, _)| base),
        };
        (hardware, Config::new(hpet.map(|(_, reference)| reference)))
    }
}

impl TscHardware for TscHw {
    fn read_tsc(&mut self) -> u64 {
        rdtsc()
    }

    fn cpuid(&mut self, leaf: u32) -> CpuidLeaf {
        let result = raw_cpuid::native_cpuid::cpuid_count(leaf, 0);
        CpuidLeaf {
            eax: result.eax,
            ebx: result.ebx,
            ecx: result.ecx,
            edx: result.edx,
        }
    }

    fn pit_gate_start(&mut self, ticks: u16) {
        // Gate off and speaker off while the channel is programmed; the
        // control word drives the output low.
        let control = inb(PORT_B) & !(PORT_B_GATE_2 | PORT_B_SPEAKER);
        outb(PORT_B, control);
        outb(PIT_COMMAND, PIT_CHANNEL_2_MODE_0);
        let [low, high] = ticks.to_le_bytes();
        outb(PIT_CHANNEL_2, low);
        outb(PIT_CHANNEL_2, high);
        outb(PORT_B, control | PORT_B_GATE_2);
    }

    fn pit_gate_expired(&mut self) -> bool {
        inb(PORT_B) & PORT_B_OUT_2 != 0
    }

    fn pit_gate_stop(&mut self) {
        outb(PORT_B, inb(PORT_B) & !(PORT_B_GATE_2 | PORT_B_SPEAKER));
    }

    fn read_pm_timer(&mut self) -> Option<u32> {
        self.pm_timer_port.map(inl)
    }

    fn read_hpet_counter(&mut self) -> Option<u64> {
        self.hpet_base
            .map(|base| phys::mmio_read_u64(base + HPET_MAIN_COUNTER))
    }
}

/// Calibrates the TSC (boot CPU, interrupts off) with the ACPI timers of
/// the tables behind `rsdp` (an RSDP the MADT reader accepted), and puts
/// the rate in force. On failure the kernel keeps assuming 1 GHz.
pub fn calibrate(rsdp: Option<u64>) -> Result<Calibration, CalibrationError> {
    let (mut hardware, config) = TscHw::new(rsdp);
    let result = tsc::calibrate(&mut hardware, &config);
    if let Ok(calibration) = &result {
        TSC_KHZ.store(calibration.khz.max(1), Ordering::Relaxed);
    }
    result
}

/// The TSC rate in force, in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Microseconds since the TSC's origin.
pub fn now_us() -> u64 {
    tsc_to_us(rdtsc())
}

/// `ticks` of the TSC in microseconds.
pub fn tsc_to_us(ticks: u64) -> u64 {
    (u128::from(ticks) * 1000 / u128::from(tsc_khz())) as u64
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
    (u128::from(us) * u128::from(tsc_khz()) / 1000).min(u128::from(u64::MAX)) as u64
}
