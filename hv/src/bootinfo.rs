//! What the boot loader told us, whichever protocol it used.
//!
//! PVH (QEMU `-kernel`) hands over an `hvm_start_info`; GRUB hands over a
//! multiboot2 information structure. Both are reduced to one [`BootInfo`]:
//! loader name, command line, memory map, modules and the ACPI RSDP.

use crate::arch::boot::{ENTERED_BY_MULTIBOOT2, ENTERED_BY_PVH};

/// How many memory-map entries are kept from the loader.
pub const MAX_RAW_REGIONS: usize = 256;
/// How many boot modules are kept (capture kernel, initrd, ...).
pub const MAX_MODULES: usize = 8;

/// The protocol that entered the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Xen PVH direct boot (QEMU `-kernel`).
    Pvh,
    /// Multiboot2 (GRUB, on BIOS or UEFI).
    Multiboot2,
}

impl Protocol {
    /// The name used in the run report.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pvh => "pvh",
            Protocol::Multiboot2 => "multiboot2",
        }
    }
}

/// One memory-map entry as the loader gave it, with its E820 type.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawRegion {
    /// Physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// E820 type: 1 usable, 2 reserved, 3 ACPI reclaimable, 4 ACPI NVS, 5 bad.
    pub e820_type: u32,
}

/// A boot module: a physical byte range and the command line it came with.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    /// Physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// The module's own command line (`capture`, `capture-initrd`, ...).
    pub cmdline: &'static str,
}

/// Everything the kernel takes from the boot loader.
#[derive(Debug)]
pub struct BootInfo {
    /// The protocol that entered the image.
    pub protocol: Protocol,
    /// The boot loader's name, when it gave one.
    pub loader_name: Option<&'static str>,
    /// The hypervisor's command line.
    pub cmdline: &'static str,
    /// Physical address of the ACPI RSDP, when the loader knew it.
    pub rsdp: Option<u64>,
    /// The memory map, as given.
    pub regions: [RawRegion; MAX_RAW_REGIONS],
    /// How many of `regions` are valid.
    pub region_count: usize,
    /// Memory-map entries that did not fit.
    pub regions_dropped: usize,
    /// Boot modules.
    pub modules: [Option<Module>; MAX_MODULES],
    /// Memory the loader's structures occupy (start, length), kept out of
    /// the frame allocator so the strings above stay valid.
    pub loader_ranges: [(u64, u64); MAX_LOADER_RANGES],
}

/// How many loader structures [`BootInfo::loader_ranges`] can name.
pub const MAX_LOADER_RANGES: usize = 4 + MAX_MODULES;

/// Why the boot information could not be read.
#[derive(Debug, Clone, Copy)]
pub enum BootInfoError {
    /// Entered through multiboot2 but EAX did not hold its magic.
    BadMultiboot2Magic(u32),
    /// The multiboot2 structure failed validation.
    BadMultiboot2Info,
    /// The PVH start info had the wrong magic.
    BadPvhMagic(u32),
    /// The entry stub passed a protocol this code does not know.
    UnknownProtocol(u32),
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMultiboot2Magic(magic) => write!(
                f,
                "multiboot2 entry with EAX={magic:#x}, expected 0x36d76289"
            ),
            Self::BadMultiboot2Info => write!(f, "multiboot2 information structure is malformed"),
            Self::BadPvhMagic(magic) => {
                write!(f, "PVH start info magic {magic:#x}, expected 0x336ec578")
            }
            Self::UnknownProtocol(kind) => write!(f, "unknown boot protocol {kind}"),
        }
    }
}

impl BootInfo {
    fn empty(protocol: Protocol) -> Self {
        Self {
            protocol,
            loader_name: None,
            cmdline: "",
            rsdp: None,
            regions: [RawRegion::default(); MAX_RAW_REGIONS],
            region_count: 0,
            regions_dropped: 0,
            modules: [None; MAX_MODULES],
            loader_ranges: [(0, 0); MAX_LOADER_RANGES],
        }
    }

    fn add_region(&mut self, region: RawRegion) {
        if self.region_count < MAX_RAW_REGIONS {
            self.regions[self.region_count] = region;
            self.region_count += 1;
        } else {
            self.regions_dropped += 1;
        }
    }

    fn add_module(&mut self, module: Module) {
        if let Some(slot) = self.modules.iter_mut().find(|slot| slot.is_none()) {
            *slot = Some(module);
        }
    }

    fn add_loader_range(&mut self, start: u64, len: u64) {
        if let Some(slot) = self.loader_ranges.iter_mut().find(|slot| slot.1 == 0) {
            *slot = (start, len);
        }
    }

    /// The memory-map entries.
    pub fn regions(&self) -> &[RawRegion] {
        &self.regions[..self.region_count]
    }

    /// The boot modules.
    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules.iter().flatten()
    }
}

/// Reads the boot information handed over by the entry stub.
///
/// # Safety
/// `info` must be the pointer the boot loader passed for protocol
/// `entered_by`, and the memory it describes must still be intact and
/// identity-mapped.
pub unsafe fn parse(entered_by: u32, info: u32, magic: u32) -> Result<BootInfo, BootInfoError> {
    match entered_by {
        // SAFETY: forwarded from the caller.
        ENTERED_BY_PVH => unsafe { parse_pvh(u64::from(info)) },
        ENTERED_BY_MULTIBOOT2 => {
            if magic != multiboot2::MAGIC {
                return Err(BootInfoError::BadMultiboot2Magic(magic));
            }
            // SAFETY: forwarded from the caller.
            unsafe { parse_multiboot2(u64::from(info)) }
        }
        other => Err(BootInfoError::UnknownProtocol(other)),
    }
}

