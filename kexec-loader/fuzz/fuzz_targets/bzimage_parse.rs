//! A bzImage from a hostile boot module: parsing, placing it in a
//! reservation and building its command line and zero page must never
//! panic, whatever the bytes.
#![no_main]

use kexec_loader::PhysRange;
use kexec_loader::boot_params::{E820Entry, E820Table, ZeroPageConfig, build_zero_page};
use kexec_loader::bzimage::BzImage;
use kexec_loader::cmdline::write_capture_cmdline;
use kexec_loader::layout::CaptureLayout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(image) = BzImage::parse(data) else {
        return;
    };
    assert_eq!(image.kernel_file_range().end, data.len());
    assert!(image.load_footprint() >= image.kernel_bytes().len() as u64);
    let _ = (image.kernel_version(), image.compression(), image.payload());

    let reservation = PhysRange::new(0x4000_0000, 0x1000_0000);
    let Ok(layout) = CaptureLayout::plan(reservation, &image, 0x10_0000, 0x3000) else {
        return;
    };
    assert!(reservation.contains(&layout.kernel));
    let firmware = [
        E820Entry::new(0, 0x9_f000, 1),
        E820Entry::new(0x10_0000, 0x7ff0_0000, 1),
    ];
    let Ok(e820) = E820Table::for_capture(&firmware, reservation, layout.elfcorehdr) else {
        return;
    };
    let mut cmdline = [0u8; 4096];
    let Ok(cmdline_len) = write_capture_cmdline(
        &mut cmdline,
        "console=ttyS0",
        layout.elfcorehdr,
        image.cmdline_size(),
    ) else {
        return;
    };
    let mut page = [0u8; 4096];
    let config = ZeroPageConfig {
        cmdline_addr: layout.cmdline.start,
        cmdline_len,
        initrd: layout.initrd,
        acpi_rsdp_addr: None,
        e820: &e820,
    };
    build_zero_page(&image, &config, &mut page).expect("a planned layout builds");
});
