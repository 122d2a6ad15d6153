//! The VMX side of platform guests (real kernels): their controls, MSR
//! switching, register state, event injection and control-register
//! emulation, behind [`PlatformBackend`].
//!
//! - MSRs: one bitmap for every guest lets the guest reach the MSRs whose
//!   values live in the VMCS or are switched ([`SWITCHED`]: loaded from the
//!   vCPU's MSR area on entry, stored back on exit) and intercepts the
//!   rest, which the glue hands to the platform or to [`Vmx::read_msr`].
//! - CR0: the guest owns TS, MP, EM, ET, WP, AM; PE, PG, NE, CD and NW
//!   exit, so long mode is entered and left here ([`Vmx::write_cr0`]), the
//!   CPU always has NE and never CD/NW (write-back guests), and the guest
//!   reads back what it wrote.
//! - CR4: the guest owns everything but VMXE and SMXE (no nesting), and
//!   PCIDE when its CPUID offers no PCIDs; setting any of them is #GP.
//! - Events: an event whose delivery an exit interrupted (IDT-vectoring
//!   information) is re-injected at the next entry by [`reinject`], which
//!   the backend's `enter` calls after every exit.

use hv_devices::cpu_state::{MultibootEntryState, SegmentState, SipiStartState};
use hv_devices::cpuid::GuestFeatures;
use hv_devices::msr::GuestStateMsr;
use hv_devices::platform::InterruptState;
use x86::vmx::vmcs::control::{EntryControls, PrimaryControls, SecondaryControls};
use x86::vmx::vmcs::{control, guest, ro};

use super::backend::Vmx;
use super::ept::Ept;
use super::vmcs::{self, read, write};
use super::{VmxError, capabilities};
use crate::mm;
use crate::virt::{Context, Fault, Injection, NeedPdptes, PlatformBackend, VcpuState};

/// The MSRs loaded on entry from, and stored on exit into, each vCPU's MSR
/// area (16 bytes an entry: index, reserved, value). hv never uses them, so
/// nothing is loaded for the host.
const SWITCHED: [u32; 6] = [
    0xC000_0102, // IA32_KERNEL_GS_BASE
    0xC000_0081, // IA32_STAR
    0xC000_0082, // IA32_LSTAR
    0xC000_0083, // IA32_CSTAR
    0xC000_0084, // IA32_FMASK
    0xC000_0103, // IA32_TSC_AUX
];
/// MSRs the guest reaches without an exit: the switched ones and those
/// the VMCS holds.
const PASS_THROUGH: [u32; 11] = [
    0xC000_0100, // IA32_FS_BASE
    0xC000_0101, // IA32_GS_BASE
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0xC000_0102,
    0xC000_0081,
    0xC000_0082,
    0xC000_0083,
    0xC000_0084,
    0xC000_0103,
];

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
/// CR0 bits whose writes exit.
const CR0_HOST_OWNED: u64 = CR0_PE | CR0_NE | CR0_NW | CR0_CD | CR0_PG;
const CR4_PAE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;
const CR4_SMXE: u64 = 1 << 14;
const CR4_PCIDE: u64 = 1 << 17;
/// CR4 bits whose writes exit.
const CR4_HOST_OWNED: u64 = CR4_VMXE | CR4_SMXE;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_RF: u64 = 1 << 16;

const BLOCKING_BY_STI: u64 = 1 << 0;
const BLOCKING_BY_MOV_SS: u64 = 1 << 1;
const BLOCKING_BY_NMI: u64 = 1 << 3;
const INTERRUPTION_VALID: u64 = 1 << 31;
const INTERRUPTION_ERROR_CODE: u64 = 1 << 11;
const TYPE_EXTERNAL: u64 = 0 << 8;
const TYPE_NMI: u64 = 2 << 8;
const TYPE_HARDWARE_EXCEPTION: u64 = 3 << 8;

/// The MSR bitmap every platform guest shares (read-only once made).
static MSR_BITMAP: spin::Once<Option<u64>> = spin::Once::new();

fn msr_bitmap() -> Option<u64> {
    *MSR_BITMAP.call_once(|| {
        let page = mm::alloc_zeroed_page()?;
        // One bit per MSR: read low, read high, write low, write high.
        mm::phys::fill(page, 4096, 0xFF);
        for msr in PASS_THROUGH {
            let (half, index) = if msr >= 0xC000_0000 {
                (1024, msr - 0xC000_0000)
            } else {
                (0, msr)
            };
            for base in [half, 2048 + half] {
                let byte = page + base + u64::from(index / 8);
                let old = mm::phys::read(byte, 1)[0];
                mm::phys::write(byte, &[old & !(1 << (index % 8))]);
            }
        }
        Some(page)
    })
}

