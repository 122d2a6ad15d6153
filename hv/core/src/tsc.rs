//! The TSC's rate: from CPUID where the CPU states it, else measured over
//! PIT-timed gates, read against a second timer, several times.
//!
//! [`calibrate`] runs on the boot CPU with interrupts off, through
//! [`TscHardware`] (read the TSC, CPUID, PIT channel 2's gate, the ACPI PM
//! timer, the HPET's main counter), and returns a [`Calibration`]: the rate
//! in kHz, the [`TscSource`] whose [`TscSource::name`] the run report shows
//! as `smp.tsc_source`, and what it took (attempts, halves rejected,
//! disagreements). Nothing that disagrees is used silently: every rejected
//! or contradicting measurement is counted, and the source names the
//! method.
//!
//! # The order
//! 1. **CPUID.** On Intel, leaf 0x15 gives TSC = crystal × EBX / EAX. When
//!    ECX (the crystal's Hz) is 0, the SDM's table of nominal crystals
//!    fills in for the models it lists ([`known_crystal_hz`]). Otherwise
//!    leaf 0x16 gives the base frequency in MHz, which the TSC runs at on
//!    the CPUs that have the leaf. The CPUID rate is then checked by
//!    measurement (below): the first clean measurement that agrees confirms
//!    it; two timers that agree with each other and not with CPUID overrule
//!    it; one timer alone only records a disagreement, since CPUID is the
//!    architectural value and a lone timer may be the one that lies.
//! 2. **PIT gates, read against the reference.** PIT channel 2 counts
//!    `gate_ms`; the TSC is read around both of its edges, and the
//!    reference timer (the PM timer at 3.579545 MHz, whose I/O port the
//!    FADT gives, or the HPET) is read, between two TSC reads, before and
//!    after the gate. Each gate thus yields two rates: the reference's and,
//!    when its edges were seen cleanly, the PIT's. The result is the
//!    reference's rate once `samples` (three) of them agree, provided the
//!    PIT agreed with the reference more often than not: source
//!    `pit_checked_pm_timer` / `pit_checked_hpet`.
//! 3. **The reference alone** (`pm_timer` / `hpet`) when the PIT never
//!    expires, when clean PIT counts keep contradicting the reference (a
//!    lying PIT), or when no PIT count was ever clean enough to compare.
//!    Without a working PIT the gate is timed by polling the reference.
//! 4. **The PIT alone** (`pit_unchecked`) when there is no reference.
//!
//! # Why a preempted measurement sees too many TSC ticks, and what "best" is
//! Under QEMU's TCG the guest's TSC is the host's TSC (PLATFORM.md), and the
//! PIT, the PM timer and the HPET are computed, when the guest reads them,
//! from QEMU's virtual clock, which follows the host's real time while the
//! VM runs. So all of them keep running while the host deschedules the
//! vCPU thread. The guest, though, only *notices* the PIT's expiry at its
//! next poll. If the vCPU thread is off the host CPU at the moment the
//! count runs out, the guest sees the expiry late by as long as it was
//! descheduled, and the TSC ticks it counts cover the gate *plus* the
//! delay: the rate comes out too high. 26,583 MHz measured on a 2.6 GHz
//! TSC is a 10 ms gate seen about 92 ms late: one host time slice on a
//! loaded machine. The opposite error exists too, but is rarer: a
//! preemption between opening the gate and the first TSC read makes the
//! start late and the rate too low; that window is one port write long.
//! A preemption while the count runs, away from both edges, does nothing:
//! both clocks run through it. On bare metal an SMI plays the part of the
//! host. (Bochs derives all its clocks from the instruction count, so
//! there is nothing to preempt.)
//!
//! So a bare PIT measurement errs mostly high, and among bare measurements
//! the lowest would be the best guess. This module does not guess: each
//! PIT edge is bracketed by two TSC reads (before and after the port access
//! that observed it), so each measurement knows its own uncertainty, and
//! one whose brackets exceed `max_uncertainty_ppm` of its length is
//! discarded and counted, whichever way it errs. Among the rest, the best
//! is the one with the tightest brackets, taken only when at least
//! `samples` measurements (itself included) agree with it.
//!
//! That alone is not enough on a loaded host: the PIT's end is late
//! whenever the vCPU thread happens to be descheduled at the instant the
//! count runs out, which is as often as it is descheduled at all (most of
//! the time, beside a stress loop: booted beside three busy loops on two
//! host cores, 18 to 20 of 20 PIT counts were rejected). A *reading* of a
//! counter is different from *waiting* for an event: the PM timer's or
//! HPET's value tells how much time has passed whenever it is read, so
//! only a preemption inside the ~1 µs between the two TSC reads around it
//! spoils it, and each reading is taken three times, keeping the tightest.
//! That is why the reference's rate, not the PIT's, is the result when
//! there is a reference: the PIT serves as the independent check, whenever
//! one of its counts was clean.
//!
//! # Counters that wrap
//! The PM timer is 24 bits wide (32 with the FADT's `TMR_VAL_EXT`) and
//! wraps every 4.7 s at 24 bits; a 32-bit HPET wraps after about 5 minutes
//! at 14.3 MHz. Differences are taken modulo the width, which is right for
//! less than one wrap. A longer interval (a preemption of seconds between
//! two readings) looks shorter than it is. A reference interval that is,
//! by a clean PIT count's rate, longer than half the wrap period is
//! rejected; any other lost wrap gives a wrong rate, which the `samples`
//! agreeing measurements outvote (and which is counted as a disagreement).

use core::fmt;

/// PIT input clock, Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// ACPI PM timer clock, Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The HPET's counter period may not exceed 100 ns (HPET spec 2.3.4).
pub const HPET_MAX_PERIOD_FS: u32 = 100_000_000;
/// Calibration attempts are capped at this many, whatever the config says.
pub const MAX_ATTEMPTS: u32 = 64;

const FEMTOSECONDS_PER_SECOND: u128 = 1_000_000_000_000_000;
const FEMTOSECONDS_PER_MS: u128 = 1_000_000_000_000;

/// The four registers one CPUID leaf returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidLeaf {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// The hardware calibration needs. The kernel implements it over the real
/// devices; tests over a simulated machine.
pub trait TscHardware {
    /// RDTSC.
    fn read_tsc(&mut self) -> u64;
    /// CPUID with `leaf` in EAX and 0 in ECX.
    fn cpuid(&mut self, leaf: u32) -> CpuidLeaf;
    /// Closes PIT channel 2's gate, programs it to count `ticks` in mode 0
    /// (output low until the count runs out) and opens the gate: counting
    /// starts here.
    fn pit_gate_start(&mut self, ticks: u16);
    /// Whether channel 2's output has gone high (port 0x61, bit 5).
    fn pit_gate_expired(&mut self) -> bool;
    /// Closes channel 2's gate.
    fn pit_gate_stop(&mut self);
    /// The ACPI PM timer's count, `None` if this machine has none.
    fn read_pm_timer(&mut self) -> Option<u32>;
    /// The HPET's main counter, `None` if this machine has none.
    fn read_hpet_counter(&mut self) -> Option<u64>;
}

/// A timer calibration can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Timer {
    /// The 8254 PIT, channel 2.
    Pit,
    /// The ACPI power-management timer.
    PmTimer,
    /// The high-precision event timer's main counter.
    Hpet,
}

impl Timer {
    /// A stable name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pit => "pit",
            Self::PmTimer => "pm_timer",
            Self::Hpet => "hpet",
        }
    }
}

/// The second timer, against which PIT measurements are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reference {
    /// The ACPI PM timer at [`PM_TIMER_HZ`].
    PmTimer {
        /// 32-bit counter (FADT flag `TMR_VAL_EXT`); else 24-bit.
        extended: bool,
    },
    /// The HPET's main counter.
    Hpet {
        /// Femtoseconds per tick (capabilities register bits 63:32).
        period_fs: u32,
        /// 64-bit counter (capabilities bit 13); else 32-bit.
        wide: bool,
    },
}

impl Reference {
    /// The HPET described by its General Capabilities and ID register
    /// (offset 0), or `None` if the period is 0 or above 100 ns.
    pub fn hpet_from_capabilities(capabilities: u64) -> Option<Self> {
        let period_fs = (capabilities >> 32) as u32;
        (period_fs != 0 && period_fs <= HPET_MAX_PERIOD_FS).then_some(Self::Hpet {
            period_fs,
            wide: capabilities & (1 << 13) != 0,
        })
    }

