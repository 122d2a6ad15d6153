//! A lock-free, multi-producer log ring that any context may write to.
//!
//! Writers include NMI and exception handlers that may have interrupted
//! another writer, or the drainer, on the same CPU. Nobody ever waits:
//!
//! - A writer takes a sequence number with one `fetch_add` on `head`. Its
//!   slot is `seq % SLOTS`, its *lap* `seq / SLOTS`. It claims the slot with
//!   one compare-exchange `Empty(lap) -> Writing(lap)`, copies its bytes
//!   (truncating, and flagging it, when too long), and publishes with a
//!   release store of `Ready(lap)`.
//! - If the claim fails, the slot still holds an older message (writers
//!   lapped the drainer: the ring is full) or the drainer already gave the
//!   sequence up. The writer drops its message and raises the slot's
//!   `abandoned` mark to `lap + 1`, which tells the drainer that this
//!   sequence will never be published.
//! - The drainer is whoever wins the `draining` flag; losers return at once.
//!   It walks sequences in order from `tail`: a `Ready` slot is emitted and
//!   reset to `Empty(lap + 1)`; an `Empty` slot whose mark says it was
//!   abandoned is skipped (a compare-exchange, so a late writer either got
//!   the slot first or fails its own claim) and counted as dropped; anything
//!   else (not yet claimed, or being written, possibly by the very context
//!   the drainer interrupted) ends the drain.
//! - After releasing the flag the drainer looks at the next slot again: a
//!   writer that published (or abandoned) while the flag was held, and then
//!   lost the flag race, would otherwise leave its message stranded. The
//!   `SeqCst` fences in [`LogRing::drain`] make the two sides agree: either
//!   the writer's drain attempt wins the flag, or the releasing drainer sees
//!   the writer's store.
//!
//! So every sequence is either emitted exactly once, or dropped and counted
//! exactly once, and a writer learns which from [`LogRing::write`]'s result.
//! Writers must call [`LogRing::drain`] after writing (a losing call costs a
//! few atomics) so that progress never depends on a later message.
//!
//! A writer that never finishes (its CPU died mid-message) stops the drain
//! at its slot; later messages are then dropped once the ring is full.

// The slots' bytes sit in `UnsafeCell`s whose exclusive access is handed
// over by the stamp protocol above; the unsafe code is confined to this module.
#![allow(unsafe_code)]

use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};

/// Slot states, in the two low bits of a stamp (the lap is above them).
const EMPTY: u64 = 0;
const WRITING: u64 = 1;
const READY: u64 = 2;

const fn stamp(lap: u64, state: u64) -> u64 {
    (lap << 2) | state
}

/// What the drainer hands to the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// One message, in sequence order.
    Message {
        /// The message's sequence number.
        seq: u64,
        /// Its bytes (at most the slot size).
        bytes: &'a [u8],
        /// Whether the writer had more bytes than the slot holds.
        truncated: bool,
    },
    /// This many messages were dropped here because the ring was full.
    Dropped(u64),
}

/// The data of a slot, owned by whoever the stamp protocol says.
struct SlotData<const BYTES: usize> {
    len: usize,
    truncated: bool,
    bytes: [u8; BYTES],
}

struct Slot<const BYTES: usize> {
    /// `stamp(lap, state)`: who owns `data` and for which sequence.
    stamp: AtomicU64,
    /// One past the highest lap whose writer gave this slot up.
    abandoned: AtomicU64,
    data: UnsafeCell<SlotData<BYTES>>,
}

impl<const BYTES: usize> Slot<BYTES> {
    const fn new() -> Self {
        Self {
            stamp: AtomicU64::new(stamp(0, EMPTY)),
            abandoned: AtomicU64::new(0),
            data: UnsafeCell::new(SlotData {
                len: 0,
                truncated: false,
                bytes: [0; BYTES],
            }),
        }
    }
}

/// The ring: `SLOTS` messages of at most `SLOT_BYTES` bytes each.
pub struct LogRing<const SLOTS: usize, const SLOT_BYTES: usize> {
    slots: [Slot<SLOT_BYTES>; SLOTS],
    /// Next sequence number to hand to a writer.
    head: AtomicU64,
    /// Next sequence number to drain; written only by the flag holder.
    tail: AtomicU64,
    /// Held by the one context currently draining.
    draining: AtomicBool,
    /// Messages skipped by the drainer, in total.
    dropped: AtomicU64,
}

