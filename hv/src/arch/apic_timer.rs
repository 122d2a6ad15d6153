//! The local APIC timer in TSC-deadline mode, as an idle CPU's alarm clock:
//! it fires once at a TSC value, raising a vector whose handler the layer
//! above registered.

use super::apic::{read_register, write_register};
use super::cpu::wrmsr;

const REG_LVT_TIMER: u32 = 0x320;
const LVT_TSC_DEADLINE: u32 = 2 << 17;
const IA32_TSC_DEADLINE: u32 = 0x6E0;

/// Whether the CPU offers the TSC-deadline timer mode.
pub fn has_tsc_deadline() -> bool {
    raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|features| features.has_tsc_deadline())
}

/// Arms this CPU's timer to raise `vector` when the TSC reaches `deadline`
/// (at once if it already did). Needs [`has_tsc_deadline`].
pub fn arm(vector: u8, deadline: u64) {
    if read_register(REG_LVT_TIMER) != LVT_TSC_DEADLINE | u32::from(vector) {
        write_register(REG_LVT_TIMER, LVT_TSC_DEADLINE | u32::from(vector));
        // The mode change must be seen before the deadline is written.
        // SAFETY: (1) MFENCE only orders memory.
        unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
    }
    // SAFETY: (1) IA32_TSC_DEADLINE exists with the TSC-deadline mode
    // (caller checked); (2) arming a timer changes no memory. A zero would
    // disarm it.
    unsafe { wrmsr(IA32_TSC_DEADLINE, deadline.max(1)) };
}
