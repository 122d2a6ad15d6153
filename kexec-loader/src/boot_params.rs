//! The zero page (`struct boot_params`) for the 64-bit boot protocol, and
//! the e820 map it carries to the capture kernel.
//!
//! # What the capture kernel is told about memory
//! The same as Linux's own `kexec_file_load` tells a crash kernel
//! (`crash_setup_memmap_entries` in `arch/x86/kernel/crash.c`):
//! - the low 1 MiB as the firmware described it: usable parts usable,
//!   reserved, ACPI and unusable parts as they were (SMP trampolines and
//!   BIOS data live there);
//! - every ACPI table (type 3) and ACPI NVS (type 4) range, as it was, so
//!   the capture kernel can read the ACPI tables;
//! - every firmware-reserved range (type 2) as reserved, so the capture
//!   kernel never puts a PCI BAR over MMCONFIG, the IOAPIC or the HPET;
//! - the crash reservation as usable RAM, except the ELF core header region
//!   in it, which is reserved so that the capture kernel (and its KASLR,
//!   which reads this map) never overwrites it before `/proc/vmcore` has
//!   read it.
//!
//! All other RAM (the crashed hypervisor's memory) is left out: the capture
//! kernel reaches it only through the ELF core header, as "old memory". The
//! command line repeats the core header reservation as `memmap=SIZE$ADDR`
//! (see [`crate::cmdline`]): that is what kexec-tools does and what was
//! checked against the Debian kernel; it marks the same range as this map,
//! so the two agree.

use core::fmt;

use crate::PhysRange;
use crate::bytes::{self, OutOfBounds};
use crate::bzimage::{self, BzImage, hdr};

/// Size of the zero page.
pub const ZERO_PAGE_SIZE: usize = 4096;
/// Entries the zero page's e820 table holds (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const E820_MAX_ENTRIES: usize = 128;
/// The end of the low memory that is passed through as the firmware had it.
pub const LOW_MEMORY_END: u64 = 1 << 20;
/// `type_of_loader` 0xFF: "undefined" in the boot protocol.
pub const TYPE_OF_LOADER_UNDEFINED: u8 = 0xFF;

pub use hv_abi::e820::{E820_ACPI, E820_NVS, E820_RAM, E820_RESERVED, E820_UNUSABLE};

/// Offsets of the `struct boot_params` fields outside the setup header
/// (`arch/x86/include/uapi/asm/bootparam.h`; the setup-header fields are in
/// [`bzimage::hdr`]). Checked against the `linux-boot-params` crate in the
/// tests.
pub mod zp {
    /// `acpi_rsdp_addr`.
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    /// `ext_ramdisk_image`: high 32 bits of the initrd address.
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    /// `ext_ramdisk_size`: high 32 bits of the initrd size.
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    /// `ext_cmd_line_ptr`: high 32 bits of the command-line address.
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    /// `e820_entries`.
    pub const E820_ENTRIES: usize = 0x1e8;
    /// `sentinel`: must stay 0, or the kernel clears fields it thinks a
    /// broken loader left behind.
    pub const SENTINEL: usize = 0x1ef;
    /// `e820_table`: 128 entries of 20 bytes (addr u64, size u64, type u32).
    pub const E820_TABLE: usize = 0x2d0;
    /// Size of one `boot_e820_entry`.
    pub const E820_ENTRY_SIZE: usize = 20;
}

/// One e820 entry: `[addr, addr + size)` of type `kind` (the raw e820 type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type ([`E820_RAM`], [`E820_RESERVED`], ...).
    pub kind: u32,
}

impl E820Entry {
    /// An entry.
    pub const fn new(addr: u64, size: u64, kind: u32) -> Self {
        Self { addr, size, kind }
    }

    const EMPTY: Self = Self::new(0, 0, 0);

    /// One past the last byte, saturating at the end of the address space.
    fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }

    fn range(&self) -> PhysRange {
        PhysRange::new(self.addr, self.end() - self.addr)
    }
}

