//! CPU and interrupt-controller discovery from the ACPI MADT.
//!
//! [`discover`] goes from the RSDP to a fixed-capacity [`Topology`]. The
//! tables come from firmware and are treated as hostile input: before the
//! `acpi` crate sees a table, this module checks it byte by byte with checked
//! arithmetic (the crate trusts lengths: a short MADT underflows, a
//! zero-length entry loops forever, an overrunning entry reads past the
//! table). Every problem is a [`MadtError`] value, which the kernel turns
//! into "run on the boot CPU alone".
//!
//! Access to physical memory goes through an [`AcpiHandler`], so the kernel
//! passes [`IdentityMapped`] and host tests pass a handler that maps
//! "physical addresses" into a buffer of synthesized tables.

// Calling into the `acpi` crate and reading mapped tables needs `unsafe`;
// it is confined to this module, each block with its own SAFETY comment.
#![allow(unsafe_code)]

use acpi::madt::{
    EntryHeader, GicInterruptTranslationServiceEntry, GicMsiFrameEntry, GicRedistributorEntry,
    GiccEntry, GicdEntry, InterruptSourceOverrideEntry, IoApicEntry, IoSapicEntry,
    LocalApicAddressOverrideEntry, LocalApicEntry, LocalApicNmiEntry, LocalSapicEntry,
    LocalX2ApicEntry, Madt, MadtEntry, MultiprocessorWakeupEntry, NmiSourceEntry,
    PlatformInterruptSourceEntry, X2ApicNmiEntry,
};
use acpi::sdt::SdtHeader;
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use core::fmt;
use core::mem::size_of;
use core::ptr::NonNull;

/// How many processors a [`Topology`] holds; more are counted, not kept.
pub const MAX_CPUS: usize = 512;
/// How many I/O APICs a [`Topology`] holds.
pub const MAX_IOAPICS: usize = 32;
/// How many interrupt source overrides a [`Topology`] holds.
pub const MAX_OVERRIDES: usize = 48;
/// Tables longer than this are refused rather than mapped: a MADT for
/// thousands of CPUs is far smaller, a corrupt length can be 4 GiB.
pub const MAX_TABLE_LEN: u32 = 1 << 20;

/// xAPIC ID that marks an unusable Local APIC entry.
const INVALID_XAPIC_ID: u32 = 0xff;
/// x2APIC ID that marks an unusable Local x2APIC entry.
const INVALID_X2APIC_ID: u32 = 0xffff_ffff;

const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const RSDP_V1_LEN: usize = 20;
const RSDP_V2_LEN: usize = 36;
/// Longest RSDP we checksum; ACPI defines 36 bytes, the length field allows more.
const RSDP_MAX_LEN: u32 = 4096;
const SDT_HEADER_LEN: usize = size_of::<SdtHeader>();
const MADT_HEADER_LEN: usize = size_of::<Madt>();

const XSDT: Signature = Signature(*b"XSDT");
const RSDT: Signature = Signature(*b"RSDT");
const MADT: Signature = Signature(*b"APIC");

/// A table signature, e.g. `APIC` for the MADT.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 4]);

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            let c = if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '?'
            };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Why no topology could be read. Each means: run on the boot CPU alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MadtError {
    /// No RSDP: null address, or no `RSD PTR ` signature there.
    NoRsdp,
    /// The RSDP's checksum (or extended checksum) is wrong.
    BadRsdpChecksum,
    /// The root table lists no valid MADT.
    NoMadt,
    /// A table's checksum is wrong (for the MADT: every candidate's was).
    BadChecksum(Signature),
    /// A table is structurally broken: truncated, overrunning, bad lengths.
    Malformed {
        /// Which table.
        table: Signature,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl fmt::Display for MadtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRsdp => write!(f, "no ACPI RSDP found"),
            Self::BadRsdpChecksum => write!(f, "ACPI RSDP checksum is wrong"),
            Self::NoMadt => write!(f, "no MADT (APIC) table in the ACPI tables"),
            Self::BadChecksum(table) => write!(f, "ACPI {table} table checksum is wrong"),
            Self::Malformed { table, reason } => {
                write!(f, "malformed ACPI {table} table: {reason}")
            }
        }
    }
}

