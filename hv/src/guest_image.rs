//! The in-tree guest: 32-bit protected-mode code, paging off, loaded at
//! guest-physical 0x1000. It greets through the debug port, then loops:
//! CPUID, a yield hypercall carrying its iteration count, and every 64
//! iterations a HLT. With EDI = 1 at start it reads guest-physical 1 GiB,
//! outside its EPT, which must stop it and nothing else.

/// Guest-physical address the image is loaded at.
pub const LOAD_ADDRESS: u64 = 0x1000;
/// Initial guest stack pointer.
pub const STACK_TOP: u64 = 0x8000;
/// EAX of the yield hypercall (EBX: the guest's iteration count).
pub const HYPERCALL_YIELD: u64 = 1;
/// EAX of the print hypercall (EBX: one byte).
pub const HYPERCALL_PRINT: u64 = 2;
/// EAX of the crash hypercall (honoured only when the command line allows).
pub const HYPERCALL_CRASH: u64 = 0xC0;
/// EDI value that makes the guest touch memory outside its EPT.
pub const MISBEHAVE: u64 = 1;
/// EDI value that makes the guest make the crash hypercall after 256
/// iterations.
pub const CALL_CRASH: u64 = 2;

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
    xor esi, esi
2:
    xor eax, eax
    cpuid
    mov eax, {hypercall_yield}
    mov ebx, esi
    vmcall
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
    vmcall
4:
    test esi, 0x3F
    jnz 2b
    hlt
    jmp 2b
    .code64
    .global guest_image_end
guest_image_end:
"#,
    hypercall_yield = const HYPERCALL_YIELD,
    misbehave = const MISBEHAVE,
    call_crash = const CALL_CRASH,
    hypercall_crash = const HYPERCALL_CRASH,
);

unsafe extern "C" {
    static guest_image_start: u8;
    static guest_image_end: u8;
}

/// The guest's code bytes.
pub fn bytes() -> &'static [u8] {
    let start = &raw const guest_image_start;
    let len = (&raw const guest_image_end).addr() - start.addr();
    // SAFETY: the two symbols bound the image in .rodata, immutable for good.
    unsafe { core::slice::from_raw_parts(start, len) }
}