/// Why the zero page or its e820 map could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootParamsError {
    /// The crash reservation is empty or its end overflows.
    BadReservation(PhysRange),
    /// The crash reservation starts below 1 MiB, which is passed through
    /// from the firmware map as it was.
    ReservationInLowMemory(PhysRange),
    /// Part of the crash reservation is not usable RAM in the firmware map.
    ReservationNotRam {
        /// The reservation.
        reservation: PhysRange,
        /// The first address not covered by usable RAM.
        hole: u64,
    },
    /// A non-RAM firmware range overlaps the crash reservation.
    ReservationOverlapsFirmwareRange {
        /// The reservation.
        reservation: PhysRange,
        /// The firmware entry.
        entry: E820Entry,
    },
    /// The ELF core header region is empty, not page-aligned or not inside
    /// the reservation.
    BadElfCoreHeaderRange {
        /// The region.
        elfcorehdr: PhysRange,
        /// The reservation.
        reservation: PhysRange,
    },
    /// More than [`E820_MAX_ENTRIES`] entries would be needed.
    TooManyE820Entries,
    /// The output buffer is smaller than [`ZERO_PAGE_SIZE`].
    BufferTooSmall(usize),
    /// The command line is longer than the kernel's `cmdline_size`.
    CmdlineTooLong {
        /// Its length, without the NUL.
        len: usize,
        /// The kernel's `cmdline_size`.
        max: u32,
    },
    /// The command line address is 0, which means "no command line".
    CmdlineAtZero,
    /// The command line's end overflows the address space.
    CmdlineOverflows(u64),
    /// The initrd is empty or its end overflows.
    BadInitrd(PhysRange),
}

impl fmt::Display for BootParamsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadReservation(r) => write!(f, "the crash reservation {r} is empty or overflows"),
            Self::ReservationInLowMemory(r) => {
                write!(f, "the crash reservation {r} starts below 1 MiB")
            }
            Self::ReservationNotRam { reservation, hole } => write!(
                f,
                "the crash reservation {reservation} is not usable RAM at {hole:#x}"
            ),
            Self::ReservationOverlapsFirmwareRange { reservation, entry } => write!(
                f,
                "the crash reservation {reservation} overlaps firmware range {} of e820 type {}",
                entry.range(),
                entry.kind
            ),
            Self::BadElfCoreHeaderRange {
                elfcorehdr,
                reservation,
            } => write!(
                f,
                "the ELF core header region {elfcorehdr} is empty, not page-aligned or outside the reservation {reservation}"
            ),
            Self::TooManyE820Entries => write!(
                f,
                "the capture kernel's memory map needs more than {E820_MAX_ENTRIES} e820 entries"
            ),
            Self::BufferTooSmall(len) => write!(
                f,
                "a {len}-byte buffer cannot hold the {ZERO_PAGE_SIZE}-byte zero page"
            ),
            Self::CmdlineTooLong { len, max } => write!(
                f,
                "the {len}-byte command line is longer than the kernel's cmdline_size {max}"
            ),
            Self::CmdlineAtZero => write!(f, "the command line address is 0"),
            Self::CmdlineOverflows(addr) => {
                write!(
                    f,
                    "the command line at {addr:#x} overflows the address space"
                )
            }
            Self::BadInitrd(r) => write!(f, "the initrd {r} is empty or overflows"),
        }
    }
}

/// The capture kernel's e820 map (see the module docs), sorted by address.
#[derive(Clone, Debug)]
pub struct E820Table {
    entries: [E820Entry; E820_MAX_ENTRIES],
    len: usize,
}

impl E820Table {
    fn push(&mut self, addr: u64, end: u64, kind: u32) -> Result<(), BootParamsError> {
        if end <= addr {
            return Ok(());
        }
        let slot = self
            .entries
            .get_mut(self.len)
            .ok_or(BootParamsError::TooManyE820Entries)?;
        *slot = E820Entry::new(addr, end - addr, kind);
        self.len += 1;
        Ok(())
    }

    /// The map for a capture kernel living in `reservation`, given the
    /// firmware's map (`firmware`, in any order, as the boot loader gave
    /// it) and the ELF core header region (page-aligned, inside the
    /// reservation).
    pub fn for_capture(
        firmware: &[E820Entry],
        reservation: PhysRange,
        elfcorehdr: PhysRange,
    ) -> Result<Self, BootParamsError> {
        use BootParamsError as E;
        let res_end = match reservation.end() {
            Some(end) if reservation.len > 0 => end,
            _ => return Err(E::BadReservation(reservation)),
        };
        if reservation.start < LOW_MEMORY_END {
            return Err(E::ReservationInLowMemory(reservation));
        }
        if elfcorehdr.len == 0
            || !elfcorehdr.is_page_aligned()
            || !reservation.contains(&elfcorehdr)
        {
            return Err(E::BadElfCoreHeaderRange {
                elfcorehdr,
                reservation,
            });
        }
        check_reservation_is_ram(firmware, reservation, res_end)?;

        let mut table = Self {
            entries: [E820Entry::EMPTY; E820_MAX_ENTRIES],
            len: 0,
        };
        for entry in firmware.iter().filter(|e| e.size > 0) {
            let end = entry.end();
            if entry.addr < LOW_MEMORY_END {
                let kind = match entry.kind {
                    E820_RAM | E820_RESERVED | E820_ACPI | E820_NVS | E820_UNUSABLE => entry.kind,
                    _ => E820_RESERVED,
                };
                table.push(entry.addr, end.min(LOW_MEMORY_END), kind)?;
            }
            if matches!(entry.kind, E820_RESERVED | E820_ACPI | E820_NVS) {
                table.push(entry.addr.max(LOW_MEMORY_END), end, entry.kind)?;
            }
        }
        // `contains` above guarantees these do not overflow.
        let hdr_end = elfcorehdr.start + elfcorehdr.len;
        table.push(reservation.start, elfcorehdr.start, E820_RAM)?;
        table.push(elfcorehdr.start, hdr_end, E820_RESERVED)?;
        table.push(hdr_end, res_end, E820_RAM)?;
        table.sort();
        Ok(table)
    }

