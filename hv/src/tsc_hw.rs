//! The hardware behind `hv_core::tsc`: RDTSC, CPUID, PIT channel 2's gate
//! (ports 0x42, 0x43, 0x61), the ACPI PM timer's port and the HPET's main
//! counter; and where the ACPI tables put the last two.
//!
//! The boot CPU calls [`calibrate`] once, with interrupts off, after
//! `smp_boot::madt::discover` has accepted the RSDP. The logic (which timer
//! to trust, how many measurements, what "disagree" means) lives in
//! `hv_core::tsc`, where it is host-tested; this file only touches devices.

use ::acpi::{AcpiTables, PhysicalMapping};
use hv_core::tsc::{
    self, Calibration, CalibrationError, Config, CpuidLeaf, PmTimerBlock, Reference, TscHardware,
};
use smp_boot::madt::IdentityMapped;

use crate::arch::cpu::rdtsc;
use crate::arch::port::{inb, outb};

/// PIT channel 2's data port.
const PIT_CHANNEL_2: u16 = 0x42;
/// The PIT's mode/command port.
const PIT_COMMAND: u16 = 0x43;
/// Channel 2, low byte then high byte, mode 0 (interrupt on terminal
/// count: output low until the count runs out), binary.
const PIT_CHANNEL_2_MODE_0: u8 = 0b1011_0000;
/// System control port B: channel 2's gate (bit 0, read-write), the
/// speaker's data enable (bit 1) and channel 2's output (bit 5, read-only).
const PORT_B: u16 = 0x61;
const PORT_B_GATE_2: u8 = 1 << 0;
const PORT_B_SPEAKER: u8 = 1 << 1;
const PORT_B_OUT_2: u8 = 1 << 5;

/// HPET registers (HPET spec 1.0a, 2.3).
const HPET_CAPABILITIES: u64 = 0x000;
const HPET_CONFIGURATION: u64 = 0x010;
const HPET_ENABLE: u64 = 1 << 0;
const HPET_MAIN_COUNTER: u64 = 0x0F0;
/// hv identity-maps at least this much, device holes included, uncached.
const ALWAYS_MAPPED_END: u64 = 4 << 30;

/// The timers the ACPI tables describe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcpiTimers {
    /// The PM timer's port and width, from the FADT.
    pub pm_timer: Option<PmTimerBlock>,
    /// The HPET's register base, from the HPET table (only below 4 GiB,
    /// which hv always maps).
    pub hpet_base: Option<u64>,
}

/// Reads the PM timer's port from the FADT and the HPET's base from the
/// HPET table, through the `acpi` crate: `AcpiTables::from_rsdp`, then
/// `find_table::<acpi::fadt::Fadt>()` and
/// `find_table::<acpi::hpet::HpetTable>()`, which check each table's
/// signature and checksum. The fields are read from the checked bytes by
/// `hv_core::tsc::{pm_timer_from_fadt, hpet_base_from_table}` rather than
/// by the crate's `Fadt::pm_timer_block` and `HpetInfo::new`: the first
/// reads the 64-bit block of an ACPI 2.0+ FADT without checking that the
/// table is long enough to hold it, and the second asserts (panics) when
/// the HPET is not in memory space.
///
/// # Safety
/// 1. Every ACPI table is identity-mapped, readable and not written while
///    this runs (hv's identity map of all RAM and the first 4 GiB).
/// 2. `rsdp` is an RSDP that `smp_boot::madt::discover` accepted: that
///    checked the RSDP and the root table, whose length the `acpi` crate
///    trusts when it walks the table pointers.
pub unsafe fn find_acpi_timers(rsdp: u64) -> AcpiTimers {
    // SAFETY: (1) every table is identity-mapped and unchanging, the
    // constructor's contract, by this function's condition 1.
    let handler = unsafe { IdentityMapped::new() };
    let Ok(rsdp) = usize::try_from(rsdp) else {
        return AcpiTimers::default();
    };
    // SAFETY: (1) the handler maps what the crate asks for (condition 1);
    // (2) the RSDP and its root table were checked (condition 2).
    let Ok(tables) = (unsafe { AcpiTables::from_rsdp(handler, rsdp) }) else {
        return AcpiTimers::default();
    };
    let pm_timer = tables
        .find_table::<::acpi::fadt::Fadt>()
        .ok()
        .and_then(|fadt| tsc::pm_timer_from_fadt(table_bytes(&fadt)));
    let hpet_base = tables
        .find_table::<::acpi::hpet::HpetTable>()
        .ok()
        .and_then(|hpet| tsc::hpet_base_from_table(table_bytes(&hpet)))
        .filter(|&base| base < ALWAYS_MAPPED_END);
    AcpiTimers {
        pm_timer,
        hpet_base,
    }
}

