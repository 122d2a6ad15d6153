//! Host tests: synthesized firmware tables in a byte buffer that a test
//! handler maps as "physical memory".

use super::*;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

/// Where the builder puts things in the fake physical memory.
const RSDP_AT: u64 = 0x1010;
const ROOT_AT: u64 = 0x2000;
const TABLES_AT: u64 = 0x1_0000;
const TABLE_STRIDE: u64 = 0x1_0000;
/// Mapped memory beyond the last thing put there, for tables whose length
/// field claims more than was written.
const SLACK: usize = 0x2_0000;

/// A handler mapping physical addresses into a shared buffer. Mapping
/// outside it panics, so a test fails if the parser reads anything the
/// tables do not point to.
#[derive(Clone, Debug)]
struct TestMemory {
    bytes: Rc<[u8]>,
}

impl AcpiHandler for TestMemory {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        let end = physical_address.checked_add(size).expect("mapping wraps");
        assert!(
            end <= self.bytes.len(),
            "mapping {physical_address:#x}+{size:#x} beyond the test memory"
        );
        let start = self.bytes[physical_address..end].as_ptr();
        let virt = NonNull::new(start.cast_mut().cast::<T>()).expect("slice pointers are not null");
        // SAFETY: (1) `virt` points to `size` bytes of the buffer, kept alive
        // by the `Rc` in the handler clone the mapping stores; (2) the buffer
        // is never written once shared, and nothing writes through mappings;
        // (3) the `acpi` types are packed (alignment 1), so any address is
        // aligned for them; (4) unmapping has nothing to undo.
        unsafe { PhysicalMapping::new(physical_address, virt, size, size, self.clone()) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// Fake physical memory being laid out.
struct Firmware {
    bytes: Vec<u8>,
}

impl Firmware {
    fn new() -> Self {
        Self {
            bytes: vec![0; SLACK],
        }
    }

    fn put(&mut self, at: u64, data: &[u8]) -> &mut Self {
        let at = at as usize;
        let needed = at + data.len() + SLACK;
        if self.bytes.len() < needed {
            self.bytes.resize(needed, 0);
        }
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self
    }

    /// RSDP v2 + XSDT listing `tables`, each at its own address.
    fn with_xsdt(tables: &[Vec<u8>]) -> Self {
        let mut fw = Self::new();
        let addresses: Vec<u64> = (0..tables.len() as u64)
            .map(|i| TABLES_AT + i * TABLE_STRIDE)
            .collect();
        fw.put(RSDP_AT, &rsdp_v2(ROOT_AT))
            .put(ROOT_AT, &xsdt(&addresses));
        for (table, &at) in tables.iter().zip(&addresses) {
            fw.put(at, table);
        }
        fw
    }

    fn discover(self) -> Result<Topology, MadtError> {
        self.discover_at(RSDP_AT)
    }

    fn discover_at(self, rsdp: u64) -> Result<Topology, MadtError> {
        let memory = TestMemory {
            bytes: self.bytes.into(),
        };
        // SAFETY: `TestMemory` maps any in-buffer range and panics otherwise.
        unsafe { discover(memory, rsdp) }
    }
}

fn set_checksum(bytes: &mut [u8], at: usize, range: core::ops::Range<usize>) {
    bytes[at] = 0;
    bytes[at] = 0u8.wrapping_sub(checksum(&bytes[range]));
}

fn rsdp_v2(xsdt: u64) -> Vec<u8> {
    let mut b = vec![0; 36];
    b[..8].copy_from_slice(b"RSD PTR ");
    b[9..15].copy_from_slice(b"HVTEST");
    b[15] = 2;
    b[20..24].copy_from_slice(&36u32.to_le_bytes());
    b[24..32].copy_from_slice(&xsdt.to_le_bytes());
    set_checksum(&mut b, 8, 0..20);
    set_checksum(&mut b, 32, 0..36);
    b
}

fn rsdp_v1(rsdt: u32) -> Vec<u8> {
    let mut b = vec![0; 20];
    b[..8].copy_from_slice(b"RSD PTR ");
    b[9..15].copy_from_slice(b"HVTEST");
    b[16..20].copy_from_slice(&rsdt.to_le_bytes());
    set_checksum(&mut b, 8, 0..20);
    b
}

/// A table with a header and a correct checksum.
fn sdt(signature: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut b = vec![0; 36];
    b[..4].copy_from_slice(signature);
    b[4..8].copy_from_slice(&(36 + body.len() as u32).to_le_bytes());
    b[8] = 1;
    b[10..16].copy_from_slice(b"HVTEST");
    b[16..24].copy_from_slice(b"HVTABLES");
    b.extend_from_slice(body);
    let len = b.len();
    set_checksum(&mut b, 9, 0..len);
    b
}

/// Rewrites a table's length field, checksumming over the new length
/// (padding with zeros when it grows a little), like firmware that lies
/// consistently. Absurd lengths are only written, not padded to.
fn with_length(mut table: Vec<u8>, len: u32) -> Vec<u8> {
    if len as usize <= TABLE_STRIDE as usize {
        table.resize(table.len().max(len as usize), 0);
    }
    table[4..8].copy_from_slice(&len.to_le_bytes());
    let checked = (len as usize).min(table.len());
    set_checksum(&mut table, 9, 0..checked);
    table
}

fn xsdt(addresses: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = addresses.iter().flat_map(|a| a.to_le_bytes()).collect();
    sdt(b"XSDT", &body)
}

fn rsdt(addresses: &[u32]) -> Vec<u8> {
    let body: Vec<u8> = addresses.iter().flat_map(|a| a.to_le_bytes()).collect();
    sdt(b"RSDT", &body)
}

fn madt(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT
    for e in entries {
        body.extend_from_slice(e);
    }
    sdt(b"APIC", &body)
}

fn lapic(uid: u8, id: u8, flags: u32) -> Vec<u8> {
    let mut e = vec![0, 8, uid, id];
    e.extend_from_slice(&flags.to_le_bytes());
    e
}

fn x2apic(id: u32, uid: u32, flags: u32) -> Vec<u8> {
    let mut e = vec![9, 16, 0, 0];
    e.extend_from_slice(&id.to_le_bytes());
    e.extend_from_slice(&flags.to_le_bytes());
    e.extend_from_slice(&uid.to_le_bytes());
    e
}

fn ioapic(id: u8, address: u32, gsi_base: u32) -> Vec<u8> {
    let mut e = vec![1, 12, id, 0];
    e.extend_from_slice(&address.to_le_bytes());
    e.extend_from_slice(&gsi_base.to_le_bytes());
    e
}

fn interrupt_override(bus: u8, irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut e = vec![2, 10, bus, irq];
    e.extend_from_slice(&gsi.to_le_bytes());
    e.extend_from_slice(&flags.to_le_bytes());
    e
}

fn lapic_address_override(address: u64) -> Vec<u8> {
    let mut e = vec![5, 12, 0, 0];
    e.extend_from_slice(&address.to_le_bytes());
    e
}

fn lapic_nmi(uid: u8, line: u8) -> Vec<u8> {
    vec![4, 6, uid, 5, 0, line]
}

fn x2apic_nmi(uid: u32, line: u8) -> Vec<u8> {
    let mut e = vec![0xa, 12, 0, 0];
    e.extend_from_slice(&uid.to_le_bytes());
    e.extend_from_slice(&[line, 0, 0, 0]);
    e
}

#[test]
fn local_nmi_entries_of_both_kinds_are_kept_in_order() {
    let t = Firmware::with_xsdt(&[madt(&[
        lapic(0, 0, ENABLED),
        lapic(1, 1, ENABLED),
        lapic_nmi(1, 0),
        x2apic_nmi(u32::MAX, 1),
    ])])
    .discover()
    .unwrap();
    let nmis = t.local_nmis();
    assert_eq!(nmis.len(), 2);
    assert_eq!(nmis[0].acpi_uid, Some(1));
    assert_eq!(nmis[0].lint, 0);
    assert!(nmis[0].covers(1) && !nmis[0].covers(0));
    assert_eq!(nmis[1].acpi_uid, None);
    assert_eq!(nmis[1].lint, 1);
}

const ENABLED: u32 = 1;
const ONLINE_CAPABLE: u32 = 2;

/// What QEMU gives a 4-CPU guest, roughly.
fn qemu_like() -> Vec<u8> {
    madt(&[
        lapic(0, 0, ENABLED),
        lapic(1, 1, ENABLED),
        lapic(2, 2, ENABLED),
        lapic(3, 3, ENABLED),
        ioapic(0, 0xfec0_0000, 0),
        interrupt_override(0, 0, 2, 0),
        interrupt_override(0, 5, 5, 0xd),
        interrupt_override(0, 9, 9, 0xd),
        interrupt_override(0, 10, 10, 0xd),
        interrupt_override(0, 11, 11, 0xd),
        lapic_nmi(0xff, 1),
    ])
}

fn ids(topology: &Topology) -> Vec<u32> {
    topology.processors().iter().map(|p| p.apic_id).collect()
}

fn possible_ids(topology: &Topology) -> Vec<u32> {
    topology.possible().map(|p| p.apic_id).collect()
}

fn malformed(reason: &'static str) -> MadtError {
    MadtError::Malformed {
        table: MADT,
        reason,
    }
}

#[test]
fn qemu_like_machine() {
    let facp = sdt(b"FACP", &[0; 100]);
    let t = Firmware::with_xsdt(&[facp, qemu_like()])
        .discover()
        .unwrap();
    assert_eq!(ids(&t), [0, 1, 2, 3]);
    assert_eq!(t.possible_count(), 4);
    assert_eq!(t.processors()[2].acpi_uid, 2);
    assert!(t.processors().iter().all(|p| !p.from_x2apic_entry));
    assert_eq!(t.bsp_index(0), Some(0));
    assert_eq!(t.bsp_index(3), Some(3));
    assert_eq!(t.bsp_index(7), None);
    assert_eq!(t.local_apic_address, 0xfee0_0000);
    assert!(t.legacy_pics);
    assert_eq!(
        t.ioapics(),
        [IoApic {
            id: 0,
            address: 0xfec0_0000,
            gsi_base: 0
        }]
    );
    assert_eq!(t.overrides().len(), 5);
    assert_eq!(
        t.local_nmis(),
        [LocalNmi {
            acpi_uid: None,
            lint: 1,
            flags: 5,
        }]
    );
    assert!(t.local_nmis()[0].covers(3));
    assert!(!t.local_nmis()[0].level_triggered());
    assert_eq!(
        t.overrides()[0],
        InterruptOverride {
            bus: 0,
            irq: 0,
            gsi: 2,
            flags: 0
        }
    );
    assert!(!t.overrides()[0].level_triggered() && !t.overrides()[0].active_low());
    assert!(t.overrides()[2].level_triggered());
    assert!(!t.overrides()[2].active_low());
    assert_eq!(
        (
            t.duplicates,
            t.invalid_ids,
            t.truncated_cpus,
            t.dropped_ioapics,
            t.dropped_overrides
        ),
        (0, 0, 0, 0, 0)
    );
    assert!(!t.truncated());
    assert_eq!(t.disabled_count(), 0);
    assert_eq!(t.online_capable_count(), 0);
}

#[test]
fn x2apic_entries_with_large_ids() {
    let t = Firmware::with_xsdt(&[madt(&[
        lapic(0, 0, ENABLED),
        lapic(1, 1, ENABLED),
        x2apic(256, 256, ENABLED),
        x2apic(300, 1000, ENABLED),
        x2apic(0x1_0000, 70_000, ENABLED),
    ])])
    .discover()
    .unwrap();
    assert_eq!(ids(&t), [0, 1, 256, 300, 0x1_0000]);
    let p = t.processors()[3];
    assert_eq!(p.acpi_uid, 1000);
    assert!(p.from_x2apic_entry && p.enabled);
    assert!(!t.processors()[1].from_x2apic_entry);
    assert_eq!(t.bsp_index(0x1_0000), Some(4));
}

#[test]
fn disabled_and_online_capable_processors() {
    let t = Firmware::with_xsdt(&[madt(&[
        lapic(0, 0, ENABLED),
        lapic(1, 1, 0),
        lapic(2, 2, ONLINE_CAPABLE),
        lapic(3, 3, ENABLED | ONLINE_CAPABLE),
        x2apic(400, 4, 0),
        x2apic(401, 5, ONLINE_CAPABLE),
        x2apic(402, 6, ENABLED),
    ])])
    .discover()
    .unwrap();
    assert_eq!(ids(&t), [0, 1, 2, 3, 400, 401, 402]);
    assert_eq!(possible_ids(&t), [0, 3, 402]);
    assert_eq!(t.possible_count(), 3);
    assert_eq!(t.disabled_count(), 2);
    assert_eq!(t.online_capable_count(), 2);
    assert!(t.processors()[3].online_capable && t.processors()[3].enabled);
    assert!(!t.processors()[1].enabled);
}

#[test]
fn duplicate_ids_keep_the_first_entry() {
    let t = Firmware::with_xsdt(&[madt(&[
        lapic(0, 0, ENABLED),
        lapic(1, 5, ENABLED),
        x2apic(5, 99, 0),
        lapic(2, 5, 0),
        x2apic(300, 3, ENABLED),
        x2apic(300, 4, ENABLED),
        lapic(6, 0, ENABLED),
    ])])
    .discover()
    .unwrap();
    assert_eq!(ids(&t), [0, 5, 300]);
    assert_eq!(t.duplicates, 4);
    let five = t.processors()[1];
    assert_eq!(
        (five.acpi_uid, five.enabled, five.from_x2apic_entry),
        (1, true, false)
    );
    assert_eq!(t.processors()[2].acpi_uid, 3);
}

#[test]
fn invalid_ids_are_skipped() {
    let t = Firmware::with_xsdt(&[madt(&[
        lapic(0, 0, ENABLED),
        lapic(1, 0xff, ENABLED),
        x2apic(0xffff_ffff, 2, ENABLED),
        // 0xFF is a valid x2APIC ID.
        x2apic(0xff, 3, ENABLED),
    ])])
    .discover()
    .unwrap();
    assert_eq!(ids(&t), [0, 0xff]);
    assert!(t.processors()[1].from_x2apic_entry);
    assert_eq!(t.invalid_ids, 2);
    assert_eq!(t.duplicates, 0);
}

#[test]
fn too_many_cpus_keeps_the_first_and_flags_it() {
    let mut entries: Vec<Vec<u8>> = (0..600).map(|i| x2apic(i, i, ENABLED)).collect();
    // A duplicate of a kept CPU after the cut is still a duplicate.
    entries.push(x2apic(7, 7, ENABLED));
    let t = Firmware::with_xsdt(&[madt(&entries)]).discover().unwrap();
    assert_eq!(t.processors().len(), MAX_CPUS);
    assert_eq!(t.possible_count(), MAX_CPUS);
    assert_eq!(ids(&t), (0..MAX_CPUS as u32).collect::<Vec<_>>());
    assert_eq!(t.truncated_cpus, 600 - MAX_CPUS as u32);
    assert!(t.truncated());
    assert_eq!(t.duplicates, 1);
}

#[test]
fn ioapics_overrides_and_address_override() {
    let t = Firmware::with_xsdt(&[madt(&[
        lapic(0, 0, ENABLED),
        ioapic(1, 0xfec0_0000, 0),
        ioapic(2, 0xfec0_1000, 24),
        interrupt_override(0, 0, 2, 0),
        interrupt_override(0, 9, 20, 0xf),
        lapic_address_override(0x1_fee0_0000),
    ])])
    .discover()
    .unwrap();
    assert_eq!(t.local_apic_address, 0x1_fee0_0000);
    assert_eq!(
        t.ioapics(),
        [
            IoApic {
                id: 1,
                address: 0xfec0_0000,
                gsi_base: 0
            },
            IoApic {
                id: 2,
                address: 0xfec0_1000,
                gsi_base: 24
            },
        ]
    );
    let o = t.overrides()[1];
    assert_eq!((o.bus, o.irq, o.gsi), (0, 9, 20));
    assert!(o.active_low() && o.level_triggered());
}

#[test]
fn controller_capacities_count_what_does_not_fit() {
    let mut entries = vec![lapic(0, 0, ENABLED)];
    entries
        .extend((0..40).map(|i| ioapic(i, 0xfec0_0000 + u32::from(i) * 0x1000, u32::from(i) * 24)));
    entries.extend((0..60).map(|i| interrupt_override(0, i, u32::from(i), 0)));
    let t = Firmware::with_xsdt(&[madt(&entries)]).discover().unwrap();
    assert_eq!(t.ioapics().len(), MAX_IOAPICS);
    assert_eq!(t.dropped_ioapics, 40 - MAX_IOAPICS as u32);
    assert_eq!(t.overrides().len(), MAX_OVERRIDES);
    assert_eq!(t.dropped_overrides, 60 - MAX_OVERRIDES as u32);
    assert_eq!(t.ioapics()[31].gsi_base, 31 * 24);
}

#[test]
fn unknown_and_oem_entries_are_skipped() {
    let t = Firmware::with_xsdt(&[madt(&[
        vec![0x80, 5, 1, 2, 3],
        lapic(0, 0, ENABLED),
        vec![0x11, 2],
        vec![0x7f, 40].into_iter().chain([0; 38]).collect(),
        lapic_nmi(0, 1),
        lapic(1, 1, ENABLED),
    ])])
    .discover()
    .unwrap();
    assert_eq!(ids(&t), [0, 1]);
}

#[test]
fn rsdp_v1_with_rsdt() {
    let mut fw = Firmware::new();
    fw.put(RSDP_AT, &rsdp_v1(ROOT_AT as u32))
        .put(ROOT_AT, &rsdt(&[TABLES_AT as u32]))
        .put(TABLES_AT, &qemu_like());
    let t = fw.discover().unwrap();
    assert_eq!(ids(&t), [0, 1, 2, 3]);
}

#[test]
fn rsdp_v2_without_xsdt_falls_back_to_rsdt() {
    let mut rsdp = rsdp_v2(0);
    rsdp[16..20].copy_from_slice(&(ROOT_AT as u32).to_le_bytes());
    set_checksum(&mut rsdp, 8, 0..20);
    set_checksum(&mut rsdp, 32, 0..36);
    let mut fw = Firmware::new();
    fw.put(RSDP_AT, &rsdp)
        .put(ROOT_AT, &rsdt(&[TABLES_AT as u32]))
        .put(TABLES_AT, &qemu_like());
    assert_eq!(fw.discover().unwrap().possible_count(), 4);
}

#[test]
fn rsdp_errors() {
    assert_eq!(
        Firmware::with_xsdt(&[qemu_like()])
            .discover_at(0)
            .unwrap_err(),
        MadtError::NoRsdp
    );
    // Nothing at the address.
    assert_eq!(
        Firmware::with_xsdt(&[qemu_like()])
            .discover_at(RSDP_AT + 0x100)
            .unwrap_err(),
        MadtError::NoRsdp
    );
    // Beyond the address space.
    assert_eq!(
        Firmware::new().discover_at(u64::MAX - 4).unwrap_err(),
        MadtError::NoRsdp
    );
    // Bad checksum, bad extended checksum.
    for byte in [12, 28] {
        let mut fw = Firmware::with_xsdt(&[qemu_like()]);
        fw.bytes[RSDP_AT as usize + byte] ^= 0x40;
        assert_eq!(
            fw.discover().unwrap_err(),
            MadtError::BadRsdpChecksum,
            "byte {byte}"
        );
    }
    // A length field that does not fit the structure.
    let mut rsdp = rsdp_v2(ROOT_AT);
    rsdp[20..24].copy_from_slice(&20u32.to_le_bytes());
    set_checksum(&mut rsdp, 8, 0..20);
    let mut fw = Firmware::with_xsdt(&[qemu_like()]);
    fw.put(RSDP_AT, &rsdp);
    assert_eq!(fw.discover().unwrap_err(), MadtError::BadRsdpChecksum);
}

#[test]
fn missing_madt() {
    let facp = sdt(b"FACP", &[0; 100]);
    let hpet = sdt(b"HPET", &[0; 20]);
    assert_eq!(
        Firmware::with_xsdt(&[facp, hpet]).discover().unwrap_err(),
        MadtError::NoMadt
    );
    assert_eq!(
        Firmware::with_xsdt(&[]).discover().unwrap_err(),
        MadtError::NoMadt
    );
}

#[test]
fn bad_madt_checksum() {
    let mut table = qemu_like();
    table[50] ^= 1;
    assert_eq!(
        Firmware::with_xsdt(&[table.clone()])
            .discover()
            .unwrap_err(),
        MadtError::BadChecksum(MADT)
    );
    // Like the acpi crate, a later good MADT is used.
    let good = madt(&[lapic(0, 9, ENABLED)]);
    let t = Firmware::with_xsdt(&[table, good]).discover().unwrap();
    assert_eq!(ids(&t), [9]);
}

#[test]
fn root_table_errors() {
    // Bad XSDT checksum.
    let mut fw = Firmware::with_xsdt(&[qemu_like()]);
    fw.bytes[ROOT_AT as usize + 20] ^= 1;
    assert_eq!(fw.discover().unwrap_err(), MadtError::BadChecksum(XSDT));
    // Wrong signature.
    let mut fw = Firmware::with_xsdt(&[qemu_like()]);
    fw.put(ROOT_AT, &sdt(b"XSDX", &TABLES_AT.to_le_bytes()));
    assert_eq!(
        fw.discover().unwrap_err(),
        MadtError::Malformed {
            table: XSDT,
            reason: "wrong signature"
        }
    );
    // A length that is not whole pointers.
    let mut fw = Firmware::with_xsdt(&[qemu_like()]);
    let mut body = TABLES_AT.to_le_bytes().to_vec();
    body.extend([0; 3]);
    fw.put(ROOT_AT, &sdt(b"XSDT", &body));
    assert_eq!(
        fw.discover().unwrap_err(),
        MadtError::Malformed {
            table: XSDT,
            reason: "length is not a whole number of table pointers"
        }
    );
    // Shorter than its header; absurdly long.
    for len in [20, 0xffff_ffff] {
        let mut fw = Firmware::with_xsdt(&[qemu_like()]);
        fw.put(
            ROOT_AT,
            &with_length(xsdt(&[TABLES_AT]), len).as_slice()[..44],
        );
        assert_eq!(
            fw.discover().unwrap_err(),
            MadtError::Malformed {
                table: XSDT,
                reason: "length out of range"
            },
            "length {len}"
        );
    }
    // A null pointer before the MADT.
    let mut fw = Firmware::with_xsdt(&[qemu_like()]);
    fw.put(ROOT_AT, &xsdt(&[0, TABLES_AT]));
    assert_eq!(
        fw.discover().unwrap_err(),
        MadtError::Malformed {
            table: XSDT,
            reason: "table at physical address 0"
        }
    );
    // An OEM ID that is not text.
    let mut fw = Firmware::with_xsdt(&[qemu_like()]);
    let mut root = xsdt(&[TABLES_AT]);
    root[10] = 0xff;
    let len = root.len();
    set_checksum(&mut root, 9, 0..len);
    fw.put(ROOT_AT, &root);
    assert!(matches!(
        fw.discover().unwrap_err(),
        MadtError::Malformed { table: XSDT, .. }
    ));
}

#[test]
fn madt_length_larger_than_its_entries() {
    // The length field claims 32 more bytes than the entries fill; the
    // checksum covers the claimed length (zeros).
    let table = with_length(qemu_like(), qemu_like().len() as u32 + 32);
    assert_eq!(
        Firmware::with_xsdt(&[table]).discover().unwrap_err(),
        malformed("entry shorter than its header")
    );
    // One stray byte: an entry header cut off.
    let table = with_length(qemu_like(), qemu_like().len() as u32 + 1);
    assert_eq!(
        Firmware::with_xsdt(&[table]).discover().unwrap_err(),
        malformed("entry header cut off at the end of the table")
    );
}

#[test]
fn madt_entry_overrunning_the_table() {
    let mut entry = x2apic(1, 1, ENABLED);
    entry[1] = 40;
    let table = madt(&[lapic(0, 0, ENABLED), entry]);
    assert_eq!(
        Firmware::with_xsdt(&[table]).discover().unwrap_err(),
        malformed("entry runs past the end of the table")
    );
    // The length field cuts the last entry short.
    let full = madt(&[lapic(0, 0, ENABLED), x2apic(1, 1, ENABLED)]);
    let table = with_length(full.clone(), full.len() as u32 - 4);
    assert_eq!(
        Firmware::with_xsdt(&[table[..full.len() - 4].to_vec()])
            .discover()
            .unwrap_err(),
        malformed("entry runs past the end of the table")
    );
}

#[test]
fn madt_entries_with_bad_lengths() {
    // Zero length: the acpi crate would loop forever on it.
    let table = madt(&[lapic(0, 0, ENABLED), vec![0, 0, 0, 0, 0, 0, 0, 0]]);
    assert_eq!(
        Firmware::with_xsdt(&[table]).discover().unwrap_err(),
        malformed("entry shorter than its header")
    );
    // A Local APIC entry too short for its fields.
    let table = madt(&[vec![0, 4, 0, 0]]);
    assert_eq!(
        Firmware::with_xsdt(&[table]).discover().unwrap_err(),
        malformed("entry shorter than its type requires")
    );
    // A Local x2APIC entry of xAPIC size.
    let mut short = x2apic(300, 0, ENABLED);
    short[1] = 8;
    short.truncate(8);
    let table = madt(&[short]);
    assert_eq!(
        Firmware::with_xsdt(&[table]).discover().unwrap_err(),
        malformed("entry shorter than its type requires")
    );
}

#[test]
fn madt_header_lengths_out_of_range() {
    // Shorter than the MADT header (checksum valid over the claimed bytes),
    // and absurdly long: refused before the table is mapped whole.
    for len in [0, 36, 43, MAX_TABLE_LEN + 1, 0xffff_ffff] {
        let table = with_length(madt(&[]), len);
        let table = table[..table.len().min(64)].to_vec();
        assert_eq!(
            Firmware::with_xsdt(&[table]).discover().unwrap_err(),
            malformed("length out of range"),
            "length {len}"
        );
    }
    // An empty MADT (header only) is valid and lists nothing.
    let t = Firmware::with_xsdt(&[madt(&[])]).discover().unwrap();
    assert_eq!(t.processors().len(), 0);
    assert_eq!(t.bsp_index(0), None);
}

/// The mutation test's generator: the workspace's seeded one (fastrand).
struct Rng(fastrand::Rng);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }
}

