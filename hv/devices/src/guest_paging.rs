//! Walking the guest's page tables, to fetch the instruction behind an MMIO
//! exit (the exit gives the guest-physical address of the data, not of the
//! instruction).
//!
//! All of the guest's paging modes: none (real mode, or protected mode with
//! CR0.PG clear), 32-bit (4 KiB and, with CR4.PSE, 4 MiB pages), PAE (2 MiB
//! pages), 4-level and 5-level (CR4.LA57) with 2 MiB and 1 GiB pages. Only
//! translation is done: the CPU checked permissions when it fetched the
//! instruction that exited. Entries are read through [`GuestMemory`], so a
//! table outside guest RAM is an error, never a read of host memory.

use crate::memory::{GuestMemory, MemoryError};

/// The guest's paging controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingState {
    /// CR0 (PG, bit 31).
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 (PSE bit 4, PAE bit 5, LA57 bit 12).
    pub cr4: u64,
    /// IA32_EFER (LMA, bit 10).
    pub efer: u64,
}

/// Why a linear address does not translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// An entry on the way is not present.
    NotPresent {
        /// The linear address.
        linear: u64,
    },
    /// A table lies outside guest RAM.
    Memory(MemoryError),
}

impl From<MemoryError> for WalkError {
    fn from(error: MemoryError) -> Self {
        Self::Memory(error)
    }
}

const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;

