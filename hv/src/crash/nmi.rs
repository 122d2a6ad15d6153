//! The NMI handler, installed at boot for vector 2. What an NMI is:
//!
//! - during a crash, on the coordinator, or on a CPU already answering:
//!   a stray or nested NMI; it returns at once (the coordinator must never
//!   be stopped, and a CPU mid-answer must not be overwritten);
//! - during a crash, anywhere else: the shootdown; the CPU answers it on
//!   its crash stack and parks;
//! - one another CPU announced (`cpu::ipi::nmi_self_test`): counted;
//! - anything else came from outside (the platform's NMI button, a BMC):
//!   per `nmi=`, it starts the crash path ("external NMI"), is logged, or
//!   is ignored.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use hv_core::cmdline::ExternalNmi;
use smp_boot::madt::MAX_CPUS;

use super::{COORDINATOR, NmiEntry, StackEntry, enter_on_crash_stack, regs_from_frame};
use crate::arch::idt::TrapFrame;
use crate::cpu::{percpu, time};

/// Test knob `point:nmi_blocked`: this CPU (index) spins in its NMI handler.
pub static SPIN_IN_NMI: AtomicU32 = AtomicU32::new(u32::MAX);

/// When each CPU took the crash NMI (TSC microseconds; 0: never).
static NMI_AT_US: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// NMIs the coordinator took (and returned from) during the crash.
static STRAY_ON_COORDINATOR: AtomicU32 = AtomicU32::new(0);
/// NMIs that came from outside, not during a crash.
static EXTERNAL: AtomicU32 = AtomicU32::new(0);
/// NMIs that reached a CPU already answering the shootdown.
static NESTED: AtomicU32 = AtomicU32::new(0);

/// `nmi=`: 0 dump, 1 log, 2 ignore. Log until the command line is read:
/// an NMI that reaches a capture image early (one of the old world's)
/// must not stop it.
static EXTERNAL_POLICY: AtomicU8 = AtomicU8::new(1);

/// External NMIs printed under `nmi=log`; the rest are only counted.
const PRINTED_EXTERNAL_NMIS: u32 = 4;

/// Sets what an NMI from outside does.
pub fn set_external_policy(policy: ExternalNmi) {
    let code = match policy {
        ExternalNmi::Dump => 0,
        ExternalNmi::Log => 1,
        ExternalNmi::Ignore => 2,
    };
    EXTERNAL_POLICY.store(code, Ordering::Relaxed);
}

/// When CPU `index` took the crash NMI, if it did.
pub fn nmi_at_us(index: usize) -> Option<u64> {
    let at = NMI_AT_US.get(index)?.load(Ordering::Relaxed);
    (at != 0).then_some(at)
}

/// Per CPU: the NMI being handled now came as a guest's exit (set by the
/// virtualization layer around the handler, see [`as_guest_exit`]).
static EXITING_ON_NMI: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Per CPU: the crash NMI came as a guest's exit (the CPU was in guest
/// mode when it arrived).
static CRASH_NMI_IN_GUEST: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// Runs `deliver` (which makes this CPU's NMI handler run: STGI on SVM,
/// `int 2` on VMX) for an NMI that made the guest on CPU `cpu` exit, so
/// that the handler can tell. A crash NMI never comes back from it.
pub fn as_guest_exit(cpu: usize, deliver: fn()) {
    EXITING_ON_NMI[cpu].store(true, Ordering::Relaxed);
    deliver();
    EXITING_ON_NMI[cpu].store(false, Ordering::Relaxed);
}

/// Whether CPU `index`'s crash NMI came as a guest's exit (`None`: it took
/// no crash NMI).
pub fn crash_nmi_in_guest(index: usize) -> Option<bool> {
    nmi_at_us(index)?;
    Some(CRASH_NMI_IN_GUEST.get(index)?.load(Ordering::Relaxed))
}

/// Stray NMIs the coordinator returned from.
pub fn stray_on_coordinator() -> u32 {
    STRAY_ON_COORDINATOR.load(Ordering::Relaxed)
}

/// NMIs that reached CPUs already answering.
pub fn nested() -> u32 {
    NESTED.load(Ordering::Relaxed)
}

/// External NMIs seen outside a crash (logged or ignored).
pub fn external() -> u32 {
    EXTERNAL.load(Ordering::Relaxed)
}

/// The NMI vector's handler.
pub fn on_nmi(frame: &mut TrapFrame) {
    let me = percpu::current_cpu_index();
    let index = me as usize;
    if SPIN_IN_NMI.load(Ordering::Relaxed) == me {
        // Test knob: a CPU stuck with NMIs blocked, which cannot answer.
        loop {
            core::hint::spin_loop();
        }
    }
    if let Some(coordinator) = COORDINATOR.coordinator() {
        if coordinator == index {
            // The coordinator is never stopped: whatever this NMI is, its
            // own work goes on when it returns.
            STRAY_ON_COORDINATOR.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if COORDINATOR
            .status(index)
            .is_some_and(|status| status.entered())
        {
            // Already answering (this NMI arrived after a fix-up's IRET
            // unblocked NMIs, or from outside): its work goes on.
            NESTED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        CRASH_NMI_IN_GUEST[index].store(
            EXITING_ON_NMI[index].load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        NMI_AT_US[index].store(time::now_us(), Ordering::Relaxed);
        enter_on_crash_stack(
            index,
            StackEntry {
                regs: regs_from_frame(frame),
                kind: NmiEntry::Shootdown,
            },
        )
    }
    let shared = percpu::shared(index);
    let expected = shared.nmis_expected.load(Ordering::Acquire);
    if shared.nmis_expected_taken.load(Ordering::Relaxed) < expected {
        shared.nmis_expected_taken.fetch_add(1, Ordering::Relaxed);
        shared.nmis.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match EXTERNAL_POLICY.load(Ordering::Relaxed) {
        0 => enter_on_crash_stack(
            index,
            StackEntry {
                regs: regs_from_frame(frame),
                kind: NmiEntry::External,
            },
        ),
        1 => {
            let seen = EXTERNAL.fetch_add(1, Ordering::Relaxed);
            use core::fmt::Write;
            // A storm (a capture image under the old world's NMIs) must not
            // become a storm of lines: on a 115200-baud UART each costs
            // 6 ms. The rest are counted (`smp.external_nmis`,
            // `capture.stray_nmis`).
            if seen < PRINTED_EXTERNAL_NMIS {
                let _ = writeln!(
                    crate::console::EmergencyConsole,
                    "*** hv: external NMI on CPU {me} at rip {:#x} (nmi=log: going on)",
                    frame.rip
                );
            } else if seen == PRINTED_EXTERNAL_NMIS {
                let _ = writeln!(
                    crate::console::EmergencyConsole,
                    "*** hv: more external NMIs: counted, not printed"
                );
            }
        }
        _ => {
            EXTERNAL.fetch_add(1, Ordering::Relaxed);
        }
    }
}
