//! The hypervisor's crash note as `cargo xtask dump` reads it from a dump:
//! parsing must never panic and every ledger range must stay in the table.
#![no_main]

use kexec_loader::crash_note::CrashNote;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(note) = CrashNote::parse(data) else {
        return;
    };
    let _ = (note.reason(), note.coordinator(), note.stragglers().count());
    for cpu in note.cpus() {
        assert_eq!(cpu.vmclears().count(), cpu.vmclear_count());
    }
});
