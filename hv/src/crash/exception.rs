//! Fatal exceptions. In the hypervisor every exception but the ones the
//! fix-up table resumes is fatal: it prints the vector, error code, RIP,
//! RSP, CR2 and all registers on the lock-free emergency console, reports
//! it, and enters the crash path. Registered at boot for vectors 0 to 31
//! (the NMI vector has its own handler, [`super::nmi`]).

use core::fmt::Write;

use crash::shootdown::CpuRegisters;

use crate::arch::idt::TrapFrame;
use crate::console::EmergencyConsole;

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization exception",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security exception",
    "reserved 31",
];

/// The handler of every exception vector.
pub fn on_exception(frame: &mut TrapFrame) {
    fatal_exception(frame)
}

fn fatal_exception(frame: &TrapFrame) -> ! {
    super::note_entry();
    let cr2 = crate::arch::cpu::cr2();
    let name = EXCEPTION_NAMES[(frame.vector & 31) as usize];
    let regs = super::regs_from_frame(frame);
    super::crash(
        super::Reason::Exception {
            vector: frame.vector,
            name,
            error_code: frame.error_code,
            cr2,
        },
        &regs,
    )
}

/// Prints a fatal exception on the emergency console and reports it: the
/// coordinator's words, once its NMIs are out.
pub fn print(cpu: usize, vector: u64, name: &str, error_code: u64, cr2: u64, regs: &CpuRegisters) {
    let _ = writeln!(
        EmergencyConsole,
        "\n*** hv: fatal exception {name} (vector {vector}) on cpu {cpu}"
    );
    // The details wait with the rest of the crash's words.
    let mut out = super::words::Words;
    let _ = writeln!(
        out,
        "    error code {error_code:#x}  rip {:#018x}  rsp {:#018x}  cr2 {cr2:#018x}  rflags {:#x}  cs {:#x}  ss {:#x}",
        regs.rip, regs.rsp, regs.eflags, regs.cs, regs.ss
    );
    let registers = [
        ("rax", regs.rax),
        ("rbx", regs.rbx),
        ("rcx", regs.rcx),
        ("rdx", regs.rdx),
        ("rsi", regs.rsi),
        ("rdi", regs.rdi),
        ("rbp", regs.rbp),
        ("r8", regs.r8),
        ("r9", regs.r9),
        ("r10", regs.r10),
        ("r11", regs.r11),
        ("r12", regs.r12),
        ("r13", regs.r13),
        ("r14", regs.r14),
        ("r15", regs.r15),
    ];
    for row in registers.chunks(4) {
        let _ = write!(out, "   ");
        for (register, value) in row {
            let _ = write!(out, " {register:>3} {value:#018x}");
        }
        let _ = writeln!(out);
    }
    super::words::report(|o| {
        o.field("exception").object(|o| {
            o.field("vector").u64(vector)?;
            o.field("name").str(name)?;
            o.field("error_code").u64(error_code)?;
            o.field("rip").u64(regs.rip)?;
            o.field("rsp").u64(regs.rsp)?;
            o.field("cr2").u64(cr2)?;
            o.field("cpu").u64(cpu as u64)
        })
    });
}
