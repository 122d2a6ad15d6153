//! Control registers, MSRs, the TSC, CPUID, interrupts and halting.

use hv_abi::regs::CpuRegisters;

use super::gdt::{KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR};

/// CR4.VMXE: VMX enabled.
pub const CR4_VMXE: u64 = 1 << 13;

macro_rules! read_control_register {
    ($(#[$doc:meta])* $name:ident, $register:literal) => {
        $(#[$doc])*
        pub fn $name() -> u64 {
            let value: u64;
            // SAFETY: (1) reading a control register has no side effects.
            unsafe {
                core::arch::asm!(
                    concat!("mov {}, ", $register),
                    out(reg) value,
                    options(nomem, nostack, preserves_flags)
                )
            };
            value
        }
    };
}

read_control_register!(
    /// CR0.
    cr0, "cr0"
);
read_control_register!(
    /// CR2, the faulting address of the last page fault.
    cr2, "cr2"
);
read_control_register!(
    /// CR3, the top-level page table.
    cr3, "cr3"
);
read_control_register!(
    /// CR4.
    cr4, "cr4"
);

/// Loads CR3 with a new top-level page table.
///
/// # Safety
/// `pml4` must be the physical address of a valid PML4 that maps the code,
/// stack and data the CPU is using, with the same translations it has now.
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: (1) the caller guarantees the new tables keep everything in use mapped.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
}

/// Writes CR0 and CR4 (entering VMX or SVM operation adjusts them).
///
/// # Safety
/// The new values must keep paging, protection and long mode as they are.
pub(super) unsafe fn write_cr0_cr4(cr0: u64, cr4: u64) {
    // SAFETY: (1) guaranteed by the caller.
    unsafe {
        core::arch::asm!(
            "mov cr0, {cr0}",
            "mov cr4, {cr4}",
            cr0 = in(reg) cr0,
            cr4 = in(reg) cr4,
            options(nostack, preserves_flags)
        )
    };
}

/// Drops this CPU's cached translations (non-global ones; the kernel
/// uses no global pages) by reloading CR3 with its own value.
pub fn flush_tlb() {
    // SAFETY: (1) writing CR3 back unchanged keeps every translation; (2) it only empties the TLB.
    unsafe { write_cr3(cr3()) };
}

/// Invalidates the TLB entry of one page.
pub fn flush_page(address: u64) {
    // SAFETY: (1) INVLPG only drops a cached translation.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) address, options(nostack, preserves_flags)) };
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist on this CPU, or the read raises #GP.
pub(super) unsafe fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: (1) the caller guarantees the MSR exists.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and `value` must be valid for it, and the write must not
/// change anything Rust relies on (paging, segment bases in use).
pub(super) unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: (1) the caller guarantees the MSR and value are valid.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: (1) RDTSC has no side effects.
    unsafe {
        core::arch::asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// This CPU's initial APIC ID: 32-bit x2APIC ID from CPUID leaf 0xB when the
/// CPU has it (more than 255 CPUs need it), else the 8-bit ID of leaf 1.
pub fn apic_id() -> u32 {
    let cpuid = raw_cpuid::CpuId::new();
    if let Some(mut topology) = cpuid.get_extended_topology_info()
        && let Some(level) = topology.next()
    {
        return level.x2apic_id();
    }
    cpuid
        .get_feature_info()
        .map_or(0, |features| u32::from(features.initial_local_apic_id()))
}

/// Disables interrupts and halts forever. NMIs still wake the CPU; their
/// handler returns here, where it halts again. Never MWAIT: a capture
/// kernel overwriting a monitored line would wake the CPU.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: (1) `cli; hlt` only stops this CPU.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Enables interrupts.
pub fn enable_interrupts() {
    // SAFETY: (1) the IDT is loaded before anything calls this.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
}

/// Disables interrupts.
pub fn disable_interrupts() {
    // SAFETY: (1) masking interrupts is always allowed in ring 0.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
}

/// Whether RFLAGS.IF is set.
pub fn interrupts_enabled() -> bool {
    let flags: u64;
    // SAFETY: (1) reading RFLAGS has no side effects.
    unsafe {
        core::arch::asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags))
    };
    flags & (1 << 9) != 0
}

/// A one-instruction interrupt window (`sti; nop; cli`): pending
/// interrupts (IPIs) run, then interrupts are off again.
pub fn interrupt_window() {
    // SAFETY: (1) STI's shadow covers the NOP; (2) interrupts taken there return before the CLI.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// Waits for the next interrupt with interrupts enabled (`sti; hlt`: STI's
/// shadow means an interrupt arriving in between is not missed).
pub fn wait_for_interrupt() {
    // SAFETY: (1) only waits; (2) the IDT is loaded.
    unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) };
}

