//! Loading the capture kernel at boot: it is parsed and copied into the
//! `crashkernel=` reservation with everything its entry needs (zero page,
//! command line, initrd, or the PVH start info for the hv image in capture
//! mode) and the purgatory. Every loaded piece is SHA-256-digested, and the
//! plan is left to the crash path (`crash::handover`), which at crash time
//! only writes the ELF core header (the one part left out of the digests),
//! checks the digests and jumps.

use core::fmt::Write;

use hv_abi::bytes::{u16_at, u32_at, u64_at};
use hv_abi::e820::{E820_RAM, E820_RESERVED};
use hv_core::cmdline::CaptureCorrupt;
use hv_core::memmap::RegionKind;
use kexec_loader::PhysRange;
use kexec_loader::boot_params::{E820Entry, E820Table, ZeroPageConfig, build_zero_page};
use kexec_loader::bzimage::BzImage;
use kexec_loader::crash_note::desc_len_for;
use kexec_loader::digest::DigestTable;
use kexec_loader::elfcore::{MemorySegment, core_header_len};
use kexec_loader::layout::CaptureLayout;
use kexec_loader::purgatory::SealedTable;

use crate::boot::info::{BootInfo, Module, Protocol};
use crate::crash::handover::{self, Kind, MAX_REASON, MAX_SEGMENTS, Plan};
use crate::crash::purgatory::{self, Entry};
use crate::crash::records::MAX_VMCS;
use crate::mm::{CRASH_RESERVATION, FIRMWARE_MAP, phys};

/// Command line given to a Linux capture kernel whose module line has none.
const DEFAULT_LINUX_ARGS: &str = "console=ttyS0,115200 nr_cpus=1 reset_devices";

/// Why no capture kernel could be loaded.
#[derive(Debug)]
enum LoadError {
    NoReservation,
    NoModule,
    UnknownFormat,
    Linux(kexec_loader::Error),
    Elf(&'static str),
    OutOfMemory,
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoReservation => f.write_str("no crashkernel= reservation"),
            Self::NoModule => f.write_str(
                "no capture kernel module (a module whose command line starts with 'capture')",
            ),
            Self::UnknownFormat => {
                f.write_str("the capture module is neither a bzImage nor an ELF image")
            }
            Self::Linux(error) => write!(f, "bzImage rejected: {error}"),
            Self::Elf(reason) => write!(f, "capture ELF rejected: {reason}"),
            Self::OutOfMemory => f.write_str("no memory for the crash-time buffers"),
        }
    }
}

impl<E: Into<kexec_loader::Error>> From<E> for LoadError {
    fn from(error: E) -> Self {
        Self::Linux(error.into())
    }
}

/// The first word of a module's command line.
fn tag(module: &Module) -> &str {
    module.cmdline.split_ascii_whitespace().next().unwrap_or("")
}

/// Loads the capture kernel at boot. Errors are reported and disable
/// capture; the hypervisor runs on.
pub fn load_at_boot(boot: &BootInfo, options: &hv_core::cmdline::Options) {
    let corrupt = options.capture_corrupt;
    let wanted = boot.modules().next().is_some() || CRASH_RESERVATION.get().is_some();
    if !wanted {
        return;
    }
    match load(boot, options) {
        Ok(mut plan) => {
            log::info!(
                "capture: {} capture kernel loaded; {} segments digested; ELF core header at {}",
                plan.kind.name(),
                plan.digests.entries().len(),
                plan.elfcorehdr
            );
            crate::console::report::line(|o| {
                o.field("capture").object(|o| {
                    o.field("loaded").bool(true)?;
                    o.field("kernel").str(plan.kind.name())?;
                    o.field("elfcorehdr").u64(plan.elfcorehdr.start)?;
                    o.field("digested_segments")
                        .u64(plan.digests.entries().len() as u64)
                })
            });
            match corrupt {
                CaptureCorrupt::Nothing => {}
                CaptureCorrupt::Image => corrupt_loaded_image(&plan),
                CaptureCorrupt::Table => {
                    corrupt_loaded_image(&plan);
                    plan.digests.zero();
                    log::warn!("capture: test knob: zeroed the hypervisor's digest table");
                }
            }
            handover::install(plan);
        }
        Err(error) => {
            log::error!("capture: {error}; crash capture disabled");
            crate::console::report::line(|o| {
                o.field("capture").object(|o| {
                    o.field("loaded").bool(false)?;
                    o.field("error").display(&error)
                })
            });
        }
    }
}

