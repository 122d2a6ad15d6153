//! SVM (AMD-V) instructions: the feature check, EFER.SVME and the host
//! save area (VM_HSAVE_PA), CLGI/STGI, the VMRUN entry stub with its
//! VMSAVE/VMLOAD pairs, and the crash path's way out of SVM, whose
//! instructions survive a fault through `.hv_fixup` entries as VMX's do
//! ([`super::fixup`]).
//!
//! Every physical address given to these functions is an SVM structure the
//! virtualization layer allocated for that purpose (a host save area, a
//! VMCB, a VMSAVE area), never any other memory: VMRUN, VMSAVE and the
//! #VMEXIT write them.

use core::mem::offset_of;

use super::cpu::{rdmsr, wrmsr};

pub use hv_core::exits::GuestRegisters;

/// IA32_EFER.
pub const MSR_EFER: u32 = 0xC000_0080;
/// EFER.SVME: SVM enabled.
pub const EFER_SVME: u64 = 1 << 12;
/// VM_CR: SVM's lock and disable bits.
const MSR_VM_CR: u32 = 0xC001_0114;
/// VM_CR.SVMDIS: the firmware disabled SVM (EFER.SVME cannot be set).
const VM_CR_SVMDIS: u64 = 1 << 4;
/// VM_HSAVE_PA: where VMRUN saves the host's state.
pub const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;

/// Offset of the VMCB clean bits (a u32 in the control area): a set bit
/// lets the next VMRUN of the VMCB on the same CPU reuse cached fields.
pub const VMCB_CLEAN_BITS: u64 = 0xC0;

/// CPUID 0x8000_0001 ECX: SVM.
const CPUID_80000001_ECX_SVM: u32 = 1 << 2;
/// CPUID 0x8000_000A EDX: nested paging.
const SVM_NESTED_PAGING: u32 = 1 << 0;
/// CPUID 0x8000_000A EDX: the next RIP is saved on instruction intercepts.
const SVM_NRIP_SAVE: u32 = 1 << 3;
/// CPUID 0x8000_000A EDX: TLB_CONTROL may flush one ASID.
const SVM_FLUSH_BY_ASID: u32 = 1 << 6;

/// What CPUID says of SVM on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// SVM revision (CPUID 0x8000_000A EAX).
    pub revision: u32,
    /// Number of ASIDs (CPUID 0x8000_000A EBX); ASID 0 is the host's.
    pub asids: u32,
    /// Nested paging.
    pub nested_paging: bool,
    /// The VMCB's next-RIP field is filled on instruction intercepts.
    pub nrip_save: bool,
    /// TLB_CONTROL can flush a single ASID.
    pub flush_by_asid: bool,
}

fn cpuid(leaf: u32) -> [u32; 4] {
    let result = raw_cpuid::native_cpuid::cpuid_count(leaf, 0);
    [result.eax, result.ebx, result.ecx, result.edx]
}

/// SVM's features, or `None` when CPUID reports no SVM.
pub fn features() -> Option<Features> {
    let [max_extended, ..] = cpuid(0x8000_0000);
    if max_extended < 0x8000_000A || cpuid(0x8000_0001)[2] & CPUID_80000001_ECX_SVM == 0 {
        return None;
    }
    let [revision, asids, _, edx] = cpuid(0x8000_000A);
    Some(Features {
        revision: revision & 0xFF,
        asids,
        nested_paging: edx & SVM_NESTED_PAGING != 0,
        nrip_save: edx & SVM_NRIP_SAVE != 0,
        flush_by_asid: edx & SVM_FLUSH_BY_ASID != 0,
    })
}

/// Whether CPUID reports SVM.
pub fn cpu_has_svm() -> bool {
    features().is_some()
}

/// Whether the firmware disabled SVM (VM_CR.SVMDIS); `false` without SVM.
pub fn disabled_by_firmware() -> bool {
    // SAFETY: VM_CR exists whenever CPUID reports SVM.
    cpu_has_svm() && unsafe { rdmsr(MSR_VM_CR) } & VM_CR_SVMDIS != 0
}

