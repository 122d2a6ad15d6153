//! Filling in a VMCS: controls and guest state once, host state on every
//! load on a CPU (the host GS base, TR, GDT differ per CPU, and vCPUs move).

use x86::vmx::vmcs::{control, guest, host, ro};

use super::Capabilities;
use crate::arch::vmx::{exit_landing, vmread, vmwrite};

/// VMWRITE to the current VMCS. A failure means the field is not supported
/// or the VMCS is not current: a bug, reported with the field's encoding.
pub(super) fn write(field: u32, value: u64) {
    if !vmwrite(field, value) {
        log::error!("vmx: VMWRITE {field:#x} = {value:#x} failed");
    }
}

/// VMREAD from the current VMCS (0 if it fails).
pub fn read(field: u32) -> u64 {
    vmread(field).unwrap_or(0)
}

/// The VM-instruction error of the last failed VMX instruction.
pub fn instruction_error() -> u64 {
    read(ro::VM_INSTRUCTION_ERROR)
}

/// How a guest starts.
#[derive(Debug, Clone, Copy)]
pub struct GuestStart {
    /// Entry point (guest-physical; paging is off).
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// EPT pointer.
    pub ept_pointer: u64,
}

/// Writes controls and guest state: a 32-bit protected-mode guest with
/// paging off (allowed by unrestricted guest), flat segments.
pub fn setup_guest(capabilities: &Capabilities, start: &GuestStart) {
    write(control::PINBASED_EXEC_CONTROLS, u64::from(capabilities.pin));
    write(
        control::PRIMARY_PROCBASED_EXEC_CONTROLS,
        u64::from(capabilities.primary),
    );
    write(
        control::SECONDARY_PROCBASED_EXEC_CONTROLS,
        u64::from(capabilities.secondary),
    );
    write(control::VMEXIT_CONTROLS, u64::from(capabilities.exit));
    write(control::VMENTRY_CONTROLS, u64::from(capabilities.entry));
    write(control::EXCEPTION_BITMAP, 0);
    write(control::CR3_TARGET_COUNT, 0);
    write(control::EPTP_FULL, start.ept_pointer);
    // The guest owns CR0/CR4 except the bits VMX forces; it reads back what
    // it wrote for those (its view has no VMXE).
    let cr0 = capabilities.guest_cr0_fixed0 | (1 << 0) | (1 << 4) | (1 << 5);
    let cr4 = capabilities.guest_cr4_fixed0;
    write(control::CR0_GUEST_HOST_MASK, capabilities.guest_cr0_fixed0);
    write(control::CR0_READ_SHADOW, cr0);
    write(control::CR4_GUEST_HOST_MASK, capabilities.guest_cr4_fixed0);
    write(control::CR4_READ_SHADOW, 0);

    write(guest::CR0, cr0);
    write(guest::CR3, 0);
    write(guest::CR4, cr4);
    write(guest::DR7, 0x400);
    write(guest::RSP, start.rsp);
    write(guest::RIP, start.rip);
    write(guest::RFLAGS, 0x2);
    const CODE: u64 = 0xC09B;
    const DATA: u64 = 0xC093;
    let segments = [
        (
            guest::CS_SELECTOR,
            guest::CS_BASE,
            guest::CS_LIMIT,
            guest::CS_ACCESS_RIGHTS,
            0x08,
            CODE,
        ),
        (
            guest::SS_SELECTOR,
            guest::SS_BASE,
            guest::SS_LIMIT,
            guest::SS_ACCESS_RIGHTS,
            0x10,
            DATA,
        ),
        (
            guest::DS_SELECTOR,
            guest::DS_BASE,
            guest::DS_LIMIT,
            guest::DS_ACCESS_RIGHTS,
            0x10,
            DATA,
        ),
        (
            guest::ES_SELECTOR,
            guest::ES_BASE,
            guest::ES_LIMIT,
            guest::ES_ACCESS_RIGHTS,
            0x10,
            DATA,
        ),
        (
            guest::FS_SELECTOR,
            guest::FS_BASE,
            guest::FS_LIMIT,
            guest::FS_ACCESS_RIGHTS,
            0x10,
            DATA,
        ),
        (
            guest::GS_SELECTOR,
            guest::GS_BASE,
            guest::GS_LIMIT,
            guest::GS_ACCESS_RIGHTS,
            0x10,
            DATA,
        ),
    ];
    for (selector, base, limit, rights, value, access) in segments {
        write(selector, value);
        write(base, 0);
        write(limit, 0xFFFF_FFFF);
        write(rights, access);
    }
    write(guest::TR_SELECTOR, 0);
    write(guest::TR_BASE, 0);
    write(guest::TR_LIMIT, 0x67);
    write(guest::TR_ACCESS_RIGHTS, 0x8B);
    write(guest::LDTR_SELECTOR, 0);
    write(guest::LDTR_BASE, 0);
    write(guest::LDTR_LIMIT, 0);
    write(guest::LDTR_ACCESS_RIGHTS, 1 << 16);
    write(guest::GDTR_BASE, 0);
    write(guest::GDTR_LIMIT, 0);
    write(guest::IDTR_BASE, 0);
    write(guest::IDTR_LIMIT, 0);
    write(guest::IA32_DEBUGCTL_FULL, 0);
    write(guest::IA32_SYSENTER_CS, 0);
    write(guest::IA32_SYSENTER_ESP, 0);
    write(guest::IA32_SYSENTER_EIP, 0);
    write(guest::LINK_PTR_FULL, u64::MAX);
    write(guest::ACTIVITY_STATE, 0);
    write(guest::INTERRUPTIBILITY_STATE, 0);
    write(guest::PENDING_DBG_EXCEPTIONS, 0);
}