/// Test knob: flips a byte of the first digested segment.
fn corrupt_loaded_image(plan: &Plan) {
    if let Some(first) = plan.digests.entries().first() {
        let address = first.range.start + first.range.len / 2;
        // The address lies inside the reservation, which only the capture
        // kernel's loaded bytes occupy; this damages them on purpose.
        let byte = phys::read(address, 1)[0];
        phys::write(address, &[byte ^ 0xFF]);
        log::warn!(
            "capture: test knob: flipped the byte at {address:#x} after its digest was taken"
        );
    }
}

/// A boot module's bytes: loader memory the frame allocator leaves out,
/// never written.
fn module_bytes(module: &Module) -> &'static [u8] {
    phys::read(module.start, module.len)
}

/// Copies `bytes` into `range` of the reservation (which the layout keeps
/// disjoint from every other piece) and zeroes the rest of it.
fn place(range: PhysRange, bytes: &[u8]) {
    phys::write(range.start, bytes);
    phys::fill(
        range.start + bytes.len() as u64,
        range.len - bytes.len() as u64,
        0,
    );
}

/// RAM outside the reservation, in the firmware map's order (sorted,
/// disjoint): what the dump describes.
fn dump_segments(reservation: PhysRange) -> ([MemorySegment; MAX_SEGMENTS], usize) {
    let mut segments = [MemorySegment {
        phys: 0,
        virt: 0,
        len: 0,
    }; MAX_SEGMENTS];
    let mut count = 0;
    let mut push = |start: u64, end: u64| {
        if end > start && count < MAX_SEGMENTS {
            // Identity-mapped: the hypervisor's virtual address is physical.
            segments[count] = MemorySegment {
                phys: start,
                virt: start,
                len: end - start,
            };
            count += 1;
        }
    };
    let reserved_end = reservation.start + reservation.len;
    for region in FIRMWARE_MAP.get().into_iter().flat_map(|map| map.usable()) {
        push(region.start, region.end().min(reservation.start));
        push(region.start.max(reserved_end), region.end());
    }
    (segments, count)
}

fn load(boot: &BootInfo, options: &hv_core::cmdline::Options) -> Result<Plan, LoadError> {
    let &(start, len) = CRASH_RESERVATION.get().ok_or(LoadError::NoReservation)?;
    let reservation = PhysRange::new(start, len);
    let modules = || boot.modules();
    let kernel = modules()
        .find(|module| tag(module) == "capture")
        .or_else(|| {
            if boot.protocol == Protocol::Pvh {
                modules().next()
            } else {
                None
            }
        })
        .ok_or(LoadError::NoModule)?;
    let initrd = modules().find(|module| tag(module) == "capture-initrd");
    let image = module_bytes(kernel);
    let purgatory_area = reservation.start + reservation.len - purgatory::AREA_BYTES;
    let usable = PhysRange::new(reservation.start, reservation.len - purgatory::AREA_BYTES);
    let (segments, segment_count) = dump_segments(reservation);
    let cpus = crate::cpu::smp::cpus().len().max(1);
    let desc_len = desc_len_for(MAX_REASON, cpus, cpus, MAX_VMCS).ok_or(LoadError::OutOfMemory)?;
    let header_len =
        core_header_len(cpus, segment_count, desc_len).ok_or(LoadError::OutOfMemory)? as u64;

    if !handover::alloc_scratch() {
        return Err(LoadError::OutOfMemory);
    }
    let is_bzimage = image.get(0x202..0x206) == Some(b"HdrS");
    let is_elf = image.get(..4) == Some(b"\x7fELF");
    let (kind, elfcorehdr, entry, mut digests) = if is_bzimage {
        let (elfcorehdr, entry, digests) =
            load_linux(boot, kernel, image, initrd, usable, reservation, header_len)?;
        (Kind::Linux, elfcorehdr, entry, digests)
    } else if is_elf {
        let (elfcorehdr, entry, digests) = load_hv(
            boot,
            image,
            usable,
            reservation,
            purgatory_area,
            header_len,
            options,
        )?;
        (Kind::Hv, elfcorehdr, entry, digests)
    } else {
        return Err(LoadError::UnknownFormat);
    };
    // The purgatory area is the reservation's last 64 KiB, which neither
    // layout above uses; it gets its own copy of the digests so far.
    let purgatory_bytes = purgatory::install(
        purgatory_area,
        entry,
        digests.entries(),
        purgatory::InstallOptions {
            exit_emulator: options.finish == hv_core::cmdline::Finish::Exit,
            self_nmi: options.capture_purgatory_nmi,
            hv_check: options.capture_hv_check,
        },
    )?;
    digests.record(purgatory_area, purgatory_bytes)?;
    Ok(Plan {
        kind,
        elfcorehdr,
        purgatory: purgatory_area,
        digests: SealedTable::seal(digests),
        segments,
        segment_count,
    })
}

