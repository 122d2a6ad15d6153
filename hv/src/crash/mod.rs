//! The crash path, all of it: every panic, fatal exception, allowed crash
//! hypercall, lockup, external NMI, injected test crash and shootdown NMI
//! ends here.
//!
//! A reader starting from a panic follows it in this folder:
//!
//! 1. [`crash()`] (from the panic handler, [`exception`], the crash
//!    hypercall, the lockup detector, [`nmi`] for an NMI from outside, or
//!    [`inject`]): the first CPU in wins the election in [`COORDINATOR`]
//!    and runs [`coordinate`]; any other CPU answers as a responder. It
//!    prints nothing: words wait until the NMIs are out.
//! 2. [`coordinate`]: sends an NMI to every other CPU (and INIT to CPUs
//!    that never got an IDT), then says why, waits (bounded) for all of
//!    them to check in, names the stragglers, cleans up itself, checks the
//!    lists against the records ([`records`], `crash::accounting`) and
//!    prints the summary. A panic or fault inside its own work comes back
//!    here as a re-entry, which goes straight on to the hand-over.
//! 3. [`nmi`]: every other CPU, in its NMI handler, moves to its crash
//!    stack (off the NMI stack a nested NMI would overwrite), VMCLEARs
//!    every VMCS on its list (walked forward only), leaves VMX
//!    ([`hardware`], with fix-ups for the #UD of a CPU already out of
//!    VMX), disables its local APIC, checks in and parks in `cli; hlt`
//!    (never MWAIT: a capture kernel overwriting a monitored line would
//!    wake it). An NMI on the coordinator, or on a CPU already answering,
//!    returns at once.
//! 4. [`handover`]: the coordinator writes the ELF core header with every
//!    CPU's registers and the VMCLEAR ledger, checks the capture kernel's
//!    digests and jumps through the [`purgatory`]; a second attempt after
//!    a re-entry writes a smaller header; the jump is entered or refused
//!    with a reason on the emergency console.
//!
//! Nothing here takes a lock or allocates, and nothing trusts state an NMI
//! may have interrupted: the coordinator word arms the NMI handler (it was
//! installed at boot), the lists are walked forward only, output goes to
//! the lock-free emergency console, and the crash-time buffers were made
//! at boot.

use core::fmt::Write;
use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use crash::shootdown::{CpuRegisters, CrashCoordinator, Role};
use smp_boot::madt::MAX_CPUS;

use crate::arch::cpu;
use crate::arch::idt::TrapFrame;
use crate::cpu::percpu;

pub mod coordinate;
pub mod exception;
pub mod facts;
pub mod handover;
pub mod hardware;
pub mod inject;
pub mod nmi;
pub mod purgatory;
pub mod records;
pub mod svm;
pub mod words;

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

/// The TSC when the first CPU entered the crash path (0: no crash yet).
static ENTERED_TSC: AtomicU64 = AtomicU64::new(0);

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
        /// The error code (0 where the CPU pushes none).
        error_code: u64,
        /// CR2 at the fault.
        cr2: u64,
    },
    /// A guest made the crash hypercall (allowed by the command line).
    Hypercall {
        /// The vCPU.
        vcpu: usize,
    },
    /// An NMI nobody sent: the platform's NMI button, a BMC, a watchdog
    /// outside the hypervisor (`nmi=dump`).
    ExternalNmi,
    /// The lockup detector found a CPU silent too long.
    Lockup {
        /// The first stuck CPU found (index).
        cpu: usize,
        /// How long it had been silent, in milliseconds.
        silent_ms: u64,
    },
}

impl core::fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Reason::Panic(info) => write!(f, "panic: {}", info.message()),
            Reason::Exception { vector, name, .. } => {
                write!(f, "fatal exception {name} (vector {vector})")
            }
            Reason::Hypercall { vcpu } => write!(f, "crash hypercall from vCPU {vcpu}"),
            Reason::ExternalNmi => f.write_str("external NMI"),
            Reason::Lockup { cpu, silent_ms } => write!(
                f,
                "lockup: CPU {cpu} (APIC ID {}) has not ticked for {silent_ms} ms",
                percpu::shared(*cpu).slot.apic_id()
            ),
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

/// Marks the crash's start (the first CPU's entry), for the report's
/// `panic_to_nmis_us`.
fn note_entry() {
    let _ = ENTERED_TSC.compare_exchange(0, cpu::rdtsc(), Ordering::AcqRel, Ordering::Acquire);
}

/// The TSC when the crash began.
pub fn entered_tsc() -> u64 {
    ENTERED_TSC.load(Ordering::Acquire)
}

/// The coordinator's steps, stamped with the TSC for the report (and
/// `cargo xtask bench crash`).
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// Every CPU checked in, or the wait gave up.
    Rendezvous,
    /// Its own cleanup is done.
    Cleanup,
    /// The summary is printed.
    Summary,
    /// The core header is written.
    CoreHeader,
    /// The digests are checked.
    Digests,
    /// The digest check began (during the rendezvous: it needs nothing
    /// from the other CPUs).
    DigestsStart,
}

static STEPS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Stamps `step` with the TSC now.
pub fn stamp(step: Step) {
    STEPS[step as usize].store(cpu::rdtsc(), Ordering::Relaxed);
}

/// When `step` was reached (0: not yet).
pub fn stamped(step: Step) -> u64 {
    STEPS[step as usize].load(Ordering::Relaxed)
}

