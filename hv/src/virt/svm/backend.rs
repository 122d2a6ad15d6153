//! The SVM backend behind [`Backend`].

use core::sync::atomic::Ordering;

use crash::loaded_vmcs::{Vmx as ListInstructions, VmxError as ListError};
use hv_core::exits::{Exit, GuestRegisters};

use super::exit;
use super::npt::Npt;
use super::platform;
use super::vmcb::{self, GuestStart};
use super::{
    ASID_OWNERS, CURRENT, HOST_VMSAVE, SvmError, TIMER_UNTIL_US, capabilities, enable_on_this_cpu,
    next_asid,
};
use crate::arch::{self, apic};
use crate::cpu::{percpu, time, watchdog};
use crate::mm;
use crate::virt::{Backend, Context, PlatformOps};

/// A deadline this much sooner than the armed slice timer re-arms it.
const SOONER_SLACK_US: u64 = 20;

/// SVM: a VMCB per vCPU, nested paging, ASIDs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Svm;

/// The loaded-context list protocol's two instructions, on SVM (normal
/// path). SVM has no VMPTRLD or VMCLEAR: "load" makes the VMCB the one
/// this CPU runs, "clear" means this CPU is done with it (out of guest
/// mode, its state in memory) and zeroes its clean bits, so the next CPU
/// to run it trusts no cached copy. Neither can fail.
#[derive(Debug, Default)]
pub struct Instructions;

fn this_cpu() -> usize {
    percpu::current_cpu_index() as usize
}

impl ListInstructions for Instructions {
    fn vmclear(&mut self, vmcb_phys: u64) -> Result<(), ListError> {
        let _ = CURRENT[this_cpu()].compare_exchange(
            vmcb_phys,
            0,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        vmcb::mark_all_dirty(vmcb_phys);
        Ok(())
    }

    fn vmptrld(&mut self, vmcb_phys: u64) -> Result<(), ListError> {
        CURRENT[this_cpu()].store(vmcb_phys, Ordering::Relaxed);
        Ok(())
    }
}

/// The VMCB this CPU runs (0: none).
pub(super) fn current() -> u64 {
    CURRENT[this_cpu()].load(Ordering::Relaxed)
}

/// What VMRUN must flush for `vmcb`'s ASID on this CPU: nothing if this
/// VMCB was the last to run with it here, else that ASID's entries (the
/// TLB may hold another guest's translations under it, or this guest's
/// from before it left).
fn tlb_control(cpu: usize, vmcb: u64, flush_by_asid: bool) -> u8 {
    let owners = ASID_OWNERS[cpu].load(Ordering::Relaxed);
    let asid = u64::from(vmcb::read_u32(vmcb, vmcb::GUEST_ASID));
    if owners == 0 || asid == 0 || asid > 511 {
        return vmcb::TLB_FLUSH_ALL;
    }
    if vmcb::read_u64(owners, asid * 8) == vmcb {
        return vmcb::TLB_FLUSH_NOTHING;
    }
    // This CPU's own page of ASID owners.
    vmcb::write_u64(owners, asid * 8, vmcb);
    if flush_by_asid {
        vmcb::TLB_FLUSH_GUEST
    } else {
        vmcb::TLB_FLUSH_ALL
    }
}

impl Backend for Svm {
    const NAME: &'static str = "svm";
    const NMI_DELIVERED_AFTER_EXIT: bool = true;
    const NESTED_PAGE_FAULT: &'static str = "nested_page_fault";
    // Real guest kernels on their virtual platforms (`svm/platform.rs`).
    const PLATFORM: Option<PlatformOps> = Some(PlatformOps::of::<Self>());
    type Error = SvmError;
    type Instructions = Instructions;

    fn check() -> Result<(), SvmError> {
        capabilities().map(|_| ())
    }

    fn enable_on_this_cpu() -> Result<u64, SvmError> {
        enable_on_this_cpu()
    }

