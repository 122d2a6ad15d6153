//! The coordinator: the first CPU into the crash path shoots the others
//! down, waits for them (bounded), cleans up itself, accounts for every
//! VMCS and hands over to the capture kernel.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use crash::accounting::{self, VmcsFate};
use crash::cpuset::CpuSet;
use crash::shootdown::CpuRegisters;
use smp_boot::bringup::CpuState;

use super::hardware::{Hardware, TscClock};
use super::records::{LISTS, Records};
use super::svm;
use super::{COORDINATOR, Reason, TIMEOUT_US};
use crate::arch::cpu;
use crate::console::EmergencyConsole;
use crate::cpu::{ipi, percpu, smp, time};

static SUMMARY_PRINTED: AtomicBool = AtomicBool::new(false);

/// Runs the shootdown and the hand-over on CPU `me`. Never returns.
pub fn coordinate(me: usize, reason: Reason<'_>, regs: &CpuRegisters) -> ! {
    let apic_id = percpu::shared(me).slot.apic_id();
    let mut expected = CpuSet::new();
    for (index, cpu) in smp::cpus().iter().enumerate() {
        if index != me && cpu.slot.state() == CpuState::Online {
            let _ = expected.insert(index);
        }
    }
    let started = time::now_us();
    let started_tsc = cpu::rdtsc();
    ipi::send_nmi_to_online_others();
    let rendezvous = COORDINATOR.wait_for_rendezvous(
        &expected,
        &mut TscClock,
        TIMEOUT_US.load(Ordering::Relaxed),
    );
    let shootdown_us = time::now_us().saturating_sub(started);
    // Nothing printed before the other CPUs are stopped: each byte to the
    // UART is slow under an emulator.
    if let Reason::Panic(info) = reason {
        super::print_panic(info);
    }
    let _ = writeln!(
        EmergencyConsole,
        "\n*** hv: CRASH on CPU {me} (APIC ID {apic_id}): {reason}"
    );
    for straggler in &rendezvous.stragglers {
        let stuck = if rendezvous.stuck_in_handler.contains(straggler) {
            " (stuck inside the crash handler)"
        } else {
            " (never answered the NMI)"
        };
        let _ = writeln!(
            EmergencyConsole,
            "*** hv: CPU {straggler} (APIC ID {}) did not check in{stuck}",
            percpu::shared(straggler).slot.apic_id()
        );
    }
    let own = COORDINATOR.crash_this_cpu(me, regs, &LISTS, &mut Hardware);

    let mut vmxoff_cpus = 0;
    let mut svm_off_cpus = 0;
    let mut visited = 0;
    for cpu in &rendezvous.checked_in {
        if let Some(record) = COORDINATOR.record(cpu) {
            vmxoff_cpus += u64::from(record.ledger.vmx.is_off());
            visited += record.ledger.walk.map_or(0, |walk| u64::from(walk.visited));
        }
        svm_off_cpus += u64::from(svm::LEDGERS.exit(cpu).is_off());
    }
    let own_svm = svm::LEDGERS.exit(me);
    let on_svm = svm::backend_is_svm();
    let accounting = accounting::account(&Records, &rendezvous.stragglers);
    // The lists hold VMCSes or VMCBs, never both: the other kind counts 0.
    let (vmcs, vmcb) = if on_svm {
        (Contexts::default(), Contexts::of(&accounting, visited))
    } else {
        (Contexts::of(&accounting, visited), Contexts::default())
    };
    let nmi_in_guest = |cpu| super::nmi::crash_nmi_in_guest(cpu);
    let nmi_in_guest_cpus = (0..smp::cpus().len())
        .filter(|&cpu| nmi_in_guest(cpu) == Some(true))
        .count();
    name_uncleared(&rendezvous.stragglers, if on_svm { "VMCB" } else { "VMCS" });
    if !SUMMARY_PRINTED.swap(true, Ordering::AcqRel) {
        if on_svm {
            let _ = writeln!(
                EmergencyConsole,
                "*** hv: shootdown: {} of {} CPUs checked in in {shootdown_us} us; VMCB loaded {}, cleared {}; SVM off on {svm_off_cpus}; own: {own_svm}; NMI in guest mode on {nmi_in_guest_cpus}",
                rendezvous.checked_in.len(),
                expected.len(),
                accounting.loaded,
                accounting.cleared,
            );
        } else {
            let _ = writeln!(
                EmergencyConsole,
                "*** hv: shootdown: {} of {} CPUs checked in in {shootdown_us} us; VMCS loaded {}, cleared {}; VMXOFF on {vmxoff_cpus}; own VMX exit {:?}; NMI in guest mode on {nmi_in_guest_cpus}",
                rendezvous.checked_in.len(),
                expected.len(),
                accounting.loaded,
                accounting.cleared,
                own.vmx,
            );
        }
        crate::console::report::emergency(|o| {
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
                o.field("vmcs_loaded").u64(vmcs.loaded)?;
                o.field("vmcs_cleared").u64(vmcs.cleared)?;
                o.field("vmcs_visited").u64(vmcs.visited)?;
                o.field("vmcs_on_stragglers").u64(vmcs.on_stragglers)?;
                o.field("vmcb_loaded").u64(vmcb.loaded)?;
                o.field("vmcb_cleared").u64(vmcb.cleared)?;
                o.field("vmcb_visited").u64(vmcb.visited)?;
                o.field("vmcb_on_stragglers").u64(vmcb.on_stragglers)?;
                o.field("vmxoff_cpus").u64(vmxoff_cpus)?;
                o.field("coordinator_vmx_off").bool(own.vmx.is_off())?;
                o.field("svm_off_cpus").u64(svm_off_cpus)?;
                o.field("coordinator_svm_off").bool(own_svm.is_off())?;
                o.field("nmi_in_guest_cpus").u64(nmi_in_guest_cpus as u64)?;
                // Per CPU index: whether its crash NMI came as a guest's
                // exit (null: it took none).
                o.field("nmi_in_guest").array(|a| {
                    (0..smp::cpus().len()).try_for_each(|cpu| {
                        a.item()
                            .option(nmi_in_guest(cpu), |value, yes| value.bool(yes))
                    })
                })?;
                o.field("shootdown_us").u64(shootdown_us)?;
                // Raw TSC: a capture kernel's own clock has another
                // calibration, the TSC is the one clock both share.
                o.field("started_tsc").u64(started_tsc)?;
                o.field("timed_out").bool(rendezvous.timed_out)?;
                // Per CPU index: from the first NMI sent to that CPU taking
                // it (null: never took it), the per-CPU NMI latency.
                o.field("nmi_latency_us").array(|a| {
                    (0..smp::cpus().len()).try_for_each(|cpu| {
                        let latency =
                            super::nmi::nmi_at_us(cpu).map(|at| at.saturating_sub(started));
                        a.item().option(latency, |value, us| value.u64(us))
                    })
                })
            })
        });
    }
    super::handover::hand_over(&super::handover::Handover {
        coordinator: me,
        checked_in: &rendezvous.checked_in,
        stragglers: &rendezvous.stragglers,
        reason: &reason,
    });
    crate::console::finish::crash_stop()
}

