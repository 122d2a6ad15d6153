//! The crashed hypervisor's last words: the crash path held them in its
//! mailbox (`crash::words`) rather than wait on the UART before the jump;
//! the capture image prints them first thing, verbatim, so the serial log
//! reads as if they had come out before it.

use kexec_loader::purgatory::check::{Memory, mailbox_text};

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

/// Prints the mailbox at `address`, if it holds anything. Returns the
/// bytes printed.
pub fn print(address: Option<u64>) -> usize {
    let Some(text) = address.and_then(|address| mailbox_text(address, &OldMemory)) else {
        return 0;
    };
    crate::console::uart_write(
        b"capture: the crashed hypervisor's words, held in memory during the crash:\n",
    );
    crate::console::uart_write(text);
    text.len()
}
