//! The SVM side of platform guests (real kernels): their intercepts,
//! register state, event injection and windows, behind
//! [`PlatformBackend`], over the VMCB (AMD APM volume 2, chapter 15).
//!
//! - **Paging**: nested paging, so the guest owns CR0 and CR3, which are
//!   not intercepted: the CPU switches into and out of long mode itself
//!   (EFER.LMA follows CR0.PG with EFER.LME) and loads PAE PDPTEs from the
//!   guest's own CR3 (15.25); [`PlatformBackend::write_cr0`] and
//!   [`PlatformBackend::write_cr3`] only run for an exit SVM does not take
//!   here, and [`PlatformBackend::set_pdptes`] has nothing to load. CR4
//!   writes exit and are checked against the bits the CPU and the guest's
//!   features have ([`PlatformBackend::write_cr4`]): QEMU 7.2 TCG takes
//!   reserved CR4 bits in guest mode, which its next VMRUN then refuses;
//!   a write that changes translations flushes the guest's TLB at the next
//!   VMRUN.
//! - **CR8**: reads and writes exit, so the platform's local APIC holds the
//!   one TPR (the guest's V_TPR is not used: windows ignore it).
//! - **MSRs**: every one exits; those the VMCB holds (EFER, FS/GS bases,
//!   the SYSCALL and SYSENTER MSRs, KernelGsBase, G_PAT, DBGCTL) are read
//!   and written there, the VMLOAD/VMSAVE pair of the entry stub switches
//!   them. EFER keeps SVME (VMRUN needs it in the guest's EFER too) and the
//!   guest never sees it. TSC_AUX, which SVM does not switch, is kept in
//!   the VMCB's host-usage area and loaded before VMRUN.
//! - **Events**: EVENTINJ; an event whose delivery an exit interrupted
//!   (EXITINTINFO) is injected again at the next entry ([`after_exit`]).
//!   The interrupt window is a virtual interrupt (V_IRQ, ignoring V_TPR)
//!   with the VINTR intercept; at a HLT it keeps the guest's interrupt
//!   shadow for one more instruction ([`after_exit`], for QEMU TCG, which
//!   takes the window inside the shadow of an STI). SVM has no NMI window
//!   and does not say whether the guest blocks NMIs: the backend notes the
//!   blocking when it injects an NMI and intercepts IRET; at that exit the
//!   IRET has not run yet, so the backend steps over it (RFLAGS.TF and the
//!   #DB intercept, as KVM does without vNMI), and the step's #DB ends the
//!   blocking: a waiting NMI is delivered right after the IRET.
//! - **Instructions**: with NRIP save the VMCB has the next RIP; without
//!   it (QEMU TCG), and without decode assists, the instruction's bytes
//!   are fetched through the guest's paging and the nested page tables and
//!   decoded (`hv_core::svm_exit`).
//!
//! Per-vCPU state of the glue's own lives in the VMCB's last 32 bytes of
//! the control area, which the APM reserves for the host's use
//! ([`vmcb::HOST_USAGE`]): TSC_AUX, flags, the CR4 bits allowed.

use core::sync::atomic::{AtomicU64, Ordering};

use hv_core::exits::Exit;
use hv_core::svm_exit;
use hv_devices::cpu_state::{MultibootEntryState, SegmentState, SipiStartState};
use hv_devices::cpuid::GuestFeatures;
use hv_devices::guest_paging::{self, PagingState};
use hv_devices::memory::{GuestMemory, MemoryError};
use hv_devices::msr::GuestStateMsr;
use hv_devices::platform::InterruptState;
use smp_boot::madt::MAX_CPUS;

use super::backend::{Svm, current};
use super::npt::Npt;
use super::vmcb::{self, read_u64, write_u64};
use super::{SvmError, capabilities, next_asid};
use crate::arch::svm::EFER_SVME;
use crate::mm;
use crate::virt::{Context, Fault, Injection, NeedPdptes, PlatformBackend, VcpuState};