/// The bytes of a table the `acpi` crate found and checksummed.
fn table_bytes<T>(mapping: &PhysicalMapping<IdentityMapped, T>) -> &[u8] {
    // SAFETY: (1) the crate mapped `region_length()` bytes, the table's
    // header length, at `virtual_start()`, and summed exactly those bytes;
    // (2) they are identity-mapped and unchanging while `mapping` lives
    // (the `IdentityMapped` contract); (3) `u8` has no alignment or
    // validity requirement.
    unsafe {
        core::slice::from_raw_parts(
            mapping.virtual_start().as_ptr().cast::<u8>(),
            mapping.region_length(),
        )
    }
}

/// Reads a 32-bit value from an I/O port.
fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: (1) `in` touches no memory; (2) the only port read here is
    // the PM timer's, whose reads have no side effects.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Reads a 64-bit HPET register.
///
/// # Safety
/// `base` is the HPET's register block, mapped at the same address and
/// uncached, and `offset` a register inside it.
unsafe fn hpet_read(base: u64, offset: u64) -> u64 {
    // SAFETY: (1) the register lies in the mapped, uncached block (the
    // caller's contract); (2) 8-byte aligned, as every HPET register is;
    // (3) volatile, so the read happens each time, in order.
    unsafe { core::ptr::read_volatile((base + offset) as *const u64) }
}

/// Writes a 64-bit HPET register.
///
/// # Safety
/// As [`hpet_read`], and the write must be one the HPET's current user
/// (only hv) expects.
unsafe fn hpet_write(base: u64, offset: u64, value: u64) {
    // SAFETY: (1) as in `hpet_read`; (2) the caller vouches for the write.
    unsafe { core::ptr::write_volatile((base + offset) as *mut u64, value) }
}

/// The devices calibration reads.
#[derive(Debug)]
pub struct TscHw {
    pm_timer_port: Option<u16>,
    hpet_base: Option<u64>,
}

impl TscHw {
    /// Calibration's hardware, and its config with a reference: the PM
    /// timer where the FADT names one (an I/O port, cheap to read), else
    /// the HPET, whose main counter is started if firmware left it off.
    ///
    /// # Safety
    /// 1. `timers.hpet_base`, if any, is the HPET's register block,
    ///    identity-mapped and uncached (hv maps the first 4 GiB, holes
    ///    uncached), and nothing else programs the HPET.
    pub unsafe fn new(timers: &AcpiTimers) -> (Self, Config) {
        if let Some(pm_timer) = timers.pm_timer {
            let hardware = Self {
                pm_timer_port: Some(pm_timer.port),
                hpet_base: None,
            };
            return (hardware, Config::new(Some(pm_timer.reference())));
        }
        let hpet = timers.hpet_base.and_then(|base| {
            // SAFETY: (1) `base` is the mapped HPET block (condition 1);
            // the capabilities register is read-only.
            let capabilities = unsafe { hpet_read(base, HPET_CAPABILITIES) };
            let reference = Reference::hpet_from_capabilities(capabilities)?;
            // SAFETY: (1) as above; reading the configuration changes nothing.
            let configuration = unsafe { hpet_read(base, HPET_CONFIGURATION) };
            if configuration & HPET_ENABLE == 0 {
                // SAFETY: (1) as above; (2) setting ENABLE only starts the
                // main counter: hv enables no comparator interrupt, and
                // nothing else uses the HPET (condition 1).
                unsafe { hpet_write(base, HPET_CONFIGURATION, configuration | HPET_ENABLE) };
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
        // SAFETY: (1) `hpet_base` is only set by `new`, whose contract
        // makes it the mapped HPET block; the main counter is read-only
        // here.
        self.hpet_base
            .map(|base| unsafe { hpet_read(base, HPET_MAIN_COUNTER) })
    }
}

/// Finds the timers and calibrates: the boot CPU's whole job here.
/// `rsdp` is `None` when ACPI is absent (then only CPUID and the PIT are
/// there to use). Returns the timers found, for the report.
///
/// # Safety
/// As [`find_acpi_timers`] (1 and 2), for `rsdp`.
pub unsafe fn calibrate(rsdp: Option<u64>) -> (AcpiTimers, Result<Calibration, CalibrationError>) {
    let timers = match rsdp {
        // SAFETY: (1), (2): this function's conditions, passed on.
        Some(rsdp) => unsafe { find_acpi_timers(rsdp) },
        None => AcpiTimers::default(),
    };
    // SAFETY: (1) `find_acpi_timers` only returns an HPET base below 4 GiB,
    // which hv identity-maps (device holes uncached), and nothing in hv
    // programs the HPET.
    let (mut hardware, config) = unsafe { TscHw::new(&timers) };
    (timers, tsc::calibrate(&mut hardware, &config))
}
