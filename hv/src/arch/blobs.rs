//! Machine code that runs elsewhere than where it is linked: the
//! purgatory (copied into the crash reservation, the last code the crashed
//! hypervisor runs) and the in-tree test guest (copied into guest memory).
//! Both are assembled here; the layers above copy their bytes.

use core::mem::offset_of;

use hv_abi::hypercall;

/// The purgatory's layout: code, then parameters, page tables, boot data
/// and stack, in one area of [`PURGATORY_AREA_BYTES`] at the end of the
/// reservation. The crash layer fills it in (see `crash::purgatory`).
pub const PURGATORY_AREA_BYTES: u64 = 64 * 1024;
/// Code and parameters: the first page.
pub const PURGATORY_CODE_BYTES: usize = 0xC00;
/// Where the stack's top is, from the area's start.
pub const PURGATORY_STACK_TOP_OFFSET: u64 = PURGATORY_AREA_BYTES;

/// The parameters after the code.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct PurgatoryParameters {
    pub gdt: [u64; 4],
    /// `lgdt` operand: limit, then the 64-bit base in four halves.
    pub gdtr: [u16; 5],
    pub mode: u64,
    pub cr3: u64,
    pub entry: u64,
    pub argument: u64,
}

/// `mode`: Linux 64-bit boot protocol.
pub const MODE_LINUX64: u64 = 0;
/// `mode`: PVH 32-bit entry.
pub const MODE_PVH32: u64 = 1;

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
    params = const PURGATORY_CODE_BYTES,
    cr3 = const offset_of!(PurgatoryParameters, cr3),
    gdtr = const offset_of!(PurgatoryParameters, gdtr),
    mode = const offset_of!(PurgatoryParameters, mode),
    pvh = const MODE_PVH32,
    argument = const offset_of!(PurgatoryParameters, argument),
    entry = const offset_of!(PurgatoryParameters, entry),
    stack_top = const PURGATORY_STACK_TOP_OFFSET,
    code_bytes = const PURGATORY_CODE_BYTES,
);

/// Iterations of the test guest's busy loop between two exits: it spends
/// most of its time in guest mode, so an NMI (a crash shootdown) usually
/// finds it there.
const TEST_GUEST_WORK_LOOPS: u32 = 131072;

core::arch::global_asm!(
    r#"
    .section .rodata.guest_image, "a"
    .global guest_image_start
guest_image_start:
    .code32
    mov dx, 0xE9
    .irp c, 0x67, 0x75, 0x65, 0x73, 0x74, 0x20, 0x75, 0x70, 0x0A
    mov al, \c
    out dx, al
    .endr
    /* The hypercall instruction, as guests pick it: VMMCALL on AMD
       (CPUID vendor "AuthenticAMD" or "HygonGenuine"), VMCALL elsewhere.
       EBP != 0: VMMCALL. */
    xor eax, eax
    cpuid
    xor ebp, ebp
    cmp ebx, 0x68747541
    je 1f
    cmp ebx, 0x6F677948
    jne 5f
1:
    inc ebp
5:
    xor esi, esi
2:
    /* Some work in guest mode between exits, as a real guest has (not
       the crash caller: its 256 iterations must come soon). */
    cmp edi, {call_crash}
    je 9f
    mov ecx, {work_loops}
8:
    dec ecx
    jnz 8b
9:
    xor eax, eax
    cpuid
    mov eax, {hypercall_yield}
    mov ebx, esi
    call 6f
    inc esi
    cmp edi, {misbehave}
    jne 3f
    mov eax, dword ptr [0x40000000]
3:
    cmp edi, {call_crash}
    jne 4f
    cmp esi, 256
    jb 4f
    mov eax, {hypercall_crash}
    call 6f
4:
    test esi, 0x3F
    jnz 2b
    hlt
    jmp 2b
6:
    test ebp, ebp
    jnz 7f
    vmcall
    ret
7:
    vmmcall
    ret
    .code64
    .global guest_image_end
guest_image_end:
"#,
    hypercall_yield = const hypercall::YIELD,
    work_loops = const TEST_GUEST_WORK_LOOPS,
    misbehave = const hypercall::MISBEHAVE,
    call_crash = const hypercall::CALL_CRASH,
    hypercall_crash = const hypercall::CRASH,
);

unsafe extern "C" {
    static purgatory_start: u8;
    static purgatory_end: u8;
    static guest_image_start: u8;
    static guest_image_end: u8;
}

/// The bytes between two linker symbols of a blob in `.rodata`.
fn blob(start: *const u8, end: *const u8) -> &'static [u8] {
    let len = end.addr() - start.addr();
    // SAFETY: (1) the two symbols bound a blob in .rodata, immutable for good.
    unsafe { core::slice::from_raw_parts(start, len) }
}

/// The purgatory's code (its first [`PURGATORY_CODE_BYTES`]).
pub fn purgatory_code() -> &'static [u8] {
    blob(&raw const purgatory_start, &raw const purgatory_end)
}

/// The test guest's code: 32-bit protected mode, paging off.
pub fn test_guest_code() -> &'static [u8] {
    blob(&raw const guest_image_start, &raw const guest_image_end)
}

/// Jumps to the purgatory at `area`. Interrupts must be off; nothing of
/// the hypervisor is used after this instruction.
///
/// The crash layer calls it only after it installed the purgatory there at
/// boot and verified its digest and every other loaded piece's.
pub fn jump_to_purgatory(area: u64) -> ! {
    // SAFETY: (1) as documented above; (2) the purgatory never returns.
    unsafe { core::arch::asm!("cli", "jmp {}", in(reg) area, options(noreturn)) }
}
