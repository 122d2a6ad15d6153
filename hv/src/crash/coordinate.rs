//! The coordinator: the first CPU into the crash path shoots the others
//! down, then says why, waits for them (bounded), cleans up itself,
//! accounts for every VMCS and hands over to the capture kernel. NMIs
//! first, words after: nothing is printed before the last NMI is out.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crash::accounting::{self, VmcsFate, VmcsRecords};
use crash::cpuset::CpuSet;
use crash::shootdown::{CpuRegisters, VmxExit};
use hv_core::cmdline::CoordinatorStep;
use smp_boot::bringup::CpuState;

use super::hardware::{Hardware, TscClock};
use super::records::{LISTS, Records};
use super::svm;
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
            " (never answered the NMI)"
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
        summarize(
            me,
            &reason,
            &expected,
            &rendezvous,
            own.vmx,
            shootdown_us,
            started,
            started_tsc,
            waiting_from_us,
        );
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

/// Prints the summary line and the `crash` report object.
#[allow(clippy::too_many_arguments)]
fn summarize(
    me: usize,
    reason: &Reason<'_>,
    expected: &CpuSet,
    rendezvous: &crash::shootdown::Rendezvous,
    own_vmx: VmxExit,
    shootdown_us: u64,
    started: u64,
    started_tsc: u64,
    waiting_from_us: u64,
) {
    let apic_id = percpu::shared(me).slot.apic_id();
    let mut vmxoff_cpus = 0;
    let mut vmxoff_executed = 0;
    let mut vmx_was_on = 0;
    let mut visited = 0;
    let mut svm_off_cpus = 0;
    let mut svm_was_on = 0;
    let reporting = rendezvous.checked_in.iter().chain(core::iter::once(me));
    for cpu in reporting {
        let svm_exit = svm::LEDGERS.exit(cpu);
        svm_was_on += u64::from(svm_exit.was_on());
        if cpu != me {
            svm_off_cpus += u64::from(svm_exit.is_off());
        }
        let Some(record) = COORDINATOR.record(cpu) else {
            continue;
        };
        let vmx = record.ledger.vmx;
        // `vmxoff_cpus` (the old field) counts CPUs out of VMX however
        // they got there, the coordinator aside; `vmxoff_executed` only
        // those that executed VMXOFF.
        if cpu != me {
            vmxoff_cpus += u64::from(vmx.is_off());
            visited += record.ledger.walk.map_or(0, |walk| u64::from(walk.visited));
        }
        // A VMXOFF that raised #UD found the CPU outside VMX operation.
        let executed = vmx == VmxExit::Left;
        vmxoff_executed += u64::from(executed);
        vmx_was_on += u64::from(executed || matches!(vmx, VmxExit::StillOn(_)));
    }
    let own_svm = svm::LEDGERS.exit(me);
    let on_svm = svm::backend_is_svm();
    let accounting = accounting::account(&Records, &rendezvous.stragglers);
    // The lists hold VMCSes or VMCBs, never both: the other kind counts 0.
    let (vmcs, vmcb) = if on_svm {
        (Accounted::none(), Accounted::of(accounting, visited))
    } else {
        (Accounted::of(accounting, visited), Accounted::none())
    };
    let nmi_in_guest = super::nmi::crash_nmi_in_guest;
    let nmi_in_guest_cpus = (0..smp::cpus().len())
        .filter(|&cpu| nmi_in_guest(cpu) == Some(true))
        .count();
    name_uncleared(&rendezvous.stragglers, if on_svm { "VMCB" } else { "VMCS" });
    if on_svm {
        let _ = writeln!(
            Words,
            "*** hv: shootdown: {} of {} CPUs checked in in {shootdown_us} us; VMCB loaded {}, cleared {}; SVM off on {svm_off_cpus} of {} others; own: {own_svm}; NMI in guest mode on {nmi_in_guest_cpus}",
            rendezvous.checked_in.len(),
            expected.len(),
            accounting.loaded,
            accounting.cleared,
            rendezvous.checked_in.len(),
        );
    } else {
        let vmx_words = if vmx_was_on == 0 {
            "no VMX ran"
        } else {
            "VMXOFF executed"
        };
        let _ = writeln!(
            Words,
            "*** hv: shootdown: {} of {} CPUs checked in in {shootdown_us} us; VMCS loaded {}, cleared {}; {vmx_words} on {vmxoff_executed} of {vmx_was_on} CPUs with VMX on; own VMX exit {:?}; NMI in guest mode on {nmi_in_guest_cpus}",
            rendezvous.checked_in.len(),
            expected.len(),
            accounting.loaded,
            accounting.cleared,
            own_vmx,
        );
    }
    let nmis_out = NMIS_OUT_TSC.load(Ordering::Acquire);
    let panic_to_nmis_us = time::tsc_to_us(nmis_out.saturating_sub(entered_tsc()));
    super::words::report(|o| {
        o.field("crash").object(|o| {
            o.field("cpu").u64(u64::from(apic_id))?;
            o.field("cpu_index").u64(me as u64)?;
            o.field("reason").display(reason)?;
            o.field("expected").u64(expected.len() as u64)?;
            o.field("checked_in")
                .u64(rendezvous.checked_in.len() as u64)?;
            o.field("stragglers").u64_array(
                rendezvous
                    .stragglers
                    .iter()
                    .map(|cpu| u64::from(percpu::shared(cpu).slot.apic_id())),
            )?;
            o.field("backend").str(svm::backend_name())?;
            o.field("vmcs_loaded").u64(vmcs.accounting.loaded)?;
            o.field("vmcs_cleared").u64(vmcs.accounting.cleared)?;
            o.field("vmcs_visited").u64(vmcs.visited)?;
            o.field("vmcs_on_stragglers")
                .u64(vmcs.accounting.on_stragglers)?;
            o.field("vmcs_cleared_elsewhere")
                .u64(vmcs.accounting.cleared_elsewhere)?;
            o.field("vmcs_lost").u64(vmcs.accounting.lost)?;
            o.field("vmcb_loaded").u64(vmcb.accounting.loaded)?;
            o.field("vmcb_cleared").u64(vmcb.accounting.cleared)?;
            o.field("vmcb_visited").u64(vmcb.visited)?;
            o.field("vmcb_on_stragglers")
                .u64(vmcb.accounting.on_stragglers)?;
            o.field("vmcb_cleared_elsewhere")
                .u64(vmcb.accounting.cleared_elsewhere)?;
            o.field("vmcb_lost").u64(vmcb.accounting.lost)?;
            o.field("svm_off_cpus").u64(svm_off_cpus)?;
            o.field("svm_was_on_cpus").u64(svm_was_on)?;
            o.field("coordinator_svm_off").bool(own_svm.is_off())?;
            o.field("nmi_in_guest_cpus").u64(nmi_in_guest_cpus as u64)?;
            // Per CPU index: whether its crash NMI came as a guest's VM
            // exit (null: it took none).
            o.field("nmi_in_guest").array(|a| {
                (0..smp::cpus().len()).try_for_each(|cpu| {
                    a.item()
                        .option(nmi_in_guest(cpu), |value, yes| value.bool(yes))
                })
            })?;
            o.field("vmxoff_cpus").u64(vmxoff_cpus)?;
            o.field("vmxoff_executed").u64(vmxoff_executed)?;
            o.field("vmx_was_on_cpus").u64(vmx_was_on)?;
            o.field("coordinator_vmx_off").bool(own_vmx.is_off())?;
            o.field("coordinator_vmx_exit")
                .str(vmx_exit_name(own_vmx))?;
            // Per CPU index: the VMCSes (on SVM, VMCBs) its records say it
            // held at the crash, and the crash VMCLEARs (SVM clears) it
            // executed itself; the other kind's lists are all zeros.
            let cpus = smp::cpus().len();
            let loaded_on = |cpu| {
                (0..Records.count())
                    .filter(|&record| Records.loaded_on(record) == Some(cpu))
                    .count() as u64
            };
            let credits = |cpu| {
                (0..Records.count())
                    .filter(|&record| Records.cleared_by(record) == Some(cpu))
                    .count() as u64
            };
            let kind = |svm_kind: bool, count: &dyn Fn(usize) -> u64, cpu| {
                if on_svm == svm_kind { count(cpu) } else { 0 }
            };
            o.field("vmcs_loaded_per_cpu")
                .u64_array((0..cpus).map(|cpu| kind(false, &loaded_on, cpu)))?;
            o.field("vmclear_credits")
                .u64_array((0..cpus).map(|cpu| kind(false, &credits, cpu)))?;
            o.field("vmcb_loaded_per_cpu")
                .u64_array((0..cpus).map(|cpu| kind(true, &loaded_on, cpu)))?;
            o.field("vmcb_clear_credits")
                .u64_array((0..cpus).map(|cpu| kind(true, &credits, cpu)))?;
            o.field("shootdown_us").u64(shootdown_us)?;
            o.field("panic_to_nmis_us").u64(panic_to_nmis_us)?;
            o.field("nmi_broadcast")
                .bool(NMI_BROADCAST.load(Ordering::Relaxed))?;
            // Held in the mailbox for the capture image to print, or
            // printed before the hand-over.
            o.field("words").str(if super::words::deferred() {
                "mailbox"
            } else {
                "console"
            })?;
            // Raw TSC: a capture kernel's own clock has another
            // calibration, the TSC is the one clock both share.
            o.field("started_tsc").u64(started_tsc)?;
            o.field("entered_tsc").u64(entered_tsc())?;
            o.field("nmis_sending_tsc")
                .u64(NMIS_SENDING_TSC.load(Ordering::Relaxed))?;
            o.field("nmis_out_tsc").u64(nmis_out)?;
            o.field("timed_out").bool(rendezvous.timed_out)?;
            o.field("not_online").array(|a| {
                (0..cpus).try_for_each(|cpu| {
                    let Some(action) = not_online_action(cpu) else {
                        return Ok(());
                    };
                    let shared = percpu::shared(cpu);
                    a.item().object(|o| {
                        o.field("apic_id").u64(u64::from(shared.slot.apic_id()))?;
                        o.field("state").str(match shared.slot.state() {
                            CpuState::Starting => "starting",
                            _ => "failed",
                        })?;
                        o.field("action").str(match action {
                            NotOnline::Nmi => "nmi",
                            NotOnline::Init => "init",
                        })
                    })
                })
            })?;
            o.field("coordinator_stray_nmis")
                .u64(u64::from(super::nmi::stray_on_coordinator()))?;
            o.field("nested_nmis")
                .u64(u64::from(super::nmi::nested()))?;
            o.field("lockup_cpus").u64_array(
                watchdog::silent_cpus(time::now_us())
                    .filter(|_| matches!(reason, Reason::Lockup { .. }))
                    .map(|cpu| u64::from(percpu::shared(cpu).slot.apic_id())),
            )?;
            // Per CPU index: from the first NMI sent to that CPU taking
            // it (null: never took it), the per-CPU NMI latency.
            o.field("nmi_latency_us").array(|a| {
                (0..cpus).try_for_each(|cpu| {
                    let latency = super::nmi::nmi_at_us(cpu).map(|at| at.saturating_sub(started));
                    a.item().option(latency, |value, us| value.u64(us))
                })
            })?;
            // Per CPU index: from the first NMI sent to the rendezvous
            // seeing that CPU checked in (null: never seen).
            o.field("checkin_us").array(|a| {
                (0..cpus).try_for_each(|cpu| {
                    let seen = COORDINATOR
                        .record(cpu)
                        .and_then(|record| record.observed_after_us)
                        .map(|us| waiting_from_us.saturating_add(us));
                    a.item().option(seen, |value, us| value.u64(us))
                })
            })
        })
    });
}

