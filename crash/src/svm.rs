//! The crash path on SVM (AMD-V): how a CPU that runs guests with SVM
//! leaves it, and the record of how it did.
//!
//! What makes SVM different from VMX in a crash:
//!
//! - **Nothing is written back later.** A #VMEXIT writes the guest's whole
//!   state into its VMCB; a CPU out of guest mode holds no VMCB the way a
//!   VMX CPU holds an active VMCS in its non-coherent cache. What it may
//!   keep is a *read* cache: fields a VMCB's clean bits mark unchanged may
//!   be reused by the next VMRUN of that VMCB on that CPU.
//! - **GIF.** Between CLGI and STGI (around every VMRUN) the CPU holds
//!   NMIs, INIT and interrupts pending. A CPU left with GIF = 0 cannot be
//!   started again by the capture kernel (INIT is held) and never takes
//!   another NMI. STGI raises #UD once EFER.SVME is clear, so GIF must be
//!   set *before* SVM is switched off.
//! - **EFER.SVME and VM_HSAVE_PA** stay as the hypervisor left them
//!   across kexec; the capture kernel must find SVM off and no host save
//!   area pointing into memory it now owns.
//!
//! So each CPU, in its crash handler, after walking its list of the VMCBs
//! it ran, does what Linux's emergency path does
//! (`svm_emergency_disable_virtualization_cpu`), in this order:
//! 1. STGI (GIF = 1);
//! 2. clear EFER.SVME, and read it back;
//! 3. set VM_HSAVE_PA to 0, and read it back;
//!
//! then checks in. [`leave_svm`] is that sequence over the small
//! [`SvmHardware`] trait; [`SvmLedgers`] keeps, per CPU, how it went, so
//! that the summary and the dump can say which CPUs are out of SVM.
//!
//! # The per-CPU list of VMCBs
//!
//! The VMCBs a CPU ran live on the same per-CPU lists as VMCSes do
//! ([`crate::loaded_vmcs::VmcsArena`]), with the same NMI-safe discipline,
//! through an SVM implementation of its [`Vmx`](crate::loaded_vmcs::Vmx)
//! trait. There, "load" (`vmptrld`) makes a VMCB the one this CPU runs,
//! and "clear" (`vmclear`) means: the CPU is out of guest mode with this
//! VMCB (its state is in memory), and its clean bits are zeroed, so no CPU
//! may reuse a cached copy of any of its fields. The crash walk does that
//! for every VMCB on the CPU's list, and credits it to the CPU, so the
//! ledger still says which vCPU was on which CPU. (The tests below run an
//! NMI after every store of a list update, as for VMCSes.)

use core::fmt;
use core::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use crate::shootdown::Fault;

/// The SVM instructions and MSRs the crash path uses on its own CPU
/// (the kernel: the real ones, with fix-ups; tests: fakes).
pub trait SvmHardware {
    /// Whether EFER.SVME is set (read from the CPU).
    fn efer_svme(&mut self) -> bool;
    /// STGI; `Err(Fault::InvalidOpcode)` when EFER.SVME is clear.
    fn stgi(&mut self) -> Result<(), Fault>;
    /// Clears EFER.SVME.
    fn clear_efer_svme(&mut self) -> Result<(), Fault>;
    /// Sets VM_HSAVE_PA to 0.
    fn clear_hsave_pa(&mut self) -> Result<(), Fault>;
    /// VM_HSAVE_PA (read from the CPU).
    fn hsave_pa(&mut self) -> u64;
}

/// A step of [`leave_svm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvmStep {
    /// STGI.
    Stgi,
    /// Clearing EFER.SVME.
    ClearSvme,
    /// Setting VM_HSAVE_PA to 0.
    ClearHsave,
}

