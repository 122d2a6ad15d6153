//! The crashed hypervisor's last words: the crash path held them in its
//! mailbox (`crash::words`) rather than wait on the UART before the jump;
//! the capture image prints them first thing, verbatim, so the serial log
//! reads as if they had come out before it.

use core::fmt::Write;

use crash::summary::{self, Facts, FactsError};
use kexec_loader::purgatory::check::{Memory, mailbox_text};

use crate::console::EmergencyConsole;

use crate::mm::phys;

/// Old memory the capture image reads: its identity map covers 4 GiB.
const READABLE_END: u64 = 4 << 30;

struct OldMemory;

impl Memory for OldMemory {
    fn bytes(&self, start: u64, len: u64) -> Option<&[u8]> {
        let end = start.checked_add(len)?;
        // The mailbox lies in the core header region, which the memory
        // map keeps reserved: nothing here allocated or wrote it.
        (start != 0 && end <= READABLE_END).then(|| phys::read(start, len))
    }
}

/// Prints the mailbox at `address`, if it holds anything, with the crash
/// summary formatted from the facts at `facts` where the crash path left
/// it (`crash::facts`). Returns the bytes of the mailbox printed.
pub fn print(address: Option<u64>, facts: Option<u64>) -> usize {
    let Some(text) = address.and_then(|address| mailbox_text(address, &OldMemory)) else {
        return 0;
    };
    crate::console::uart_write(
        b"capture: the crashed hypervisor's words, held in memory during the crash:\n",
    );
    let block = facts.and_then(|facts| OldMemory.bytes(facts, (summary::MAX_WORDS * 8) as u64));
    match block.map(Facts::parse) {
        Some(Ok(facts)) if facts.scalars().deferred => {
            let at = (facts.scalars().text_at as usize).min(text.len());
            crate::console::uart_write(&text[..at]);
            let _ = summary::render(&facts, &mut EmergencyConsole);
            crate::console::uart_write(&text[at..]);
            // The hand-over's lines, last before the jump.
            if let Some(handover) = facts.handover() {
                let _ = summary::render_handover(&handover, None, &mut EmergencyConsole);
            }
        }
        Some(Err(error)) if error != FactsError::NoMagic => {
            crate::console::uart_write(text);
            let _ = writeln!(
                EmergencyConsole,
                "capture: the crash summary's facts at {:#x} are damaged ({error}); no summary",
                facts.unwrap_or(0)
            );
        }
        // None gathered (the coordinator stopped before its summary), or
        // it printed the summary itself.
        _ => crate::console::uart_write(text),
    }
    text.len()
}