// SAFETY: the only non-`Sync` parts are the slots' `UnsafeCell`s. Their
// contents are accessed (1) by the writer that moved the slot's stamp from
// `Empty(lap)` to `Writing(lap)`, until it stores `Ready(lap)`: the
// compare-exchange admits one writer per lap, and the drainer does not read
// a slot before it is `Ready`; (2) by the single holder of `draining` while
// the stamp is `Ready(lap)`, until it stores `Empty(lap + 1)`: writers only
// claim `Empty` slots. The Release stores and Acquire loads/exchanges of the
// stamp order each owner's accesses before the next owner's.
unsafe impl<const SLOTS: usize, const SLOT_BYTES: usize> Sync for LogRing<SLOTS, SLOT_BYTES> {}

impl<const SLOTS: usize, const SLOT_BYTES: usize> fmt::Debug for LogRing<SLOTS, SLOT_BYTES> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogRing")
            .field("head", &self.head.load(Ordering::Relaxed))
            .field("tail", &self.tail.load(Ordering::Relaxed))
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<const SLOTS: usize, const SLOT_BYTES: usize> Default for LogRing<SLOTS, SLOT_BYTES> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const SLOTS: usize, const SLOT_BYTES: usize> LogRing<SLOTS, SLOT_BYTES> {
    /// An empty ring, usable in a `static`.
    pub const fn new() -> Self {
        const {
            assert!(
                SLOTS > 0 && SLOT_BYTES > 0,
                "a log ring needs slots and bytes"
            )
        };
        Self {
            slots: [const { Slot::new() }; SLOTS],
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        }
    }

    /// Writes one message (truncated to `SLOT_BYTES`). Returns `false` if it
    /// was dropped because the ring is full. Never blocks.
    pub fn write(&self, bytes: &[u8]) -> bool {
        match self.reserve() {
            Some(mut reservation) => {
                reservation.push(bytes);
                reservation.publish();
                true
            }
            None => false,
        }
    }

    /// Formats one message straight into a slot; see [`LogRing::write`].
    pub fn write_fmt(&self, args: fmt::Arguments<'_>) -> bool {
        match self.reserve() {
            Some(mut reservation) => {
                // A `Reservation` never fails a write: it truncates instead.
                let _ = fmt::Write::write_fmt(&mut reservation, args);
                reservation.publish();
                true
            }
            None => false,
        }
    }

    /// Claims the next slot for a message that is filled in through the
    /// returned [`Reservation`] and published when it is dropped (or by
    /// [`Reservation::publish`]). Until then the drainer stops at this
    /// message. `None` if the ring is full (the message counts as dropped).
    pub fn reserve(&self) -> Option<Reservation<'_, SLOT_BYTES>> {
        self.claim(self.head.fetch_add(1, Ordering::Relaxed))
    }

    /// Claims the slot of `seq`, a sequence number just taken from `head`.
    fn claim(&self, seq: u64) -> Option<Reservation<'_, SLOT_BYTES>> {
        let (slot, lap) = self.slot(seq);
        // Acquire: the drainer's reads of the slot's previous message
        // happen before our writes.
        if slot
            .stamp
            .compare_exchange(
                stamp(lap, EMPTY),
                stamp(lap, WRITING),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_err()
        {
            slot.abandoned.fetch_max(lap + 1, Ordering::Release);
            return None;
        }
        let mut reservation = Reservation {
            stamp: &slot.stamp,
            lap,
            data: slot.data.get(),
            _slot: PhantomData,
        };
        let data = reservation.data_mut();
        data.len = 0;
        data.truncated = false;
        Some(reservation)
    }

    /// Emits published messages, in order, to `sink`, unless another context
    /// is draining already (then it returns at once: that one will emit
    /// them). Returns the number of messages this call emitted.
    ///
    /// `sink` runs with the drain flag held: messages it logs go into the
    /// ring and are emitted by the same drain.
    pub fn drain<F: FnMut(Record<'_>)>(&self, mut sink: F) -> usize {
        let mut emitted = 0;
        loop {
            // Pairs with the fence after releasing the flag below: either we
            // win the flag, or the releasing drainer sees our message.
            fence(Ordering::SeqCst);
            if self
                .draining
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                return emitted;
            }
            emitted += self.drain_locked(&mut sink);
            self.draining.store(false, Ordering::Release);
            fence(Ordering::SeqCst);
            if !self.next_is_ready() {
                return emitted;
            }
        }
    }

    /// Total number of messages dropped so far (as seen by the drainer).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sequence numbers handed out but not yet drained (includes messages
    /// being written and dropped ones the drainer has not reached).
    pub fn pending(&self) -> u64 {
        let head = self.head.load(Ordering::Relaxed);
        head.saturating_sub(self.tail.load(Ordering::Relaxed))
    }

    fn slot(&self, seq: u64) -> (&Slot<SLOT_BYTES>, u64) {
        // `usize` is 64-bit on every target of this crate; the remainder is
        // below `SLOTS` anyway.
        let index = (seq % SLOTS as u64) as usize;
        (&self.slots[index], seq / SLOTS as u64)
    }

    /// Whether the drainer could make progress at `tail`.
    fn next_is_ready(&self) -> bool {
        let (slot, lap) = self.slot(self.tail.load(Ordering::Acquire));
        let stamp_now = slot.stamp.load(Ordering::Acquire);
        stamp_now == stamp(lap, READY)
            || (stamp_now == stamp(lap, EMPTY) && slot.abandoned.load(Ordering::Acquire) > lap)
    }

    /// The drain loop proper; the caller holds `draining`.
    fn drain_locked<F: FnMut(Record<'_>)>(&self, sink: &mut F) -> usize {
        let mut emitted = 0;
        let mut skipped = 0;
        loop {
            let seq = self.tail.load(Ordering::Relaxed);
            let (slot, lap) = self.slot(seq);
            let stamp_now = slot.stamp.load(Ordering::Acquire);
            if stamp_now == stamp(lap, READY) {
                if skipped > 0 {
                    sink(Record::Dropped(skipped));
                    skipped = 0;
                }
                {
                    // SAFETY: the stamp is `Ready(lap)` (loaded with Acquire,
                    // so the writer's accesses happened before), and we hold
                    // `draining`: by the protocol (see the `Sync` impl) we
                    // own the data until we store `Empty(lap + 1)` below,
                    // after this reference's last use.
                    let data = unsafe { &*slot.data.get() };
                    sink(Record::Message {
                        seq,
                        bytes: &data.bytes[..data.len],
                        truncated: data.truncated,
                    });
                }
                emitted += 1;
                slot.stamp.store(stamp(lap + 1, EMPTY), Ordering::Release);
            } else if stamp_now == stamp(lap, EMPTY) && slot.abandoned.load(Ordering::Acquire) > lap
            {
                // Give the sequence up; a writer that claims it first wins
                // and we look at the slot again.
                if slot
                    .stamp
                    .compare_exchange(
                        stamp(lap, EMPTY),
                        stamp(lap + 1, EMPTY),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_err()
                {
                    continue;
                }
                skipped += 1;
                self.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                break;
            }
            self.tail.store(seq + 1, Ordering::Release);
        }
        if skipped > 0 {
            sink(Record::Dropped(skipped));
        }
        emitted
    }
}

