//! An hv capture image from a hostile boot module: parsing it, placing it
//! in a reservation, copying its segments and writing its PVH boot data
//! must never panic, and what the loader accepts must keep its promises
//! (segments inside the file and the reservation, disjoint, the entry in
//! one of them, the boot data readable back).
#![no_main]

use kexec_loader::PhysRange;
use kexec_loader::boot_params::E820Entry;
use kexec_loader::pvh::{BootDataConfig, PvhImage, write_boot_data};
use libfuzzer_sys::fuzz_target;

const GIB: u64 = 1 << 30;
/// Where the boot data pretends to lie.
const DATA_PHYS: u64 = GIB + 0x0fff_7000;

fuzz_target!(|data: &[u8]| {
    let Ok(image) = PvhImage::parse(data) else {
        return;
    };
    let segments = image.load_segments();
    for (i, segment) in segments.iter().enumerate() {
        assert!(segment.range().end().is_some());
        assert!(segment.file_len as u64 <= segment.mem_len);
        assert_eq!(image.segment_bytes(segment).len(), segment.file_len);
        assert!(
            segments[..i]
                .iter()
                .all(|o| !o.range().overlaps(&segment.range()))
        );
    }
    let entry = PhysRange::new(u64::from(image.entry()), 1);
    assert!(segments.iter().any(|s| s.range().contains(&entry)));

    let reservation = PhysRange::new(GIB, 256 << 20);
    let usable = PhysRange::new(GIB, (256 << 20) - 0x1_0000);
    let Ok(layout) = image.place(usable, 0x2345) else {
        return;
    };
    assert!(usable.contains(&layout.image) && usable.contains(&layout.elfcorehdr));
    for segment in segments.iter().filter(|s| s.mem_len <= 1 << 20) {
        let mut memory = vec![0xAA; segment.mem_len as usize];
        image
            .write_segment(segment, &mut memory)
            .expect("the right length");
    }
    let firmware = [
        E820Entry::new(0, 0x9_f000, 1),
        E820Entry::new(0x10_0000, 0x7ff0_0000, 1),
    ];
    let mut out = vec![0u8; 0x2000];
    let config = BootDataConfig {
        firmware: &firmware,
        reservation,
        elfcorehdr: layout.elfcorehdr,
        rsdp: None,
        cmdline: &"capture_mode=1",
    };
    write_boot_data(&mut out, DATA_PHYS, &config).expect("a placed image gets its boot data");
});
