//! The two 32-bit entry points and the switch to long mode.
//!
//! GRUB (multiboot2, BIOS and UEFI) and QEMU's `-kernel` (PVH) both enter in
//! 32-bit protected mode with paging off. Both paths build identity-mapped
//! page tables for the first 4 GiB with 2 MiB pages, enable long mode and call
//! the kernel's main function with the boot protocol, the pointer to its boot
//! information and the magic value found in EAX. The kernel names that
//! function with [`entry_point!`](crate::entry_point), so this layer imports
//! nothing above it. The kernel replaces these tables with its own once it
//! knows the memory map.

/// `hv_main`'s first argument: which protocol entered the image.
pub const ENTERED_BY_PVH: u32 = 1;
/// `hv_main`'s first argument: which protocol entered the image.
pub const ENTERED_BY_MULTIBOOT2: u32 = 2;

/// Size of the stack the boot CPU uses until it has a guarded one.
const BOOT_STACK_BYTES: usize = 64 * 1024;
/// Size of each interrupt stack (NMI, #DF, #MC) the boot CPU uses until
/// it has guarded ones: room for an NMI that logs a line.
const BOOT_INTERRUPT_STACK_BYTES: usize = 16 * 1024;

core::arch::global_asm!(
    r#"
    .section .multiboot2, "a"
    .balign 8
mb2_header_start:
    .long 0xE85250D6
    .long 0
    .long mb2_header_end - mb2_header_start
    .long 0x100000000 - (0xE85250D6 + (mb2_header_end - mb2_header_start))
    /* Module alignment tag: modules (the capture kernel) start on a page. */
    .balign 8
    .short 6, 0
    .long 8
    .balign 8
    .short 0, 0
    .long 8
mb2_header_end:

    /* XEN_ELFNOTE_PHYS32_ENTRY: QEMU's -kernel enters here, EBX = hvm_start_info. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_entry
    .balign 4

    .section .text.boot32, "ax"
    .code32
    .global multiboot2_entry
multiboot2_entry:
    mov edx, eax
    mov esi, ebx
    mov ebp, {mb2}
    jmp boot32_common

    .global pvh_entry
pvh_entry:
    /* The first instruction's TSC: a capture image reports it as the
     * moment the capture kernel was entered (before .bss is zeroed and the
     * page tables built). */
    rdtsc
    mov dword ptr [hv_pvh_entry_tsc], eax
    mov dword ptr [hv_pvh_entry_tsc + 4], edx
    xor edx, edx
    mov esi, ebx
    mov ebp, {pvh}

boot32_common:
    cli
    cld
    /* Zero .bss: the page tables and the boot stack live there. */
    mov ebx, edx
    lea edi, [__bss_start]
    lea ecx, [__bss_end]
    sub ecx, edi
    shr ecx, 2
    xor eax, eax
    rep stosd
    mov edx, ebx
    lea esp, [boot_stack_top]

    /* Long mode supported? CPUID 0x80000001 EDX bit 29. */
    mov edi, edx
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb no_long_mode
    mov eax, 0x80000001
    cpuid
    bt edx, 29
    jnc no_long_mode
    mov edx, edi

    /* PML4[0] -> PDPT; PDPT[0..4] -> four page directories of 2 MiB pages. */
    lea eax, [boot_pdpt]
    or eax, 3
    mov [boot_pml4], eax
    lea eax, [boot_pd]
    or eax, 3
    mov [boot_pdpt], eax
    add eax, 4096
    mov [boot_pdpt + 8], eax
    add eax, 4096
    mov [boot_pdpt + 16], eax
    add eax, 4096
    mov [boot_pdpt + 24], eax
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov [boot_pd + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jne 2b

    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    lea eax, [boot_pml4]
    mov cr3, eax
    mov ecx, 0xC0000080
    mov edi, edx
    rdmsr
    or eax, 1 << 8
    wrmsr
    mov edx, edi
    mov eax, cr0
    or eax, (1 << 31) | (1 << 16) | 1
    mov cr0, eax
    lgdt [boot_gdt_pointer]
    push 0x08
    lea eax, [boot64]
    push eax
    retf

no_long_mode:
    lea esi, [no_long_mode_message]
3:
    mov al, [esi]
    test al, al
    jz 5f
    mov dx, 0x3FD
4:
    in al, dx
    test al, 0x20
    jz 4b
    mov al, [esi]
    mov dx, 0x3F8
    out dx, al
    inc esi
    jmp 3b
5:
    cli
    hlt
    jmp 5b

    .code64
boot64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + boot_stack_top]
    mov edi, ebp
    mov esi, esi
    mov edx, edx
    xor ebp, ebp
    call hv_boot_main
6:
    cli
    hlt
    jmp 6b

    .section .rodata.boot32, "a"
    .balign 8
    /* 0x08 and 0x10 are what hv runs on. 0x18 (data) and 0x20 (32-bit
     * code) are the selectors the purgatory enters a capture image with
     * (kexec-loader's purgatory ABI): an NMI in the few instructions
     * between this `lgdt` and the reload of SS returns through the
     * purgatory's IDT with `iretq`, which reloads the old CS and SS from
     * this table. Accessed bits set: loading a segment writes nothing. */
boot_gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF
    .quad 0x00CF93000000FFFF
    .quad 0x00CF93000000FFFF
    .quad 0x00CF9B000000FFFF
boot_gdt_pointer:
    .short 5 * 8 - 1
    .quad boot_gdt
no_long_mode_message:
    .asciz "hv: this CPU has no long mode; halting\r\n"

    /* In .data, not .bss: the entry writes it before .bss is zeroed. */
    .section .data.boot32, "aw"
    .balign 8
    .global hv_pvh_entry_tsc
hv_pvh_entry_tsc:
    .quad 0

    .section .bss.boot32, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
    .balign 16
boot_stack_bottom:
    .skip {stack_bytes}
boot_stack_top:
    /* The NMI, #DF and #MC stacks of the boot CPU's first TSS. */
    .balign 16
    .skip {interrupt_stack_bytes}
    .global boot_nmi_stack_top
boot_nmi_stack_top:
    .skip {interrupt_stack_bytes}
    .global boot_double_fault_stack_top
boot_double_fault_stack_top:
    .skip {interrupt_stack_bytes}
    .global boot_machine_check_stack_top
boot_machine_check_stack_top:
"#,
    mb2 = const ENTERED_BY_MULTIBOOT2,
    pvh = const ENTERED_BY_PVH,
    stack_bytes = const BOOT_STACK_BYTES,
    interrupt_stack_bytes = const BOOT_INTERRUPT_STACK_BYTES,
);