#[test]
fn mutated_madts_never_panic() {
    let base = madt(&[
        lapic(0, 0, ENABLED),
        x2apic(300, 1, ENABLED),
        ioapic(0, 0xfec0_0000, 0),
        interrupt_override(0, 0, 2, 0),
        lapic_address_override(0xfee0_0000),
        lapic_nmi(0xff, 1),
    ]);
    let mut rng = Rng(fastrand::Rng::with_seed(42));
    let (mut ok, mut rejected) = (0, 0);
    for _ in 0..3000 {
        let mut table = base.clone();
        for _ in 0..1 + rng.next() % 4 {
            // Mostly the entries, sometimes the length field.
            let at = if rng.next().is_multiple_of(8) {
                4 + (rng.next() % 4) as usize
            } else {
                44 + (rng.next() as usize) % (table.len() - 44)
            };
            table[at] = rng.next() as u8;
        }
        // Keep the length within what the memory layout holds, then make the
        // checksum right so the structure checks are what is exercised.
        let len = u32::from_le_bytes(table[4..8].try_into().unwrap());
        if len as usize > TABLE_STRIDE as usize {
            table[4..8].copy_from_slice(&(TABLE_STRIDE as u32 + 1).to_le_bytes());
        }
        let checked =
            (u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize).min(table.len());
        set_checksum(&mut table, 9, 0..checked.max(10));
        match Firmware::with_xsdt(&[table]).discover() {
            Ok(t) => {
                ok += 1;
                assert!(t.processors().len() <= MAX_CPUS);
            }
            Err(_) => rejected += 1,
        }
    }
    assert!(ok > 100 && rejected > 100, "ok {ok}, rejected {rejected}");
}

