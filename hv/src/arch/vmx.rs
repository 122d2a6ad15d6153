//! VMX instructions: entering VMX root operation, loading and clearing
//! VMCSes, reading and writing their fields, and the VM entry/exit stub.
//!
//! Every physical address given to these functions is a VMX region the
//! virtualization layer allocated for that purpose (a VMXON region or a
//! VMCS), never any other memory: VMCLEAR and VMPTRLD write the region.
//! The crash path's VMCLEAR and VMXOFF, which must survive a #UD, are in
//! [`super::fixup`].

use core::mem::offset_of;

use super::cpu::{CR4_VMXE, cr0, cr4, rdmsr, write_cr0_cr4, wrmsr};

const IA32_FEATURE_CONTROL: u32 = 0x3A;
const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;
const IA32_VMX_CR0_FIXED1: u32 = 0x487;
const IA32_VMX_CR4_FIXED0: u32 = 0x488;
const IA32_VMX_CR4_FIXED1: u32 = 0x489;
/// The VMX capability MSRs: IA32_VMX_BASIC (0x480) to
/// IA32_VMX_VMFUNC (0x491).
const CAPABILITY_MSRS: core::ops::RangeInclusive<u32> = 0x480..=0x491;

/// Whether CPUID reports VMX.
pub fn cpu_has_vmx() -> bool {
    raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|features| features.has_vmx())
}

/// Reads a VMX capability MSR (0x480 to 0x491); `None` without VMX or for
/// another MSR.
pub fn capability(msr: u32) -> Option<u64> {
    if !CAPABILITY_MSRS.contains(&msr) || !cpu_has_vmx() {
        return None;
    }
    // SAFETY: (1) the VMX capability MSRs exist once CPUID reports VMX. (Some in the range depend
    // on others' bits; callers read only those the basic and control MSRs announce, as the SDM
    // says.)
    Some(unsafe { rdmsr(msr) })
}

/// Why VMXON did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxonError {
    /// The CPU has no VMX.
    NotSupported,
    /// The firmware locked IA32_FEATURE_CONTROL with VMX disabled.
    DisabledByFirmware,
    /// VMXON reported VMfail.
    Failed,
}

/// Enters VMX root operation: unlocks VMX in IA32_FEATURE_CONTROL if the
/// firmware left it open, sets the CR0/CR4 bits VMX requires, VMXON.
///
/// `region` is this CPU's VMXON region: a zeroed 4 KiB page of the
/// kernel's, with the VMCS revision identifier in its first four bytes.
pub fn vmxon(region: u64) -> Result<(), VmxonError> {
    if !cpu_has_vmx() {
        return Err(VmxonError::NotSupported);
    }
    // SAFETY: (1) IA32_FEATURE_CONTROL exists with VMX; (2) writing it while unlocked only turns
    // VMX on (and locks it).
    unsafe {
        let control = rdmsr(IA32_FEATURE_CONTROL);
        if control & FEATURE_CONTROL_LOCKED != 0 {
            if control & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
                return Err(VmxonError::DisabledByFirmware);
            }
        } else {
            wrmsr(
                IA32_FEATURE_CONTROL,
                control | FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
            );
        }
    }
    // SAFETY: (1) the fixed-bit MSRs exist with VMX; (2) the adjusted
    // CR0/CR4 keep paging, protection and long mode as they are and add
    // what VMX requires (NE, VMXE).
    unsafe {
        let cr0_value = (cr0() | rdmsr(IA32_VMX_CR0_FIXED0)) & rdmsr(IA32_VMX_CR0_FIXED1);
        let cr4_value =
            ((cr4() | CR4_VMXE) | rdmsr(IA32_VMX_CR4_FIXED0)) & rdmsr(IA32_VMX_CR4_FIXED1);
        write_cr0_cr4(cr0_value, cr4_value);
    }
    // SAFETY: (1) CR4.VMXE is set and `region` is a VMXON region of ours holding the revision
    // identifier (module docs).
    unsafe { x86::bits64::vmx::vmxon(region) }.map_err(|_| VmxonError::Failed)
}

/// VMCLEAR (normal path): the VMCS at `vmcs` becomes inactive, written
/// back to memory and cleared on this CPU. `false` on VMfail.
pub fn vmclear(vmcs: u64) -> bool {
    // SAFETY: (1) `vmcs` is a VMCS region of ours (module docs); (2) VMCLEAR only writes it.
    unsafe { x86::bits64::vmx::vmclear(vmcs) }.is_ok()
}

/// VMPTRLD: the VMCS at `vmcs` becomes current on this CPU. `false` on
/// VMfail (the VM-instruction error field says why).
pub fn vmptrld(vmcs: u64) -> bool {
    // SAFETY: (1) `vmcs` is a VMCS region of ours holding the revision identifier, and the loaded-
    // VMCS protocol guarantees no other CPU has it active.
    unsafe { x86::bits64::vmx::vmptrld(vmcs) }.is_ok()
}

