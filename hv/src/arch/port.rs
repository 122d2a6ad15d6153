//! Port I/O.

/// Writes a byte to an I/O port.
///
/// Port writes cannot break memory safety by themselves; the callers of this
/// module only write to devices the hypervisor owns (COM1, the debug port,
/// the emulator exit ports).
pub fn outb(port: u16, value: u8) {
    // SAFETY: (1) `out` touches no memory; (2) which device sits behind `port` is the caller's
    // concern (see above).
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: (1) `in` touches no memory.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes a block of bytes to one I/O port (`rep outsb`): the capture
/// stream's bulk path.
pub fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: (1) `rep outsb` only reads `bytes` (RSI, RCX bytes) and writes the port; (2) the
    // direction flag is clear in Rust code.
    unsafe {
        core::arch::asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(nostack, preserves_flags, readonly)
        )
    };
}

/// Writes `words` to one I/O port (`rep outsw`): ATA PIO data.
pub fn outsw(port: u16, words: &[u16]) {
    // SAFETY: (1) `rep outsw` only reads `words` and writes the port; (2) the direction flag is
    // clear in Rust code.
    unsafe {
        core::arch::asm!(
            "rep outsw",
            in("dx") port,
            inout("rsi") words.as_ptr() => _,
            inout("rcx") words.len() => _,
            options(nostack, preserves_flags, readonly)
        )
    };
}

/// Reads a 32-bit value from an I/O port (the ACPI PM timer).
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: (1) `in` touches no memory.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}
