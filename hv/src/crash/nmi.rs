//! The NMI handler, installed at boot for vector 2: it is the shootdown's
//! way in on every CPU but the coordinator, armed by the coordinator word
//! (no registration at crash time).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

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
    NMI_AT_US[me as usize].store(time::now_us(), Ordering::Relaxed);
    // Answer the shootdown: no output (every CPU at once would garble the
    // console), clean up, check in, park.
    let regs = regs_from_frame(frame);
    COORDINATOR.enter(me as usize);
    COORDINATOR.crash_this_cpu(me as usize, &regs, &LISTS, &mut Hardware);
    park()
}