type Loaded = (PhysRange, Entry, DigestTable<16>);

fn load_linux(
    boot: &BootInfo,
    kernel: &Module,
    image: &'static [u8],
    initrd: Option<&Module>,
    usable: PhysRange,
    reservation: PhysRange,
    header_len: u64,
) -> Result<Loaded, LoadError> {
    let bz = BzImage::parse(image)?;
    let initrd_bytes = initrd.map(module_bytes);
    let layout = CaptureLayout::plan(
        usable,
        &bz,
        initrd_bytes.map_or(0, |bytes| bytes.len() as u64),
        header_len,
    )?;
    // The layout places each piece (this one and those below) inside the
    // reservation, disjoint from the others; nothing else uses it.
    phys::write(layout.kernel.start, bz.kernel_bytes());
    if let (Some(range), Some(bytes)) = (layout.initrd, initrd_bytes) {
        place(range, bytes);
    }
    let args = kernel
        .cmdline
        .trim_start()
        .strip_prefix("capture")
        .map(str::trim)
        .filter(|args| !args.is_empty());
    let cmdline_len = phys::with_bytes_mut(layout.cmdline.start, layout.cmdline.len, |out| {
        kexec_loader::cmdline::write_capture_cmdline(
            out,
            args.unwrap_or(DEFAULT_LINUX_ARGS),
            layout.elfcorehdr,
            bz.cmdline_size(),
        )
    })?;
    let mut firmware = [E820Entry {
        addr: 0,
        size: 0,
        kind: 0,
    }; 128];
    let mut count = 0;
    for region in FIRMWARE_MAP
        .get()
        .into_iter()
        .flat_map(|map| map.regions())
        .take(firmware.len())
    {
        let kind = region.kind.e820_for_handover();
        firmware[count] = E820Entry {
            addr: region.start,
            size: region.len,
            kind,
        };
        count += 1;
    }
    let e820 = E820Table::for_capture(&firmware[..count], reservation, layout.elfcorehdr)?;
    let config = ZeroPageConfig {
        cmdline_addr: layout.cmdline.start,
        cmdline_len,
        initrd: layout.initrd,
        acpi_rsdp_addr: boot.rsdp,
        e820: &e820,
    };
    phys::with_bytes_mut(layout.zero_page.start, layout.zero_page.len, |out| {
        build_zero_page(&bz, &config, out)
    })?;

    let mut digests = DigestTable::excluding(layout.elfcorehdr);
    // Inside the reservation, just written.
    let read = |range: PhysRange| phys::read(range.start, range.len);
    digests.record(
        layout.kernel.start,
        read(PhysRange::new(
            layout.kernel.start,
            bz.kernel_bytes().len() as u64,
        )),
    )?;
    digests.record(layout.zero_page.start, read(layout.zero_page))?;
    digests.record(
        layout.cmdline.start,
        read(PhysRange::new(layout.cmdline.start, cmdline_len as u64 + 1)),
    )?;
    if let (Some(range), Some(bytes)) = (layout.initrd, initrd_bytes) {
        digests.record(
            range.start,
            read(PhysRange::new(range.start, bytes.len() as u64)),
        )?;
    }
    let entry = Entry::Linux64 {
        entry: layout.entry,
        zero_page: layout.zero_page.start,
    };
    Ok((layout.elfcorehdr, entry, digests))
}

