//! Running a function on another stack and coming back: for boot work
//! whose frames are too big for a CPU's main stack (creating guests, whose
//! virtual platforms are built on the stack before they move into place).

/// Calls `function()` with RSP at `top`, then returns on the caller's own
/// stack.
///
/// # Safety
/// `top` must be the 16-byte aligned top of a mapped stack that nothing
/// else uses, large enough for `function`.
pub unsafe fn call_on_stack(top: u64, function: extern "C" fn()) {
    // SAFETY: (1) the stack is guaranteed by the caller; (2) R12 is
    // callee-saved, so it still holds the old RSP when `function` returns;
    // (3) the C ABI's scratch registers are declared clobbered.
    unsafe {
        core::arch::asm!(
            "mov r12, rsp",
            "mov rsp, {top}",
            "call {function}",
            "mov rsp, r12",
            top = in(reg) top,
            function = in(reg) function,
            out("r12") _,
            clobber_abi("C"),
        )
    }
}