/// The guest's TSC_AUX.
const TSC_AUX_SLOT: u64 = vmcb::HOST_USAGE;
/// The glue's flags ([`FLAG_PLATFORM`] and the NMI state).
const FLAGS_SLOT: u64 = vmcb::HOST_USAGE + 8;
/// The VMCB is a platform vCPU's.
const FLAG_PLATFORM: u64 = 1 << 0;
/// The guest blocks NMIs (an injected NMI's handler has not returned).
const FLAG_NMI_BLOCKED: u64 = 1 << 1;
/// The guest runs the IRET of its NMI handler single-stepped: the #DB
/// after it ends the NMI blocking.
const FLAG_STEPPING_IRET: u64 = 1 << 2;
/// An emulated CR4 write changed how the guest translates: flush its
/// TLB at the next VMRUN.
const FLAG_FLUSH_TLB: u64 = 1 << 3;
/// The CR4 bits the guest may set ([`allowed_cr4`]).
const ALLOWED_CR4_SLOT: u64 = vmcb::HOST_USAGE + 16;
/// #DB.
const DEBUG_VECTOR: u32 = 1;
const RFLAGS_TF: u64 = 1 << 8;
/// DR6.BS: the #DB was a single step.
const DR6_BS: u64 = 1 << 14;

const CR0_PE: u64 = 1 << 0;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_VMXE: u64 = 1 << 13;
const CR4_SMXE: u64 = 1 << 14;
const CR4_LA57: u64 = 1 << 12;
const CR4_PCIDE: u64 = 1 << 17;
/// CR4 bits whose change changes translations (PSE, PAE, PGE, PCIDE,
/// SMEP, SMAP, PKE).
const CR4_TRANSLATION: u64 = (1 << 4) | (1 << 5) | (1 << 7) | (1 << 17) | (7 << 20);
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_RF: u64 = 1 << 16;

/// EVENTINJ and EXITINTINFO: valid.
const EVENT_VALID: u64 = 1 << 31;
/// EVENTINJ: an error code is pushed (bits 63:32).
const EVENT_ERROR_CODE: u64 = 1 << 11;
const EVENT_TYPE_INTR: u64 = 0 << 8;
const EVENT_TYPE_NMI: u64 = 2 << 8;
const EVENT_TYPE_EXCEPTION: u64 = 3 << 8;

/// Per CPU: the TSC_AUX value last loaded (`u64::MAX`: unknown).
static TSC_AUX_LOADED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(u64::MAX) }; MAX_CPUS];

fn flags(vmcb: u64) -> u64 {
    read_u64(vmcb, FLAGS_SLOT)
}

fn set_flags(vmcb: u64, flags: u64) {
    write_u64(vmcb, FLAGS_SLOT, flags);
}

fn set_misc1(vmcb: u64, bits: u32, on: bool) {
    let old = vmcb::read_u32(vmcb, vmcb::INTERCEPT_MISC1);
    let new = if on { old | bits } else { old & !bits };
    if new != old {
        vmcb::write_u32(vmcb, vmcb::INTERCEPT_MISC1, new);
    }
}

/// Guest memory as the nested page tables of a VMCB map it (this
/// backend's [`Npt`]: one PML4 and PDPT entry, 2 MiB leaves), read-only:
/// for fetching the instruction that exited.
struct NestedMemory {
    root: u64,
}

impl NestedMemory {
    const ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;
    const LARGE_ADDRESS: u64 = 0x000F_FFFF_FFE0_0000;
    const SPAN: u64 = 1 << 30;

    /// The host address of `gpa`, if the tables map it.
    fn host(&self, gpa: u64) -> Option<u64> {
        if gpa >= Self::SPAN || self.root == 0 {
            return None;
        }
        let pml4e = read_u64(self.root, 0);
        let pdpte = read_u64(pml4e & Self::ADDRESS, 0);
        if pml4e & 1 == 0 || pdpte & 1 == 0 {
            return None;
        }
        let pde = read_u64(pdpte & Self::ADDRESS, (gpa >> 21) * 8);
        (pde & 1 != 0).then(|| (pde & Self::LARGE_ADDRESS) + (gpa & 0x1F_FFFF))
    }
}

impl GuestMemory for NestedMemory {
    fn size(&self) -> u64 {
        Self::SPAN
    }

    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        Err(MemoryError {
            gpa,
            len: bytes.len() as u64,
        })
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let error = MemoryError {
            gpa,
            len: buf.len() as u64,
        };
        let mut done = 0;
        while done < buf.len() {
            let at = gpa.checked_add(done as u64).ok_or(error)?;
            let host = self.host(at).ok_or(error)?;
            // Up to the end of this 2 MiB page.
            let room = (0x20_0000 - (at & 0x1F_FFFF)) as usize;
            let take = room.min(buf.len() - done);
            mm::phys::read_guest(host, &mut buf[done..done + take]);
            done += take;
        }
        Ok(())
    }
}

