//! The purgatory: the last code the crashed hypervisor runs, and the first
//! that runs from the crash reservation. It depends on nothing of the
//! crashed kernel but the jump that reaches it: its own IDTs, GDT, page
//! tables and stack, and its own copy of the digest table, all inside its
//! area (`abi.rs` beside this file maps it). It checks the table and every
//! segment itself (`check.rs`; XXH64 in `xxh64.rs` or SHA-256 in
//! `sha256.rs`, as its parameters say) and either enters
//! the capture kernel or refuses, with one line on COM1 and a `@hv`
//! report line, and stops.
//!
//! Built by `hv/build.rs` with `rustc` alone (no crate but `core`) for
//! `x86_64-unknown-none` as a static position-independent executable,
//! linked at 0 by `link.ld` and cut into a flat blob; the build fails if
//! the blob needs any relocation, so it runs wherever it is copied.
//!
//! # The way through, and what an NMI meets on it
//! The crashed kernel jumps to offset 0 in 64-bit mode, interrupts off,
//! with its own GDT (selector 0x08 its 64-bit code, the same as ours), CR3
//! (4-level paging: our tables are 4-level too), stack, and the area mapped
//! writable and executable.
//!
//! 1. `lidt` of the entry IDT, before anything else: every gate names
//!    selector 0x08, 64-bit code in both GDTs, and IST 0. An NMI from here
//!    on runs our handler, which counts it and returns.
//! 2. RDTSC into a register (the entry stamp).
//! 3. SS = null and RSP = our stack in one step (`mov ss` holds interrupts
//!    off for the next instruction), then our GDT, CR4.PGE off (flushes
//!    the crashed kernel's global translations), our CR3, CS = 0x08 and
//!    the data segments = 0x18. The entry stamp goes to the scratch.
//! 4. The checks ([`check::check`]); a refusal stops here.
//! 5. Linux: CS = 0x10, then the exit IDT, whose gates name 0x10 (Linux's
//!    own decompressor GDT has 64-bit code at 0x10 too, and 32-bit code
//!    at 0x08), RSI = zero page, jump.
//! 6. PVH: compatibility mode (CS = 0x20), CR4 down to PAE alone (CR4.PCIDE
//!    would make clearing CR0.PG fault), then the 32-bit IDT. Its NMI gate
//!    reads right in both formats: vector 2 at byte 16 as a 32-bit gate,
//!    and at byte 32 as a 64-bit gate (where the 32-bit gates of vectors 4
//!    and 5, `INTO` and `BOUND`, would be), so the `mov cr0` that leaves
//!    long mode has no window. CR0 = PE | ET (paging off), EFER.LME off,
//!    CR4 = 0, flat data segments, TR = the 32-bit TSS (base 0, limit
//!    0x67), EFLAGS = 0x2, EBX = start info, jump.
//!
//! # What a capture kernel meets when an NMI comes right after the jump
//! Linux: the exit IDT stays loaded until Linux's `startup_64` loads its
//! own GDT and then its boot IDT a few instructions later. An NMI in that
//! window runs our handler (selector 0x10 is 64-bit code in our GDT and in
//! Linux's decompressor GDT, which keeps 32-bit code at 0x08) and returns.
//! After Linux's `lidt`, Linux's early IDT decides.
//!
//! hv's capture mode (PVH): the 32-bit IDT stays loaded until hv's own
//! `lidt` in `hv_main`. In hv's 32-bit entry code an NMI takes the 32-bit
//! gate (selector 0x20 of our GDT) and returns. Once hv turns paging on
//! (long mode, still on our GDT, then on hv's boot GDT) the same table is
//! read as a 64-bit IDT, whose NMI gate names selector 0x08: 64-bit code
//! in our GDT and in hv's boot GDT, and the handler lies in the area, which
//! hv's boot page tables map and its memory map keeps reserved. One window
//! is left: between hv's `lgdt` and its far return to 0x08 (three
//! instructions), CS still holds our 0x20, which hv's boot GDT lacks; the
//! handler's `iretq` faults there and the CPU resets.
//!
//! Both kernels treat the area as free memory once they have their own
//! IDT (Linux) or never touch it (hv, whose memory map reserves it).
//!
//! # Test knob
//! With [`abi::flags::SELF_NMI`] the purgatory sends its own CPU an NMI
//! through the local APIC at each step and waits until each one was
//! counted in the scratch fields: before its stack, after its tables, and
//! on the Linux path before the jump (3 in 64-bit mode); on the PVH path
//! in compatibility mode under the entry IDT and under the 32-bit IDT (4
//! in 64-bit mode in all), then with paging off and after TR (2 in
//! 32-bit mode).
#![no_std]
#![no_main]

mod abi;
mod check;
mod sha256;
mod xxh64;

use core::arch::{asm, global_asm};

