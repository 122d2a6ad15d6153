//! Fatal exceptions. In the hypervisor every exception but the ones the
//! fix-up table resumes is fatal: it prints the vector, error code, RIP,
//! RSP, CR2 and all registers on the lock-free emergency console, reports
//! it, and enters the crash path. Registered at boot for vectors 0 to 31
//! (the NMI vector has its own handler, [`super::nmi`]).

use core::fmt::Write;

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
    crate::console::enter_emergency();
    let cr2 = crate::arch::cpu::cr2();
    let cpu = crate::cpu::percpu::current_cpu_index();
    let name = EXCEPTION_NAMES[(frame.vector & 31) as usize];
    let mut out = EmergencyConsole;
    let _ = writeln!(
        out,
        "\n*** hv: fatal exception {name} (vector {}) on cpu {cpu}",
        frame.vector
    );
    let _ = writeln!(
        out,
        "    error code {:#x}  rip {:#018x}  rsp {:#018x}  cr2 {:#018x}  rflags {:#x}  cs {:#x}  ss {:#x}",
        frame.error_code, frame.rip, frame.rsp, cr2, frame.rflags, frame.cs, frame.ss
    );
    let registers = [
        ("rax", frame.rax),
        ("rbx", frame.rbx),
        ("rcx", frame.rcx),
        ("rdx", frame.rdx),
        ("rsi", frame.rsi),
        ("rdi", frame.rdi),
        ("rbp", frame.rbp),
        ("r8", frame.r8),
        ("r9", frame.r9),
        ("r10", frame.r10),
        ("r11", frame.r11),
        ("r12", frame.r12),
        ("r13", frame.r13),
        ("r14", frame.r14),
        ("r15", frame.r15),
    ];
    for row in registers.chunks(4) {
        let _ = write!(out, "   ");
        for (register, value) in row {
            let _ = write!(out, " {register:>3} {value:#018x}");
        }
        let _ = writeln!(out);
    }
    crate::console::report::emergency(|o| {
        o.field("exception").object(|o| {
            o.field("vector").u64(frame.vector)?;
            o.field("name").str(name)?;
            o.field("error_code").u64(frame.error_code)?;
            o.field("rip").u64(frame.rip)?;
            o.field("rsp").u64(frame.rsp)?;
            o.field("cr2").u64(cr2)?;
            o.field("cpu").u64(u64::from(cpu))
        })
    });
    let regs = super::regs_from_frame(frame);
    super::crash(
        super::Reason::Exception {
            vector: frame.vector,
            name,
        },
        &regs,
    )
}