    /// Which timer this is.
    pub fn timer(self) -> Timer {
        match self {
            Self::PmTimer { .. } => Timer::PmTimer,
            Self::Hpet { .. } => Timer::Hpet,
        }
    }

    fn mask(self) -> u64 {
        match self {
            Self::PmTimer { extended: true } | Self::Hpet { wide: false, .. } => {
                u64::from(u32::MAX)
            }
            Self::PmTimer { extended: false } => (1 << 24) - 1,
            Self::Hpet { wide: true, .. } => u64::MAX,
        }
    }

    fn read(self, hardware: &mut impl TscHardware) -> Option<u64> {
        match self {
            Self::PmTimer { .. } => hardware.read_pm_timer().map(u64::from),
            Self::Hpet { .. } => hardware.read_hpet_counter(),
        }
        .map(|value| value & self.mask())
    }

    /// Femtoseconds in `ticks` of this timer.
    fn femtoseconds(self, ticks: u64) -> u128 {
        match self {
            Self::PmTimer { .. } => {
                u128::from(ticks) * FEMTOSECONDS_PER_SECOND / u128::from(PM_TIMER_HZ)
            }
            Self::Hpet { period_fs, .. } => u128::from(ticks) * u128::from(period_fs),
        }
    }

    /// Ticks of this timer in `ms` milliseconds (rounded up).
    fn ticks_in_ms(self, ms: u32) -> u64 {
        let femtoseconds = u128::from(ms) * FEMTOSECONDS_PER_MS;
        let per_tick = match self {
            Self::PmTimer { .. } => FEMTOSECONDS_PER_SECOND / u128::from(PM_TIMER_HZ),
            Self::Hpet { period_fs, .. } => u128::from(period_fs),
        };
        femtoseconds.div_ceil(per_tick.max(1)) as u64
    }
}

/// How the rate was found: the run report's `smp.tsc_source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TscSource {
    /// CPUID leaf 0x15: crystal × ratio.
    Cpuid15h,
    /// CPUID leaf 0x16: the base frequency.
    Cpuid16h,
    /// PIT-timed gates, read against the ACPI PM timer: the rate is the
    /// PM timer's (its readings are exact, see the module docs), and the
    /// PIT's own count agreed with it in more measurements than not.
    PitCheckedPmTimer,
    /// As [`TscSource::PitCheckedPmTimer`], with the HPET.
    PitCheckedHpet,
    /// PIT measurements with no second timer to check them.
    PitUnchecked,
    /// The PM timer alone: the PIT never expired, kept disagreeing with
    /// it, or never once had a clean count to compare.
    PmTimer,
    /// The HPET alone, as for [`TscSource::PmTimer`].
    Hpet,
}

impl TscSource {
    /// The stable name the run report shows. Never change one.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpuid15h => "cpuid_15h",
            Self::Cpuid16h => "cpuid_16h",
            Self::PitCheckedPmTimer => "pit_checked_pm_timer",
            Self::PitCheckedHpet => "pit_checked_hpet",
            Self::PitUnchecked => "pit_unchecked",
            Self::PmTimer => "pm_timer",
            Self::Hpet => "hpet",
        }
    }
}

/// What calibration does, with defaults from [`Config::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The second timer, if the machine has one.
    pub reference: Option<Reference>,
    /// Length of one measurement, 1..=54 ms (the PIT counts at most 65535
    /// ticks). Default 10.
    pub gate_ms: u32,
    /// Measurements that must agree before a rate is taken. Default 3.
    pub samples: u32,
    /// Measurements tried per method before giving up on it (capped at
    /// [`MAX_ATTEMPTS`]). Default 20. Without a reference, on a host where
    /// half of all PIT counts are seen late, fewer than 3 clean ones out of
    /// 20 happen once in about 5000 boots. With one, the reference's
    /// readings are rarely spoiled, and the attempts go to waiting for one
    /// clean PIT count to confirm them (with 90% of counts late, 20
    /// attempts find one 88% of the time; otherwise the source says the
    /// reference stood alone).
    pub max_attempts: u32,
    /// A measurement whose TSC brackets add up to more than this share of
    /// its length is discarded. Default 1000 ppm (10 µs of a 10 ms gate;
    /// a port read takes about 1 µs on hardware and less under TCG).
    pub max_uncertainty_ppm: u32,
    /// Two rates closer than this agree. Default 5000 ppm (0.5%).
    pub tolerance_ppm: u32,
    /// Polls of a timer before it is declared dead. Default 2,000,000
    /// (a 10 ms gate takes about 10,000 polls on hardware, 50,000 under
    /// TCG). With a reference, a PIT that has not expired after
    /// 20 × `gate_ms` by the reference is declared dead sooner.
    pub max_polls: u32,
    /// Check a CPUID rate by measurement (see the module docs). Default
    /// true.
    pub check_cpuid: bool,
}

impl Config {
    /// The defaults, with `reference` as the second timer.
    pub const fn new(reference: Option<Reference>) -> Self {
        Self {
            reference,
            gate_ms: 10,
            samples: 3,
            max_attempts: 20,
            max_uncertainty_ppm: 1000,
            tolerance_ppm: 5000,
            max_polls: 2_000_000,
            check_cpuid: true,
        }
    }

    fn pit_ticks(&self) -> u16 {
        let ticks = u64::from(self.gate_ms.clamp(1, 54)) * PIT_HZ / 1000;
        ticks.min(u64::from(u16::MAX)) as u16
    }

    fn attempts(&self) -> u32 {
        self.max_attempts.clamp(1, MAX_ATTEMPTS)
    }

    fn samples(&self) -> usize {
        self.samples.clamp(1, self.attempts()) as usize
    }
}

/// A calibrated TSC rate and how it was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    /// TSC ticks per millisecond.
    pub khz: u64,
    /// The method.
    pub source: TscSource,
    /// The timer whose readings gave `khz`: the reference for the
    /// `pit_checked_*` sources (see [`TscSource`]), `None` for CPUID.
    pub measured_by: Option<Timer>,
    /// An independent timer that agreed with `khz`: the PIT for the
    /// `pit_checked_*` sources; for CPUID sources the timer of the check
    /// measurement; `None` when nothing confirmed it.
    pub confirmed_by: Option<Timer>,
    /// The rate CPUID stated, used or not.
    pub cpuid_khz: Option<u64>,
    /// Measurements run (each one gate of `gate_ms`).
    pub attempts: u32,
    /// Halves of measurements (a PIT count, a pair of reference readings)
    /// thrown away because their TSC brackets were too wide (host
    /// preemption, SMI) or the interval may hide a counter wrap.
    pub rejected: u32,
    /// Times two rates that should have agreed did not: PIT against the
    /// reference, a measurement against the chosen one, CPUID against a
    /// measurement.
    pub disagreements: u32,
    /// The PIT was given up on: it never expired or kept disagreeing.
    pub pit_failed: bool,
    /// The reference stopped counting; later measurements went unchecked.
    pub reference_failed: bool,
}

/// Why no rate was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// No CPUID rate, the PIT never expired, and no working reference.
    NoTimer,
    /// Not enough measurements were clean and agreed.
    NoAgreement,
}

/// No rate was found; what was tried. The kernel then has to assume one,
/// and says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CalibrationError {
    /// Why.
    pub reason: FailureReason,
    /// As in [`Calibration`].
    pub attempts: u32,
    /// As in [`Calibration`].
    pub rejected: u32,
    /// As in [`Calibration`].
    pub disagreements: u32,
}

impl CalibrationError {
    /// The `smp.tsc_source` value for "not calibrated".
    pub fn source_name(&self) -> &'static str {
        "none"
    }
}

impl fmt::Display for CalibrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            FailureReason::NoTimer => f.write_str("no CPUID rate and no working timer")?,
            FailureReason::NoAgreement => f.write_str("measurements did not agree")?,
        }
        write!(
            f,
            " ({} attempts, {} rejected, {} disagreements)",
            self.attempts, self.rejected, self.disagreements
        )
    }
}

/// Where the ACPI PM timer is, from the FADT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmTimerBlock {
    /// Its I/O port.
    pub port: u16,
    /// 32-bit counter (`TMR_VAL_EXT`); else 24-bit.
    pub extended: bool,
}

impl PmTimerBlock {
    /// The reference this timer is.
    pub fn reference(self) -> Reference {
        Reference::PmTimer {
            extended: self.extended,
        }
    }
}