    fn new_context(memory: u64, memory_bytes: u64) -> Result<Context, SvmError> {
        capabilities()?;
        let vmcb = mm::alloc_zeroed_page().ok_or(SvmError::OutOfMemory)?;
        let npt =
            Npt::new(memory, memory_bytes, mm::alloc_zeroed_page).ok_or(SvmError::OutOfMemory)?;
        Ok(Context {
            page: vmcb,
            nested_root: npt.root,
        })
    }

    fn init_guest(context: &Context, rip: u64, rsp: u64) {
        if let Ok(capabilities) = capabilities() {
            vmcb::setup_guest(
                context.page,
                &GuestStart {
                    rip,
                    rsp,
                    nested_cr3: context.nested_root,
                    asid: next_asid(&capabilities),
                    iopm: capabilities.iopm,
                    msrpm: capabilities.msrpm,
                },
            );
        }
    }

    fn refresh_host_state() {
        // SVM keeps no host state in the VMCB (VMRUN saves it in this
        // CPU's host save area); a VMCB from another CPU only needs its
        // clean bits dropped.
        let vmcb = current();
        if vmcb != 0 {
            vmcb::mark_all_dirty(vmcb);
        }
    }

    fn enter(registers: &mut GuestRegisters, _launched: bool, slice_us: u64) -> Exit {
        let cpu = this_cpu();
        let vmcb = current();
        let Ok(capabilities) = capabilities() else {
            return Exit::EntryFailed { error: 0 };
        };
        if vmcb == 0 {
            return Exit::EntryFailed { error: 0 };
        }
        vmcb::write_u8(
            vmcb,
            vmcb::TLB_CONTROL,
            tlb_control(cpu, vmcb, capabilities.features.flush_by_asid),
        );
        vmcb::mark_all_dirty(vmcb);
        vmcb::write_u64(vmcb, vmcb::RAX, registers.rax);
        // The slice's end: armed for `slice_us` unless an earlier entry's
        // still runs (no APIC access on most entries: under an emulator
        // each one is slow, and GIF = 0 holds NMIs meanwhile). The APIC
        // timer is armed only where the lockup detector does not already
        // tick on it (module docs).
        let timer_until = &TIMER_UNTIL_US[cpu];
        let now = time::now_us();
        let until = timer_until.load(Ordering::Relaxed);
        // A deadline sooner than the armed one (a platform guest's timer)
        // re-arms it, when the backend owns the timer.
        let sooner = watchdog::threshold_us() == 0
            && now.saturating_add(slice_us).saturating_add(SOONER_SLACK_US) < until;
        if now >= until || sooner {
            if watchdog::threshold_us() == 0 {
                let ticks = capabilities.timer_ticks_per_ms.saturating_mul(slice_us) / 1000;
                apic::timer_start_one_shot_on(
                    super::SLICE_TIMER_VECTOR,
                    ticks.clamp(1, u64::from(u32::MAX)) as u32,
                );
            }
            timer_until.store(time::now_us().saturating_add(slice_us), Ordering::Relaxed);
        }
        platform::before_entry(vmcb, cpu, &capabilities);
        arch::svm::run(registers, vmcb, HOST_VMSAVE[cpu].load(Ordering::Relaxed));
        // GIF = 0: nothing interrupts until STGI below.
        let slice_over = time::now_us() >= timer_until.load(Ordering::Relaxed);
        registers.rax = vmcb::read_u64(vmcb, vmcb::RAX);
        let exit = platform::after_exit(vmcb, exit::decode(vmcb, registers, slice_over));
        if exit == Exit::Nmi {
            // The NMI is pending; STGI delivers it to the host's handler,
            // which must know it came as an exit.
            crate::crash::nmi::as_guest_exit(cpu, arch::svm::stgi);
        } else {
            arch::svm::stgi();
        }
        exit
    }

    fn skip_instruction() {
        let vmcb = current();
        let nrip_save = capabilities().is_ok_and(|c| c.features.nrip_save);
        vmcb::write_u64(vmcb, vmcb::RIP, exit::next_rip(vmcb, nrip_save));
    }

    fn guest_rip() -> u64 {
        vmcb::read_u64(current(), vmcb::RIP)
    }
}
