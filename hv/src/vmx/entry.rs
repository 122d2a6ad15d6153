//! The VM entry/exit stub: VMLAUNCH/VMRESUME switch no general-purpose
//! registers, so this saves the host's callee-saved registers, loads the
//! guest's, enters, and on exit stores the guest's and restores the host's.

use core::mem::offset_of;

/// The guest registers the VMCS does not hold.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
#[allow(missing_docs)]
pub struct GuestRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

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

/// Runs the guest of the current VMCS until its next VM exit.
///
/// # Safety
/// A VMCS must be current on this CPU, fully set up, with host state for
/// this CPU and host RIP at [`exit_landing`]; interrupts must be disabled.
pub unsafe fn run(registers: &mut GuestRegisters, launched: bool) -> Result<(), EntryFailed> {
    // SAFETY: guaranteed by the caller; the stub preserves every register
    // the Rust ABI needs preserved and returns on both paths.
    let failed = unsafe { vmx_enter(registers, u64::from(launched)) };
    if failed == 0 {
        Ok(())
    } else {
        Err(EntryFailed)
    }
}