/// How a CPU left SVM in the crash path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvmExit {
    /// Not tried yet.
    NotAttempted,
    /// EFER.SVME was clear when the crash began (no SVM on this CPU, or
    /// not yet enabled); VM_HSAVE_PA was set to 0 and reads 0.
    WasOff,
    /// STGI, EFER.SVME cleared and read back clear, VM_HSAVE_PA set to 0
    /// and read back 0.
    Left,
    /// A step failed: it faulted (`fault`), or what it wrote did not read
    /// back (`fault: None`). The later steps were still done.
    Failed {
        /// The first step that failed.
        step: SvmStep,
        /// Its fault, if it faulted.
        fault: Option<Fault>,
    },
}

impl SvmExit {
    /// Whether the CPU is out of SVM: EFER.SVME and VM_HSAVE_PA read back
    /// clear.
    pub const fn is_off(self) -> bool {
        matches!(self, Self::WasOff | Self::Left)
    }

    /// Whether EFER.SVME was set when the crash began.
    pub const fn was_on(self) -> bool {
        matches!(self, Self::Left | Self::Failed { .. })
    }

    /// Its ledger encoding (read back by [`decode`](Self::decode)).
    pub const fn encode(self) -> u32 {
        const fn step(step: SvmStep) -> u32 {
            match step {
                SvmStep::Stgi => 0,
                SvmStep::ClearSvme => 1,
                SvmStep::ClearHsave => 2,
            }
        }
        const fn fault(fault: Option<Fault>) -> u32 {
            match fault {
                None => 0,
                Some(Fault::InvalidOpcode) => 1,
                Some(Fault::GeneralProtection) => 2,
                Some(Fault::VmFail) => 3,
            }
        }
        match self {
            Self::NotAttempted => 0,
            Self::WasOff => 1,
            Self::Left => 2,
            Self::Failed { step: s, fault: f } => 0x100 | (step(s) << 4) | fault(f),
        }
    }

    /// An exit from its ledger encoding.
    pub const fn decode(raw: u32) -> Self {
        match raw {
            1 => Self::WasOff,
            2 => Self::Left,
            raw if raw & 0x100 != 0 => Self::Failed {
                step: match (raw >> 4) & 0xF {
                    0 => SvmStep::Stgi,
                    1 => SvmStep::ClearSvme,
                    _ => SvmStep::ClearHsave,
                },
                fault: match raw & 0xF {
                    1 => Some(Fault::InvalidOpcode),
                    2 => Some(Fault::GeneralProtection),
                    3 => Some(Fault::VmFail),
                    _ => None,
                },
            },
            _ => Self::NotAttempted,
        }
    }
}

impl fmt::Display for SvmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAttempted => f.write_str("not attempted"),
            Self::WasOff => f.write_str("SVM was off"),
            Self::Left => f.write_str("SVM off"),
            Self::Failed { step, fault } => {
                let what = match step {
                    SvmStep::Stgi => "STGI",
                    SvmStep::ClearSvme => "clearing EFER.SVME",
                    SvmStep::ClearHsave => "clearing VM_HSAVE_PA",
                };
                match fault {
                    Some(fault) => write!(f, "STILL IN SVM: {what} raised {fault}"),
                    None => write!(f, "STILL IN SVM: {what} did not read back"),
                }
            }
        }
    }
}

