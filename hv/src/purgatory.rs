//! The purgatory: the last code the crashed hypervisor runs. It is copied
//! into the crash reservation at boot, with its own GDT, its own identity
//! page tables (first 4 GiB) and its own stack, all digested with the
//! capture kernel, so the jump depends on nothing of the crashed
//! hypervisor's state but the instruction that reaches it.
//!
//! Two ways out:
//! - Linux 64-bit boot protocol: CS = 0x10, DS/ES/SS = 0x18, RSI = the
//!   zero page, jump to `startup_64`, paging on with an identity map.
//! - PVH (the hv image in capture mode): down to compatibility mode, paging
//!   off, EFER.LME off, then the 32-bit PVH entry with EBX = start info.

use core::mem::offset_of;

/// Bytes the purgatory takes at the end of the reservation.
pub const AREA_BYTES: u64 = 64 * 1024;
const PAGE: u64 = 4096;
/// Code and parameters: the first page.
const CODE_BYTES: usize = 0xC00;
/// Page tables: PML4, PDPT, 4 page directories.
const TABLES_OFFSET: u64 = PAGE;
const TABLE_PAGES: u64 = 6;
/// Room for the PVH start info, its memory map and command line.
pub const BOOT_DATA_OFFSET: u64 = TABLES_OFFSET + TABLE_PAGES * PAGE;
/// Bytes of that room.
pub const BOOT_DATA_BYTES: u64 = 2 * PAGE;
const STACK_TOP_OFFSET: u64 = AREA_BYTES;

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

/// The parameters after the code.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct Parameters {
    gdt: [u64; 4],
    /// `lgdt` operand: limit, then the 64-bit base in four halves.
    gdtr: [u16; 5],
    mode: u64,
    cr3: u64,
    entry: u64,
    argument: u64,
}

const MODE_LINUX64: u64 = 0;
const MODE_PVH32: u64 = 1;

core::arch::global_asm!(
    r#"
    .section .rodata.purgatory, "a"
    .balign 16
    .global purgatory_start
purgatory_start:
    .code64
    cli
    lea rbx, [rip + purgatory_start]
    mov rax, [rbx + {params} + {cr3}]
    mov cr3, rax
    lea rsp, [rbx + {stack_top}]
    lgdt [rbx + {params} + {gdtr}]
    cmp qword ptr [rbx + {params} + {mode}], {pvh}
    je 3f
    /* Linux: reload CS with 0x10, data segments with 0x18. */
    push 0x10
    lea rax, [rip + 2f]
    push rax
    retfq
2:
    mov eax, 0x18
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov rsi, [rbx + {params} + {argument}]
    mov rax, [rbx + {params} + {entry}]
    xor ebp, ebp
    xor edi, edi
    jmp rax
3:
    /* PVH: into a 32-bit code segment (compatibility mode) first. */
    push 0x08
    lea rax, [rip + 4f]
    push rax
    retfq
    .code32
4:
    mov eax, 0x18
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr0
    and eax, 0x7FFFFFFF
    mov cr0, eax
    mov ecx, 0xC0000080
    rdmsr
    and eax, 0xFFFFFEFF
    wrmsr
    mov ecx, [ebx + {params} + {argument}]
    mov eax, [ebx + {params} + {entry}]
    mov ebx, ecx
    jmp eax
    .code64
    .balign 16
    .skip {code_bytes} - (. - purgatory_start)
    .global purgatory_end
purgatory_end:
"#,
    params = const CODE_BYTES,
    cr3 = const offset_of!(Parameters, cr3),
    gdtr = const offset_of!(Parameters, gdtr),
    mode = const offset_of!(Parameters, mode),
    pvh = const MODE_PVH32,
    argument = const offset_of!(Parameters, argument),
    entry = const offset_of!(Parameters, entry),
    stack_top = const STACK_TOP_OFFSET,
    code_bytes = const CODE_BYTES,
);

unsafe extern "C" {
    static purgatory_start: u8;
    static purgatory_end: u8;
}

fn code() -> &'static [u8] {
    let start = &raw const purgatory_start;
    let len = (&raw const purgatory_end).addr() - start.addr();
    // SAFETY: the two symbols bound the blob in .rodata, immutable for good.
    unsafe { core::slice::from_raw_parts(start, len) }
}

/// Writes the purgatory (code, parameters, page tables) into `area`, the
/// last [`AREA_BYTES`] of the reservation. Returns the bytes to digest
/// (code, parameters and page tables).
///
/// # Safety
/// `area` must be the physical (identity-mapped) start of [`AREA_BYTES`]
/// of reserved memory that nothing else uses, below 4 GiB.
pub unsafe fn install(area: u64, entry: Entry) -> &'static [u8] {
    let (mode, entry_address, argument) = match entry {
        Entry::Linux64 { entry, zero_page } => (MODE_LINUX64, entry, zero_page),
        Entry::Pvh32 { entry, start_info } => (MODE_PVH32, u64::from(entry), u64::from(start_info)),
    };
    let gdt_address = area + CODE_BYTES as u64;
    let parameters = Parameters {
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
    };
    let blob = code();
    // SAFETY: (1) the caller gives us the area; (2) the blob fits its first
    // page and the parameters follow it; (3) the six table pages follow.
    unsafe {
        core::ptr::write_bytes(
            area as *mut u8,
            0,
            (TABLES_OFFSET + TABLE_PAGES * PAGE) as usize,
        );
        core::ptr::copy_nonoverlapping(blob.as_ptr(), area as *mut u8, blob.len());
        ((area + CODE_BYTES as u64) as *mut Parameters).write_unaligned(parameters);
        let pml4 = (area + TABLES_OFFSET) as *mut u64;
        let pdpt = (area + TABLES_OFFSET + PAGE) as *mut u64;
        pml4.write((area + TABLES_OFFSET + PAGE) | 3);
        for directory in 0..4u64 {
            let pd = area + TABLES_OFFSET + (2 + directory) * PAGE;
            pdpt.add(directory as usize).write(pd | 3);
            for slot in 0..512u64 {
                let address = (directory * 512 + slot) << 21;
                (pd as *mut u64).add(slot as usize).write(address | 0x83);
            }
        }
        core::slice::from_raw_parts(
            area as *const u8,
            (TABLES_OFFSET + TABLE_PAGES * PAGE) as usize,
        )
    }
}

/// Jumps to the purgatory at `area`. Interrupts must be off; nothing of
/// the hypervisor is used after this instruction.
///
/// # Safety
/// `area` must hold a purgatory written by [`install`] and verified.
pub unsafe fn jump(area: u64) -> ! {
    // SAFETY: guaranteed by the caller; the purgatory never returns.
    unsafe { core::arch::asm!("cli", "jmp {}", in(reg) area, options(noreturn)) }
}