/// A processor listed by a Local APIC or Local x2APIC entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Processor {
    /// Its (x2)APIC ID, the address for IPIs.
    pub apic_id: u32,
    /// Its ACPI processor UID.
    pub acpi_uid: u32,
    /// Flag bit 0: usable now.
    pub enabled: bool,
    /// Flag bit 1: may be brought online later (meaningful when disabled).
    pub online_capable: bool,
    /// Listed by a Local x2APIC entry (type 9) rather than a Local APIC one.
    pub from_x2apic_entry: bool,
}

/// An I/O APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApic {
    /// Its I/O APIC ID.
    pub id: u8,
    /// Physical address of its registers.
    pub address: u32,
    /// First global system interrupt it serves.
    pub gsi_base: u32,
}

/// An interrupt source override: a bus IRQ that is not identity-mapped to
/// a GSI, or has non-default polarity or trigger mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptOverride {
    /// Source bus (0 is ISA).
    pub bus: u8,
    /// Bus-relative IRQ.
    pub irq: u8,
    /// The global system interrupt it arrives on.
    pub gsi: u32,
    /// MPS INTI flags: polarity in bits 0-1, trigger mode in bits 2-3.
    pub flags: u16,
}

impl InterruptOverride {
    /// Polarity bits say active low (`0b11`).
    pub fn active_low(&self) -> bool {
        self.flags & 0b11 == 0b11
    }

    /// Trigger-mode bits say level-triggered (`0b11`).
    pub fn level_triggered(&self) -> bool {
        (self.flags >> 2) & 0b11 == 0b11
    }
}

/// A Local APIC NMI (type 4) or Local x2APIC NMI (type 0xA) entry: which
/// LINT pin of which processors the platform's NMI (the front-panel
/// button, a BMC's "diag" NMI) is wired to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalNmi {
    /// The processors' ACPI UID; `None` means all processors (UID 0xFF in
    /// a type 4 entry, 0xFFFFFFFF in a type 0xA one).
    pub acpi_uid: Option<u32>,
    /// The LINT pin: 0 or 1.
    pub lint: u8,
    /// MPS INTI flags: polarity in bits 0-1, trigger mode in bits 2-3.
    pub flags: u16,
}

impl LocalNmi {
    /// Whether the entry covers the processor with this ACPI UID.
    pub fn covers(&self, acpi_uid: u32) -> bool {
        self.acpi_uid.is_none_or(|uid| uid == acpi_uid)
    }

    /// Polarity bits say active low (`0b11`).
    pub fn active_low(&self) -> bool {
        self.flags & 0b11 == 0b11
    }

    /// Trigger-mode bits say level-triggered (`0b11`).
    pub fn level_triggered(&self) -> bool {
        (self.flags >> 2) & 0b11 == 0b11
    }
}

/// Local NMI entries kept; more are counted in
/// [`Topology::dropped_local_nmis`].
pub const MAX_LOCAL_NMIS: usize = 16;

