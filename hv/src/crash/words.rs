//! Where the coordinator's words go once the NMIs are out.
//!
//! A crash report for hundreds of CPUs is kilobytes of text: on a
//! 115200-baud UART that is hundreds of milliseconds (under QEMU about
//! 25 ms at 64 CPUs) between the shootdown and the capture kernel, while
//! the machine's state waits. With an hv capture image loaded, the words
//! go into the crash words mailbox instead (`kexec_loader::purgatory::abi::
//! mailbox`, at the end of the core header region: crash-time memory,
//! never digested), and the capture image prints them as it starts; the
//! purgatory prints them if it refuses, and [`flush`] here if the
//! hand-over does. A Linux capture kernel does not know the mailbox, so
//! with one (or none) the words go straight to the UART.
//!
//! Only the coordinator writes, and only after the NMIs are out. No lock:
//! the mailbox's length is stored after the bytes it covers, and a text
//! that would overflow it flushes what is there and goes on to the UART,
//! so every line still comes out whole and in order.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use hv_core::json::{self, Object};
use kexec_loader::purgatory::abi::mailbox;

use crate::console::EmergencyConsole;
use crate::mm::phys;

/// The mailbox's physical address; 0: words go to the UART.
static MAILBOX: AtomicU64 = AtomicU64::new(0);
/// Bytes of text in the mailbox.
static USED: AtomicUsize = AtomicUsize::new(0);
/// Set by [`flush`]: from then on, straight to the UART.
static FLUSHED: AtomicBool = AtomicBool::new(false);
/// Where in the text the summary goes, when the coordinator left it for
/// the capture image (`crash::facts`); `usize::MAX`: it did not.
static SUMMARY_AT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Sends the crash path's words to the mailbox at `address` (boot time,
/// by the capture layer, for a capture image that prints it).
pub fn arm(address: u64) {
    MAILBOX.store(address, Ordering::Release);
}

/// Whether the words are held for the capture kernel.
pub fn deferred() -> bool {
    MAILBOX.load(Ordering::Acquire) != 0 && !FLUSHED.load(Ordering::Acquire)
}

/// Bytes of text in the mailbox so far.
pub fn used() -> usize {
    USED.load(Ordering::Relaxed)
}

/// Whether the summary is left for the capture image to format, here,
/// after the text so far: only when the words go to its mailbox and hv's
/// own digest check is on (a purgatory refusal prints the mailbox's text
/// but cannot format a summary; with hv's check on, the purgatory refuses
/// only what changed in the microseconds between the two checks).
pub fn defer_summary() -> bool {
    let defer = deferred() && super::purgatory::hv_check_on();
    if defer {
        SUMMARY_AT.store(used(), Ordering::Relaxed);
    }
    defer
}

/// Whether the summary was left for the capture image (and the mailbox
/// not flushed since): the hand-over's lines may then be left too.
pub fn summary_deferred() -> bool {
    SUMMARY_AT.load(Ordering::Relaxed) != usize::MAX && deferred()
}

/// The crash path's writer: the mailbox, or the UART.
pub struct Words;

impl Write for Words {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if !deferred() {
            return Write::write_str(&mut EmergencyConsole, text);
        }
        let address = MAILBOX.load(Ordering::Acquire);
        let used = USED.load(Ordering::Relaxed);
        if used + text.len() > mailbox::MAX_TEXT {
            flush();
            return Write::write_str(&mut EmergencyConsole, text);
        }
        // The mailbox lies in the core header region, crash-time memory in
        // the reservation that only the coordinator writes.
        if used == 0 {
            phys::write(address, &mailbox::MAGIC.to_le_bytes());
        }
        phys::write(
            address + (mailbox::TEXT_OFFSET + used) as u64,
            text.as_bytes(),
        );
        let used = used + text.len();
        phys::write(
            address + mailbox::LEN_OFFSET as u64,
            &(used as u64).to_le_bytes(),
        );
        USED.store(used, Ordering::Relaxed);
        Ok(())
    }
}

/// One `@hv` report line (see `console::report`) into [`Words`].
pub fn report<F>(fields: F)
where
    F: FnOnce(&mut Object<'_, Words>) -> fmt::Result,
{
    let _ = json::report_line(&mut Words, fields);
}

/// Prints what the mailbox holds and sends every later word straight to
/// the UART: the hand-over will not reach a capture image that prints it.
pub fn flush() {
    if FLUSHED.swap(true, Ordering::AcqRel) {
        return;
    }
    let address = MAILBOX.load(Ordering::Acquire);
    let used = USED.load(Ordering::Relaxed);
    let summary_at = SUMMARY_AT.swap(usize::MAX, Ordering::Relaxed);
    if address == 0 || (used == 0 && summary_at == usize::MAX) {
        return;
    }
    let text = phys::read(address + mailbox::TEXT_OFFSET as u64, used as u64);
    match summary_at {
        // The summary left for the capture image goes where it was due.
        at if at <= text.len() => {
            crate::console::uart_write(&text[..at]);
            super::facts::write_summary(&mut EmergencyConsole);
            crate::console::uart_write(&text[at..]);
        }
        _ => crate::console::uart_write(text),
    }
    // Said: a capture kernel reached later must not say it again.
    phys::write(address + mailbox::LEN_OFFSET as u64, &0u64.to_le_bytes());
}
