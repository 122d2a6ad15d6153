//! Per-core run queues that cores hand vCPUs to without waiting for one
//! another.
//!
//! Each core owns a FIFO of the vCPUs it runs ([`LocalQueue`], touched by
//! that core alone) and an inbox ([`Inbox`]) any core may push onto
//! lock-free; the owner moves the inbox into its FIFO before it picks the
//! next vCPU. Both are intrusive lists over one array of links
//! ([`Links`]), one link per vCPU: a vCPU is in at most one queue.
//!
//! The scheduler keeps one rule with them: a vCPU whose context is loaded
//! on a core is queued only on that core. A vCPU moves by being *given*:
//! the core that holds it clears and unlinks its context itself, then
//! pushes it to another core's inbox ([`after_slice`] decides when). So no
//! core ever waits for another to clear a context, and no lock is shared
//! by all cores: with hundreds of cores on a few host threads (an
//! emulator), a core that is not running at the moment delays only the
//! vCPUs queued on it, never the others.

use core::sync::atomic::{AtomicU32, Ordering};

/// No vCPU: the end of a list.
const END: u32 = u32::MAX;

/// One `next` link per vCPU, shared by every queue.
#[derive(Debug)]
pub struct Links<const N: usize> {
    next: [AtomicU32; N],
}

impl<const N: usize> Default for Links<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Links<N> {
    /// Links for `N` vCPUs, none queued.
    pub const fn new() -> Self {
        Self {
            next: [const { AtomicU32::new(END) }; N],
        }
    }

    fn next(&self, index: u32) -> u32 {
        self.next[index as usize].load(Ordering::Acquire)
    }

    fn set_next(&self, index: u32, next: u32) {
        self.next[index as usize].store(next, Ordering::Release);
    }

    /// Whether `index` names a vCPU these links cover.
    fn covers(index: usize) -> bool {
        index < N && index < END as usize
    }
}

/// A core's inbox: a lock-free stack any core pushes onto, which its
/// owner empties in one swap ([`LocalQueue::take_inbox`]).
///
/// Only a swap takes entries off, never a pop of one: so the usual ABA
/// problem of lock-free stacks cannot arise.
#[derive(Debug)]
pub struct Inbox {
    head: AtomicU32,
}

impl Default for Inbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Inbox {
    /// An empty inbox.
    pub const fn new() -> Self {
        Self {
            head: AtomicU32::new(END),
        }
    }

    /// Pushes vCPU `index` (in no queue). Lock-free: a push that loses a
    /// race retries at once, and nothing waits for a core that stopped
    /// halfway. Returns `false` for an index the links do not cover.
    pub fn push<const N: usize>(&self, links: &Links<N>, index: usize) -> bool {
        if !Links::<N>::covers(index) {
            return false;
        }
        let index = index as u32;
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            links.set_next(index, head);
            // SeqCst: the pusher then looks whether the owner is idle, and
            // the owner, having said so, looks whether its inbox is empty;
            // one of them must see the other.
            match self
                .head
                .compare_exchange_weak(head, index, Ordering::SeqCst, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => head = now,
            }
        }
    }

    /// Whether nothing was pushed since the owner last emptied it.
    pub fn is_empty(&self) -> bool {
        self.head.load(Ordering::SeqCst) == END
    }
}

/// A core's own FIFO of vCPUs. Only its owner core calls its methods.
/// (Atomics only so that it can live in a static array.)
#[derive(Debug)]
pub struct LocalQueue {
    head: AtomicU32,
    tail: AtomicU32,
    len: AtomicU32,
}

impl Default for LocalQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalQueue {
    /// An empty queue.
    pub const fn new() -> Self {
        Self {
            head: AtomicU32::new(END),
            tail: AtomicU32::new(END),
            len: AtomicU32::new(0),
        }
    }

