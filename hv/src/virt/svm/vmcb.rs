//! The VMCB (AMD APM volume 2, appendix B): the fields this backend uses,
//! read and written in the VMCB page, and the guest's initial state.
//!
//! A VMCB is one zeroed page of the kernel's, allocated for one vCPU; only
//! the CPU running that vCPU touches it (the loaded-context protocol), and
//! the crash path, which zeroes its clean bits.

use crate::arch::svm::{EFER_SVME, VMCB_CLEAN_BITS};
use crate::mm::phys;

// Control area.
/// Intercepts of CR reads (low 16 bits) and writes (high 16).
pub const INTERCEPT_CR: u64 = 0x00;
/// Intercepts of exceptions, one bit per vector.
pub const INTERCEPT_EXCEPTIONS: u64 = 0x08;
/// Intercept vector 3 (INTR, NMI, CPUID, HLT, IOIO, MSR, SHUTDOWN...).
pub const INTERCEPT_MISC1: u64 = 0x0C;
/// Intercept vector 4 (VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI, CLGI...).
pub const INTERCEPT_MISC2: u64 = 0x10;
/// The I/O permission map's physical address.
pub const IOPM_BASE_PA: u64 = 0x40;
/// The MSR permission map's physical address.
pub const MSRPM_BASE_PA: u64 = 0x48;
/// Guest ASID (u32).
pub const GUEST_ASID: u64 = 0x58;
/// TLB control (u8): what VMRUN flushes.
pub const TLB_CONTROL: u64 = 0x5C;
/// Virtual interrupt control.
pub const V_INTR: u64 = 0x60;
/// The exit code.
pub const EXIT_CODE: u64 = 0x70;
/// Exit information 1 and 2.
pub const EXIT_INFO1: u64 = 0x78;
/// Exit information 2.
pub const EXIT_INFO2: u64 = 0x80;
/// Nested paging enable (bit 0).
pub const NP_ENABLE: u64 = 0x90;
/// Event injection.
pub const EVENT_INJECTION: u64 = 0xA8;
/// The nested page tables' root.
pub const N_CR3: u64 = 0xB0;
/// The next RIP, on instruction intercepts (with NRIP save).
pub const NEXT_RIP: u64 = 0xC8;

// State-save area.
const SAVE: u64 = 0x400;
/// The guest's ES (selector, attributes, limit, base).
pub const ES: u64 = SAVE;
/// The guest's CS (selector, attributes, limit, base).
pub const CS: u64 = SAVE + 0x10;
/// The guest's SS (selector, attributes, limit, base).
pub const SS: u64 = SAVE + 0x20;
/// The guest's DS (selector, attributes, limit, base).
pub const DS: u64 = SAVE + 0x30;
/// The guest's FS (selector, attributes, limit, base).
pub const FS: u64 = SAVE + 0x40;
/// The guest's GS (selector, attributes, limit, base).
pub const GS: u64 = SAVE + 0x50;
/// The guest's GDTR (limit, base).
pub const GDTR: u64 = SAVE + 0x60;
/// The guest's LDTR (selector, attributes, limit, base).
pub const LDTR: u64 = SAVE + 0x70;
/// The guest's IDTR (limit, base).
pub const IDTR: u64 = SAVE + 0x80;
/// The guest's TR (selector, attributes, limit, base).
pub const TR: u64 = SAVE + 0x90;
/// The guest's CPL.
pub const CPL: u64 = SAVE + 0xCB;
/// The guest's EFER.
pub const EFER: u64 = SAVE + 0xD0;
/// The guest's CR4.
pub const CR4: u64 = SAVE + 0x148;
/// The guest's CR3.
pub const CR3: u64 = SAVE + 0x150;
/// The guest's CR0.
pub const CR0: u64 = SAVE + 0x158;
/// The guest's DR7.
pub const DR7: u64 = SAVE + 0x160;
/// The guest's DR6.
pub const DR6: u64 = SAVE + 0x168;
/// The guest's RFLAGS.
pub const RFLAGS: u64 = SAVE + 0x170;
/// The guest's RIP.
pub const RIP: u64 = SAVE + 0x178;
/// The guest's RSP.
pub const RSP: u64 = SAVE + 0x1D8;
/// The guest's RAX (VMRUN loads it, #VMEXIT saves it).
pub const RAX: u64 = SAVE + 0x1F8;
/// The guest's PAT.
pub const G_PAT: u64 = SAVE + 0x268;