use abi::{flags, param, scratch, selector};

/// How long each test NMI is waited for (`pause` loops).
const NMI_WAIT_LOOPS: u32 = 1_000_000;

global_asm!(
    r#"
    .section .text.head, "ax"

.macro SELF_NMI64 counter
    test byte ptr [rip + purgatory_head + {params} + {flags}], {self_nmi}
    jz 8f
    mov r15, [rip + purgatory_head + {scratch} + \counter]
    call purgatory_send_nmi64
    mov ecx, {nmi_wait}
7:
    cmp r15, [rip + purgatory_head + {scratch} + \counter]
    jne 8f
    pause
    dec ecx
    jnz 7b
8:
.endm

.macro SELF_NMI32 counter
    test byte ptr [ebx + {params} + {flags}], {self_nmi}
    jz 8f
    mov esi, [ebx + {scratch} + \counter]
    call purgatory_send_nmi32
    mov ecx, {nmi_wait}
7:
    cmp esi, [ebx + {scratch} + \counter]
    jne 8f
    pause
    dec ecx
    jnz 7b
8:
.endm

    .code64
    .global purgatory_head
purgatory_head:
    jmp purgatory_entry64
    .balign 16
    .ascii "HVPURGAT"
    .long purgatory_nmi64 - purgatory_head
    .long purgatory_fault64 - purgatory_head
    .long purgatory_nmi32 - purgatory_head
    .long purgatory_fault32 - purgatory_head
    .long 16
    .long 0

purgatory_entry64:
    cli
    lidt [rip + purgatory_head + {params} + {idtr64_entry}]
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r12, rax
    SELF_NMI64 {nmi64_count}
    xor eax, eax
    mov ss, eax
    lea rsp, [rip + purgatory_head + {stack_top}]
    lgdt [rip + purgatory_head + {params} + {gdtr}]
    mov rax, cr4
    and rax, ~(1 << 7)
    mov cr4, rax
    mov rax, [rip + purgatory_head + {params} + {cr3}]
    mov cr3, rax
    push {code64_entry}
    lea rax, [rip + 2f]
    push rax
    retfq
2:
    mov eax, {data}
    mov ds, eax
    mov es, eax
    mov ss, eax
    mov fs, eax
    mov gs, eax
    mov [rip + purgatory_head + {scratch} + {entry_tsc}], r12
    SELF_NMI64 {nmi64_count}
    lea rdi, [rip + purgatory_head]
    call purgatory_verify
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rip + purgatory_head + {scratch} + {verified_tsc}], rax
    lea rbx, [rip + purgatory_head]
    cmp qword ptr [rbx + {params} + {mode}], {mode_pvh}
    je 5f

    /* Linux 64-bit boot protocol. */
    push {code64_linux}
    lea rax, [rip + 3f]
    push rax
    retfq
3:
    lidt [rbx + {params} + {idtr64_exit}]
    SELF_NMI64 {nmi64_count}
    mov rsi, [rbx + {params} + {argument}]
    mov rcx, [rbx + {params} + {entry}]
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rbx + {scratch} + {jump_tsc}], rax
    mov qword ptr [rbx + {scratch} + {jumped}], 1
    push 2
    popfq
    xor eax, eax
    xor edx, edx
    xor ebx, ebx
    xor edi, edi
    xor ebp, ebp
    jmp rcx

    /* PVH: compatibility mode first. */
5:
    push {code32}
    lea rax, [rip + 6f]
    push rax
    retfq
    .code32
6:
    SELF_NMI32 {nmi64_count}
    mov eax, cr4
    and eax, 1 << 5
    mov cr4, eax
    lidt [ebx + {params} + {idtr32}]
    SELF_NMI32 {nmi64_count}
    mov eax, {cr0_pvh}
    mov cr0, eax
    SELF_NMI32 {nmi32_count}
    mov ecx, 0xC0000080
    rdmsr
    and eax, ~(1 << 8)
    wrmsr
    xor eax, eax
    mov cr4, eax
    mov eax, {data}
    mov ds, eax
    mov es, eax
    mov fs, eax
    mov gs, eax
    mov ss, eax
    mov eax, {tss32}
    ltr ax
    SELF_NMI32 {nmi32_count}
    rdtsc
    mov [ebx + {scratch} + {jump_tsc}], eax
    mov [ebx + {scratch} + {jump_tsc} + 4], edx
    mov dword ptr [ebx + {scratch} + {jumped}], 1
    mov eax, [ebx + {params} + {entry}]
    mov ebx, [ebx + {params} + {argument}]
    push 2
    popfd
    jmp eax

    /* The NMI handlers count and return. */
    .code64
    .balign 16
purgatory_nmi64:
    lock inc qword ptr [rip + purgatory_head + {scratch} + {nmi64_count}]
    iretq

    .code32
    .balign 16