fn vmx_exit_name(exit: VmxExit) -> &'static str {
    match exit {
        VmxExit::NotAttempted => "not_attempted",
        VmxExit::Left => "vmxoff",
        VmxExit::LeftAfterInvalidOpcode => "vmxoff_after_ud",
        VmxExit::WasOff => "was_off",
        VmxExit::StillOn(_) => "still_on",
    }
}

/// What the accounting says of the contexts of one kind (VMCS or VMCB).
#[derive(Debug, Clone, Copy)]
struct Accounted {
    accounting: accounting::Accounting,
    visited: u64,
}

impl Accounted {
    fn of(accounting: accounting::Accounting, visited: u64) -> Self {
        Self {
            accounting,
            visited,
        }
    }

    /// Nothing of this kind: the lists held the other.
    fn none() -> Self {
        Self::of(accounting::Accounting::default(), 0)
    }
}

/// Names on the emergency console every VMCS (on SVM, VMCB: `kind`) that
/// stayed uncleared though its CPU checked in, or that another CPU
/// cleared.
fn name_uncleared(stragglers: &CpuSet, kind: &str) {
    for record in 0..Records.count() {
        let fate = accounting::fate(&Records, record, stragglers);
        let (Some(fate @ (VmcsFate::Lost | VmcsFate::ClearedElsewhere { .. })), Some(on)) =
            (fate, Records.loaded_on(record))
        else {
            continue;
        };
        let _ = writeln!(
            Words,
            "*** hv: {kind} {:#x} (record {record}) loaded on CPU {on} by its record: {fate:?}",
            Records.vmcs(record),
        );
    }
}