    /// Insertion sort by address: at most 128 entries, no allocation.
    fn sort(&mut self) {
        let entries = &mut self.entries[..self.len];
        for i in 1..entries.len() {
            let mut j = i;
            while j > 0 && entries[j - 1].addr > entries[j].addr {
                entries.swap(j - 1, j);
                j -= 1;
            }
        }
    }

    /// The entries, sorted by address.
    pub fn entries(&self) -> &[E820Entry] {
        self.entries.get(..self.len).unwrap_or_default()
    }
}

/// Checks that `[reservation.start, res_end)` is covered by firmware RAM
/// and touched by no other firmware range. Quadratic in the number of
/// entries, which is small, and needs no sorting.
pub(crate) fn check_reservation_is_ram(
    firmware: &[E820Entry],
    reservation: PhysRange,
    res_end: u64,
) -> Result<(), BootParamsError> {
    if let Some(entry) = firmware
        .iter()
        .find(|e| e.kind != E820_RAM && e.range().overlaps(&reservation))
    {
        return Err(BootParamsError::ReservationOverlapsFirmwareRange {
            reservation,
            entry: *entry,
        });
    }
    let mut covered = reservation.start;
    // Each round moves `covered` past the end of at least one more entry.
    for _ in 0..=firmware.len() {
        if covered >= res_end {
            return Ok(());
        }
        let next = firmware
            .iter()
            .filter(|e| e.kind == E820_RAM && e.addr <= covered && covered < e.end())
            .map(E820Entry::end)
            .max();
        match next {
            Some(end) => covered = end,
            None => break,
        }
    }
    if covered >= res_end {
        return Ok(());
    }
    Err(BootParamsError::ReservationNotRam {
        reservation,
        hole: covered,
    })
}

/// What goes into the zero page besides the setup header.
#[derive(Clone, Copy, Debug)]
pub struct ZeroPageConfig<'a> {
    /// Physical address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Its length without the NUL (at most the kernel's `cmdline_size`).
    pub cmdline_len: usize,
    /// The initrd, if any.
    pub initrd: Option<PhysRange>,
    /// The ACPI RSDP, if the hypervisor found one; the capture kernel
    /// cannot search the BIOS area for it if it was found through EFI.
    pub acpi_rsdp_addr: Option<u64>,
    /// The capture kernel's memory map.
    pub e820: &'a E820Table,
}

