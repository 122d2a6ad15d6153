//! What each VM exit of a platform vCPU does: the calls into its platform
//! that `hv_devices`' crate documentation lists, carried out through the
//! backend ([`PlatformBackend`]).
//!
//! Every platform call runs with the guest's platform lock held, and the
//! vCPUs its [`Effects`] name are kicked before the lock is let go (see
//! `virt::sched` for why that order matters).

use hv_core::exits::{
    CrAccess, CrAccessKind, Exit, GuestRegisters, IoAccess, Stop, StringIoAccess,
};
use hv_devices::cpu_state::SegmentState;
use hv_devices::cpuid::{self, CpuidPolicy};
use hv_devices::decode::{self, CodeSize};
use hv_devices::guest_paging::{self, PagingState};
use hv_devices::memory::GuestMemory;
use hv_devices::msr::{GuestStateMsr, MsrClass};
use hv_devices::platform::Effects;

use super::glue::{GuestRam, NativeCpuid};
use super::{GuestPlatform, KernelStop};
use crate::virt::sched;
use crate::virt::vcpu::PlatformVcpu;
use crate::virt::{Fault, NeedPdptes, PlatformBackend, VcpuState};

/// The vCPU that exited.
#[derive(Debug)]
pub struct ExitContext<'a> {
    /// Its global index (`virt::sched`).
    pub index: usize,
    /// Its guest and number there.
    pub platform: PlatformVcpu,
    /// Its registers the context does not hold.
    pub registers: &'a mut GuestRegisters,
    /// Its XCR0.
    pub xcr0: &'a mut u64,
}

/// What the scheduler does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Enter again.
    Resume,
    /// Run the host's NMI handler, then enter again.
    HostNmi,
    /// Open an interrupt window for the host, then enter again.
    HostInterrupts,
    /// The vCPU halted and is parked.
    Parked,
    /// Its platform stopped the guest.
    Stopped,
    /// hv stops the guest.
    KernelStop(KernelStop),
}

/// The value of general-purpose register `gpr` (0-15, RAX first; RSP
/// from the context).
fn gpr<B: PlatformBackend>(registers: &GuestRegisters, gpr: u8) -> u64 {
    let r = registers;
    match gpr & 15 {
        0 => r.rax,
        1 => r.rcx,
        2 => r.rdx,
        3 => r.rbx,
        4 => B::state().rsp,
        5 => r.rbp,
        6 => r.rsi,
        7 => r.rdi,
        8 => r.r8,
        9 => r.r9,
        10 => r.r10,
        11 => r.r11,
        12 => r.r12,
        13 => r.r13,
        14 => r.r14,
        _ => r.r15,
    }
}

fn set_gpr<B: PlatformBackend>(registers: &mut GuestRegisters, gpr: u8, value: u64) {
    let r = registers;
    match gpr & 15 {
        0 => r.rax = value,
        1 => r.rcx = value,
        2 => r.rdx = value,
        3 => r.rbx = value,
        4 => B::set_rsp(value),
        5 => r.rbp = value,
        6 => r.rsi = value,
        7 => r.rdi = value,
        8 => r.r8 = value,
        9 => r.r9 = value,
        10 => r.r10 = value,
        11 => r.r11 = value,
        12 => r.r12 = value,
        13 => r.r13 = value,
        14 => r.r14 = value,
        _ => r.r15 = value,
    }
}

/// Kicks what `effects` names; `true` when the guest must stop.
fn apply(guest: usize, effects: Effects) -> bool {
    sched::kick_set(guest, effects.kick);
    effects.stop.is_some()
}

fn inject_fault<B: PlatformBackend>(fault: Fault) -> Outcome {
    B::inject(fault.0);
    Outcome::Resume
}

/// The code size the guest runs at.
fn code_size(state: &VcpuState) -> CodeSize {
    // Real mode and virtual-8086 mode run 16-bit code.
    if state.cr0 & 1 == 0 || state.rflags & (1 << 17) != 0 {
        CodeSize::Bits16
    } else if state.efer & (1 << 10) != 0 && state.cs_long {
        CodeSize::Bits64
    } else if state.cs_default32 {
        CodeSize::Bits32
    } else {
        CodeSize::Bits16
    }
}