// Intercept bits.
/// Intercept bit: INTR.
pub const MISC1_INTR: u32 = 1 << 0;
/// Intercept bit: NMI.
pub const MISC1_NMI: u32 = 1 << 1;
/// Intercept bit: CPUID.
pub const MISC1_CPUID: u32 = 1 << 18;
/// Intercept bit: HLT.
pub const MISC1_HLT: u32 = 1 << 24;
/// Intercept bit: IOIO PROT.
pub const MISC1_IOIO_PROT: u32 = 1 << 27;
/// Intercept bit: MSR PROT.
pub const MISC1_MSR_PROT: u32 = 1 << 28;
/// Intercept bit: SHUTDOWN.
pub const MISC1_SHUTDOWN: u32 = 1 << 31;
/// Intercept bit: VMRUN.
pub const MISC2_VMRUN: u32 = 1 << 0;
/// Intercept bit: VMMCALL.
pub const MISC2_VMMCALL: u32 = 1 << 1;
/// Intercept bit: VMLOAD.
pub const MISC2_VMLOAD: u32 = 1 << 2;
/// Intercept bit: VMSAVE.
pub const MISC2_VMSAVE: u32 = 1 << 3;
/// Intercept bit: STGI.
pub const MISC2_STGI: u32 = 1 << 4;
/// Intercept bit: CLGI.
pub const MISC2_CLGI: u32 = 1 << 5;
/// Intercept bit: SKINIT.
pub const MISC2_SKINIT: u32 = 1 << 6;
/// V_INTR_MASKING: the guest's IF masks only virtual interrupts; host
/// interrupts follow the host's IF (set for VMRUN), so they make the
/// guest exit.
pub const V_INTR_MASKING: u64 = 1 << 24;

// Fields and bits the platform glue uses (`super::platform`).
/// TSC offset (guest TSC = host TSC + offset).
pub const TSC_OFFSET: u64 = 0x50;
/// Interrupt shadow (bit 0: the guest is in an STI or MOV SS shadow).
pub const INTERRUPT_SHADOW: u64 = 0x68;
/// The event whose delivery the exit interrupted (EVENTINJ's format).
pub const EXIT_INT_INFO: u64 = 0x88;
/// Offset of the base within a segment field (ES to TR).
pub const SEGMENT_BASE: u64 = 8;
/// STAR, LSTAR, CSTAR, SFMASK, KernelGsBase (VMLOAD/VMSAVE switch them).
pub const STAR: u64 = SAVE + 0x200;
/// LSTAR.
pub const LSTAR: u64 = SAVE + 0x208;
/// CSTAR.
pub const CSTAR: u64 = SAVE + 0x210;
/// SFMASK.
pub const SFMASK: u64 = SAVE + 0x218;
/// KernelGsBase.
pub const KERNEL_GS_BASE: u64 = SAVE + 0x220;
/// SYSENTER_CS.
pub const SYSENTER_CS: u64 = SAVE + 0x228;
/// SYSENTER_ESP.
pub const SYSENTER_ESP: u64 = SAVE + 0x230;
/// SYSENTER_EIP.
pub const SYSENTER_EIP: u64 = SAVE + 0x238;
/// The guest's CR2 (VMRUN loads it, #VMEXIT saves it).
pub const CR2: u64 = SAVE + 0x240;
/// DBGCTL.
pub const DBGCTL: u64 = SAVE + 0x270;
/// The control area's last 32 bytes, which the APM reserves for the
/// host's use (volume 2, appendix B, "Reserved for Host usage"): the
/// platform glue keeps its own per-vCPU state there (`super::platform`).
pub const HOST_USAGE: u64 = 0x3E0;