/// What the MADT says about CPUs and interrupt controllers.
#[derive(Clone)]
pub struct Topology {
    processors: [Processor; MAX_CPUS],
    processor_count: usize,
    ioapics: [IoApic; MAX_IOAPICS],
    ioapic_count: usize,
    overrides: [InterruptOverride; MAX_OVERRIDES],
    override_count: usize,
    local_nmis: [LocalNmi; MAX_LOCAL_NMIS],
    local_nmi_count: usize,
    /// Local NMI entries beyond [`MAX_LOCAL_NMIS`], not kept.
    pub dropped_local_nmis: u32,
    /// Physical address of the local APIC registers (after any override entry).
    pub local_apic_address: u64,
    /// PCAT_COMPAT: dual 8259 PICs are present (and must be masked).
    pub legacy_pics: bool,
    /// Processor entries dropped because their APIC ID was already listed.
    pub duplicates: u32,
    /// Processor entries with the invalid ID 0xFF (xAPIC) or 0xFFFFFFFF (x2APIC).
    pub invalid_ids: u32,
    /// Distinct processors beyond [`MAX_CPUS`], not kept.
    pub truncated_cpus: u32,
    /// I/O APICs beyond [`MAX_IOAPICS`], not kept.
    pub dropped_ioapics: u32,
    /// Interrupt source overrides beyond [`MAX_OVERRIDES`], not kept.
    pub dropped_overrides: u32,
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topology")
            .field("processors", &self.processors())
            .field("ioapics", &self.ioapics())
            .field("overrides", &self.overrides())
            .field("local_nmis", &self.local_nmis())
            .field("local_apic_address", &self.local_apic_address)
            .field("legacy_pics", &self.legacy_pics)
            .field("duplicates", &self.duplicates)
            .field("invalid_ids", &self.invalid_ids)
            .field("truncated_cpus", &self.truncated_cpus)
            .field("dropped_ioapics", &self.dropped_ioapics)
            .field("dropped_overrides", &self.dropped_overrides)
            .finish()
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Topology {
    /// An empty topology, usable in a `static`.
    pub const fn new() -> Self {
        const NO_CPU: Processor = Processor {
            apic_id: 0,
            acpi_uid: 0,
            enabled: false,
            online_capable: false,
            from_x2apic_entry: false,
        };
        Self {
            processors: [NO_CPU; MAX_CPUS],
            processor_count: 0,
            ioapics: [IoApic {
                id: 0,
                address: 0,
                gsi_base: 0,
            }; MAX_IOAPICS],
            ioapic_count: 0,
            overrides: [InterruptOverride {
                bus: 0,
                irq: 0,
                gsi: 0,
                flags: 0,
            }; MAX_OVERRIDES],
            override_count: 0,
            local_nmis: [LocalNmi {
                acpi_uid: None,
                lint: 0,
                flags: 0,
            }; MAX_LOCAL_NMIS],
            local_nmi_count: 0,
            dropped_local_nmis: 0,
            local_apic_address: 0,
            legacy_pics: false,
            duplicates: 0,
            invalid_ids: 0,
            truncated_cpus: 0,
            dropped_ioapics: 0,
            dropped_overrides: 0,
        }
    }

    /// Every distinct processor listed, enabled or not, in table order.
    pub fn processors(&self) -> &[Processor] {
        &self.processors[..self.processor_count]
    }

    /// The processors that can be started now (enabled), in table order.
    pub fn possible(&self) -> impl Iterator<Item = &Processor> + '_ {
        self.processors().iter().filter(|p| p.enabled)
    }

    /// How many processors can be started now.
    pub fn possible_count(&self) -> usize {
        self.possible().count()
    }

    /// Processors that are disabled and not online-capable: never usable.
    pub fn disabled_count(&self) -> usize {
        self.processors()
            .iter()
            .filter(|p| !p.enabled && !p.online_capable)
            .count()
    }

    /// Processors that are disabled but online-capable (hot-pluggable).
    pub fn online_capable_count(&self) -> usize {
        self.processors()
            .iter()
            .filter(|p| !p.enabled && p.online_capable)
            .count()
    }

    /// Whether processors were left out because there were more than [`MAX_CPUS`].
    pub fn truncated(&self) -> bool {
        self.truncated_cpus > 0
    }

    /// The index in [`Topology::processors`] of the processor with this APIC
    /// ID: the boot CPU passes its own ID (from CPUID or its APIC).
    pub fn bsp_index(&self, own_apic_id: u32) -> Option<usize> {
        self.processors()
            .iter()
            .position(|p| p.apic_id == own_apic_id)
    }

    /// The I/O APICs, in table order.
    pub fn ioapics(&self) -> &[IoApic] {
        &self.ioapics[..self.ioapic_count]
    }

    /// The interrupt source overrides, in table order.
    pub fn overrides(&self) -> &[InterruptOverride] {
        &self.overrides[..self.override_count]
    }

    fn add_processor(&mut self, processor: Processor) {
        let invalid = if processor.from_x2apic_entry {
            INVALID_X2APIC_ID
        } else {
            INVALID_XAPIC_ID
        };
        if processor.apic_id == invalid {
            self.invalid_ids += 1;
        } else if self.bsp_index(processor.apic_id).is_some() {
            self.duplicates += 1;
        } else if let Some(slot) = self.processors.get_mut(self.processor_count) {
            *slot = processor;
            self.processor_count += 1;
        } else {
            self.truncated_cpus += 1;
        }
    }

    fn add_ioapic(&mut self, ioapic: IoApic) {
        match self.ioapics.get_mut(self.ioapic_count) {
            Some(slot) => {
                *slot = ioapic;
                self.ioapic_count += 1;
            }
            None => self.dropped_ioapics += 1,
        }
    }