fn paging(vmcb: u64) -> PagingState {
    PagingState {
        cr0: read_u64(vmcb, vmcb::CR0),
        cr3: read_u64(vmcb, vmcb::CR3),
        cr4: read_u64(vmcb, vmcb::CR4),
        efer: read_u64(vmcb, vmcb::EFER),
    }
}

/// Fetches the bytes at the guest's CS:RIP on `vmcb`, through its paging
/// and nested page tables; how many were read, `None` if none could be.
pub fn fetch_instruction(vmcb: u64, bytes: &mut [u8; 15]) -> Option<usize> {
    let memory = NestedMemory {
        root: read_u64(vmcb, vmcb::N_CR3),
    };
    let cs_base = read_u64(vmcb, vmcb::CS + vmcb::SEGMENT_BASE);
    let linear = cs_base.wrapping_add(read_u64(vmcb, vmcb::RIP));
    guest_paging::fetch_instruction(&memory, paging(vmcb), linear, bytes)
        .ok()
        .filter(|&got| got > 0)
}

/// Before VMRUN of `vmcb` on `cpu`, if it is a platform vCPU's: the TLB
/// flush an emulated CR4 write asked for, and the guest's TSC_AUX where
/// the CPU has RDTSCP.
pub fn before_entry(vmcb: u64, cpu: usize, capabilities: &super::Capabilities) {
    let flags = flags(vmcb);
    if flags & FLAG_PLATFORM == 0 {
        return;
    }
    if flags & FLAG_FLUSH_TLB != 0 {
        set_flags(vmcb, flags & !FLAG_FLUSH_TLB);
        if vmcb::read_u32(vmcb, vmcb::TLB_CONTROL) & 0xFF == u32::from(vmcb::TLB_FLUSH_NOTHING) {
            let flush = if capabilities.features.flush_by_asid {
                vmcb::TLB_FLUSH_GUEST
            } else {
                vmcb::TLB_FLUSH_ALL
            };
            vmcb::write_u8(vmcb, vmcb::TLB_CONTROL, flush);
        }
    }
    if !capabilities.rdtscp {
        return;
    }
    let value = read_u64(vmcb, TSC_AUX_SLOT);
    if TSC_AUX_LOADED[cpu].swap(value, Ordering::Relaxed) != value {
        crate::arch::svm::load_guest_tsc_aux(value as u32);
    }
}

/// The CR4 bits a guest may set: those this CPU has (CPUID), but VMXE and
/// SMXE (no nesting), CET, PKS and LAM (not offered), and PCIDE only with
/// PCIDs offered.
fn allowed_cr4(features: &GuestFeatures) -> u64 {
    let cpuid = raw_cpuid::CpuId::new();
    let basic = cpuid.get_feature_info();
    let extended = cpuid.get_extended_feature_info();
    let has = |present: bool, bit: u32| if present { 1u64 << bit } else { 0 };
    // VME, PVI, TSD, DE, PSE, PAE, MCE, PGE, PCE, OSFXSR, OSXMMEXCPT.
    let mut allowed = 0x7FF;
    if let Some(e) = &extended {
        allowed |= has(e.has_umip(), 11)
            | has(e.has_la57(), 12)
            | has(e.has_fsgsbase(), 16)
            | has(e.has_smep(), 20)
            | has(e.has_smap(), 21)
            | has(e.has_pku(), 22);
    }
    if let Some(b) = &basic {
        allowed |= has(b.has_xsave(), 18) | has(b.has_pcid() && features.pcid, 17);
    }
    allowed
}

