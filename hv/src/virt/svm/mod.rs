//! The SVM backend (AMD-V): capability checks, EFER.SVME and a host save
//! area on every core, a VMCB per vCPU, nested paging, ASIDs, and the
//! APIC timer as the time slice.
//!
//! Chosen at run time when the CPU has SVM and no VMX (AMD servers, and
//! QEMU TCG's `-cpu max`, which emulates SVM with nested paging).
//!
//! - **Time slice**: SVM has no preemption timer; a host timer interrupt,
//!   intercepted, is the slice's end. The guest runs with the INTR
//!   intercept and V_INTR_MASKING, so a host interrupt makes it exit, and
//!   an interrupt exit once the slice is over ends the slice
//!   ([`Exit::Preempted`](hv_core::exits::Exit)); the interrupt itself is
//!   taken at the next interrupt window. The timer is the local APIC
//!   timer: with the lockup detector on (`watchdog=`, the default) it is
//!   already ticking every `cpu::watchdog::TICK_MS` on every CPU, and the
//!   backend leaves it alone, so a slice ends at the first exit after its
//!   end and at the latest at the next tick (the run loop also ends it at
//!   any exit past its end); with the detector off, a VMRUN arms the timer
//!   one-shot ([`SLICE_TIMER_VECTOR`]) for the slice, unless it still runs
//!   from an earlier entry and ends no later than the new deadline (a
//!   platform guest's timer re-arms it). (One APIC timer per CPU: a timer
//!   service that multiplexes deadlines would give exact slices, and
//!   platform guests exact timers, with the detector on; with it on their
//!   timers fire at its ticks.)
//! - **Platform guests** (real kernels on `hv_devices`' platforms):
//!   [`platform`], the `PlatformBackend` over the VMCB.
//! - **NMIs**: intercepted. An NMI that arrives in guest mode exits to
//!   the host and stays pending while GIF = 0; the backend notes that the
//!   NMI came as an exit (`crash::nmi`), then STGI delivers it to the
//!   host's handler, which answers a crash shootdown.
//! - **ASIDs**: every vCPU has its own ASID when there are enough, else
//!   they share them round-robin; each CPU remembers which VMCB last ran
//!   with each ASID and has VMRUN flush that ASID's TLB entries whenever
//!   another VMCB (or the same one, back from another CPU) runs with it.
//! - **Clean bits**: zero before every VMRUN (every field reloaded).
//! - **Exits**: [`exit`] reads the VMCB, `hv_core::svm_exit` (host-tested)
//!   decides what the exit means.

pub mod backend;
pub mod exit;
pub mod npt;
pub mod platform;
pub mod vmcb;

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use smp_boot::madt::MAX_CPUS;

use crate::arch::{self, apic, svm};
use crate::cpu::time;
use crate::mm;

/// The vector of the slice timer (the local APIC timer, one-shot).
pub const SLICE_TIMER_VECTOR: u8 = 0xEC;

/// Why a CPU cannot run guests with SVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvmError {
    /// CPUID reports no SVM.
    NotSupported,
    /// The firmware disabled SVM (VM_CR.SVMDIS).
    DisabledByFirmware,
    /// SVM lacks a feature the guests need.
    MissingFeature(&'static str),
    /// No memory for the per-CPU areas or the permission maps.
    OutOfMemory,
    /// EFER.SVME did not stay set.
    EnableFailed,
}

impl core::fmt::Display for SvmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotSupported => write!(f, "the CPU has no SVM"),
            Self::DisabledByFirmware => write!(f, "the firmware disabled SVM (VM_CR.SVMDIS)"),
            Self::MissingFeature(feature) => write!(f, "SVM lacks {feature}"),
            Self::OutOfMemory => write!(f, "no memory for SVM's per-CPU areas"),
            Self::EnableFailed => write!(f, "EFER.SVME did not stay set"),
        }
    }
}

/// What every vCPU and CPU shares, computed once on the boot CPU.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// CPUID's view of SVM.
    pub features: svm::Features,
    /// ASIDs the guests use: 1 to `usable_asids`.
    pub usable_asids: u32,
    /// APIC timer ticks per millisecond (divided by 16).
    pub timer_ticks_per_ms: u64,
    /// The CPU has RDTSCP (and so TSC_AUX, which guests get their own of).
    pub rdtscp: bool,
    /// The I/O permission map: every port intercepted (three pages).
    pub iopm: u64,
    /// The MSR permission map: every MSR intercepted (two pages).
    pub msrpm: u64,
}

static CAPABILITIES: spin::Once<Result<Capabilities, SvmError>> = spin::Once::new();

/// CPUs with SVM enabled.
pub static CPUS_IN_SVM: AtomicU64 = AtomicU64::new(0);