    fn add_local_nmi(&mut self, entry: LocalNmi) {
        match self.local_nmis.get_mut(self.local_nmi_count) {
            Some(slot) => {
                *slot = entry;
                self.local_nmi_count += 1;
            }
            None => self.dropped_local_nmis += 1,
        }
    }

    /// The Local (x2)APIC NMI entries, in MADT order.
    pub fn local_nmis(&self) -> &[LocalNmi] {
        &self.local_nmis[..self.local_nmi_count]
    }

    fn add_override(&mut self, entry: InterruptOverride) {
        match self.overrides.get_mut(self.override_count) {
            Some(slot) => {
                *slot = entry;
                self.override_count += 1;
            }
            None => self.dropped_overrides += 1,
        }
    }
}

/// Reads the MADT reachable from the RSDP at physical address `rsdp_addr`
/// (0 for "none").
///
/// # Safety
///
/// `handler` must map, readable and unchanging while mapped, any physical
/// range of at most [`MAX_TABLE_LEN`] bytes this function asks for: the
/// RSDP, the root table and every table it points to up to the MADT (as an
/// identity map of all physical memory does), or panic.
pub unsafe fn discover<H: AcpiHandler>(handler: H, rsdp_addr: u64) -> Result<Topology, MadtError> {
    // SAFETY: the caller's contract is exactly `Reader::new`'s.
    let reader = unsafe { Reader::new(handler.clone()) };
    let root = reader.rsdp(rsdp_addr)?;
    let root_len = reader.check_table(root.address, root.signature())?;
    let madt_address = reader.find_madt(&root, root_len)?;

    // Only now does the `acpi` crate see the tables: the root table and
    // every table up to the MADT have been checked to be what it expects.
    let root_address = to_usize(root.address, root.signature())?;
    let revision = if root.xsdt { 2 } else { 0 };
    // SAFETY: `root_address` is a root table of the kind `revision` selects,
    // whose header, length and checksum `check_table` verified, mapped by a
    // handler that maps what it is asked for (our caller's contract).
    let tables =
        unsafe { AcpiTables::from_rsdt(handler, revision, root_address) }.map_err(|_| {
            MadtError::Malformed {
                table: root.signature(),
                reason: "rejected by the acpi crate",
            }
        })?;
    let madt = tables.find_table::<Madt>().map_err(|_| MadtError::NoMadt)?;
    if madt.physical_start() as u64 != madt_address {
        // Not the table we validated: do not let the crate walk it.
        return Err(MadtError::Malformed {
            table: MADT,
            reason: "the acpi crate picked a different MADT",
        });
    }
    let madt = madt.get();

    let mut topology = Topology::new();
    topology.local_apic_address = u64::from(madt.local_apic_address);
    topology.legacy_pics = madt.supports_8259();
    for entry in madt.entries() {
        match entry {
            MadtEntry::LocalApic(e) => topology.add_processor(Processor {
                apic_id: u32::from(e.apic_id),
                acpi_uid: u32::from(e.processor_id),
                enabled: e.flags & 1 != 0,
                online_capable: e.flags & 2 != 0,
                from_x2apic_entry: false,
            }),
            MadtEntry::LocalX2Apic(e) => topology.add_processor(Processor {
                apic_id: e.x2apic_id,
                acpi_uid: e.processor_uid,
                enabled: e.flags & 1 != 0,
                online_capable: e.flags & 2 != 0,
                from_x2apic_entry: true,
            }),
            MadtEntry::IoApic(e) => topology.add_ioapic(IoApic {
                id: e.io_apic_id,
                address: e.io_apic_address,
                gsi_base: e.global_system_interrupt_base,
            }),
            MadtEntry::InterruptSourceOverride(e) => topology.add_override(InterruptOverride {
                bus: e.bus,
                irq: e.irq,
                gsi: e.global_system_interrupt,
                flags: e.flags,
            }),
            MadtEntry::LocalApicAddressOverride(e) => {
                topology.local_apic_address = e.local_apic_address;
            }
            MadtEntry::LocalApicNmi(e) => topology.add_local_nmi(LocalNmi {
                acpi_uid: (e.processor_id != 0xFF).then_some(u32::from(e.processor_id)),
                lint: e.nmi_line,
                flags: e.flags,
            }),
            MadtEntry::X2ApicNmi(e) => topology.add_local_nmi(LocalNmi {
                acpi_uid: (e.processor_uid != u32::MAX).then_some(e.processor_uid),
                lint: e.nmi_line,
                flags: e.flags,
            }),
            _ => {}
        }
    }
    Ok(topology)
}