/// After the `#VMEXIT` of a platform vCPU's `vmcb`, whose decoding gave
/// `exit`: the injected event is spent (delivered, or reported in
/// EXITINTINFO and injected again), and the NMI blocking follows the
/// guest's IRET (module docs). Returns the exit, which is the NMI window
/// when it is the single step past that IRET.
pub fn after_exit(vmcb: u64, exit: Exit) -> Exit {
    let mut flags = flags(vmcb);
    if flags & FLAG_PLATFORM == 0 {
        return exit;
    }
    write_u64(vmcb, vmcb::EVENT_INJECTION, 0);
    let interrupted = read_u64(vmcb, vmcb::EXIT_INT_INFO);
    // External interrupts, NMIs and exceptions; a software interrupt
    // (type 4) restarts with its instruction.
    if interrupted & EVENT_VALID != 0 && matches!((interrupted >> 8) & 7, 0 | 2 | 3) {
        write_u64(vmcb, vmcb::EVENT_INJECTION, interrupted);
    }
    let code = read_u64(vmcb, vmcb::EXIT_CODE);
    let mut exit = exit;
    if code == svm_exit::code::EXCEPTION_0 + u64::from(DEBUG_VECTOR)
        && flags & FLAG_STEPPING_IRET != 0
    {
        // The IRET ran: NMIs are unblocked. The step's trap is hv's, not
        // the guest's.
        flags &= !(FLAG_NMI_BLOCKED | FLAG_STEPPING_IRET);
        set_exception_intercept(vmcb, DEBUG_VECTOR, false);
        let dr6 = read_u64(vmcb, vmcb::DR6);
        write_u64(vmcb, vmcb::DR6, dr6 & !DR6_BS);
        exit = Exit::NmiWindow;
    }
    if code == svm_exit::code::IRET && flags & FLAG_NMI_BLOCKED != 0 {
        // The IRET has not run yet: step over it. The trap follows the TF
        // of before the IRET, whatever RFLAGS it pops.
        flags |= FLAG_STEPPING_IRET;
        let rflags = read_u64(vmcb, vmcb::RFLAGS);
        write_u64(vmcb, vmcb::RFLAGS, rflags | RFLAGS_TF);
        set_exception_intercept(vmcb, DEBUG_VECTOR, true);
    }
    set_misc1(
        vmcb,
        vmcb::MISC1_IRET,
        flags & FLAG_NMI_BLOCKED != 0 && flags & FLAG_STEPPING_IRET == 0,
    );
    // A virtual-interrupt window at a HLT: QEMU TCG's SVM takes it inside
    // the shadow of an STI just before, where the interrupt would wake the
    // HLT instead, and the HLT would then sleep for good (`sti; hlt`).
    // Keep the shadow over the HLT: its exit comes first and the interrupt
    // is delivered after it (on a CPU that honours the shadow the HLT
    // merely wakes at once).
    if code == svm_exit::code::VINTR {
        let mut bytes = [0u8; 15];
        if fetch_instruction(vmcb, &mut bytes).is_some() && bytes[0] == 0xF4 {
            write_u64(vmcb, vmcb::INTERRUPT_SHADOW, 1);
        }
    }
    set_flags(vmcb, flags);
    exit
}

fn set_exception_intercept(vmcb: u64, vector: u32, on: bool) {
    let old = vmcb::read_u32(vmcb, vmcb::INTERCEPT_EXCEPTIONS);
    let new = if on {
        old | (1 << vector)
    } else {
        old & !(1 << vector)
    };
    vmcb::write_u32(vmcb, vmcb::INTERCEPT_EXCEPTIONS, new);
}

/// A segment's VMCB attributes from its VMX access rights: the access
/// byte, then AVL, L, D/B, G in bits 8 to 11.
fn attributes(segment: &SegmentState) -> u16 {
    let rights = segment.vmx_access_rights();
    ((rights & 0xFF) | ((rights >> 4) & 0xF00)) as u16
}

fn write_segment(vmcb: u64, offset: u64, segment: &SegmentState) {
    vmcb::write_segment(
        vmcb,
        offset,
        segment.selector,
        attributes(segment),
        segment.limit,
        segment.base,
    );
}

/// The state every reset leaves that the two start states share: no
/// paging, no long mode, tables empty, nothing pending, no NMI blocking.
fn load_common(vmcb: u64, cr0: u64, rip: u64, rflags: u64) {
    // VMRUN refuses NW without CD.
    let cr0 = if cr0 & CR0_NW != 0 { cr0 | CR0_CD } else { cr0 };
    write_u64(vmcb, vmcb::CR0, cr0 & 0xFFFF_FFFF);
    write_u64(vmcb, vmcb::CR4, 0);
    write_u64(vmcb, vmcb::CR3, 0);
    write_u64(vmcb, vmcb::CR2, 0);
    write_u64(vmcb, vmcb::EFER, EFER_SVME);
    write_u64(vmcb, vmcb::RIP, rip);
    write_u64(vmcb, vmcb::RSP, 0);
    write_u64(vmcb, vmcb::RFLAGS, rflags);
    write_u64(vmcb, vmcb::DR7, 0x400);
    write_u64(vmcb, vmcb::DR6, 0xFFFF_0FF0);
    vmcb::write_segment(vmcb, vmcb::TR, 0, 0x8B, 0xFFFF, 0);
    vmcb::write_segment(vmcb, vmcb::LDTR, 0, 0x82, 0xFFFF, 0);
    vmcb::write_segment(vmcb, vmcb::GDTR, 0, 0, 0xFFFF, 0);
    vmcb::write_segment(vmcb, vmcb::IDTR, 0, 0, 0xFFFF, 0);
    write_u64(vmcb, vmcb::INTERRUPT_SHADOW, 0);
    write_u64(vmcb, vmcb::EVENT_INJECTION, 0);
    write_u64(vmcb, vmcb::V_INTR, vmcb::V_INTR_MASKING);
    set_misc1(vmcb, vmcb::MISC1_VINTR | vmcb::MISC1_IRET, false);
    set_exception_intercept(vmcb, DEBUG_VECTOR, false);
    set_flags(vmcb, FLAG_PLATFORM);
}