/// Builds the zero page for `image` into `out[..ZERO_PAGE_SIZE]`.
///
/// The setup header is copied from the image as-is (so the kernel sees its
/// own `init_size`, `kernel_alignment` and so on), then the loader fields
/// are set: `type_of_loader` 0xFF, `loadflags` = `LOADED_HIGH` only (no
/// real-mode heap: `CAN_USE_HEAP` and `heap_end_ptr` only matter to the
/// 16-bit setup code, which the 64-bit entry skips), the command line and
/// initrd with their high halves in the `ext_` fields, `acpi_rsdp_addr` and
/// the e820 table. Everything else is zero, `sentinel` included.
pub fn build_zero_page(
    image: &BzImage<'_>,
    config: &ZeroPageConfig<'_>,
    out: &mut [u8],
) -> Result<(), BootParamsError> {
    use BootParamsError as E;
    let out_len = out.len();
    let page = out
        .get_mut(..ZERO_PAGE_SIZE)
        .ok_or(E::BufferTooSmall(out_len))?;
    if config.cmdline_len > image.cmdline_size() as usize {
        return Err(E::CmdlineTooLong {
            len: config.cmdline_len,
            max: image.cmdline_size(),
        });
    }
    if config.cmdline_addr == 0 {
        return Err(E::CmdlineAtZero);
    }
    config
        .cmdline_addr
        .checked_add(config.cmdline_len as u64 + 1)
        .ok_or(E::CmdlineOverflows(config.cmdline_addr))?;
    let initrd = config.initrd.unwrap_or(PhysRange::new(0, 0));
    if config.initrd.is_some() && (initrd.len == 0 || initrd.end().is_none()) {
        return Err(E::BadInitrd(initrd));
    }

    page.fill(0);
    // Every offset below is a constant inside the page; a failure would be
    // a bug here, reported as a too-small buffer rather than a panic.
    let fill = |page: &mut [u8]| -> Result<(), OutOfBounds> {
        bytes::put(page, hdr::START, image.setup_header())?;
        bytes::put_u8(page, hdr::TYPE_OF_LOADER, TYPE_OF_LOADER_UNDEFINED)?;
        bytes::put_u8(page, hdr::LOADFLAGS, bzimage::LOADED_HIGH)?;
        bytes::put_u16(page, hdr::HEAP_END_PTR, 0)?;
        let (low, high) = split(config.cmdline_addr);
        bytes::put_u32(page, hdr::CMD_LINE_PTR, low)?;
        bytes::put_u32(page, zp::EXT_CMD_LINE_PTR, high)?;
        let (low, high) = split(initrd.start);
        bytes::put_u32(page, hdr::RAMDISK_IMAGE, low)?;
        bytes::put_u32(page, zp::EXT_RAMDISK_IMAGE, high)?;
        let (low, high) = split(initrd.len);
        bytes::put_u32(page, hdr::RAMDISK_SIZE, low)?;
        bytes::put_u32(page, zp::EXT_RAMDISK_SIZE, high)?;
        bytes::put_u64(page, zp::ACPI_RSDP_ADDR, config.acpi_rsdp_addr.unwrap_or(0))?;
        let entries = config.e820.entries();
        // At most E820_MAX_ENTRIES (128): fits the u8.
        bytes::put_u8(page, zp::E820_ENTRIES, entries.len() as u8)?;
        for (i, entry) in entries.iter().enumerate() {
            let at = zp::E820_TABLE + i * zp::E820_ENTRY_SIZE;
            bytes::put_u64(page, at, entry.addr)?;
            bytes::put_u64(page, at + 8, entry.size)?;
            bytes::put_u32(page, at + 16, entry.kind)?;
        }
        Ok(())
    };
    fill(page).map_err(|OutOfBounds| E::BufferTooSmall(out_len))
}

