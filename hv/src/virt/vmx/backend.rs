//! The VMX backend behind [`Backend`].

use crash::loaded_vmcs::{Vmx as ListInstructions, VmxError as ListError};
use hv_core::exits::{Exit, GuestRegisters};

use super::ept::Ept;
use super::vmcs::{self, GuestStart, HostState};
use super::{VmxError, capabilities, enable_on_this_cpu};
use crate::arch;
use crate::cpu::percpu::{self, LocalHalf};
use crate::cpu::time;
use crate::mm;
use crate::virt::{Backend, Context, PlatformOps};

/// VMX: a VMCS per vCPU, EPT.
#[derive(Debug, Default, Clone, Copy)]
pub struct Vmx;

/// VMCLEAR and VMPTRLD for the loaded-VMCS list protocol (normal path).
#[derive(Debug, Default)]
pub struct Instructions;

impl ListInstructions for Instructions {
    fn vmclear(&mut self, vmcs_phys: u64) -> Result<(), ListError> {
        if arch::vmx::vmclear(vmcs_phys) {
            Ok(())
        } else {
            Err(ListError::FailInvalid)
        }
    }

    fn vmptrld(&mut self, vmcs_phys: u64) -> Result<(), ListError> {
        if arch::vmx::vmptrld(vmcs_phys) {
            Ok(())
        } else {
            Err(ListError::FailValid {
                instruction_error: vmcs::instruction_error() as u32,
            })
        }
    }
}

impl Backend for Vmx {
    const NAME: &'static str = "vmx";
    // Real guest kernels on their virtual platforms (`vmx/platform.rs`).
    const PLATFORM: Option<PlatformOps> = Some(PlatformOps::of::<Self>());
    type Error = VmxError;
    type Instructions = Instructions;

    fn check() -> Result<(), VmxError> {
        capabilities().map(|_| ())
    }

    fn enable_on_this_cpu() -> Result<u64, VmxError> {
        enable_on_this_cpu()
    }

    fn new_context(memory: u64, memory_bytes: u64) -> Result<Context, VmxError> {
        let capabilities = capabilities()?;
        let vmcs = mm::alloc_zeroed_page().ok_or(VmxError::OutOfMemory)?;
        mm::phys::write(vmcs, &capabilities.revision.to_le_bytes());
        let ept =
            Ept::new(memory, memory_bytes, mm::alloc_zeroed_page).ok_or(VmxError::OutOfMemory)?;
        Ok(Context {
            page: vmcs,
            nested_root: ept.pointer,
        })
    }

    fn init_guest(context: &Context, rip: u64, rsp: u64) {
        if let Ok(capabilities) = capabilities() {
            vmcs::setup_guest(
                &capabilities,
                &GuestStart {
                    rip,
                    rsp,
                    ept_pointer: context.nested_root,
                },
            );
        }
    }

    fn refresh_host_state() {
        let area = percpu::current();
        let Some(tables) = area.tables() else {
            return;
        };
        vmcs::write_host_state(&HostState {
            gs_base: core::ptr::from_ref(area) as u64,
            tr_base: tables.tss_base(),
            gdtr_base: tables.gdt_base(),
            idtr_base: arch::idt::base(),
        });
    }

    fn enter(registers: &mut GuestRegisters, launched: bool, slice_us: u64) -> Exit {
        if let Some(shift) = capabilities().ok().and_then(|c| c.preemption_timer_shift) {
            let ticks = time::us_to_tsc(slice_us) >> shift;
            vmcs::set_preemption_timer(ticks.clamp(1, u64::from(u32::MAX)) as u32);
        }
        match arch::vmx::run(registers, launched) {
            Ok(()) => {
                let exit = super::exit::decode();
                // A failed entry delivered nothing to re-inject.
                if !matches!(exit, Exit::InvalidGuestState { .. }) {
                    super::platform::reinject();
                }
                exit
            }
            Err(_) => Exit::EntryFailed {
                error: vmcs::instruction_error(),
            },
        }
    }

    fn skip_instruction() {
        vmcs::skip_instruction();
    }

    fn guest_rip() -> u64 {
        vmcs::guest_rip()
    }
}