    /// How many vCPUs are queued.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed) as usize
    }

    /// Whether none is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues vCPU `index` (in no queue) at the tail. Returns `false` for
    /// an index the links do not cover.
    pub fn push_back<const N: usize>(&self, links: &Links<N>, index: usize) -> bool {
        if !Links::<N>::covers(index) {
            return false;
        }
        let index = index as u32;
        links.set_next(index, END);
        match self.tail.load(Ordering::Relaxed) {
            END => self.head.store(index, Ordering::Relaxed),
            tail => links.set_next(tail, index),
        }
        self.tail.store(index, Ordering::Relaxed);
        self.len.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Takes the vCPU at the head.
    pub fn pop_front<const N: usize>(&self, links: &Links<N>) -> Option<usize> {
        let head = self.head.load(Ordering::Relaxed);
        if head == END {
            return None;
        }
        let next = links.next(head);
        self.head.store(next, Ordering::Relaxed);
        if next == END {
            self.tail.store(END, Ordering::Relaxed);
        }
        links.set_next(head, END);
        self.len.fetch_sub(1, Ordering::Relaxed);
        Some(head as usize)
    }

    /// Moves everything in `inbox` (this core's) to the tail, in the order
    /// it was pushed. Returns how many came.
    pub fn take_inbox<const N: usize>(&self, links: &Links<N>, inbox: &Inbox) -> usize {
        if inbox.head.load(Ordering::Acquire) == END {
            return 0;
        }
        // The stack is newest first: reverse it, then queue it.
        let mut stack = inbox.head.swap(END, Ordering::AcqRel);
        let mut oldest_first = END;
        let mut count = 0;
        while stack != END && count < N {
            let next = links.next(stack);
            links.set_next(stack, oldest_first);
            oldest_first = stack;
            stack = next;
            count += 1;
        }
        while oldest_first != END {
            let next = links.next(oldest_first);
            self.push_back(links, oldest_first as usize);
            oldest_first = next;
        }
        count
    }
}

/// Where a vCPU goes after a slice that did not park or retire it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Back to the tail of this core's queue, still loaded here.
    Keep,
    /// Cleared here and given to an idle core (the core has other work).
    ToIdleCore,
    /// Cleared here and given to the next core in the ring: the steady
    /// migration that moves every vCPU around every core.
    ToNextCore,
}

/// What [`after_slice`] weighs.
#[derive(Debug, Clone, Copy)]
pub struct SliceFacts {
    /// Whether vCPUs move between cores at all (off: each core keeps its
    /// own, as for a crash that must find cores in guest mode).
    pub migrate: bool,
    /// Slices this core has ended so far, this one included.
    pub slices_here: u64,
    /// vCPUs waiting on this core besides this one.
    pub queued_here: usize,
    /// Whether some core is idle.
    pub idle_core: bool,
    /// Every how many slices a core gives one vCPU to the next core (0:
    /// never).
    pub rotate_every: u64,
}

/// Decides where a vCPU goes after its slice. A core never gives away its
/// last vCPU (it would then idle while its neighbour queues two); with
/// others waiting it gives this one to an idle core if there is one, and
/// otherwise every `rotate_every` slices to the next core.
pub fn after_slice(facts: SliceFacts) -> Placement {
    if !facts.migrate || facts.queued_here == 0 {
        Placement::Keep
    } else if facts.idle_core {
        Placement::ToIdleCore
    } else if facts.rotate_every > 0 && facts.slices_here.is_multiple_of(facts.rotate_every) {
        Placement::ToNextCore
    } else {
        Placement::Keep
    }
}

/// The next core after `me` (cyclically, among `cores`) for which
/// `eligible` holds; `None` if no other core is eligible.
pub fn next_core(me: usize, cores: usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
    (1..cores)
        .map(|step| (me + step) % cores)
        .find(|&core| eligible(core))
}

