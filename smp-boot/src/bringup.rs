//! Parallel AP bring-up: kick every AP at once, wait a bounded time, and
//! name the ones that never checked in.
//!
//! The boot CPU and each AP share one [`CpuSlot`]. Its state moves
//! `Offline -> Starting` (boot CPU, before the INIT), then either
//! `Starting -> Online` (the AP checks in) or `Starting -> Failed` (the boot
//! CPU gives up at the deadline). Both moves out of `Starting` are
//! compare-and-swaps, so an AP that arrives after the deadline learns it is
//! too late and parks itself instead of joining half-way.

use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

/// Where a CPU stands in bring-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CpuState {
    /// Not started (or never to be started: beyond `max_cpus`).
    Offline = 0,
    /// INIT/SIPI sent; not checked in yet.
    Starting = 1,
    /// Checked in: runs the hypervisor.
    Online = 2,
    /// Missed the deadline; excluded from everything after bring-up.
    Failed = 3,
}

impl CpuState {
    fn from_raw(raw: u8) -> Self {
        match raw {
            1 => Self::Starting,
            2 => Self::Online,
            3 => Self::Failed,
            _ => Self::Offline,
        }
    }
}

/// The part of a CPU's bring-up state that the boot CPU and the AP share.
#[derive(Debug)]
pub struct CpuSlot {
    apic_id: AtomicU32,
    state: AtomicU8,
    online_at_us: AtomicU64,
}

impl CpuSlot {
    /// An offline slot, usable in a `static` array.
    pub const fn new() -> Self {
        Self {
            // The APIC ID plus one (0: not assigned yet), so that a static
            // array of slots starts all zero and lands in .bss.
            apic_id: AtomicU32::new(0),
            state: AtomicU8::new(CpuState::Offline as u8),
            online_at_us: AtomicU64::new(0),
        }
    }

    /// Gives the slot its CPU. Done at boot, before any AP runs.
    pub fn assign(&self, apic_id: u32) {
        self.apic_id
            .store(apic_id.wrapping_add(1), Ordering::Relaxed);
    }

    /// The APIC ID of the slot's CPU.
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Relaxed).wrapping_sub(1)
    }

    /// The slot's current state.
    pub fn state(&self) -> CpuState {
        CpuState::from_raw(self.state.load(Ordering::Acquire))
    }

    /// Marks the boot CPU online without starting it.
    pub fn mark_boot_cpu_online(&self, now_us: u64) {
        self.online_at_us.store(now_us, Ordering::Relaxed);
        self.state.store(CpuState::Online as u8, Ordering::Release);
    }

    /// Called by the AP itself once its per-CPU setup is complete. `Err`
    /// means the boot CPU already gave up on it: the AP must park.
    pub fn check_in(&self, now_us: u64) -> Result<(), TooLate> {
        self.online_at_us.store(now_us, Ordering::Relaxed);
        self.state
            .compare_exchange(
                CpuState::Starting as u8,
                CpuState::Online as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .map(|_| ())
            .map_err(|_| TooLate)
    }

    /// When the CPU checked in (the clock of [`Clock`]).
    pub fn online_at_us(&self) -> u64 {
        self.online_at_us.load(Ordering::Relaxed)
    }
}

impl Default for CpuSlot {
    fn default() -> Self {
        Self::new()
    }
}

/// An AP checked in after the boot CPU marked it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLate;

/// Sends the startup IPIs (the local APIC, or a fake in tests).
pub trait StartupIpi {
    /// INIT to one CPU.
    fn send_init(&mut self, apic_id: u32);
    /// Startup IPI to one CPU: it starts in real mode at `page_number << 12`.
    fn send_startup(&mut self, apic_id: u32, page_number: u8);
}

/// Microsecond time for the bring-up (the TSC, or a fake in tests).
pub trait Clock {
    /// Microseconds since an arbitrary origin.
    fn now_us(&mut self) -> u64;

    /// Waits at least `us` microseconds.
    fn delay_us(&mut self, us: u64) {
        let end = self.now_us().saturating_add(us);
        while self.now_us() < end {
            core::hint::spin_loop();
        }
    }
}

/// Timing of the startup sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Wait after the INITs. The SDM's 10 ms is for CPUs older than
    /// Nehalem-era parts; modern CPUs (and emulators) need none.
    pub init_delay_us: u64,
    /// Wait between the two startup IPIs. The second one is sent only to
    /// APs that have not checked in yet; a SIPI to a running CPU is ignored.
    pub sipi_delay_us: u64,
    /// How long the boot CPU waits for all APs before naming stragglers.
    pub timeout_us: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            init_delay_us: 0,
            sipi_delay_us: 200,
            timeout_us: 1_000_000,
        }
    }
}

