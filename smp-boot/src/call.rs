//! The call-function slot: one CPU asks another to run a function, by IPI,
//! and may wait for it to finish (Linux's `smp_call_function_single`).
//!
//! Every CPU owns one [`CallSlot`]; only that CPU serves it, from its
//! call-function IPI handler. A call goes through four steps:
//!
//! 1. **claim** ([`CallSlot::claim`] / [`CallSlot::try_claim`]): the sender
//!    wins the slot's `busy` flag. One call is in flight per slot.
//! 2. **post** ([`Claim::post`]): the sender writes the function and its
//!    argument, publishes a new ticket in `requested`, fences, and sends
//!    the IPI (both through [`CallIpi`]).
//! 3. **serve** ([`CallSlot::serve`], on the target, in its IPI handler):
//!    if `requested` is ahead of `completed`, run the function and publish
//!    the ticket in `completed`. A ticket runs at most once, however many
//!    IPIs arrive.
//! 4. **wait** ([`Posted::wait`]): the sender spins until `completed`
//!    reaches its ticket, then releases `busy`. Or **abandon**
//!    ([`Posted::abandon`]): do not wait and keep the slot busy for good
//!    (the crash injection, whose target never returns).
//!
//! The function is an opaque `usize`: the kernel stores a `fn(usize)`
//! pointer and turns it back in its handler (that transmute stays in the
//! kernel, the one place that knows what the number is).
//!
//! # Memory ordering
//! - `busy`: won by a compare-exchange with Acquire, released by a store
//!   with Release. The release by the previous sender happens after it saw
//!   its ticket completed, so a new sender's writes to `function` and
//!   `argument` come after the target's reads of the previous call's.
//! - `function`, `argument`: written Relaxed by the slot's owner before
//!   the Release store of `requested`; read Relaxed by the target after an
//!   Acquire load of `requested` that saw the new ticket. That pair makes
//!   the writes visible to the reads.
//! - `completed`: stored with Release by the target after the function
//!   returned; loaded with Acquire by the waiting sender. Everything the
//!   function wrote is visible to the sender once it sees its ticket.
//! - **The IPI is not a memory operation.** On x2APIC it is a WRMSR to the
//!   ICR, which is not serializing and can be executed while the store of
//!   `requested` still sits in the sender's store buffer: the target then
//!   takes the interrupt, loads the old ticket, finds nothing to do, and
//!   the sender waits forever. So `post` calls [`CallIpi::fence`] between
//!   the Release store and [`CallIpi::send`]; on x2APIC the fence is
//!   `mfence; lfence` (Linux's `weak_wrmsr_fence`). An xAPIC ICR write is
//!   an uncached store, ordered after earlier stores, and needs only a
//!   compiler fence.
//!
//! # Deadlock
//! Two CPUs that call each other at once each wait for the other. Both
//! finish only if each still serves its own slot while it spins: the
//! kernel keeps interrupts enabled while it claims and while it waits
//! (the `idle` argument of [`CallSlot::claim`] and [`Posted::wait`] is
//! where tests serve their own slot instead). Claiming with interrupts
//! off can deadlock in a ring of three: A spins for C's slot, held by B,
//! which waits for C, which spins for A's slot, held by someone waiting
//! for A.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// How a sender makes the target look at its slot.
pub trait CallIpi {
    /// Makes every store this CPU made so far visible to the target
    /// before the interrupt that [`CallIpi::send`] raises can arrive.
    fn fence(&mut self);
    /// Sends the call-function interrupt to the target.
    fn send(&mut self);
}

/// A pending call-function request of one target CPU.
#[derive(Debug)]
pub struct CallSlot {
    busy: AtomicBool,
    function: AtomicUsize,
    argument: AtomicUsize,
    requested: AtomicU64,
    completed: AtomicU64,
}

impl Default for CallSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl CallSlot {
    /// An idle slot, usable in a `static`.
    pub const fn new() -> Self {
        Self {
            busy: AtomicBool::new(false),
            function: AtomicUsize::new(0),
            argument: AtomicUsize::new(0),
            requested: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        }
    }