purgatory_nmi32:
    push eax
    call purgatory_nmi32_here
purgatory_nmi32_here:
    pop eax
    lock inc dword ptr [eax + purgatory_nmi32_to_head + {scratch} + {nmi32_count}]
    pop eax
    iretd
    .set purgatory_nmi32_to_head, purgatory_head - purgatory_nmi32_here

    /* One stub per vector, 16 bytes apart: push the vector, go on. */
    .code64
    .balign 16
purgatory_fault64:
    .set purgatory_vector, 0
    .rept 32
    .balign 16
    push purgatory_vector
    jmp purgatory_fault64_common
    .set purgatory_vector, purgatory_vector + 1
    .endr

purgatory_fault64_common:
    pop rdi
    mov eax, 0x60227D00
    bt eax, edi
    jnc 2f
    add rsp, 8
2:
    mov rsi, [rsp]
    lea rdx, [rip + purgatory_head]
    and rsp, -16
    call purgatory_fault
3:
    cli
    hlt
    jmp 3b

purgatory_send_nmi64:
    mov ecx, 0x1B
    rdmsr
    test eax, 1 << 10
    jnz 2f
    and eax, 0xFFFFF000
    mov edx, [rax + 0x20]
    mov [rax + 0x310], edx
    mov dword ptr [rax + 0x300], 0x4400
    ret
2:
    mov ecx, 0x802
    rdmsr
    mov edx, eax
    mov eax, 0x4400
    mov ecx, 0x830
    wrmsr
    ret

    .code32
purgatory_send_nmi32:
    mov ecx, 0x1B
    rdmsr
    test eax, 1 << 10
    jnz 2f
    and eax, 0xFFFFF000
    mov edx, [eax + 0x20]
    mov [eax + 0x310], edx
    mov dword ptr [eax + 0x300], 0x4400
    ret
2:
    mov ecx, 0x802
    rdmsr
    mov edx, eax
    mov eax, 0x4400
    mov ecx, 0x830
    wrmsr
    ret

    /* Any exception in 32-bit protected mode: one fixed line, then stop. */
purgatory_fault32:
    cli
    call purgatory_fault32_here
purgatory_fault32_here:
    pop ebx
    lea esi, [ebx + purgatory_fault32_to_text]
    add ebx, purgatory_fault32_to_head
3:
    mov al, [esi]
    test al, al
    jz 5f
    mov dx, {com1} + 5
4:
    in al, dx
    test al, 0x20
    jz 4b
    mov al, [esi]
    mov dx, {com1}
    out dx, al
    inc esi
    jmp 3b
5:
    test byte ptr [ebx + {params} + {flags}], {exit_emulator}
    jz 7f
    mov dx, {qemu_exit_port}
    mov al, {qemu_exit_refused}
    out dx, al
    lea esi, [ebx + purgatory_shutdown_offset]
    mov dx, {bochs_port}
6:
    mov al, [esi]
    test al, al
    jz 7f
    out dx, al
    inc esi
    jmp 6b
7:
    cli
    hlt
    jmp 7b

purgatory_fault32_text:
    .ascii "\r\n*** purgatory: exception in 32-bit protected mode (its last steps, or the capture kernel before its own IDT); halting\r\n"
    .asciz "@hv {{\"capture\":{{\"purgatory_saw_fault\":\"exception in 32-bit protected mode\"}}}}\r\n"
purgatory_shutdown_text:
    .asciz "Shutdown"
    .set purgatory_fault32_to_text, purgatory_fault32_text - purgatory_fault32_here
    .set purgatory_fault32_to_head, purgatory_head - purgatory_fault32_here
    .set purgatory_shutdown_offset, purgatory_shutdown_text - purgatory_head
    .code64
"#,
    params = const abi::PARAMETERS_OFFSET,
    scratch = const abi::SCRATCH_OFFSET,
    stack_top = const abi::STACK_TOP_OFFSET,
    flags = const param::FLAGS,
    self_nmi = const flags::SELF_NMI,
    exit_emulator = const flags::EXIT_EMULATOR,
    nmi_wait = const NMI_WAIT_LOOPS,
    idtr64_entry = const param::IDTR64_ENTRY,
    idtr64_exit = const param::IDTR64_EXIT,
    idtr32 = const param::IDTR32,
    gdtr = const param::GDTR,
    cr3 = const param::CR3,
    mode = const param::MODE,
    entry = const param::ENTRY,
    argument = const param::ARGUMENT,
    mode_pvh = const abi::MODE_PVH32,
    code64_entry = const selector::CODE64_ENTRY,
    code64_linux = const selector::CODE64_LINUX,
    code32 = const selector::CODE32,
    data = const selector::DATA,
    tss32 = const selector::TSS32,
    cr0_pvh = const CR0_PE | CR0_ET,
    entry_tsc = const scratch::ENTRY_TSC,
    verified_tsc = const scratch::VERIFIED_TSC,
    jump_tsc = const scratch::JUMP_TSC,
    jumped = const scratch::JUMPED,
    nmi64_count = const scratch::NMI64_COUNT,
    nmi32_count = const scratch::NMI32_COUNT,
    com1 = const abi::COM1,
    qemu_exit_port = const abi::QEMU_EXIT_PORT,
    qemu_exit_refused = const abi::QEMU_EXIT_REFUSED,
    bochs_port = const abi::BOCHS_SHUTDOWN_PORT,
);

