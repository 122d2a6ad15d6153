//! The VMX backend: capability checks, VMXON on every core, the control
//! values every VMCS uses, VMCS setup, EPT and the decoding of exits.
//!
//! A CPU without VMX (every CPU under QEMU TCG) is reported and runs no
//! guests; the hypervisor carries on without them.

pub mod backend;
pub mod ept;
pub mod exit;
pub mod platform;
pub mod vmcs;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
};

use crate::arch::vmx::{self as instructions, VmxonError};
use crate::mm;
const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
const IA32_VMX_EXIT_CTLS: u32 = 0x483;
const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
const IA32_VMX_MISC: u32 = 0x485;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;

const IA32_VMX_CR4_FIXED0: u32 = 0x488;

const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;

/// Why a CPU cannot run guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxError {
    /// CPUID reports no VMX (e.g. QEMU TCG).
    NotSupported,
    /// The firmware locked IA32_FEATURE_CONTROL with VMX disabled.
    DisabledByFirmware,
    /// VMX lacks a feature the guests need.
    MissingFeature(&'static str),
    /// No memory for the VMXON region.
    OutOfMemory,
    /// VMXON itself failed.
    VmxonFailed,
}

impl core::fmt::Display for VmxError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotSupported => write!(f, "the CPU has no VMX"),
            Self::DisabledByFirmware => {
                write!(f, "the firmware locked VMX off (IA32_FEATURE_CONTROL)")
            }
            Self::MissingFeature(feature) => write!(f, "VMX lacks {feature}"),
            Self::OutOfMemory => write!(f, "no memory for the VMXON region"),
            Self::VmxonFailed => write!(f, "VMXON failed"),
        }
    }
}

/// The control values every VMCS uses, computed once on the boot CPU from
/// the capability MSRs (all CPUs of a machine report the same).
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// VMCS revision identifier.
    pub revision: u32,
    /// Pin-based controls.
    pub pin: u32,
    /// Primary processor-based controls.
    pub primary: u32,
    /// Secondary processor-based controls.
    pub secondary: u32,
    /// VM-exit controls.
    pub exit: u32,
    /// VM-entry controls.
    pub entry: u32,
    /// Guest CR0 bits that must be 1 (PE and PG exempt: unrestricted guest).
    pub guest_cr0_fixed0: u64,
    /// Guest CR4 bits that must be 1.
    pub guest_cr4_fixed0: u64,
    /// Whether the VMX-preemption timer is used, and its TSC shift.
    pub preemption_timer_shift: Option<u8>,
    /// The controls of platform guests (real kernels), or what VMX lacks
    /// for them.
    pub platform: Result<PlatformControls, &'static str>,
}

/// The controls of a platform guest's VMCS (real kernels: events,
/// windows, MSR switching), beyond those of the in-tree guest.
#[derive(Debug, Clone, Copy)]
pub struct PlatformControls {
    /// Pin-based: external interrupts and NMIs exit, virtual NMIs,
    /// preemption timer.
    pub pin: u32,
    /// Primary: HLT, I/O, CR8, MONITOR/MWAIT exit; MSR bitmaps; TSC
    /// offsetting; secondary controls.
    pub primary: u32,
    /// Secondary: EPT, unrestricted guest, RDTSCP and INVPCID when there.
    pub secondary: u32,
    /// Exit: 64-bit host, EFER and PAT saved and loaded.
    pub exit: u32,
    /// Entry: EFER and PAT loaded (IA-32e mode set per entry).
    pub entry: u32,
}

static CAPABILITIES: spin::Once<Result<Capabilities, VmxError>> = spin::Once::new();
/// Bumped for every VMXON, for the report.
pub static CPUS_IN_VMX: AtomicU64 = AtomicU64::new(0);
static PREEMPTION_TIMER: AtomicBool = AtomicBool::new(false);

