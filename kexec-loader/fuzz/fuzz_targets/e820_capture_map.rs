//! A firmware memory map as a boot loader hands it over (unsorted,
//! overlapping, wrapping): building the capture kernel's map must never
//! panic, and a map it builds is sorted with no empty entries.
#![no_main]

use kexec_loader::PhysRange;
use kexec_loader::boot_params::{E820Entry, E820Table};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let word = |chunk: &[u8], at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&chunk[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let Some((head, entries)) = data.split_at_checked(32) else {
        return;
    };
    let reservation = PhysRange::new(word(head, 0), word(head, 8));
    let elfcorehdr = PhysRange::new(word(head, 16), word(head, 24));
    let firmware: Vec<E820Entry> = entries
        .chunks_exact(20)
        .map(|e| {
            let kind = u32::from_le_bytes([e[16], e[17], e[18], e[19]]);
            E820Entry::new(word(e, 0), word(e, 8), kind)
        })
        .collect();
    if let Ok(table) = E820Table::for_capture(&firmware, reservation, elfcorehdr) {
        let entries = table.entries();
        assert!(entries.windows(2).all(|w| w[0].addr <= w[1].addr));
        assert!(entries.iter().all(|e| e.size > 0));
    }
});
