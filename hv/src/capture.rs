//! The capture kernel: loaded, placed and digested at boot; entered from
//! the crash path after the shootdown.
//!
//! At boot the capture kernel (a boot module) is parsed and copied into the
//! `crashkernel=` reservation with everything its entry needs (zero page,
//! command line, initrd, or the PVH start info for the hv image in capture
//! mode) and the purgatory. Every loaded piece is SHA-256-digested then.
//! The crash path only writes the ELF core header (the one part left out of
//! the digests), checks the digests and jumps.

use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use crash::shootdown::UserRegs;
use hv_core::memmap::RegionKind;
use kexec_loader::PhysRange;
use kexec_loader::boot_params::{E820Entry, E820Table, ZeroPageConfig, build_zero_page};
use kexec_loader::bzimage::BzImage;
use kexec_loader::crash_note::{
    CpuLedger, CrashRecord, VmclearOutcome, VmclearRecord, desc_len_for,
};
use kexec_loader::digest::DigestTable;
use kexec_loader::elfcore::{
    CpuRegisters, CpuState, LoadedImage, MemorySegment, Placement, core_header_len,
    write_core_header,
};
use kexec_loader::layout::CaptureLayout;
use smp_boot::madt::MAX_CPUS;

use crate::bootinfo::{BootInfo, HvmMemmapEntry, HvmStartInfo, Module};
use crate::console::EmergencyConsole;
use crate::guests::MAX_VCPUS;
use crate::memory::{CRASH_RESERVATION, FIRMWARE_MAP};
use crate::purgatory::{self, Entry};

/// Memory ranges a dump can describe.
const MAX_SEGMENTS: usize = 64;
/// Longest crash reason kept in the dump.
const MAX_REASON: usize = 256;
/// Command line given to a Linux capture kernel whose module line has none.
const DEFAULT_LINUX_ARGS: &str = "console=ttyS0,115200 nr_cpus=1 reset_devices";

/// Which capture kernel is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Linux bzImage (64-bit boot protocol).
    Linux,
    /// The hv image in capture mode (PVH entry).
    Hv,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Linux => "linux",
            Kind::Hv => "hv",
        }
    }
}

/// Everything the crash path needs, fixed at boot.
struct Plan {
    kind: Kind,
    elfcorehdr: PhysRange,
    purgatory: u64,
    digests: DigestTable<16>,
    segments: [MemorySegment; MAX_SEGMENTS],
    segment_count: usize,
    /// hv's own image as loaded, for the dump's `NT_AUXV` and `NT_FILE`
    /// notes (drgn matches `-s hv` to the dump through them).
    image: Option<LoadedImage<'static>>,
    /// Crash-time scratch, owned by whoever wins `SCRATCH_TAKEN`.
    scratch: &'static Scratch,
}