fn load_segments(vmcb: u64, cs: &SegmentState, data: &SegmentState) {
    write_segment(vmcb, vmcb::CS, cs);
    for offset in [vmcb::ES, vmcb::SS, vmcb::DS, vmcb::FS, vmcb::GS] {
        write_segment(vmcb, offset, data);
    }
    vmcb::write_u8(vmcb, vmcb::CPL, data.dpl);
}

fn guest_efer(vmcb: u64) -> u64 {
    read_u64(vmcb, vmcb::EFER) & !EFER_SVME
}

impl PlatformBackend for Svm {
    fn new_guest_memory(memory: u64, bytes: u64) -> Result<u64, SvmError> {
        capabilities()?;
        Npt::new(memory, bytes, mm::alloc_zeroed_page)
            .map(|npt| npt.root)
            .ok_or(SvmError::OutOfMemory)
    }

    fn new_platform_vcpu(nested_root: u64) -> Result<(Context, u64), SvmError> {
        capabilities()?;
        let vmcb = mm::alloc_zeroed_page().ok_or(SvmError::OutOfMemory)?;
        Ok((
            Context {
                page: vmcb,
                nested_root,
            },
            0,
        ))
    }

    fn init_platform_vcpu(context: &Context, _aux: u64, features: &GuestFeatures) {
        let Ok(capabilities) = capabilities() else {
            return;
        };
        let vmcb = context.page;
        // CR8 reads and writes (bits 8 and 16 + 8), CR4 writes (16 + 4:
        // QEMU TCG takes reserved bits there, which VMRUN then refuses);
        // CR0 and CR3 are the guest's under nested paging.
        vmcb::write_u32(vmcb, vmcb::INTERCEPT_CR, (1 << 8) | (1 << 20) | (1 << 24));
        write_u64(vmcb, ALLOWED_CR4_SLOT, allowed_cr4(features));
        vmcb::write_u32(vmcb, vmcb::INTERCEPT_EXCEPTIONS, 0);
        vmcb::write_u32(
            vmcb,
            vmcb::INTERCEPT_MISC1,
            vmcb::MISC1_INTR
                | vmcb::MISC1_NMI
                | vmcb::MISC1_CPUID
                | vmcb::MISC1_INVD
                | vmcb::MISC1_HLT
                | vmcb::MISC1_IOIO_PROT
                | vmcb::MISC1_MSR_PROT
                | vmcb::MISC1_SHUTDOWN,
        );
        // No nested SVM, MONITOR/MWAIT or (unless offered) RDTSCP: #UD.
        let rdtscp = if features.rdtscp { 0 } else { 1 << 7 };
        vmcb::write_u32(
            vmcb,
            vmcb::INTERCEPT_MISC2,
            vmcb::MISC2_VMRUN
                | vmcb::MISC2_VMMCALL
                | vmcb::MISC2_VMLOAD
                | vmcb::MISC2_VMSAVE
                | vmcb::MISC2_STGI
                | vmcb::MISC2_CLGI
                | vmcb::MISC2_SKINIT
                | vmcb::MISC2_MONITOR
                | vmcb::MISC2_MWAIT
                | vmcb::MISC2_MWAIT_CONDITIONAL
                | vmcb::MISC2_XSETBV
                | rdtscp,
        );
        write_u64(vmcb, vmcb::IOPM_BASE_PA, capabilities.iopm);
        write_u64(vmcb, vmcb::MSRPM_BASE_PA, capabilities.msrpm);
        vmcb::write_u32(vmcb, vmcb::GUEST_ASID, next_asid(&capabilities));
        vmcb::write_u8(vmcb, vmcb::TLB_CONTROL, vmcb::TLB_FLUSH_GUEST);
        write_u64(vmcb, vmcb::NP_ENABLE, 1);
        write_u64(vmcb, vmcb::N_CR3, context.nested_root);
        write_u64(vmcb, vmcb::TSC_OFFSET, 0);
        write_u64(vmcb, vmcb::G_PAT, 0x0007_0406_0007_0406);
        write_u64(vmcb, vmcb::DBGCTL, 0);
        write_u64(vmcb, TSC_AUX_SLOT, 0);
        // Until a start state is loaded: the SIPI state of vector 0.
        Self::load_sipi_start(&SipiStartState::new(0, 0));
        vmcb::mark_all_dirty(vmcb);
    }

