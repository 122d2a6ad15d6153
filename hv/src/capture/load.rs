//! Loading the capture kernel at boot: it is parsed and copied into the
//! `crashkernel=` reservation with everything its entry needs (zero page,
//! command line, initrd, or the PVH start info for the hv image in capture
//! mode) and the purgatory. Every loaded piece is SHA-256-digested, and the
//! plan is left to the crash path (`crash::handover`), which at crash time
//! only writes the ELF core header (the one part left out of the digests),
//! checks the digests and jumps.

use hv_core::memmap::MAX_REGIONS;
use kexec_loader::PhysRange;
use kexec_loader::boot_params::{E820Entry, E820Table, ZeroPageConfig, build_zero_page};
use kexec_loader::bzimage::BzImage;
use kexec_loader::crash_note::desc_len_for;
use kexec_loader::digest::DigestTable;
use kexec_loader::elfcore::{LoadedImage, MemorySegment, core_header_len};
use kexec_loader::layout::CaptureLayout;
use kexec_loader::pvh::{BootDataConfig, PvhImage, write_boot_data};
use kexec_loader::segments;

use crate::boot::info::{BootInfo, Module, Protocol};
use crate::crash::handover::{self, DIGESTS, Kind, MAX_REASON, MAX_SEGMENTS, Plan};
use crate::crash::purgatory::{self, Entry};
use crate::crash::records::MAX_VMCS;
use crate::mm::paging::Access;
use crate::mm::{self, CRASH_RESERVATION, FIRMWARE_MAP, phys};

/// Command line given to a Linux capture kernel whose module line has none.
const DEFAULT_LINUX_ARGS: &str = "console=ttyS0,115200 nr_cpus=1 reset_devices";