/// The panic handler's way in. Prints nothing: the coordinator prints the
/// panic once its NMIs are out.
pub fn on_panic(info: &core::panic::PanicInfo<'_>) -> ! {
    note_entry();
    let regs = cpu::current_regs();
    crash(Reason::Panic(info), &regs)
}

/// What a responder's reason says, kept for the coordinator to print once
/// the NMIs are out (a responder prints nothing itself).
struct ReasonText {
    bytes: [AtomicU8; REASON_TEXT_BYTES],
    len: AtomicU32,
}

const REASON_TEXT_BYTES: usize = 112;

static REASON_TEXTS: [ReasonText; MAX_CPUS] = [const {
    ReasonText {
        bytes: [const { AtomicU8::new(0) }; REASON_TEXT_BYTES],
        len: AtomicU32::new(0),
    }
}; MAX_CPUS];

/// `core::fmt::Write` into CPU `cpu`'s reason text, cutting what does not
/// fit.
struct ReasonWriter {
    cpu: usize,
    len: usize,
}

impl Write for ReasonWriter {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let slot = &REASON_TEXTS[self.cpu];
        for &byte in text.as_bytes() {
            if self.len == REASON_TEXT_BYTES {
                break;
            }
            slot.bytes[self.len].store(byte, Ordering::Relaxed);
            self.len += 1;
        }
        slot.len.store(self.len as u32, Ordering::Release);
        Ok(())
    }
}

fn keep_reason(cpu: usize, reason: &Reason<'_>) {
    let mut writer = ReasonWriter { cpu, len: 0 };
    let _ = write!(writer, "{reason}");
}

/// CPU `cpu`'s kept reason, if it crashed on its own, into `out`.
pub fn kept_reason(cpu: usize, out: &mut [u8; REASON_TEXT_BYTES]) -> Option<&str> {
    let slot = REASON_TEXTS.get(cpu)?;
    let len = (slot.len.load(Ordering::Acquire) as usize).min(REASON_TEXT_BYTES);
    if len == 0 {
        return None;
    }
    for (byte, source) in out.iter_mut().zip(&slot.bytes[..len]) {
        *byte = source.load(Ordering::Relaxed);
    }
    Some(core::str::from_utf8(&out[..len]).unwrap_or("(not UTF-8)"))
}

/// Enters the crash path. Never returns.
pub fn crash(reason: Reason<'_>, regs: &CpuRegisters) -> ! {
    cpu::disable_interrupts();
    note_entry();
    let me = percpu::current_cpu_index() as usize;
    match COORDINATOR.enter(me) {
        Role::Coordinator => coordinate::coordinate(me, reason, regs),
        Role::Responder { .. } => {
            keep_reason(me, &reason);
            COORDINATOR.crash_this_cpu(me, regs, &LISTS, &mut Hardware);
            inject::nmi_source_duty(me);
            park()
        }
        Role::ReEntered { coordinator } if coordinator == me => {
            coordinate::resume_after_reentry(me, reason, regs)
        }
        Role::ReEntered { .. } => {
            keep_reason(me, &reason);
            COORDINATOR.crash_this_cpu(me, regs, &LISTS, &mut Hardware);
            park()
        }
    }
}

/// What an NMI-context entry carries over to the crash stack.
#[derive(Debug, Clone, Copy)]
struct StackEntry {
    regs: CpuRegisters,
    kind: NmiEntry,
}

/// Why an NMI enters the crash path.
#[derive(Debug, Clone, Copy)]
enum NmiEntry {
    /// The shootdown's NMI: answer it.
    Shootdown,
    /// An NMI nobody sent: crash with [`Reason::ExternalNmi`].
    External,
}

/// Continues an NMI-context entry on this CPU's crash stack (the NMI
/// stack stays behind: a nested NMI may overwrite it, this path never
/// returns to it).
fn enter_on_crash_stack(me: usize, entry: StackEntry) -> ! {
    let top = percpu::shared(me).crash_stack.load(Ordering::Relaxed);
    if top == 0 {
        from_nmi(&entry);
    }
    crate::mm::phys::run_on_crash_stack(top, &entry, from_nmi)
}

fn from_nmi(entry: &StackEntry) -> ! {
    let me = percpu::current_cpu_index() as usize;
    match entry.kind {
        NmiEntry::External => crash(Reason::ExternalNmi, &entry.regs),
        NmiEntry::Shootdown => {
            COORDINATOR.enter(me);
            COORDINATOR.crash_this_cpu(me, &entry.regs, &LISTS, &mut Hardware);
            inject::nmi_source_duty(me);
            park()
        }
    }
}

/// The lockup detector's handler (registered with `cpu::watchdog`): the
/// CPU that noticed starts the crash; the stuck CPUs' registers come from
/// the shootdown's NMI, at their hang site.
pub fn on_lockup(stuck: usize, silent_us: u64, frame: &TrapFrame) {
    if COORDINATOR.coordinator().is_some() {
        return;
    }
    let regs = regs_from_frame(frame);
    crash(
        Reason::Lockup {
            cpu: stuck,
            silent_ms: silent_us / 1000,
        },
        &regs,
    )
}

/// An AP's last step before it checks in (registered with bring-up): a
/// crash already under way collects it here instead; otherwise the
/// `point:bringup` knob may fire.
pub fn ap_checkpoint(index: usize) {
    if COORDINATOR.coordinator().is_some() {
        let regs = cpu::current_regs();
        COORDINATOR.enter(index);
        COORDINATOR.crash_this_cpu(index, &regs, &LISTS, &mut Hardware);
        park();
    }
    inject::at_bringup(index);
}
