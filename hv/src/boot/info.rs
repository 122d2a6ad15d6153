//! What the boot loader told us, whichever protocol it used.
//!
//! PVH (QEMU `-kernel`) hands over an `hvm_start_info`; GRUB hands over a
//! multiboot2 information structure. Both are reduced to one [`BootInfo`]:
//! loader name, command line, memory map, modules and the ACPI RSDP.

use crate::arch::boot::{ENTERED_BY_MULTIBOOT2, ENTERED_BY_PVH};
use crate::mm::phys;

/// How many memory-map entries are kept from the loader.
pub const MAX_RAW_REGIONS: usize = 256;
/// How many boot modules are kept (capture kernel, initrd, guests and
/// their environment files).
pub const MAX_MODULES: usize = 40;

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
    /// Boot modules that did not fit (ignored; reported at boot).
    pub modules_dropped: usize,
    /// Loader structures that did not fit [`BootInfo::loader_ranges`]: the
    /// allocator may hand out their memory (reported at boot).
    pub loader_ranges_dropped: usize,
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
    /// The PVH start info could not be read.
    Pvh(hv_abi::pvh::PvhError),
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
            Self::Pvh(error) => write!(f, "PVH start info: {error}"),
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
            modules_dropped: 0,
            loader_ranges_dropped: 0,
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
        match self.modules.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some(module),
            None => self.modules_dropped += 1,
        }
    }

    fn add_loader_range(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        match self.loader_ranges.iter_mut().find(|slot| slot.1 == 0) {
            Some(slot) => *slot = (start, len),
            None => self.loader_ranges_dropped += 1,
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

    /// The memory map as (start, length, e820 type).
    pub fn memory_map(&self) -> impl Iterator<Item = (u64, u64, u32)> + '_ {
        self.regions()
            .iter()
            .map(|region| (region.start, region.len, region.e820_type))
    }

    /// What the frame allocator must leave alone: the loader's structures
    /// (the strings above point into them) and the boot modules.
    pub fn keep_out(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.loader_ranges
            .into_iter()
            .chain(self.modules().map(|module| (module.start, module.len)))
    }
}

/// Reads the boot information handed over by the entry stub: `info` is
/// the pointer the boot loader passed for protocol `entered_by`, and the
/// memory it describes is still intact (nothing has allocated yet).
pub fn parse(entered_by: u32, info: u32, magic: u32) -> Result<BootInfo, BootInfoError> {
    match entered_by {
        ENTERED_BY_PVH => parse_pvh(u64::from(info)),
        ENTERED_BY_MULTIBOOT2 => {
            if magic != multiboot2::MAGIC {
                return Err(BootInfoError::BadMultiboot2Magic(magic));
            }
            parse_multiboot2(u64::from(info))
        }
        other => Err(BootInfoError::UnknownProtocol(other)),
    }
}

/// Longest command line read from loader memory.
const MAX_CMDLINE: usize = 4096;

/// What the PVH reader may read: loader structures lie in the first 4 GiB
/// (all the boot page tables map), and no table is larger than this.
const PVH_READABLE_END: u64 = 4 << 30;
const PVH_LARGEST_READ: usize = 1 << 20;

/// Loader memory at `paddr`, for the PVH decoder: refused outside what
/// the boot page tables map, or when absurdly large.
fn pvh_read(paddr: u64, len: usize) -> Option<&'static [u8]> {
    let end = paddr.checked_add(len as u64)?;
    (len <= PVH_LARGEST_READ && end <= PVH_READABLE_END).then(|| phys::read(paddr, len as u64))
}

fn parse_pvh(address: u64) -> Result<BootInfo, BootInfoError> {
    let info = hv_abi::pvh::decode(address, pvh_read).map_err(BootInfoError::Pvh)?;
    let start_info = info.start_info;
    let mut boot = BootInfo::empty(Protocol::Pvh);
    boot.loader_name = Some("PVH (QEMU -kernel)");
    boot.add_loader_range(
        address,
        hv_abi::pvh::StartInfo::len_for_version(start_info.version) as u64,
    );
    let string = |paddr: u64| {
        hv_abi::pvh::read_c_string(paddr, MAX_CMDLINE, pvh_read)
            .ok()
            .and_then(|bytes| core::str::from_utf8(bytes).ok())
            .unwrap_or("")
    };
    boot.cmdline = string(start_info.cmdline_paddr);
    boot.add_loader_range(start_info.cmdline_paddr, boot.cmdline.len() as u64 + 1);
    boot.rsdp = (start_info.rsdp_paddr != 0).then_some(start_info.rsdp_paddr);
    boot.add_loader_range(info.memmap.paddr(), info.memmap.bytes().len() as u64);
    for entry in info.memmap.iter() {
        boot.add_region(RawRegion {
            start: entry.addr,
            len: entry.size,
            e820_type: entry.kind,
        });
    }
    boot.add_loader_range(info.modules.paddr(), info.modules.bytes().len() as u64);
    for module in info.modules.iter() {
        let cmdline = string(module.cmdline_paddr);
        boot.add_loader_range(module.cmdline_paddr, cmdline.len() as u64 + 1);
        boot.add_module(Module {
            start: module.paddr,
            len: module.size,
            cmdline,
        });
    }
    Ok(boot)
}

/// A string inside the multiboot2 structure, for the kernel's lifetime:
/// that memory is loader memory nobody writes.
fn forever(text: &str) -> &'static str {
    core::str::from_utf8(phys::read(text.as_ptr() as u64, text.len() as u64)).unwrap_or("")
}

fn parse_multiboot2(address: u64) -> Result<BootInfo, BootInfoError> {
    let info = phys::multiboot2(address).map_err(|_| BootInfoError::BadMultiboot2Info)?;
    let mut boot = BootInfo::empty(Protocol::Multiboot2);
    boot.add_loader_range(address, info.total_size() as u64);
    // The structure lives in loader memory the allocator leaves out, so
    // its strings live as long as the kernel.
    boot.loader_name = info
        .boot_loader_name_tag()
        .and_then(|tag| tag.name().ok())
        .map(forever);
    boot.cmdline = info
        .command_line_tag()
        .and_then(|tag| tag.cmdline().ok())
        .map_or("", forever);
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
            cmdline: module.cmdline().map_or("", forever),
        });
    }
    Ok(boot)
}