/// Buffers the crash path fills to write the core header (no allocation
/// there). Only the coordinator, once, after winning `SCRATCH_TAKEN`.
struct Scratch {
    cpus: *mut [CpuState],
    ledgers: *mut [CpuLedger<'static>],
    vmclears: *mut [VmclearRecord],
    stragglers: *mut [u32],
    reason: UnsafeCell<[u8; MAX_REASON]>,
}

// SAFETY: the buffers are touched only by the one CPU that wins
// `SCRATCH_TAKEN` (the crash coordinator), once.
unsafe impl Sync for Scratch {}
// SAFETY: as for Sync; the pointers are to permanent allocations.
unsafe impl Send for Scratch {}

static PLAN: spin::Once<Plan> = spin::Once::new();
static SCRATCH_TAKEN: AtomicBool = AtomicBool::new(false);

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
        Ok(plan) => {
            log::info!(
                "capture: {} capture kernel loaded; {} segments digested; ELF core header at {}",
                plan.kind.name(),
                plan.digests.entries().len(),
                plan.elfcorehdr
            );
            crate::report::line(|o| {
                o.field("capture").object(|o| {
                    o.field("loaded").bool(true)?;
                    o.field("kernel").str(plan.kind.name())?;
                    o.field("elfcorehdr").u64(plan.elfcorehdr.start)?;
                    o.field("digested_segments")
                        .u64(plan.digests.entries().len() as u64)
                })
            });
            let plan = PLAN.call_once(|| plan);
            if corrupt {
                corrupt_loaded_image(plan);
            }
        }
        Err(error) => {
            log::error!("capture: {error}; crash capture disabled");
            crate::report::line(|o| {
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
        // SAFETY: the address lies inside the reservation, which only the
        // capture kernel's loaded bytes occupy; this damages them on purpose.
        unsafe {
            core::ptr::write_volatile(
                address as *mut u8,
                core::ptr::read_volatile(address as *const u8) ^ 0xFF,
            )
        };
        log::warn!(
            "capture: test knob: flipped the byte at {address:#x} after its digest was taken"
        );
    }
}

/// A physical range as a byte slice (identity mapping).
///
/// # Safety
/// The range must be mapped memory that nothing else accesses meanwhile.
unsafe fn bytes_mut(range: PhysRange) -> &'static mut [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { core::slice::from_raw_parts_mut(range.start as *mut u8, range.len as usize) }
}

fn module_bytes(module: &Module) -> &'static [u8] {
    // SAFETY: boot modules are loader memory the frame allocator leaves
    // out, identity-mapped, never written.
    unsafe { core::slice::from_raw_parts(module.start as *const u8, module.len as usize) }
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
            if boot.protocol == crate::bootinfo::Protocol::Pvh {
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
    let cpus = crate::smp::cpus().len().max(1);
    let desc_len = desc_len_for(MAX_REASON, cpus, cpus, MAX_VCPUS).ok_or(LoadError::OutOfMemory)?;
    let hv_image = loaded_image();
    let header_len = core_header_len(cpus, segment_count, desc_len, hv_image.as_ref())
        .ok_or(LoadError::OutOfMemory)? as u64;
    let scratch = alloc_scratch().ok_or(LoadError::OutOfMemory)?;

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
    // SAFETY: the purgatory area is the reservation's last 64 KiB, which
    // neither layout above uses.
    let purgatory_bytes = unsafe { purgatory::install(purgatory_area, entry) };
    digests.record(purgatory_area, purgatory_bytes)?;
    Ok(Plan {
        kind,
        elfcorehdr,
        purgatory: purgatory_area,
        digests,
        segments,
        segment_count,
        image: hv_image,
        scratch,
    })
}

/// hv's ELF file header and program headers, which `linker.ld` loads at
/// the image's start (`FILEHDR PHDRS`), as a [`LoadedImage`]. `None`, with
/// a warning, when a loader left them out: the dump then lacks only what
/// drgn needs to attach `hv`'s symbols.
fn loaded_image() -> Option<LoadedImage<'static>> {
    let (start, _) = crate::memory::image_range();
    // SAFETY: the image's first page lies inside the image (`.text` starts
    // on the next page), which is identity-mapped and never written after
    // loading.
    let headers = unsafe { core::slice::from_raw_parts(start as *const u8, 4096) };
    LoadedImage::from_loaded_headers("hv", start, headers)
        .inspect_err(|error| {
            log::warn!("capture: {error}; the dump will not name hv's image for drgn")
        })
        .ok()
}