/// Why no capture kernel could be loaded.
#[derive(Debug)]
enum LoadError {
    NoReservation,
    NoModule,
    UnknownFormat,
    Linux(kexec_loader::Error),
    Elf(kexec_loader::Error),
    DumpMap(kexec_loader::Error),
    Purgatory(kexec_loader::Error),
    HeaderSize,
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
            Self::Elf(error) => write!(f, "capture ELF rejected: {error}"),
            Self::DumpMap(error) => write!(f, "the dump's memory ranges: {error}"),
            Self::Purgatory(error) => write!(f, "the purgatory: {error}"),
            Self::HeaderSize => f.write_str("the ELF core header's size overflows"),
            Self::OutOfMemory => f.write_str("no memory for the crash-time buffers"),
        }
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
        Ok(plan) => {
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
            let plan = handover::install(plan);
            if corrupt {
                corrupt_loaded_image(plan);
            }
            protect_reservation(plan);
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

/// Makes the reservation read-only in the kernel's tables, but for the
/// ELF core header's region (written at crash time) and the purgatory
/// (executed by the jump until it loads its own tables): a stray write
/// into the loaded capture kernel faults at once instead of damaging it.
/// The caller drops the other CPUs' cached translations.
fn protect_reservation(plan: &Plan) {
    let Some(&(start, len)) = CRASH_RESERVATION.get() else {
        return;
    };
    let result = mm::protect(start, len, Access::READ_ONLY)
        .and_then(|()| mm::protect(plan.elfcorehdr.start, plan.elfcorehdr.len, Access::DATA))
        .and_then(|()| mm::protect(plan.purgatory, purgatory::AREA_BYTES, Access::TEXT));
    match result {
        Ok(()) => {
            log::info!("capture: the reservation is read-only for hv (core header region writable)")
        }
        Err(error) => log::error!("capture: cannot protect the reservation: {error}"),
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

/// The firmware's memory map, whole, as e820 entries for another kernel
/// (types it may not know become reserved). The map holds at most
/// `MAX_REGIONS` regions, so the array always has room.
fn firmware_map() -> ([E820Entry; MAX_REGIONS], usize) {
    let mut firmware = [E820Entry::new(0, 0, 0); MAX_REGIONS];
    let mut count = 0;
    for (slot, region) in firmware
        .iter_mut()
        .zip(FIRMWARE_MAP.get().into_iter().flat_map(|map| map.regions()))
    {
        *slot = E820Entry::new(region.start, region.len, region.kind.e820_for_handover());
        count += 1;
    }
    (firmware, count)
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
    let (firmware, firmware_count) = firmware_map();
    let firmware = &firmware[..firmware_count];
    let mut segments = [MemorySegment {
        phys: 0,
        virt: 0,
        len: 0,
    }; MAX_SEGMENTS];
    // RAM outside the reservation: what the dump describes. A list that
    // does not fit is an error that disables capture, never a shorter dump.
    let segment_count = segments::ram_outside_reservation(firmware, reservation, &mut segments)
        .map_err(|error| LoadError::DumpMap(error.into()))?;
    let cpus = crate::cpu::smp::cpus().len().max(1);
    let desc_len = desc_len_for(MAX_REASON, cpus, cpus, MAX_VMCS).ok_or(LoadError::HeaderSize)?;
    let hv_image = loaded_image();
    let header_len = core_header_len(cpus, segment_count, desc_len, hv_image.as_ref())
        .ok_or(LoadError::HeaderSize)? as u64;

    let room = Room {
        firmware,
        usable,
        reservation,
        header_len,
    };
    if !handover::alloc_scratch() {
        return Err(LoadError::OutOfMemory);
    }
    let is_bzimage = image.get(0x202..0x206) == Some(b"HdrS");
    let is_elf = image.get(..4) == Some(b"\x7fELF");
    let (kind, elfcorehdr, entry, mut digests) = if is_bzimage {
        let (elfcorehdr, entry, digests) =
            load_linux(boot, kernel, image, initrd, &room).map_err(LoadError::Linux)?;
        (Kind::Linux, elfcorehdr, entry, digests)
    } else if is_elf {
        let (elfcorehdr, entry, digests) =
            load_hv(boot, image, &room, purgatory_area, options).map_err(LoadError::Elf)?;
        (Kind::Hv, elfcorehdr, entry, digests)
    } else {
        return Err(LoadError::UnknownFormat);
    };
    // The purgatory area is the reservation's last 64 KiB, which neither
    // layout above uses.
    let purgatory_bytes = purgatory::install(purgatory_area, entry);
    digests
        .record(purgatory_area, purgatory_bytes)
        .map_err(|error| LoadError::Purgatory(error.into()))?;
    Ok(Plan {
        kind,
        elfcorehdr,
        purgatory: purgatory_area,
        digests,
        segments,
        segment_count,
        image: hv_image,
    })
}

/// hv's ELF file header and program headers, which `linker.ld` loads at
/// the image's start (`FILEHDR PHDRS`), as a [`LoadedImage`]. `None`, with
/// a warning, when a loader left them out: the dump then lacks only what
/// drgn needs to attach `hv`'s symbols.
fn loaded_image() -> Option<LoadedImage<'static>> {
    let (start, _) = crate::arch::boot::image_range();
    // The image's first page (`.text` starts on the next): the kernel's
    // own image, which nobody writes while it runs.
    let headers = phys::read(start, 4096);
    LoadedImage::from_loaded_headers("hv", start, headers)
        .inspect_err(|error| {
            log::warn!("capture: {error}; the dump will not name hv's image for drgn")
        })
        .ok()
}

type Loaded = (PhysRange, Entry, DigestTable<DIGESTS>);

/// Where a capture kernel goes, and what its maps are made of.
struct Room<'a> {
    /// The firmware's memory map, whole.
    firmware: &'a [E820Entry],
    /// The reservation's part for the kernel (the purgatory's left out).
    usable: PhysRange,
    /// The whole reservation.
    reservation: PhysRange,
    /// The ELF core header's size, for the worst case.
    header_len: u64,
}

fn load_linux(
    boot: &BootInfo,
    kernel: &Module,
    image: &'static [u8],
    initrd: Option<&Module>,
    room: &Room<'_>,
) -> Result<Loaded, kexec_loader::Error> {
    let Room {
        firmware,
        usable,
        reservation,
        header_len,
    } = *room;
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
    let e820 = E820Table::for_capture(firmware, reservation, layout.elfcorehdr)?;
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
/// and the PVH start info it boots from (`kexec_loader::pvh`).
fn load_hv(
    boot: &BootInfo,
    image_bytes: &'static [u8],
    room: &Room<'_>,
    purgatory_area: u64,
    options: &hv_core::cmdline::Options,
) -> Result<Loaded, kexec_loader::Error> {
    let Room {
        firmware,
        usable,
        reservation,
        header_len,
    } = *room;
    let image = PvhImage::parse(image_bytes)?;
    let layout = image.place(usable, header_len)?;
    let mut digests = DigestTable::excluding(layout.elfcorehdr);
    for segment in image.load_segments() {
        // `place` checked that it lies in the reservation's usable part.
        phys::with_bytes_mut(segment.phys, segment.mem_len, |destination| {
            image.write_segment(segment, destination)
        })?;
        digests.record(segment.phys, phys::read(segment.phys, segment.mem_len))?;
    }
    // Start info, memory map and command line in the purgatory's data room.
    let data = purgatory_area + purgatory::BOOT_DATA_OFFSET;
    let finish = if options.finish == hv_core::cmdline::Finish::Exit {
        " finish=exit"
    } else {
        ""
    };
    let cmdline = format_args!(
        "capture_mode={:#x} capture_sink={} max_cpus=1 log=info{finish}",
        layout.elfcorehdr.start,
        options.capture_sink.name(),
    );
    let boot_data = phys::with_bytes_mut(data, purgatory::BOOT_DATA_BYTES, |out| {
        write_boot_data(
            out,
            data,
            &BootDataConfig {
                firmware,
                reservation,
                elfcorehdr: layout.elfcorehdr,
                rsdp: boot.rsdp,
                cmdline: &cmdline,
            },
        )
    })?;
    digests.record(data, phys::read(data, boot_data.len as u64))?;
    Ok((
        layout.elfcorehdr,
        Entry::Pvh32 {
            entry: layout.entry,
            start_info: boot_data.start_info,
        },
        digests,
    ))
}
