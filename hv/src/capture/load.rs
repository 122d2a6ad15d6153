//! Loading the capture kernel at boot: it is parsed and copied into the
//! `crashkernel=` reservation with everything its entry needs (zero page,
//! command line, initrd, or the PVH start info for the hv image in capture
//! mode) and the purgatory. Every loaded piece is SHA-256-digested, and the
//! plan is left to the crash path (`crash::handover`), which at crash time
//! only writes the ELF core header (the one part left out of the digests),
//! checks the digests and jumps.

use core::fmt::Write;

use hv_core::cmdline::{CaptureCorrupt, CaptureDigest};
use kexec_loader::PhysRange;
use kexec_loader::boot_params::{E820Entry, E820Table, ZeroPageConfig, build_zero_page};

use kexec_loader::bzimage::BzImage;
use kexec_loader::cmdline::{CmdlineError, CpuWords};
use kexec_loader::crash_note::desc_len_for;
use kexec_loader::digest::{Algorithm, DigestTable};
use kexec_loader::elfcore::{self, LoadedImage, MemorySegment, core_header_len};
use kexec_loader::layout::CaptureLayout;
use kexec_loader::purgatory::SealedTable;
use kexec_loader::purgatory::abi::mailbox;
use kexec_loader::pvh::{BootDataConfig, PvhImage, write_boot_data};
use kexec_loader::segments;

use crate::boot::info::{BootInfo, Module, Protocol};
use crate::crash::handover::{self, DIGESTS, Kind, MAX_REASON, MAX_SEGMENTS, Plan, PreparedCopy};
use crate::crash::purgatory::{self, Entry};
use crate::crash::records::MAX_VMCS;
use crate::mm::paging::Access;
use crate::mm::{self, CRASH_RESERVATION, FIRMWARE_MAP, phys};