/// Leaves SVM on this CPU: STGI, clear EFER.SVME, VM_HSAVE_PA = 0, each
/// read back, in that order (module docs). `was_on` says whether
/// EFER.SVME was set when the crash began on this CPU (an interrupted
/// earlier run may have cleared it since); STGI and the clearing of
/// EFER.SVME are done only while EFER.SVME is set (STGI would #UD after).
/// Every step is done even when an earlier one failed: each gets the CPU
/// closer to being out of SVM.
pub fn leave_svm<H: SvmHardware + ?Sized>(hw: &mut H, was_on: bool) -> SvmExit {
    let mut first_failure: Option<(SvmStep, Option<Fault>)> = None;
    let mut fail = |step, fault| {
        first_failure.get_or_insert((step, fault));
    };
    if hw.efer_svme() {
        if let Err(fault) = hw.stgi() {
            fail(SvmStep::Stgi, Some(fault));
        }
        if let Err(fault) = hw.clear_efer_svme() {
            fail(SvmStep::ClearSvme, Some(fault));
        }
    }
    if hw.efer_svme() {
        fail(SvmStep::ClearSvme, None);
    }
    if let Err(fault) = hw.clear_hsave_pa() {
        fail(SvmStep::ClearHsave, Some(fault));
    }
    if hw.hsave_pa() != 0 {
        fail(SvmStep::ClearHsave, None);
    }
    match first_failure {
        Some((step, fault)) => SvmExit::Failed { step, fault },
        None if was_on => SvmExit::Left,
        None => SvmExit::WasOff,
    }
}

// Status bits of a CPU's SVM record.
const STARTED: u8 = 1 << 0;
const WAS_ON: u8 = 1 << 1;
const DONE: u8 = 1 << 2;

#[derive(Debug)]
struct SvmSlot {
    status: AtomicU8,
    exit: AtomicU32,
}

/// Per CPU, how it left SVM in the crash path. Like the crash
/// coordinator, `new` is a `const fn`: the kernel keeps one in a `static`
/// for every possible CPU, valid from the first instruction.
///
/// A CPU writes only its own slot (Relaxed stores, published by a Release
/// read-modify-write of its status); readers load the status with Acquire
/// first. The CPU's check-in with the coordinator comes after
/// [`leave`](Self::leave) returns, and is itself a Release
/// read-modify-write that the coordinator reads with Acquire, so a
/// checked-in CPU's record is complete.
#[derive(Debug)]
pub struct SvmLedgers<const CPUS: usize> {
    slots: [SvmSlot; CPUS],
}

impl<const CPUS: usize> Default for SvmLedgers<CPUS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const CPUS: usize> SvmLedgers<CPUS> {
    /// Every CPU: not attempted.
    pub const fn new() -> Self {
        Self {
            slots: [const {
                SvmSlot {
                    status: AtomicU8::new(0),
                    exit: AtomicU32::new(0),
                }
            }; CPUS],
        }
    }

    /// Leaves SVM on `cpu` ([`leave_svm`]) and records how. Run again on a
    /// CPU whose earlier run was interrupted (a nested crash), it redoes
    /// the sequence, remembering whether SVM was on when the first run
    /// began; after a completed run it only returns the recorded exit.
    pub fn leave<H: SvmHardware + ?Sized>(&self, cpu: usize, hw: &mut H) -> SvmExit {
        let Some(slot) = self.slots.get(cpu) else {
            let was_on = hw.efer_svme();
            return leave_svm(hw, was_on);
        };
        let status = slot.status.load(Ordering::Acquire);
        if status & DONE != 0 {
            return SvmExit::decode(slot.exit.load(Ordering::Relaxed));
        }
        let was_on = if status & STARTED != 0 {
            status & WAS_ON != 0
        } else {
            let on = hw.efer_svme();
            slot.status
                .fetch_or(STARTED | if on { WAS_ON } else { 0 }, Ordering::AcqRel);
            on
        };
        let exit = leave_svm(hw, was_on);
        slot.exit.store(exit.encode(), Ordering::Relaxed);
        slot.status.fetch_or(DONE, Ordering::Release);
        exit
    }

    /// How `cpu` left SVM, once it has ([`SvmExit::NotAttempted`] before,
    /// and for a CPU without a slot).
    pub fn exit(&self, cpu: usize) -> SvmExit {
        match self.slots.get(cpu) {
            Some(slot) if slot.status.load(Ordering::Acquire) & DONE != 0 => {
                SvmExit::decode(slot.exit.load(Ordering::Relaxed))
            }
            _ => SvmExit::NotAttempted,
        }
    }
}

#[cfg(test)]
mod tests;
