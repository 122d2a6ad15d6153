//! Port I/O.

/// Writes a byte to an I/O port.
///
/// Port writes cannot break memory safety by themselves; the callers of this
/// module only write to devices the hypervisor owns (COM1, the debug port,
/// the emulator exit ports).
pub fn outb(port: u16, value: u8) {
    // SAFETY: `out` touches no memory; which device sits behind `port` is the
    // caller's concern (see above).
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` touches no memory.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}