/// `(low 32 bits, high 32 bits)`.
fn split(value: u64) -> (u32, u32) {
    (value as u32, (value >> 32) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::{u8_at, u32_at, u64_at};
    use crate::testutil::FakeBzImage;
    use core::mem::offset_of;
    use linux_boot_params::{BootParams, SetupHeader};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A QEMU-like firmware map: low RAM, the VGA/BIOS hole, RAM to 3 GiB,
    /// ACPI tables and NVS at its top, the PCI hole, RAM above 4 GiB.
    fn firmware_map() -> Vec<E820Entry> {
        vec![
            E820Entry::new(0, 0x9fc00, E820_RAM),
            E820Entry::new(0x9fc00, 0x400, E820_RESERVED),
            E820Entry::new(0xf0000, 0x10000, E820_RESERVED),
            E820Entry::new(0x10_0000, 3 * GIB - 0x10_0000 - 2 * MIB, E820_RAM),
            E820Entry::new(3 * GIB - 2 * MIB, MIB, E820_ACPI),
            E820Entry::new(3 * GIB - MIB, MIB, E820_NVS),
            E820Entry::new(0xfeff_c000, 0x4000, E820_RESERVED),
            E820Entry::new(4 * GIB, 4 * GIB, E820_RAM),
        ]
    }

    fn reservation() -> PhysRange {
        PhysRange::new(GIB, 256 * MIB)
    }

    fn elfcorehdr() -> PhysRange {
        PhysRange::new(GIB + 0x40_0000, 0x3000)
    }

    #[test]
    fn the_capture_map_has_low_memory_acpi_reserved_and_the_reservation_only() {
        let table = E820Table::for_capture(&firmware_map(), reservation(), elfcorehdr()).unwrap();
        assert_eq!(
            table.entries(),
            &[
                E820Entry::new(0, 0x9fc00, E820_RAM),
                E820Entry::new(0x9fc00, 0x400, E820_RESERVED),
                E820Entry::new(0xf0000, 0x10000, E820_RESERVED),
                E820Entry::new(GIB, 0x40_0000, E820_RAM),
                E820Entry::new(GIB + 0x40_0000, 0x3000, E820_RESERVED),
                E820Entry::new(GIB + 0x40_3000, 256 * MIB - 0x40_3000, E820_RAM),
                E820Entry::new(3 * GIB - 2 * MIB, MIB, E820_ACPI),
                E820Entry::new(3 * GIB - MIB, MIB, E820_NVS),
                E820Entry::new(0xfeff_c000, 0x4000, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn a_firmware_range_across_1_mib_is_split_and_unknown_low_types_become_reserved() {
        let firmware = [
            E820Entry::new(0, 0x8_0000, 0x1234),
            E820Entry::new(0xe_0000, 0x4_0000, E820_ACPI),
            E820Entry::new(0xe_0000, 0x2_0000, E820_UNUSABLE),
            E820Entry::new(MIB, GIB, E820_RAM),
            E820Entry::new(2 * GIB, MIB, 7), // persistent memory: left out
            E820Entry::new(3 * GIB, 0, E820_RESERVED), // empty: dropped
        ];
        let reservation = PhysRange::new(16 * MIB, 64 * MIB);
        let hdr = PhysRange::new(16 * MIB, 0x1000);
        let table = E820Table::for_capture(&firmware, reservation, hdr).unwrap();
        assert_eq!(
            table.entries(),
            &[
                E820Entry::new(0, 0x8_0000, E820_RESERVED),
                E820Entry::new(0xe_0000, 0x2_0000, E820_ACPI),
                E820Entry::new(0xe_0000, 0x2_0000, E820_UNUSABLE),
                E820Entry::new(MIB, 0x2_0000, E820_ACPI),
                E820Entry::new(16 * MIB, 0x1000, E820_RESERVED),
                E820Entry::new(16 * MIB + 0x1000, 64 * MIB - 0x1000, E820_RAM),
            ]
        );
    }

    #[test]
    fn the_reservation_may_span_several_adjacent_ram_entries() {
        let firmware = [
            E820Entry::new(MIB, 15 * MIB, E820_RAM),
            E820Entry::new(8 * MIB, 40 * MIB, E820_RAM),
            E820Entry::new(48 * MIB, 100 * MIB, E820_RAM),
        ];
        let reservation = PhysRange::new(4 * MIB, 128 * MIB);
        let hdr = PhysRange::new(128 * MIB, 0x1000);
        assert!(E820Table::for_capture(&firmware, reservation, hdr).is_ok());
    }

    #[test]
    fn a_reservation_outside_ram_is_refused() {
        let hdr = PhysRange::new(3 * GIB + 0x1000, 0x1000);
        let across_the_pci_hole = PhysRange::new(3 * GIB + 0x1000, 256 * MIB);
        assert_eq!(
            E820Table::for_capture(&firmware_map(), across_the_pci_hole, hdr).unwrap_err(),
            BootParamsError::ReservationNotRam {
                reservation: across_the_pci_hole,
                hole: 3 * GIB + 0x1000
            }
        );
        let over_acpi = PhysRange::new(3 * GIB - 4 * MIB, 4 * MIB);
        let hdr = PhysRange::new(3 * GIB - 4 * MIB, 0x1000);
        assert_eq!(
            E820Table::for_capture(&firmware_map(), over_acpi, hdr).unwrap_err(),
            BootParamsError::ReservationOverlapsFirmwareRange {
                reservation: over_acpi,
                entry: E820Entry::new(3 * GIB - 2 * MIB, MIB, E820_ACPI)
            }
        );
        let beyond_the_end = PhysRange::new(7 * GIB, 2 * GIB);
        let hdr = PhysRange::new(7 * GIB, 0x1000);
        assert_eq!(
            E820Table::for_capture(&firmware_map(), beyond_the_end, hdr).unwrap_err(),
            BootParamsError::ReservationNotRam {
                reservation: beyond_the_end,
                hole: 8 * GIB
            }
        );
    }

    #[test]
    fn bad_reservation_and_core_header_ranges_are_refused() {
        let firmware = firmware_map();
        for bad in [PhysRange::new(GIB, 0), PhysRange::new(u64::MAX, 2)] {
            assert_eq!(
                E820Table::for_capture(&firmware, bad, elfcorehdr()).unwrap_err(),
                BootParamsError::BadReservation(bad)
            );
        }
        let low = PhysRange::new(0x8_0000, 16 * MIB);
        assert_eq!(
            E820Table::for_capture(&firmware, low, PhysRange::new(0x8_0000, 0x1000)).unwrap_err(),
            BootParamsError::ReservationInLowMemory(low)
        );
        for hdr in [
            PhysRange::new(GIB, 0),
            PhysRange::new(GIB + 1, 0x1000),
            PhysRange::new(GIB, 0x1001),
            PhysRange::new(GIB - 0x1000, 0x2000),
            PhysRange::new(GIB + 256 * MIB, 0x1000),
        ] {
            assert_eq!(
                E820Table::for_capture(&firmware, reservation(), hdr).unwrap_err(),
                BootParamsError::BadElfCoreHeaderRange {
                    elfcorehdr: hdr,
                    reservation: reservation()
                },
                "{hdr}"
            );
        }
    }

    #[test]
    fn more_than_128_entries_are_refused() {
        let mut firmware = firmware_map();
        for i in 0..130u64 {
            firmware.push(E820Entry::new(
                0x1_0000_0000_0000 + i * 0x10_0000,
                0x1000,
                E820_RESERVED,
            ));
        }
        assert_eq!(
            E820Table::for_capture(&firmware, reservation(), elfcorehdr()).unwrap_err(),
            BootParamsError::TooManyE820Entries
        );
    }

    /// The limit is on the map the capture kernel gets, not on the
    /// firmware's: a firmware map of any length is read whole (the kernel
    /// used to cut it at 128 entries before calling this).
    #[test]
    fn a_firmware_map_longer_than_128_entries_is_read_whole() {
        let mut firmware = firmware_map();
        // 300 RAM ranges above 4 GiB: none of them reaches the capture map.
        for i in 0..300u64 {
            firmware.push(E820Entry::new(16 * GIB + i * 2 * MIB, MIB, E820_RAM));
        }
        // Entries past the 128th still count.
        let late_reserved = E820Entry::new(0xfee0_0000, 0x1000, E820_RESERVED);
        let late_acpi = E820Entry::new(3 * GIB - 4 * MIB, MIB, E820_ACPI);
        firmware.push(late_reserved);
        firmware.push(late_acpi);
        assert!(firmware.len() > E820_MAX_ENTRIES);
        let table = E820Table::for_capture(&firmware, reservation(), elfcorehdr()).unwrap();
        assert!(table.entries().contains(&late_reserved));
        assert!(table.entries().contains(&late_acpi));
        assert_eq!(table.entries().len(), 11);
        // And a late entry that the reservation's check must see is seen.
        let over = E820Entry::new(GIB + MIB, 0x1000, E820_RESERVED);
        firmware.push(over);
        assert_eq!(
            E820Table::for_capture(&firmware, reservation(), elfcorehdr()).unwrap_err(),
            BootParamsError::ReservationOverlapsFirmwareRange {
                reservation: reservation(),
                entry: over
            }
        );
    }

    #[test]
    fn our_offsets_match_an_independent_boot_params_definition() {
        let setup = offset_of!(BootParams, hdr);
        assert_eq!(setup, hdr::START);
        let pairs = [
            (offset_of!(BootParams, acpi_rsdp_addr), zp::ACPI_RSDP_ADDR),
            (
                offset_of!(BootParams, ext_ramdisk_image),
                zp::EXT_RAMDISK_IMAGE,
            ),
            (
                offset_of!(BootParams, ext_ramdisk_size),
                zp::EXT_RAMDISK_SIZE,
            ),
            (
                offset_of!(BootParams, ext_cmd_line_ptr),
                zp::EXT_CMD_LINE_PTR,
            ),
            (offset_of!(BootParams, e820_entries), zp::E820_ENTRIES),
            (offset_of!(BootParams, sentinel), zp::SENTINEL),
            (offset_of!(BootParams, e820_table), zp::E820_TABLE),
            (
                setup + offset_of!(SetupHeader, setup_sects),
                hdr::SETUP_SECTS,
            ),
            (setup + offset_of!(SetupHeader, syssize), hdr::SYSSIZE),
            (setup + offset_of!(SetupHeader, boot_flag), hdr::BOOT_FLAG),
            (setup + offset_of!(SetupHeader, jump), hdr::JUMP),
            (setup + offset_of!(SetupHeader, header), hdr::HEADER),
            (setup + offset_of!(SetupHeader, version), hdr::VERSION),
            (
                setup + offset_of!(SetupHeader, kernel_version),
                hdr::KERNEL_VERSION,
            ),
            (
                setup + offset_of!(SetupHeader, type_of_loader),
                hdr::TYPE_OF_LOADER,
            ),
            (setup + offset_of!(SetupHeader, loadflags), hdr::LOADFLAGS),
            (
                setup + offset_of!(SetupHeader, ramdisk_image),
                hdr::RAMDISK_IMAGE,
            ),
            (
                setup + offset_of!(SetupHeader, ramdisk_size),
                hdr::RAMDISK_SIZE,
            ),
            (
                setup + offset_of!(SetupHeader, heap_end_ptr),
                hdr::HEAP_END_PTR,
            ),
            (
                setup + offset_of!(SetupHeader, cmd_line_ptr),
                hdr::CMD_LINE_PTR,
            ),
            (
                setup + offset_of!(SetupHeader, kernel_alignment),
                hdr::KERNEL_ALIGNMENT,
            ),
            (
                setup + offset_of!(SetupHeader, relocatable_kernel),
                hdr::RELOCATABLE_KERNEL,
            ),
            (setup + offset_of!(SetupHeader, xloadflags), hdr::XLOADFLAGS),
            (
                setup + offset_of!(SetupHeader, cmdline_size),
                hdr::CMDLINE_SIZE,
            ),
            (
                setup + offset_of!(SetupHeader, payload_offset),
                hdr::PAYLOAD_OFFSET,
            ),
            (
                setup + offset_of!(SetupHeader, payload_length),
                hdr::PAYLOAD_LENGTH,
            ),
            (
                setup + offset_of!(SetupHeader, pref_address),
                hdr::PREF_ADDRESS,
            ),
            (setup + offset_of!(SetupHeader, init_size), hdr::INIT_SIZE),
        ];
        for (theirs, ours) in pairs {
            assert_eq!(theirs, ours, "offset {ours:#x}");
        }
        assert_eq!(size_of::<BootParams>(), ZERO_PAGE_SIZE);
        assert_eq!(
            size_of::<linux_boot_params::BootE820Entry>(),
            zp::E820_ENTRY_SIZE
        );
        assert_eq!(
            offset_of!(BootParams, _pad8) - offset_of!(BootParams, e820_table),
            E820_MAX_ENTRIES * zp::E820_ENTRY_SIZE
        );
    }

    struct Built {
        page: Vec<u8>,
        image: Vec<u8>,
    }

    fn build(initrd: Option<PhysRange>, cmdline_addr: u64, cmdline_len: usize) -> Built {
        let image = FakeBzImage::default().build();
        let table = E820Table::for_capture(&firmware_map(), reservation(), elfcorehdr()).unwrap();
        let parsed = BzImage::parse(&image).unwrap();
        let mut page = vec![0xAAu8; ZERO_PAGE_SIZE + 16];
        let config = ZeroPageConfig {
            cmdline_addr,
            cmdline_len,
            initrd,
            acpi_rsdp_addr: Some(0xf_5a40),
            e820: &table,
        };
        build_zero_page(&parsed, &config, &mut page).unwrap();
        Built { page, image }
    }

    #[test]
    fn the_zero_page_carries_header_loader_fields_and_the_map() {
        let Built { page, image } = build(
            Some(PhysRange::new(GIB + 0x50_0000, 0x12_3456)),
            GIB + 0x1000,
            100,
        );
        // The setup header is the image's, but for the loader's fields.
        let header_end = 0x202 + usize::from(image[0x201]);
        for offset in hdr::START..header_end {
            if (hdr::TYPE_OF_LOADER..=hdr::LOADFLAGS).contains(&offset)
                || (hdr::RAMDISK_IMAGE..hdr::RAMDISK_SIZE + 4).contains(&offset)
                || (hdr::HEAP_END_PTR..hdr::HEAP_END_PTR + 2).contains(&offset)
                || (hdr::CMD_LINE_PTR..hdr::CMD_LINE_PTR + 4).contains(&offset)
            {
                continue;
            }
            assert_eq!(page[offset], image[offset], "offset {offset:#x}");
        }
        assert_eq!(u8_at(&page, hdr::TYPE_OF_LOADER), Some(0xFF));
        assert_eq!(u8_at(&page, hdr::LOADFLAGS), Some(bzimage::LOADED_HIGH));
        assert_eq!(u32_at(&page, hdr::CMD_LINE_PTR), Some(0x4000_1000));
        assert_eq!(u32_at(&page, zp::EXT_CMD_LINE_PTR), Some(0));
        assert_eq!(u32_at(&page, hdr::RAMDISK_IMAGE), Some(0x4050_0000));
        assert_eq!(u32_at(&page, hdr::RAMDISK_SIZE), Some(0x12_3456));
        assert_eq!(u64_at(&page, zp::ACPI_RSDP_ADDR), Some(0xf_5a40));
        assert_eq!(u8_at(&page, zp::SENTINEL), Some(0));
        assert_eq!(u8_at(&page, zp::E820_ENTRIES), Some(9));
        let third = zp::E820_TABLE + 3 * zp::E820_ENTRY_SIZE;
        assert_eq!(u64_at(&page, third), Some(GIB));
        assert_eq!(u64_at(&page, third + 8), Some(0x40_0000));
        assert_eq!(u32_at(&page, third + 16), Some(E820_RAM));
        // Nothing outside the e820 table and header was written but zeros.
        assert!(
            page[zp::E820_TABLE + 9 * zp::E820_ENTRY_SIZE..ZERO_PAGE_SIZE]
                .iter()
                .all(|&b| b == 0)
        );
        assert!(page[..zp::ACPI_RSDP_ADDR].iter().all(|&b| b == 0));
        // The caller's bytes after the page are untouched.
        assert!(page[ZERO_PAGE_SIZE..].iter().all(|&b| b == 0xAA));
    }

    #[test]
    fn addresses_above_4_gib_use_the_ext_fields() {
        let initrd = PhysRange::new(0x12_3450_0000, 0x1_0000_1000);
        let Built { page, .. } = build(Some(initrd), 0x5_0000_2000, 10);
        assert_eq!(u32_at(&page, hdr::CMD_LINE_PTR), Some(0x2000));
        assert_eq!(u32_at(&page, zp::EXT_CMD_LINE_PTR), Some(5));
        assert_eq!(u32_at(&page, hdr::RAMDISK_IMAGE), Some(0x3450_0000));
        assert_eq!(u32_at(&page, zp::EXT_RAMDISK_IMAGE), Some(0x12));
        assert_eq!(u32_at(&page, hdr::RAMDISK_SIZE), Some(0x1000));
        assert_eq!(u32_at(&page, zp::EXT_RAMDISK_SIZE), Some(1));
    }

    #[test]
    fn no_initrd_leaves_the_ramdisk_fields_zero() {
        let Built { page, .. } = build(None, GIB, 0);
        for offset in [
            hdr::RAMDISK_IMAGE,
            hdr::RAMDISK_SIZE,
            zp::EXT_RAMDISK_IMAGE,
            zp::EXT_RAMDISK_SIZE,
        ] {
            assert_eq!(u32_at(&page, offset), Some(0));
        }
    }

    #[test]
    fn zero_page_rejections() {
        let image = FakeBzImage::default().build();
        let parsed = BzImage::parse(&image).unwrap();
        let table = E820Table::for_capture(&firmware_map(), reservation(), elfcorehdr()).unwrap();
        let good = ZeroPageConfig {
            cmdline_addr: GIB,
            cmdline_len: 2047,
            initrd: None,
            acpi_rsdp_addr: None,
            e820: &table,
        };
        let mut page = vec![0u8; ZERO_PAGE_SIZE];
        assert!(build_zero_page(&parsed, &good, &mut page).is_ok());
        let cases = [
            (
                ZeroPageConfig {
                    cmdline_len: 2048,
                    ..good
                },
                BootParamsError::CmdlineTooLong {
                    len: 2048,
                    max: 2047,
                },
            ),
            (
                ZeroPageConfig {
                    cmdline_addr: 0,
                    ..good
                },
                BootParamsError::CmdlineAtZero,
            ),
            (
                ZeroPageConfig {
                    cmdline_addr: u64::MAX - 10,
                    cmdline_len: 10,
                    ..good
                },
                BootParamsError::CmdlineOverflows(u64::MAX - 10),
            ),
            (
                ZeroPageConfig {
                    initrd: Some(PhysRange::new(GIB, 0)),
                    ..good
                },
                BootParamsError::BadInitrd(PhysRange::new(GIB, 0)),
            ),
            (
                ZeroPageConfig {
                    initrd: Some(PhysRange::new(u64::MAX, 2)),
                    ..good
                },
                BootParamsError::BadInitrd(PhysRange::new(u64::MAX, 2)),
            ),
        ];
        for (config, expected) in cases {
            assert_eq!(
                build_zero_page(&parsed, &config, &mut page).unwrap_err(),
                expected
            );
        }
        let mut short = vec![0u8; ZERO_PAGE_SIZE - 1];
        assert_eq!(
            build_zero_page(&parsed, &good, &mut short).unwrap_err(),
            BootParamsError::BufferTooSmall(ZERO_PAGE_SIZE - 1)
        );
    }

    #[test]
    fn every_boot_params_error_has_a_message() {
        let r = reservation();
        let errors = [
            BootParamsError::BadReservation(r),
            BootParamsError::ReservationInLowMemory(r),
            BootParamsError::ReservationNotRam {
                reservation: r,
                hole: 0,
            },
            BootParamsError::ReservationOverlapsFirmwareRange {
                reservation: r,
                entry: E820Entry::new(0, 1, 2),
            },
            BootParamsError::BadElfCoreHeaderRange {
                elfcorehdr: r,
                reservation: r,
            },
            BootParamsError::TooManyE820Entries,
            BootParamsError::BufferTooSmall(0),
            BootParamsError::CmdlineTooLong { len: 1, max: 0 },
            BootParamsError::CmdlineAtZero,
            BootParamsError::CmdlineOverflows(1),
            BootParamsError::BadInitrd(r),
        ];
        for error in errors {
            assert!(error.to_string().len() > 10, "{error:?}");
        }
    }
}
