//! IPIs between CPUs: call-function requests (run a function on another
//! CPU, like Linux's `smp_call_function_single`) and NMIs.

use core::sync::atomic::Ordering;

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
    // Announced first, so that the handler counts them instead of taking
    // them for an NMI from outside.
    for (index, cpu) in cpus().iter().enumerate() {
        if index != own && cpu.slot.state() == CpuState::Online {
            cpu.nmis_expected.fetch_add(1, Ordering::AcqRel);
        }
    }
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

/// The functions calls have carried, so that a slot can carry a small
/// number (the protocol's opaque `usize`) instead of a pointer: the target
/// turns it back into a function by looking it up here, never by a cast.
static FUNCTIONS: [AtomicCallFn; 32] = [const { AtomicCallFn::new() }; 32];

/// The number of `function` in [`FUNCTIONS`], registering it if new.
fn function_number(function: fn(usize)) -> Option<usize> {
    FUNCTIONS
        .iter()
        .position(|slot| slot.store_if_empty(function))
}

/// The IPI of a call to one CPU, fenced as the protocol needs.
struct CallFunctionIpi {
    apic_id: u32,
}

impl smp_boot::call::CallIpi for CallFunctionIpi {
    fn fence(&mut self) {
        apic::fence_before_ipi();
    }

    fn send(&mut self) {
        apic::send_fixed(self.apic_id, CALL_FUNCTION_VECTOR);
    }
}

/// Runs `function(argument)` on CPU `index` and waits for it to finish,
/// like Linux's `smp_call_function_single(..., wait = 1)`. Returns `false`
/// if that CPU is not online. Interrupts stay open while it claims the
/// slot and while it waits: the target may be waiting for this CPU at the
/// same moment (`smp_boot::call`, "Deadlock").
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
    let Some(number) = function_number(function) else {
        log::error!("ipi: more distinct call functions than the registry holds");
        return false;
    };
    let interrupts_were_on = cpu::interrupts_enabled();
    cpu::enable_interrupts();
    let mut ipi = CallFunctionIpi {
        apic_id: target.slot.apic_id(),
    };
    target
        .call
        .claim(core::hint::spin_loop)
        .post(number, argument, &mut ipi)
        .wait(core::hint::spin_loop);
    if !interrupts_were_on {
        cpu::disable_interrupts();
    }
    true
}

/// Asks CPU `index` to run `function(argument)` and does not wait for it
/// (the crash injection: the target never finishes). `false` when its
/// slot is taken.
pub fn send_call(index: usize, function: fn(usize), argument: usize) -> bool {
    let Some(target) = cpus().get(index) else {
        return false;
    };
    let (Some(number), Some(claim)) = (function_number(function), target.call.try_claim()) else {
        return false;
    };
    let mut ipi = CallFunctionIpi {
        apic_id: target.slot.apic_id(),
    };
    claim.post(number, argument, &mut ipi).abandon();
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
    call.serve(|number, argument| {
        if let Some(function) = FUNCTIONS
            .get(number)
            .and_then(|slot| slot.load(Ordering::Acquire))
        {
            function(argument);
        }
    });
    apic::end_of_interrupt();
}
