//! ACPI tables in guest memory, as firmware would leave them: an RSDP in
//! the BIOS area (where kvm-unit-tests' `get_rsdp` scans, 0xE0000-0xFFFFF
//! on 16-byte boundaries), RSDT and XSDT, a FADT pointing at the PM timer
//! and PM1 blocks of [`crate::acpi_pm`] and at the 0xCF9 reset register, a
//! FACS, an empty DSDT, and a MADT with one local APIC per vCPU, the I/O
//! APIC, ISA IRQ 0 on GSI 2, the SCI (IRQ 9) level-triggered, and LINT1 as
//! every processor's NMI input.
//!
//! All of it fits in the page at [`RSDP_ADDRESS`], inside the reserved
//! legacy range of [`crate::multiboot::GuestLayout::pc`].

use crate::acpi_pm;
use crate::ioapic;
use crate::lapic;
use crate::memory::{GuestMemory, MemoryError};
use crate::platform::MAX_VCPUS;

/// Where the RSDP goes (the first place a BIOS-area scan looks).
pub const RSDP_ADDRESS: u64 = 0xE_0000;
/// The page holding every table.
pub const TABLES_LEN: usize = 4096;

const RSDT: usize = 0x40;
const XSDT: usize = 0x80;
const FACS: usize = 0xC0;
const DSDT: usize = 0x100;
const FADT: usize = 0x140;
const MADT: usize = 0x280;

const HEADER_LEN: usize = 36;
const FADT_LEN: usize = 276;
const _: () = assert!(FADT + FADT_LEN <= MADT && RSDT + 36 + 8 <= XSDT && XSDT + 36 + 16 <= FACS);
const OEM_ID: &[u8; 6] = b"HVRUST";
const OEM_TABLE_ID: &[u8; 8] = b"HVPLATFM";

/// The SCI's ISA IRQ.
pub const SCI_IRQ: u8 = 9;

/// Where each table went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiLayout {
    /// RSDP.
    pub rsdp: u64,
    /// FADT.
    pub fadt: u64,
    /// MADT.
    pub madt: u64,
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)))
}

/// Writes a table header at `at` for a table of `len` bytes; the checksum
/// is filled in by [`seal`] once the body is written.
fn header(buf: &mut [u8], at: usize, signature: &[u8; 4], len: usize, revision: u8) {
    put(buf, at, signature);
    put(buf, at + 4, &(len as u32).to_le_bytes());
    buf[at + 8] = revision;
    put(buf, at + 10, OEM_ID);
    put(buf, at + 16, OEM_TABLE_ID);
    put(buf, at + 24, &1u32.to_le_bytes());
    put(buf, at + 28, b"HVRS");
    put(buf, at + 32, &1u32.to_le_bytes());
}

fn seal(buf: &mut [u8], at: usize, len: usize) {
    buf[at + 9] = 0;
    buf[at + 9] = checksum(&buf[at..at + len]);
}

/// A Generic Address Structure for an I/O port block.
fn io_gas(bits: u8, access_size: u8, port: u16) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[0] = 1; // system I/O
    gas[1] = bits;
    gas[3] = access_size;
    gas[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    gas
}