/// The value slot of `msr` in the MSR area at `msr_area` (the vCPU's
/// auxiliary page).
fn area_entry(msr_area: u64, msr: u32) -> Option<u64> {
    (msr_area != 0)
        .then_some(())
        .and(SWITCHED.iter().position(|&m| m == msr))
        .map(|i| msr_area + i as u64 * 16 + 8)
}

fn read_u64(address: u64) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(mm::phys::read(address, 8));
    u64::from_le_bytes(bytes)
}

/// The guest's CR0 as it sees it: its own bits, and the shadow's for the
/// bits writes of which exit.
fn guest_cr0() -> u64 {
    (read(guest::CR0) & !CR0_HOST_OWNED) | (read(control::CR0_READ_SHADOW) & CR0_HOST_OWNED)
}

fn guest_cr4() -> u64 {
    let mask = read(control::CR4_GUEST_HOST_MASK);
    (read(guest::CR4) & !mask) | (read(control::CR4_READ_SHADOW) & mask)
}

fn write_segment((selector, base, limit, rights): (u32, u32, u32, u32), segment: &SegmentState) {
    write(selector, u64::from(segment.selector));
    write(base, segment.base);
    write(limit, u64::from(segment.limit));
    write(rights, u64::from(segment.vmx_access_rights()));
}

const CS: (u32, u32, u32, u32) = (
    guest::CS_SELECTOR,
    guest::CS_BASE,
    guest::CS_LIMIT,
    guest::CS_ACCESS_RIGHTS,
);
const DATA_SEGMENTS: [(u32, u32, u32, u32); 5] = [
    (
        guest::SS_SELECTOR,
        guest::SS_BASE,
        guest::SS_LIMIT,
        guest::SS_ACCESS_RIGHTS,
    ),
    (
        guest::DS_SELECTOR,
        guest::DS_BASE,
        guest::DS_LIMIT,
        guest::DS_ACCESS_RIGHTS,
    ),
    (
        guest::ES_SELECTOR,
        guest::ES_BASE,
        guest::ES_LIMIT,
        guest::ES_ACCESS_RIGHTS,
    ),
    (
        guest::FS_SELECTOR,
        guest::FS_BASE,
        guest::FS_LIMIT,
        guest::FS_ACCESS_RIGHTS,
    ),
    (
        guest::GS_SELECTOR,
        guest::GS_BASE,
        guest::GS_LIMIT,
        guest::GS_ACCESS_RIGHTS,
    ),
];

/// The state every reset leaves that the two start states share: no
/// paging, no long mode, tables empty, nothing pending.
fn load_common(cr0: u64, rip: u64, rflags: u64) {
    write(control::CR0_READ_SHADOW, cr0 & CR0_HOST_OWNED);
    write(guest::CR0, (cr0 | CR0_NE) & !(CR0_CD | CR0_NW));
    write(control::CR4_READ_SHADOW, 0);
    write(guest::CR4, CR4_VMXE);
    write(guest::CR3, 0);
    write(guest::IA32_EFER_FULL, 0);
    let entry = read(control::VMENTRY_CONTROLS) & !EntryControls::IA32E_MODE_GUEST.bits() as u64;
    write(control::VMENTRY_CONTROLS, entry);
    write(guest::RIP, rip);
    write(guest::RSP, 0);
    write(guest::RFLAGS, rflags);
    write(guest::DR7, 0x400);
    write(guest::TR_SELECTOR, 0);
    write(guest::TR_BASE, 0);
    write(guest::TR_LIMIT, 0xFFFF);
    write(guest::TR_ACCESS_RIGHTS, 0x8B);
    write(guest::LDTR_SELECTOR, 0);
    write(guest::LDTR_BASE, 0);
    write(guest::LDTR_LIMIT, 0xFFFF);
    write(guest::LDTR_ACCESS_RIGHTS, 0x82);
    write(guest::GDTR_BASE, 0);
    write(guest::GDTR_LIMIT, 0xFFFF);
    write(guest::IDTR_BASE, 0);
    write(guest::IDTR_LIMIT, 0xFFFF);
    write(guest::INTERRUPTIBILITY_STATE, 0);
    write(guest::ACTIVITY_STATE, 0);
    write(guest::PENDING_DBG_EXCEPTIONS, 0);
    write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
}