    /// Wins the slot, calling `idle` between tries (the kernel: a spin-loop
    /// hint, with interrupts enabled; see the module docs on deadlock).
    pub fn claim(&self, mut idle: impl FnMut()) -> Claim<'_> {
        loop {
            if let Some(claim) = self.try_claim() {
                return claim;
            }
            idle();
        }
    }

    /// Wins the slot if nobody holds it.
    pub fn try_claim(&self) -> Option<Claim<'_>> {
        self.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Claim { slot: self })
    }

    /// The target's side, from its call-function IPI handler: runs the
    /// pending call, if any, as `run(function, argument)`, then marks it
    /// completed. Returns whether a call ran. Only the CPU that owns the
    /// slot may call this.
    pub fn serve(&self, run: impl FnOnce(usize, usize)) -> bool {
        let ticket = self.requested.load(Ordering::Acquire);
        if ticket <= self.completed.load(Ordering::Relaxed) {
            return false;
        }
        let function = self.function.load(Ordering::Relaxed);
        let argument = self.argument.load(Ordering::Relaxed);
        run(function, argument);
        self.completed.store(ticket, Ordering::Release);
        true
    }

    /// Whether a sender holds the slot (a call is being posted, runs, or
    /// was abandoned).
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    /// Calls requested and completed so far.
    pub fn tickets(&self) -> (u64, u64) {
        (
            self.requested.load(Ordering::Acquire),
            self.completed.load(Ordering::Acquire),
        )
    }
}

/// A won slot. Dropping it without posting releases the slot.
#[derive(Debug)]
#[must_use = "dropping a claim releases the slot"]
pub struct Claim<'a> {
    slot: &'a CallSlot,
}

impl<'a> Claim<'a> {
    /// Publishes `function(argument)` and sends the IPI, fenced (see the
    /// module docs).
    pub fn post(self, function: usize, argument: usize, ipi: &mut impl CallIpi) -> Posted<'a> {
        let slot = self.slot;
        // The slot stays busy until `wait` releases it.
        core::mem::forget(self);
        slot.function.store(function, Ordering::Relaxed);
        slot.argument.store(argument, Ordering::Relaxed);
        // Only the holder of `busy` writes `requested`.
        let ticket = slot.requested.load(Ordering::Relaxed) + 1;
        slot.requested.store(ticket, Ordering::Release);
        ipi.fence();
        ipi.send();
        Posted { slot, ticket }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.slot.busy.store(false, Ordering::Release);
    }
}

/// A posted call. Dropping it abandons the call: the slot stays busy, since
/// the target may not have read the function yet.
#[derive(Debug)]
#[must_use = "wait for the call, or abandon it explicitly"]
pub struct Posted<'a> {
    slot: &'a CallSlot,
    ticket: u64,
}

