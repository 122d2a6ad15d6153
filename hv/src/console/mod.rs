//! The serial console (COM1), the `log` backend, the run report's
//! `@hv {...}` lines ([`report`]) and how a run ends ([`finish`]).
//!
//! Two ways out:
//! - [`EmergencyConsole`] writes straight to the UART and takes no lock, so
//!   any context (an NMI handler, the crash path, a CPU that interrupted the
//!   console's owner) can always print. Lines from several CPUs may mix.
//! - Everything else goes through [`LOG_RING`], a lock-free ring that any
//!   context may push to, drained to the UART by whichever CPU wins the
//!   ring's drain flag. Nobody ever waits for another CPU to print.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};

use hv_core::logring::{LogRing, Record};

use crate::arch::cpu_local::current_index;
use crate::arch::port::{inb, outb};

pub mod finish;
pub mod report;

const COM1: u16 = 0x3F8;
const LINE_STATUS: u16 = COM1 + 5;
const TRANSMIT_EMPTY: u8 = 0x20;

/// Messages a line each; a report line must fit one slot: the `cpus` line
/// at 512 CPUs (APIC IDs and online times) is over 8 KiB (cut at 4 KiB and
/// at 8 KiB before slots had 16 KiB). 2 MiB of `.bss` in all.
///
/// The capture image (`hv_capture_build`, built to run inside the crash
/// reservation) keeps 16 slots: it logs a few dozen lines, and its entry
/// zeroes `.bss` on the way from the crash to the dump (2 MiB of it took
/// about 2 ms under QEMU's TCG, `cargo xtask bench crash`).
const RING_SLOTS: usize = if cfg!(hv_capture_build) { 16 } else { 128 };
pub const RING_SLOT_BYTES: usize = 16384;

/// Log messages waiting for the UART.
pub static LOG_RING: LogRing<RING_SLOTS, RING_SLOT_BYTES> = LogRing::new();

static MAX_LEVEL: AtomicU8 = AtomicU8::new(log::LevelFilter::Info as u8);

/// Programs COM1 for 115200 8N1 with FIFOs.
pub fn init_serial() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB on
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1, DLAB off
    outb(COM1 + 2, 0xC7); // FIFOs on and cleared
    outb(COM1 + 4, 0x03); // DTR, RTS
}

fn uart_write_byte(byte: u8) {
    // Bounded: a missing or wedged UART must not hang the crash path.
    for _ in 0..100_000 {
        if inb(LINE_STATUS) & TRANSMIT_EMPTY != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(COM1, byte);
}

/// Waits (bounded) until the UART has sent its last bit: an emulator told
/// to shut down right after would otherwise drop the final bytes.
pub fn wait_transmitter_empty() {
    const TRANSMITTER_IDLE: u8 = 0x40;
    for _ in 0..1_000_000 {
        if inb(LINE_STATUS) & TRANSMITTER_IDLE != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// Writes bytes to the UART, turning `\n` into `\r\n`. Takes no lock.
pub fn uart_write(bytes: &[u8]) {
    for &byte in bytes {
        if byte == b'\n' {
            uart_write_byte(b'\r');
        }
        uart_write_byte(byte);
    }
}

/// Set once a crash begins: the ring's output stops (between two bytes) so
/// the crash path's lines reach the UART whole.
static EMERGENCY: AtomicBool = AtomicBool::new(false);

/// Silences the ring's drain for good and gives a drain that is already
/// writing a moment to notice. No lock: a flag and a bounded wait of about
/// two byte times.
pub fn enter_emergency() {
    if !EMERGENCY.swap(true, Ordering::AcqRel) {
        for _ in 0..20_000 {
            core::hint::spin_loop();
        }
    }
}

/// The drain's writer: stops at once when a crash begins.
fn uart_write_unless_crashing(bytes: &[u8]) {
    for &byte in bytes {
        if EMERGENCY.load(Ordering::Relaxed) {
            return;
        }
        if byte == b'\n' {
            uart_write_byte(b'\r');
        }
        uart_write_byte(byte);
    }
}

/// A writer straight to the UART for the crash path. Takes no lock: a line
/// (first write to its `\n`) claims the UART with a compare-and-swap, and a
/// CPU that finds it claimed waits a bounded time, then writes anyway. So
/// lines of CPUs crashing at once come out whole, and a claimant that an NMI
/// interrupted (or that died) delays the others a little, never forever.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmergencyConsole;

const NO_OWNER: u32 = u32::MAX;
static LINE_OWNER: AtomicU32 = AtomicU32::new(NO_OWNER);
/// How long a line waits for another CPU's line (a few ms on hardware).
const CLAIM_SPINS: u32 = 2_000_000;

fn claim_line(me: u32) {
    for _ in 0..CLAIM_SPINS {
        match LINE_OWNER.compare_exchange(NO_OWNER, me, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => return,
            Err(owner) if owner == me => return,
            Err(_) => core::hint::spin_loop(),
        }
    }
    // The owner did not finish its line in time: it may be parked for good
    // (an NMI took it mid-line). Take the line over, so that this CPU waits
    // once, not once per write.
    LINE_OWNER.store(me, Ordering::Relaxed);
}

fn release_line(me: u32) {
    let _ = LINE_OWNER.compare_exchange(me, NO_OWNER, Ordering::Release, Ordering::Relaxed);
}

impl Write for EmergencyConsole {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let me = current_index();
        claim_line(me);
        uart_write(text.as_bytes());
        if text.ends_with('\n') {
            release_line(me);
        }
        Ok(())
    }
}

/// Sends whatever the ring holds to the UART, unless another CPU already is.
pub fn drain() {
    LOG_RING.drain(|record| match record {
        Record::Message {
            bytes, truncated, ..
        } => {
            uart_write_unless_crashing(bytes);
            if truncated {
                uart_write_unless_crashing(b" [truncated]\n");
            }
        }
        Record::Dropped(count) => {
            let _ = writeln!(
                EmergencyConsole,
                "[{count} log messages dropped: ring full]"
            );
        }
    });
}

/// Drains what the ring holds, unless another CPU is draining; returns
/// whether everything written so far is out.
pub fn drain_all() -> bool {
    drain();
    LOG_RING.pending() == 0
}

/// Pushes one line into the ring and drains it.
pub fn print_line(args: fmt::Arguments<'_>) {
    LOG_RING.write_fmt(format_args!("{args}\n"));
    drain();
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            print_line(format_args!(
                "[{:>5} cpu{}] {}",
                record.level(),
                current_index(),
                record.args()
            ));
        }
    }

    fn flush(&self) {
        drain();
    }
}

static LOGGER: Logger = Logger;

/// Installs the `log` backend at the given level.
pub fn init_logging(level: log::LevelFilter) {
    set_level(level);
    // A second call keeps the first logger, which is this same one.
    let _ = log::set_logger(&LOGGER);
}

/// Changes the log level (from the command line).
pub fn set_level(level: log::LevelFilter) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
    log::set_max_level(level);
}

/// Prints a line through the ring, like `println!`.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*)) };
}