/// Finds the PM timer in the bytes of a FADT (signature, length and
/// checksum already checked by the caller; `fadt` holds the table's
/// `length` bytes). `None` when there is none or it is not in I/O space:
/// `PM_TMR_LEN` is not 4, the machine is hardware-reduced ACPI, or neither
/// `X_PM_TMR_BLK` (ACPI 2.0+) nor `PM_TMR_BLK` names a port.
pub fn pm_timer_from_fadt(fadt: &[u8]) -> Option<PmTimerBlock> {
    const PM_TMR_BLK: usize = 76;
    const PM_TMR_LEN: usize = 91;
    const FLAGS: usize = 112;
    const X_PM_TMR_BLK: usize = 208;
    const TMR_VAL_EXT: u32 = 1 << 8;
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const SYSTEM_IO: u8 = 1;

    if *fadt.get(PM_TMR_LEN)? != 4 {
        return None;
    }
    // Before ACPI 2.0 the table may end before the flags: no flags set.
    let flags = read_u32(fadt, FLAGS).unwrap_or(0);
    if flags & HW_REDUCED_ACPI != 0 {
        return None;
    }
    let extended = flags & TMR_VAL_EXT != 0;
    // The 64-bit block wins where it is present and names a port; a block
    // in another address space (memory-mapped PM timer) falls back to the
    // legacy port, which the tables must then also give.
    if let (Some(&space), Some(address)) =
        (fadt.get(X_PM_TMR_BLK), read_u64(fadt, X_PM_TMR_BLK + 4))
        && space == SYSTEM_IO
        && address != 0
    {
        return u16::try_from(address)
            .ok()
            .map(|port| PmTimerBlock { port, extended });
    }
    let legacy = read_u32(fadt, PM_TMR_BLK)?;
    u16::try_from(legacy)
        .ok()
        .filter(|&port| port != 0)
        .map(|port| PmTimerBlock { port, extended })
}

/// The HPET's register base from the bytes of the ACPI HPET table
/// (checked as for [`pm_timer_from_fadt`]). `None` if the table is short,
/// the block is not in memory space, or the address is 0 or not 1 KiB
/// aligned (the register block is 1 KiB).
pub fn hpet_base_from_table(table: &[u8]) -> Option<u64> {
    const BASE_ADDRESS: usize = 40;
    const SYSTEM_MEMORY: u8 = 0;
    if *table.get(BASE_ADDRESS)? != SYSTEM_MEMORY {
        return None;
    }
    read_u64(table, BASE_ADDRESS + 4).filter(|&base| base != 0 && base.is_multiple_of(1024))
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let bytes = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn read_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    let bytes = bytes.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// The crystal of Intel family-6 models whose CPUID 0x15 reports ECX = 0,
/// from the Intel SDM's table of nominal core crystal clock frequencies
/// (Vol. 3B, "Determining the Processor Base Frequency"), plus Denverton
/// (06_5FH), which has no leaf 0x16 to derive it from.
pub fn known_crystal_hz(family: u32, model: u32) -> Option<u32> {
    if family != 6 {
        return None;
    }
    match model {
        // 6th and 7th generation Core (Skylake, Kaby Lake client).
        0x4E | 0x5E | 0x8E | 0x9E => Some(24_000_000),
        // Xeon Scalable (Skylake-SP), Atom C3000 (Denverton).
        0x55 | 0x5F => Some(25_000_000),
        // Atom Goldmont (Apollo Lake).
        0x5C => Some(19_200_000),
        _ => None,
    }
}

/// The TSC rate CPUID states, with the leaf it came from. Intel only:
/// other vendors do not define leaves 0x15 and 0x16.
pub fn cpuid_rate(hardware: &mut impl TscHardware) -> Option<(u64, TscSource)> {
    let vendor = hardware.cpuid(0);
    // "GenuineIntel" in EBX, EDX, ECX.
    let intel = (vendor.ebx, vendor.edx, vendor.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e);
    if !intel {
        return None;
    }
    let max_leaf = vendor.eax;
    let signature = hardware.cpuid(1).eax;
    let mut family = (signature >> 8) & 0xF;
    let mut model = (signature >> 4) & 0xF;
    if family == 0xF {
        family += (signature >> 20) & 0xFF;
    }
    if family == 6 || family >= 0xF {
        model |= ((signature >> 16) & 0xF) << 4;
    }
    if max_leaf >= 0x15 {
        let leaf = hardware.cpuid(0x15);
        let (denominator, numerator) = (leaf.eax, leaf.ebx);
        let crystal = if leaf.ecx != 0 {
            Some(leaf.ecx)
        } else {
            known_crystal_hz(family, model)
        };
        if let Some(crystal) = crystal
            && denominator != 0
            && numerator != 0
        {
            let hz = u128::from(crystal) * u128::from(numerator) / u128::from(denominator);
            let khz = u64::try_from(hz / 1000).ok()?;
            if khz != 0 {
                return Some((khz, TscSource::Cpuid15h));
            }
        }
    }
    if max_leaf >= 0x16 {
        let base_mhz = u64::from(hardware.cpuid(0x16).eax & 0xFFFF);
        if base_mhz != 0 {
            return Some((base_mhz * 1000, TscSource::Cpuid16h));
        }
    }
    None
}

/// TSC values read just before and just after the access that observed an
/// event: the event happened between them.
#[derive(Clone, Copy, Debug)]
struct Stamp {
    before: u64,
    after: u64,
}

impl Stamp {
    fn width(self) -> u64 {
        self.after.wrapping_sub(self.before)
    }
}

/// One measurement: TSC ticks between two events `femtoseconds` apart.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: Stamp,
    end: Stamp,
    femtoseconds: u128,
}

impl Span {
    /// The TSC ticks from the middle of one bracket to the middle of the
    /// other, or `None` if the end is not after the start.
    fn ticks(self) -> Option<u64> {
        let start = u128::from(self.start.before) + u128::from(self.start.after);
        let end = u128::from(self.end.before) + u128::from(self.end.after);
        let doubled = end.checked_sub(start).filter(|&d| d > 0)?;
        u64::try_from(doubled / 2).ok()
    }

    /// Half the brackets' total width: how far off `ticks` can be.
    fn uncertainty(self) -> u64 {
        (self.start.width() / 2).saturating_add(self.end.width() / 2)
    }

    /// The rate and its uncertainty in ppm, or `None` if the span is
    /// empty or the brackets are too wide.
    fn rate(self, max_uncertainty_ppm: u32) -> Option<Rate> {
        let ticks = self.ticks()?;
        if self.femtoseconds == 0 {
            return None;
        }
        let uncertainty_ppm = u128::from(self.uncertainty()) * 1_000_000 / u128::from(ticks);
        if uncertainty_ppm > u128::from(max_uncertainty_ppm) {
            return None;
        }
        let khz = u128::from(ticks) * (FEMTOSECONDS_PER_SECOND / 1000) / self.femtoseconds;
        Some(Rate {
            khz: u64::try_from(khz).ok().filter(|&khz| khz != 0)?,
            uncertainty_ppm: uncertainty_ppm as u32,
        })
    }
}

/// A measured rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rate {
    khz: u64,
    uncertainty_ppm: u32,
}

fn agree(a: u64, b: u64, tolerance_ppm: u32) -> bool {
    let difference = u128::from(a.abs_diff(b)) * 1_000_000;
    difference <= u128::from(tolerance_ppm) * u128::from(a.max(b))
}

/// What one measurement yielded: each timer's rate, where its brackets
/// were tight enough.
#[derive(Clone, Copy, Debug, Default)]
struct Measurement {
    /// From the PIT's count and the TSC around its two edges.
    pit: Option<Rate>,
    /// From the reference's readings before and after the gate.
    reference: Option<Rate>,
    /// Halves (PIT or reference) thrown away for wide brackets.
    rejected: u32,
}

/// How one measurement ended.
#[derive(Debug)]
enum Outcome {
    /// See [`Measurement`]; either rate may be missing.
    Measured(Measurement),
    /// The PIT never expired.
    PitDead,
    /// The reference did not advance or could not be read.
    ReferenceDead,
}

/// Reads the reference between two TSC reads, three times, and keeps the
/// tightest: a preemption or SMI in one ~1 µs window rarely hits three.
fn stamped_read(hardware: &mut impl TscHardware, reference: Reference) -> Option<(Stamp, u64)> {
    let mut best: Option<(Stamp, u64)> = None;
    for _ in 0..3 {
        let before = hardware.read_tsc();
        let value = reference.read(hardware)?;
        let after = hardware.read_tsc();
        let stamp = Stamp { before, after };
        if best.is_none_or(|(kept, _)| stamp.width() < kept.width()) {
            best = Some((stamp, value));
        }
    }
    best
}