/// Re-injects the event whose delivery the last exit interrupted, if any
/// (SDM Vol. 3, 28.2.4 and 27.6.1): the backend's `enter` calls this after
/// every exit, so the event is delivered at the next entry.
pub fn reinject() {
    let info = read(ro::IDT_VECTORING_INFO);
    if info & INTERRUPTION_VALID == 0 {
        return;
    }
    if (info >> 8) & 7 == 2 {
        // An NMI whose delivery did not finish blocks nothing yet, and VM
        // entry refuses to inject one while blocking is set (which Bochs
        // leaves set when delivery is interrupted).
        let blocking = read(guest::INTERRUPTIBILITY_STATE);
        write(guest::INTERRUPTIBILITY_STATE, blocking & !BLOCKING_BY_NMI);
    }
    // Bit 12 is undefined in the IDT-vectoring information.
    write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info & !(1 << 12));
    if info & INTERRUPTION_ERROR_CODE != 0 {
        write(
            control::VMENTRY_EXCEPTION_ERR_CODE,
            read(ro::IDT_VECTORING_ERR_CODE),
        );
    }
    // Software interrupts and exceptions restart with their length.
    if matches!((info >> 8) & 7, 4..=6) {
        write(
            control::VMENTRY_INSTRUCTION_LEN,
            read(ro::VMEXIT_INSTRUCTION_LEN),
        );
    }
}

impl PlatformBackend for Vmx {
    fn new_guest_memory(memory: u64, bytes: u64) -> Result<u64, VmxError> {
        capabilities()?.platform.map_err(VmxError::MissingFeature)?;
        Ept::new(memory, bytes, mm::alloc_zeroed_page)
            .map(|ept| ept.pointer)
            .ok_or(VmxError::OutOfMemory)
    }

    fn new_platform_vcpu(nested_root: u64) -> Result<(Context, u64), VmxError> {
        let capabilities = capabilities()?;
        capabilities.platform.map_err(VmxError::MissingFeature)?;
        msr_bitmap().ok_or(VmxError::OutOfMemory)?;
        let vmcs = mm::alloc_zeroed_page().ok_or(VmxError::OutOfMemory)?;
        mm::phys::write(vmcs, &capabilities.revision.to_le_bytes());
        let msr_area = mm::alloc_zeroed_page().ok_or(VmxError::OutOfMemory)?;
        for (i, msr) in SWITCHED.iter().enumerate() {
            mm::phys::write(msr_area + i as u64 * 16, &msr.to_le_bytes());
        }
        Ok((
            Context {
                page: vmcs,
                nested_root,
            },
            msr_area,
        ))
    }

    fn init_platform_vcpu(context: &Context, msr_area: u64, features: &GuestFeatures) {
        let Ok(capabilities) = capabilities() else {
            return;
        };
        let Ok(controls) = capabilities.platform else {
            return;
        };
        let mut secondary = controls.secondary;
        if !features.rdtscp {
            secondary &= !SecondaryControls::ENABLE_RDTSCP.bits();
        }
        if !features.invpcid {
            secondary &= !SecondaryControls::ENABLE_INVPCID.bits();
        }
        write(control::PINBASED_EXEC_CONTROLS, u64::from(controls.pin));
        write(
            control::PRIMARY_PROCBASED_EXEC_CONTROLS,
            u64::from(controls.primary),
        );
        write(
            control::SECONDARY_PROCBASED_EXEC_CONTROLS,
            u64::from(secondary),
        );
        write(control::VMEXIT_CONTROLS, u64::from(controls.exit));
        write(control::VMENTRY_CONTROLS, u64::from(controls.entry));
        // #UD: SYSCALL from compatibility mode is emulated (Intel lacks it).
        write(control::EXCEPTION_BITMAP, 1 << 6);
        write(control::PAGE_FAULT_ERR_CODE_MASK, 0);
        write(control::PAGE_FAULT_ERR_CODE_MATCH, 0);
        write(control::CR3_TARGET_COUNT, 0);
        write(control::EPTP_FULL, context.nested_root);
        write(control::MSR_BITMAPS_ADDR_FULL, msr_bitmap().unwrap_or(0));
        // IA32_TSC_AUX (last) exists only with RDTSCP.
        let rdtscp = raw_cpuid::CpuId::new()
            .get_extended_processor_and_feature_identifiers()
            .is_some_and(|f| f.has_rdtscp());
        let switched = SWITCHED.len() as u64 - u64::from(!rdtscp);
        write(control::VMENTRY_MSR_LOAD_ADDR_FULL, msr_area);
        write(control::VMENTRY_MSR_LOAD_COUNT, switched);
        write(control::VMEXIT_MSR_STORE_ADDR_FULL, msr_area);
        write(control::VMEXIT_MSR_STORE_COUNT, switched);
        write(control::VMEXIT_MSR_LOAD_COUNT, 0);
        write(control::TSC_OFFSET_FULL, 0);
        write(control::CR0_GUEST_HOST_MASK, CR0_HOST_OWNED);
        let cr4_host_owned = if features.pcid {
            CR4_HOST_OWNED
        } else {
            CR4_HOST_OWNED | CR4_PCIDE
        };
        write(control::CR4_GUEST_HOST_MASK, cr4_host_owned);
        write(guest::IA32_PAT_FULL, 0x0007_0406_0007_0406);
        write(guest::IA32_DEBUGCTL_FULL, 0);
        write(guest::IA32_SYSENTER_CS, 0);
        write(guest::IA32_SYSENTER_ESP, 0);
        write(guest::IA32_SYSENTER_EIP, 0);
        write(guest::LINK_PTR_FULL, u64::MAX);
        // Until a start state is loaded: the SIPI state of vector 0.
        Self::load_sipi_start(&SipiStartState::new(0, 0));
    }

