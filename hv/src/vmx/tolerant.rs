//! VMX instructions for the crash path, which must survive a #UD: the CPU
//! may already have left VMX operation (an earlier NMI, a nested crash), in
//! which case VMCLEAR and VMXOFF fault. Each instruction runs with a
//! per-CPU fix-up address armed; the #UD/#GP handler, seeing it, resumes
//! there instead of treating the fault as fatal.

use core::sync::atomic::Ordering;

use crate::percpu;

/// How a tolerant VMX instruction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and succeeded.
    Done,
    /// It ran and reported VMfail.
    Failed,
    /// It raised #UD or #GP (not in VMX operation).
    Faulted,
}

/// Resumes a faulting instruction at the armed fix-up, if any. Called by
/// the trap handler for #UD and #GP; `true` when it redirected `rip`.
pub fn try_fixup(rip: &mut u64) -> bool {
    let shared = percpu::shared(percpu::current_cpu_index() as usize);
    let target = shared.fault_fixup.swap(0, Ordering::AcqRel);
    if target == 0 {
        return false;
    }
    shared.fault_hit.store(true, Ordering::Release);
    *rip = target;
    true
}

fn outcome(failed: bool) -> Outcome {
    let shared = percpu::shared(percpu::current_cpu_index() as usize);
    shared.fault_fixup.store(0, Ordering::Release);
    if shared.fault_hit.swap(false, Ordering::AcqRel) {
        Outcome::Faulted
    } else if failed {
        Outcome::Failed
    } else {
        Outcome::Done
    }
}

/// VMCLEAR that survives #UD.
pub fn vmclear(vmcs: u64) -> Outcome {
    let shared = percpu::shared(percpu::current_cpu_index() as usize);
    let fixup = shared.fault_fixup.as_ptr();
    shared.fault_hit.store(false, Ordering::Release);
    let failed: u8;
    // SAFETY: (1) VMCLEAR only writes the VMCS region at `vmcs`, which the
    // caller owns; (2) if it faults, the trap handler resumes at label 2
    // (armed in this CPU's fix-up slot), where `failed` is set to 0 and the
    // fault is reported through `fault_hit`.
    unsafe {
        core::arch::asm!(
            "lea {scratch}, [rip + 2f]",
            "mov [{fixup}], {scratch}",
            "vmclear [{vmcs}]",
            "setna {failed}",
            "jmp 3f",
            "2:",
            "xor {failed}, {failed}",
            "3:",
            scratch = out(reg) _,
            fixup = in(reg) fixup,
            vmcs = in(reg) &raw const vmcs,
            failed = out(reg_byte) failed,
        );
    }
    outcome(failed != 0)
}

/// VMXOFF that survives #UD.
pub fn vmxoff() -> Outcome {
    let shared = percpu::shared(percpu::current_cpu_index() as usize);
    let fixup = shared.fault_fixup.as_ptr();
    shared.fault_hit.store(false, Ordering::Release);
    let failed: u8;
    // SAFETY: VMXOFF leaves VMX operation and touches no memory; a fault
    // resumes at label 2 as in `vmclear`.
    unsafe {
        core::arch::asm!(
            "lea {scratch}, [rip + 2f]",
            "mov [{fixup}], {scratch}",
            "vmxoff",
            "setna {failed}",
            "jmp 3f",
            "2:",
            "xor {failed}, {failed}",
            "3:",
            scratch = out(reg) _,
            fixup = in(reg) fixup,
            failed = out(reg_byte) failed,
        );
    }
    outcome(failed != 0)
}

const CR4_VMXE: u64 = 1 << 13;

/// The CPU was in VMX operation, where clearing CR4.VMXE raises #GP.
#[derive(Debug, Clone, Copy)]
pub struct StillInVmx;

/// Clears CR4.VMXE, surviving the #GP it raises in VMX operation.
pub fn clear_cr4_vmxe() -> Result<(), StillInVmx> {
    let shared = percpu::shared(percpu::current_cpu_index() as usize);
    let fixup = shared.fault_fixup.as_ptr();
    shared.fault_hit.store(false, Ordering::Release);
    let cr4 = crate::arch::cpu::cr4() & !CR4_VMXE;
    // SAFETY: clearing VMXE changes nothing Rust relies on; in VMX operation
    // it faults and resumes at label 2 (armed in this CPU's fix-up slot).
    unsafe {
        core::arch::asm!(
            "lea {scratch}, [rip + 2f]",
            "mov [{fixup}], {scratch}",
            "mov cr4, {cr4}",
            "2:",
            scratch = out(reg) _,
            fixup = in(reg) fixup,
            cr4 = in(reg) cr4,
            options(nostack),
        );
    }
    match outcome(false) {
        Outcome::Faulted => Err(StillInVmx),
        _ => Ok(()),
    }
}
