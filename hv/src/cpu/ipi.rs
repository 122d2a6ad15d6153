//! IPIs between CPUs: call-function requests (run a function on another
//! CPU, like Linux's `smp_call_function_single`) and NMIs.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use smp_boot::bringup::CpuState;
use smp_boot::madt::MAX_CPUS;

use super::percpu;
use super::smp::cpus;
use super::time;
use crate::arch::atomic_fn::AtomicCallFn;
use crate::arch::{apic, cpu};

/// Vector of the call-function IPI.
pub const CALL_FUNCTION_VECTOR: u8 = 0xF0;

/// Sends an NMI to every other CPU and counts the online ones that took it
/// within 100 ms: the crash path's shootdown depends on exactly this.
pub fn nmi_self_test() -> usize {
    let own = percpu::current_cpu_index() as usize;
    let before: [u32; MAX_CPUS] =
        core::array::from_fn(|index| percpu::shared(index).nmis.load(Ordering::Relaxed));
    send_nmi_to_online_others();
    let others = || {
        cpus()
            .iter()
            .enumerate()
            .filter(move |&(index, cpu)| index != own && cpu.slot.state() == CpuState::Online)
    };
    let deadline = time::now_us() + 100_000;
    let answered = || {
        others()
            .filter(|&(index, cpu)| cpu.nmis.load(Ordering::Relaxed) > before[index])
            .count()
    };
    while answered() < others().count() && time::now_us() < deadline {
        core::hint::spin_loop();
    }
    answered()
}

/// Sends an NMI to every other online CPU, one by one. Never the
/// all-but-self shorthand: it would also reach CPUs this run did not start
/// (beyond `max_cpus`, or ones that failed), which may still be in firmware
/// with no IDT for an NMI. Lock-free: the crash shootdown uses it. Returns
/// how many NMIs it sent.
pub fn send_nmi_to_online_others() -> usize {
    let own = percpu::current_cpu_index() as usize;
    let mut sent = 0;
    for (index, cpu) in cpus().iter().enumerate() {
        if index != own && cpu.slot.state() == CpuState::Online {
            apic::send_nmi(cpu.slot.apic_id());
            sent += 1;
        }
    }
    sent
}

/// A pending call-function request of one target CPU.
///
/// The sender owns the slot from winning `busy` until it releases it; the
/// target reads `function`/`argument` after an acquire load of `requested`
/// and publishes completion with a release store of `completed`.
#[derive(Debug)]
pub struct CallSlot {
    busy: AtomicBool,
    function: AtomicCallFn,
    argument: AtomicUsize,
    requested: AtomicU64,
    completed: AtomicU64,
}

impl CallSlot {
    /// An idle slot.
    pub const fn new() -> Self {
        Self {
            busy: AtomicBool::new(false),
            function: AtomicCallFn::new(),
            argument: AtomicUsize::new(0),
            requested: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        }
    }
}

/// Runs `function(argument)` on CPU `index` and waits for it to finish,
/// like Linux's `smp_call_function_single(..., wait = 1)`. Returns `false`
/// if that CPU is not online.
pub fn call_on(index: usize, function: fn(usize), argument: usize) -> bool {
    let Some(target) = cpus().get(index) else {
        return false;
    };
    if target.slot.state() != CpuState::Online {
        return false;
    }
    if index == percpu::current_cpu_index() as usize {
        function(argument);
        return true;
    }
    let call = &target.call;
    while call
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    call.function.store(function, Ordering::Relaxed);
    call.argument.store(argument, Ordering::Relaxed);
    let ticket = call.requested.load(Ordering::Relaxed) + 1;
    call.requested.store(ticket, Ordering::Release);
    apic::send_fixed(target.slot.apic_id(), CALL_FUNCTION_VECTOR);
    // Interrupts stay open while waiting: the target may be waiting for
    // this CPU at the same moment.
    let interrupts_were_on = cpu::interrupts_enabled();
    cpu::enable_interrupts();
    while call.completed.load(Ordering::Acquire) < ticket {
        core::hint::spin_loop();
    }
    if !interrupts_were_on {
        cpu::disable_interrupts();
    }
    call.busy.store(false, Ordering::Release);
    true
}

/// Asks CPU `index` to run `function(argument)` and does not wait for it
/// (the crash injection: the target never finishes).
pub fn send_call(index: usize, function: fn(usize), argument: usize) -> bool {
    let Some(target) = cpus().get(index) else {
        return false;
    };
    let call = &target.call;
    if call
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    call.function.store(function, Ordering::Relaxed);
    call.argument.store(argument, Ordering::Relaxed);
    let ticket = call.requested.load(Ordering::Relaxed) + 1;
    call.requested.store(ticket, Ordering::Release);
    apic::send_fixed(target.slot.apic_id(), CALL_FUNCTION_VECTOR);
    true
}

/// Runs `function(argument)` on every online CPU (this one too) and waits.
/// Returns on how many CPUs it ran.
pub fn call_on_all(function: fn(usize), argument: usize) -> usize {
    (0..cpus().len())
        .filter(|&index| call_on(index, function, argument))
        .count()
}

/// The call-function IPI handler (registered for [`CALL_FUNCTION_VECTOR`]).
pub fn on_call_function_ipi(_: &mut crate::arch::idt::TrapFrame) {
    let call = &percpu::shared(percpu::current_cpu_index() as usize).call;
    let ticket = call.requested.load(Ordering::Acquire);
    if ticket > call.completed.load(Ordering::Relaxed) {
        // `call_on` stored the function and argument before the release
        // store of `requested` that the acquire above read.
        let function = call.function.load(Ordering::Relaxed);
        let argument = call.argument.load(Ordering::Relaxed);
        if let Some(function) = function {
            function(argument);
        }
        call.completed.store(ticket, Ordering::Release);
    }
    apic::end_of_interrupt();
}
