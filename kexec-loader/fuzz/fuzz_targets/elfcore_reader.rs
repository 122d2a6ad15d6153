//! A dump file or an ELF core header left in old memory: reading it and
//! converting it to a file header must never panic, and what the converter
//! writes must read back.
#![no_main]

use kexec_loader::elfcore::CoreDump;
use libfuzzer_sys::fuzz_target;

/// Where the fuzzed bytes pretend to lie in old memory.
const HEADER_PHYS: u64 = 0x4040_0000;

fn exercise(dump: &CoreDump<'_>) {
    let notes = dump.notes().count();
    for cpu in dump.cpus() {
        let _ = cpu.cpu_index();
    }
    if let Some(crash) = dump.crash_note() {
        let _ = (
            crash.reason(),
            crash.coordinator(),
            crash.stragglers().count(),
        );
        for cpu in crash.cpus() {
            assert_eq!(cpu.vmclears().count(), cpu.vmclear_count());
        }
    }
    for segment in dump.load_segments() {
        let _ = dump.segment_data(&segment);
    }
    if let Some(image) = dump.image_notes() {
        for (mapping, name) in image.files.entries() {
            let _ = (mapping.start, mapping.end, mapping.file_offset, name.len());
        }
    }
    let mut out = vec![0u8; 1 << 16];
    if let Ok(layout) = dump.write_file_header(&mut out) {
        let reread = CoreDump::parse(&out[..layout.len]).expect("our own file header parses");
        assert_eq!(reread.notes().count(), notes);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(dump) = CoreDump::parse(data) {
        exercise(&dump);
    }
    if let Ok(dump) = CoreDump::parse_elfcorehdr(data, HEADER_PHYS) {
        exercise(&dump);
    }
});