#[test]
fn bios_search_finds_the_rsdp() {
    let memory = |fw: Firmware| TestMemory {
        bytes: fw.bytes.into(),
    };
    // In the BIOS area, after a decoy with a bad checksum.
    let mut fw = Firmware::with_xsdt(&[qemu_like()]);
    let mut decoy = rsdp_v2(ROOT_AT);
    decoy[12] ^= 1;
    fw.put(0xe_0000, &decoy).put(0xe_0040, &rsdp_v2(ROOT_AT));
    // SAFETY: `TestMemory` maps any in-buffer range and panics otherwise.
    assert_eq!(unsafe { find_rsdp_bios(memory(fw)) }, Some(0xe_0040));
    // In the EBDA, which is searched first.
    let mut fw = Firmware::with_xsdt(&[qemu_like()]);
    fw.put(0x40e, &0x9fc0u16.to_le_bytes())
        .put(0x9_fc40, &rsdp_v2(ROOT_AT));
    // SAFETY: as above.
    assert_eq!(unsafe { find_rsdp_bios(memory(fw)) }, Some(0x9_fc40));
    // Nowhere.
    let mut fw = Firmware::with_xsdt(&[qemu_like()]);
    fw.put(0xf_ffff, &[0]);
    // SAFETY: as above.
    assert_eq!(unsafe { find_rsdp_bios(memory(fw)) }, None);
}