/// The tables for `vcpus` vCPUs (APIC IDs 0..vcpus), as one page to place
/// at [`RSDP_ADDRESS`].
pub fn build(vcpus: usize) -> [u8; TABLES_LEN] {
    let vcpus = vcpus.clamp(1, MAX_VCPUS);
    let base = RSDP_ADDRESS;
    let mut t = [0u8; TABLES_LEN];

    // RSDP, revision 2 (ACPI 2.0+: with the XSDT).
    put(&mut t, 0, b"RSD PTR ");
    put(&mut t, 9, OEM_ID);
    t[15] = 2;
    put(&mut t, 16, &((base as usize + RSDT) as u32).to_le_bytes());
    put(&mut t, 20, &36u32.to_le_bytes());
    put(&mut t, 24, &(base + XSDT as u64).to_le_bytes());
    t[8] = checksum(&t[0..20]);
    t[32] = checksum(&t[0..36]);

    // RSDT and XSDT: FADT, MADT.
    let entries = [base + FADT as u64, base + MADT as u64];
    let rsdt_len = HEADER_LEN + 4 * entries.len();
    header(&mut t, RSDT, b"RSDT", rsdt_len, 1);
    let xsdt_len = HEADER_LEN + 8 * entries.len();
    header(&mut t, XSDT, b"XSDT", xsdt_len, 1);
    for (i, &entry) in entries.iter().enumerate() {
        put(
            &mut t,
            RSDT + HEADER_LEN + 4 * i,
            &(entry as u32).to_le_bytes(),
        );
        put(&mut t, XSDT + HEADER_LEN + 8 * i, &entry.to_le_bytes());
    }
    seal(&mut t, RSDT, rsdt_len);
    seal(&mut t, XSDT, xsdt_len);

    // FACS (no checksum), version 2.
    put(&mut t, FACS, b"FACS");
    put(&mut t, FACS + 4, &64u32.to_le_bytes());
    t[FACS + 32] = 2;

    // DSDT: a header and no AML.
    header(&mut t, DSDT, b"DSDT", HEADER_LEN, 2);
    seal(&mut t, DSDT, HEADER_LEN);

    // FADT, revision 6.
    header(&mut t, FADT, b"FACP", FADT_LEN, 6);
    let f = FADT;
    let facs = base + FACS as u64;
    let dsdt = base + DSDT as u64;
    put(&mut t, f + 36, &(facs as u32).to_le_bytes());
    put(&mut t, f + 40, &(dsdt as u32).to_le_bytes());
    put(&mut t, f + 46, &u16::from(SCI_IRQ).to_le_bytes());
    // SMI_CMD 0: no SMM, ACPI mode is always on (SCI_EN set).
    put(
        &mut t,
        f + 56,
        &u32::from(acpi_pm::PM1A_EVT_PORT).to_le_bytes(),
    );
    put(
        &mut t,
        f + 64,
        &u32::from(acpi_pm::PM1A_CNT_PORT).to_le_bytes(),
    );
    put(
        &mut t,
        f + 76,
        &u32::from(acpi_pm::PM_TMR_PORT).to_le_bytes(),
    );
    t[f + 88] = 4; // PM1_EVT_LEN
    t[f + 89] = 2; // PM1_CNT_LEN
    t[f + 91] = 4; // PM_TMR_LEN
    // IAPC_BOOT_ARCH: legacy devices (PIC, PIT, UART); no 8042, no VGA.
    put(&mut t, f + 109, &(1u16 | 1 << 2).to_le_bytes());
    // Flags: WBINVD, PROC_C1, power and sleep buttons absent (control
    // method), RESET_REG_SUP.
    let flags: u32 = 1 | 1 << 2 | 1 << 4 | 1 << 5 | 1 << 10;
    put(&mut t, f + 112, &flags.to_le_bytes());
    put(&mut t, f + 116, &io_gas(8, 1, 0xCF9));
    t[f + 128] = 0x06; // RESET_VALUE: hard reset
    t[f + 131] = 0; // minor version
    put(&mut t, f + 132, &facs.to_le_bytes());
    put(&mut t, f + 140, &dsdt.to_le_bytes());
    put(&mut t, f + 148, &io_gas(32, 2, acpi_pm::PM1A_EVT_PORT));
    put(&mut t, f + 172, &io_gas(16, 2, acpi_pm::PM1A_CNT_PORT));
    put(&mut t, f + 208, &io_gas(32, 3, acpi_pm::PM_TMR_PORT));
    put(&mut t, f + 268, b"hv\0\0\0\0\0\0");
    seal(&mut t, FADT, FADT_LEN);

    // MADT.
    let mut at = MADT + HEADER_LEN;
    put(&mut t, at, &(lapic::DEFAULT_BASE as u32).to_le_bytes());
    put(&mut t, at + 4, &1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present
    at += 8;
    for id in 0..vcpus {
        // Processor local APIC: UID, APIC ID, enabled.
        put(&mut t, at, &[0, 8, id as u8, id as u8, 1, 0, 0, 0]);
        at += 8;
    }
    // I/O APIC: ID 0, address, GSI base 0.
    put(&mut t, at, &[1, 12, 0, 0]);
    put(&mut t, at + 4, &(ioapic::BASE as u32).to_le_bytes());
    put(&mut t, at + 8, &0u32.to_le_bytes());
    at += 12;
    // ISA IRQ 0 -> GSI 2, conforming polarity and trigger.
    put(&mut t, at, &[2, 10, 0, 0]);
    put(&mut t, at + 4, &2u32.to_le_bytes());
    put(&mut t, at + 8, &0u16.to_le_bytes());
    at += 10;
    // SCI: active high, level-triggered.
    put(&mut t, at, &[2, 10, 0, SCI_IRQ]);
    put(&mut t, at + 4, &u32::from(SCI_IRQ).to_le_bytes());
    put(&mut t, at + 8, &0x000Du16.to_le_bytes());
    at += 10;
    // Local APIC NMI: all processors, LINT1.
    put(&mut t, at, &[4, 6, 0xFF, 0, 0, 1]);
    at += 6;
    let madt_len = at - MADT;
    header(&mut t, MADT, b"APIC", madt_len, 5);
    seal(&mut t, MADT, madt_len);
    t
}

/// Writes the tables for `vcpus` vCPUs into guest memory.
pub fn write(memory: &mut impl GuestMemory, vcpus: usize) -> Result<AcpiLayout, MemoryError> {
    memory.write(RSDP_ADDRESS, &build(vcpus))?;
    Ok(AcpiLayout {
        rsdp: RSDP_ADDRESS,
        fadt: RSDP_ADDRESS + FADT as u64,
        madt: RSDP_ADDRESS + MADT as u64,
    })
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use crate::memory::fake::VecMemory;
    use ::acpi::fadt::Fadt;
    use ::acpi::madt::{Madt, MadtEntry};
    use ::acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
    use core::ptr::NonNull;

    /// Maps "physical" addresses into a test's guest memory.
    #[derive(Clone)]
    struct Handler {
        base: *const u8,
        len: usize,
    }

    impl AcpiHandler for Handler {
        unsafe fn map_physical_region<T>(
            &self,
            physical_address: usize,
            size: usize,
        ) -> PhysicalMapping<Self, T> {
            assert!(
                physical_address + size <= self.len,
                "read past guest memory"
            );
            // SAFETY: 1. the address is inside the test's memory (checked
            // above), which outlives every mapping (the test keeps it
            // alive and unchanged while the tables are read); 2. the acpi
            // crate's table types are packed, so any address is aligned;
            // 3. the mapping covers exactly the `size` bytes asked for.
            unsafe {
                let virt = NonNull::new(self.base.add(physical_address) as *mut T).unwrap();
                PhysicalMapping::new(physical_address, virt, size, size, self.clone())
            }
        }

        fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    }

    fn tables(mem: &VecMemory) -> AcpiTables<Handler> {
        let handler = Handler {
            base: mem.0.as_ptr(),
            len: mem.0.len(),
        };
        // SAFETY: the handler maps only inside `mem`, which the caller keeps
        // alive and unchanged while the tables are used.
        unsafe { AcpiTables::from_rsdp(handler, RSDP_ADDRESS as usize) }.unwrap()
    }

    #[test]
    fn an_independent_parser_reads_the_tables() {
        let mut mem = VecMemory::new(2 << 20);
        write(&mut mem, 3).unwrap();
        let tables = tables(&mem);

        let fadt = tables.find_table::<Fadt>().unwrap();
        let timer = fadt.pm_timer_block().unwrap().unwrap();
        assert_eq!(timer.address, u64::from(acpi_pm::PM_TMR_PORT));
        assert_eq!(
            fadt.pm1a_event_block().unwrap().address,
            u64::from(acpi_pm::PM1A_EVT_PORT)
        );
        assert_eq!(
            fadt.pm1a_control_block().unwrap().address,
            u64::from(acpi_pm::PM1A_CNT_PORT)
        );
        assert_eq!(fadt.reset_register().unwrap().address, 0xCF9);
        let flags = { fadt.flags };
        assert!(flags.supports_system_reset_via_fadt());
        assert!(!flags.pm_timer_is_32_bit(), "24-bit timer");
        assert_eq!(fadt.dsdt_address().unwrap(), RSDP_ADDRESS as usize + DSDT);
        assert_eq!(fadt.facs_address().unwrap(), RSDP_ADDRESS as usize + FACS);
        assert!(tables.dsdt().is_ok());

        let madt = tables.find_table::<Madt>().unwrap();
        let madt = madt.get();
        assert!(madt.supports_8259());
        let mut apic_ids = Vec::new();
        let mut ioapics = Vec::new();
        let mut overrides = Vec::new();
        let mut nmis = Vec::new();
        for entry in madt.entries() {
            match entry {
                MadtEntry::LocalApic(e) => {
                    assert_eq!({ e.flags } & 1, 1, "enabled");
                    apic_ids.push(e.apic_id);
                }
                MadtEntry::IoApic(e) => {
                    ioapics.push(({ e.io_apic_address }, { e.global_system_interrupt_base }))
                }
                MadtEntry::InterruptSourceOverride(e) => {
                    overrides.push((e.irq, { e.global_system_interrupt }, { e.flags }))
                }
                MadtEntry::LocalApicNmi(e) => nmis.push((e.processor_id, e.nmi_line)),
                other => panic!("unexpected MADT entry {other:?}"),
            }
        }
        assert_eq!(apic_ids, [0, 1, 2]);
        assert_eq!(ioapics, [(ioapic::BASE as u32, 0)]);
        assert_eq!(overrides, [(0, 2, 0), (9, 9, 0xD)]);
        assert_eq!(nmis, [(0xFF, 1)]);
    }

    #[test]
    fn kvm_unit_tests_find_the_pm_timer_the_way_they_look() {
        // lib/acpi.c: scan 0xE0000.. for "RSD PTR ", follow the XSDT
        // (revision >= 2), find "FACP", read pm_tmr_blk at offset 76.
        let mut mem = VecMemory::new(2 << 20);
        write(&mut mem, 1).unwrap();
        let rsdp = (0xE_0000..0x10_0000)
            .step_by(16)
            .find(|&a| mem.bytes(a, 8) == b"RSD PTR ")
            .unwrap();
        assert!(
            mem.bytes(rsdp, 20)
                .iter()
                .fold(0u8, |s, &b| s.wrapping_add(b))
                == 0
        );
        assert!(
            mem.bytes(rsdp, 36)
                .iter()
                .fold(0u8, |s, &b| s.wrapping_add(b))
                == 0
        );
        let xsdt = mem.u64_at(rsdp + 24);
        assert_eq!(mem.bytes(xsdt, 4), b"XSDT");
        let len = u64::from(mem.u32_at(xsdt + 4));
        let fadt = (xsdt + 36..xsdt + len)
            .step_by(8)
            .map(|at| mem.u64_at(at))
            .find(|&t| mem.bytes(t, 4) == b"FACP")
            .unwrap();
        assert_eq!(mem.u32_at(fadt + 76), u32::from(acpi_pm::PM_TMR_PORT));
    }

    #[test]
    fn every_table_sums_to_zero_and_fits_for_the_largest_guest() {
        let page = build(MAX_VCPUS);
        for at in [RSDT, XSDT, DSDT, FADT, MADT] {
            let len = u32::from_le_bytes(page[at + 4..at + 8].try_into().unwrap()) as usize;
            assert!(at + len <= TABLES_LEN);
            assert_eq!(
                page[at..at + len]
                    .iter()
                    .fold(0u8, |s, &b| s.wrapping_add(b)),
                0,
                "{at:#x}"
            );
        }
    }
}
