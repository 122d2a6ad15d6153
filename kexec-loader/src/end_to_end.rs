//! The whole boot-time and crash-time flow against a fake physical memory,
//! the way the hypervisor uses this crate: load, digest, write the core
//! header at crash time, verify, and refuse to jump after a corruption.

use crate::boot_params::{
    E820_ACPI, E820_RAM, E820_RESERVED, E820Entry, E820Table, ZERO_PAGE_SIZE, ZeroPageConfig,
    build_zero_page, zp,
};
use crate::bytes::{u32_at, u64_at};
use crate::bzimage::{BzImage, hdr};
use crate::cmdline::write_capture_cmdline;
use crate::crash_note::{self, CrashNote, CrashRecord};
use crate::digest::{DigestTable, VerifyError};
use crate::elfcore::{
    self, CoreDump, CpuRegisters, CpuState, MemorySegment, Placement, write_core_header,
};
use crate::layout::CaptureLayout;
use crate::testutil::FakeBzImage;
use crate::{Error, PhysRange};

const MIB: u64 = 1 << 20;
const RESERVATION: PhysRange = PhysRange::new(64 * MIB, 32 * MIB);
/// Sizing limits the hypervisor would pick at boot.
const MAX_CPUS: usize = 8;
const MAX_SEGMENTS: usize = 4;
const MAX_REASON: usize = 256;
const MAX_VMCLEARS: usize = 64;

/// The reservation's bytes, addressed physically.
struct Reservation(Vec<u8>);

impl Reservation {
    fn new() -> Self {
        Self(vec![0; RESERVATION.len as usize])
    }

    fn range_mut(&mut self, range: PhysRange) -> &mut [u8] {
        let start = (range.start - RESERVATION.start) as usize;
        &mut self.0[start..start + range.len as usize]
    }

    fn read(&self, start: u64, len: usize) -> Option<&[u8]> {
        let offset = usize::try_from(start.checked_sub(RESERVATION.start)?).ok()?;
        self.0.get(offset..offset.checked_add(len)?)
    }
}

struct Loaded {
    memory: Reservation,
    layout: CaptureLayout,
    digests: DigestTable<8>,
}

/// Boot time: everything but the core header, then the digests.
fn load(image_bytes: &[u8], initrd: &[u8]) -> Result<Loaded, Error> {
    let image = BzImage::parse(image_bytes)?;
    let crash_desc = crash_note::desc_len_for(MAX_REASON, MAX_CPUS, MAX_CPUS, MAX_VMCLEARS)
        .expect("small limits");
    let header_len = elfcore::core_header_len(MAX_CPUS, MAX_SEGMENTS, crash_desc, None).unwrap();
    let layout = CaptureLayout::plan(RESERVATION, &image, initrd.len() as u64, header_len as u64)?;
    let mut memory = Reservation::new();
    memory
        .range_mut(PhysRange::new(
            layout.kernel.start,
            image.kernel_bytes().len() as u64,
        ))
        .copy_from_slice(image.kernel_bytes());
    if let Some(range) = layout.initrd {
        memory.range_mut(range).copy_from_slice(initrd);
    }
    let cmdline_len = write_capture_cmdline(
        memory.range_mut(layout.cmdline),
        "console=ttyS0 nr_cpus=1",
        layout.elfcorehdr,
        image.cmdline_size(),
    )?;
    let firmware = [
        E820Entry::new(0, 0x9_fc00, E820_RAM),
        E820Entry::new(0xf_0000, 0x1_0000, E820_RESERVED),
        E820Entry::new(MIB, 1024 * MIB, E820_RAM),
        E820Entry::new(1025 * MIB, MIB, E820_ACPI),
    ];
    let e820 = E820Table::for_capture(&firmware, RESERVATION, layout.elfcorehdr)?;
    let config = ZeroPageConfig {
        cmdline_addr: layout.cmdline.start,
        cmdline_len,
        initrd: layout.initrd,
        acpi_rsdp_addr: Some(0xf_5a40),
        e820: &e820,
    };
    build_zero_page(&image, &config, memory.range_mut(layout.zero_page))?;

    let mut digests = DigestTable::excluding(layout.elfcorehdr);
    let kernel = PhysRange::new(layout.kernel.start, image.kernel_bytes().len() as u64);
    let cmdline = PhysRange::new(layout.cmdline.start, cmdline_len as u64 + 1);
    let zero_page = PhysRange::new(layout.zero_page.start, ZERO_PAGE_SIZE as u64);
    for range in [Some(kernel), Some(zero_page), Some(cmdline), layout.initrd]
        .into_iter()
        .flatten()
    {
        let bytes = memory
            .read(range.start, range.len as usize)
            .unwrap()
            .to_vec();
        digests.record(range.start, &bytes)?;
    }
    Ok(Loaded {
        memory,
        layout,
        digests,
    })
}

