//! The coordinator: the first CPU into the crash path shoots the others
//! down, then says why, waits for them (bounded), cleans up itself,
//! accounts for every VMCS and hands over to the capture kernel. NMIs
//! first, words after: nothing is printed before the last NMI is out.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crash::cpuset::CpuSet;
use crash::shootdown::CpuRegisters;
use crash::summary::Scalars;
use hv_core::cmdline::CoordinatorStep;
use smp_boot::bringup::CpuState;

use super::hardware::{Hardware, TscClock};
use super::records::LISTS;
use super::words::Words;
use super::{COORDINATOR, Reason, TIMEOUT_US, entered_tsc, inject};
use crate::arch::{apic, cpu};
use crate::console::EmergencyConsole;
use crate::cpu::{percpu, smp, time, watchdog};

static NMIS_SENT: AtomicBool = AtomicBool::new(false);
static NMIS_OUT_TSC: AtomicU64 = AtomicU64::new(0);
static SUMMARY_PRINTED: AtomicBool = AtomicBool::new(false);
/// The TSC just before the first NMI's ICR write.
static NMIS_SENDING_TSC: AtomicU64 = AtomicU64::new(0);
/// The NMIs went out as one all-but-self IPI.
static NMI_BROADCAST: AtomicBool = AtomicBool::new(false);

/// What the shootdown did to a CPU that was not online when the crash
/// came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotOnline {
    /// Its IDT was live: it got the NMI like the others.
    Nmi,
    /// No IDT yet (still in the trampoline, or failed): INIT put it back
    /// to waiting for a SIPI.
    Init,
}

fn not_online_action(index: usize) -> Option<NotOnline> {
    let shared = percpu::shared(index);
    match shared.slot.state() {
        CpuState::Starting | CpuState::Failed => Some(if shared.idt_live.load(Ordering::Acquire) {
            NotOnline::Nmi
        } else {
            NotOnline::Init
        }),
        CpuState::Online | CpuState::Offline => None,
    }
}

/// Sends the NMIs (once): to every other online CPU, and to every CPU that
/// was started but never came online, if its IDT is live; INIT to the
/// others. When every present CPU is online, one all-but-self NMI does it
/// (one ICR write instead of one per CPU: under QEMU each costs about
/// 100 us). Returns the CPUs expected to check in.
fn shoot_down(me: usize) -> CpuSet {
    let mut expected = CpuSet::new();
    let first = !NMIS_SENT.swap(true, Ordering::AcqRel);
    let broadcast = first && smp::every_present_cpu_online();
    if first {
        NMIS_SENDING_TSC.store(cpu::rdtsc(), Ordering::Relaxed);
    }
    if broadcast {
        apic::send_nmi_all_but_self();
    }
    for (index, shared) in smp::cpus().iter().enumerate() {
        if index == me {
            continue;
        }
        let nmi = match shared.slot.state() {
            CpuState::Online => true,
            _ => match not_online_action(index) {
                Some(NotOnline::Nmi) => true,
                Some(NotOnline::Init) => {
                    if first {
                        apic::send_init(shared.slot.apic_id());
                    }
                    false
                }
                None => false,
            },
        };
        if nmi {
            let _ = expected.insert(index);
            if first && !broadcast {
                apic::send_nmi(shared.slot.apic_id());
            }
        }
    }
    if first {
        NMIS_OUT_TSC.store(cpu::rdtsc(), Ordering::Release);
        NMI_BROADCAST.store(broadcast, Ordering::Relaxed);
    }
    expected
}

/// Says why, now that the NMIs are out: the panic, the exception with its
/// registers, the lockup.
fn say_why(me: usize, reason: &Reason<'_>, regs: &CpuRegisters) {
    let apic_id = percpu::shared(me).slot.apic_id();
    let mut out = EmergencyConsole;
    match reason {
        Reason::Panic(info) => {
            let _ = writeln!(out, "\n*** hv: panic on cpu {me}: {info}");
            super::words::report(|o| {
                o.field("panic").object(|o| {
                    o.field("message").display(info.message())?;
                    o.field("cpu").u64(me as u64)
                })
            });
        }
        Reason::Exception {
            vector,
            name,
            error_code,
            cr2,
        } => super::exception::print(me, *vector, name, *error_code, *cr2, regs),
        Reason::Lockup { .. } => {
            let now = time::now_us();
            for stuck in watchdog::silent_cpus(now) {
                let silent = watchdog::silent_us(stuck, now).unwrap_or(0);
                let _ = writeln!(
                    out,
                    "\n*** hv: lockup: CPU {stuck} (APIC ID {}) has not ticked for {} ms",
                    percpu::shared(stuck).slot.apic_id(),
                    silent / 1000
                );
            }
        }
        Reason::Hypercall { .. } | Reason::ExternalNmi => {}
    }
    let _ = writeln!(
        out,
        "\n*** hv: CRASH on CPU {me} (APIC ID {apic_id}): {reason}"
    );
}