/// CR0.PE: protected mode.
const CR0_PE: u32 = 1 << 0;
/// CR0.ET: hard-wired to 1 since the i486.
const CR0_ET: u32 = 1 << 4;

/// What the purgatory's page tables map: the first 4 GiB, identity.
const IDENTITY_END: u64 = 1 << 32;

/// Physical memory through the purgatory's own identity map.
struct IdentityMap;

impl check::Memory for IdentityMap {
    fn bytes(&self, start: u64, len: u64) -> Option<&[u8]> {
        let end = start.checked_add(len)?;
        if start == 0 || len == 0 || end > IDENTITY_END {
            return None;
        }
        // SAFETY: 1. `[start, end)` lies in the first 4 GiB, which the
        // purgatory's page tables map one to one, so the pointer is valid
        // for `len` bytes, non-null and needs no alignment. 2. Nothing
        // writes it while the slice lives: every other CPU was stopped by
        // the crashed kernel, this one only reads, and the scratch fields
        // the NMI handler writes are never read through this map.
        Some(unsafe { core::slice::from_raw_parts(start as *const u8, len as usize) })
    }
}

/// A byte to an I/O port.
fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effect; the ports written are COM1
    // and the emulators' exit ports.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) }
}

/// A byte from an I/O port.
fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O has no memory effect; the port read is COM1's line
    // status register.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) };
    value
}

/// Writes `bytes` to COM1, polling the transmitter (the crashed kernel
/// set the UART up; without one the status reads 0xFF and nothing waits).
fn serial_write(bytes: &[u8]) {
    for &byte in bytes {
        for _ in 0..1_000_000 {
            if inb(abi::COM1 + 5) & 0x20 != 0 {
                break;
            }
        }
        outb(abi::COM1, byte);
    }
}

/// The parameter word at `field`, 0 when unreadable.
fn parameter(area: u64, field: usize) -> u64 {
    let start = area + (abi::PARAMETERS_OFFSET + field) as u64;
    check::Memory::bytes(&IdentityMap, start, 8)
        .and_then(|bytes| abi::u64_at(bytes, 0))
        .unwrap_or(0)
}

/// Writes the crashed kernel's waiting words (its mailbox) and `line`,
/// ends the emulator when the parameters ask for it, and halts for good.
fn stop(area: u64, line: &check::Line) -> ! {
    if let Some(text) = check::mailbox_text(parameter(area, param::MAILBOX), &IdentityMap) {
        serial_write(text);
    }
    serial_write(line.as_bytes());
    if parameter(area, param::FLAGS) & flags::EXIT_EMULATOR != 0 {
        outb(abi::QEMU_EXIT_PORT, abi::QEMU_EXIT_REFUSED);
        for &byte in b"Shutdown" {
            outb(abi::BOCHS_SHUTDOWN_PORT, byte);
        }
    }
    loop {
        // SAFETY: halting with interrupts off only stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Step 4: returns when every check passed; refuses and stops otherwise.
#[unsafe(no_mangle)]
extern "C" fn purgatory_verify(area: u64) {
    if let Err(refusal) = check::check(area, &IdentityMap) {
        let mut line = check::Line::new();
        check::refusal_lines(&refusal, &mut line);
        stop(area, &line);
    }
}

/// Any exception in 64-bit mode: a refusal before the jump; after it, the
/// capture kernel faulted before it had an IDT of its own.
#[unsafe(no_mangle)]
extern "C" fn purgatory_fault(vector: u64, rip: u64, area: u64) -> ! {
    let jumped = check::Memory::bytes(
        &IdentityMap,
        area + (abi::SCRATCH_OFFSET + scratch::JUMPED) as u64,
        8,
    )
    .and_then(|bytes| abi::u64_at(bytes, 0))
    .unwrap_or(0);
    let mut line = check::Line::new();
    if jumped != 0 {
        check::capture_fault_lines(vector, rip, &mut line);
    } else {
        check::refusal_lines(&check::Refusal::Exception { vector, rip }, &mut line);
    }
    stop(area, &line)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // Unreachable: the build fails if the blob holds a panic's location
    // (it would need a relocation). Stop without touching anything.
    loop {
        // SAFETY: halting with interrupts off only stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
