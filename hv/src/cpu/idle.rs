//! What an online CPU does when it has nothing to do: serve IPIs, and run
//! the work the layer above hands it (the guest run loop).

use core::sync::atomic::Ordering;

use crate::arch::atomic_fn::AtomicCallFn;
use crate::arch::cpu;

/// The work an idle CPU joins, set by the layer above ([`set_work`]): it
/// is called with the CPU's index each time the CPU wakes, and returns
/// when there is nothing (more) to do.
static WORK: AtomicCallFn = AtomicCallFn::new();

/// Hands idle CPUs their work. Called at boot before the APs start.
pub fn set_work(work: fn(usize)) {
    WORK.store(work, Ordering::Release);
}

/// Never returns: waits for interrupts with interrupts enabled, and runs
/// the registered work whenever it wakes.
pub fn idle() -> ! {
    let me = super::percpu::current_cpu_index() as usize;
    loop {
        if let Some(work) = WORK.load(Ordering::Acquire) {
            work(me);
        }
        cpu::wait_for_interrupt();
    }
}