    fn load_multiboot_entry(state: &MultibootEntryState) {
        load_common(
            u64::from(state.cr0),
            u64::from(state.eip),
            u64::from(state.eflags),
        );
        write_segment(CS, &state.cs);
        for segment in DATA_SEGMENTS {
            write_segment(segment, &state.data);
        }
    }

    fn load_sipi_start(state: &SipiStartState) {
        load_common(state.cr0, state.rip, state.rflags);
        write_segment(CS, &state.cs);
        for segment in DATA_SEGMENTS {
            write_segment(segment, &state.data);
        }
    }

    fn state() -> VcpuState {
        let cs_rights = read(guest::CS_ACCESS_RIGHTS);
        VcpuState {
            rip: read(guest::RIP),
            rsp: read(guest::RSP),
            rflags: read(guest::RFLAGS),
            cr0: guest_cr0(),
            cr3: read(guest::CR3),
            cr4: guest_cr4(),
            efer: read(guest::IA32_EFER_FULL),
            cs_base: read(guest::CS_BASE),
            cs_long: cs_rights & (1 << 13) != 0,
            cs_default32: cs_rights & (1 << 14) != 0,
        }
    }

    fn set_rip(rip: u64) {
        write(guest::RIP, rip);
    }

    fn set_rsp(rsp: u64) {
        write(guest::RSP, rsp);
    }

    fn complete_instruction() {
        vmcs::skip_instruction();
        Self::clear_interrupt_shadow();
    }