/// Intercept vector 3: VINTR (the guest can take the virtual interrupt).
pub const MISC1_VINTR: u32 = 1 << 4;
/// Intercept vector 3: IRET.
pub const MISC1_IRET: u32 = 1 << 20;
/// Intercept vector 3: INVD.
pub const MISC1_INVD: u32 = 1 << 22;
/// Intercept vector 4: MONITOR.
pub const MISC2_MONITOR: u32 = 1 << 10;
/// Intercept vector 4: MWAIT.
pub const MISC2_MWAIT: u32 = 1 << 11;
/// Intercept vector 4: conditional MWAIT.
pub const MISC2_MWAIT_CONDITIONAL: u32 = 1 << 12;
/// Intercept vector 4: XSETBV.
pub const MISC2_XSETBV: u32 = 1 << 13;
/// V_INTR: V_IRQ, a virtual interrupt is pending.
pub const V_IRQ: u64 = 1 << 8;
/// V_INTR: V_INTR_PRIO (bits 19:16).
pub const V_INTR_PRIO_SHIFT: u64 = 16;
/// V_INTR: V_IGN_TPR, the virtual interrupt ignores V_TPR.
pub const V_IGN_TPR: u64 = 1 << 20;

/// TLB_CONTROL: flush nothing.
pub const TLB_FLUSH_NOTHING: u8 = 0;
/// TLB_CONTROL: flush every ASID's entries.
pub const TLB_FLUSH_ALL: u8 = 1;
/// TLB_CONTROL: flush this guest's ASID.
pub const TLB_FLUSH_GUEST: u8 = 3;

/// Reads a u64 field.
pub fn read_u64(vmcb: u64, offset: u64) -> u64 {
    phys::with_bytes_mut(vmcb + offset, 8, |bytes| {
        u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]))
    })
}

/// Reads a u32 field.
pub fn read_u32(vmcb: u64, offset: u64) -> u32 {
    phys::with_bytes_mut(vmcb + offset, 4, |bytes| {
        u32::from_le_bytes(bytes.try_into().unwrap_or([0; 4]))
    })
}

/// Reads a u16 field.
pub fn read_u16(vmcb: u64, offset: u64) -> u16 {
    phys::with_bytes_mut(vmcb + offset, 2, |bytes| {
        u16::from_le_bytes(bytes.try_into().unwrap_or([0; 2]))
    })
}

/// Writes a u64 field.
pub fn write_u64(vmcb: u64, offset: u64, value: u64) {
    phys::write(vmcb + offset, &value.to_le_bytes());
}

/// Writes a u32 field.
pub fn write_u32(vmcb: u64, offset: u64, value: u32) {
    phys::write(vmcb + offset, &value.to_le_bytes());
}

/// Writes a u8 field.
pub fn write_u8(vmcb: u64, offset: u64, value: u8) {
    phys::write(vmcb + offset, &[value]);
}

/// Zeroes the clean bits: the next VMRUN reloads every field from memory.
pub fn mark_all_dirty(vmcb: u64) {
    write_u32(vmcb, VMCB_CLEAN_BITS, 0);
}

/// A segment register in the VMCB's format.
pub fn write_segment(
    vmcb: u64,
    offset: u64,
    selector: u16,
    attributes: u16,
    limit: u32,
    base: u64,
) {
    phys::write(vmcb + offset, &selector.to_le_bytes());
    phys::write(vmcb + offset + 2, &attributes.to_le_bytes());
    phys::write(vmcb + offset + 4, &limit.to_le_bytes());
    phys::write(vmcb + offset + 8, &base.to_le_bytes());
}