/// This CPU's host state, written whenever a VMCS is loaded here.
#[derive(Debug, Clone, Copy)]
pub struct HostState {
    /// Per-CPU area (GS base).
    pub gs_base: u64,
    /// This CPU's TSS.
    pub tr_base: u64,
    /// This CPU's GDT.
    pub gdtr_base: u64,
    /// The shared IDT.
    pub idtr_base: u64,
}

/// Writes the host state of the current CPU into the current VMCS.
pub fn write_host_state(state: &HostState) {
    use crate::arch::cpu::{cr0, cr3, cr4};
    use crate::arch::gdt::{KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR, TSS_SELECTOR};
    write(host::CR0, cr0());
    write(host::CR3, cr3());
    write(host::CR4, cr4());
    write(host::CS_SELECTOR, u64::from(KERNEL_CODE_SELECTOR));
    for selector in [host::SS_SELECTOR, host::DS_SELECTOR, host::ES_SELECTOR] {
        write(selector, u64::from(KERNEL_DATA_SELECTOR));
    }
    write(host::FS_SELECTOR, 0);
    write(host::GS_SELECTOR, 0);
    write(host::TR_SELECTOR, u64::from(TSS_SELECTOR));
    write(host::FS_BASE, 0);
    write(host::GS_BASE, state.gs_base);
    write(host::TR_BASE, state.tr_base);
    write(host::GDTR_BASE, state.gdtr_base);
    write(host::IDTR_BASE, state.idtr_base);
    write(host::IA32_SYSENTER_CS, 0);
    write(host::IA32_SYSENTER_ESP, 0);
    write(host::IA32_SYSENTER_EIP, 0);
    write(host::RIP, exit_landing());
    // Platform guests switch EFER and PAT; the host's come back on exit.
    if super::capabilities().is_ok_and(|c| c.platform.is_ok()) {
        write(host::IA32_EFER_FULL, crate::arch::guest_switch::host_efer());
        write(host::IA32_PAT_FULL, crate::arch::guest_switch::host_pat());
    }
}

/// Arms the VMX-preemption timer for the next entry.
pub fn set_preemption_timer(value: u32) {
    write(guest::VMX_PREEMPTION_TIMER_VALUE, u64::from(value));
}

/// Moves the guest past the instruction that exited.
pub fn skip_instruction() {
    let length = read(ro::VMEXIT_INSTRUCTION_LEN);
    write(guest::RIP, read(guest::RIP) + length);
}

/// Reads a guest register held in the VMCS.
pub fn guest_rip() -> u64 {
    read(guest::RIP)
}