    fn clear_interrupt_shadow() {
        let blocking = read(guest::INTERRUPTIBILITY_STATE);
        if blocking & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) != 0 {
            write(
                guest::INTERRUPTIBILITY_STATE,
                blocking & !(BLOCKING_BY_STI | BLOCKING_BY_MOV_SS),
            );
        }
    }

    fn interrupt_state() -> InterruptState {
        let blocking = read(guest::INTERRUPTIBILITY_STATE);
        InterruptState {
            interrupts_enabled: read(guest::RFLAGS) & RFLAGS_IF != 0,
            blocked_by_sti: blocking & BLOCKING_BY_STI != 0,
            blocked_by_mov_ss: blocking & BLOCKING_BY_MOV_SS != 0,
            blocked_by_nmi: blocking & BLOCKING_BY_NMI != 0,
            event_pending: read(control::VMENTRY_INTERRUPTION_INFO_FIELD) & INTERRUPTION_VALID != 0,
        }
    }

    fn inject(event: Injection) {
        let (info, error_code) = match event {
            Injection::Nmi => (TYPE_NMI | 2, None),
            Injection::Interrupt(vector) => (TYPE_EXTERNAL | u64::from(vector), None),
            Injection::Exception { vector, error_code } => {
                // A fault's handler sees RFLAGS.RF set, as when the CPU
                // raises it itself: VM entry pushes the guest's RF.
                if !matches!(vector, 1 | 3 | 4) {
                    write(guest::RFLAGS, read(guest::RFLAGS) | RFLAGS_RF);
                }
                // Real mode pushes no error code (and VM entry refuses one).
                let protected = guest_cr0() & CR0_PE != 0;
                (
                    TYPE_HARDWARE_EXCEPTION | u64::from(vector),
                    error_code.filter(|_| protected),
                )
            }
        };
        let mut info = info | INTERRUPTION_VALID;
        if let Some(code) = error_code {
            info |= INTERRUPTION_ERROR_CODE;
            write(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(code));
        }
        write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
    }

    fn clear_nmi_blocking() {
        let blocking = read(guest::INTERRUPTIBILITY_STATE);
        if blocking & BLOCKING_BY_NMI != 0 {
            write(guest::INTERRUPTIBILITY_STATE, blocking & !BLOCKING_BY_NMI);
        }
    }

    fn set_windows(interrupt: bool, nmi: bool) {
        let bits = |on: bool, bit: PrimaryControls| if on { bit.bits() as u64 } else { 0 };
        let windows = (PrimaryControls::INTERRUPT_WINDOW_EXITING
            | PrimaryControls::NMI_WINDOW_EXITING)
            .bits() as u64;
        let old = read(control::PRIMARY_PROCBASED_EXEC_CONTROLS);
        let new = (old & !windows)
            | bits(interrupt, PrimaryControls::INTERRUPT_WINDOW_EXITING)
            | bits(nmi, PrimaryControls::NMI_WINDOW_EXITING);
        if new != old {
            write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, new);
        }
    }

    fn set_tsc_offset(offset: u64) {
        write(control::TSC_OFFSET_FULL, offset);
    }

    fn read_msr(msr_area: u64, msr: GuestStateMsr) -> u64 {
        use GuestStateMsr as M;
        match msr {
            M::Efer => read(guest::IA32_EFER_FULL),
            M::FsBase => read(guest::FS_BASE),
            M::GsBase => read(guest::GS_BASE),
            M::SysenterCs => read(guest::IA32_SYSENTER_CS),
            M::SysenterEsp => read(guest::IA32_SYSENTER_ESP),
            M::SysenterEip => read(guest::IA32_SYSENTER_EIP),
            M::Pat => read(guest::IA32_PAT_FULL),
            M::DebugCtl => read(guest::IA32_DEBUGCTL_FULL),
            M::KernelGsBase => area_entry(msr_area, 0xC000_0102).map_or(0, read_u64),
            M::Star => area_entry(msr_area, 0xC000_0081).map_or(0, read_u64),
            M::Lstar => area_entry(msr_area, 0xC000_0082).map_or(0, read_u64),
            M::Cstar => area_entry(msr_area, 0xC000_0083).map_or(0, read_u64),
            M::Fmask => area_entry(msr_area, 0xC000_0084).map_or(0, read_u64),
            M::TscAux => area_entry(msr_area, 0xC000_0103).map_or(0, read_u64),
            M::Pkrs => 0,
        }
    }

    fn write_msr(msr_area: u64, msr: GuestStateMsr, value: u64) -> Result<(), Fault> {
        use GuestStateMsr as M;
        let canonical = |v: u64| ((v as i64) << 16 >> 16) as u64 == v;
        let area = |index: u32| {
            if let Some(at) = area_entry(msr_area, index) {
                mm::phys::write(at, &value.to_le_bytes());
            }
        };
        match msr {
            M::Efer => {
                let old = read(guest::IA32_EFER_FULL);
                if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
                    return Err(Fault::GP);
                }
                // LME may not change while paging is on; LMA is the CPU's.
                if guest_cr0() & CR0_PG != 0 && (value ^ old) & EFER_LME != 0 {
                    return Err(Fault::GP);
                }
                write(
                    guest::IA32_EFER_FULL,
                    (value & !EFER_LMA) | (old & EFER_LMA),
                );
            }
            M::FsBase | M::GsBase | M::KernelGsBase | M::Lstar | M::Cstar if !canonical(value) => {
                return Err(Fault::GP);
            }
            M::FsBase => write(guest::FS_BASE, value),
            M::GsBase => write(guest::GS_BASE, value),
            M::SysenterCs => write(guest::IA32_SYSENTER_CS, value & 0xFFFF_FFFF),
            M::SysenterEsp => write(guest::IA32_SYSENTER_ESP, value),
            M::SysenterEip => write(guest::IA32_SYSENTER_EIP, value),
            M::Pat => {
                // Each byte a valid memory type: 0, 1, 4, 5, 6, 7.
                if (0..8).any(|i| matches!((value >> (8 * i)) & 0xFF, 2 | 3 | 8..)) {
                    return Err(Fault::GP);
                }
                write(guest::IA32_PAT_FULL, value);
            }
            M::DebugCtl => {
                // LBR and BTF only; hv offers no branch tracing: accept 0.
                if value & !0x3 != 0 {
                    return Err(Fault::GP);
                }
                write(guest::IA32_DEBUGCTL_FULL, value);
            }
            M::KernelGsBase => area(0xC000_0102),
            M::Star => area(0xC000_0081),
            M::Lstar => area(0xC000_0082),
            M::Cstar => area(0xC000_0083),
            M::Fmask => area(0xC000_0084),
            M::TscAux => {
                if value >> 32 != 0 {
                    return Err(Fault::GP);
                }
                area(0xC000_0103);
            }
            M::Pkrs => return Err(Fault::GP),
        }
        Ok(())
    }

    fn write_cr0(value: u64) -> Result<Option<NeedPdptes>, Fault> {
        let old = guest_cr0();
        let cr4 = guest_cr4();
        let mut efer = read(guest::IA32_EFER_FULL);
        if value >> 32 != 0
            || (value & CR0_PG != 0 && value & CR0_PE == 0)
            || (value & CR0_NW != 0 && value & CR0_CD == 0)
        {
            return Err(Fault::GP);
        }
        let paging_on = value & CR0_PG != 0 && old & CR0_PG == 0;
        let paging_off = value & CR0_PG == 0 && old & CR0_PG != 0;
        let mut entry = read(control::VMENTRY_CONTROLS);
        let ia32e = EntryControls::IA32E_MODE_GUEST.bits() as u64;
        if paging_on && efer & EFER_LME != 0 {
            // Long mode needs PAE and 32-bit code when it starts.
            if cr4 & CR4_PAE == 0 || read(guest::CS_ACCESS_RIGHTS) & (1 << 13) != 0 {
                return Err(Fault::GP);
            }
            efer |= EFER_LMA;
            entry |= ia32e;
        }
        if paging_off && efer & EFER_LMA != 0 {
            if cr4 & CR4_PCIDE != 0 {
                return Err(Fault::GP);
            }
            efer &= !EFER_LMA;
            entry &= !ia32e;
        }
        write(guest::IA32_EFER_FULL, efer);
        write(control::VMENTRY_CONTROLS, entry);
        write(control::CR0_READ_SHADOW, value & CR0_HOST_OWNED);
        // The CPU keeps NE and runs write-back whatever the guest asked.
        write(
            guest::CR0,
            ((value | CR0_NE | CR0_ET) & !(CR0_CD | CR0_NW)) & 0xFFFF_FFFF,
        );
        let pae_paging = value & CR0_PG != 0 && cr4 & CR4_PAE != 0 && efer & EFER_LMA == 0;
        Ok((paging_on && pae_paging).then_some(NeedPdptes))
    }

    fn write_cr4(value: u64) -> Result<Option<NeedPdptes>, Fault> {
        // Only writes that set a bit hv owns exit, and hv offers none of
        // them (VMXE, SMXE, PCIDE without PCIDs).
        let mask = read(control::CR4_GUEST_HOST_MASK);
        if value & mask != 0 {
            return Err(Fault::GP);
        }
        write(guest::CR4, value | CR4_VMXE);
        write(control::CR4_READ_SHADOW, 0);
        Ok(None)
    }

    fn read_cr(cr: u8) -> u64 {
        match cr {
            0 => guest_cr0(),
            3 => read(guest::CR3),
            4 => guest_cr4(),
            _ => 0,
        }
    }

    fn write_cr3(value: u64) -> Result<Option<NeedPdptes>, Fault> {
        // CR3 accesses do not exit (EPT); kept for backends where they do.
        write(guest::CR3, value);
        Ok(None)
    }

    fn set_rflags(rflags: u64) {
        write(guest::RFLAGS, rflags);
    }

    fn set_code_and_stack(cs: &SegmentState, ss: &SegmentState) {
        write_segment(CS, cs);
        write_segment(DATA_SEGMENTS[0], ss);
    }

    fn set_pdptes(pdptes: [u64; 4]) {
        let fields = [
            guest::PDPTE0_FULL,
            guest::PDPTE1_FULL,
            guest::PDPTE2_FULL,
            guest::PDPTE3_FULL,
        ];
        for (field, value) in fields.into_iter().zip(pdptes) {
            write(field, value);
        }
    }
}