/// A claimed slot being filled; publishes the message when dropped.
///
/// Holds a raw pointer rather than a `&mut` to the data, so that no
/// reference to it outlives the publishing store in `drop`.
pub struct Reservation<'a, const SLOT_BYTES: usize> {
    stamp: &'a AtomicU64,
    lap: u64,
    data: *mut SlotData<SLOT_BYTES>,
    _slot: PhantomData<&'a mut SlotData<SLOT_BYTES>>,
}

impl<const SLOT_BYTES: usize> fmt::Debug for Reservation<'_, SLOT_BYTES> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("lap", &self.lap)
            .finish_non_exhaustive()
    }
}

impl<const SLOT_BYTES: usize> Reservation<'_, SLOT_BYTES> {
    /// Appends bytes, truncating (and flagging it) when the slot is full.
    pub fn push(&mut self, bytes: &[u8]) {
        let data = self.data_mut();
        let room = SLOT_BYTES - data.len;
        let n = bytes.len().min(room);
        data.bytes[data.len..data.len + n].copy_from_slice(&bytes[..n]);
        data.len += n;
        if n < bytes.len() {
            data.truncated = true;
        }
    }

    /// The slot's data, borrowed from the reservation.
    fn data_mut(&mut self) -> &mut SlotData<SLOT_BYTES> {
        // SAFETY: `data` points into a slot of a ring that outlives `'a`. A
        // `Reservation` exists only after its compare-exchange moved the
        // slot's stamp to `Writing(lap)`, and the stamp leaves that state
        // only through `drop` below: until then, by the protocol (see the
        // `Sync` impl of `LogRing`), only this reservation accesses the data,
        // and the `&mut self` borrow keeps this reference unique within it.
        unsafe { &mut *self.data }
    }

    /// Publishes the message (same as dropping the reservation).
    pub fn publish(self) {}
}