/// Command line given to a Linux capture kernel whose module line has none
/// (the CPU words, [`CpuWords`], follow unless the line has its own).
const DEFAULT_LINUX_ARGS: &str = "console=ttyS0,115200 reset_devices";
/// Room for the capture arguments with the CPU words (Linux's own
/// `COMMAND_LINE_SIZE` is 2048).
const LINUX_ARGS_BYTES: usize = 4096;

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
    CoreHeader(kexec_loader::elfcore::ElfCoreError),
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
            Self::CoreHeader(error) => write!(f, "the ELF core header: {error}"),
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
        Ok(mut plan) => {
            log::info!(
                "capture: {} capture kernel loaded; {} segments digested ({}); ELF core header at {}",
                plan.kind.name(),
                plan.digests.entries().len(),
                plan.digests.algorithm().name(),
                plan.elfcorehdr
            );
            crate::console::report::line(|o| {
                o.field("capture").object(|o| {
                    o.field("loaded").bool(true)?;
                    o.field("kernel").str(plan.kind.name())?;
                    o.field("elfcorehdr").u64(plan.elfcorehdr.start)?;
                    o.field("digested_segments")
                        .u64(plan.digests.entries().len() as u64)?;
                    o.field("digest_algorithm")
                        .str(plan.digests.algorithm().name())
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
            let plan = handover::install(plan);
            protect_reservation(plan);
            if plan.kind == Kind::Hv {
                crate::crash::words::arm(plan.mailbox.start);
            }
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
        // The purgatory runs on hv's page tables until it switches to its
        // own, and its NMI handler writes its scratch in the area.
        .and_then(|()| mm::protect(plan.purgatory, purgatory::AREA_BYTES, Access::RWX));
    match result {
        Ok(()) => {
            log::info!(
                "capture: the reservation is read-only for hv (core header region and purgatory \
                 area writable)"
            )
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
/// (types it may not know become reserved), in boot memory: up to
/// `MAX_REGIONS` entries are too many for the boot stack.
fn firmware_map() -> Option<&'static [E820Entry]> {
    let regions = FIRMWARE_MAP.get().map_or(&[][..], |map| map.regions());
    let entries = mm::alloc_permanent_slice_with(regions.len(), |index| {
        let region = regions[index];
        E820Entry::new(region.start, region.len, region.kind.e820_for_handover())
    })?;
    Some(entries)
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
    let firmware = firmware_map().ok_or(LoadError::OutOfMemory)?;
    let segments = mm::alloc_permanent_slice_with(MAX_SEGMENTS, |_| MemorySegment {
        phys: 0,
        virt: 0,
        len: 0,
    })
    .ok_or(LoadError::OutOfMemory)?;
    // RAM outside the reservation: what the dump describes. A list that
    // does not fit is an error that disables capture, never a shorter dump.
    let segment_count = segments::ram_outside_reservation(firmware, reservation, segments)
        .map_err(|error| LoadError::DumpMap(error.into()))?;
    let segments = &segments[..segment_count];
    let cpus = crate::cpu::smp::cpus().len().max(1);
    let desc_len = desc_len_for(MAX_REASON, cpus, cpus, MAX_VMCS).ok_or(LoadError::HeaderSize)?;
    let hv_image = loaded_image();
    let core_len = core_header_len(cpus, segment_count, desc_len, hv_image.as_ref())
        .ok_or(LoadError::HeaderSize)? as u64;
    // The crash words mailbox follows the header, page aligned, in the
    // same crash-time region.
    let header_len = core_len.next_multiple_of(4096) + mailbox::BYTES as u64;

    let room = Room {
        firmware,
        usable,
        reservation,
        header_len,
        digest: match options.capture_digest {
            CaptureDigest::Xxh64 => Algorithm::Xxh64,
            CaptureDigest::Sha256 => Algorithm::Sha256,
        },
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
    let mailbox = mailbox_of(elfcorehdr);
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
            digest: room.digest,
            // Only the hv image prints the mailbox when it starts.
            mailbox: if kind == Kind::Hv { mailbox.start } else { 0 },
        },
    )
    .map_err(|error| LoadError::Purgatory(error.into()))?;
    digests
        .record(purgatory_area, purgatory_bytes)
        .map_err(|error| LoadError::Purgatory(error.into()))?;
    let header = prepare_header(segments, hv_image.as_ref(), elfcorehdr.start)?;
    Ok(Plan {
        kind,
        elfcorehdr,
        mailbox,
        purgatory: purgatory_area,
        digests: SealedTable::seal(digests),
        segments,
        header,
    })
}

/// The parts of the ELF core header that do not depend on the crash (its
/// ELF header, the memory's program headers, the image's notes), written
/// now into hv's own memory, as Linux's kexec tools build the whole header
/// at load time: the crash path copies them into place and adds only the
/// CPUs' notes and the crash note. A header that cannot be made is a load
/// error, not a refusal at the crash.
fn prepare_header(
    segments: &[MemorySegment],
    image: Option<&LoadedImage<'static>>,
    header_phys: u64,
) -> Result<PreparedCopy, LoadError> {
    let len = elfcore::prepared_len(segments.len(), image).ok_or(LoadError::HeaderSize)?;
    let bytes = mm::alloc_permanent_slice_with(len, |_| 0u8).ok_or(LoadError::OutOfMemory)?;
    let prepared = elfcore::prepare_core_header(bytes, segments, image, header_phys)
        .map_err(LoadError::CoreHeader)?;
    Ok(PreparedCopy { bytes, prepared })
}

/// The crash words mailbox: the last [`mailbox::BYTES`] of the core
/// header region (`load` sized the region for both).
fn mailbox_of(elfcorehdr: PhysRange) -> PhysRange {
    let len = mailbox::BYTES as u64;
    PhysRange::new(elfcorehdr.start + elfcorehdr.len - len, len)
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

/// The wake options of this command line that differ from the defaults,
/// passed on to the hv capture image (each after a space).
struct WakeWords<'a>(&'a hv_core::cmdline::Options);

impl core::fmt::Display for WakeWords<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (options, defaults) = (self.0, hv_core::cmdline::Options::new());
        if options.capture_wake != defaults.capture_wake {
            write!(f, " capture_wake={}", u8::from(options.capture_wake))?;
        }
        if options.wake_stragglers != defaults.wake_stragglers {
            write!(f, " wake_stragglers={}", u8::from(options.wake_stragglers))?;
        }
        if options.wake_timeout_ms != defaults.wake_timeout_ms {
            write!(f, " wake_timeout_ms={}", options.wake_timeout_ms)?;
        }
        if options.capture_share != defaults.capture_share {
            write!(f, " capture_share={}", u8::from(options.capture_share))?;
        }
        Ok(())
    }
}

/// `core::fmt::Write` into a fixed buffer; fails when it is full.
struct FixedWriter<'a> {
    buffer: &'a mut [u8],
    len: usize,
}

impl FixedWriter<'_> {
    fn as_str(&self) -> &str {
        // Only whole `&str`s were copied in.
        core::str::from_utf8(&self.buffer[..self.len]).unwrap_or("")
    }
}

impl Write for FixedWriter<'_> {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let end = self.len.checked_add(text.len()).ok_or(core::fmt::Error)?;
        self.buffer
            .get_mut(self.len..end)
            .ok_or(core::fmt::Error)?
            .copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

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
    /// How segments are summed (`capture_digest=`).
    digest: Algorithm,
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
        ..
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
    let args = args.unwrap_or(DEFAULT_LINUX_ARGS);
    // Every CPU this hypervisor runs may come up in the capture kernel:
    // each one leaves VMX and parks in the crash path.
    let online = crate::cpu::smp::cpus()
        .iter()
        .filter(|cpu| cpu.slot.state() == smp_boot::bringup::CpuState::Online)
        .count();
    let boot_cpu = crate::cpu::percpu::shared(0).slot.apic_id();
    let words = CpuWords::new(args, online as u32, boot_cpu);
    let mut buffer = [0u8; LINUX_ARGS_BYTES];
    let mut writer = FixedWriter {
        buffer: &mut buffer,
        len: 0,
    };
    write!(writer, "{args}{words}").map_err(|_| {
        kexec_loader::Error::Cmdline(CmdlineError::TooLong {
            len: LINUX_ARGS_BYTES,
            max: bz.cmdline_size(),
        })
    })?;
    let args = writer.as_str();
    log::info!("capture: the Linux capture kernel gets '{args}' (and elfcorehdr=, memmap=)");
    let cmdline_len = phys::with_bytes_mut(layout.cmdline.start, layout.cmdline.len, |out| {
        kexec_loader::cmdline::write_capture_cmdline(
            out,
            args,
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

    let mut digests = DigestTable::excluding(layout.elfcorehdr).with_algorithm(room.digest);
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
        ..
    } = *room;
    let image = PvhImage::parse(image_bytes)?;
    let layout = image.place(usable, header_len)?;
    let mut digests = DigestTable::excluding(layout.elfcorehdr).with_algorithm(room.digest);
    for segment in image.load_segments() {
        // `place` checked that it lies in the reservation's usable part.
        phys::with_bytes_mut(segment.phys, segment.mem_len, |destination| {
            image.write_segment(segment, destination)
        })?;
        // The file's bytes only: the zero tail is the image's `.bss`, which
        // the hv image zeroes as its first act (`arch::boot`), so a stray
        // write there is erased at entry; hashing it (2.5 MiB, mostly the
        // log ring) doubled the digest checks' time at crash time.
        if segment.file_len > 0 {
            digests.record(
                segment.phys,
                phys::read(segment.phys, segment.file_len as u64),
            )?;
        }
    }
    // Start info, memory map and command line in the purgatory's data room.
    let data = purgatory_area + purgatory::BOOT_DATA_OFFSET;
    let finish = if options.finish == hv_core::cmdline::Finish::Exit {
        " finish=exit"
    } else {
        ""
    };
    let cmdline = format_args!(
        "capture_mode={:#x} capture_purgatory={purgatory_area:#x} capture_words={:#x} \
         capture_facts={:#x} capture_sink={} log=info{finish}{}",
        layout.elfcorehdr.start,
        mailbox_of(layout.elfcorehdr).start,
        crate::crash::facts::address(),
        options.capture_sink.name(),
        WakeWords(options),
    );
    let boot_data = phys::with_bytes_mut(data, purgatory::BOOT_DATA_BYTES, |out| {
        write_boot_data(
            out,
            data,
            &BootDataConfig {
                firmware,
                reservation,
                elfcorehdr: layout.elfcorehdr,
                // Its IDT is loaded at the capture image's entry, and
                // capture mode reads the purgatory's stamps there.
                keep_out: PhysRange::new(
                    purgatory_area,
                    (reservation.start + reservation.len).saturating_sub(purgatory_area),
                ),
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
