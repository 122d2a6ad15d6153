//! The real-mode trampoline that takes an application processor from its
//! startup IPI to the hypervisor's 64-bit entry.
//!
//! The blob is copied to a page below 1 MiB; the startup IPI's vector is that
//! page's number, so the AP starts at `page:0000` in real mode. The code is
//! position-independent: it takes its own base from CS. A [`Parameters`]
//! block at the end of the blob carries everything else (GDT, CR3, the
//! table of APIC IDs and stack tops, the 64-bit entry point).
//!
//! Every AP runs the trampoline at the same time (parallel bring-up): each
//! one reads its own APIC ID (CPUID leaf 0xB, else leaf 1), finds its index
//! in the APIC ID table, takes the stack top with the same index and calls
//! `entry(index)`. An AP whose APIC ID is not in the table halts.

use core::mem::offset_of;

/// Everything the trampoline needs besides its code. Physical addresses:
/// the trampoline runs before the AP has paging, then on the kernel's
/// identity-mapped tables.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct Parameters {
    /// Null, 64-bit code (0x08), data (0x10), 32-bit code (0x18).
    pub gdt: [u64; 4],
    /// `lgdt` operand: limit, then the base's low and high halves (physical,
    /// below 1 MiB: `lgdt` in real mode reads 24 bits of base).
    pub gdtr: [u16; 3],
    /// Far pointer to the 32-bit code: offset (physical).
    pub protected_entry: u32,
    /// Far pointer to the 32-bit code: selector.
    pub protected_selector: u16,
    /// Far pointer to the 64-bit code: offset (physical). A far jump through
    /// memory, because the AP has no stack before it finds its own.
    pub long_mode_entry: u32,
    /// Far pointer to the 64-bit code: selector.
    pub long_mode_selector: u16,
    /// The kernel's PML4; must lie below 4 GiB (loaded from 32-bit code).
    pub cr3: u32,
    /// Number of entries in the two tables below.
    pub cpu_count: u32,
    /// Physical address of `cpu_count` APIC IDs (`u32`), by CPU index.
    pub apic_ids: u64,
    /// Physical address of `cpu_count` stack tops (`u64`), by CPU index.
    pub stack_tops: u64,
    /// The 64-bit entry: `extern "C" fn(index: u64) -> !`.
    pub entry: u64,
}

/// Segment selectors of the trampoline's GDT.
const CODE64_SELECTOR: u16 = 0x08;
const CODE32_SELECTOR: u16 = 0x18;

/// Bytes of code before the parameter block.
const CODE_BYTES: usize = 0x200;

/// Total size of the blob.
pub const BLOB_BYTES: usize = CODE_BYTES + core::mem::size_of::<Parameters>();
const _: () = assert!(BLOB_BYTES <= 4096, "the trampoline must fit one page");
// `lgdt` and the far jump read these as packed pseudo-descriptors.
const _: () = assert!(offset_of!(Parameters, gdtr) == 32);
const _: () = assert!(
    offset_of!(Parameters, protected_selector) == offset_of!(Parameters, protected_entry) + 4
);
const _: () = assert!(
    offset_of!(Parameters, long_mode_selector) == offset_of!(Parameters, long_mode_entry) + 4
);

/// Offset of the 32-bit code inside the blob.
fn protected_code_offset() -> usize {
    blob::protected_entry_offset()
}

/// Builds the parameter block for a trampoline copied to `page` (physical).
pub fn parameters(
    page: u32,
    cr3: u64,
    apic_ids: u64,
    stack_tops: u64,
    cpu_count: u32,
    entry: u64,
) -> Option<Parameters> {
    if !page.is_multiple_of(4096) || page >= 0x10_0000 {
        return None;
    }
    let cr3 = u32::try_from(cr3).ok()?;
    let gdt_base = page + (CODE_BYTES + offset_of!(Parameters, gdt)) as u32;
    Some(Parameters {
        gdt: [
            0,
            0x00AF_9A00_0000_FFFF,
            0x00CF_9200_0000_FFFF,
            0x00CF_9A00_0000_FFFF,
        ],
        gdtr: [(4 * 8 - 1) as u16, gdt_base as u16, (gdt_base >> 16) as u16],
        protected_entry: page + protected_code_offset() as u32,
        protected_selector: CODE32_SELECTOR,
        long_mode_entry: page + blob::long_mode_entry_offset() as u32,
        long_mode_selector: CODE64_SELECTOR,
        cr3,
        cpu_count,
        apic_ids,
        stack_tops,
        entry,
    })
}