/// The reference's rate over `start..end`, or `None` (a rejected half) if
/// the brackets are too wide or, by the PIT's rate where there is one, the
/// interval is long enough to hide a counter wrap.
fn reference_rate(
    reference: Reference,
    config: &Config,
    (start, start_value): (Stamp, u64),
    (end, end_value): (Stamp, u64),
    pit: Option<Rate>,
) -> Option<Rate> {
    let elapsed = end_value.wrapping_sub(start_value) & reference.mask();
    let span = Span {
        start,
        end,
        femtoseconds: reference.femtoseconds(elapsed),
    };
    if let (Some(pit), Some(ticks)) = (pit, span.ticks()) {
        let by_pit_fs = u128::from(ticks) * (FEMTOSECONDS_PER_SECOND / 1000) / u128::from(pit.khz);
        if by_pit_fs > reference.femtoseconds(reference.mask()) / 2 {
            return None;
        }
    }
    span.rate(config.max_uncertainty_ppm)
}

/// One PIT gate of `gate_ms`, with the reference read before and after it.
fn measure_pit(
    hardware: &mut impl TscHardware,
    config: &Config,
    reference: Option<Reference>,
) -> Outcome {
    let ticks = config.pit_ticks();
    let gate_fs = u128::from(ticks) * FEMTOSECONDS_PER_SECOND / u128::from(PIT_HZ);
    hardware.pit_gate_stop();
    let reference_start = match reference {
        Some(reference) => match stamped_read(hardware, reference) {
            Some(read) => Some((reference, read)),
            None => return Outcome::ReferenceDead,
        },
        None => None,
    };
    let start_before = hardware.read_tsc();
    hardware.pit_gate_start(ticks);
    let start_after = hardware.read_tsc();
    // Where the reference stood when the count began, to tell a PIT that
    // never expires from a slow one.
    let gate_opened = reference_start.and_then(|(reference, _)| reference.read(hardware));
    // The count ran out after the last poll that saw it still running
    // began, and before the poll that saw it done ended.
    let mut running_at = start_before;
    let mut polls = 0u32;
    let end = loop {
        let before = hardware.read_tsc();
        if hardware.pit_gate_expired() {
            break Stamp {
                before: running_at,
                after: hardware.read_tsc(),
            };
        }
        running_at = before;
        polls += 1;
        let mut too_long = polls >= config.max_polls;
        if !too_long
            && polls.is_multiple_of(1024)
            && let (Some((reference, _)), Some(start)) = (reference_start, gate_opened)
            && let Some(now) = reference.read(hardware)
        {
            let elapsed = now.wrapping_sub(start) & reference.mask();
            too_long = elapsed > 20 * reference.ticks_in_ms(config.gate_ms);
        }
        if too_long {
            hardware.pit_gate_stop();
            return Outcome::PitDead;
        }
    };
    hardware.pit_gate_stop();
    let mut measurement = Measurement::default();
    let pit_span = Span {
        start: Stamp {
            before: start_before,
            after: start_after,
        },
        end,
        femtoseconds: gate_fs,
    };
    measurement.pit = pit_span.rate(config.max_uncertainty_ppm);
    if measurement.pit.is_none() {
        measurement.rejected += 1;
    }
    if let Some((reference, start)) = reference_start {
        let Some(end) = stamped_read(hardware, reference) else {
            return Outcome::ReferenceDead;
        };
        if end.1.wrapping_sub(start.1) & reference.mask() == 0 {
            return Outcome::ReferenceDead;
        }
        measurement.reference = reference_rate(reference, config, start, end, measurement.pit);
        if measurement.reference.is_none() {
            measurement.rejected += 1;
        }
    }
    Outcome::Measured(measurement)
}

/// One gate timed by the reference alone: poll it until it has advanced
/// `gate_ms`, then take a tight reading.
fn measure_reference(
    hardware: &mut impl TscHardware,
    config: &Config,
    reference: Reference,
) -> Result<Option<Rate>, Outcome> {
    let Some(start) = stamped_read(hardware, reference) else {
        return Err(Outcome::ReferenceDead);
    };
    let target = reference.ticks_in_ms(config.gate_ms);
    for _ in 0..config.max_polls {
        let Some(value) = reference.read(hardware) else {
            return Err(Outcome::ReferenceDead);
        };
        if value.wrapping_sub(start.1) & reference.mask() >= target {
            let end = stamped_read(hardware, reference).ok_or(Outcome::ReferenceDead)?;
            return Ok(reference_rate(reference, config, start, end, None));
        }
    }
    Err(Outcome::ReferenceDead)
}

/// Counters shared by the steps of one calibration.
#[derive(Default)]
struct Tally {
    attempts: u32,
    rejected: u32,
    disagreements: u32,
    pit_failed: bool,
    reference_failed: bool,
}

impl Tally {
    fn calibration(
        &self,
        khz: u64,
        source: TscSource,
        measured_by: Option<Timer>,
        confirmed_by: Option<Timer>,
        cpuid_khz: Option<u64>,
    ) -> Calibration {
        Calibration {
            khz,
            source,
            measured_by,
            confirmed_by,
            cpuid_khz,
            attempts: self.attempts,
            rejected: self.rejected,
            disagreements: self.disagreements,
            pit_failed: self.pit_failed,
            reference_failed: self.reference_failed,
        }
    }
}

/// Measured rates, and the choice among them.
struct Samples {
    rates: [Rate; MAX_ATTEMPTS as usize],
    len: usize,
}

impl Samples {
    fn new() -> Self {
        Self {
            rates: [Rate {
                khz: 0,
                uncertainty_ppm: 0,
            }; MAX_ATTEMPTS as usize],
            len: 0,
        }
    }

    fn push(&mut self, rate: Rate) {
        if let Some(slot) = self.rates.get_mut(self.len) {
            *slot = rate;
            self.len += 1;
        }
    }

    /// The tightest measurement that at least `needed` measurements
    /// (itself included) agree with, and how many do not agree with it.
    fn settle(&self, needed: usize, tolerance_ppm: u32) -> Option<(Rate, u32)> {
        let rates = &self.rates[..self.len];
        rates
            .iter()
            .filter_map(|candidate| {
                let agreeing = rates
                    .iter()
                    .filter(|other| agree(candidate.khz, other.khz, tolerance_ppm))
                    .count();
                (agreeing >= needed).then_some((*candidate, (rates.len() - agreeing) as u32))
            })
            .min_by_key(|(rate, _)| rate.uncertainty_ppm)
    }
}

