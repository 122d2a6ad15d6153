//! The local APIC, in x2APIC mode wherever the CPU offers it (32-bit
//! destinations, needed beyond 255 CPUs) and xAPIC MMIO mode otherwise.
//!
//! `x86::apic` would do, but its xAPIC and x2APIC types differ; this module
//! keeps one small interface over both, and every CPU uses the mode the boot
//! CPU chose. (The `x2apic` crate is avoided: in xAPIC mode it writes the
//! IPI destination to the wrong ICR bits.)

use core::sync::atomic::{AtomicBool, Ordering};

use super::cpu::{rdmsr, wrmsr};

const APIC_BASE_MSR: u32 = 0x1B;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const XAPIC_MMIO_BASE: u64 = 0xFEE0_0000;

/// Register offsets in xAPIC MMIO; x2APIC MSR = 0x800 + offset / 16.
const REG_EOI: u32 = 0xB0;
const REG_SPURIOUS: u32 = 0xF0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_LINT0: u32 = 0x350;
const REG_LVT_LINT1: u32 = 0x360;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3E0;

/// Vector of spurious interrupts; its handler sends no EOI.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

const ICR_DELIVERY_FIXED: u32 = 0 << 8;
const ICR_DELIVERY_NMI: u32 = 4 << 8;
const ICR_DELIVERY_INIT: u32 = 5 << 8;
const ICR_DELIVERY_STARTUP: u32 = 6 << 8;
const ICR_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
/// Destination shorthand: all excluding self.
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
const LVT_MASKED: u32 = 1 << 16;
const LVT_DELIVERY_NMI: u32 = 4 << 8;
const LVT_ACTIVE_LOW: u32 = 1 << 13;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// Timer divide configuration: by 16.
const TIMER_DIVIDE_16: u32 = 0b0011;

static X2APIC: AtomicBool = AtomicBool::new(false);

/// Whether the CPU offers x2APIC mode.
pub fn cpu_has_x2apic() -> bool {
    raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|features| features.has_x2apic())
}

/// Chooses the mode for every CPU; the boot CPU calls this once.
pub fn choose_mode() -> &'static str {
    let x2apic = cpu_has_x2apic();
    X2APIC.store(x2apic, Ordering::Relaxed);
    if x2apic { "x2apic" } else { "xapic" }
}

fn x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// Reads a local APIC register (xAPIC offset) in the chosen mode.
pub(super) fn read_register(register: u32) -> u32 {
    read(register)
}

fn read(register: u32) -> u32 {
    if x2apic() {
        // SAFETY: (1) x2APIC mode is enabled on this CPU (see `enable`), so the APIC MSRs exist.
        unsafe { rdmsr(0x800 + register / 16) as u32 }
    } else {
        // SAFETY: (1) the xAPIC page is identity-mapped (uncached) and the register offset is one
        // of this module's constants.
        unsafe { core::ptr::read_volatile((XAPIC_MMIO_BASE + u64::from(register)) as *const u32) }
    }
}

/// Writes a local APIC register (xAPIC offset) in the chosen mode.
pub(super) fn write_register(register: u32, value: u32) {
    write(register, value)
}

fn write(register: u32, value: u32) {
    if x2apic() {
        // SAFETY: (1) x2APIC mode is enabled on this CPU (see `enable`), so
        // the APIC MSRs exist; (2) the register is one of this module's
        // constants.
        unsafe { wrmsr(0x800 + register / 16, u64::from(value)) };
    } else {
        // SAFETY: (1) the xAPIC page is identity-mapped (uncached); (2) the
        // register offset is one of this module's constants.
        unsafe {
            core::ptr::write_volatile((XAPIC_MMIO_BASE + u64::from(register)) as *mut u32, value)
        };
    }
}

/// Enables this CPU's local APIC in the chosen mode, with LINT0/LINT1 masked.
pub fn enable() {
    // SAFETY: (1) IA32_APIC_BASE exists on every x86_64 CPU; (2) enabling the APIC (and x2APIC
    // mode where CPUID offers it) changes no memory mapping.
    unsafe {
        let mut base = rdmsr(APIC_BASE_MSR) | APIC_BASE_ENABLE;
        if x2apic() {
            base |= APIC_BASE_X2APIC;
        }
        wrmsr(APIC_BASE_MSR, base);
    }
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, LVT_MASKED);
    write(REG_SPURIOUS, 0x100 | u32::from(SPURIOUS_VECTOR));
}

/// How a LINT pin carries the platform's NMI (the MADT's Local APIC NMI
/// entries): delivered as an NMI, edge-triggered, with this polarity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NmiPin {
    /// LINT0 or LINT1.
    pub lint: u8,
    /// Active low (else active high).
    pub active_low: bool,
}