/// What [`start_all`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// APs that checked in.
    pub online: usize,
    /// APs marked failed.
    pub failed: usize,
    /// First INIT to the last AP's check-in (0 when no AP came up).
    pub elapsed_us: u64,
}

/// Starts every slot in `aps` at once and waits for them.
///
/// The slots must be `Offline` with their APIC IDs assigned. Each AP slot
/// ends `Online` or `Failed`; [`Outcome`] counts them.
pub fn start_all<'a, I>(
    aps: I,
    page_number: u8,
    config: &Config,
    ipi: &mut impl StartupIpi,
    clock: &mut impl Clock,
) -> Outcome
where
    I: IntoIterator<Item = &'a CpuSlot>,
    I::IntoIter: Clone,
{
    let aps = aps.into_iter();
    for slot in aps.clone() {
        slot.state
            .store(CpuState::Starting as u8, Ordering::Release);
    }
    let started_at = clock.now_us();
    for slot in aps.clone() {
        ipi.send_init(slot.apic_id());
    }
    if config.init_delay_us > 0 {
        clock.delay_us(config.init_delay_us);
    }
    for slot in aps.clone() {
        ipi.send_startup(slot.apic_id(), page_number);
    }
    clock.delay_us(config.sipi_delay_us);
    for slot in aps
        .clone()
        .filter(|slot| slot.state() == CpuState::Starting)
    {
        ipi.send_startup(slot.apic_id(), page_number);
    }

    let deadline = started_at.saturating_add(config.timeout_us);
    while aps.clone().any(|slot| slot.state() == CpuState::Starting) && clock.now_us() < deadline {
        core::hint::spin_loop();
    }

    let mut outcome = Outcome {
        online: 0,
        failed: 0,
        elapsed_us: 0,
    };
    for slot in aps {
        // An AP may check in between the last look and this swap: the swap
        // decides, and the AP sees the same answer from its own swap.
        let verdict = slot.state.compare_exchange(
            CpuState::Starting as u8,
            CpuState::Failed as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        match verdict {
            Ok(_) => outcome.failed += 1,
            Err(_) => {
                outcome.online += 1;
                outcome.elapsed_us = outcome
                    .elapsed_us
                    .max(slot.online_at_us().saturating_sub(started_at));
            }
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// A fake machine: APs that check in a given time after their first
    /// SIPI (or never), and a clock that advances a microsecond per read.
    struct FakeMachine<'a> {
        slots: &'a [CpuSlot],
        now: u64,
        /// APIC ID -> microseconds from SIPI to check-in (None: hangs).
        boot_time: BTreeMap<u32, Option<u64>>,
        sipi_at: RefCell<BTreeMap<u32, u64>>,
        log: Vec<(char, u32)>,
    }

    impl<'a> FakeMachine<'a> {
        fn new(slots: &'a [CpuSlot], boot_time: &[(u32, Option<u64>)]) -> Self {
            Self {
                slots,
                now: 1000,
                boot_time: boot_time.iter().copied().collect(),
                sipi_at: RefCell::default(),
                log: Vec::new(),
            }
        }

        fn run_aps(&self) {
            for slot in self.slots {
                let Some(&sipi) = self.sipi_at.borrow().get(&slot.apic_id()) else {
                    continue;
                };
                if let Some(Some(delay)) = self.boot_time.get(&slot.apic_id())
                    && self.now >= sipi + delay
                    && slot.online_at_us() == 0
                {
                    let _ = slot.check_in(self.now);
                }
            }
        }
    }

    impl StartupIpi for FakeMachine<'_> {
        fn send_init(&mut self, apic_id: u32) {
            self.log.push(('I', apic_id));
        }
        fn send_startup(&mut self, apic_id: u32, page_number: u8) {
            assert_eq!(page_number, 8);
            self.log.push(('S', apic_id));
            self.sipi_at.borrow_mut().entry(apic_id).or_insert(self.now);
        }
    }

    struct Clocked<'m, 'a>(&'m RefCell<FakeMachine<'a>>);

    impl Clock for Clocked<'_, '_> {
        fn now_us(&mut self) -> u64 {
            let mut machine = self.0.borrow_mut();
            machine.now += 1;
            machine.run_aps();
            machine.now
        }
    }

    struct Ipi<'m, 'a>(&'m RefCell<FakeMachine<'a>>);

    impl StartupIpi for Ipi<'_, '_> {
        fn send_init(&mut self, apic_id: u32) {
            self.0.borrow_mut().send_init(apic_id);
        }
        fn send_startup(&mut self, apic_id: u32, page_number: u8) {
            self.0.borrow_mut().send_startup(apic_id, page_number);
        }
    }

    fn slots(ids: &[u32]) -> Vec<CpuSlot> {
        ids.iter()
            .map(|&id| {
                let slot = CpuSlot::new();
                slot.assign(id);
                slot
            })
            .collect()
    }

    fn run(
        ids: &[u32],
        boot: &[(u32, Option<u64>)],
        config: Config,
    ) -> (Vec<CpuSlot>, Outcome, Vec<(char, u32)>) {
        let aps = slots(ids);
        let outcome;
        let log;
        {
            let machine = RefCell::new(FakeMachine::new(&aps, boot));
            outcome = start_all(&aps, 8, &config, &mut Ipi(&machine), &mut Clocked(&machine));
            log = machine.into_inner().log;
        }
        (aps, outcome, log)
    }

    #[test]
    fn all_aps_get_init_before_any_sipi_and_all_come_online() {
        let ids = [1, 2, 5, 300];
        let boot: Vec<_> = ids.iter().map(|&id| (id, Some(50))).collect();
        let (aps, outcome, log) = run(&ids, &boot, Config::default());
        assert_eq!(
            outcome,
            Outcome {
                online: 4,
                failed: 0,
                elapsed_us: outcome.elapsed_us
            }
        );
        assert!(aps.iter().all(|slot| slot.state() == CpuState::Online));
        let first_sipi = log.iter().position(|entry| entry.0 == 'S').unwrap();
        assert!(log[..first_sipi].iter().all(|entry| entry.0 == 'I'));
        assert_eq!(first_sipi, 4, "one INIT per AP, all before the SIPIs");
        assert!(outcome.elapsed_us >= 50);
    }

    #[test]
    fn second_sipi_only_goes_to_aps_still_starting() {
        // AP 1 is up before the second round; AP 2 needs it.
        let config = Config {
            init_delay_us: 0,
            sipi_delay_us: 100,
            timeout_us: 10_000,
        };
        let (_, outcome, log) = run(&[1, 2], &[(1, Some(10)), (2, Some(500))], config);
        assert_eq!(outcome.online, 2);
        let sipis: Vec<u32> = log
            .iter()
            .filter(|entry| entry.0 == 'S')
            .map(|entry| entry.1)
            .collect();
        assert_eq!(sipis, vec![1, 2, 2]);
    }

    #[test]
    fn a_hung_ap_is_marked_failed_and_the_rest_come_up() {
        let config = Config {
            init_delay_us: 0,
            sipi_delay_us: 10,
            timeout_us: 2_000,
        };
        let (aps, outcome, _) = run(
            &[1, 2, 3],
            &[(1, Some(20)), (2, None), (3, Some(30))],
            config,
        );
        assert_eq!(outcome.online, 2);
        assert_eq!(outcome.failed, 1);
        assert_eq!(aps[1].state(), CpuState::Failed);
        assert_eq!(aps[0].state(), CpuState::Online);
        assert_eq!(aps[2].state(), CpuState::Online);
    }

    #[test]
    fn an_ap_arriving_after_the_deadline_is_told_it_is_too_late() {
        let config = Config {
            init_delay_us: 0,
            sipi_delay_us: 10,
            timeout_us: 100,
        };
        let (aps, outcome, _) = run(&[7], &[(7, None)], config);
        assert_eq!(outcome.failed, 1);
        assert_eq!(aps[0].check_in(5_000), Err(TooLate));
        assert_eq!(aps[0].state(), CpuState::Failed);
    }

    #[test]
    fn the_wait_is_bounded_even_when_no_ap_answers() {
        let config = Config {
            init_delay_us: 10_000,
            sipi_delay_us: 200,
            timeout_us: 50_000,
        };
        let ids: Vec<u32> = (1..64).collect();
        let (aps, outcome, _) = run(&ids, &[], config);
        assert_eq!(
            outcome,
            Outcome {
                online: 0,
                failed: 63,
                elapsed_us: 0
            }
        );
        assert!(aps.iter().all(|slot| slot.state() == CpuState::Failed));
    }

    #[test]
    fn init_delay_is_honoured_before_the_first_sipi() {
        let config = Config {
            init_delay_us: 10_000,
            sipi_delay_us: 10,
            timeout_us: 100_000,
        };
        let aps = slots(&[1]);
        let machine = RefCell::new(FakeMachine::new(&aps, &[(1, Some(5))]));
        let outcome = start_all(&aps, 8, &config, &mut Ipi(&machine), &mut Clocked(&machine));
        assert_eq!(outcome.online, 1);
        let sipi_at = machine.borrow().sipi_at.borrow()[&1];
        assert!(sipi_at >= 1000 + 10_000, "SIPI at {sipi_at}");
    }

    #[test]
    fn boot_cpu_slot_is_online_without_ipis() {
        let slot = CpuSlot::new();
        slot.assign(0);
        slot.mark_boot_cpu_online(3);
        assert_eq!(slot.state(), CpuState::Online);
        assert_eq!(slot.check_in(4), Err(TooLate));
    }
}
