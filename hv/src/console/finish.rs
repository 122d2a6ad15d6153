//! How a run ends: halt (bare metal), or end the emulator when the command
//! line says `finish=exit` (test runs).

use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::port::outb;

static EXIT_EMULATOR: AtomicBool = AtomicBool::new(false);

/// QEMU `isa-debug-exit` port: QEMU exits with `(value << 1) | 1`.
const QEMU_EXIT_PORT: u16 = 0xF4;
const QEMU_EXIT_SUCCESS: u8 = 0x10;
const QEMU_EXIT_FAILURE: u8 = 0x11;
/// The crash path ran to its end (QEMU exits with 0x25).
const QEMU_EXIT_CRASH_HANDLED: u8 = 0x12;
/// Bochs shuts down when it reads `Shutdown` on this port.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// Makes [`success_stop`] and [`fail_stop`] end the emulator.
pub fn exit_emulator_when_done(enabled: bool) {
    EXIT_EMULATOR.store(enabled, Ordering::Relaxed);
}

fn stop(qemu_code: u8) -> ! {
    super::drain();
    super::wait_transmitter_empty();
    if EXIT_EMULATOR.load(Ordering::Relaxed) {
        // Each emulator ignores the other's port.
        outb(QEMU_EXIT_PORT, qemu_code);
        for &byte in b"Shutdown" {
            outb(BOCHS_SHUTDOWN_PORT, byte);
        }
    }
    // Staying up: interrupts stay open, so that IPIs, the lockup detector's
    // ticks and NMIs are still served.
    loop {
        crate::arch::cpu::wait_for_interrupt();
    }
}

/// The run did what it was asked.
pub fn success_stop() -> ! {
    stop(QEMU_EXIT_SUCCESS)
}

/// The crash path finished without a capture kernel to jump to.
pub fn crash_stop() -> ! {
    // No ring drain: the crash path prints only on the emergency console.
    super::wait_transmitter_empty();
    if EXIT_EMULATOR.load(Ordering::Relaxed) {
        outb(QEMU_EXIT_PORT, QEMU_EXIT_CRASH_HANDLED);
        for &byte in b"Shutdown" {
            outb(BOCHS_SHUTDOWN_PORT, byte);
        }
    }
    crate::arch::cpu::halt_forever()
}

/// The run hit a fatal error.
pub fn fail_stop() -> ! {
    stop(QEMU_EXIT_FAILURE)
}