/// Looks for the RSDP where BIOS firmware puts it: the first KiB of the
/// EBDA and `0xE0000..0x100000`, on 16-byte boundaries, checking signature
/// and checksums. For boot protocols that do not pass the RSDP.
///
/// # Safety
///
/// As for [`discover`]: `handler` maps the BIOS data area (`0x40E`), the
/// EBDA and `0xE0000..0x100000`, or panics.
pub unsafe fn find_rsdp_bios<H: AcpiHandler>(handler: H) -> Option<u64> {
    const EBDA_POINTER: u64 = 0x40e;
    const BIOS_AREA: (u64, u64) = (0xe_0000, 0x10_0000);
    // SAFETY: the caller's contract is `Reader::new`'s.
    let reader = unsafe { Reader::new(handler) };
    let ebda = reader
        .with_bytes(EBDA_POINTER, 2, |b| {
            u64::from(u16::from_le_bytes([b[0], b[1]])) << 4
        })
        .ok()?;
    // Only trust an EBDA pointer inside the range an EBDA can occupy.
    let ebda_area = (0x8_0000..0xa_0000)
        .contains(&ebda)
        .then_some((ebda, ebda + 1024));
    for (start, end) in ebda_area.into_iter().chain([BIOS_AREA]) {
        let found = (start..end)
            .step_by(16)
            .find(|&addr| reader.rsdp(addr).is_ok());
        if found.is_some() {
            return found;
        }
    }
    None
}

/// The kernel's handler: physical memory is identity-mapped.
#[derive(Clone, Copy, Debug)]
pub struct IdentityMapped {
    _private: (),
}

impl IdentityMapped {
    /// # Safety
    ///
    /// Every physical address the firmware tables occupy must be mapped at
    /// the same virtual address and readable, for as long as this handler
    /// or a mapping it made is used, and the tables must not be written
    /// meanwhile.
    pub const unsafe fn new() -> Self {
        Self { _private: () }
    }
}