    fn load_multiboot_entry(state: &MultibootEntryState) {
        let vmcb = current();
        load_common(
            vmcb,
            u64::from(state.cr0),
            u64::from(state.eip),
            u64::from(state.eflags),
        );
        load_segments(vmcb, &state.cs, &state.data);
    }

    fn load_sipi_start(state: &SipiStartState) {
        let vmcb = current();
        load_common(vmcb, state.cr0, state.rip, state.rflags);
        load_segments(vmcb, &state.cs, &state.data);
    }

    fn state() -> VcpuState {
        let vmcb = current();
        let cs = vmcb::read_u16(vmcb, vmcb::CS + 2);
        VcpuState {
            rip: read_u64(vmcb, vmcb::RIP),
            rsp: read_u64(vmcb, vmcb::RSP),
            rflags: read_u64(vmcb, vmcb::RFLAGS),
            cr0: read_u64(vmcb, vmcb::CR0),
            cr3: read_u64(vmcb, vmcb::CR3),
            cr4: read_u64(vmcb, vmcb::CR4),
            efer: guest_efer(vmcb),
            cs_base: read_u64(vmcb, vmcb::CS + vmcb::SEGMENT_BASE),
            cs_long: cs & (1 << 9) != 0,
            cs_default32: cs & (1 << 10) != 0,
        }
    }

    fn set_rip(rip: u64) {
        write_u64(current(), vmcb::RIP, rip);
    }

    fn set_rsp(rsp: u64) {
        write_u64(current(), vmcb::RSP, rsp);
    }

    fn complete_instruction() {
        let vmcb = current();
        let nrip_save = capabilities().is_ok_and(|c| c.features.nrip_save);
        write_u64(vmcb, vmcb::RIP, super::exit::next_rip(vmcb, nrip_save));
        Self::clear_interrupt_shadow();
    }

    fn clear_interrupt_shadow() {
        let vmcb = current();
        let shadow = read_u64(vmcb, vmcb::INTERRUPT_SHADOW);
        if shadow & 1 != 0 {
            write_u64(vmcb, vmcb::INTERRUPT_SHADOW, shadow & !1);
        }
    }

    fn interrupt_state() -> InterruptState {
        let vmcb = current();
        InterruptState {
            interrupts_enabled: read_u64(vmcb, vmcb::RFLAGS) & RFLAGS_IF != 0,
            // SVM has one shadow bit for STI and MOV SS alike.
            blocked_by_sti: read_u64(vmcb, vmcb::INTERRUPT_SHADOW) & 1 != 0,
            blocked_by_mov_ss: false,
            blocked_by_nmi: flags(vmcb) & FLAG_NMI_BLOCKED != 0,
            event_pending: read_u64(vmcb, vmcb::EVENT_INJECTION) & EVENT_VALID != 0,
        }
    }

    fn inject(event: Injection) {
        let vmcb = current();
        let (info, error_code) = match event {
            Injection::Nmi => {
                let flags = flags(vmcb) | FLAG_NMI_BLOCKED;
                set_flags(vmcb, flags);
                set_misc1(vmcb, vmcb::MISC1_IRET, flags & FLAG_STEPPING_IRET == 0);
                (EVENT_TYPE_NMI | 2, None)
            }
            Injection::Interrupt(vector) => (EVENT_TYPE_INTR | u64::from(vector), None),
            Injection::Exception { vector, error_code } => {
                // A fault's handler sees RFLAGS.RF set, as when the CPU
                // raises it itself.
                if !matches!(vector, 1 | 3 | 4) {
                    let rflags = read_u64(vmcb, vmcb::RFLAGS);
                    write_u64(vmcb, vmcb::RFLAGS, rflags | RFLAGS_RF);
                }
                // Real mode pushes no error code.
                let protected = read_u64(vmcb, vmcb::CR0) & CR0_PE != 0;
                (
                    EVENT_TYPE_EXCEPTION | u64::from(vector),
                    error_code.filter(|_| protected),
                )
            }
        };
        let mut info = info | EVENT_VALID;
        if let Some(code) = error_code {
            info |= EVENT_ERROR_CODE | (u64::from(code) << 32);
        }
        write_u64(vmcb, vmcb::EVENT_INJECTION, info);
    }