/// Unmasks `pin` on this CPU as an NMI input: the platform's NMI (the
/// front-panel button, a BMC's diagnostic NMI) then reaches this CPU.
pub fn unmask_nmi_pin(pin: NmiPin) {
    let register = if pin.lint == 0 {
        REG_LVT_LINT0
    } else {
        REG_LVT_LINT1
    };
    let polarity = if pin.active_low { LVT_ACTIVE_LOW } else { 0 };
    write(register, LVT_DELIVERY_NMI | polarity);
}

/// Software-enables this CPU's local APIC again after [`disable`] (a test
/// knob's CPU that must still send NMIs during a crash).
pub fn software_enable() {
    write(REG_SPURIOUS, 0x100 | u32::from(SPURIOUS_VECTOR));
}

/// Starts this CPU's APIC timer counting down from `count` once (divide
/// by 16, masked: for measuring its rate against the TSC).
pub fn timer_start_one_shot(count: u32) {
    write(REG_TIMER_DIVIDE, TIMER_DIVIDE_16);
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_INITIAL, count);
}

/// The APIC timer's current count.
pub fn timer_current() -> u32 {
    read(REG_TIMER_CURRENT)
}

/// Runs this CPU's APIC timer periodically: `vector` every `count` ticks
/// (divide by 16).
pub fn timer_start_periodic(vector: u8, count: u32) {
    write(REG_TIMER_DIVIDE, TIMER_DIVIDE_16);
    write(REG_LVT_TIMER, LVT_TIMER_PERIODIC | u32::from(vector));
    write(REG_TIMER_INITIAL, count);
}

/// Starts this CPU's APIC timer counting down from `count` once (divide
/// by 16), then interrupting on `vector`.
pub fn timer_start_one_shot_on(vector: u8, count: u32) {
    write(REG_TIMER_DIVIDE, TIMER_DIVIDE_16);
    write(REG_LVT_TIMER, u32::from(vector));
    write(REG_TIMER_INITIAL, count);
}

/// Stops this CPU's APIC timer.
pub fn timer_stop() {
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_INITIAL, 0);
}

/// Software-disables this CPU's local APIC (crash path: no more IPIs).
pub fn disable() {
    write(REG_SPURIOUS, u32::from(SPURIOUS_VECTOR));
}

/// Signals the end of an interrupt.
pub fn end_of_interrupt() {
    write(REG_EOI, 0);
}

/// Orders every earlier store before the next IPI. WRMSR to the x2APIC
/// ICR is not serializing: without `mfence; lfence` the IPI can overtake
/// the stores it announces (a call-function request), and the target finds
/// nothing to do (Linux's `weak_wrmsr_fence`). An xAPIC ICR write is an
/// uncached store, ordered after earlier stores: a compiler fence is
/// enough.
pub fn fence_before_ipi() {
    if x2apic() {
        // SAFETY: (1) MFENCE; (2) LFENCE only order memory and instructions.
        unsafe { core::arch::asm!("mfence", "lfence", options(nostack, preserves_flags)) };
    } else {
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
    }
}

fn send(destination: u32, command: u32) {
    if x2apic() {
        fence_before_ipi();
        // SAFETY: (1) x2APIC mode is on; (2) the ICR is one 64-bit MSR write.
        unsafe { wrmsr(0x830, (u64::from(destination) << 32) | u64::from(command)) };
    } else {
        // Bounded: a wedged APIC must not hang the caller (the crash path).
        for _ in 0..1_000_000 {
            if read(REG_ICR_LOW) & ICR_PENDING == 0 {
                break;
            }
            core::hint::spin_loop();
        }
        write(REG_ICR_HIGH, destination << 24);
        write(REG_ICR_LOW, command);
    }
}

/// INIT to one CPU.
pub fn send_init(apic_id: u32) {
    send(apic_id, ICR_DELIVERY_INIT | ICR_LEVEL_ASSERT);
}

/// Startup IPI to one CPU, starting it at `page_number << 12`.
pub fn send_startup(apic_id: u32, page_number: u8) {
    send(
        apic_id,
        ICR_DELIVERY_STARTUP | ICR_LEVEL_ASSERT | u32::from(page_number),
    );
}

/// A fixed-vector interrupt to one CPU.
pub fn send_fixed(apic_id: u32, vector: u8) {
    send(
        apic_id,
        ICR_DELIVERY_FIXED | ICR_LEVEL_ASSERT | u32::from(vector),
    );
}

/// An NMI to one CPU.
pub fn send_nmi(apic_id: u32) {
    send(apic_id, ICR_DELIVERY_NMI | ICR_LEVEL_ASSERT);
}

/// One NMI to every other CPU on the APIC bus, in one ICR write. Only for
/// when every present CPU runs this kernel: a CPU still waiting for its
/// SIPI must not get one (Linux's `apic_use_ipi_shorthand`).
pub fn send_nmi_all_but_self() {
    send(0, ICR_DELIVERY_NMI | ICR_LEVEL_ASSERT | ICR_ALL_BUT_SELF);
}