/// Finds the TSC rate (see the module docs).
pub fn calibrate(
    hardware: &mut impl TscHardware,
    config: &Config,
) -> Result<Calibration, CalibrationError> {
    let mut tally = Tally::default();
    let cpuid = cpuid_rate(hardware);
    let cpuid_khz = cpuid.map(|(khz, _)| khz);
    if let Some((khz, source)) = cpuid {
        let verdict = if config.check_cpuid {
            check_cpuid(hardware, config, khz, &mut tally)
        } else {
            CpuidVerdict::Unchecked
        };
        match verdict {
            CpuidVerdict::Confirmed(timer) => {
                return Ok(tally.calibration(khz, source, None, Some(timer), cpuid_khz));
            }
            CpuidVerdict::Unchecked => {
                return Ok(tally.calibration(khz, source, None, None, cpuid_khz));
            }
            CpuidVerdict::Overruled => {}
        }
    }

    let needed = config.samples();
    let mut reference = config.reference;
    // With a reference: its rates, and the PIT's verdicts on them.
    let mut reference_rates = Samples::new();
    let mut pit_agreed = 0;
    let mut pit_disputed = 0;
    // Without one: the PIT's rates.
    let mut pit_rates = Samples::new();
    for _ in 0..config.attempts() {
        tally.attempts += 1;
        let measurement = match measure_pit(hardware, config, reference) {
            Outcome::Measured(measurement) => measurement,
            Outcome::PitDead => {
                tally.pit_failed = true;
                break;
            }
            Outcome::ReferenceDead => {
                // From now on the PIT is on its own, and says so.
                tally.reference_failed = true;
                reference = None;
                continue;
            }
        };
        tally.rejected += measurement.rejected;
        match (reference, measurement.pit, measurement.reference) {
            (None, Some(pit), _) => pit_rates.push(pit),
            (Some(_), pit, Some(measured)) => {
                reference_rates.push(measured);
                if let Some(pit) = pit {
                    if agree(pit.khz, measured.khz, config.tolerance_ppm) {
                        pit_agreed += 1;
                    } else {
                        tally.disagreements += 1;
                        pit_disputed += 1;
                    }
                }
            }
            _ => {}
        }
        if let Some(reference) = reference {
            if pit_disputed >= needed && pit_disputed > pit_agreed {
                // Clean PIT counts that keep contradicting the reference.
                tally.pit_failed = true;
                break;
            }
            if pit_agreed > pit_disputed
                && let Some((rate, outliers)) = reference_rates.settle(needed, config.tolerance_ppm)
            {
                tally.disagreements += outliers;
                let source = match reference {
                    Reference::PmTimer { .. } => TscSource::PitCheckedPmTimer,
                    Reference::Hpet { .. } => TscSource::PitCheckedHpet,
                };
                let timers = (Some(reference.timer()), Some(Timer::Pit));
                return Ok(tally.calibration(rate.khz, source, timers.0, timers.1, cpuid_khz));
            }
        } else if let Some((rate, outliers)) = pit_rates.settle(needed, config.tolerance_ppm) {
            tally.disagreements += outliers;
            let source = TscSource::PitUnchecked;
            return Ok(tally.calibration(rate.khz, source, Some(Timer::Pit), None, cpuid_khz));
        }
    }

    // The reference alone: the PIT failed, or never had a clean count to
    // check it with (it keeps its readings from above).
    if let Some(reference) = reference {
        if tally.pit_failed {
            for _ in 0..config.attempts() {
                if reference_rates
                    .settle(needed, config.tolerance_ppm)
                    .is_some()
                {
                    break;
                }
                tally.attempts += 1;
                match measure_reference(hardware, config, reference) {
                    Ok(Some(rate)) => reference_rates.push(rate),
                    Ok(None) => tally.rejected += 1,
                    Err(_) => {
                        tally.reference_failed = true;
                        break;
                    }
                }
            }
        }
        if let Some((rate, outliers)) = reference_rates.settle(needed, config.tolerance_ppm) {
            tally.disagreements += outliers;
            let source = match reference {
                Reference::PmTimer { .. } => TscSource::PmTimer,
                Reference::Hpet { .. } => TscSource::Hpet,
            };
            return Ok(tally.calibration(
                rate.khz,
                source,
                Some(reference.timer()),
                None,
                cpuid_khz,
            ));
        }
    }
    let no_timer = tally.pit_failed && (config.reference.is_none() || tally.reference_failed);
    Err(CalibrationError {
        reason: if no_timer {
            FailureReason::NoTimer
        } else {
            FailureReason::NoAgreement
        },
        attempts: tally.attempts,
        rejected: tally.rejected,
        disagreements: tally.disagreements,
    })
}

/// What the check of a CPUID rate found.
enum CpuidVerdict {
    /// A clean measurement by this timer agreed.
    Confirmed(Timer),
    /// Nothing could judge it: no timer, no clean measurement, only one
    /// timer that disagreed, or two timers that disagreed with each other.
    Unchecked,
    /// Two timers agreed with each other and not with CPUID.
    Overruled,
}

