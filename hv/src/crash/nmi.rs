//! The NMI handler, installed at boot for vector 2: it is the shootdown's
//! way in on every CPU but the coordinator, armed by the coordinator word
//! (no registration at crash time).

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use smp_boot::madt::MAX_CPUS;

use super::hardware::Hardware;
use super::records::LISTS;
use super::{COORDINATOR, park, regs_from_frame};
use crate::arch::idt::TrapFrame;
use crate::cpu::{percpu, time};

/// Test knob `point:nmi_blocked`: this CPU (index) spins in its NMI handler.
pub static SPIN_IN_NMI: AtomicU32 = AtomicU32::new(u32::MAX);

/// When each CPU took the crash NMI (TSC microseconds; 0: never).
static NMI_AT_US: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

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

/// The NMI vector's handler.
pub fn on_nmi(frame: &mut TrapFrame) {
    let me = percpu::current_cpu_index();
    if SPIN_IN_NMI.load(Ordering::Relaxed) == me {
        // Test knob: a CPU stuck with NMIs blocked, which cannot answer.
        loop {
            core::hint::spin_loop();
        }
    }
    let Some(coordinator) = COORDINATOR.coordinator() else {
        // Nobody's crash: counted (the boot-time NMI test reads the count).
        percpu::shared(me as usize)
            .nmis
            .fetch_add(1, Ordering::Relaxed);
        return;
    };
    if coordinator == me as usize
        && COORDINATOR
            .status(coordinator)
            .is_some_and(|status| !status.handler_started())
    {
        // A stray NMI on the coordinator before its own cleanup: it will
        // clean up itself after the rendezvous.
        return;
    }
    CRASH_NMI_IN_GUEST[me as usize].store(
        EXITING_ON_NMI[me as usize].load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    NMI_AT_US[me as usize].store(time::now_us(), Ordering::Relaxed);
    // Answer the shootdown: no output (every CPU at once would garble the
    // console), clean up, check in, park.
    let regs = regs_from_frame(frame);
    COORDINATOR.enter(me as usize);
    COORDINATOR.crash_this_cpu(me as usize, &regs, &LISTS, &mut Hardware);
    park()
}