/// Crash time: write the core header, then verify before the jump.
fn crash(loaded: &mut Loaded) -> Result<u64, Error> {
    let cpus = [CpuState {
        cpu_index: 0,
        regs: CpuRegisters {
            rip: 0xffff_8000_0012_3456,
            ..CpuRegisters::default()
        },
    }];
    let record = CrashRecord {
        reason: "panicked at hv/src/main.rs:1:1: end to end",
        coordinator: 0,
        stragglers: &[],
        cpus: &[],
    };
    let segments = [MemorySegment {
        phys: MIB,
        virt: MIB,
        len: RESERVATION.start - MIB,
    }];
    let header_phys = loaded.layout.elfcorehdr.start;
    write_core_header(
        loaded.memory.range_mut(loaded.layout.elfcorehdr),
        &cpus,
        &record,
        &segments,
        None,
        Placement::OldMemory { header_phys },
    )?;
    loaded
        .digests
        .verify(|start, len| loaded.memory.read(start, len))?;
    Ok(loaded.layout.entry)
}

fn image_and_initrd() -> (Vec<u8>, Vec<u8>) {
    let initrd = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    (FakeBzImage::default().build(), initrd)
}

#[test]
fn an_untouched_capture_kernel_is_jumped_to() {
    let (image, initrd) = image_and_initrd();
    let mut loaded = load(&image, &initrd).unwrap();
    let entry = crash(&mut loaded).unwrap();
    assert_eq!(entry, loaded.layout.kernel.start + 0x200);

    // What the capture kernel finds: the zero page points at the command
    // line, which points at a core header that Linux's checks accept.
    let memory = &loaded.memory;
    let page = memory
        .read(loaded.layout.zero_page.start, ZERO_PAGE_SIZE)
        .unwrap();
    let cmdline_ptr = u64::from(u32_at(page, hdr::CMD_LINE_PTR).unwrap())
        | u64::from(u32_at(page, zp::EXT_CMD_LINE_PTR).unwrap()) << 32;
    assert_eq!(cmdline_ptr, loaded.layout.cmdline.start);
    assert_eq!(u64_at(page, zp::ACPI_RSDP_ADDR), Some(0xf_5a40));
    let cmdline = memory.read(cmdline_ptr, 256).unwrap();
    let cmdline =
        core::str::from_utf8(&cmdline[..cmdline.iter().position(|&b| b == 0).unwrap()]).unwrap();
    let hdr_addr = loaded.layout.elfcorehdr.start;
    assert!(
        cmdline.contains(&format!("elfcorehdr={hdr_addr:#x} ")),
        "{cmdline}"
    );
    let header = memory
        .read(hdr_addr, loaded.layout.elfcorehdr.len as usize)
        .unwrap();
    let dump = CoreDump::parse_elfcorehdr(header, hdr_addr).unwrap();
    assert_eq!(dump.cpus().next().unwrap().regs.rip, 0xffff_8000_0012_3456);
    let note: CrashNote<'_> = dump.crash_note().unwrap();
    assert_eq!(note.reason(), "panicked at hv/src/main.rs:1:1: end to end");
}

#[test]
fn a_corrupted_capture_kernel_is_not_jumped_to() {
    let (image, initrd) = image_and_initrd();
    for (what, index) in [
        ("kernel", 0),
        ("zero page", 1),
        ("command line", 2),
        ("initrd", 3),
    ] {
        let mut loaded = load(&image, &initrd).unwrap();
        let victim = loaded.digests.entries()[index].range;
        loaded
            .memory
            .range_mut(PhysRange::new(victim.start + victim.len / 2, 1))[0] ^= 0x80;
        assert_eq!(
            crash(&mut loaded).unwrap_err(),
            Error::Verify(VerifyError::Mismatch {
                index,
                range: victim
            }),
            "{what}"
        );
    }
}

#[test]
fn a_malformed_capture_kernel_is_a_clear_boot_time_error() {
    let (mut image, initrd) = image_and_initrd();
    image[hdr::RELOCATABLE_KERNEL] = 0;
    let error = load(&image, &initrd).err().unwrap();
    assert_eq!(
        error.to_string(),
        "capture kernel image: not a relocatable kernel"
    );
}