/// VMREAD from the current VMCS; `None` on VMfail (no current VMCS, or a
/// field the CPU does not support).
pub fn vmread(field: u32) -> Option<u64> {
    // SAFETY: (1) VMREAD only reads the current VMCS into a register.
    unsafe { x86::bits64::vmx::vmread(field) }.ok()
}

/// VMWRITE to the current VMCS; `false` on VMfail.
///
/// The fields that point at host memory (host RIP/RSP, the EPT pointer,
/// I/O and MSR bitmaps) are the virtualization layer's to fill with
/// addresses of its own structures.
pub fn vmwrite(field: u32, value: u64) -> bool {
    // SAFETY: (1) VMWRITE only writes the current VMCS.
    unsafe { x86::bits64::vmx::vmwrite(field, value) }.is_ok()
}

pub use hv_core::exits::GuestRegisters;

/// VMCS encoding of the host RSP field.
const HOST_RSP: u64 = 0x6C14;

core::arch::global_asm!(
    r#"
    .section .text.vmx_entry, "ax"
    .global vmx_enter
vmx_enter:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, {host_rsp}
    vmwrite rax, rsp
    test rsi, rsi
    mov rax, [rdi + {rax}]
    mov rbx, [rdi + {rbx}]
    mov rcx, [rdi + {rcx}]
    mov rdx, [rdi + {rdx}]
    mov rsi, [rdi + {rsi}]
    mov rbp, [rdi + {rbp}]
    mov r8, [rdi + {r8}]
    mov r9, [rdi + {r9}]
    mov r10, [rdi + {r10}]
    mov r11, [rdi + {r11}]
    mov r12, [rdi + {r12}]
    mov r13, [rdi + {r13}]
    mov r14, [rdi + {r14}]
    mov r15, [rdi + {r15}]
    mov rdi, [rdi + {rdi}]
    jnz 2f
    vmlaunch
    jmp 3f
2:
    vmresume
3:
    /* The entry failed: nothing ran; unwind and report it. */
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    mov eax, 1
    ret

    .global vmx_exit_landing
vmx_exit_landing:
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi + {rax}], rax
    mov [rdi + {rbx}], rbx
    mov [rdi + {rcx}], rcx
    mov [rdi + {rdx}], rdx
    mov [rdi + {rsi}], rsi
    mov [rdi + {rbp}], rbp
    mov [rdi + {r8}], r8
    mov [rdi + {r9}], r9
    mov [rdi + {r10}], r10
    mov [rdi + {r11}], r11
    mov [rdi + {r12}], r12
    mov [rdi + {r13}], r13
    mov [rdi + {r14}], r14
    mov [rdi + {r15}], r15
    pop rax
    mov [rdi + {rdi}], rax
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    xor eax, eax
    ret
"#,
    host_rsp = const HOST_RSP,
    rax = const offset_of!(GuestRegisters, rax),
    rbx = const offset_of!(GuestRegisters, rbx),
    rcx = const offset_of!(GuestRegisters, rcx),
    rdx = const offset_of!(GuestRegisters, rdx),
    rsi = const offset_of!(GuestRegisters, rsi),
    rdi = const offset_of!(GuestRegisters, rdi),
    rbp = const offset_of!(GuestRegisters, rbp),
    r8 = const offset_of!(GuestRegisters, r8),
    r9 = const offset_of!(GuestRegisters, r9),
    r10 = const offset_of!(GuestRegisters, r10),
    r11 = const offset_of!(GuestRegisters, r11),
    r12 = const offset_of!(GuestRegisters, r12),
    r13 = const offset_of!(GuestRegisters, r13),
    r14 = const offset_of!(GuestRegisters, r14),
    r15 = const offset_of!(GuestRegisters, r15),
);

unsafe extern "C" {
    fn vmx_enter(registers: *mut GuestRegisters, launched: u64) -> u64;
    fn vmx_exit_landing();
}

/// Where VM exits land (the VMCS host RIP).
pub fn exit_landing() -> u64 {
    vmx_exit_landing as *const () as u64
}

/// The VM entry failed (VMfail): the VM-instruction error field says why.
#[derive(Debug, Clone, Copy)]
pub struct EntryFailed;

/// Runs the guest of the current VMCS until its next VM exit
/// (VMLAUNCH, or VMRESUME once `launched`).
///
/// The kernel's invariants make this sound: the current VMCS was set up by
/// the virtualization layer, with this CPU's host state and host RIP at
/// [`exit_landing`] (written whenever a VMCS is loaded on a CPU), and
/// interrupts are disabled (the run loop runs with IF clear).
pub fn run(registers: &mut GuestRegisters, launched: bool) -> Result<(), EntryFailed> {
    // SAFETY: (1) the VMCS invariants above hold; (2) the stub preserves
    // every register the Rust ABI needs preserved and returns on both
    // paths; (3) `registers` is valid for the whole call.
    let failed = unsafe { vmx_enter(registers, u64::from(launched)) };
    if failed == 0 {
        Ok(())
    } else {
        Err(EntryFailed)
    }
}