fn read_u64(memory: &impl GuestMemory, gpa: u64) -> Result<u64, MemoryError> {
    let mut bytes = [0u8; 8];
    memory.read(gpa, &mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

fn read_u32(memory: &impl GuestMemory, gpa: u64) -> Result<u64, MemoryError> {
    let mut bytes = [0u8; 4];
    memory.read(gpa, &mut bytes)?;
    Ok(u64::from(u32::from_le_bytes(bytes)))
}

/// The guest-physical address of `linear`.
pub fn translate(
    memory: &impl GuestMemory,
    paging: PagingState,
    linear: u64,
) -> Result<u64, WalkError> {
    let not_present = WalkError::NotPresent { linear };
    if paging.cr0 & (1 << 31) == 0 {
        return Ok(linear & 0xFFFF_FFFF);
    }
    let pae = paging.cr4 & (1 << 5) != 0;
    if !pae {
        // 32-bit paging.
        let linear = linear & 0xFFFF_FFFF;
        let pde = read_u32(memory, (paging.cr3 & 0xFFFF_F000) + (linear >> 22) * 4)?;
        if pde & PRESENT == 0 {
            return Err(not_present);
        }
        if pde & PAGE_SIZE_BIT != 0 && paging.cr4 & (1 << 4) != 0 {
            // 4 MiB page; PSE-36 puts physical bits 39:32 in PDE bits 20:13.
            let base = (pde & 0xFFC0_0000) | ((pde >> 13) & 0xFF) << 32;
            return Ok(base | (linear & 0x3F_FFFF));
        }
        let pte = read_u32(memory, (pde & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4)?;
        if pte & PRESENT == 0 {
            return Err(not_present);
        }
        return Ok((pte & 0xFFFF_F000) | (linear & 0xFFF));
    }
    let long_mode = paging.efer & (1 << 10) != 0;
    // Levels from the top: the index's shift and whether a large page may
    // end the walk there.
    let (mut table, levels): (u64, &[(u32, bool)]) = if long_mode {
        let five = paging.cr4 & (1 << 12) != 0;
        let all: &[(u32, bool)] = &[
            (48, false),
            (39, false),
            (30, true),
            (21, true),
            (12, false),
        ];
        (
            paging.cr3 & ADDRESS_MASK,
            if five { all } else { &all[1..] },
        )
    } else {
        // PAE: the 4 PDPTEs at CR3 (32-byte aligned).
        let linear = linear & 0xFFFF_FFFF;
        let pdpte = read_u64(memory, (paging.cr3 & 0xFFFF_FFE0) + (linear >> 30) * 8)?;
        if pdpte & PRESENT == 0 {
            return Err(not_present);
        }
        (pdpte & ADDRESS_MASK, &[(21, true), (12, false)])
    };
    for &(shift, large) in levels {
        let index = (linear >> shift) & 0x1FF;
        let entry = read_u64(memory, table + index * 8)?;
        if entry & PRESENT == 0 {
            return Err(not_present);
        }
        if shift == 12 || (large && entry & PAGE_SIZE_BIT != 0) {
            let offset_mask = (1u64 << shift) - 1;
            return Ok((entry & ADDRESS_MASK & !offset_mask) | (linear & offset_mask));
        }
        table = entry & ADDRESS_MASK;
    }
    Err(not_present)
}

/// Fetches up to 15 instruction bytes at `linear` into `buffer`, page by
/// page; returns how many it got (fewer when the next page does not
/// translate: the decoder then says whether it needed them).
pub fn fetch_instruction(
    memory: &impl GuestMemory,
    paging: PagingState,
    linear: u64,
    buffer: &mut [u8; 15],
) -> Result<usize, WalkError> {
    let mut got = 0;
    while got < buffer.len() {
        let at = linear.wrapping_add(got as u64);
        let physical = match translate(memory, paging, at) {
            Ok(physical) => physical,
            Err(error) if got == 0 => return Err(error),
            Err(_) => break,
        };
        let in_page = (0x1000 - (at & 0xFFF)) as usize;
        let n = in_page.min(buffer.len() - got);
        if memory.read(physical, &mut buffer[got..got + n]).is_err() {
            if got == 0 {
                return Err(WalkError::Memory(MemoryError {
                    gpa: physical,
                    len: n as u64,
                }));
            }
            break;
        }
        got += n;
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::fake::VecMemory;

    fn put64(mem: &mut VecMemory, gpa: u64, value: u64) {
        mem.write(gpa, &value.to_le_bytes()).unwrap();
    }

    const LONG: PagingState = PagingState {
        cr0: 1 << 31 | 1,
        cr3: 0x1000,
        cr4: 1 << 5,
        efer: 1 << 10 | 1 << 8,
    };

    #[test]
    fn paging_off_is_identity() {
        let mem = VecMemory::new(0x1000);
        let off = PagingState {
            cr0: 1,
            cr3: 0,
            cr4: 0,
            efer: 0,
        };
        assert_eq!(translate(&mem, off, 0x1234_5678), Ok(0x1234_5678));
    }

    #[test]
    fn four_level_with_2m_4k_and_1g_pages() {
        let mut mem = VecMemory::new(0x10_0000);
        // cstart64.S: PML4[0] -> PDPT, PDPT[0] -> PD, PD[2] = 2 MiB page at
        // 0x40_0000; PD[3] -> PT, PT[5] = 0x9000; PDPT[1] = 1 GiB page.
        put64(&mut mem, 0x1000, 0x2000 | 3);
        put64(&mut mem, 0x2000, 0x3000 | 3);
        put64(&mut mem, 0x2008, 0x4000_0000 | 0x83);
        put64(&mut mem, 0x3000 + 2 * 8, 0x40_0000 | 0x83);
        put64(&mut mem, 0x3000 + 3 * 8, 0x4000 | 3);
        put64(&mut mem, 0x4000 + 5 * 8, 0x9000 | 3);
        assert_eq!(translate(&mem, LONG, 0x40_1234), Ok(0x40_1234));
        assert_eq!(translate(&mem, LONG, 0x60_5ABC), Ok(0x9ABC));
        assert_eq!(translate(&mem, LONG, 0x4123_4567), Ok(0x4123_4567));
        assert_eq!(
            translate(&mem, LONG, 0x60_6000),
            Err(WalkError::NotPresent { linear: 0x60_6000 })
        );
        assert_eq!(
            translate(&mem, LONG, 0x80_0000_0000),
            Err(WalkError::NotPresent {
                linear: 0x80_0000_0000
            })
        );
        // A table outside RAM is an error, not a read elsewhere.
        put64(&mut mem, 0x3000 + 4 * 8, 0x7777_0000 | 3);
        assert!(matches!(
            translate(&mem, LONG, 0x80_0000),
            Err(WalkError::Memory(_))
        ));
    }

    #[test]
    fn five_level_pae_and_32_bit_paging() {
        let mut mem = VecMemory::new(0x10_0000);
        // LA57: PML5[0] -> the 4-level tree above.
        put64(&mut mem, 0x5000, 0x1000 | 3);
        put64(&mut mem, 0x1000, 0x2000 | 3);
        put64(&mut mem, 0x2000, 0x3000 | 3);
        put64(&mut mem, 0x3000, 0x20_0000 | 0x83);
        let five = PagingState {
            cr3: 0x5000,
            cr4: 1 << 5 | 1 << 12,
            ..LONG
        };
        assert_eq!(translate(&mem, five, 0x1_2345), Ok(0x21_2345));
        // PAE: PDPTE[0] -> PD at 0x3000.
        put64(&mut mem, 0x6000, 0x3000 | 1);
        let pae = PagingState {
            cr0: 1 << 31 | 1,
            cr3: 0x6000,
            cr4: 1 << 5,
            efer: 0,
        };
        assert_eq!(translate(&mem, pae, 0x1_2345), Ok(0x21_2345));
        // 32-bit: a 4 MiB page with PSE, and a 4 KiB one.
        mem.write(0x7000, &(0x0040_0000u32 | 0x83).to_le_bytes())
            .unwrap();
        mem.write(0x7004, &(0x8000u32 | 3).to_le_bytes()).unwrap();
        mem.write(0x8000 + 3 * 4, &(0xA000u32 | 3).to_le_bytes())
            .unwrap();
        let legacy = PagingState {
            cr0: 1 << 31 | 1,
            cr3: 0x7000,
            cr4: 1 << 4,
            efer: 0,
        };
        assert_eq!(translate(&mem, legacy, 0x1_2345), Ok(0x41_2345));
        assert_eq!(translate(&mem, legacy, 0x40_3123), Ok(0xA123));
    }

    #[test]
    fn fetch_crosses_pages_and_stops_at_a_missing_one() {
        let mut mem = VecMemory::new(0x10_0000);
        put64(&mut mem, 0x1000, 0x2000 | 3);
        put64(&mut mem, 0x2000, 0x3000 | 3);
        put64(&mut mem, 0x3000, 0x4000 | 3);
        // Linear page 0x1000 -> 0x8000, page 0x2000 -> 0x6000, 0x3000 absent.
        put64(&mut mem, 0x4000 + 8, 0x8000 | 3);
        put64(&mut mem, 0x4000 + 16, 0x6000 | 3);
        mem.write(0x8FFE, &[0xA3, 0x10]).unwrap();
        mem.write(0x6000, &[0x03, 0xE0, 0xFE, 0, 0, 0, 0, 0x90])
            .unwrap();
        let mut buf = [0; 15];
        assert_eq!(fetch_instruction(&mem, LONG, 0x1FFE, &mut buf), Ok(15));
        assert_eq!(&buf[..9], &[0xA3, 0x10, 0x03, 0xE0, 0xFE, 0, 0, 0, 0]);
        assert_eq!(fetch_instruction(&mem, LONG, 0x2FF8, &mut buf), Ok(8));
        assert!(fetch_instruction(&mem, LONG, 0x3000, &mut buf).is_err());
    }
}