/// `desired` adjusted to what a capability MSR allows: bits the MSR's low
/// half sets must be 1, bits its high half clears must be 0. `None` if a
/// `required` bit is not allowed.
fn adjust(msr: u32, desired: u32, required: u32) -> Option<u32> {
    let value = instructions::capability(msr)?;
    let must_be_one = value as u32;
    let may_be_one = (value >> 32) as u32;
    let adjusted = (desired | must_be_one) & may_be_one;
    (adjusted & required == required).then_some(adjusted)
}

fn compute_capabilities() -> Result<Capabilities, VmxError> {
    let capability = |msr| instructions::capability(msr).ok_or(VmxError::NotSupported);
    let basic = capability(IA32_VMX_BASIC)?;
    let true_controls = basic & (1 << 55) != 0;
    let (pin_msr, proc_msr, exit_msr, entry_msr) = if true_controls {
        (
            IA32_VMX_TRUE_PINBASED_CTLS,
            IA32_VMX_TRUE_PROCBASED_CTLS,
            IA32_VMX_TRUE_EXIT_CTLS,
            IA32_VMX_TRUE_ENTRY_CTLS,
        )
    } else {
        (
            IA32_VMX_PINBASED_CTLS,
            IA32_VMX_PROCBASED_CTLS,
            IA32_VMX_EXIT_CTLS,
            IA32_VMX_ENTRY_CTLS,
        )
    };
    let missing = VmxError::MissingFeature;

    let pin_required =
        (PinbasedControls::EXTERNAL_INTERRUPT_EXITING | PinbasedControls::NMI_EXITING).bits();
    let pin_wanted = pin_required | PinbasedControls::VMX_PREEMPTION_TIMER.bits();
    let pin = adjust(pin_msr, pin_wanted, pin_required)
        .ok_or(missing("NMI and external-interrupt exiting"))?;

    let primary_required = (PrimaryControls::HLT_EXITING
        | PrimaryControls::UNCOND_IO_EXITING
        | PrimaryControls::SECONDARY_CONTROLS)
        .bits();
    let primary = adjust(proc_msr, primary_required, primary_required)
        .ok_or(missing("HLT/I-O exiting or secondary controls"))?;

    let secondary_required =
        (SecondaryControls::ENABLE_EPT | SecondaryControls::UNRESTRICTED_GUEST).bits();
    let secondary = adjust(
        IA32_VMX_PROCBASED_CTLS2,
        secondary_required,
        secondary_required,
    )
    .ok_or(missing("EPT with unrestricted guests"))?;

    let exit_required = ExitControls::HOST_ADDRESS_SPACE_SIZE.bits();
    let exit = adjust(exit_msr, exit_required, exit_required).ok_or(missing("a 64-bit host"))?;
    let entry = adjust(entry_msr, 0, 0).ok_or(missing("entry controls"))?;

    let ept = capability(IA32_VMX_EPT_VPID_CAP)?;
    let ept_needed = (1 << 6) | (1 << 14) | (1 << 16); // 4-level walk, write-back, 2 MiB pages
    if ept & ept_needed != ept_needed {
        return Err(missing("4-level write-back EPT with 2 MiB pages"));
    }

    let (cr0_fixed0, cr4_fixed0) = (
        capability(IA32_VMX_CR0_FIXED0)?,
        capability(IA32_VMX_CR4_FIXED0)?,
    );
    let preemption_timer = pin & PinbasedControls::VMX_PREEMPTION_TIMER.bits() != 0;
    let misc = capability(IA32_VMX_MISC)?;
    let shift = (misc & 0x1F) as u8;
    let platform = platform_controls(pin_msr, proc_msr, exit_msr, entry_msr, preemption_timer);
    PREEMPTION_TIMER.store(preemption_timer, Ordering::Relaxed);
    Ok(Capabilities {
        revision: (basic & 0x7FFF_FFFF) as u32,
        pin,
        primary,
        secondary,
        exit,
        entry,
        guest_cr0_fixed0: cr0_fixed0 & !((1 << 0) | (1 << 31)),
        guest_cr4_fixed0: cr4_fixed0,
        preemption_timer_shift: preemption_timer.then_some(shift),
        platform,
    })
}

