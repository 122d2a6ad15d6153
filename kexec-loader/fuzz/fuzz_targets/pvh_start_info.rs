//! PVH boot data in loader memory (the start info, its module list, memory
//! map and strings), as QEMU or a hostile loader leaves it: reading it must
//! never panic, and every table it returns must lie in readable memory.
#![no_main]

use hv_abi::pvh::{decode, read_c_string};
use libfuzzer_sys::fuzz_target;

/// Where the fuzzed bytes pretend to lie.
const BASE: u64 = 0x10_0000;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose where in the memory the start info is.
    let Some((offset, memory)) = data.split_first_chunk::<2>() else {
        return;
    };
    let read = |paddr: u64, len: usize| {
        let at = usize::try_from(paddr.checked_sub(BASE)?).ok()?;
        memory.get(at..at.checked_add(len)?)
    };
    let start = BASE + u64::from(u16::from_le_bytes(*offset));
    let Ok(boot) = decode(start, read) else {
        return;
    };
    assert_eq!(boot.memmap.iter().count(), boot.memmap.len());
    assert_eq!(boot.modules.iter().count(), boot.modules.len());
    let _ = read_c_string(boot.start_info.cmdline_paddr, 4096, read);
    for module in boot.modules.iter() {
        if let Ok(line) = read_c_string(module.cmdline_paddr, 4096, read) {
            assert!(!line.contains(&0) && line.len() <= 4096);
        }
    }
});
