//! The crash path, all of it: every panic, fatal exception, allowed crash
//! hypercall, injected test crash and shootdown NMI ends here.
//!
//! A reader starting from a panic follows it in this folder:
//!
//! 1. [`crash`] (from the panic handler, [`exception`], the crash
//!    hypercall or [`inject`]): the first CPU in wins the election in
//!    [`COORDINATOR`] and runs [`coordinate`]; any other CPU answers as a
//!    responder.
//! 2. [`coordinate`]: sends an NMI to every other CPU, waits (bounded) for
//!    all of them to check in, names the stragglers, cleans up itself,
//!    checks the lists against the records ([`records`], `crash::accounting`)
//!    and prints the summary.
//! 3. [`nmi`]: every other CPU, in its NMI handler, VMCLEARs every VMCS on
//!    its list (walked forward only), leaves VMX ([`hardware`], with
//!    fix-ups for the #UD of a CPU already out of VMX), disables its local
//!    APIC, checks in and parks in `cli; hlt` (never MWAIT: a capture
//!    kernel overwriting a monitored line would wake it).
//! 4. [`handover`]: the coordinator writes the ELF core header with every
//!    CPU's registers and the VMCLEAR ledger, checks the capture kernel's
//!    digests and jumps through the [`purgatory`].
//!
//! Nothing here takes a lock or allocates, and nothing trusts state an NMI
//! may have interrupted: the coordinator word arms the NMI handler (it was
//! installed at boot), the lists are walked forward only, output goes to
//! the lock-free emergency console, and the crash-time buffers were made
//! at boot and are taken once.

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use crash::shootdown::{CpuRegisters, CrashCoordinator, Role};
use smp_boot::madt::MAX_CPUS;

use crate::arch::cpu;
use crate::arch::idt::TrapFrame;
use crate::console::EmergencyConsole;
use crate::cpu::percpu;

pub mod coordinate;
pub mod exception;
pub mod handover;
pub mod hardware;
pub mod inject;
pub mod nmi;
pub mod purgatory;
pub mod records;
pub mod svm;

use hardware::Hardware;
use records::LISTS;

const _: () = assert!(
    crash::cpuset::MAX_CPUS == MAX_CPUS,
    "crash sets must cover every possible CPU"
);

/// The election, the per-CPU crash records and the rendezvous.
pub static COORDINATOR: CrashCoordinator<MAX_CPUS> = CrashCoordinator::new();

/// Rendezvous timeout (`crash_timeout_ms=`).
static TIMEOUT_US: AtomicU64 = AtomicU64::new(1_000_000);

/// Why the machine crashed.
#[derive(Debug, Clone, Copy)]
pub enum Reason<'a> {
    /// A Rust panic, with its message.
    Panic(&'a core::panic::PanicInfo<'a>),
    /// A fatal exception in the hypervisor.
    Exception {
        /// The vector.
        vector: u64,
        /// Its name.
        name: &'static str,
    },
    /// A guest made the crash hypercall (allowed by the command line).
    Hypercall {
        /// The vCPU.
        vcpu: usize,
    },
}

impl core::fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Reason::Panic(info) => write!(f, "panic: {}", info.message()),
            Reason::Exception { vector, name } => {
                write!(f, "fatal exception {name} (vector {vector})")
            }
            Reason::Hypercall { vcpu } => write!(f, "crash hypercall from vCPU {vcpu}"),
        }
    }
}

/// Sets the rendezvous timeout.
pub fn set_timeout_ms(ms: u64) {
    TIMEOUT_US.store(ms.saturating_mul(1000), Ordering::Relaxed);
}

/// The registers of an interrupted context, for its `NT_PRSTATUS`.
pub fn regs_from_frame(frame: &TrapFrame) -> CpuRegisters {
    CpuRegisters {
        r15: frame.r15,
        r14: frame.r14,
        r13: frame.r13,
        r12: frame.r12,
        rbp: frame.rbp,
        rbx: frame.rbx,
        r11: frame.r11,
        r10: frame.r10,
        r9: frame.r9,
        r8: frame.r8,
        rax: frame.rax,
        rcx: frame.rcx,
        rdx: frame.rdx,
        rsi: frame.rsi,
        rdi: frame.rdi,
        orig_rax: u64::MAX,
        rip: frame.rip,
        cs: frame.cs,
        eflags: frame.rflags,
        rsp: frame.rsp,
        ss: frame.ss,
        ..CpuRegisters::default()
    }
}

/// Parks this CPU for good: `cli; hlt`, woken only by NMIs, which find the
/// crash already handled and come back here.
fn park() -> ! {
    cpu::halt_forever()
}

/// The panic handler's way in: prints the panic and enters the crash path.
pub fn on_panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let regs = cpu::current_regs();
    crate::console::enter_emergency();
    // The panic is printed by whoever handles it ([`crash`]): the
    // coordinator only once its NMIs are out (each byte to the UART is
    // slow under an emulator, and the other CPUs must be stopped first).
    crash(Reason::Panic(info), &regs)
}

/// Prints a panic and its report line (on the emergency console).
fn print_panic(info: &core::panic::PanicInfo<'_>) {
    let cpu = percpu::current_cpu_index();
    let _ = writeln!(EmergencyConsole, "\n*** hv: panic on cpu {cpu}: {info}");
    crate::console::report::emergency(|o| {
        o.field("panic").object(|o| {
            o.field("message").display(info.message())?;
            o.field("cpu").u64(u64::from(cpu))
        })
    });
}

/// Enters the crash path. Never returns.
pub fn crash(reason: Reason<'_>, regs: &CpuRegisters) -> ! {
    cpu::disable_interrupts();
    let me = percpu::current_cpu_index() as usize;
    match COORDINATOR.enter(me) {
        Role::Coordinator => coordinate::coordinate(me, reason, regs),
        Role::Responder { coordinator } => {
            if let Reason::Panic(info) = reason {
                print_panic(info);
            }
            let _ = writeln!(
                EmergencyConsole,
                "\n*** hv: CPU {me} crashed too ({reason}) while CPU {coordinator} coordinates"
            );
            COORDINATOR.crash_this_cpu(me, regs, &LISTS, &mut Hardware);
            park()
        }
        Role::ReEntered { .. } => {
            if let Reason::Panic(info) = reason {
                print_panic(info);
            }
            let _ = writeln!(
                EmergencyConsole,
                "\n*** hv: CPU {me} crashed again inside the crash path ({reason})"
            );
            COORDINATOR.crash_this_cpu(me, regs, &LISTS, &mut Hardware);
            park()
        }
    }
}
