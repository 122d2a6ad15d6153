//! The crash path's SVM side: the per-CPU record of how each CPU left SVM
//! (`crash::svm::SvmLedgers`), the SVM instructions behind
//! `crash::svm::SvmHardware`, and the SVM "clear" of a VMCB on a CPU's
//! list.
//!
//! On SVM the loaded-context lists hold VMCBs (the virtualization layer
//! says so at boot, [`set_backend_svm`]). A #VMEXIT has already written a
//! VMCB's state to memory; what a CPU may still hold of it is a cached
//! copy of the fields its clean bits mark, which a later VMRUN of it on
//! that CPU would trust. The crash walk's "clear" zeroes those bits and
//! reads them back, and is credited to the CPU like a VMCLEAR, so the
//! ledger says which VMCB (vCPU) was on which CPU.

use core::sync::atomic::{AtomicU8, Ordering};

use crash::shootdown::Fault;
use crash::svm::{SvmHardware, SvmLedgers};
use smp_boot::madt::MAX_CPUS;

use crate::arch::svm::{self, EFER_SVME, Outcome, VMCB_CLEAN_BITS};
use crate::mm::phys;

/// Per CPU, how it left SVM in the crash path. Exists for every possible
/// CPU from the first instruction.
pub static LEDGERS: SvmLedgers<MAX_CPUS> = SvmLedgers::new();

/// Which backend runs the guests, for the crash path's words and its
/// "clear": none yet (0), VMX (1), SVM (2).
static BACKEND: AtomicU8 = AtomicU8::new(0);

/// The virtualization layer chose VMX: the lists hold VMCSes.
pub fn set_backend_vmx() {
    BACKEND.store(1, Ordering::Release);
}

/// The virtualization layer chose SVM: the lists hold VMCBs.
pub fn set_backend_svm() {
    BACKEND.store(2, Ordering::Release);
}

/// Whether the lists hold VMCBs (SVM) rather than VMCSes.
pub fn backend_is_svm() -> bool {
    BACKEND.load(Ordering::Acquire) == 2
}

/// The backend whose contexts the lists hold.
pub fn backend() -> crash::summary::Backend {
    use crash::summary::Backend;
    match BACKEND.load(Ordering::Acquire) {
        1 => Backend::Vmx,
        2 => Backend::Svm,
        _ => Backend::None,
    }
}

/// The crash walk's SVM clear of the VMCB at `vmcb` (a page of the
/// kernel's, out of guest mode on this CPU): zero its clean bits and read
/// them back.
pub fn clear_vmcb(vmcb: u64) -> bool {
    phys::write(vmcb + VMCB_CLEAN_BITS, &0u32.to_le_bytes());
    phys::with_bytes_mut(vmcb + VMCB_CLEAN_BITS, 4, |bits| {
        bits.iter().all(|&byte| byte == 0)
    })
}

/// This CPU's SVM instructions and MSRs, surviving faults.
#[derive(Debug)]
pub struct SvmInstructions;

fn fault(outcome: Outcome, fault: Fault) -> Result<(), Fault> {
    match outcome {
        Outcome::Done => Ok(()),
        Outcome::Faulted => Err(fault),
    }
}

impl SvmHardware for SvmInstructions {
    fn efer_svme(&mut self) -> bool {
        svm::efer() & EFER_SVME != 0
    }

    fn stgi(&mut self) -> Result<(), Fault> {
        fault(svm::crash_stgi(), Fault::InvalidOpcode)
    }

    fn clear_efer_svme(&mut self) -> Result<(), Fault> {
        fault(svm::crash_clear_efer_svme(), Fault::GeneralProtection)
    }

    fn clear_hsave_pa(&mut self) -> Result<(), Fault> {
        fault(svm::crash_clear_hsave_pa(), Fault::GeneralProtection)
    }

    fn hsave_pa(&mut self) -> u64 {
        svm::hsave_pa()
    }
}