/// Per CPU: the page VMSAVE keeps the host's FS, GS, TR, LDTR and syscall
/// MSRs in across a VMRUN.
static HOST_VMSAVE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: the VMCB it runs (made current by the loaded-context protocol).
static CURRENT: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: a page of 512 u64, the VMCB that last ran with each ASID here.
static ASID_OWNERS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Per CPU: when its slice timer, armed by an entry, expires (TSC
/// microseconds).
static TIMER_UNTIL_US: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The next ASID handed out (round-robin over the usable ones).
static NEXT_ASID: AtomicU32 = AtomicU32::new(0);

/// The most ASIDs one owner page tracks (index 0 is the host's).
const MAX_TRACKED_ASIDS: u32 = 511;

/// Measures the local APIC timer (divided by 16) against the TSC, masked,
/// on this CPU (the boot CPU, before the lockup detector starts its own
/// ticks). Ticks per millisecond.
fn calibrate_timer() -> u64 {
    const WINDOW_US: u64 = 2_000;
    apic::timer_start_one_shot(u32::MAX);
    let began = time::now_us();
    time::delay_us(WINDOW_US);
    let elapsed_us = time::now_us().saturating_sub(began).max(1);
    let counted = u64::from(u32::MAX - apic::timer_current());
    apic::timer_stop();
    (counted.saturating_mul(1000) / elapsed_us).max(1)
}

/// A zeroed run of `pages` pages filled with `byte`.
fn alloc_filled(pages: u64, byte: u8) -> Option<u64> {
    let start = mm::alloc_aligned(pages, 1)?;
    // A fresh allocation of ours.
    mm::phys::fill(start, pages * 4096, byte);
    Some(start)
}

fn compute_capabilities() -> Result<Capabilities, SvmError> {
    let features = svm::features().ok_or(SvmError::NotSupported)?;
    if svm::disabled_by_firmware() {
        return Err(SvmError::DisabledByFirmware);
    }
    if !features.nested_paging {
        return Err(SvmError::MissingFeature("nested paging"));
    }
    if features.asids < 2 {
        return Err(SvmError::MissingFeature("an ASID for guests"));
    }
    // Every port and MSR intercepted: all ones.
    let iopm = alloc_filled(3, 0xFF).ok_or(SvmError::OutOfMemory)?;
    let msrpm = alloc_filled(2, 0xFF).ok_or(SvmError::OutOfMemory)?;
    Ok(Capabilities {
        features,
        usable_asids: (features.asids - 1).min(MAX_TRACKED_ASIDS),
        timer_ticks_per_ms: calibrate_timer(),
        rdtscp: raw_cpuid::CpuId::new()
            .get_extended_processor_and_feature_identifiers()
            .is_some_and(|f| f.has_rdtscp()),
        iopm,
        msrpm,
    })
}

/// SVM's capabilities on this machine, or why it has none. The first
/// call (on the boot CPU) calibrates the APIC timer.
pub fn capabilities() -> Result<Capabilities, SvmError> {
    *CAPABILITIES.call_once(compute_capabilities)
}

/// Enables SVM on this CPU: its host save area (VM_HSAVE_PA), its VMSAVE
/// page, its ASID table, EFER.SVME. Returns the host save area.
pub fn enable_on_this_cpu() -> Result<u64, SvmError> {
    capabilities()?;
    let cpu = crate::cpu::percpu::current_cpu_index() as usize;
    let host_save = mm::alloc_zeroed_page().ok_or(SvmError::OutOfMemory)?;
    let host_vmsave = mm::alloc_zeroed_page().ok_or(SvmError::OutOfMemory)?;
    let asid_owners = mm::alloc_zeroed_page().ok_or(SvmError::OutOfMemory)?;
    svm::enable(host_save).map_err(|error| match error {
        svm::EnableError::NotSupported => SvmError::NotSupported,
        svm::EnableError::DisabledByFirmware => SvmError::DisabledByFirmware,
        svm::EnableError::DidNotStick => SvmError::EnableFailed,
    })?;
    HOST_VMSAVE[cpu].store(host_vmsave, Ordering::Relaxed);
    ASID_OWNERS[cpu].store(asid_owners, Ordering::Relaxed);
    CPUS_IN_SVM.fetch_add(1, Ordering::Relaxed);
    Ok(host_save)
}

/// The next guest ASID (1 to `usable_asids`, round-robin).
fn next_asid(capabilities: &Capabilities) -> u32 {
    NEXT_ASID.fetch_add(1, Ordering::Relaxed) % capabilities.usable_asids + 1
}

/// The slice timer's handler: the interrupt only had to make the guest
/// exit. The one-shot is spent, so the next entry arms it again: it can
/// fire a little before the moment [`TIMER_UNTIL_US`] names (the two
/// clocks are read apart, and the APIC timer's rate is calibrated), and an
/// entry that took it for still armed ran a guest with no timer at all. A
/// spinning vCPU then kept its core, and the vCPUs queued behind it
/// starved (kvm-unit-tests' `vmexit_*` batch timed out).
pub fn on_slice_timer(_: &mut arch::idt::TrapFrame) {
    let cpu = crate::cpu::percpu::current_cpu_index() as usize;
    if let Some(until) = TIMER_UNTIL_US.get(cpu) {
        until.store(0, Ordering::Relaxed);
    }
    apic::end_of_interrupt();
}