fn paging(state: &VcpuState) -> PagingState {
    PagingState {
        cr0: state.cr0,
        cr3: state.cr3,
        cr4: state.cr4,
        efer: state.efer,
    }
}

/// Handles `exit` of the vCPU in `ctx`.
pub fn handle<B: PlatformBackend>(exit: Exit, ctx: &mut ExitContext<'_>) -> Outcome {
    let g = ctx.platform.guest;
    let n = ctx.platform.number;
    // The host's own events first, before any lock: after an NMI exit
    // NMIs stay blocked until the handler runs, so a crash NMI whose CPU
    // waited here for a platform lock held by a CPU already parked in the
    // crash path would never be answered.
    match exit {
        Exit::Nmi => return Outcome::HostNmi,
        Exit::ExternalInterrupt => return Outcome::HostInterrupts,
        _ => {}
    }
    let mut lock = super::platform(g).lock();
    let Some(p) = lock.as_mut() else {
        return Outcome::Stopped;
    };
    match exit {
        Exit::Nmi | Exit::ExternalInterrupt => unreachable!("handled above"),
        Exit::Preempted => {
            // A timer is due (the vCPU's, the platform's), or the slice ended.
            let fired = p.poll();
            sched::kick_set(g, fired);
            sched::note_platform_deadline(p.next_platform_deadline());
            Outcome::Resume
        }
        Exit::InterruptWindow | Exit::NmiWindow => Outcome::Resume,
        Exit::TripleFault => {
            let effects = p.triple_fault(n);
            apply(g, effects);
            Outcome::Stopped
        }
        Exit::Cpuid => {
            let state = B::state();
            let r = &mut *ctx.registers;
            let result = p.cpuid(
                n,
                r.rax as u32,
                r.rcx as u32,
                &NativeCpuid,
                state.cr4,
                *ctx.xcr0,
            );
            r.rax = u64::from(result.eax);
            r.rbx = u64::from(result.ebx);
            r.rcx = u64::from(result.ecx);
            r.rdx = u64::from(result.edx);
            B::complete_instruction();
            Outcome::Resume
        }
        Exit::Hlt => {
            B::complete_instruction();
            let interrupts = B::interrupt_state().interrupts_enabled;
            if p.halt(n, interrupts) {
                sched::park(ctx.index, p.next_deadline(n));
                Outcome::Parked
            } else {
                Outcome::Resume
            }
        }
        // hv offers no hypercalls to platform guests.
        Exit::Hypercall | Exit::UndefinedInstruction => inject_fault::<B>(Fault::UD),
        Exit::CacheFlush => {
            B::complete_instruction();
            Outcome::Resume
        }
        Exit::Io(access) => {
            let stop = port_io::<B>(p, g, n, access, ctx.registers);
            B::complete_instruction();
            if stop {
                Outcome::Stopped
            } else {
                Outcome::Resume
            }
        }
        Exit::StringIo(access) => string_io::<B>(p, ctx, access),
        Exit::NestedPageFault { gpa, detail } => {
            let ram = super::info(g).ram;
            if gpa < ram.bytes {
                // RAM is mapped with every access allowed: this cannot be.
                return Outcome::KernelStop(KernelStop::Backend(Stop::NestedPageFault {
                    gpa,
                    detail,
                }));
            }
            if !p.claims(n, gpa) {
                return Outcome::KernelStop(KernelStop::OutsideRam {
                    gpa,
                    rip: B::state().rip,
                });
            }
            mmio::<B>(p, ctx, ram, gpa)
        }
        Exit::Rdmsr => {
            let msr = ctx.registers.rcx as u32;
            let value = match p.msr_class(msr) {
                MsrClass::Platform => p.rdmsr(n, msr).map_err(|_| Fault::GP),
                MsrClass::GuestState(which) => Ok(B::read_msr(ctx.platform.aux, which)),
                MsrClass::Unsupported => Err(Fault::GP),
            };
            match value {
                Ok(value) => {
                    ctx.registers.rax = value & 0xFFFF_FFFF;
                    ctx.registers.rdx = value >> 32;
                    B::complete_instruction();
                    Outcome::Resume
                }
                Err(fault) => inject_fault::<B>(fault),
            }
        }
        Exit::Wrmsr => {
            let r = &*ctx.registers;
            let msr = r.rcx as u32;
            let value = (r.rdx << 32) | (r.rax & 0xFFFF_FFFF);
            let result = match p.msr_class(msr) {
                MsrClass::Platform => p.wrmsr(n, msr, value).map_err(|_| Fault::GP),
                MsrClass::GuestState(which) => {
                    B::write_msr(ctx.platform.aux, which, value).map(|()| Effects::default())
                }
                MsrClass::Unsupported => Err(Fault::GP),
            };
            match result {
                Ok(effects) => {
                    if effects.tsc_offset_changed {
                        B::set_tsc_offset(p.tsc_offset(n));
                    }
                    if effects.apic_page_moved
                        && let Some(base) = p.apic_mmio_base(n)
                        && base < super::info(g).ram.bytes
                    {
                        log::warn!(
                            "guest {}: APIC page moved into RAM at {base:#x}; its accesses reach RAM",
                            super::info(g).name.as_str()
                        );
                    }
                    let stop = apply(g, effects);
                    B::complete_instruction();
                    if stop {
                        Outcome::Stopped
                    } else {
                        Outcome::Resume
                    }
                }
                Err(fault) => inject_fault::<B>(fault),
            }
        }
        Exit::ControlRegister(access) => control_register::<B>(p, ctx, access),
        Exit::Xsetbv => {
            let r = &*ctx.registers;
            let value = (r.rdx << 32) | (r.rax & 0xFFFF_FFFF);
            let supported = CpuidPolicy::new(super::info(g).features).supported_xcr0(&NativeCpuid);
            match cpuid::check_xsetbv(r.rcx, value, supported) {
                Ok(()) => {
                    *ctx.xcr0 = value;
                    crate::arch::xsave::xsetbv(value);
                    B::complete_instruction();
                    Outcome::Resume
                }
                Err(_) => inject_fault::<B>(Fault::GP),
            }
        }
        Exit::InvalidOpcode => {
            if emulate_compat_syscall::<B>(ctx) {
                Outcome::Resume
            } else {
                inject_fault::<B>(Fault::UD)
            }
        }
        Exit::EntryFailed { error } => {
            Outcome::KernelStop(KernelStop::Backend(Stop::EntryFailed { error }))
        }
        Exit::InvalidGuestState { reason } => {
            Outcome::KernelStop(KernelStop::Backend(Stop::InvalidGuestState { reason }))
        }
        Exit::Unhandled { reason } => {
            Outcome::KernelStop(KernelStop::Backend(Stop::Unhandled { reason }))
        }
    }
}

