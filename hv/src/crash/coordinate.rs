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
use super::{COORDINATOR, Reason, TIMEOUT_US};
use crate::arch::cpu;
use crate::console::EmergencyConsole;
use crate::cpu::{ipi, percpu, smp, time};

static SUMMARY_PRINTED: AtomicBool = AtomicBool::new(false);

/// Runs the shootdown and the hand-over on CPU `me`. Never returns.
pub fn coordinate(me: usize, reason: Reason<'_>, regs: &CpuRegisters) -> ! {
    let apic_id = percpu::shared(me).slot.apic_id();
    let _ = writeln!(
        EmergencyConsole,
        "\n*** hv: CRASH on CPU {me} (APIC ID {apic_id}): {reason}"
    );
    let mut expected = CpuSet::new();
    for (index, cpu) in smp::cpus().iter().enumerate() {
        if index != me && cpu.slot.state() == CpuState::Online {
            let _ = expected.insert(index);
        }
    }
    let started = time::now_us();
    let started_tsc = cpu::rdtsc();
    ipi::send_nmi_to_online_others();
    let waiting_from_us = time::now_us().saturating_sub(started);
    let rendezvous = COORDINATOR.wait_for_rendezvous(
        &expected,
        &mut TscClock,
        TIMEOUT_US.load(Ordering::Relaxed),
    );
    let shootdown_us = time::now_us().saturating_sub(started);
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
    let mut vmcs_visited = 0;
    for cpu in &rendezvous.checked_in {
        if let Some(record) = COORDINATOR.record(cpu) {
            vmxoff_cpus += u64::from(record.ledger.vmx.is_off());
            vmcs_visited += record.ledger.walk.map_or(0, |walk| u64::from(walk.visited));
        }
    }
    let accounting = accounting::account(&Records, &rendezvous.stragglers);
    name_uncleared(&rendezvous.stragglers);
    if !SUMMARY_PRINTED.swap(true, Ordering::AcqRel) {
        let _ = writeln!(
            EmergencyConsole,
            "*** hv: shootdown: {} of {} CPUs checked in in {shootdown_us} us; VMCS loaded {}, cleared {}; VMXOFF on {vmxoff_cpus}; own VMX exit {:?}",
            rendezvous.checked_in.len(),
            expected.len(),
            accounting.loaded,
            accounting.cleared,
            own.vmx,
        );
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
                o.field("vmcs_loaded").u64(accounting.loaded)?;
                o.field("vmcs_cleared").u64(accounting.cleared)?;
                o.field("vmcs_visited").u64(vmcs_visited)?;
                o.field("vmcs_on_stragglers")
                    .u64(accounting.on_stragglers)?;
                o.field("vmxoff_cpus").u64(vmxoff_cpus)?;
                o.field("coordinator_vmx_off").bool(own.vmx.is_off())?;
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
                })?;
                // Per CPU index: from the first NMI sent to the rendezvous
                // seeing that CPU checked in (null: never seen).
                o.field("checkin_us").array(|a| {
                    (0..smp::cpus().len()).try_for_each(|cpu| {
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
    super::handover::hand_over(&super::handover::Handover {
        coordinator: me,
        checked_in: &rendezvous.checked_in,
        stragglers: &rendezvous.stragglers,
        reason: &reason,
    });
    crate::console::finish::crash_stop()
}

/// Names on the emergency console every VMCS that stayed uncleared though
/// its CPU checked in, or that another CPU cleared.
fn name_uncleared(stragglers: &CpuSet) {
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
            "*** hv: VMCS {:#x} (record {record}) loaded on CPU {on} by its record: {fate:?}",
            Records.vmcs(record),
        );
    }
}