impl AcpiHandler for IdentityMapped {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        // `discover` refuses null table addresses; a null here is a bug.
        let virt = NonNull::new(core::ptr::with_exposed_provenance_mut::<T>(
            physical_address,
        ))
        .expect("ACPI mapping of physical address 0");
        // SAFETY: (1) `virt` is the identity-mapped address of
        // `physical_address`, readable for `size` bytes as the constructor's
        // contract guarantees; (2) `size` is passed as both the region and
        // mapped length, nothing more is claimed; (3) `unmap_physical_region`
        // has nothing to undo.
        unsafe { PhysicalMapping::new(physical_address, virt, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// The root table named by the RSDP.
struct Root {
    address: u64,
    xsdt: bool,
}

impl Root {
    fn signature(&self) -> Signature {
        if self.xsdt { XSDT } else { RSDT }
    }

    fn pointer_len(&self) -> usize {
        if self.xsdt { 8 } else { 4 }
    }
}

/// Reads bytes of physical memory through an [`AcpiHandler`].
struct Reader<H> {
    handler: H,
}

impl<H: AcpiHandler> Reader<H> {
    /// # Safety
    ///
    /// `handler` must map, readable and unchanging while mapped, any physical
    /// range of at most [`MAX_TABLE_LEN`] bytes it is asked for, or panic.
    unsafe fn new(handler: H) -> Self {
        Self { handler }
    }

    /// Runs `f` on the `len` bytes at physical `address`.
    fn with_bytes<R>(&self, address: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R, ()> {
        let start = usize::try_from(address).map_err(|_| ())?;
        if len == 0 || len > MAX_TABLE_LEN as usize || start.checked_add(len).is_none() {
            return Err(());
        }
        // SAFETY: `Reader::new`'s contract: the handler maps `len` (at most
        // `MAX_TABLE_LEN`) bytes at any address it is given, or panics.
        let mapping = unsafe { self.handler.map_physical_region::<u8>(start, len) };
        // SAFETY: (1) the mapping covers `len` readable bytes from its
        // virtual start (its region length, by the `AcpiHandler` contract);
        // (2) they do not change while mapped (`Reader::new`'s contract);
        // (3) the slice does not outlive `mapping`, which is dropped after `f`.
        let bytes = unsafe { core::slice::from_raw_parts(mapping.virtual_start().as_ptr(), len) };
        Ok(f(bytes))
    }

    /// Validates the RSDP at `address` and returns the root table it names.
    fn rsdp(&self, address: u64) -> Result<Root, MadtError> {
        if address == 0 {
            return Err(MadtError::NoRsdp);
        }
        let (revision, rsdt) = self
            .with_bytes(address, RSDP_V1_LEN, |b| {
                if &b[..8] != RSDP_SIGNATURE {
                    return Err(MadtError::NoRsdp);
                }
                if checksum(b) != 0 {
                    return Err(MadtError::BadRsdpChecksum);
                }
                Ok((b[15], u32_at(b, 16)))
            })
            .map_err(|()| MadtError::NoRsdp)??;
        let mut root = Root {
            address: u64::from(rsdt),
            xsdt: false,
        };
        if revision >= 2 {
            let (len, xsdt) = self
                .with_bytes(address, RSDP_V2_LEN, |b| (u32_at(b, 20), u64_at(b, 24)))
                .map_err(|()| MadtError::NoRsdp)?;
            if !(RSDP_V2_LEN as u32..=RSDP_MAX_LEN).contains(&len) {
                return Err(MadtError::BadRsdpChecksum);
            }
            let sum = self
                .with_bytes(address, len as usize, checksum)
                .map_err(|()| MadtError::NoRsdp)?;
            if sum != 0 {
                return Err(MadtError::BadRsdpChecksum);
            }
            if xsdt != 0 {
                root = Root {
                    address: xsdt,
                    xsdt: true,
                };
            }
        }
        if root.address == 0 {
            return Err(MadtError::Malformed {
                table: root.signature(),
                reason: "null address in the RSDP",
            });
        }
        Ok(root)
    }

    /// The header of the table at `address`, without its length checked.
    fn header(&self, address: u64, table: Signature) -> Result<Header, MadtError> {
        if address == 0 {
            return Err(MadtError::Malformed {
                table,
                reason: "table at physical address 0",
            });
        }
        self.with_bytes(address, SDT_HEADER_LEN, |b| Header {
            signature: Signature([b[0], b[1], b[2], b[3]]),
            length: u32_at(b, 4),
            text_ok: core::str::from_utf8(&b[10..16]).is_ok()
                && core::str::from_utf8(&b[16..24]).is_ok(),
        })
        .map_err(|()| MadtError::Malformed {
            table,
            reason: "table address beyond the address space",
        })
    }

    /// Checks a table the way the `acpi` crate will rely on it: signature,
    /// text fields, length in range, checksum. Returns its length.
    fn check_table(&self, address: u64, table: Signature) -> Result<usize, MadtError> {
        let header = self.header(address, table)?;
        if header.signature != table {
            return Err(MadtError::Malformed {
                table,
                reason: "wrong signature",
            });
        }
        if !header.text_ok {
            return Err(MadtError::Malformed {
                table,
                reason: "OEM ID is not text",
            });
        }
        let len = header.length as usize;
        if !(SDT_HEADER_LEN..=MAX_TABLE_LEN as usize).contains(&len) {
            return Err(MadtError::Malformed {
                table,
                reason: "length out of range",
            });
        }
        let sum = self
            .with_bytes(address, len, checksum)
            .map_err(|()| MadtError::Malformed {
                table,
                reason: "table beyond the address space",
            })?;
        if sum != 0 {
            return Err(MadtError::BadChecksum(table));
        }
        Ok(len)
    }

    /// Finds the MADT the way `AcpiTables::find_table` will (the first
    /// `APIC` table with text OEM fields and a good checksum) and checks its
    /// entries. Refuses anything the crate would mishandle on the way.
    fn find_madt(&self, root: &Root, root_len: usize) -> Result<u64, MadtError> {
        let table = root.signature();
        let pointer_len = root.pointer_len();
        let body_len = root_len - SDT_HEADER_LEN;
        if !body_len.is_multiple_of(pointer_len) {
            return Err(MadtError::Malformed {
                table,
                reason: "length is not a whole number of table pointers",
            });
        }
        let mut saw_bad_checksum = false;
        for i in 0..body_len / pointer_len {
            let offset = (SDT_HEADER_LEN + i * pointer_len) as u64;
            let address = root
                .address
                .checked_add(offset)
                .and_then(|at| {
                    self.with_bytes(at, pointer_len, |b| {
                        if root.xsdt {
                            u64_at(b, 0)
                        } else {
                            u64::from(u32_at(b, 0))
                        }
                    })
                    .ok()
                })
                .ok_or(MadtError::Malformed {
                    table,
                    reason: "table beyond the address space",
                })?;
            let header = self.header(address, table)?;
            if header.signature != MADT || !header.text_ok {
                continue;
            }
            let len = header.length as usize;
            if !(MADT_HEADER_LEN..=MAX_TABLE_LEN as usize).contains(&len) {
                return Err(MadtError::Malformed {
                    table: MADT,
                    reason: "length out of range",
                });
            }
            let verdict = self
                .with_bytes(address, len, |b| {
                    if checksum(b) != 0 {
                        None
                    } else {
                        Some(check_madt_entries(b))
                    }
                })
                .map_err(|()| MadtError::Malformed {
                    table: MADT,
                    reason: "table beyond the address space",
                })?;
            match verdict {
                None => saw_bad_checksum = true,
                Some(Ok(())) => return Ok(address),
                Some(Err(reason)) => {
                    return Err(MadtError::Malformed {
                        table: MADT,
                        reason,
                    });
                }
            }
        }
        Err(if saw_bad_checksum {
            MadtError::BadChecksum(MADT)
        } else {
            MadtError::NoMadt
        })
    }
}

/// The fields of a table header this module looks at.
struct Header {
    signature: Signature,
    length: u32,
    /// OEM ID and OEM table ID are UTF-8, as the `acpi` crate requires.
    text_ok: bool,
}

/// Checks that the MADT's entries tile the table exactly and that each
/// entry the `acpi` crate interprets is at least as long as its structure.
fn check_madt_entries(madt: &[u8]) -> Result<(), &'static str> {
    let mut offset = MADT_HEADER_LEN;
    while offset < madt.len() {
        let rest = &madt[offset..];
        if rest.len() < size_of::<EntryHeader>() {
            return Err("entry header cut off at the end of the table");
        }
        let (kind, len) = (rest[0], usize::from(rest[1]));
        if len < size_of::<EntryHeader>() {
            return Err("entry shorter than its header");
        }
        if len > rest.len() {
            return Err("entry runs past the end of the table");
        }
        if len < min_entry_len(kind) {
            return Err("entry shorter than its type requires");
        }
        offset += len;
    }
    Ok(())
}

/// The size of the structure the `acpi` crate reads for an entry type.
fn min_entry_len(kind: u8) -> usize {
    match kind {
        0x0 => size_of::<LocalApicEntry>(),
        0x1 => size_of::<IoApicEntry>(),
        0x2 => size_of::<InterruptSourceOverrideEntry>(),
        0x3 => size_of::<NmiSourceEntry>(),
        0x4 => size_of::<LocalApicNmiEntry>(),
        0x5 => size_of::<LocalApicAddressOverrideEntry>(),
        0x6 => size_of::<IoSapicEntry>(),
        0x7 => size_of::<LocalSapicEntry>(),
        0x8 => size_of::<PlatformInterruptSourceEntry>(),
        0x9 => size_of::<LocalX2ApicEntry>(),
        0xa => size_of::<X2ApicNmiEntry>(),
        0xb => size_of::<GiccEntry>(),
        0xc => size_of::<GicdEntry>(),
        0xd => size_of::<GicMsiFrameEntry>(),
        0xe => size_of::<GicRedistributorEntry>(),
        0xf => size_of::<GicInterruptTranslationServiceEntry>(),
        0x10 => size_of::<MultiprocessorWakeupEntry>(),
        // Reserved and OEM types are skipped by their header alone.
        _ => size_of::<EntryHeader>(),
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}

/// Callers pass offsets inside slices they sized for the field.
fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut field = [0; 4];
    field.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(field)
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut field = [0; 8];
    field.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(field)
}

fn to_usize(address: u64, table: Signature) -> Result<usize, MadtError> {
    usize::try_from(address).map_err(|_| MadtError::Malformed {
        table,
        reason: "table address beyond the address space",
    })
}

#[cfg(test)]
mod tests;
