//! The lockup detector: every online CPU's local APIC timer ticks
//! ([`TICK_MS`]); each tick records the CPU's heartbeat and looks at the
//! others'. A CPU whose heartbeat is older than the threshold
//! (`watchdog=SECONDS`) spins with interrupts off, or waits on a lock with
//! them off: the CPU that notices hands it to the layer above (the crash
//! path, registered with [`set_lockup_handler`]), whose shootdown NMI then
//! records the stuck CPU's registers at its hang site.
//!
//! A machine where every CPU hangs at once has nobody left to notice: that
//! is what the platform's NMI button is for (`nmi=dump`).

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use smp_boot::bringup::CpuState;
use smp_boot::madt::MAX_CPUS;

use super::{percpu, smp, time};
use crate::arch::idt::TrapFrame;
use crate::arch::{apic, cpu};

/// The timer's vector.
pub const TICK_VECTOR: u8 = 0xEF;
/// How often each CPU ticks.
pub const TICK_MS: u64 = 100;

/// Each CPU's last tick, in TSC microseconds (0: not ticking yet).
static HEARTBEATS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The threshold in microseconds (0: off).
static THRESHOLD_US: AtomicU64 = AtomicU64::new(0);
/// APIC timer ticks per [`TICK_MS`], measured once on the boot CPU.
static TIMER_COUNT: AtomicU32 = AtomicU32::new(0);
/// Set once a lockup was handed over: one report, not one per tick.
static REPORTED: AtomicBool = AtomicBool::new(false);

/// What the layer above does about stuck CPUs: called once, in the timer
/// interrupt of the CPU that noticed, with the first stuck CPU's index,
/// how long it has been silent (µs) and the interrupted state.
pub type LockupHandler = fn(usize, u64, &TrapFrame);

static HANDLER: spin::Once<LockupHandler> = spin::Once::new();

/// Registers what a lockup starts (at boot, before [`start`]).
pub fn set_lockup_handler(handler: LockupHandler) {
    HANDLER.call_once(|| handler);
}

/// Measures the APIC timer against the TSC and arms the detector with a
/// threshold of `seconds` (boot CPU, interrupts on). `false` when the
/// timer does not count.
pub fn start(seconds: u64) -> bool {
    if seconds == 0 {
        return false;
    }
    const MEASURE_US: u64 = 10_000;
    apic::timer_start_one_shot(u32::MAX);
    let began = time::now_us();
    time::delay_us(MEASURE_US);
    let elapsed = time::now_us().saturating_sub(began).max(1);
    let counted = u64::from(u32::MAX - apic::timer_current());
    apic::timer_stop();
    let per_tick = counted.saturating_mul(TICK_MS * 1000) / elapsed;
    if per_tick == 0 {
        return false;
    }
    TIMER_COUNT.store(per_tick.min(u64::from(u32::MAX)) as u32, Ordering::Relaxed);
    THRESHOLD_US.store(seconds.saturating_mul(1_000_000), Ordering::Release);
    true
}

/// Starts ticking on the calling CPU (run on every CPU by IPI, once
/// [`start`] succeeded).
pub fn tick_here(_: usize) {
    let count = TIMER_COUNT.load(Ordering::Relaxed);
    if count == 0 {
        return;
    }
    let me = percpu::current_cpu_index() as usize;
    HEARTBEATS[me].store(time::now_us(), Ordering::Release);
    apic::timer_start_periodic(TICK_VECTOR, count);
}

/// The threshold in force (µs; 0: off).
pub fn threshold_us() -> u64 {
    THRESHOLD_US.load(Ordering::Relaxed)
}

/// How long CPU `index` has been silent, if it ticks at all.
pub fn silent_us(index: usize, now: u64) -> Option<u64> {
    let beat = HEARTBEATS.get(index)?.load(Ordering::Acquire);
    (beat != 0).then(|| now.saturating_sub(beat))
}

/// The timer's handler (registered for [`TICK_VECTOR`]).
pub fn on_tick(frame: &mut TrapFrame) {
    let me = percpu::current_cpu_index() as usize;
    let now = time::now_us();
    HEARTBEATS[me].store(now, Ordering::Release);
    apic::end_of_interrupt();
    let threshold = THRESHOLD_US.load(Ordering::Acquire);
    if threshold == 0 || REPORTED.load(Ordering::Relaxed) {
        return;
    }
    let stuck = smp::cpus()
        .iter()
        .enumerate()
        .filter(|(index, shared)| *index != me && shared.slot.state() == CpuState::Online)
        .find_map(|(index, _)| {
            silent_us(index, now)
                .filter(|&silent| silent > threshold)
                .map(|silent| (index, silent))
        });
    let Some((index, silent)) = stuck else {
        return;
    };
    if REPORTED.swap(true, Ordering::AcqRel) {
        return;
    }
    if let Some(handler) = HANDLER.get() {
        cpu::disable_interrupts();
        handler(index, silent, frame);
    }
}

/// The CPUs silent beyond the threshold at `now` (the report names them
/// all).
pub fn silent_cpus(now: u64) -> impl Iterator<Item = usize> {
    let threshold = threshold_us();
    (0..smp::cpus().len())
        .filter(move |&index| threshold > 0 && silent_us(index, now).is_some_and(|s| s > threshold))
}