/// Allocates the crash-time buffers, element by element (they are far too
/// large for a stack).
fn alloc_scratch() -> Option<&'static Scratch> {
    use crate::memory::alloc_permanent_slice_with as slice;
    let cpus = slice(MAX_CPUS, |_| CpuState {
        cpu_index: 0,
        regs: CpuRegisters::from_array([0; 27]),
    })?;
    let ledgers = slice(MAX_CPUS, |_| CpuLedger {
        cpu_index: 0,
        apic_id: 0,
        flags: 0,
        vmcs_loaded: 0,
        vmclears: &[],
    })?;
    let vmclears = slice(MAX_VCPUS, |_| VmclearRecord {
        vmcs_phys: 0,
        outcome: VmclearOutcome::Succeeded,
    })?;
    let stragglers = slice(MAX_CPUS, |_| 0u32)?;
    crate::memory::alloc_permanent(Scratch {
        cpus: core::ptr::from_mut(cpus),
        ledgers: core::ptr::from_mut(ledgers),
        vmclears: core::ptr::from_mut(vmclears),
        stragglers: core::ptr::from_mut(stragglers),
        reason: UnsafeCell::new([0; MAX_REASON]),
    })
    .map(|scratch| &*scratch)
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
    let kernel_range = PhysRange::new(layout.kernel.start, bz.kernel_bytes().len() as u64);
    // SAFETY: the layout places each piece (this one and those below)
    // inside the reservation, disjoint from the others; nothing else uses it.
    let destination = unsafe { bytes_mut(kernel_range) };
    destination.copy_from_slice(bz.kernel_bytes());
    if let (Some(range), Some(bytes)) = (layout.initrd, initrd_bytes) {
        // SAFETY: as above.
        let destination = unsafe { bytes_mut(range) };
        destination[..bytes.len()].copy_from_slice(bytes);
    }
    let args = kernel
        .cmdline
        .trim_start()
        .strip_prefix("capture")
        .map(str::trim)
        .filter(|args| !args.is_empty());
    // SAFETY: as above.
    let cmdline_len = kexec_loader::cmdline::write_capture_cmdline(
        unsafe { bytes_mut(layout.cmdline) },
        args.unwrap_or(DEFAULT_LINUX_ARGS),
        layout.elfcorehdr,
        bz.cmdline_size(),
    )?;
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
        let kind = region_e820(region.kind);
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
    // SAFETY: as above.
    build_zero_page(&bz, &config, unsafe { bytes_mut(layout.zero_page) })?;

    let mut digests = DigestTable::excluding(layout.elfcorehdr);
    let read = |range: PhysRange| {
        // SAFETY: inside the reservation, just written.
        unsafe { core::slice::from_raw_parts(range.start as *const u8, range.len as usize) }
    };
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

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
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
    if image.get(4) != Some(&2) || image.get(5) != Some(&1) || le_u16(image, 18) != Some(62) {
        return Err(LoadError::Elf("not a little-endian x86_64 ELF64 image"));
    }
    let phoff = le_u64(image, 32).ok_or(LoadError::Elf(ELF_BAD))? as usize;
    let phentsize = le_u16(image, 54).ok_or(LoadError::Elf(ELF_BAD))? as usize;
    let phnum = le_u16(image, 56).ok_or(LoadError::Elf(ELF_BAD))? as usize;
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
        let kind = le_u32(image, at).ok_or(LoadError::Elf(ELF_BAD))?;
        let offset = le_u64(image, at + 8).ok_or(LoadError::Elf(ELF_BAD))? as usize;
        let paddr = le_u64(image, at + 24).ok_or(LoadError::Elf(ELF_BAD))?;
        let filesz = le_u64(image, at + 32).ok_or(LoadError::Elf(ELF_BAD))? as usize;
        let memsz = le_u64(image, at + 40).ok_or(LoadError::Elf(ELF_BAD))?;
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
                if le_u32(note, 0) == Some(4)
                    && le_u32(note, 8) == Some(18)
                    && note.get(12..16) == Some(b"Xen\0")
                {
                    pvh_entry = le_u64(note, 16).and_then(|entry| u32::try_from(entry).ok());
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
        // SAFETY: checked above to lie inside the reservation's usable part.
        let destination = unsafe { bytes_mut(PhysRange::new(paddr, memsz)) };
        let filesz = file_end - offset;
        destination[..filesz].copy_from_slice(&image[offset..file_end]);
        destination[filesz..].fill(0);
        digests.record(paddr, destination)?;
    }

    // Start info, memory map and command line in the purgatory's data room.
    let data = purgatory_area + purgatory::BOOT_DATA_OFFSET;
    let memmap_at = data + core::mem::size_of::<HvmStartInfo>() as u64;
    let mut memmap = [HvmMemmapEntry {
        addr: 0,
        size: 0,
        kind: 0,
        reserved: 0,
    }; 64];
    let mut entries = 0;
    let mut add = |addr: u64, end: u64, kind: u32| {
        if end > addr && entries < memmap.len() {
            memmap[entries] = HvmMemmapEntry {
                addr,
                size: end - addr,
                kind,
                reserved: 0,
            };
            entries += 1;
        }
    };
    let reserved_end = reservation.start + reservation.len;
    for region in FIRMWARE_MAP.get().into_iter().flat_map(|map| map.regions()) {
        // Old memory is reserved to the capture image: it reads it, never
        // allocates from it. Only the reservation is its RAM.
        let kind = if region.kind == RegionKind::Usable {
            2
        } else {
            2.max(region_e820(region.kind))
        };
        add(region.start, region.end().min(reservation.start), kind);
        add(region.start.max(reserved_end), region.end(), kind);
    }
    add(reservation.start, elfcorehdr.start, 1);
    add(elfcorehdr.start, elfcorehdr.start + elfcorehdr.len, 2);
    add(elfcorehdr.start + elfcorehdr.len, reserved_end, 1);
    let cmdline_at = memmap_at + (entries * core::mem::size_of::<HvmMemmapEntry>()) as u64;
    let mut cmdline = [0u8; 160];
    let mut writer = FixedWriter {
        buffer: &mut cmdline,
        len: 0,
    };
    let _ = write!(
        writer,
        "capture_mode={:#x} capture_sink={} max_cpus=1 log=info{}",
        elfcorehdr.start,
        options.capture_sink.name(),
        if options.finish == hv_core::cmdline::Finish::Exit {
            " finish=exit"
        } else {
            ""
        }
    );
    let cmdline_len = writer.len + 1;
    if cmdline_at + cmdline_len as u64 > data + purgatory::BOOT_DATA_BYTES {
        return Err(LoadError::Elf("the capture image's boot data do not fit"));
    }
    let start_info = HvmStartInfo {
        magic: crate::bootinfo::PVH_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: 0,
        modlist_paddr: 0,
        cmdline_paddr: cmdline_at,
        rsdp_paddr: boot.rsdp.unwrap_or(0),
        memmap_paddr: memmap_at,
        memmap_entries: entries as u32,
        reserved: 0,
    };
    // SAFETY: the purgatory's data room is inside the reservation and
    // sized for these (checked above).
    unsafe {
        (data as *mut HvmStartInfo).write_unaligned(start_info);
        core::ptr::copy_nonoverlapping(memmap.as_ptr(), memmap_at as *mut HvmMemmapEntry, entries);
        core::ptr::copy_nonoverlapping(cmdline.as_ptr(), cmdline_at as *mut u8, cmdline_len);
    }
    let data_len = cmdline_at + cmdline_len as u64 - data;
    // SAFETY: just written, inside the reservation.
    digests.record(data, unsafe {
        core::slice::from_raw_parts(data as *const u8, data_len as usize)
    })?;
    let start_info =
        u32::try_from(data).map_err(|_| LoadError::Elf("the reservation must lie below 4 GiB"))?;
    Ok((elfcorehdr, Entry::Pvh32 { entry, start_info }, digests))
}