/// IN or OUT; `true` when the guest stopped (debug-exit, reset).
fn port_io<B: PlatformBackend>(
    p: &mut GuestPlatform,
    g: usize,
    n: usize,
    access: IoAccess,
    registers: &mut GuestRegisters,
) -> bool {
    let mask = match access.size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    };
    if access.input {
        let value = u64::from(p.io_in(n, access.port, access.size)) & mask;
        // A 32-bit IN zero-extends into RAX; 8 and 16 bits merge.
        registers.rax = if access.size == 4 {
            value
        } else {
            (registers.rax & !mask) | value
        };
        false
    } else {
        let value = (registers.rax & mask) as u32;
        let effects = p.io_out(n, access.port, access.size, value);
        sched::note_platform_deadline(p.next_platform_deadline());
        apply(g, effects)
    }
}

/// INS or OUTS, one element per exit: the element moves between the
/// port and guest memory, RSI/RDI step by the size (back with DF), and
/// with REP the instruction repeats until RCX is 0.
fn string_io<B: PlatformBackend>(
    p: &mut GuestPlatform,
    ctx: &mut ExitContext<'_>,
    access: StringIoAccess,
) -> Outcome {
    let g = ctx.platform.guest;
    let n = ctx.platform.number;
    let state = B::state();
    let address_mask = match access.address_size {
        2 => 0xFFFF,
        4 => 0xFFFF_FFFF,
        _ => u64::MAX,
    };
    let r = &mut *ctx.registers;
    if access.rep && r.rcx & address_mask == 0 {
        B::complete_instruction();
        return Outcome::Resume;
    }
    let mut ram = super::info(g).ram;
    let size = usize::from(access.io.size.min(4));
    let Ok(gpa) = guest_paging::translate(&ram, paging(&state), access.linear) else {
        return Outcome::KernelStop(KernelStop::OutsideRam {
            gpa: access.linear,
            rip: state.rip,
        });
    };
    let mut stop = false;
    let mut element = [0u8; 4];
    if access.io.input {
        let value = p.io_in(n, access.io.port, access.io.size);
        element.copy_from_slice(&value.to_le_bytes());
        if ram.write(gpa, &element[..size]).is_err() {
            return Outcome::KernelStop(KernelStop::OutsideRam {
                gpa,
                rip: state.rip,
            });
        }
    } else {
        if ram.read(gpa, &mut element[..size]).is_err() {
            return Outcome::KernelStop(KernelStop::OutsideRam {
                gpa,
                rip: state.rip,
            });
        }
        let effects = p.io_out(
            n,
            access.io.port,
            access.io.size,
            u32::from_le_bytes(element),
        );
        stop = apply(g, effects);
    }
    let step = if state.rflags & (1 << 10) != 0 {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    };
    let advance = |reg: &mut u64| {
        *reg = (*reg & !address_mask) | (reg.wrapping_add(step) & address_mask);
    };
    if access.io.input {
        advance(&mut r.rdi);
    } else {
        advance(&mut r.rsi);
    }
    let mut done = true;
    if access.rep {
        let count = (r.rcx & address_mask).wrapping_sub(1) & address_mask;
        r.rcx = (r.rcx & !address_mask) | count;
        done = count == 0;
    }
    if done {
        B::complete_instruction();
    }
    if stop {
        Outcome::Stopped
    } else {
        Outcome::Resume
    }
}