/// IA32_EFER.
pub fn efer() -> u64 {
    // SAFETY: EFER exists on every x86_64 CPU; reading it has no effect.
    unsafe { rdmsr(MSR_EFER) }
}

/// VM_HSAVE_PA; 0 without SVM.
pub fn hsave_pa() -> u64 {
    if !cpu_has_svm() {
        return 0;
    }
    // SAFETY: VM_HSAVE_PA exists whenever CPUID reports SVM.
    unsafe { rdmsr(MSR_VM_HSAVE_PA) }
}

/// Why SVM could not be enabled on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnableError {
    /// CPUID reports no SVM.
    NotSupported,
    /// VM_CR.SVMDIS is set.
    DisabledByFirmware,
    /// EFER.SVME did not read back set.
    DidNotStick,
}

/// Enables SVM on this CPU: sets EFER.SVME and points VM_HSAVE_PA at
/// `host_save_area`, a zeroed 4 KiB page of the kernel's that belongs to
/// this CPU alone from now on (VMRUN writes the host's state there).
pub fn enable(host_save_area: u64) -> Result<(), EnableError> {
    if !cpu_has_svm() {
        return Err(EnableError::NotSupported);
    }
    if disabled_by_firmware() {
        return Err(EnableError::DisabledByFirmware);
    }
    // SAFETY: (1) EFER.SVME only allows the SVM instructions, it changes no
    // mapping or segment Rust relies on; (2) VM_HSAVE_PA exists with SVM and
    // `host_save_area` is page aligned (a #GP otherwise), owned by this CPU.
    unsafe {
        wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
        wrmsr(MSR_VM_HSAVE_PA, host_save_area);
    }
    if efer() & EFER_SVME == 0 {
        return Err(EnableError::DidNotStick);
    }
    Ok(())
}

/// TSC_AUX, which RDTSCP returns in ECX.
const MSR_TSC_AUX: u32 = 0xC000_0103;

/// Loads a guest's TSC_AUX, which VMRUN does not switch, on a CPU with
/// RDTSCP (the caller checked CPUID).
pub fn load_guest_tsc_aux(value: u32) {
    // SAFETY: (1) TSC_AUX exists on a CPU with RDTSCP (caller); (2) hv
    // never reads it, so its value changes nothing of the kernel's.
    unsafe { wrmsr(MSR_TSC_AUX, u64::from(value)) };
}

/// STGI: GIF = 1; what was held pending (an NMI that made a guest exit)
/// is delivered right here. Only with EFER.SVME set (else #UD).
pub fn stgi() {
    // SAFETY: STGI only unblocks interrupt delivery; the IDT is loaded and
    // its handlers save every register. Not `nomem`: a handler may run.
    unsafe { core::arch::asm!("stgi", options(nostack)) };
}

core::arch::global_asm!(
    r#"
    .section .text.svm_entry, "ax"
    .global svm_enter
/* svm_enter(registers: rdi, vmcb: rsi, host_vmsave_area: rdx)
   Called with interrupts off and GIF = 1; returns after the #VMEXIT with
   interrupts off and GIF = 0 still: the caller looks at the exit first,
   then STGI. */
svm_enter:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    push rsi
    push rdx
    clgi
    /* The host's FS, GS (the per-CPU area), TR, LDTR and syscall MSRs,
       which VMRUN does not switch. */
    mov rax, rdx
    vmsave rax
    mov rax, rsi
    vmload rax
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
    /* RAX: the VMCB (the guest's RAX is in the VMCB). IF = 1 for VMRUN to
       save: with V_INTR_MASKING, host interrupts then make the guest exit.
       GIF = 0 keeps them pending here. */
    mov rax, [rsp + 8]
    sti
    vmrun rax
    /* #VMEXIT: GIF = 0; RAX, RSP, RFLAGS are the host's again. */
    cli
    push rdi
    mov rdi, [rsp + 24]
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
    mov rax, [rsp + 8]
    vmsave rax
    mov rax, [rsp]
    vmload rax
    add rsp, 24
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
"#,
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
    fn svm_enter(registers: *mut GuestRegisters, vmcb: u64, host_vmsave_area: u64);
}