/// Loads the hv image (built with `HV_LINK_BASE` inside the reservation)
/// and the PVH start info it boots from.
fn load_hv(
    boot: &BootInfo,
    image: &'static [u8],
    usable: PhysRange,
    reservation: PhysRange,
    purgatory_area: u64,
    header_len: u64,
    options: &hv_core::cmdline::Options,
) -> Result<Loaded, LoadError> {
    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const ELF_BAD: &str = "truncated or malformed ELF64 header";
    if image.get(4) != Some(&2) || image.get(5) != Some(&1) || u16_at(image, 18) != Some(62) {
        return Err(LoadError::Elf("not a little-endian x86_64 ELF64 image"));
    }
    let phoff = u64_at(image, 32).ok_or(LoadError::Elf(ELF_BAD))? as usize;
    let phentsize = u16_at(image, 54).ok_or(LoadError::Elf(ELF_BAD))? as usize;
    let phnum = u16_at(image, 56).ok_or(LoadError::Elf(ELF_BAD))? as usize;
    if phentsize != 56 || phnum == 0 || phnum > 64 {
        return Err(LoadError::Elf("unexpected program header table"));
    }
    let mut loaded_end = usable.start;
    let mut pvh_entry = None;
    let mut loads = [(0u64, 0usize, 0usize, 0u64); 8];
    let mut load_count = 0;
    for index in 0..phnum {
        let at = phoff
            .checked_add(index * phentsize)
            .ok_or(LoadError::Elf(ELF_BAD))?;
        let kind = u32_at(image, at).ok_or(LoadError::Elf(ELF_BAD))?;
        let offset = u64_at(image, at + 8).ok_or(LoadError::Elf(ELF_BAD))? as usize;
        let paddr = u64_at(image, at + 24).ok_or(LoadError::Elf(ELF_BAD))?;
        let filesz = u64_at(image, at + 32).ok_or(LoadError::Elf(ELF_BAD))? as usize;
        let memsz = u64_at(image, at + 40).ok_or(LoadError::Elf(ELF_BAD))?;
        let file = offset
            .checked_add(filesz)
            .filter(|end| *end <= image.len())
            .ok_or(LoadError::Elf("a segment runs past the end of the file"))?;
        match kind {
            PT_LOAD => {
                let end = paddr
                    .checked_add(memsz)
                    .ok_or(LoadError::Elf("a segment wraps"))?;
                if memsz < filesz as u64 || paddr < usable.start || end > usable.start + usable.len
                {
                    return Err(LoadError::Elf(
                        "a segment lies outside the reservation (wrong HV_LINK_BASE or crashkernel=)",
                    ));
                }
                if load_count == loads.len() {
                    return Err(LoadError::Elf("too many loadable segments"));
                }
                loads[load_count] = (paddr, offset, file, memsz);
                load_count += 1;
                loaded_end = loaded_end.max(end);
            }
            PT_NOTE => {
                // XEN_ELFNOTE_PHYS32_ENTRY: name "Xen", type 18, an 8-byte entry.
                let note = &image[offset..file];
                if u32_at(note, 0) == Some(4)
                    && u32_at(note, 8) == Some(18)
                    && note.get(12..16) == Some(b"Xen\0")
                {
                    pvh_entry = u64_at(note, 16).and_then(|entry| u32::try_from(entry).ok());
                }
            }
            _ => {}
        }
    }
    let entry = pvh_entry.ok_or(LoadError::Elf("no PVH entry note"))?;
    let elfcorehdr_start = loaded_end.div_ceil(4096) * 4096;
    let elfcorehdr = PhysRange::new(elfcorehdr_start, header_len.div_ceil(4096) * 4096);
    if elfcorehdr_start + elfcorehdr.len > usable.start + usable.len {
        return Err(LoadError::Elf(
            "the reservation is too small for the image and the core header",
        ));
    }
    let mut digests = DigestTable::excluding(elfcorehdr);
    for &(paddr, offset, file_end, memsz) in &loads[..load_count] {
        // Checked above to lie inside the reservation's usable part.
        place(PhysRange::new(paddr, memsz), &image[offset..file_end]);
        digests.record(paddr, phys::read(paddr, memsz))?;
    }

    // Start info, memory map and command line in the purgatory's data room.
    let data = purgatory_area + purgatory::BOOT_DATA_OFFSET;
    let mut room = [0u8; purgatory::BOOT_DATA_BYTES as usize];
    const START_INFO_LEN: usize = 56;
    const MEMMAP_ENTRY_LEN: usize = 24;
    let memmap_at = START_INFO_LEN;
    let mut entries = 0usize;
    let mut overflow = false;
    let mut add = |room: &mut [u8], addr: u64, end: u64, kind: u32| {
        if end <= addr {
            return;
        }
        let at = memmap_at + entries * MEMMAP_ENTRY_LEN;
        let Some(entry) = room.get_mut(at..at + MEMMAP_ENTRY_LEN) else {
            overflow = true;
            return;
        };
        entry[0..8].copy_from_slice(&addr.to_le_bytes());
        entry[8..16].copy_from_slice(&(end - addr).to_le_bytes());
        entry[16..20].copy_from_slice(&kind.to_le_bytes());
        entries += 1;
    };
    let reserved_end = reservation.start + reservation.len;
    for region in FIRMWARE_MAP.get().into_iter().flat_map(|map| map.regions()) {
        // Old memory is reserved to the capture image: it reads it, never
        // allocates from it. Only the reservation is its RAM.
        let kind = if region.kind == RegionKind::Usable {
            E820_RESERVED
        } else {
            E820_RESERVED.max(region.kind.e820_for_handover())
        };
        add(
            &mut room,
            region.start,
            region.end().min(reservation.start),
            kind,
        );
        add(
            &mut room,
            region.start.max(reserved_end),
            region.end(),
            kind,
        );
    }
    add(&mut room, reservation.start, elfcorehdr.start, E820_RAM);
    add(
        &mut room,
        elfcorehdr.start,
        elfcorehdr.start + elfcorehdr.len,
        E820_RESERVED,
    );
    add(
        &mut room,
        elfcorehdr.start + elfcorehdr.len,
        purgatory_area,
        E820_RAM,
    );
    // The purgatory area stays out of the capture image's allocator: its
    // IDT is loaded at the image's entry, and capture mode reads the
    // purgatory's stamps there.
    add(&mut room, purgatory_area, reserved_end, E820_RESERVED);
    if overflow {
        return Err(LoadError::Elf(
            "the capture image's memory map does not fit its boot data",
        ));
    }
    let cmdline_at = memmap_at + entries * MEMMAP_ENTRY_LEN;
    let mut cmdline = [0u8; 160];
    let mut writer = FixedWriter {
        buffer: &mut cmdline,
        len: 0,
    };
    let _ = write!(
        writer,
        "capture_mode={:#x} capture_purgatory={:#x} capture_sink={} max_cpus=1 log=info{}",
        elfcorehdr.start,
        purgatory_area,
        options.capture_sink.name(),
        if options.finish == hv_core::cmdline::Finish::Exit {
            " finish=exit"
        } else {
            ""
        }
    );
    let cmdline_len = writer.len + 1;
    let Some(cmdline_room) = room.get_mut(cmdline_at..cmdline_at + cmdline_len) else {
        return Err(LoadError::Elf("the capture image's boot data do not fit"));
    };
    cmdline_room.copy_from_slice(&cmdline[..cmdline_len]);
    // hvm_start_info, version 1.
    let fields: [(usize, u64, usize); 7] = [
        (0, u64::from(crate::boot::info::PVH_MAGIC), 4),
        (4, 1, 4),
        (24, data + cmdline_at as u64, 8),
        (32, boot.rsdp.unwrap_or(0), 8),
        (40, data + memmap_at as u64, 8),
        (48, entries as u64, 4),
        (52, 0, 4),
    ];
    for (offset, value, len) in fields {
        room[offset..offset + len].copy_from_slice(&value.to_le_bytes()[..len]);
    }
    let data_len = cmdline_at + cmdline_len;
    // The purgatory's data room is inside the reservation, sized for these.
    phys::write(data, &room[..data_len]);
    digests.record(data, phys::read(data, data_len as u64))?;
    let start_info =
        u32::try_from(data).map_err(|_| LoadError::Elf("the reservation must lie below 4 GiB"))?;
    Ok((elfcorehdr, Entry::Pvh32 { entry, start_info }, digests))
}

/// `core::fmt::Write` into a fixed buffer, cutting what does not fit.
struct FixedWriter<'a> {
    buffer: &'a mut [u8],
    len: usize,
}

impl Write for FixedWriter<'_> {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let take = text.len().min(self.buffer.len() - self.len);
        self.buffer[self.len..self.len + take].copy_from_slice(&text.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}