/// Names the kernel's main function, which the boot stub calls in long mode
/// on the boot stack as `extern "C" fn(entered_by: u32, info: u32, magic:
/// u32) -> !` (see [`ENTERED_BY_PVH`], [`ENTERED_BY_MULTIBOOT2`]).
#[macro_export]
macro_rules! entry_point {
    ($main:path) => {
        // The stub's `call hv_boot_main` lands here. A symbol, not an
        // import, so that the lowest layer does not name the highest.
        #[allow(unsafe_code)]
        mod boot_entry {
            core::arch::global_asm!(
                ".section .text.boot64, \"ax\"",
                ".global hv_boot_main",
                "hv_boot_main:",
                "jmp {main}",
                main = sym $main,
            );
        }
        const _: extern "C" fn(u32, u32, u32) -> ! = $main;
    };
}

unsafe extern "C" {
    static hv_pvh_entry_tsc: u64;
    static boot_nmi_stack_top: u8;
    static boot_double_fault_stack_top: u8;
    static boot_machine_check_stack_top: u8;
    static __image_start: u8;
    static __image_end: u8;
    static __text_end: u8;
    static __rodata_end: u8;
}

/// Where the image's parts lie, as (start, length), page-aligned.
#[derive(Debug, Clone, Copy)]
pub struct ImageLayout {
    /// Code.
    pub text: (u64, u64),
    /// Read-only data (with the exception tables, unwind tables, notes).
    pub rodata: (u64, u64),
}

/// The image's parts, from the linker script.
pub fn image_layout() -> ImageLayout {
    let start = (&raw const __image_start).addr() as u64;
    let text_end = (&raw const __text_end).addr() as u64;
    let rodata_end = (&raw const __rodata_end).addr() as u64;
    ImageLayout {
        text: (start, text_end - start),
        rodata: (text_end, rodata_end - text_end),
    }
}

/// The tops of the boot CPU's first interrupt stacks (NMI, #DF, #MC), in
/// the image's `.bss`, unguarded.
pub fn boot_interrupt_stacks() -> (u64, u64, u64) {
    (
        (&raw const boot_nmi_stack_top).addr() as u64,
        (&raw const boot_double_fault_stack_top).addr() as u64,
        (&raw const boot_machine_check_stack_top).addr() as u64,
    )
}

/// The TSC at the PVH entry's first instruction (0: entered otherwise).
pub fn pvh_entry_tsc() -> u64 {
    // SAFETY: (1) the boot stub wrote the word once, before any Rust code
    // ran, and nothing writes it since; (2) a volatile read, since the
    // compiler sees no writer.
    unsafe { core::ptr::read_volatile(&raw const hv_pvh_entry_tsc) }
}

/// The image's physical range (start, length), from the linker script.
pub fn image_range() -> (u64, u64) {
    let start = (&raw const __image_start).addr() as u64;
    let end = (&raw const __image_end).addr() as u64;
    (start, end - start)
}
