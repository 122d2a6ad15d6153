//! The crash path saves registers as `crash::shootdown::UserRegs` and the
//! core header writes them as `kexec_loader::elfcore::CpuRegisters`; the
//! kernel converts by array. Both must follow Linux's `user_regs_struct`
//! order, field by field, or gdb shows the wrong value in every register.

use crash::shootdown::UserRegs;
use kexec_loader::elfcore::CpuRegisters;

#[test]
fn crash_records_and_prstatus_notes_use_the_same_register_order() {
    let values: [u64; 27] = core::array::from_fn(|index| 0x1000 + index as u64);
    let saved = UserRegs::from_array(values);
    let written = CpuRegisters::from_array(saved.to_array());
    let pairs = [
        (saved.r15, written.r15, "r15"),
        (saved.r14, written.r14, "r14"),
        (saved.r13, written.r13, "r13"),
        (saved.r12, written.r12, "r12"),
        (saved.rbp, written.rbp, "rbp"),
        (saved.rbx, written.rbx, "rbx"),
        (saved.r11, written.r11, "r11"),
        (saved.r10, written.r10, "r10"),
        (saved.r9, written.r9, "r9"),
        (saved.r8, written.r8, "r8"),
        (saved.rax, written.rax, "rax"),
        (saved.rcx, written.rcx, "rcx"),
        (saved.rdx, written.rdx, "rdx"),
        (saved.rsi, written.rsi, "rsi"),
        (saved.rdi, written.rdi, "rdi"),
        (saved.orig_rax, written.orig_rax, "orig_rax"),
        (saved.rip, written.rip, "rip"),
        (saved.cs, written.cs, "cs"),
        (saved.eflags, written.eflags, "eflags"),
        (saved.rsp, written.rsp, "rsp"),
        (saved.ss, written.ss, "ss"),
        (saved.fs_base, written.fs_base, "fs_base"),
        (saved.gs_base, written.gs_base, "gs_base"),
        (saved.ds, written.ds, "ds"),
        (saved.es, written.es, "es"),
        (saved.fs, written.fs, "fs"),
        (saved.gs, written.gs, "gs"),
    ];
    for (from_crash, into_note, name) in pairs {
        assert_eq!(from_crash, into_note, "{name} lands in another slot");
    }
    // Linux's order itself: r15 first, rip 17th, gs last.
    assert_eq!(
        (written.r15, written.rip, written.gs),
        (0x1000, 0x1010, 0x101a)
    );
}