/// A NUL-terminated string at a physical address, if it is valid UTF-8.
///
/// # Safety
/// `address` must point at readable, identity-mapped memory holding a
/// NUL-terminated string that stays unchanged for the kernel's lifetime.
unsafe fn c_string(address: u64) -> &'static str {
    if address == 0 {
        return "";
    }
    // SAFETY: guaranteed by the caller.
    let bytes =
        unsafe { core::ffi::CStr::from_ptr(address as *const core::ffi::c_char) }.to_bytes();
    core::str::from_utf8(bytes).unwrap_or("")
}

/// Extends a string's lifetime to the kernel's.
///
/// # Safety
/// The string's memory must stay intact and unmodified for good.
unsafe fn forever(text: &str) -> &'static str {
    // SAFETY: guaranteed by the caller.
    unsafe { &*core::ptr::from_ref(text) }
}

/// `hvm_start_info.magic`.
pub const PVH_MAGIC: u32 = 0x336e_c578;

/// Xen's `hvm_start_info`: read here, written by the capture loader for the
/// hv capture image.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct HvmStartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

#[repr(C)]
struct HvmModlistEntry {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

/// One entry of the PVH memory map (E820 types).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
#[allow(missing_docs)]
pub struct HvmMemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

/// # Safety
/// As for [`parse`].
unsafe fn parse_pvh(address: u64) -> Result<BootInfo, BootInfoError> {
    // SAFETY: the caller guarantees `address` is QEMU's start info.
    let start_info = unsafe { &*(address as *const HvmStartInfo) };
    if start_info.magic != PVH_MAGIC {
        return Err(BootInfoError::BadPvhMagic(start_info.magic));
    }
    let mut boot = BootInfo::empty(Protocol::Pvh);
    boot.loader_name = Some("PVH (QEMU -kernel)");
    boot.add_loader_range(address, core::mem::size_of::<HvmStartInfo>() as u64);
    // SAFETY: the start info's command line is a C string in loader memory.
    boot.cmdline = unsafe { c_string(start_info.cmdline_paddr) };
    boot.add_loader_range(start_info.cmdline_paddr, boot.cmdline.len() as u64 + 1);
    boot.rsdp = (start_info.rsdp_paddr != 0).then_some(start_info.rsdp_paddr);
    if start_info.version >= 1 && start_info.memmap_paddr != 0 {
        let entries = start_info.memmap_entries as usize;
        boot.add_loader_range(
            start_info.memmap_paddr,
            (entries * core::mem::size_of::<HvmMemmapEntry>()) as u64,
        );
        // SAFETY: version 1 start info carries `memmap_entries` entries here.
        let map = unsafe {
            core::slice::from_raw_parts(start_info.memmap_paddr as *const HvmMemmapEntry, entries)
        };
        for entry in map {
            boot.add_region(RawRegion {
                start: entry.addr,
                len: entry.size,
                e820_type: entry.kind,
            });
        }
    }
    if start_info.modlist_paddr != 0 {
        // SAFETY: the start info lists `nr_modules` entries here.
        let modules = unsafe {
            core::slice::from_raw_parts(
                start_info.modlist_paddr as *const HvmModlistEntry,
                start_info.nr_modules as usize,
            )
        };
        boot.add_loader_range(
            start_info.modlist_paddr,
            core::mem::size_of_val(modules) as u64,
        );
        for module in modules {
            // SAFETY: a module's command line is a C string in loader memory.
            let cmdline = unsafe { c_string(module.cmdline_paddr) };
            boot.add_loader_range(module.cmdline_paddr, cmdline.len() as u64 + 1);
            boot.add_module(Module {
                start: module.paddr,
                len: module.size,
                cmdline,
            });
        }
    }
    Ok(boot)
}

/// # Safety
/// As for [`parse`].
unsafe fn parse_multiboot2(address: u64) -> Result<BootInfo, BootInfoError> {
    // SAFETY: the caller guarantees `address` is GRUB's information structure.
    let info = unsafe {
        multiboot2::BootInformation::load(address as *const multiboot2::BootInformationHeader)
    }
    .map_err(|_| BootInfoError::BadMultiboot2Info)?;
    let mut boot = BootInfo::empty(Protocol::Multiboot2);
    boot.add_loader_range(address, info.total_size() as u64);
    boot.loader_name = info
        .boot_loader_name_tag()
        .and_then(|tag| tag.name().ok())
        .map(|name| {
            // SAFETY: the name lies in the information structure, which the
            // caller keeps intact, and whose range the frame allocator leaves out.
            unsafe { forever(name) }
        });
    boot.cmdline = info
        .command_line_tag()
        .and_then(|tag| tag.cmdline().ok())
        .map_or("", |line| {
            // SAFETY: as for the loader name.
            unsafe { forever(line) }
        });
    // The RSDP tags hold a copy of the RSDP; that copy is a valid RSDP in RAM.
    if let Some(tag) = info.rsdp_v2_tag() {
        boot.rsdp = Some(core::ptr::from_ref(tag) as *const u8 as u64 + 8);
    } else if let Some(tag) = info.rsdp_v1_tag() {
        boot.rsdp = Some(core::ptr::from_ref(tag) as *const u8 as u64 + 8);
    }
    if let Some(map) = info.memory_map_tag() {
        for area in map.memory_areas() {
            boot.add_region(RawRegion {
                start: area.start_address(),
                len: area.size(),
                e820_type: area.typ().val(),
            });
        }
    }
    for module in info.module_tags() {
        let start = u64::from(module.start_address());
        boot.add_module(Module {
            start,
            len: u64::from(module.end_address()).saturating_sub(start),
            cmdline: module.cmdline().map_or("", |line| {
                // SAFETY: as for the loader name.
                unsafe { forever(line) }
            }),
        });
    }
    Ok(boot)
}