/// How a guest starts.
#[derive(Debug, Clone, Copy)]
pub struct GuestStart {
    /// Entry point (guest-physical; paging is off).
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// The nested page tables' root.
    pub nested_cr3: u64,
    /// The guest's ASID (never 0, the host's).
    pub asid: u32,
    /// The I/O permission map (every port intercepted).
    pub iopm: u64,
    /// The MSR permission map (every MSR intercepted).
    pub msrpm: u64,
}

/// Writes the intercepts and the guest state: a 32-bit protected-mode
/// guest with paging off, flat segments, under nested paging. The
/// intercepts are the exits the VMX backend takes too (interrupts, NMIs,
/// CPUID, HLT, every port, every MSR, shutdown) plus every SVM
/// instruction (VMRUN must be intercepted; the guest gets no nested SVM)
/// with VMMCALL as the hypercall.
pub fn setup_guest(vmcb: u64, start: &GuestStart) {
    write_u32(vmcb, INTERCEPT_CR, 0);
    write_u32(vmcb, INTERCEPT_EXCEPTIONS, 0);
    write_u32(
        vmcb,
        INTERCEPT_MISC1,
        MISC1_INTR
            | MISC1_NMI
            | MISC1_CPUID
            | MISC1_HLT
            | MISC1_IOIO_PROT
            | MISC1_MSR_PROT
            | MISC1_SHUTDOWN,
    );
    write_u32(
        vmcb,
        INTERCEPT_MISC2,
        MISC2_VMRUN
            | MISC2_VMMCALL
            | MISC2_VMLOAD
            | MISC2_VMSAVE
            | MISC2_STGI
            | MISC2_CLGI
            | MISC2_SKINIT,
    );
    write_u64(vmcb, IOPM_BASE_PA, start.iopm);
    write_u64(vmcb, MSRPM_BASE_PA, start.msrpm);
    write_u32(vmcb, GUEST_ASID, start.asid);
    write_u8(vmcb, TLB_CONTROL, TLB_FLUSH_GUEST);
    write_u64(vmcb, V_INTR, V_INTR_MASKING);
    write_u64(vmcb, NP_ENABLE, 1);
    write_u64(vmcb, N_CR3, start.nested_cr3);
    write_u64(vmcb, EVENT_INJECTION, 0);

    // Attributes in the VMCB's packed form: access byte, then G, D/B, L,
    // AVL in bits 8 to 11.
    const CODE: u16 = 0x0C9B;
    const DATA: u16 = 0x0C93;
    const TSS_BUSY_32: u16 = 0x008B;
    const LDT: u16 = 0x0082;
    write_segment(vmcb, CS, 0x08, CODE, 0xFFFF_FFFF, 0);
    for segment in [ES, SS, DS, FS, GS] {
        write_segment(vmcb, segment, 0x10, DATA, 0xFFFF_FFFF, 0);
    }
    write_segment(vmcb, TR, 0, TSS_BUSY_32, 0x67, 0);
    write_segment(vmcb, LDTR, 0, LDT, 0, 0);
    write_segment(vmcb, GDTR, 0, 0, 0, 0);
    write_segment(vmcb, IDTR, 0, 0, 0, 0);
    write_u8(vmcb, CPL, 0);
    // VMRUN requires EFER.SVME in the guest's EFER too.
    write_u64(vmcb, EFER, EFER_SVME);
    // PE, ET, NE; paging off.
    write_u64(vmcb, CR0, (1 << 0) | (1 << 4) | (1 << 5));
    write_u64(vmcb, CR3, 0);
    write_u64(vmcb, CR4, 0);
    write_u64(vmcb, DR6, 0xFFFF_0FF0);
    write_u64(vmcb, DR7, 0x400);
    write_u64(vmcb, RFLAGS, 0x2);
    write_u64(vmcb, RIP, start.rip);
    write_u64(vmcb, RSP, start.rsp);
    write_u64(vmcb, RAX, 0);
    // The PAT's power-on value.
    write_u64(vmcb, G_PAT, 0x0007_0406_0007_0406);
    mark_all_dirty(vmcb);
}
