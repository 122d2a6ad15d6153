//! Exception fix-ups keyed by the faulting instruction's address, as
//! Linux's exception tables do.
//!
//! The crash path runs VMX (and later SVM) instructions that fault when the
//! CPU has already left that mode: VMCLEAR and VMXOFF raise #UD outside VMX
//! operation, clearing CR4.VMXE raises #GP inside it. Each such instruction
//! here is followed by an entry in the `.hv_fixup` section: (address of
//! the instruction, address to resume at). The trap dispatcher looks the
//! faulting RIP up and resumes there, so a fault is survived only at these
//! instructions, never anywhere else, and nothing per CPU has to be armed
//! (an NMI between arming and the instruction cannot confuse it).

unsafe extern "C" {
    static __fixup_start: FixupEntry;
    static __fixup_end: FixupEntry;
}

/// One table entry, as the `asm!` blocks emit it.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct FixupEntry {
    instruction: u64,
    resume: u64,
}

fn table() -> &'static [FixupEntry] {
    let start = &raw const __fixup_start;
    let end = &raw const __fixup_end;
    let len = (end.addr() - start.addr()) / core::mem::size_of::<FixupEntry>();
    // SAFETY: (1) the linker script bounds the `.hv_fixup` input sections with these two symbols;
    // (2) every entry is two 8-byte-aligned quads.
    unsafe { core::slice::from_raw_parts(start, len) }
}

/// Where to resume after a fault at `rip`, if `rip` has a fix-up.
pub fn lookup(rip: u64) -> Option<u64> {
    table()
        .iter()
        .find(|entry| entry.instruction == rip)
        .map(|entry| entry.resume)
}

/// How a tolerant instruction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and succeeded.
    Done,
    /// It ran and reported VMfail (CF or ZF set).
    Failed,
    /// It raised #UD or #GP and was skipped.
    Faulted,
}

impl Outcome {
    fn from_flags(faulted: u32, failed: u8) -> Self {
        if faulted != 0 {
            Self::Faulted
        } else if failed != 0 {
            Self::Failed
        } else {
            Self::Done
        }
    }
}

/// VMCLEAR that survives #UD (the CPU is not in VMX operation).
pub fn vmclear(vmcs: u64) -> Outcome {
    let (faulted, failed): (u32, u8);
    // SAFETY: (1) VMCLEAR only writes the VMCS region at `vmcs`, which the
    // caller owns (a VMCS of the kernel's); (2) if it faults, the trap
    // dispatcher resumes at label 3 (its `.hv_fixup` entry), which reports
    // the fault.
    unsafe {
        core::arch::asm!(
            "xor {faulted:e}, {faulted:e}",
            "2: vmclear [{vmcs}]",
            "setna {failed}",
            "jmp 4f",
            "3: mov {faulted:e}, 1",
            "xor {failed}, {failed}",
            "4:",
            ".pushsection .hv_fixup, \"a\"",
            ".balign 8",
            ".quad 2b, 3b",
            ".popsection",
            vmcs = in(reg) &raw const vmcs,
            faulted = out(reg) faulted,
            failed = out(reg_byte) failed,
        );
    }
    Outcome::from_flags(faulted, failed)
}

/// VMXOFF that survives #UD.
pub fn vmxoff() -> Outcome {
    let (faulted, failed): (u32, u8);
    // SAFETY: (1) VMXOFF leaves VMX operation and touches no memory; (2) a
    // fault resumes at label 3, as in `vmclear`.
    unsafe {
        core::arch::asm!(
            "xor {faulted:e}, {faulted:e}",
            "2: vmxoff",
            "setna {failed}",
            "jmp 4f",
            "3: mov {faulted:e}, 1",
            "xor {failed}, {failed}",
            "4:",
            ".pushsection .hv_fixup, \"a\"",
            ".balign 8",
            ".quad 2b, 3b",
            ".popsection",
            faulted = out(reg) faulted,
            failed = out(reg_byte) failed,
        );
    }
    Outcome::from_flags(faulted, failed)
}

/// Clears CR4.VMXE, surviving the #GP it raises in VMX operation.
/// Returns `false` when it faulted (the CPU is still in VMX operation).
pub fn clear_cr4_vmxe() -> bool {
    let cr4 = super::cpu::cr4() & !super::cpu::CR4_VMXE;
    let faulted: u32;
    // SAFETY: (1) clearing VMXE changes nothing Rust relies on; (2) in VMX
    // operation it faults and resumes at label 3.
    unsafe {
        core::arch::asm!(
            "xor {faulted:e}, {faulted:e}",
            "2: mov cr4, {cr4}",
            "jmp 4f",
            "3: mov {faulted:e}, 1",
            "4:",
            ".pushsection .hv_fixup, \"a\"",
            ".balign 8",
            ".quad 2b, 3b",
            ".popsection",
            cr4 = in(reg) cr4,
            faulted = out(reg) faulted,
            options(nostack),
        );
    }
    faulted == 0
}