/// An access to the APIC window: the instruction is fetched and decoded,
/// and the access goes to the platform.
fn mmio<B: PlatformBackend>(
    p: &mut GuestPlatform,
    ctx: &mut ExitContext<'_>,
    ram: GuestRam,
    gpa: u64,
) -> Outcome {
    let g = ctx.platform.guest;
    let n = ctx.platform.number;
    let state = B::state();
    let undecodable = Outcome::KernelStop(KernelStop::UndecodableMmio {
        gpa,
        rip: state.rip,
    });
    let linear = state.cs_base.wrapping_add(state.rip);
    let mut bytes = [0u8; 15];
    let Ok(got) = guest_paging::fetch_instruction(&ram, paging(&state), linear, &mut bytes) else {
        return undecodable;
    };
    let Ok(instruction) = decode::decode(&bytes[..got], code_size(&state)) else {
        return undecodable;
    };
    let r = &mut *ctx.registers;
    if let Some(reg) = instruction.load_register() {
        let Ok(value) = p.mmio_read(n, gpa, instruction.size) else {
            return undecodable;
        };
        let old = gpr::<B>(r, reg);
        if let Some(new) = instruction.load_result(old, value) {
            set_gpr::<B>(r, reg, new);
        }
    } else {
        let registers: [u64; 16] = core::array::from_fn(|i| gpr::<B>(r, i as u8));
        let Some(value) = instruction.store_value(&registers) else {
            return undecodable;
        };
        match p.mmio_write(n, gpa, instruction.size, value) {
            Ok(effects) => {
                if apply(g, effects) {
                    return Outcome::Stopped;
                }
            }
            Err(_) => return undecodable,
        }
    }
    B::set_rip(state.rip.wrapping_add(u64::from(instruction.length)));
    B::clear_interrupt_shadow();
    Outcome::Resume
}