/// What the accounting says of the contexts of one kind (VMCS or VMCB).
#[derive(Debug, Default, Clone, Copy)]
struct Contexts {
    loaded: u64,
    cleared: u64,
    visited: u64,
    on_stragglers: u64,
}

impl Contexts {
    fn of(accounting: &accounting::Accounting, visited: u64) -> Self {
        Self {
            loaded: accounting.loaded,
            cleared: accounting.cleared,
            visited,
            on_stragglers: accounting.on_stragglers,
        }
    }
}

/// Names on the emergency console every VMCS (or VMCB: `kind`) that
/// stayed uncleared though its CPU checked in, or that another CPU
/// cleared.
fn name_uncleared(stragglers: &CpuSet, kind: &str) {
    use crash::accounting::VmcsRecords;
    for record in 0..Records.count() {
        let fate = accounting::fate(&Records, record, stragglers);
        let (Some(fate @ (VmcsFate::Lost | VmcsFate::ClearedElsewhere { .. })), Some(on)) =
            (fate, Records.loaded_on(record))
        else {
            continue;
        };
        let _ = writeln!(
            EmergencyConsole,
            "*** hv: {kind} {:#x} (record {record}) loaded on CPU {on} by its record: {fate:?}",
            Records.vmcs(record),
        );
    }
}
