//! The IDT and the entry stubs of all 256 vectors.
//!
//! Every stub pushes a uniform frame (an error code of 0 where the CPU pushes
//! none, then the vector), saves all general-purpose registers, aligns RSP to
//! 16 and calls the dispatcher with the frame. The dispatcher resumes a
//! faulting instruction that has a fix-up ([`super::fixup`]), else calls the
//! handler registered for the vector ([`register`]). The layers above
//! register their handlers at boot; this layer imports none of them.

use core::sync::atomic::{AtomicUsize, Ordering};

use super::gdt::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI, KERNEL_CODE_SELECTOR};

/// A handler for one vector, called with the interrupted state.
pub type Handler = fn(&mut TrapFrame);

/// The registered handlers, as `fn` addresses (0: none).
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// Registers `handler` for `vector`; called at boot, before the vector can
/// be raised. A later registration replaces an earlier one.
pub fn register(vector: u8, handler: Handler) {
    HANDLERS[usize::from(vector)].store(handler as usize, Ordering::Release);
}

/// Registers `handler` for every exception vector (0 to 31) that has no
/// handler yet.
pub fn register_exceptions(handler: Handler) {
    for slot in &HANDLERS[..32] {
        let _ = slot.compare_exchange(0, handler as usize, Ordering::AcqRel, Ordering::Acquire);
    }
}

const INVALID_OPCODE: u64 = 6;
const GENERAL_PROTECTION: u64 = 13;

/// The registers an entry stub saves, in memory order.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Distance between two stubs; each is padded to it so the table is implicit.
const STUB_BYTES: usize = 16;

core::arch::global_asm!(
    r#"
    .section .text.traps, "ax"
    .balign 16
    .global trap_stubs
trap_stubs:
    .set vector, 0
    .rept 256
    .balign 16
    .if vector == 8 || vector == 10 || vector == 11 || vector == 12 || vector == 13 || vector == 14 || vector == 17 || vector == 21 || vector == 29 || vector == 30
    .else
    push 0
    .endif
    push vector
    jmp trap_common
    .set vector, vector + 1
    .endr

trap_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    cld
    mov rdi, rsp
    mov rbx, rsp
    and rsp, -16
    call {dispatch}
    mov rsp, rbx
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq
"#,
    dispatch = sym trap_dispatch,
);

unsafe extern "C" {
    static trap_stubs: [u8; 256 * STUB_BYTES];
}

extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    if matches!(frame.vector, INVALID_OPCODE | GENERAL_PROTECTION)
        && let Some(resume) = super::fixup::lookup(frame.rip)
    {
        frame.rip = resume;
        return;
    }
    let handler = HANDLERS[(frame.vector & 0xFF) as usize].load(Ordering::Acquire);
    if handler == 0 {
        unhandled(frame);
        return;
    }
    // SAFETY: (1) non-zero slots hold a `Handler` stored by `register`.
    let handler = unsafe { core::mem::transmute::<usize, Handler>(handler) };
    handler(frame);
}

/// A vector nobody registered: an exception stops the CPU (nothing above
/// is there to report it yet); an interrupt is acknowledged and dropped.
fn unhandled(frame: &TrapFrame) {
    if frame.vector < 32 {
        super::cpu::halt_forever();
    }
    super::apic::end_of_interrupt();
}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    flags: u8,
    offset_middle: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        flags: 0,
        offset_middle: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn interrupt_gate(handler: u64, ist: u8) -> Self {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CODE_SELECTOR,
            ist,
            // Present, DPL 0, 64-bit interrupt gate: IF is cleared on entry.
            flags: 0x8E,
            offset_middle: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// The one IDT all CPUs share: its gates never change after boot, so the
/// NMI vector's stub is in place before any crash can need it.
static IDT: spin::Once<[Gate; 256]> = spin::Once::new();

/// Address of the IDT (VMCS host state).
pub fn base() -> u64 {
    IDT.get().map_or(0, |idt| idt.as_ptr() as u64)
}

/// Builds the IDT on first use and loads it on the current CPU.
pub fn load() {
    let idt = IDT.call_once(|| {
        let stubs = (&raw const trap_stubs).addr() as u64;
        let mut idt = [Gate::MISSING; 256];
        for (vector, gate) in idt.iter_mut().enumerate() {
            let ist = match vector {
                2 => IST_NMI,
                8 => IST_DOUBLE_FAULT,
                18 => IST_MACHINE_CHECK,
                _ => 0,
            };
            *gate = Gate::interrupt_gate(stubs + (vector * STUB_BYTES) as u64, ist);
        }
        idt
    });
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer {
        limit: (core::mem::size_of_val(idt) - 1) as u16,
        base: idt.as_ptr() as u64,
    };
    // SAFETY: (1) the IDT is a 'static that never changes after it is built, and every gate points
    // at a stub in `trap_stubs`.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &raw const pointer, options(readonly, nostack, preserves_flags))
    };
}