    fn clear_nmi_blocking() {
        let vmcb = current();
        let flags = flags(vmcb);
        if flags & FLAG_NMI_BLOCKED != 0 {
            // A step already set up stays: its #DB is hv's to take.
            set_flags(vmcb, flags & !FLAG_NMI_BLOCKED);
            set_misc1(vmcb, vmcb::MISC1_IRET, false);
        }
    }

    fn set_windows(interrupt: bool, _nmi: bool) {
        // The NMI window needs nothing more: the IRET intercept, then the
        // step past the IRET, make the exit that ends NMI blocking.
        let vmcb = current();
        let request = vmcb::V_IRQ | vmcb::V_IGN_TPR | (0xF << vmcb::V_INTR_PRIO_SHIFT);
        let old = read_u64(vmcb, vmcb::V_INTR);
        let new = if interrupt {
            old | request
        } else {
            old & !request
        };
        if new != old {
            write_u64(vmcb, vmcb::V_INTR, new);
        }
        set_misc1(vmcb, vmcb::MISC1_VINTR, interrupt);
    }

    fn set_tsc_offset(offset: u64) {
        write_u64(current(), vmcb::TSC_OFFSET, offset);
    }

    fn read_msr(_aux: u64, msr: GuestStateMsr) -> u64 {
        use GuestStateMsr as M;
        let vmcb = current();
        let field = match msr {
            M::Efer => return guest_efer(vmcb),
            M::FsBase => vmcb::FS + vmcb::SEGMENT_BASE,
            M::GsBase => vmcb::GS + vmcb::SEGMENT_BASE,
            M::SysenterCs => vmcb::SYSENTER_CS,
            M::SysenterEsp => vmcb::SYSENTER_ESP,
            M::SysenterEip => vmcb::SYSENTER_EIP,
            M::Pat => vmcb::G_PAT,
            M::DebugCtl => vmcb::DBGCTL,
            M::KernelGsBase => vmcb::KERNEL_GS_BASE,
            M::Star => vmcb::STAR,
            M::Lstar => vmcb::LSTAR,
            M::Cstar => vmcb::CSTAR,
            M::Fmask => vmcb::SFMASK,
            M::TscAux => TSC_AUX_SLOT,
            M::Pkrs => return 0,
        };
        read_u64(vmcb, field)
    }

