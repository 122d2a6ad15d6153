//! The purgatory's installation: at boot, its code (assembled in
//! `arch::blobs`), parameters, own GDT, own identity page tables (first
//! 4 GiB) and own stack go into the last [`AREA_BYTES`] of the crash
//! reservation, all digested with the capture kernel, so the jump depends
//! on nothing of the crashed hypervisor's state but the instruction that
//! reaches it.
//!
//! Two ways out:
//! - Linux 64-bit boot protocol: CS = 0x10, DS/ES/SS = 0x18, RSI = the
//!   zero page, jump to `startup_64`, paging on with an identity map.
//! - PVH (the hv image in capture mode): down to compatibility mode, paging
//!   off, EFER.LME off, then the 32-bit PVH entry with EBX = start info.

use crate::arch::blobs::{
    MODE_LINUX64, MODE_PVH32, PURGATORY_AREA_BYTES, PURGATORY_CODE_BYTES, PurgatoryParameters,
    purgatory_code,
};
use crate::mm::phys;

/// Bytes the purgatory takes at the end of the reservation.
pub const AREA_BYTES: u64 = PURGATORY_AREA_BYTES;
const PAGE: u64 = 4096;
/// Page tables: PML4, PDPT, 4 page directories.
const TABLES_OFFSET: u64 = PAGE;
const TABLE_PAGES: u64 = 6;
/// Room for the PVH start info, its memory map and command line.
pub const BOOT_DATA_OFFSET: u64 = TABLES_OFFSET + TABLE_PAGES * PAGE;
/// Bytes of that room.
pub const BOOT_DATA_BYTES: u64 = 2 * PAGE;

/// How the purgatory enters the capture kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Linux 64-bit boot protocol: `entry` in long mode, RSI = zero page.
    Linux64 {
        /// `startup_64`.
        entry: u64,
        /// The zero page.
        zero_page: u64,
    },
    /// PVH: `entry` in 32-bit protected mode, EBX = `hvm_start_info`.
    Pvh32 {
        /// The 32-bit PVH entry.
        entry: u32,
        /// The start info.
        start_info: u32,
    },
}

/// The parameters as the purgatory's code reads them.
fn parameters(area: u64, entry: Entry) -> PurgatoryParameters {
    let (mode, entry_address, argument) = match entry {
        Entry::Linux64 { entry, zero_page } => (MODE_LINUX64, entry, zero_page),
        Entry::Pvh32 { entry, start_info } => (MODE_PVH32, u64::from(entry), u64::from(start_info)),
    };
    let gdt_address = area + PURGATORY_CODE_BYTES as u64;
    PurgatoryParameters {
        gdt: [
            0,
            0x00CF_9A00_0000_FFFF,
            0x00AF_9A00_0000_FFFF,
            0x00CF_9200_0000_FFFF,
        ],
        gdtr: [
            31,
            gdt_address as u16,
            (gdt_address >> 16) as u16,
            (gdt_address >> 32) as u16,
            (gdt_address >> 48) as u16,
        ],
        mode,
        cr3: area + TABLES_OFFSET,
        entry: entry_address,
        argument,
    }
}

/// Writes the purgatory (code, parameters, page tables) into `area`, the
/// last [`AREA_BYTES`] of the reservation (memory the kernel owns, below
/// 4 GiB). Returns the bytes to digest: code, parameters and page tables.
pub fn install(area: u64, entry: Entry) -> &'static [u8] {
    let digested = TABLES_OFFSET + TABLE_PAGES * PAGE;
    phys::fill(area, digested, 0);
    phys::write(area, purgatory_code());
    let parameters = parameters(area, entry);
    let mut bytes = [0u8; core::mem::size_of::<PurgatoryParameters>()];
    let mut at = 0;
    let mut put = |value: &[u8]| {
        bytes[at..at + value.len()].copy_from_slice(value);
        at += value.len();
    };
    // `#[repr(C)]` order: gdt, gdtr (10 bytes, then padding to 8), mode,
    // cr3, entry, argument.
    for descriptor in parameters.gdt {
        put(&descriptor.to_le_bytes());
    }
    for half in parameters.gdtr {
        put(&half.to_le_bytes());
    }
    put(&[0; 6]);
    for word in [
        parameters.mode,
        parameters.cr3,
        parameters.entry,
        parameters.argument,
    ] {
        put(&word.to_le_bytes());
    }
    debug_assert_eq!(at, bytes.len());
    phys::write(area + PURGATORY_CODE_BYTES as u64, &bytes);
    let pml4 = area + TABLES_OFFSET;
    let pdpt = pml4 + PAGE;
    phys::write(pml4, &(pdpt | 3).to_le_bytes());
    for directory in 0..4u64 {
        let pd = area + TABLES_OFFSET + (2 + directory) * PAGE;
        phys::write(pdpt + directory * 8, &(pd | 3).to_le_bytes());
        for slot in 0..512u64 {
            let address = (directory * 512 + slot) << 21;
            phys::write(pd + slot * 8, &(address | 0x83).to_le_bytes());
        }
    }
    phys::read(area, digested)
}

const _: () = assert!(core::mem::size_of::<PurgatoryParameters>() == 4 * 8 + 16 + 4 * 8);