/// Runs the shootdown and the hand-over on CPU `me`. Never returns.
pub fn coordinate(me: usize, reason: Reason<'_>, regs: &CpuRegisters) -> ! {
    let started = time::now_us();
    let started_tsc = cpu::rdtsc();
    let expected = shoot_down(me);
    inject::nmi_source_release();
    // Words only now: silence the log ring so the crash lines come out
    // whole.
    crate::console::enter_emergency();
    say_why(me, &reason, regs);
    // While the others answer: the check needs nothing from them.
    super::handover::check_digests_early();
    // When the wait begins, after the first NMI: `checkin_us` counts from
    // the first NMI, the rendezvous from here.
    let waiting_from_us = time::now_us().saturating_sub(started);
    let rendezvous = COORDINATOR.wait_for_rendezvous(
        &expected,
        &mut TscClock,
        TIMEOUT_US.load(Ordering::Relaxed),
    );
    let shootdown_us = time::now_us().saturating_sub(started);
    super::stamp(super::Step::Rendezvous);
    for straggler in &rendezvous.stragglers {
        let stuck = if rendezvous.stuck_in_handler.contains(straggler) {
            " (stuck inside the crash handler)"
        } else {
            " (had not taken the NMI when the wait ended)"
        };
        let _ = writeln!(
            Words,
            "*** hv: CPU {straggler} (APIC ID {}) did not check in{stuck}",
            percpu::shared(straggler).slot.apic_id()
        );
    }
    let mut text = [0u8; 112];
    for cpu in &rendezvous.checked_in {
        if let Some(why) = super::kept_reason(cpu, &mut text) {
            let _ = writeln!(
                Words,
                "*** hv: CPU {cpu} crashed too ({why}) while CPU {me} coordinated"
            );
        }
    }
    let own = COORDINATOR.crash_this_cpu(me, regs, &LISTS, &mut Hardware);
    super::stamp(super::Step::Cleanup);
    inject::coordinator_step(CoordinatorStep::AfterCleanup);
    if !SUMMARY_PRINTED.swap(true, Ordering::AcqRel) {
        // With an hv capture image that prints it (and hv's own digest
        // check on, so that the purgatory does not refuse what hv passed),
        // the summary is formatted after the jump; else now.
        let deferred = super::words::defer_summary();
        let nmis_out = NMIS_OUT_TSC.load(Ordering::Acquire);
        super::facts::gather(&super::facts::Gathered {
            me,
            reason: &reason,
            expected: &expected,
            rendezvous: &rendezvous,
            own_vmx: own.vmx,
            scalars: Scalars {
                nmi_broadcast: NMI_BROADCAST.load(Ordering::Relaxed),
                words_in_mailbox: super::words::deferred(),
                shootdown_us,
                started_us: started,
                started_tsc,
                waiting_from_us,
                entered_tsc: entered_tsc(),
                nmis_sending_tsc: NMIS_SENDING_TSC.load(Ordering::Relaxed),
                nmis_out_tsc: nmis_out,
                panic_to_nmis_us: time::tsc_to_us(nmis_out.saturating_sub(entered_tsc())),
                text_at: super::words::used() as u64,
                deferred,
                ..Scalars::default()
            },
        });
        if !deferred {
            super::facts::write_summary(&mut Words);
        }
    }
    super::stamp(super::Step::Summary);
    super::handover::hand_over(&super::handover::Handover {
        coordinator: me,
        checked_in: &rendezvous.checked_in,
        stragglers: &rendezvous.stragglers,
        reason: &reason,
    });
    // No capture kernel took the words.
    super::words::flush();
    crate::console::finish::crash_stop()
}

/// The coordinator crashed again inside its own work (a panic or a fault
/// in the summary or the hand-over): the NMIs are out or go out now, and
/// it goes straight on to the hand-over with what the check-ins say.
pub fn resume_after_reentry(me: usize, reason: Reason<'_>, regs: &CpuRegisters) -> ! {
    let expected = shoot_down(me);
    crate::console::enter_emergency();
    let _ = writeln!(
        EmergencyConsole,
        "\n*** hv: CPU {me} crashed again inside the crash path ({reason}); going on to the hand-over"
    );
    let mut checked_in = CpuSet::new();
    let mut stragglers = CpuSet::new();
    for cpu in &expected {
        let done = COORDINATOR
            .status(cpu)
            .is_some_and(|status| status.checked_in());
        let _ = if done {
            checked_in.insert(cpu)
        } else {
            stragglers.insert(cpu)
        };
    }
    // Resumes where its own cleanup stopped, if it did.
    COORDINATOR.crash_this_cpu(me, regs, &LISTS, &mut Hardware);
    super::handover::hand_over(&super::handover::Handover {
        coordinator: me,
        checked_in: &checked_in,
        stragglers: &stragglers,
        reason: &reason,
    });
    super::words::flush();
    crate::console::finish::crash_stop()
}