    fn write_msr(_aux: u64, msr: GuestStateMsr, value: u64) -> Result<(), Fault> {
        use GuestStateMsr as M;
        let vmcb = current();
        let canonical = |v: u64| ((v as i64) << 16 >> 16) as u64 == v;
        let field = match msr {
            M::Efer => {
                let old = guest_efer(vmcb);
                if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
                    return Err(Fault::GP);
                }
                // LME may not change while paging is on; LMA is the CPU's.
                let paging = read_u64(vmcb, vmcb::CR0) & CR0_PG != 0;
                if paging && (value ^ old) & EFER_LME != 0 {
                    return Err(Fault::GP);
                }
                let efer = (value & !EFER_LMA) | (old & EFER_LMA) | EFER_SVME;
                write_u64(vmcb, vmcb::EFER, efer);
                return Ok(());
            }
            M::FsBase | M::GsBase | M::KernelGsBase | M::Lstar | M::Cstar if !canonical(value) => {
                return Err(Fault::GP);
            }
            M::FsBase => vmcb::FS + vmcb::SEGMENT_BASE,
            M::GsBase => vmcb::GS + vmcb::SEGMENT_BASE,
            M::SysenterCs => {
                write_u64(vmcb, vmcb::SYSENTER_CS, value & 0xFFFF_FFFF);
                return Ok(());
            }
            M::SysenterEsp => vmcb::SYSENTER_ESP,
            M::SysenterEip => vmcb::SYSENTER_EIP,
            M::Pat => {
                // Each byte a valid memory type: 0, 1, 4, 5, 6, 7.
                if (0..8).any(|i| matches!((value >> (8 * i)) & 0xFF, 2 | 3 | 8..)) {
                    return Err(Fault::GP);
                }
                vmcb::G_PAT
            }
            M::DebugCtl => {
                // LBR and BTF only; hv offers no branch tracing.
                if value & !0x3 != 0 {
                    return Err(Fault::GP);
                }
                vmcb::DBGCTL
            }
            M::KernelGsBase => vmcb::KERNEL_GS_BASE,
            M::Star => vmcb::STAR,
            M::Lstar => vmcb::LSTAR,
            M::Cstar => vmcb::CSTAR,
            M::Fmask => vmcb::SFMASK,
            M::TscAux => {
                if value >> 32 != 0 {
                    return Err(Fault::GP);
                }
                TSC_AUX_SLOT
            }
            M::Pkrs => return Err(Fault::GP),
        };
        write_u64(vmcb, field, value);
        Ok(())
    }

    fn write_cr0(value: u64) -> Result<Option<NeedPdptes>, Fault> {
        // Not intercepted under nested paging (module docs); kept exact
        // for a caller that emulates a CR0 write.
        let vmcb = current();
        let old = read_u64(vmcb, vmcb::CR0);
        let cr4 = read_u64(vmcb, vmcb::CR4);
        let mut efer = read_u64(vmcb, vmcb::EFER);
        if value >> 32 != 0
            || (value & CR0_PG != 0 && value & CR0_PE == 0)
            || (value & CR0_NW != 0 && value & CR0_CD == 0)
        {
            return Err(Fault::GP);
        }
        let paging_on = value & CR0_PG != 0 && old & CR0_PG == 0;
        let paging_off = value & CR0_PG == 0 && old & CR0_PG != 0;
        if paging_on && efer & EFER_LME != 0 {
            let cs_long = vmcb::read_u16(vmcb, vmcb::CS + 2) & (1 << 9) != 0;
            if cr4 & CR4_PAE == 0 || cs_long {
                return Err(Fault::GP);
            }
            efer |= EFER_LMA;
        }
        if paging_off && efer & EFER_LMA != 0 {
            efer &= !EFER_LMA;
        }
        write_u64(vmcb, vmcb::EFER, efer);
        write_u64(vmcb, vmcb::CR0, value);
        // The CPU loads PAE PDPTEs from the guest's CR3 itself.
        Ok(None)
    }

    fn write_cr4(value: u64) -> Result<Option<NeedPdptes>, Fault> {
        let vmcb = current();
        let old = read_u64(vmcb, vmcb::CR4);
        let allowed = read_u64(vmcb, ALLOWED_CR4_SLOT);
        if value & !allowed != 0 || value & (CR4_VMXE | CR4_SMXE) != 0 {
            return Err(Fault::GP);
        }
        let efer = read_u64(vmcb, vmcb::EFER);
        let long_mode = efer & EFER_LMA != 0;
        // Long mode keeps PAE and its paging depth (LA57); PCIDE needs long
        // mode and CR3[11:0] clear.
        if long_mode && (value & CR4_PAE == 0 || (value ^ old) & CR4_LA57 != 0) {
            return Err(Fault::GP);
        }
        if value & CR4_PCIDE != 0
            && old & CR4_PCIDE == 0
            && (!long_mode || read_u64(vmcb, vmcb::CR3) & 0xFFF != 0)
        {
            return Err(Fault::GP);
        }
        write_u64(vmcb, vmcb::CR4, value);
        // PGE, PAE, PSE, PCIDE, SMEP, SMAP, PKE change translations.
        if (value ^ old) & CR4_TRANSLATION != 0 {
            set_flags(vmcb, flags(vmcb) | FLAG_FLUSH_TLB);
        }
        Ok(None)
    }

    fn read_cr(cr: u8) -> u64 {
        let vmcb = current();
        match cr {
            0 => read_u64(vmcb, vmcb::CR0),
            3 => read_u64(vmcb, vmcb::CR3),
            4 => read_u64(vmcb, vmcb::CR4),
            _ => 0,
        }
    }

    fn write_cr3(value: u64) -> Result<Option<NeedPdptes>, Fault> {
        write_u64(current(), vmcb::CR3, value);
        Ok(None)
    }

    fn set_pdptes(_pdptes: [u64; 4]) {
        // Nested paging: the CPU reads the PDPTEs through the guest's CR3.
    }

    fn set_rflags(rflags: u64) {
        write_u64(current(), vmcb::RFLAGS, rflags);
    }

    fn set_code_and_stack(cs: &SegmentState, ss: &SegmentState) {
        let vmcb = current();
        write_segment(vmcb, vmcb::CS, cs);
        write_segment(vmcb, vmcb::SS, ss);
        vmcb::write_u8(vmcb, vmcb::CPL, ss.dpl);
    }
}