/// Fills `page` (the blob's destination, [`BLOB_BYTES`] long) with the
/// code and the parameter block.
pub fn write_blob(destination: &mut [u8], parameters: &Parameters) -> Result<(), BlobTooSmall> {
    let destination = destination.get_mut(..BLOB_BYTES).ok_or(BlobTooSmall)?;
    destination[..CODE_BYTES].copy_from_slice(&blob::code()[..CODE_BYTES]);
    let words = [
        &parameters.gdt[0].to_le_bytes()[..],
        &parameters.gdt[1].to_le_bytes(),
        &parameters.gdt[2].to_le_bytes(),
        &parameters.gdt[3].to_le_bytes(),
    ];
    let mut offset = CODE_BYTES;
    for word in words {
        destination[offset..offset + 8].copy_from_slice(word);
        offset += 8;
    }
    let put = |destination: &mut [u8], field: usize, bytes: &[u8]| {
        let at = CODE_BYTES + field;
        destination[at..at + bytes.len()].copy_from_slice(bytes);
    };
    for (index, half) in parameters.gdtr.iter().enumerate() {
        put(
            destination,
            offset_of!(Parameters, gdtr) + 2 * index,
            &half.to_le_bytes(),
        );
    }
    put(
        destination,
        offset_of!(Parameters, protected_entry),
        &parameters.protected_entry.to_le_bytes(),
    );
    put(
        destination,
        offset_of!(Parameters, protected_selector),
        &parameters.protected_selector.to_le_bytes(),
    );
    put(
        destination,
        offset_of!(Parameters, long_mode_entry),
        &parameters.long_mode_entry.to_le_bytes(),
    );
    put(
        destination,
        offset_of!(Parameters, long_mode_selector),
        &parameters.long_mode_selector.to_le_bytes(),
    );
    put(
        destination,
        offset_of!(Parameters, cr3),
        &parameters.cr3.to_le_bytes(),
    );
    put(
        destination,
        offset_of!(Parameters, cpu_count),
        &parameters.cpu_count.to_le_bytes(),
    );
    put(
        destination,
        offset_of!(Parameters, apic_ids),
        &parameters.apic_ids.to_le_bytes(),
    );
    put(
        destination,
        offset_of!(Parameters, stack_tops),
        &parameters.stack_tops.to_le_bytes(),
    );
    put(
        destination,
        offset_of!(Parameters, entry),
        &parameters.entry.to_le_bytes(),
    );
    Ok(())
}

/// The destination given to [`write_blob`] is shorter than [`BLOB_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobTooSmall;

/// The linker-placed blob. The only unsafe code of the crate.
#[allow(unsafe_code)]
mod blob {
    use core::mem::offset_of;

    core::arch::global_asm!(
        r#"
        .section .rodata.smp_trampoline, "a"
        .balign 16
        .global smp_trampoline_start
    smp_trampoline_start:
        .code16
        cli
        cld
        mov ax, cs
        mov ds, ax
        xor ebx, ebx
        mov bx, ax
        shl ebx, 4
        lgdt [{params} + {gdtr}]
        mov eax, cr0
        or eax, 1
        mov cr0, eax
        /* jmp far dword [params.protected_entry]: the pointer was patched in. */
        .byte 0x66, 0xFF, 0x2E
        .short {params} + {protected_entry}
    
        .code32
        .global smp_trampoline_32
    smp_trampoline_32:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov eax, cr4
        or eax, 1 << 5
        mov cr4, eax
        mov eax, [ebx + {params} + {cr3}]
        mov cr3, eax
        /* EFER.NXE too where the CPU has NX (CPUID 0x80000001 EDX bit 20):
           the kernel's tables mark data no-execute. CPUID clobbers EBX. */
        mov edi, ebx
        xor esi, esi
        mov eax, 0x80000000
        cpuid
        cmp eax, 0x80000001
        jb 2f
        mov eax, 0x80000001
        cpuid
        bt edx, 20
        jnc 2f
        mov esi, 1 << 11
    2:
        mov ebx, edi
        mov ecx, 0xC0000080
        rdmsr
        or eax, 1 << 8
        or eax, esi
        wrmsr
        mov eax, cr0
        or eax, (1 << 31) | (1 << 16) | 1
        mov cr0, eax
        /* jmp far dword [ebx + params.long_mode_entry] */
        .byte 0xFF, 0xAB
        .long {params} + {long_mode_entry}
    
        .code64
        .global smp_trampoline_64
    smp_trampoline_64:
        mov r12d, ebx
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        xor eax, eax
        mov fs, ax
        mov gs, ax
        /* APIC ID: CPUID leaf 0xB (x2APIC ID) when it exists, else leaf 1. */
        xor eax, eax
        cpuid
        cmp eax, 0xB
        jb 3f
        mov eax, 0xB
        xor ecx, ecx
        cpuid
        test ebx, ebx
        jz 3f
        mov r13d, edx
        jmp 4f
    3:
        mov eax, 1
        cpuid
        shr ebx, 24
        mov r13d, ebx
    4:
        mov rsi, [r12 + {params} + {apic_ids}]
        mov ecx, [r12 + {params} + {cpu_count}]
        xor eax, eax
    5:
        cmp eax, ecx
        jae 7f
        cmp [rsi + rax * 4], r13d
        je 6f
        inc eax
        jmp 5b
    6:
        mov rsi, [r12 + {params} + {stack_tops}]
        mov rsp, [rsi + rax * 8]
        mov edi, eax
        xor ebp, ebp
        call [r12 + {params} + {entry}]
    7:
        cli
        hlt
        jmp 7b
    
        .balign 16
        .skip {code_bytes} - (. - smp_trampoline_start)
    smp_trampoline_params:
        .skip {params_bytes}
        .global smp_trampoline_end
    smp_trampoline_end:
    "#,
        params = const super::CODE_BYTES,
        gdtr = const offset_of!(super::Parameters, gdtr),
        protected_entry = const offset_of!(super::Parameters, protected_entry),
        cr3 = const offset_of!(super::Parameters, cr3),
        long_mode_entry = const offset_of!(super::Parameters, long_mode_entry),
        apic_ids = const offset_of!(super::Parameters, apic_ids),
        cpu_count = const offset_of!(super::Parameters, cpu_count),
        stack_tops = const offset_of!(super::Parameters, stack_tops),
        entry = const offset_of!(super::Parameters, entry),
        code_bytes = const super::CODE_BYTES,
        params_bytes = const core::mem::size_of::<super::Parameters>(),
    );

