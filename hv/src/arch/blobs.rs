//! Machine code that runs elsewhere than where it is linked: the
//! purgatory (copied into the crash reservation, the last code the crashed
//! hypervisor runs; its own crate, built by `hv/build.rs`) and the in-tree
//! test guest (copied into guest memory, assembled here). The layers above
//! copy their bytes.

use hv_abi::hypercall;

/// The purgatory blob (`kexec-loader/purgatory/`): built for
/// `x86_64-unknown-none` by `hv/build.rs`, which checked that it needs no
/// relocation, enters at offset 0 and fits its room. The crash layer lays
/// it out with its tables in the reservation (see `crash::purgatory`).
static PURGATORY_BLOB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/purgatory.bin"));

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
    static guest_image_start: u8;
    static guest_image_end: u8;
}

/// The bytes between two linker symbols of a blob in `.rodata`.
fn blob(start: *const u8, end: *const u8) -> &'static [u8] {
    let len = end.addr() - start.addr();
    // SAFETY: (1) the two symbols bound a blob in .rodata, immutable for good.
    unsafe { core::slice::from_raw_parts(start, len) }
}

/// The purgatory blob, position-independent, entered at its first byte.
pub fn purgatory_blob() -> &'static [u8] {
    PURGATORY_BLOB
}

/// The test guest's code: 32-bit protected mode, paging off.
pub fn test_guest_code() -> &'static [u8] {
    blob(&raw const guest_image_start, &raw const guest_image_end)
}

/// Jumps to the purgatory at `area`. Interrupts must be off; nothing of
/// the hypervisor is used after this instruction. The purgatory expects
/// what the hypervisor always has here: 64-bit mode with code selector
/// [`KERNEL_CODE_SELECTOR`](super::gdt::KERNEL_CODE_SELECTOR) (its entry
/// IDT names the same selector), and the area identity-mapped writable
/// and executable until it loads its own page tables.
///
/// The crash layer calls it only after it installed the purgatory there at
/// boot and checked its own copy of the digests; the purgatory checks
/// again from its own.
pub fn jump_to_purgatory(area: u64) -> ! {
    // SAFETY: (1) as documented above; (2) the purgatory never returns.
    unsafe { core::arch::asm!("cli", "jmp {}", in(reg) area, options(noreturn)) }
}