/// The controls platform guests need, from the capability MSRs.
fn platform_controls(
    pin_msr: u32,
    proc_msr: u32,
    exit_msr: u32,
    entry_msr: u32,
    preemption_timer: bool,
) -> Result<PlatformControls, &'static str> {
    if !preemption_timer {
        return Err("the VMX-preemption timer");
    }
    let pin = (PinbasedControls::EXTERNAL_INTERRUPT_EXITING
        | PinbasedControls::NMI_EXITING
        | PinbasedControls::VIRTUAL_NMIS
        | PinbasedControls::VMX_PREEMPTION_TIMER)
        .bits();
    let pin = adjust(pin_msr, pin, pin).ok_or("virtual NMIs")?;
    let primary = (PrimaryControls::HLT_EXITING
        | PrimaryControls::UNCOND_IO_EXITING
        | PrimaryControls::USE_TSC_OFFSETTING
        | PrimaryControls::CR8_LOAD_EXITING
        | PrimaryControls::CR8_STORE_EXITING
        | PrimaryControls::USE_MSR_BITMAPS
        | PrimaryControls::MWAIT_EXITING
        | PrimaryControls::MONITOR_EXITING
        | PrimaryControls::SECONDARY_CONTROLS)
        .bits();
    let primary = adjust(proc_msr, primary, primary).ok_or("MSR bitmaps, CR8 or TSC offsetting")?;
    let windows =
        (PrimaryControls::INTERRUPT_WINDOW_EXITING | PrimaryControls::NMI_WINDOW_EXITING).bits();
    adjust(proc_msr, primary | windows, windows).ok_or("interrupt- and NMI-window exiting")?;
    let secondary_required =
        (SecondaryControls::ENABLE_EPT | SecondaryControls::UNRESTRICTED_GUEST).bits();
    let secondary_wanted = secondary_required
        | (SecondaryControls::ENABLE_RDTSCP | SecondaryControls::ENABLE_INVPCID).bits();
    let secondary = adjust(
        IA32_VMX_PROCBASED_CTLS2,
        secondary_wanted,
        secondary_required,
    )
    .ok_or("EPT with unrestricted guests")?;
    let exit = (ExitControls::HOST_ADDRESS_SPACE_SIZE
        | ExitControls::SAVE_IA32_EFER
        | ExitControls::LOAD_IA32_EFER
        | ExitControls::SAVE_IA32_PAT
        | ExitControls::LOAD_IA32_PAT)
        .bits();
    let debug_exit = exit | ExitControls::SAVE_DEBUG_CONTROLS.bits();
    let exit = adjust(exit_msr, debug_exit, exit).ok_or("EFER and PAT switching on exit")?;
    let entry = (EntryControls::LOAD_IA32_EFER | EntryControls::LOAD_IA32_PAT).bits();
    let debug_entry = entry | EntryControls::LOAD_DEBUG_CONTROLS.bits();
    let entry = adjust(entry_msr, debug_entry, entry).ok_or("EFER and PAT loading on entry")?;
    Ok(PlatformControls {
        pin,
        primary,
        secondary,
        exit,
        entry,
    })
}

/// The VMX capabilities of this machine, or why it has none.
pub fn capabilities() -> Result<Capabilities, VmxError> {
    *CAPABILITIES.call_once(compute_capabilities)
}

/// Enters VMX root operation on this CPU. Returns the VMXON region.
pub fn enable_on_this_cpu() -> Result<u64, VmxError> {
    let capabilities = capabilities()?;
    let region = mm::alloc_zeroed_page().ok_or(VmxError::OutOfMemory)?;
    // The revision goes in the first four bytes of our fresh page.
    mm::phys::write(region, &capabilities.revision.to_le_bytes());
    instructions::vmxon(region).map_err(|error| match error {
        VmxonError::NotSupported => VmxError::NotSupported,
        VmxonError::DisabledByFirmware => VmxError::DisabledByFirmware,
        VmxonError::Failed => VmxError::VmxonFailed,
    })?;
    CPUS_IN_VMX.fetch_add(1, Ordering::Relaxed);
    Ok(region)
}
