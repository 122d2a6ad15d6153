//! Registers a VM exit leaves as the guest had them, which the
//! virtualization layer saves and restores by hand when vCPUs share a core
//! (CR2), and host MSR values the VMCS loads on every exit.

use super::cpu::{cr2, rdmsr};

const IA32_EFER: u32 = 0xC000_0080;
const IA32_PAT: u32 = 0x277;

/// CR2: the guest's last page-fault address while a guest's state is on
/// this core.
pub fn read_cr2() -> u64 {
    cr2()
}

/// Loads CR2 with a guest's value before it runs here again.
pub fn write_cr2(value: u64) {
    // SAFETY: (1) CR2 only reports page-fault addresses; (2) the kernel
    // never reads it outside its page-fault report, which a guest's value
    // cannot mislead before a new fault overwrites it.
    unsafe {
        core::arch::asm!("mov cr2, {}", in(reg) value, options(nomem, nostack, preserves_flags))
    };
}

/// This CPU's IA32_EFER.
pub fn host_efer() -> u64 {
    // SAFETY: (1) IA32_EFER exists on every x86_64 CPU.
    unsafe { rdmsr(IA32_EFER) }
}

/// This CPU's IA32_PAT.
pub fn host_pat() -> u64 {
    // SAFETY: (1) IA32_PAT exists on every x86_64 CPU.
    unsafe { rdmsr(IA32_PAT) }
}