/// Checks a CPUID rate against measurements: done at the first clean one
/// that agrees, or at the first on which two timers agree with each other
/// and not with CPUID (see the module docs for why one timer is not
/// enough).
fn check_cpuid(
    hardware: &mut impl TscHardware,
    config: &Config,
    cpuid_khz: u64,
    tally: &mut Tally,
) -> CpuidVerdict {
    let mut reference = config.reference;
    let mut pit_works = true;
    let mut lone_disagreement = false;
    for _ in 0..config.attempts() {
        tally.attempts += 1;
        let measurement = if pit_works {
            match measure_pit(hardware, config, reference) {
                Outcome::Measured(measurement) => measurement,
                Outcome::PitDead => {
                    tally.pit_failed = true;
                    pit_works = false;
                    continue;
                }
                Outcome::ReferenceDead => {
                    tally.reference_failed = true;
                    reference = None;
                    continue;
                }
            }
        } else {
            let Some(reference) = reference else { break };
            match measure_reference(hardware, config, reference) {
                Ok(rate) => Measurement {
                    pit: None,
                    reference: rate,
                    rejected: u32::from(rate.is_none()),
                },
                Err(_) => {
                    tally.reference_failed = true;
                    break;
                }
            }
        };
        tally.rejected += measurement.rejected;
        let agrees = |rate: Rate| agree(rate.khz, cpuid_khz, config.tolerance_ppm);
        match (measurement.pit, measurement.reference.zip(reference)) {
            (_, Some((measured, reference))) if agrees(measured) => {
                return CpuidVerdict::Confirmed(reference.timer());
            }
            (Some(pit), None) if agrees(pit) => return CpuidVerdict::Confirmed(Timer::Pit),
            (Some(pit), Some((measured, _))) => {
                tally.disagreements += 1;
                return if agree(pit.khz, measured.khz, config.tolerance_ppm) {
                    CpuidVerdict::Overruled
                } else {
                    // The timers disagree with each other: neither judges.
                    CpuidVerdict::Unchecked
                };
            }
            (None, None) => {}
            // One clean timer against CPUID: not enough to overrule it.
            // Look on for a second opinion, if there can be one.
            _ => {
                lone_disagreement = true;
                if reference.is_none() || !pit_works {
                    break;
                }
            }
        }
    }
    if lone_disagreement {
        tally.disagreements += 1;
    }
    CpuidVerdict::Unchecked
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    const NS: u128 = 1_000_000;
    const MS: u128 = 1_000_000_000_000;

    /// A simulated machine. Time is in femtoseconds; every hardware access
    /// takes a little of it. The TSC, the PIT, the PM timer and the HPET
    /// all follow it (as under TCG: the host's clock), at rates a test can
    /// make wrong, and the "host" can deschedule the machine at chosen
    /// moments.
    struct Machine {
        now: u128,
        tsc_hz: u128,
        /// The PIT counts this many times faster than it should (per mille).
        pit_speed_per_mille: u128,
        pit_dead: bool,
        pit_expiry: Option<u128>,
        pit_gates: u32,
        pm_timer: Option<PmSetup>,
        hpet: Option<HpetSetup>,
        cpuid: Vec<(u32, CpuidLeaf)>,
        /// (gate number from 1, how long): descheduled just before the
        /// poll that would see that gate's expiry.
        preempt_at_expiry: Vec<(u32, u128)>,
        /// (gate number, how long): descheduled right after the gate opens.
        preempt_at_start: Vec<(u32, u128)>,
        /// (gate number, how long): descheduled after the PM timer readings
        /// before that gate, before the gate's first TSC read.
        preempt_before_gate: Vec<(u32, u128)>,
        /// (gate number, how long): descheduled inside the first PM timer
        /// reading before that gate (between it and its closing TSC read).
        preempt_in_pm_read: Vec<(u32, u128)>,
        /// TSC reads left before a pending preemption, and its length.
        pending: Option<(u32, u128)>,
    }

    #[derive(Clone, Copy)]
    struct PmSetup {
        bits: u32,
        offset: u64,
        speed_per_mille: u128,
        stuck: bool,
    }

    #[derive(Clone, Copy)]
    struct HpetSetup {
        period_fs: u128,
        bits: u32,
        offset: u64,
    }

    impl Machine {
        fn new(tsc_hz: u128) -> Self {
            Self {
                now: 5 * MS,
                tsc_hz,
                pit_speed_per_mille: 1000,
                pit_dead: false,
                pit_expiry: None,
                pit_gates: 0,
                pm_timer: None,
                hpet: None,
                cpuid: Vec::new(),
                preempt_at_expiry: Vec::new(),
                preempt_at_start: Vec::new(),
                preempt_before_gate: Vec::new(),
                preempt_in_pm_read: Vec::new(),
                pending: None,
            }
        }

        fn with_pm_timer(mut self, bits: u32) -> Self {
            self.pm_timer = Some(PmSetup {
                bits,
                offset: 0,
                speed_per_mille: 1000,
                stuck: false,
            });
            self
        }

        fn intel(mut self, max_leaf: u32, signature: u32) -> Self {
            self.cpuid.push((
                0,
                CpuidLeaf {
                    eax: max_leaf,
                    ebx: 0x756e_6547,
                    edx: 0x4965_6e69,
                    ecx: 0x6c65_746e,
                },
            ));
            self.cpuid.push((
                1,
                CpuidLeaf {
                    eax: signature,
                    ..CpuidLeaf::default()
                },
            ));
            self
        }

        fn leaf(mut self, leaf: u32, eax: u32, ebx: u32, ecx: u32) -> Self {
            self.cpuid.push((
                leaf,
                CpuidLeaf {
                    eax,
                    ebx,
                    ecx,
                    edx: 0,
                },
            ));
            self
        }

        fn tick(&mut self, femtoseconds: u128) {
            self.now += femtoseconds;
        }

        fn pm_count(&self) -> Option<u32> {
            let pm = self.pm_timer?;
            let ticks = if pm.stuck {
                0
            } else {
                self.now * u128::from(PM_TIMER_HZ) * pm.speed_per_mille
                    / 1000
                    / FEMTOSECONDS_PER_SECOND
            };
            let mask = (1u128 << pm.bits) - 1;
            Some(((ticks + u128::from(pm.offset)) & mask) as u32)
        }
    }

    impl TscHardware for Machine {
        fn read_tsc(&mut self) -> u64 {
            if let Some((reads, delay)) = self.pending.take() {
                if reads == 1 {
                    self.tick(delay);
                } else {
                    self.pending = Some((reads - 1, delay));
                }
            }
            self.tick(20 * NS);
            (self.now * self.tsc_hz / FEMTOSECONDS_PER_SECOND) as u64
        }

        fn cpuid(&mut self, leaf: u32) -> CpuidLeaf {
            self.tick(100 * NS);
            // Out-of-range leaves answer with garbage, so reading one the
            // maximum leaf excludes shows up in the result.
            self.cpuid
                .iter()
                .find(|(number, _)| *number == leaf)
                .map_or(
                    CpuidLeaf {
                        eax: 7,
                        ebx: 1_000,
                        ecx: 1_000_000_000,
                        edx: 0,
                    },
                    |(_, value)| *value,
                )
        }

        fn pit_gate_start(&mut self, ticks: u16) {
            self.pit_gates += 1;
            let gate = self.pit_gates;
            self.tick(2_000 * NS);
            let length = u128::from(ticks) * FEMTOSECONDS_PER_SECOND * 1000
                / u128::from(PIT_HZ)
                / self.pit_speed_per_mille;
            self.pit_expiry = (!self.pit_dead).then_some(self.now + length);
            if let Some(&(_, delay)) = self.preempt_at_start.iter().find(|(g, _)| *g == gate) {
                self.tick(delay);
            }
        }

        fn pit_gate_expired(&mut self) -> bool {
            let gate = self.pit_gates;
            if let Some(expiry) = self.pit_expiry
                && self.now + 1_000 * NS >= expiry
                && let Some(index) = self.preempt_at_expiry.iter().position(|(g, _)| *g == gate)
            {
                let (_, delay) = self.preempt_at_expiry.remove(index);
                self.tick(delay);
            }
            self.tick(500 * NS);
            self.pit_expiry.is_some_and(|expiry| self.now >= expiry)
        }

        fn pit_gate_stop(&mut self) {
            self.tick(500 * NS);
            self.pit_expiry = None;
        }

        fn read_pm_timer(&mut self) -> Option<u32> {
            self.tick(300 * NS);
            let next_gate = self.pit_gates + 1;
            if self.pit_expiry.is_none() {
                let take = |list: &mut Vec<(u32, u128)>| {
                    let index = list.iter().position(|(g, _)| *g == next_gate)?;
                    Some(list.remove(index).1)
                };
                if let Some(delay) = take(&mut self.preempt_before_gate) {
                    // A stamp is three (TSC, PM, TSC) reads: the sixth TSC
                    // read from here opens the gate's start bracket.
                    self.pending = Some((6, delay));
                } else if let Some(delay) = take(&mut self.preempt_in_pm_read) {
                    self.pending = Some((1, delay));
                }
            }
            self.pm_count()
        }

        fn read_hpet_counter(&mut self) -> Option<u64> {
            self.tick(300 * NS);
            let hpet = self.hpet?;
            let ticks = self.now / hpet.period_fs + u128::from(hpet.offset);
            let mask = if hpet.bits == 64 {
                u128::from(u64::MAX)
            } else {
                (1u128 << hpet.bits) - 1
            };
            Some((ticks & mask) as u64)
        }
    }

    const TSC_HZ: u128 = 2_600_000_000;
    const TSC_KHZ: u64 = 2_600_000;
    const PM24: Option<Reference> = Some(Reference::PmTimer { extended: false });

    fn assert_close(khz: u64, expected: u64, ppm: u64) {
        let off = khz.abs_diff(expected) * 1_000_000 / expected;
        assert!(off <= ppm, "{khz} kHz is {off} ppm from {expected} kHz");
    }

    /// Skylake client (06_5EH) signature.
    const SKYLAKE: u32 = 0x0005_06E3;

    #[test]
    fn cpuid_15h_wins_when_present_and_is_checked() {
        // 24 MHz × 216 / 2 = 2592 MHz; leaf 0x16 says 2600 and loses.
        let mut machine = Machine::new(2_592_000_000)
            .with_pm_timer(24)
            .intel(0x16, SKYLAKE)
            .leaf(0x15, 2, 216, 24_000_000)
            .leaf(0x16, 2600, 0, 0);
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!(calibration.source, TscSource::Cpuid15h);
        assert_eq!(calibration.khz, 2_592_000);
        assert_eq!(calibration.cpuid_khz, Some(2_592_000));
        assert_eq!(calibration.measured_by, None);
        assert_eq!(calibration.confirmed_by, Some(Timer::PmTimer));
        assert_eq!(calibration.attempts, 1);
        assert_eq!(calibration.disagreements, 0);
    }

    #[test]
    fn cpuid_15h_without_crystal_uses_the_sdm_table() {
        // Kaby Lake (06_9EH): ECX = 0, crystal 24 MHz.
        let mut machine = Machine::new(2_800_000_000)
            .intel(0x16, 0x0009_06E9)
            .leaf(0x15, 2, 233, 0)
            .leaf(0x16, 2800, 0, 0);
        let config = Config {
            check_cpuid: false,
            ..Config::new(None)
        };
        let calibration = calibrate(&mut machine, &config).unwrap();
        assert_eq!(calibration.source, TscSource::Cpuid15h);
        assert_eq!(calibration.khz, 24_000 * 233 / 2);
        assert_eq!(calibration.confirmed_by, None);
        assert_eq!(calibration.attempts, 0);
    }

    #[test]
    fn cpuid_16h_when_15h_has_no_crystal_for_an_unknown_model() {
        // Ice Lake client (06_7EH) is not in the table.
        let mut machine = Machine::new(1_300_000_000)
            .with_pm_timer(32)
            .intel(0x1B, 0x0007_06E5)
            .leaf(0x15, 2, 108, 0)
            .leaf(0x16, 1300, 3900, 100);
        let config = Config::new(Some(Reference::PmTimer { extended: true }));
        let calibration = calibrate(&mut machine, &config).unwrap();
        assert_eq!(calibration.source, TscSource::Cpuid16h);
        assert_eq!(calibration.source.name(), "cpuid_16h");
        assert_eq!(calibration.khz, 1_300_000);
        assert_eq!(calibration.confirmed_by, Some(Timer::PmTimer));
    }

    #[test]
    fn cpuid_leaves_beyond_the_maximum_or_on_other_vendors_are_ignored() {
        // Max leaf 0xD: leaf 0x15 would answer garbage (142 GHz).
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24).intel(0xD, SKYLAKE);
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!(calibration.source, TscSource::PitCheckedPmTimer);
        assert_eq!(calibration.cpuid_khz, None);
        assert_close(calibration.khz, TSC_KHZ, 100);

        // An AMD CPU: not "GenuineIntel", whatever leaf 0x15 says.
        let mut machine = Machine::new(TSC_HZ)
            .with_pm_timer(24)
            .leaf(0, 0x16, 0x6874_7541, 0x444d_4163)
            .leaf(0x15, 2, 200, 24_000_000);
        assert_eq!(cpuid_rate(&mut machine), None);
    }

    #[test]
    fn a_cpuid_rate_two_timers_contradict_is_overruled_and_reported() {
        // CPUID claims 3 GHz; the TSC runs at 2.6 GHz by PIT and PM timer.
        let mut machine = Machine::new(TSC_HZ)
            .with_pm_timer(24)
            .intel(0x16, SKYLAKE)
            .leaf(0x15, 2, 250, 24_000_000);
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!(calibration.source, TscSource::PitCheckedPmTimer);
        assert_eq!(calibration.cpuid_khz, Some(3_000_000));
        assert_eq!(calibration.disagreements, 1);
        // One check, three measurements.
        assert_eq!(calibration.attempts, 4);
        assert_close(calibration.khz, TSC_KHZ, 100);
    }

    #[test]
    fn a_lone_timer_does_not_overrule_cpuid_but_is_reported() {
        // No reference; the PIT runs 10% fast.
        let mut machine = Machine::new(2_592_000_000)
            .intel(0x16, SKYLAKE)
            .leaf(0x15, 2, 216, 24_000_000);
        machine.pit_speed_per_mille = 1100;
        let calibration = calibrate(&mut machine, &Config::new(None)).unwrap();
        assert_eq!(calibration.source, TscSource::Cpuid15h);
        assert_eq!(calibration.khz, 2_592_000);
        assert_eq!(calibration.confirmed_by, None);
        assert_eq!((calibration.attempts, calibration.disagreements), (1, 1));
    }

    #[test]
    fn a_cpuid_rate_is_confirmed_by_the_reference_when_the_pit_is_dead() {
        let mut machine = Machine::new(2_592_000_000)
            .with_pm_timer(24)
            .intel(0x16, SKYLAKE)
            .leaf(0x15, 2, 216, 24_000_000);
        machine.pit_dead = true;
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!(calibration.source, TscSource::Cpuid15h);
        assert_eq!(calibration.confirmed_by, Some(Timer::PmTimer));
        assert!(calibration.pit_failed);
        assert_eq!(calibration.attempts, 2);
    }

    #[test]
    fn three_agreeing_measurements_against_the_pm_timer() {
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!(calibration.source, TscSource::PitCheckedPmTimer);
        assert_eq!(calibration.source.name(), "pit_checked_pm_timer");
        assert_eq!(calibration.measured_by, Some(Timer::PmTimer));
        assert_eq!(calibration.confirmed_by, Some(Timer::Pit));
        assert_eq!(calibration.attempts, 3);
        assert_eq!((calibration.rejected, calibration.disagreements), (0, 0));
        assert_close(calibration.khz, TSC_KHZ, 100);
    }

    #[test]
    fn a_pit_count_preempted_at_expiry_is_rejected_not_used() {
        // Gate 2 is seen 92 ms late: alone, 10 ms would measure ~26.5 GHz.
        // Without a reference, the PIT's rates are the result.
        let mut machine = Machine::new(TSC_HZ);
        machine.preempt_at_expiry.push((2, 92 * MS));
        let calibration = calibrate(&mut machine, &Config::new(None)).unwrap();
        assert_eq!(calibration.source, TscSource::PitUnchecked);
        assert_eq!(calibration.measured_by, Some(Timer::Pit));
        assert_close(calibration.khz, TSC_KHZ, 1000);
        assert_eq!((calibration.attempts, calibration.rejected), (4, 1));
        // Rejected by its brackets, not merely outvoted.
        assert_eq!(calibration.disagreements, 0);
    }

    #[test]
    fn a_late_pit_count_does_not_spoil_the_reference_reading_of_the_same_gate() {
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        machine.preempt_at_expiry.push((2, 92 * MS));
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_close(calibration.khz, TSC_KHZ, 100);
        // Gate 2's PIT half is thrown away; its PM timer half counts.
        assert_eq!((calibration.attempts, calibration.rejected), (3, 1));
        assert_eq!(calibration.disagreements, 0);
        assert_eq!(calibration.source, TscSource::PitCheckedPmTimer);
    }

    #[test]
    fn a_measurement_preempted_at_the_start_is_rejected_too() {
        let mut machine = Machine::new(TSC_HZ);
        machine.preempt_at_start.push((1, 6 * MS));
        let calibration = calibrate(&mut machine, &Config::new(None)).unwrap();
        assert_eq!(calibration.source, TscSource::PitUnchecked);
        assert_eq!(calibration.confirmed_by, None);
        assert_eq!((calibration.attempts, calibration.rejected), (4, 1));
        assert_close(calibration.khz, TSC_KHZ, 1000);
    }

    #[test]
    fn a_preempted_reference_reading_is_taken_again() {
        // 3 ms inside the first PM timer read of gate 2: one of the three
        // tries is spoiled, the tightest of the others is kept.
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        machine.preempt_in_pm_read.push((2, 3 * MS));
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!((calibration.attempts, calibration.rejected), (3, 0));
        assert_close(calibration.khz, TSC_KHZ, 100);
    }

    #[test]
    fn a_preemption_that_wraps_the_pm_timer_is_caught_by_the_pit_rate() {
        // 5 s between the PM timer reading and the gate: the 24-bit count
        // wraps (every 4.69 s), and the interval would look 0.32 s long.
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        machine.preempt_before_gate.push((1, 5_000 * MS));
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!((calibration.attempts, calibration.rejected), (4, 1));
        assert_eq!(calibration.disagreements, 0);
        assert_close(calibration.khz, TSC_KHZ, 100);
    }

    #[test]
    fn a_wrap_with_no_clean_pit_count_is_outvoted() {
        // The same 5 s, inside the PIT's start bracket: no PIT rate to
        // bound the interval, so the wrapped reading makes a wrong rate,
        // which the three agreeing ones outvote (and which is counted).
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        machine.preempt_at_start.push((1, 5_000 * MS));
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!((calibration.attempts, calibration.rejected), (4, 1));
        assert_eq!(calibration.disagreements, 1);
        assert_close(calibration.khz, TSC_KHZ, 100);
    }

    #[test]
    fn a_lying_pit_is_caught_by_the_pm_timer() {
        // The PIT runs 10% fast: every gate ends early.
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        machine.pit_speed_per_mille = 1100;
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!(calibration.source, TscSource::PmTimer);
        assert_eq!(calibration.source.name(), "pm_timer");
        assert_eq!(calibration.measured_by, Some(Timer::PmTimer));
        assert_eq!(calibration.confirmed_by, None);
        assert!(calibration.pit_failed);
        assert_eq!((calibration.attempts, calibration.disagreements), (3, 3));
        assert_close(calibration.khz, TSC_KHZ, 100);
    }

    #[test]
    fn a_lying_pm_timer_is_not_silently_believed() {
        // The PM timer runs 10% fast; the PIT is right. Two timers that
        // disagree: the result names the PM timer alone and counts three
        // disagreements, so the report shows what happened.
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        machine.pm_timer.as_mut().unwrap().speed_per_mille = 1100;
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!(calibration.source, TscSource::PmTimer);
        assert_eq!(calibration.confirmed_by, None);
        assert!(calibration.pit_failed);
        assert_eq!(calibration.disagreements, 3);
    }

    #[test]
    fn a_dead_pit_falls_back_to_the_reference_quickly() {
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        machine.pit_dead = true;
        let start = machine.now;
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!(calibration.source, TscSource::PmTimer);
        assert!(calibration.pit_failed);
        assert_eq!(calibration.attempts, 4);
        assert_close(calibration.khz, TSC_KHZ, 100);
        // Given up on after 20 gates by the PM timer, not 2M polls.
        let took_ms = (machine.now - start) / MS;
        assert!(took_ms < 400, "{took_ms} ms");
    }

    #[test]
    fn a_dead_pit_without_a_reference_is_an_error() {
        let mut machine = Machine::new(TSC_HZ);
        machine.pit_dead = true;
        let config = Config {
            max_polls: 10_000,
            ..Config::new(None)
        };
        let error = calibrate(&mut machine, &config).unwrap_err();
        assert_eq!(error.reason, FailureReason::NoTimer);
        assert_eq!(error.attempts, 1);
        assert_eq!(error.source_name(), "none");
    }

    #[test]
    fn a_stuck_reference_leaves_the_pit_unchecked_and_says_so() {
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        machine.pm_timer.as_mut().unwrap().stuck = true;
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!(calibration.source, TscSource::PitUnchecked);
        assert!(calibration.reference_failed);
        assert_eq!(calibration.attempts, 4);
        assert_close(calibration.khz, TSC_KHZ, 1000);
    }

    #[test]
    fn the_pm_timer_wraps_during_a_gate() {
        for bits in [24, 32] {
            let reference = Reference::PmTimer {
                extended: bits == 32,
            };
            let mask = (1u64 << bits) - 1;
            // The count 1000 ticks before its wrap at the first reading.
            let near_wrap = |machine: &mut Machine| {
                let now = u64::from(machine.pm_count().unwrap());
                machine.pm_timer.as_mut().unwrap().offset = (mask - 1000).wrapping_sub(now) & mask;
            };
            let mut machine = Machine::new(TSC_HZ).with_pm_timer(bits);
            near_wrap(&mut machine);
            let calibration = calibrate(&mut machine, &Config::new(Some(reference))).unwrap();
            assert_eq!(
                calibration.source,
                TscSource::PitCheckedPmTimer,
                "{bits} bits"
            );
            assert_eq!(
                (calibration.rejected, calibration.disagreements),
                (0, 0),
                "{bits} bits"
            );
            assert_close(calibration.khz, TSC_KHZ, 100);
            // Timed by the PM timer alone across the wrap, too.
            let mut machine = Machine::new(TSC_HZ).with_pm_timer(bits);
            near_wrap(&mut machine);
            let rate = measure_reference(&mut machine, &Config::new(None), reference);
            assert_close(rate.unwrap().unwrap().khz, TSC_KHZ, 100);
        }
    }

    #[test]
    fn hpet_as_the_reference_with_a_32_bit_counter_that_wraps() {
        let mut machine = Machine::new(TSC_HZ);
        let period_fs = 69_841_279; // 14.318 MHz
        let now = (machine.now / period_fs) as u64;
        machine.hpet = Some(HpetSetup {
            period_fs,
            bits: 32,
            offset: (u64::from(u32::MAX) - 5000).wrapping_sub(now) & 0xFFFF_FFFF,
        });
        let reference = Reference::hpet_from_capabilities((period_fs as u64) << 32).unwrap();
        assert_eq!(
            reference,
            Reference::Hpet {
                period_fs: period_fs as u32,
                wide: false
            }
        );
        let calibration = calibrate(&mut machine, &Config::new(Some(reference))).unwrap();
        assert_eq!(calibration.source, TscSource::PitCheckedHpet);
        assert_eq!(calibration.source.name(), "pit_checked_hpet");
        assert_eq!(calibration.measured_by, Some(Timer::Hpet));
        assert_eq!(calibration.disagreements, 0);
        assert_close(calibration.khz, TSC_KHZ, 100);
    }

    #[test]
    fn too_much_noise_without_a_reference_is_an_error_not_a_guess() {
        let mut machine = Machine::new(TSC_HZ);
        for gate in 1..=20 {
            machine.preempt_at_expiry.push((gate, 4 * MS));
        }
        let error = calibrate(&mut machine, &Config::new(None)).unwrap_err();
        assert_eq!(error.reason, FailureReason::NoAgreement);
        assert_eq!((error.attempts, error.rejected), (20, 20));
    }

    #[test]
    fn when_no_pit_count_is_ever_clean_the_reference_stands_alone_and_says_so() {
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        for gate in 1..=20 {
            machine.preempt_at_expiry.push((gate, 4 * MS));
        }
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_eq!(calibration.source, TscSource::PmTimer);
        assert_eq!(calibration.confirmed_by, None);
        assert!(!calibration.pit_failed);
        assert_eq!((calibration.attempts, calibration.rejected), (20, 20));
        assert_close(calibration.khz, TSC_KHZ, 100);
    }

    #[test]
    fn on_a_loaded_host_the_reference_carries_the_measurement() {
        // Gates 1 and 3 preempted at their end, gate 2 at its start: their
        // PIT counts are lost, their PM timer readings are not. Gate 4's
        // clean PIT count confirms.
        let mut machine = Machine::new(TSC_HZ).with_pm_timer(24);
        machine.preempt_at_expiry.extend([(1, 3 * MS), (3, 3 * MS)]);
        machine.preempt_at_start.push((2, 3 * MS));
        let calibration = calibrate(&mut machine, &Config::new(PM24)).unwrap();
        assert_close(calibration.khz, TSC_KHZ, 100);
        assert_eq!(calibration.source, TscSource::PitCheckedPmTimer);
        assert_eq!((calibration.attempts, calibration.rejected), (4, 3));
        assert_eq!(calibration.disagreements, 0);
    }

    #[test]
    fn source_names_are_stable() {
        let names = [
            (TscSource::Cpuid15h, "cpuid_15h"),
            (TscSource::Cpuid16h, "cpuid_16h"),
            (TscSource::PitCheckedPmTimer, "pit_checked_pm_timer"),
            (TscSource::PitCheckedHpet, "pit_checked_hpet"),
            (TscSource::PitUnchecked, "pit_unchecked"),
            (TscSource::PmTimer, "pm_timer"),
            (TscSource::Hpet, "hpet"),
        ];
        for (source, name) in names {
            assert_eq!(source.name(), name);
        }
        assert_eq!(Timer::Pit.name(), "pit");
        assert_eq!(Timer::PmTimer.name(), "pm_timer");
        assert_eq!(Timer::Hpet.name(), "hpet");
    }

    /// A FADT of `len` bytes with the PM timer fields set.
    fn fadt(
        len: usize,
        legacy_port: u32,
        pm_len: u8,
        flags: u32,
        x_block: Option<(u8, u64)>,
    ) -> Vec<u8> {
        let mut table = std::vec![0u8; len];
        let mut put = |offset: usize, bytes: &[u8]| {
            if offset + bytes.len() <= len {
                table[offset..offset + bytes.len()].copy_from_slice(bytes);
            }
        };
        put(76, &legacy_port.to_le_bytes());
        put(91, &[pm_len]);
        put(112, &flags.to_le_bytes());
        if let Some((space, address)) = x_block {
            put(208, &[space, 32, 0, 3]);
            put(212, &address.to_le_bytes());
        }
        table
    }

    #[test]
    fn pm_timer_port_from_the_fadt() {
        // ACPI 1.0 FADT (116 bytes), 24-bit timer at 0x608 (QEMU's PIIX4).
        assert_eq!(
            pm_timer_from_fadt(&fadt(116, 0x608, 4, 0, None)),
            Some(PmTimerBlock {
                port: 0x608,
                extended: false
            })
        );
        // ACPI 5 FADT: the 64-bit block wins; TMR_VAL_EXT makes it 32-bit.
        assert_eq!(
            pm_timer_from_fadt(&fadt(268, 0x408, 4, 1 << 8, Some((1, 0xB008)))),
            Some(PmTimerBlock {
                port: 0xB008,
                extended: true
            })
        );
        // A memory-mapped X block falls back to the legacy port.
        assert_eq!(
            pm_timer_from_fadt(&fadt(268, 0x408, 4, 0, Some((0, 0xFED0_0000)))),
            Some(PmTimerBlock {
                port: 0x408,
                extended: false
            })
        );
        // No PM timer: length not 4, hardware-reduced, no port, too short.
        assert_eq!(pm_timer_from_fadt(&fadt(268, 0x408, 0, 0, None)), None);
        assert_eq!(
            pm_timer_from_fadt(&fadt(268, 0x408, 4, 1 << 20, None)),
            None
        );
        assert_eq!(pm_timer_from_fadt(&fadt(268, 0, 4, 0, None)), None);
        assert_eq!(pm_timer_from_fadt(&fadt(268, 0x1_0000, 4, 0, None)), None);
        assert_eq!(pm_timer_from_fadt(&fadt(90, 0x408, 4, 0, None)), None);
        assert_eq!(pm_timer_from_fadt(&[]), None);
        // Truncated inside the X block: the legacy port is used.
        assert_eq!(
            pm_timer_from_fadt(&fadt(214, 0x408, 4, 0, Some((1, 0xB008)))),
            Some(PmTimerBlock {
                port: 0x408,
                extended: false
            })
        );
    }

    #[test]
    fn hpet_base_from_the_hpet_table() {
        let mut table = std::vec![0u8; 56];
        table[44..52].copy_from_slice(&0xFED0_0000u64.to_le_bytes());
        assert_eq!(hpet_base_from_table(&table), Some(0xFED0_0000));
        assert_eq!(hpet_base_from_table(&table[..50]), None);
        table[40] = 1; // I/O space
        assert_eq!(hpet_base_from_table(&table), None);
        table[40] = 0;
        table[44..52].copy_from_slice(&0xFED0_0010u64.to_le_bytes());
        assert_eq!(hpet_base_from_table(&table), None);
    }

    #[test]
    fn hpet_capabilities_are_checked() {
        assert_eq!(Reference::hpet_from_capabilities(0), None);
        assert_eq!(
            Reference::hpet_from_capabilities(u64::from(HPET_MAX_PERIOD_FS + 1) << 32),
            None
        );
        assert_eq!(
            Reference::hpet_from_capabilities((10_000_000 << 32) | (1 << 13)),
            Some(Reference::Hpet {
                period_fs: 10_000_000,
                wide: true
            })
        );
    }
}
