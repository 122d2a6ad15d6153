//! The extended processor state (x87, SSE, AVX, ...) of guests: XSAVE and
//! XRSTOR (FXSAVE and FXRSTOR without XSAVE), XSETBV and XGETBV.
//!
//! hv itself never touches that state (the kernel target is soft-float),
//! so the registers belong to whichever guest vCPU ran last on a core; the
//! virtualization layer saves them when a vCPU leaves a core and restores
//! them when one comes, each into its own area.

use super::cpu::{cr0, cr4, write_cr0_cr4};

/// CR4.OSFXSR: FXSAVE/FXRSTOR and SSE enabled.
const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT: unmasked SIMD exceptions raise #XM.
const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4.OSXSAVE: XSAVE and XSETBV enabled.
const CR4_OSXSAVE: u64 = 1 << 18;
/// CR0.EM: x87 emulation (must be clear for the state to be reachable).
const CR0_EM: u64 = 1 << 2;
/// CR0.TS: task switched (would make the first FPU use fault).
const CR0_TS: u64 = 1 << 3;
/// CR0.MP: WAIT honours TS.
const CR0_MP: u64 = 1 << 1;

/// Bytes an area must have: XSAVE's largest layout hv offers (x87, SSE,
/// AVX, AVX-512, PKRU) fits in a page.
pub const AREA_BYTES: u64 = 4096;

/// 0: not looked at yet; 1: no XSAVE; 2: XSAVE.
static XSAVE: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

/// Whether the CPU has XSAVE (else FXSAVE is used). Every CPU of a machine
/// answers the same; CPUID is asked once.
pub fn has_xsave() -> bool {
    use core::sync::atomic::Ordering;
    match XSAVE.load(Ordering::Relaxed) {
        0 => {
            let has = raw_cpuid::CpuId::new()
                .get_feature_info()
                .is_some_and(|features| features.has_xsave());
            XSAVE.store(1 + u8::from(has), Ordering::Relaxed);
            has
        }
        value => value == 2,
    }
}

/// Makes the extended state usable on this CPU: CR4.OSFXSR, OSXMMEXCPT and
/// (with XSAVE) OSXSAVE set; CR0.EM and TS clear, MP set.
pub fn enable_on_this_cpu() {
    let mut new_cr4 = cr4() | CR4_OSFXSR | CR4_OSXMMEXCPT;
    if has_xsave() {
        new_cr4 |= CR4_OSXSAVE;
    }
    let new_cr0 = (cr0() & !(CR0_EM | CR0_TS)) | CR0_MP;
    // SAFETY: (1) these bits only enable instructions and state the kernel
    // does not use; (2) paging, protection and long mode stay as they are.
    unsafe { write_cr0_cr4(new_cr0, new_cr4) };
}

/// Loads XCR0 with `value`, which the caller checked is valid for this CPU
/// (bit 0 set, only supported components, AVX with SSE).
pub fn xsetbv(value: u64) {
    // SAFETY: (1) CR4.OSXSAVE is set and `value` was checked (caller); (2)
    // XCR0 only selects which state XSAVE manages and which instructions
    // work.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") 0u32, in("eax") value as u32,
            in("edx") (value >> 32) as u32, options(nomem, nostack, preserves_flags))
    };
}

/// Saves this CPU's extended state (every component XCR0 enables) into
/// `area`: [`AREA_BYTES`] of memory the kernel owns, 64-byte aligned, used
/// for nothing else.
pub fn save(area: u64, xsave: bool) {
    debug_assert!(area.is_multiple_of(64));
    // SAFETY: (1) the area is the caller's own, large enough and aligned
    // (above); (2) XSAVE and FXSAVE write only the area.
    unsafe {
        if xsave {
            core::arch::asm!("xsave64 [{}]", in(reg) area, in("eax") u32::MAX,
                in("edx") u32::MAX, options(nostack, preserves_flags));
        } else {
            core::arch::asm!("fxsave64 [{}]", in(reg) area, options(nostack, preserves_flags));
        }
    }
}

/// Loads this CPU's extended state from `area`, which [`save`] or
/// [`init_area`] wrote with the XCR0 now in force.
pub fn restore(area: u64, xsave: bool) {
    debug_assert!(area.is_multiple_of(64));
    // SAFETY: (1) the area holds a state saved by `save` or made by
    // `init_area` (caller), so its header and MXCSR are valid; (2) XRSTOR
    // and FXRSTOR only read it.
    unsafe {
        if xsave {
            core::arch::asm!("xrstor64 [{}]", in(reg) area, in("eax") u32::MAX,
                in("edx") u32::MAX, options(nostack, preserves_flags));
        } else {
            core::arch::asm!("fxrstor64 [{}]", in(reg) area, options(nostack, preserves_flags));
        }
    }
}

/// The bytes of an area in the state after RESET or INIT: x87 control
/// word 0x37F, MXCSR 0x1F80, every component in its initial configuration
/// (XSTATE_BV 0 restores them as such).
pub fn init_area(bytes: &mut [u8]) {
    bytes.fill(0);
    if let Some(fcw) = bytes.get_mut(0..2) {
        fcw.copy_from_slice(&0x037Fu16.to_le_bytes());
    }
    if let Some(mxcsr) = bytes.get_mut(24..28) {
        mxcsr.copy_from_slice(&0x1F80u32.to_le_bytes());
    }
}

/// XCR0, where the CPU has XSAVE (else `None`).
pub fn xcr0() -> Option<u64> {
    if !has_xsave() {
        return None;
    }
    let (low, high): (u32, u32);
    // SAFETY: (1) CR4.OSXSAVE is set wherever the CPU has XSAVE
    // (`enable_on_this_cpu`), so XGETBV of XCR0 cannot fault; (2) it only
    // reads a register.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") low, out("edx") high,
            options(nomem, nostack, preserves_flags))
    };
    Some(u64::from(high) << 32 | u64::from(low))
}

/// Loads XCR0 with `value` where the CPU has XSAVE (without it there is
/// no XCR0 and guests see no XSAVE).
pub fn xsetbv_if_supported(value: u64) {
    if has_xsave() {
        xsetbv(value);
    }
}