fn region_e820(kind: RegionKind) -> u32 {
    match kind {
        RegionKind::Usable => 1,
        RegionKind::Reserved | RegionKind::Other(_) => 2,
        RegionKind::AcpiReclaimable => 3,
        RegionKind::AcpiNvs => 4,
        RegionKind::Bad => 5,
    }
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

fn registers(regs: &UserRegs) -> CpuRegisters {
    CpuRegisters::from_array(regs.to_array())
}

/// What the coordinator knows at hand-over time.
pub struct Handover<'a> {
    /// The coordinator's CPU index.
    pub coordinator: usize,
    /// CPUs that checked in.
    pub checked_in: &'a crash::cpuset::CpuSet,
    /// CPUs that did not.
    pub stragglers: &'a crash::cpuset::CpuSet,
    /// Why the machine crashed.
    pub reason: &'a dyn core::fmt::Display,
}

/// Crash path, coordinator only: writes the ELF core header, checks the
/// digests and jumps to the capture kernel. Returns only when there is no
/// capture kernel, or when the digests do not match (the jump is refused).
pub fn hand_over(handover: &Handover<'_>) {
    let Some(plan) = PLAN.get() else { return };
    if SCRATCH_TAKEN.swap(true, Ordering::AcqRel) {
        return;
    }
    let scratch = plan.scratch;
    // SAFETY: `SCRATCH_TAKEN` makes this CPU the only user of these
    // permanent buffers, once.
    let (cpus, ledgers, vmclears, stragglers, reason) = unsafe {
        (
            &mut *scratch.cpus,
            &mut *scratch.ledgers,
            &mut *scratch.vmclears,
            &mut *scratch.stragglers,
            &mut *scratch.reason.get(),
        )
    };
    let coordinator = &crate::crashpath::COORDINATOR;
    // The crashing CPU first: gdb makes the first note its current thread.
    let order = core::iter::once(handover.coordinator).chain(
        handover
            .checked_in
            .iter()
            .filter(|&cpu| cpu != handover.coordinator),
    );
    let mut cpu_count = 0;
    for cpu in order {
        if let Some(regs) = coordinator.record(cpu).and_then(|record| record.regs) {
            cpus[cpu_count] = CpuState {
                cpu_index: cpu as u32,
                regs: registers(&regs),
            };
            cpu_count += 1;
        }
    }
    let mut straggler_count = 0;
    for cpu in handover.stragglers {
        stragglers[straggler_count] = crate::percpu::shared(cpu).slot.apic_id();
        straggler_count += 1;
    }
    let ledger_count =
        crate::guests::crash_ledgers(ledgers, vmclears, handover.coordinator, handover.checked_in);
    let mut writer = FixedWriter {
        buffer: reason,
        len: 0,
    };
    let _ = write!(writer, "{}", handover.reason);
    let reason_len = writer.len;
    let reason_text = core::str::from_utf8(&reason[..reason_len]).unwrap_or("crash");
    let record = CrashRecord {
        reason: reason_text,
        coordinator: handover.coordinator as u32,
        stragglers: &stragglers[..straggler_count],
        cpus: &ledgers[..ledger_count],
    };
    // SAFETY: the core header region lies in the reservation, left out of
    // every allocator and of the digests; only this CPU writes it now.
    let out = unsafe { bytes_mut(plan.elfcorehdr) };
    let placement = Placement::OldMemory {
        header_phys: plan.elfcorehdr.start,
    };
    if let Err(error) = write_core_header(
        out,
        &cpus[..cpu_count],
        &record,
        &plan.segments[..plan.segment_count],
        plan.image.as_ref(),
        placement,
    ) {
        let _ = writeln!(
            EmergencyConsole,
            "*** hv: capture: cannot write the ELF core header: {error}; not jumping"
        );
        report_capture(plan, false, Some(&error));
        return;
    }
    let verdict = plan.digests.verify(|address, len| {
        // SAFETY: digested ranges lie in the reservation, identity-mapped.
        Some(unsafe { core::slice::from_raw_parts(address as *const u8, len) })
    });
    if let Err(error) = verdict {
        let _ = writeln!(
            EmergencyConsole,
            "*** hv: capture: {error} (the capture kernel was damaged after boot)"
        );
        report_capture(plan, false, Some(&error));
        return;
    }
    let _ = writeln!(
        EmergencyConsole,
        "*** hv: capture: {} CPU notes, {} memory ranges; digests verified; jumping to the {} capture kernel",
        cpu_count,
        plan.segment_count,
        plan.kind.name()
    );
    report_capture(plan, true, None);
    crate::console::wait_transmitter_empty();
    // SAFETY: the purgatory was installed at boot and its digest verified.
    unsafe { purgatory::jump(plan.purgatory) }
}

fn report_capture(plan: &Plan, digest_ok: bool, error: Option<&dyn core::fmt::Display>) {
    crate::report::emergency(|o| {
        o.field("capture").object(|o| {
            o.field("kernel").str(plan.kind.name())?;
            o.field("digest_ok").bool(digest_ok)?;
            o.field("jumped").bool(digest_ok)?;
            o.field("handover_us").u64(crate::time::now_us())?;
            o.field("refused")
                .option(error, |value, error| value.display(error))
        })
    });
}