/// The core vCPU `index` starts on: the vCPUs are dealt round-robin over
/// the eligible cores (`None` if there is none).
pub fn home_core(index: usize, cores: usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
    let count = (0..cores).filter(|&core| eligible(core)).count();
    if count == 0 {
        return None;
    }
    (0..cores).filter(|&core| eligible(core)).nth(index % count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::thread;
    use std::vec::Vec;

    fn drain<const N: usize>(queue: &LocalQueue, links: &Links<N>) -> Vec<usize> {
        core::iter::from_fn(|| queue.pop_front(links)).collect()
    }

    #[test]
    fn the_local_queue_is_fifo() {
        let links = Links::<8>::new();
        let queue = LocalQueue::new();
        assert!(queue.is_empty());
        assert_eq!(queue.pop_front(&links), None);
        for index in [3, 1, 7] {
            assert!(queue.push_back(&links, index));
        }
        assert_eq!(queue.len(), 3);
        assert_eq!(queue.pop_front(&links), Some(3));
        assert!(queue.push_back(&links, 3));
        assert_eq!(drain(&queue, &links), [1, 7, 3]);
        assert!(queue.is_empty());
        // Empty again, it takes new entries from the start.
        assert!(queue.push_back(&links, 5));
        assert_eq!(drain(&queue, &links), [5]);
    }

    #[test]
    fn indices_outside_the_links_are_refused() {
        let links = Links::<4>::new();
        let queue = LocalQueue::new();
        let inbox = Inbox::new();
        assert!(!queue.push_back(&links, 4));
        assert!(!inbox.push(&links, 4));
        assert!(queue.is_empty());
        assert!(inbox.is_empty());
    }

    #[test]
    fn the_inbox_arrives_in_push_order_after_what_was_queued() {
        let links = Links::<8>::new();
        let queue = LocalQueue::new();
        let inbox = Inbox::new();
        assert_eq!(queue.take_inbox(&links, &inbox), 0);
        queue.push_back(&links, 0);
        for index in [4, 2, 6] {
            assert!(inbox.push(&links, index));
        }
        assert!(!inbox.is_empty());
        assert_eq!(queue.take_inbox(&links, &inbox), 3);
        assert!(inbox.is_empty());
        assert_eq!(drain(&queue, &links), [0, 4, 2, 6]);
    }

    #[test]
    fn many_cores_give_to_one_and_every_vcpu_arrives_exactly_once() {
        const CORES: usize = 6;
        const PER_CORE: usize = 200;
        const N: usize = CORES * PER_CORE;
        let links = Arc::new(Links::<N>::new());
        let inbox = Arc::new(Inbox::new());
        let done = Arc::new(AtomicBool::new(false));
        let givers: Vec<_> = (0..CORES)
            .map(|core| {
                let (links, inbox) = (links.clone(), inbox.clone());
                thread::spawn(move || {
                    for n in 0..PER_CORE {
                        assert!(inbox.push(&links, core * PER_CORE + n));
                        if n % 16 == 0 {
                            thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let owner = {
            let (links, inbox, done) = (links.clone(), inbox.clone(), done.clone());
            thread::spawn(move || {
                let queue = LocalQueue::new();
                let mut seen = Vec::new();
                loop {
                    let finished = done.load(Ordering::Acquire);
                    queue.take_inbox(&links, &inbox);
                    seen.extend(core::iter::from_fn(|| queue.pop_front(&links)));
                    if finished && inbox.is_empty() {
                        return seen;
                    }
                    thread::yield_now();
                }
            })
        };
        for giver in givers {
            giver.join().unwrap();
        }
        done.store(true, Ordering::Release);
        let seen = owner.join().unwrap();
        assert_eq!(seen.len(), N);
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), N, "a vCPU arrived twice");
        // Each giver's vCPUs arrive in the order it gave them.
        for core in 0..CORES {
            let mine: Vec<_> = seen.iter().filter(|&&i| i / PER_CORE == core).collect();
            assert!(mine.windows(2).all(|pair| pair[0] < pair[1]), "core {core}");
        }
    }

    fn facts(migrate: bool, slices_here: u64, queued_here: usize, idle_core: bool) -> SliceFacts {
        SliceFacts {
            migrate,
            slices_here,
            queued_here,
            idle_core,
            rotate_every: 4,
        }
    }

    #[test]
    fn a_core_keeps_its_last_vcpu_and_everything_without_migration() {
        assert_eq!(after_slice(facts(true, 4, 0, true)), Placement::Keep);
        assert_eq!(after_slice(facts(false, 4, 3, true)), Placement::Keep);
    }

    #[test]
    fn an_idle_core_gets_work_first_then_the_ring_every_few_slices() {
        assert_eq!(after_slice(facts(true, 1, 1, true)), Placement::ToIdleCore);
        assert_eq!(after_slice(facts(true, 1, 1, false)), Placement::Keep);
        assert_eq!(after_slice(facts(true, 3, 1, false)), Placement::Keep);
        assert_eq!(after_slice(facts(true, 4, 1, false)), Placement::ToNextCore);
        assert_eq!(after_slice(facts(true, 8, 2, false)), Placement::ToNextCore);
        let never = SliceFacts {
            rotate_every: 0,
            ..facts(true, 4, 1, false)
        };
        assert_eq!(after_slice(never), Placement::Keep);
    }

    #[test]
    fn the_next_core_wraps_and_skips_ineligible_ones() {
        assert_eq!(next_core(2, 4, |_| true), Some(3));
        assert_eq!(next_core(3, 4, |_| true), Some(0));
        assert_eq!(next_core(3, 4, |core| core != 0), Some(1));
        assert_eq!(next_core(1, 4, |core| core == 1), None);
        assert_eq!(next_core(0, 1, |_| true), None);
    }

    #[test]
    fn vcpus_are_dealt_over_the_eligible_cores() {
        let homes: Vec<_> = (0..6)
            .map(|index| home_core(index, 4, |core| core != 2))
            .collect();
        assert_eq!(
            homes,
            [Some(0), Some(1), Some(3), Some(0), Some(1), Some(3)]
        );
        assert_eq!(home_core(0, 4, |_| false), None);
    }
}