impl Posted<'_> {
    /// This call's ticket.
    pub fn ticket(&self) -> u64 {
        self.ticket
    }

    /// Whether the target has finished the call.
    pub fn is_complete(&self) -> bool {
        self.slot.completed.load(Ordering::Acquire) >= self.ticket
    }

    /// Spins until the target has run the call, calling `idle` between
    /// looks, then releases the slot. Everything the function wrote is
    /// visible when this returns.
    pub fn wait(self, mut idle: impl FnMut()) {
        while !self.is_complete() {
            idle();
        }
        self.slot.busy.store(false, Ordering::Release);
    }

    /// Does not wait; the slot stays busy for good (for a target that is
    /// not expected to return, such as a crash injection).
    pub fn abandon(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;
    use std::thread;
    use std::time::{Duration, Instant};
    use std::vec::Vec;

    /// An "interrupt line": the pending flag a target polls, and a log of
    /// what the sender did, in order.
    #[derive(Default)]
    struct Line {
        pending: AtomicBool,
    }

    struct FakeIpi<'a> {
        line: &'a Line,
        steps: Vec<&'static str>,
    }

    impl<'a> FakeIpi<'a> {
        fn new(line: &'a Line) -> Self {
            Self {
                line,
                steps: Vec::new(),
            }
        }
    }

    impl CallIpi for FakeIpi<'_> {
        fn fence(&mut self) {
            core::sync::atomic::fence(Ordering::SeqCst);
            self.steps.push("fence");
        }

        fn send(&mut self) {
            self.line.pending.store(true, Ordering::Release);
            self.steps.push("send");
        }
    }

    /// One simulated CPU: its slot and its interrupt line.
    #[derive(Default)]
    struct Cpu {
        slot: CallSlot,
        line: Line,
    }

    impl Cpu {
        /// The IPI handler: if the line is raised, lower it and serve.
        fn handle(&self, run: impl FnOnce(usize, usize)) -> bool {
            self.line.pending.swap(false, Ordering::AcqRel) && self.slot.serve(run)
        }
    }

    /// Function number 1: add the argument to `counter`.
    const ADD: usize = 1;

    #[test]
    fn post_fences_before_sending() {
        let cpu = Cpu::default();
        let mut ipi = FakeIpi::new(&cpu.line);
        let posted = cpu.slot.claim(|| {}).post(ADD, 5, &mut ipi);
        assert_eq!(ipi.steps, ["fence", "send"]);
        assert_eq!(posted.ticket(), 1);
        assert!(!posted.is_complete());
        assert!(cpu.slot.is_busy());
        let mut ran = None;
        assert!(cpu.handle(|f, a| ran = Some((f, a))));
        assert_eq!(ran, Some((ADD, 5)));
        posted.wait(|| panic!("already complete"));
        assert!(!cpu.slot.is_busy());
        assert_eq!(cpu.slot.tickets(), (1, 1));
    }

    #[test]
    fn a_ticket_is_served_exactly_once() {
        let cpu = Cpu::default();
        let mut ipi = FakeIpi::new(&cpu.line);
        let posted = cpu.slot.claim(|| {}).post(ADD, 1, &mut ipi);
        let mut runs = 0;
        assert!(cpu.slot.serve(|_, _| runs += 1));
        // A second IPI, or a spurious one, finds nothing to do.
        assert!(!cpu.slot.serve(|_, _| runs += 1));
        assert!(!cpu.slot.serve(|_, _| runs += 1));
        assert_eq!(runs, 1);
        posted.wait(|| {});
        // Nothing is served before a post either.
        assert!(!CallSlot::new().serve(|_, _| panic!("no call was posted")));
    }

    #[test]
    fn a_dropped_claim_releases_the_slot_and_an_abandoned_call_keeps_it() {
        let cpu = Cpu::default();
        let claim = cpu.slot.try_claim().unwrap();
        assert!(cpu.slot.try_claim().is_none());
        drop(claim);
        let mut ipi = FakeIpi::new(&cpu.line);
        cpu.slot
            .try_claim()
            .unwrap()
            .post(ADD, 1, &mut ipi)
            .abandon();
        assert!(cpu.slot.try_claim().is_none());
        // Even once served, an abandoned call's slot stays taken.
        assert!(cpu.handle(|_, _| {}));
        assert!(cpu.slot.try_claim().is_none());
    }

    #[test]
    fn many_senders_to_one_target() {
        const SENDERS: usize = 6;
        const CALLS: usize = 300;
        let target = Arc::new(Cpu::default());
        let counter = Arc::new(AtomicU64::new(0));
        let runs = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (target, counter, runs, stop) =
                (target.clone(), counter.clone(), runs.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    target.handle(|function, argument| {
                        assert_eq!(function, ADD);
                        counter.fetch_add(argument as u64, Ordering::Relaxed);
                        runs.fetch_add(1, Ordering::Relaxed);
                    });
                    thread::yield_now();
                }
            })
        };
        let senders: Vec<_> = (0..SENDERS)
            .map(|sender| {
                let (target, counter) = (target.clone(), counter.clone());
                thread::spawn(move || {
                    for call in 0..CALLS {
                        let argument = sender * CALLS + call + 1;
                        let mut ipi = FakeIpi::new(&target.line);
                        let before = counter.load(Ordering::Relaxed);
                        target
                            .slot
                            .claim(thread::yield_now)
                            .post(ADD, argument, &mut ipi)
                            .wait(thread::yield_now);
                        // The call's effect is visible once wait returns.
                        assert!(counter.load(Ordering::Relaxed) >= before + argument as u64);
                    }
                })
            })
            .collect();
        for sender in senders {
            sender.join().unwrap();
        }
        stop.store(true, Ordering::Release);
        server.join().unwrap();
        let calls = SENDERS * CALLS;
        assert_eq!(runs.load(Ordering::Relaxed), calls as u32);
        assert_eq!(
            counter.load(Ordering::Relaxed),
            (calls * (calls + 1) / 2) as u64
        );
        assert_eq!(target.slot.tickets(), (calls as u64, calls as u64));
        assert!(!target.slot.is_busy());
    }

    #[test]
    fn cpus_calling_each_other_at_once_do_not_deadlock() {
        // A ring of three: each calls the next while being called by the
        // previous, and serves its own slot while it claims and waits.
        const CPUS: usize = 3;
        const CALLS: usize = 300;
        let cpus: Arc<Vec<Cpu>> = Arc::new((0..CPUS).map(|_| Cpu::default()).collect());
        let served: Arc<Vec<AtomicU32>> = Arc::new((0..CPUS).map(|_| AtomicU32::new(0)).collect());
        let handles: Vec<_> = (0..CPUS)
            .map(|me| {
                let (cpus, served) = (cpus.clone(), served.clone());
                thread::spawn(move || {
                    let serve_own = || {
                        cpus[me].handle(|function, argument| {
                            assert_eq!(function, ADD);
                            assert_eq!(argument, (me + CPUS - 1) % CPUS);
                            served[me].fetch_add(1, Ordering::Relaxed);
                        });
                        thread::yield_now();
                    };
                    let next = &cpus[(me + 1) % CPUS];
                    for _ in 0..CALLS {
                        let mut ipi = FakeIpi::new(&next.line);
                        next.slot
                            .claim(serve_own)
                            .post(ADD, me, &mut ipi)
                            .wait(serve_own);
                    }
                    // Keep answering until the caller is done too.
                    while served[me].load(Ordering::Relaxed) < CALLS as u32 {
                        serve_own();
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        for (cpu, count) in cpus.iter().zip(served.iter()) {
            assert_eq!(count.load(Ordering::Relaxed), CALLS as u32);
            assert_eq!(cpu.slot.tickets(), (CALLS as u64, CALLS as u64));
        }
    }

    #[test]
    fn the_sender_never_sees_completion_before_the_function_ran() {
        // The function takes 50 µs and records that it finished; a sender
        // that saw `completed` too early would find the record missing.
        const CALLS: usize = 200;
        let target = Arc::new(Cpu::default());
        let finished: Arc<Vec<AtomicBool>> =
            Arc::new((0..CALLS).map(|_| AtomicBool::new(false)).collect());
        let server = {
            let (target, finished) = (target.clone(), finished.clone());
            thread::spawn(move || {
                let mut served = 0;
                while served < CALLS {
                    let ran = target.handle(|_, argument| {
                        let start = Instant::now();
                        while start.elapsed() < Duration::from_micros(50) {
                            core::hint::spin_loop();
                        }
                        finished[argument].store(true, Ordering::Relaxed);
                    });
                    if ran {
                        served += 1;
                    } else {
                        thread::yield_now();
                    }
                }
            })
        };
        for call in 0..CALLS {
            let mut ipi = FakeIpi::new(&target.line);
            let posted = target.slot.claim(|| {}).post(ADD, call, &mut ipi);
            let mut looks = 0u64;
            while !posted.is_complete() {
                looks += 1;
                core::hint::spin_loop();
            }
            assert!(
                finished[call].load(Ordering::Relaxed),
                "call {call} after {looks} looks"
            );
            posted.wait(|| unreachable!("complete"));
        }
        server.join().unwrap();
    }
}
