//! The crash path's hardware, for the crash crate's state machine: VMCLEAR
//! and VMXOFF that survive #UD, CR4, the local APIC, the TSC; on SVM the
//! VMCB clear and the way out of SVM (`super::svm`).

use crash::loaded_vmcs::{Vmx, VmxError};
use crash::shootdown::{Clock, CrashHardware, Fault};

use crate::arch::fixup::{self, Outcome};
use crate::arch::{apic, cpu, svm};
use crate::cpu::{percpu, time};

/// This CPU's hardware, as the crash path drives it.
#[derive(Debug)]
pub struct Hardware;

impl Vmx for Hardware {
    fn vmclear(&mut self, vmcs_phys: u64) -> Result<(), VmxError> {
        if super::svm::backend_is_svm() {
            // A VMCB: the SVM clear (`super::svm`).
            if !super::svm::clear_vmcb(vmcs_phys) {
                return Err(VmxError::FailInvalid);
            }
            super::records::note_crash_vmclear(vmcs_phys, percpu::current_cpu_index() as usize);
            return Ok(());
        }
        match fixup::vmclear(vmcs_phys) {
            Outcome::Done => {
                super::records::note_crash_vmclear(vmcs_phys, percpu::current_cpu_index() as usize);
                Ok(())
            }
            Outcome::Failed => Err(VmxError::FailInvalid),
            Outcome::Faulted => Err(VmxError::NotInVmxOperation),
        }
    }

    fn vmptrld(&mut self, _vmcs_phys: u64) -> Result<(), VmxError> {
        // The crash path never loads a VMCS.
        Err(VmxError::FailInvalid)
    }
}

impl CrashHardware for Hardware {
    fn cr4_vmxe(&mut self) -> bool {
        cpu::cr4() & cpu::CR4_VMXE != 0
    }

    fn vmxoff(&mut self) -> Result<(), Fault> {
        match fixup::vmxoff() {
            Outcome::Done => Ok(()),
            Outcome::Failed => Err(Fault::VmFail),
            Outcome::Faulted => Err(Fault::InvalidOpcode),
        }
    }

    fn clear_cr4_vmxe(&mut self) -> Result<(), Fault> {
        if fixup::clear_cr4_vmxe() {
            Ok(())
        } else {
            Err(Fault::GeneralProtection)
        }
    }

    fn disable_local_apic(&mut self) {
        apic::disable();
    }

    fn svm_enabled(&mut self) -> bool {
        svm::cpu_has_svm() && svm::efer() & svm::EFER_SVME != 0
    }

    fn leave_svm(&mut self, cpu: usize) {
        if svm::cpu_has_svm() {
            super::svm::LEDGERS.leave(cpu, &mut super::svm::SvmInstructions);
        }
    }
}

/// The rendezvous clock: the TSC.
#[derive(Debug)]
pub struct TscClock;

impl Clock for TscClock {
    fn now_us(&mut self) -> u64 {
        time::now_us()
    }
}