/// MOV to or from CR0/CR3/CR4/CR8, CLTS, LMSW.
fn control_register<B: PlatformBackend>(
    p: &mut GuestPlatform,
    ctx: &mut ExitContext<'_>,
    access: CrAccess,
) -> Outcome {
    let n = ctx.platform.number;
    let long_mode = B::state().cs_long;
    let r = &mut *ctx.registers;
    let operand = |value: u64| {
        if long_mode {
            value
        } else {
            value & 0xFFFF_FFFF
        }
    };
    let result: Result<Option<NeedPdptes>, Fault> = match (access.cr, access.kind) {
        (8, CrAccessKind::Read { gpr: reg }) => {
            set_gpr::<B>(r, reg, p.read_cr8(n));
            Ok(None)
        }
        (8, CrAccessKind::Write { gpr: reg }) => {
            let value = gpr::<B>(r, reg);
            p.write_cr8(n, value).map(|()| None).map_err(|_| Fault::GP)
        }
        (cr, CrAccessKind::Read { gpr: reg }) => {
            set_gpr::<B>(r, reg, operand(B::read_cr(cr)));
            Ok(None)
        }
        (0, CrAccessKind::Write { gpr: reg }) => B::write_cr0(operand(gpr::<B>(r, reg))),
        (3, CrAccessKind::Write { gpr: reg }) => B::write_cr3(operand(gpr::<B>(r, reg))),
        (4, CrAccessKind::Write { gpr: reg }) => B::write_cr4(operand(gpr::<B>(r, reg))),
        (0, CrAccessKind::Clts) => B::write_cr0(B::read_cr(0) & !(1 << 3)),
        (0, CrAccessKind::Lmsw { value }) => {
            // LMSW sets PE but never clears it.
            let cr0 = B::read_cr(0);
            B::write_cr0((cr0 & !0xE) | u64::from(value & 0xF) | (cr0 & 1))
        }
        _ => Err(Fault::UD),
    };
    match result {
        Ok(need) => {
            if need.is_some() {
                load_pdptes::<B>(ctx.platform.guest);
            }
            B::complete_instruction();
            Outcome::Resume
        }
        Err(fault) => inject_fault::<B>(fault),
    }
}

/// Loads the four PAE page-directory pointers from guest memory at CR3.
fn load_pdptes<B: PlatformBackend>(guest: usize) {
    let ram = super::info(guest).ram;
    let base = B::read_cr(3) & 0xFFFF_FFE0;
    let mut pdptes = [0u64; 4];
    for (i, entry) in pdptes.iter_mut().enumerate() {
        let mut bytes = [0u8; 8];
        if ram.read(base + i as u64 * 8, &mut bytes).is_ok() {
            *entry = u64::from_le_bytes(bytes);
        }
    }
    B::set_pdptes(pdptes);
}

/// SYSCALL executed in compatibility mode, which Intel CPUs refuse with
/// #UD and AMD's (and KVM's emulator) run: RCX and R11 take the return
/// RIP and RFLAGS, RFLAGS is masked by IA32_FMASK, CS and SS come from
/// IA32_STAR as flat 64-bit ring-0 segments, RIP from IA32_CSTAR. `false`
/// when the #UD was anything else (it is then delivered).
fn emulate_compat_syscall<B: PlatformBackend>(ctx: &mut ExitContext<'_>) -> bool {
    const EFER_SCE: u64 = 1 << 0;
    const EFER_LMA: u64 = 1 << 10;
    const RFLAGS_RF: u64 = 1 << 16;
    let state = B::state();
    let compatibility = state.efer & EFER_LMA != 0 && !state.cs_long;
    if !compatibility || state.efer & EFER_SCE == 0 {
        return false;
    }
    let ram = super::info(ctx.platform.guest).ram;
    let mut bytes = [0u8; 15];
    let linear = state.cs_base.wrapping_add(state.rip);
    let fetched = guest_paging::fetch_instruction(&ram, paging(&state), linear, &mut bytes);
    if !matches!(fetched, Ok(n) if n >= 2) || bytes[..2] != [0x0F, 0x05] {
        return false;
    }
    let aux = ctx.platform.aux;
    let star = B::read_msr(aux, GuestStateMsr::Star);
    let target = B::read_msr(aux, GuestStateMsr::Cstar);
    let mask = B::read_msr(aux, GuestStateMsr::Fmask);
    ctx.registers.rcx = state.rip.wrapping_add(2) & 0xFFFF_FFFF;
    ctx.registers.r11 = state.rflags & !RFLAGS_RF;
    B::set_rflags((state.rflags & !mask & !RFLAGS_RF) | 2);
    let selector = ((star >> 32) as u16) & 0xFFFC;
    let flat = SegmentState {
        selector,
        base: 0,
        limit: 0xFFFF_FFFF,
        kind: 0xB,
        code_or_data: true,
        dpl: 0,
        present: true,
        long: true,
        default_32: false,
        granular: true,
    };
    let stack = SegmentState {
        selector: selector.wrapping_add(8),
        kind: 0x3,
        long: false,
        default_32: true,
        ..flat
    };
    B::set_code_and_stack(&flat, &stack);
    B::set_rip(target);
    B::clear_interrupt_shadow();
    true
}