/// Delivers the NMI vector to this CPU's own handler (`int 2`), for an NMI
/// that a guest took: the VM exit swallowed it, its handler must still run.
pub fn run_nmi_handler() {
    // SAFETY: (1) vector 2's gate is the NMI entry stub, which saves and restores every register.
    unsafe { core::arch::asm!("int 2") };
}

/// The caller's own registers (for a panic, which has no trap frame): RIP
/// is an address in the caller, RSP and RBP its frame.
#[inline(always)]
pub fn current_regs() -> CpuRegisters {
    let (rip, rsp, rbp, rbx, r12, r13, r14, r15): (u64, u64, u64, u64, u64, u64, u64, u64);
    // SAFETY: (1) only reads registers.
    unsafe {
        core::arch::asm!(
            "lea {rip}, [rip]",
            "mov {rsp}, rsp",
            "mov {rbp}, rbp",
            "mov {rbx}, rbx",
            "mov {r12}, r12",
            "mov {r13}, r13",
            "mov {r14}, r14",
            "mov {r15}, r15",
            rip = out(reg) rip,
            rsp = out(reg) rsp,
            rbp = out(reg) rbp,
            rbx = out(reg) rbx,
            r12 = out(reg) r12,
            r13 = out(reg) r13,
            r14 = out(reg) r14,
            r15 = out(reg) r15,
            options(nomem, nostack, preserves_flags)
        );
    }
    CpuRegisters {
        rip,
        rsp,
        rbp,
        rbx,
        r12,
        r13,
        r14,
        r15,
        cs: u64::from(KERNEL_CODE_SELECTOR),
        ss: u64::from(KERNEL_DATA_SELECTOR),
        eflags: 0x2,
        orig_rax: u64::MAX,
        ..CpuRegisters::default()
    }
}

/// Continues in `next` on the stack whose top is `top`; the old stack is
/// never used again.
///
/// # Safety
/// `top` must be the 16-byte aligned top of a mapped stack that nothing
/// else uses, large enough for `next`.
pub unsafe fn switch_stack(top: u64, next: fn() -> !) -> ! {
    // SAFETY: (1) guaranteed by the caller; (2) `next` never returns.
    unsafe {
        core::arch::asm!(
            "mov rsp, {stack}",
            "xor ebp, ebp",
            "call {next}",
            "ud2",
            stack = in(reg) top,
            next = in(reg) next,
            options(noreturn)
        )
    }
}

/// IA32_EFER.
const EFER: u32 = 0xC000_0080;
/// EFER.NXE: the no-execute bit of page-table entries is honoured.
const EFER_NXE: u64 = 1 << 11;

/// Turns on EFER.NXE on this CPU, so that page tables may mark pages
/// no-execute. Returns `false` when the CPU has no NX.
pub fn enable_no_execute() -> bool {
    let has_nx = raw_cpuid::CpuId::new()
        .get_extended_processor_and_feature_identifiers()
        .is_some_and(|features| features.has_execute_disable());
    if has_nx {
        // SAFETY: (1) EFER exists in long mode; (2) NXE only makes bit 63 of page-table entries
        // meaningful, and the tables in use set it nowhere yet.
        unsafe { wrmsr(EFER, rdmsr(EFER) | EFER_NXE) };
    }
    has_nx
}

/// Continues in `next` on the stack whose top is `top`, with a copy of
/// `value` placed on that stack first (so it survives whatever happens to
/// the old one: the crash path leaves the NMI stack this way, which a
/// nested NMI would overwrite).
///
/// # Safety
/// `top` must be the 16-byte aligned top of a mapped stack that nothing
/// else uses now, large enough for `T` and `next`; the old stack is never
/// used again.
pub unsafe fn switch_stack_with<T: Copy>(top: u64, value: &T, next: fn(&T) -> !) -> ! {
    let size = core::mem::size_of::<T>() as u64;
    let at = (top - size) & !0xF;
    // SAFETY: (1) `at..at + size` lies below `top` on the caller's stack,
    // which nothing else uses; (2) 16-byte alignment covers any `T` here.
    unsafe { (at as *mut T).write(*value) };
    // SAFETY: (1) `at` is 16-byte aligned, so the call leaves RSP as the
    // ABI expects; (2) `next` never returns.
    unsafe {
        core::arch::asm!(
            "mov rsp, {stack}",
            "xor ebp, ebp",
            "call {next}",
            "ud2",
            stack = in(reg) at,
            next = in(reg) next,
            in("rdi") at,
            options(noreturn)
        )
    }
}