impl<const SLOT_BYTES: usize> fmt::Write for Reservation<'_, SLOT_BYTES> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

impl<const SLOT_BYTES: usize> Drop for Reservation<'_, SLOT_BYTES> {
    fn drop(&mut self) {
        // Release: our writes to the data happen before the drainer reads it.
        self.stamp.store(stamp(self.lap, READY), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    use std::vec::Vec;

    /// What a sink saw: messages (seq, bytes, truncated) and drop reports.
    #[derive(Default)]
    struct Seen {
        messages: Vec<(u64, Vec<u8>, bool)>,
        dropped: u64,
    }

    impl Seen {
        fn sink(&mut self) -> impl FnMut(Record<'_>) + '_ {
            |record| match record {
                Record::Message {
                    seq,
                    bytes,
                    truncated,
                } => self.messages.push((seq, bytes.to_vec(), truncated)),
                Record::Dropped(n) => self.dropped += n,
            }
        }

        fn texts(&self) -> Vec<&[u8]> {
            self.messages.iter().map(|(_, b, _)| b.as_slice()).collect()
        }
    }

    #[test]
    fn single_thread_order() {
        let ring: LogRing<8, 32> = LogRing::new();
        let mut seen = Seen::default();
        for i in 0..20u32 {
            assert!(ring.write_fmt(format_args!("message {i}")));
            if i % 3 == 0 {
                ring.drain(seen.sink());
            }
        }
        assert_eq!(ring.pending(), 1);
        ring.drain(seen.sink());
        assert_eq!(ring.pending(), 0);
        let expected: Vec<Vec<u8>> = (0..20)
            .map(|i| format!("message {i}").into_bytes())
            .collect();
        assert_eq!(
            seen.texts(),
            expected.iter().map(Vec::as_slice).collect::<Vec<_>>()
        );
        let seqs: Vec<u64> = seen.messages.iter().map(|m| m.0).collect();
        assert_eq!(seqs, (0..20).collect::<Vec<_>>());
        assert_eq!(seen.dropped, 0);
        assert_eq!(ring.dropped(), 0);
    }

    #[test]
    fn long_messages_are_truncated_and_flagged() {
        let ring: LogRing<4, 8> = LogRing::new();
        assert!(ring.write(b"12345678"));
        assert!(ring.write(b"123456789abc"));
        assert!(ring.write_fmt(format_args!("{}-{}", "abcdef", 12345)));
        let mut reservation = ring.reserve().unwrap();
        reservation.push(b"ab");
        reservation.push(b"cdefghij");
        reservation.publish();
        let mut seen = Seen::default();
        assert_eq!(ring.drain(seen.sink()), 4);
        assert_eq!(
            seen.messages,
            [
                (0, b"12345678".to_vec(), false),
                (1, b"12345678".to_vec(), true),
                (2, b"abcdef-1".to_vec(), true),
                (3, b"abcdefgh".to_vec(), true),
            ]
        );
        // Slots are reset for the next lap.
        assert!(ring.write(b"x"));
        let mut seen = Seen::default();
        ring.drain(seen.sink());
        assert_eq!(seen.messages, [(4, b"x".to_vec(), false)]);
    }

    #[test]
    fn overflow_is_counted_and_reported() {
        let ring: LogRing<4, 16> = LogRing::new();
        let accepted: Vec<bool> = (0..10)
            .map(|i| ring.write_fmt(format_args!("m{i}")))
            .collect();
        assert_eq!(
            accepted,
            [
                true, true, true, true, false, false, false, false, false, false
            ]
        );
        let mut seen = Seen::default();
        assert_eq!(ring.drain(seen.sink()), 4);
        assert_eq!(seen.texts(), [b"m0", b"m1", b"m2", b"m3"]);
        assert_eq!(seen.dropped, 6);
        assert_eq!(ring.dropped(), 6);
        // The ring works normally afterwards, and the drop report comes
        // between the messages it separates.
        assert!(ring.write(b"after"));
        let mut records = Vec::new();
        ring.drain(|r| {
            records.push(match r {
                Record::Message { bytes, .. } => bytes.to_vec(),
                Record::Dropped(n) => format!("dropped {n}").into_bytes(),
            })
        });
        assert_eq!(records, [b"after".to_vec()]);
        for i in 0..6 {
            ring.write_fmt(format_args!("n{i}"));
        }
        let mut records = Vec::new();
        ring.drain(|r| {
            records.push(match r {
                Record::Message { bytes, .. } => bytes.to_vec(),
                Record::Dropped(n) => format!("dropped {n}").into_bytes(),
            })
        });
        let records: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        assert_eq!(records, [&b"n0"[..], b"n1", b"n2", b"n3", b"dropped 2"]);
        assert_eq!(ring.dropped(), 8);
    }

    #[test]
    fn interrupted_writer_does_not_block_and_is_emitted_later() {
        let ring: LogRing<8, 16> = LogRing::new();
        assert!(ring.write(b"before"));
        // A writer is interrupted after reserving its slot...
        let mut interrupted = ring.reserve().unwrap();
        interrupted.push(b"inter");
        // ...by a context (an NMI) that logs and drains: it gets what it can
        // without waiting.
        assert!(ring.write(b"nmi 1"));
        assert!(ring.write(b"nmi 2"));
        let mut seen = Seen::default();
        assert_eq!(ring.drain(seen.sink()), 1);
        assert_eq!(seen.texts(), [b"before"]);
        assert_eq!(ring.drain(seen.sink()), 0);
        // The interrupted writer resumes and publishes: everything follows,
        // in sequence order.
        interrupted.push(b"rupted");
        drop(interrupted);
        assert_eq!(ring.drain(seen.sink()), 3);
        assert_eq!(
            seen.texts(),
            [&b"before"[..], b"interrupted", b"nmi 1", b"nmi 2"]
        );
    }

    #[test]
    fn interrupted_writer_while_the_ring_fills() {
        let ring: LogRing<4, 16> = LogRing::new();
        let stuck = ring.reserve().unwrap();
        let accepted: Vec<bool> = (0..6)
            .map(|i| ring.write_fmt(format_args!("m{i}")))
            .collect();
        assert_eq!(accepted, [true, true, true, false, false, false]);
        let mut seen = Seen::default();
        assert_eq!(ring.drain(seen.sink()), 0);
        drop(stuck);
        assert_eq!(ring.drain(seen.sink()), 4);
        assert_eq!(seen.texts(), [&b""[..], b"m0", b"m1", b"m2"]);
        assert_eq!(seen.dropped, 3);
    }

    #[test]
    fn a_sequence_given_up_by_the_drainer_cannot_be_claimed_late() {
        let ring: LogRing<2, 8> = LogRing::new();
        // A writer takes seq 0 and is interrupted before claiming its slot.
        let late = ring.head.fetch_add(1, Ordering::Relaxed);
        assert!(ring.write(b"b")); // seq 1
        assert!(!ring.write(b"c")); // seq 2: slot 0 is still waiting for seq 0
        let mut seen = Seen::default();
        ring.drain(seen.sink());
        // The drainer knows seq 0's slot was given up by a later lap, skips
        // seq 0 and seq 2, and emits seq 1.
        assert_eq!(seen.texts(), [b"b"]);
        assert_eq!(seen.dropped, 2);
        // The late writer resumes: its claim fails, it must not write into
        // the slot the drainer has moved on from.
        assert!(ring.claim(late).is_none());
        assert!(ring.write(b"d"));
        ring.drain(seen.sink());
        assert_eq!(seen.texts(), [b"b", b"d"]);
        assert_eq!(ring.dropped(), 2);
    }

    #[test]
    fn drain_is_exclusive_and_sink_may_log() {
        let ring: LogRing<8, 16> = LogRing::new();
        ring.write(b"one");
        let mut seen = Vec::new();
        let mut inner_results = Vec::new();
        ring.drain(|record| {
            if let Record::Message { bytes, .. } = record {
                seen.push(bytes.to_vec());
                if bytes == b"one" {
                    // Like an NMI arriving during the drain: its drain
                    // attempt returns at once, its message is emitted by the
                    // drain in progress.
                    assert!(ring.write(b"two"));
                    inner_results.push(ring.drain(|_| panic!("second drainer ran")));
                }
            }
        });
        assert_eq!(seen, [b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(inner_results, [0]);
    }

    #[test]
    fn usable_from_a_static() {
        static RING: LogRing<4, 32> = LogRing::new();
        assert!(RING.write(b"static"));
        let mut seen = Seen::default();
        RING.drain(seen.sink());
        assert_eq!(seen.texts(), [b"static"]);
    }

    /// Message body: producer, index and a filler derived from both, so a
    /// torn or mixed-up copy is detected.
    fn body(producer: usize, n: usize) -> Vec<u8> {
        let mut text = format!("p{producer} n{n} ").into_bytes();
        let fill = (producer * 31 + n * 7) % 40;
        text.extend((0..fill).map(|i| b'a' + ((producer + n + i) % 26) as u8));
        text
    }

    fn check_body(bytes: &[u8]) -> (usize, usize) {
        let text = std::str::from_utf8(bytes).expect("utf-8");
        let mut parts = text.split(' ');
        let producer: usize = parts.next().unwrap()[1..].parse().unwrap();
        let n: usize = parts.next().unwrap()[1..].parse().unwrap();
        assert_eq!(bytes, body(producer, n).as_slice(), "corrupted message");
        (producer, n)
    }

    /// Producers on threads, each draining after its writes, plus a
    /// dedicated drainer; returns (emitted messages, failed writes, drops
    /// reported to the sink).
    fn run_threads<const SLOTS: usize>(
        producers: usize,
        per_producer: usize,
        retry: bool,
    ) -> (Vec<(u64, Vec<u8>)>, usize, u64, u64) {
        let ring: LogRing<SLOTS, 64> = LogRing::new();
        let out = Mutex::new((Vec::new(), 0u64));
        let failures = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let sink = |record: Record<'_>| {
            let mut out = out.try_lock().expect("two drainers at once");
            match record {
                Record::Message {
                    seq,
                    bytes,
                    truncated,
                } => {
                    assert!(!truncated);
                    out.0.push((seq, bytes.to_vec()));
                }
                Record::Dropped(n) => out.1 += n,
            }
        };
        std::thread::scope(|s| {
            for p in 0..producers {
                let (ring, failures, done, sink) = (&ring, &failures, &done, &sink);
                s.spawn(move || {
                    for n in 0..per_producer {
                        let message = body(p, n);
                        while !ring.write(&message) {
                            failures.fetch_add(1, Ordering::Relaxed);
                            if !retry {
                                break;
                            }
                            std::thread::yield_now();
                        }
                        if n % 4 == p % 4 {
                            ring.drain(sink);
                        }
                    }
                    done.fetch_add(1, Ordering::Release);
                });
            }
            s.spawn(|| {
                while done.load(Ordering::Acquire) < producers {
                    ring.drain(&sink);
                    std::hint::spin_loop();
                }
            });
        });
        ring.drain(&sink);
        assert_eq!(ring.pending(), 0);
        let (messages, reported) = out.into_inner().unwrap();
        (messages, failures.into_inner(), reported, ring.dropped())
    }

    fn check_order(messages: &[(u64, Vec<u8>)]) -> HashMap<usize, Vec<usize>> {
        let mut per_producer: HashMap<usize, Vec<usize>> = HashMap::new();
        for w in messages.windows(2) {
            assert!(w[0].0 < w[1].0, "sequence numbers must increase");
        }
        for (_, bytes) in messages {
            let (p, n) = check_body(bytes);
            per_producer.entry(p).or_default().push(n);
        }
        for list in per_producer.values() {
            for w in list.windows(2) {
                assert!(w[0] < w[1], "per-producer order broken or duplicate");
            }
        }
        per_producer
    }

    #[test]
    fn threads_with_retries_every_message_exactly_once() {
        let (producers, per_producer) = (4, 20_000);
        let (messages, failures, reported, dropped) =
            run_threads::<64>(producers, per_producer, true);
        let per_producer_seen = check_order(&messages);
        for p in 0..producers {
            assert_eq!(
                per_producer_seen[&p],
                (0..per_producer).collect::<Vec<_>>(),
                "producer {p}"
            );
        }
        // Every failed attempt is one sequence given up and reported.
        assert_eq!(dropped, failures as u64);
        assert_eq!(reported, dropped);
    }

    #[test]
    fn threads_without_retries_lose_only_what_they_were_told() {
        let (producers, per_producer) = (4, 20_000);
        let (messages, failures, reported, dropped) =
            run_threads::<8>(producers, per_producer, false);
        check_order(&messages);
        assert_eq!(messages.len() + failures, producers * per_producer);
        assert_eq!(dropped, failures as u64);
        assert_eq!(reported, dropped);
    }
}