    unsafe extern "C" {
        static smp_trampoline_start: u8;
        static smp_trampoline_end: u8;
        static smp_trampoline_32: u8;
        static smp_trampoline_64: u8;
    }

    /// The assembled trampoline, code and (empty) parameter block.
    pub fn code() -> &'static [u8] {
        let start = &raw const smp_trampoline_start;
        let end = &raw const smp_trampoline_end;
        let len = end.addr() - start.addr();
        // SAFETY: both symbols bound the blob in .rodata, which is immutable
        // and lives for the program's lifetime.
        unsafe { core::slice::from_raw_parts(start, len) }
    }

    pub fn long_mode_entry_offset() -> usize {
        (&raw const smp_trampoline_64).addr() - (&raw const smp_trampoline_start).addr()
    }

    pub fn protected_entry_offset() -> usize {
        (&raw const smp_trampoline_32).addr() - (&raw const smp_trampoline_start).addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_has_code_then_room_for_the_parameters() {
        assert_eq!(blob::code().len(), BLOB_BYTES);
        // The first instruction is `cli`.
        assert_eq!(blob::code()[0], 0xFA);
        assert!(protected_code_offset() < CODE_BYTES);
    }

    #[test]
    fn parameters_point_inside_the_page() {
        let p = parameters(0x8000, 0x1234_5000, 0x10_0000, 0x20_0000, 4, 0x20_1000).unwrap();
        assert_eq!(p.gdtr, [31, 0x8000 + CODE_BYTES as u16, 0]);
        assert_eq!(p.protected_entry, 0x8000 + protected_code_offset() as u32);
        assert_eq!(p.protected_selector, CODE32_SELECTOR);
        assert_eq!(
            p.long_mode_entry,
            0x8000 + blob::long_mode_entry_offset() as u32
        );
        assert_eq!(p.long_mode_selector, CODE64_SELECTOR);
        assert!(blob::protected_entry_offset() < blob::long_mode_entry_offset());
    }

    #[test]
    fn parameters_reject_bad_pages_and_high_page_tables() {
        assert!(parameters(0x8001, 0x1000, 0, 0, 1, 0).is_none());
        assert!(parameters(0x10_0000, 0x1000, 0, 0, 1, 0).is_none());
        assert!(parameters(0x8000, 0x1_0000_0000, 0, 0, 1, 0).is_none());
    }

    #[test]
    fn written_blob_carries_code_and_parameters() {
        let p = parameters(0x9000, 0x7000, 0x11_1000, 0x12_2000, 3, 0xdead_b000).unwrap();
        let mut page = [0u8; 4096];
        write_blob(&mut page, &p).unwrap();
        assert_eq!(&page[..CODE_BYTES], &blob::code()[..CODE_BYTES]);
        let field =
            |offset: usize, len: usize| &page[CODE_BYTES + offset..CODE_BYTES + offset + len];
        assert_eq!(
            field(offset_of!(Parameters, cr3), 4),
            &0x7000u32.to_le_bytes()
        );
        assert_eq!(
            field(offset_of!(Parameters, cpu_count), 4),
            &3u32.to_le_bytes()
        );
        assert_eq!(
            field(offset_of!(Parameters, entry), 8),
            &0xdead_b000u64.to_le_bytes()
        );
        assert_eq!(
            field(offset_of!(Parameters, gdt) + 8, 8),
            &0x00AF_9A00_0000_FFFFu64.to_le_bytes()
        );
        assert_eq!(write_blob(&mut [0u8; 16], &p), Err(BlobTooSmall));
    }
}