/// Runs the guest of `vmcb` until its next #VMEXIT. Every general-purpose
/// register but RAX and RSP comes from `registers` and goes back there
/// (the VMCB holds the guest's RAX and RSP). Returns with interrupts off
/// and GIF = 0: the caller reads the exit, then calls [`stgi`].
///
/// The kernel's invariants make this sound: SVM is enabled on this CPU
/// with its own host save area ([`enable`]); `vmcb` is a VMCB the
/// virtualization layer set up (VMRUN intercepted, an ASID, nested paging
/// over the guest's own memory), made current on this CPU by the
/// loaded-context protocol, so no other CPU runs it; `host_vmsave_area` is
/// this CPU's own page for VMSAVE; interrupts are off.
pub fn run(registers: &mut GuestRegisters, vmcb: u64, host_vmsave_area: u64) {
    // SAFETY: (1) the invariants above hold; (2) the stub preserves every
    // register the Rust ABI needs preserved, restores the host's FS/GS/TR
    // (VMLOAD of the host area) before it returns, and GIF = 0 keeps every
    // interrupt and NMI out until then; (3) `registers` is valid for the
    // whole call.
    unsafe { svm_enter(registers, vmcb, host_vmsave_area) }
}

/// How one crash-path step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran.
    Done,
    /// It raised #UD or #GP and was skipped.
    Faulted,
}

/// STGI that survives #UD (EFER.SVME already clear): the crash path's.
pub fn crash_stgi() -> Outcome {
    let faulted: u32;
    // SAFETY: (1) STGI only unblocks interrupt delivery (NMIs held pending
    // may run their handler here, which saves every register); (2) a fault
    // resumes at label 3 through its `.hv_fixup` entry.
    unsafe {
        core::arch::asm!(
            "xor {faulted:e}, {faulted:e}",
            "2: stgi",
            "jmp 4f",
            "3: mov {faulted:e}, 1",
            "4:",
            ".pushsection .hv_fixup, \"a\"",
            ".balign 8",
            ".quad 2b, 3b",
            ".popsection",
            faulted = out(reg) faulted,
        );
    }
    if faulted == 0 {
        Outcome::Done
    } else {
        Outcome::Faulted
    }
}

/// WRMSR that survives #GP, for the crash path's EFER and VM_HSAVE_PA.
fn crash_wrmsr(msr: u32, value: u64) -> Outcome {
    let faulted: u32;
    // SAFETY: (1) callers write EFER without SVME (leaving SVM changes no
    // mapping or segment) or VM_HSAVE_PA = 0; (2) a fault resumes at label
    // 3 through its `.hv_fixup` entry.
    unsafe {
        core::arch::asm!(
            "xor {faulted:e}, {faulted:e}",
            "2: wrmsr",
            "jmp 4f",
            "3: mov {faulted:e}, 1",
            "4:",
            ".pushsection .hv_fixup, \"a\"",
            ".balign 8",
            ".quad 2b, 3b",
            ".popsection",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            faulted = out(reg) faulted,
            options(nostack),
        );
    }
    if faulted == 0 {
        Outcome::Done
    } else {
        Outcome::Faulted
    }
}

/// Clears EFER.SVME (crash path), surviving #GP.
pub fn crash_clear_efer_svme() -> Outcome {
    crash_wrmsr(MSR_EFER, efer() & !EFER_SVME)
}

/// Sets VM_HSAVE_PA to 0 (crash path), surviving #GP.
pub fn crash_clear_hsave_pa() -> Outcome {
    crash_wrmsr(MSR_VM_HSAVE_PA, 0)
}