#[test]
fn errors_display() {
    use std::string::ToString;
    assert_eq!(MadtError::NoRsdp.to_string(), "no ACPI RSDP found");
    assert_eq!(
        MadtError::NoMadt.to_string(),
        "no MADT (APIC) table in the ACPI tables"
    );
    assert_eq!(
        MadtError::BadChecksum(MADT).to_string(),
        "ACPI APIC table checksum is wrong"
    );
    assert_eq!(
        malformed("entry runs past the end of the table").to_string(),
        "malformed ACPI APIC table: entry runs past the end of the table"
    );
    assert_eq!(Signature([b'A', 0, b'\n', b'Z']).to_string(), "A??Z");
    assert_eq!(
        MadtError::BadRsdpChecksum.to_string(),
        "ACPI RSDP checksum is wrong"
    );
}

#[test]
fn madt_with_non_text_oem_fields_is_skipped_like_the_acpi_crate_does() {
    // A UTF-8 sequence split across OEM ID and OEM table ID: each field on
    // its own is not text, so the acpi crate would skip this table.
    let mut odd = qemu_like();
    odd[15] = 0xc3;
    odd[16] = 0xa9;
    let len = odd.len();
    set_checksum(&mut odd, 9, 0..len);
    assert_eq!(
        Firmware::with_xsdt(&[odd.clone()]).discover().unwrap_err(),
        MadtError::NoMadt
    );
    let t = Firmware::with_xsdt(&[odd, madt(&[lapic(0, 4, ENABLED)])])
        .discover()
        .unwrap();
    assert_eq!(ids(&t), [4]);
}
