//! Host tests of the crash coordination, with fake CPUs: the election, the
//! per-CPU handler (order of steps, VMXOFF rules, nested crashes), and the
//! rendezvous (success, timeout, stragglers, late and double check-ins).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::mem::offset_of;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::fake::{AbortOnPanic, FakeVmx, Machine, stop_if_aborted};
use crate::loaded_vmcs::{NoHook, VmcsId, VmxError};

const CPUS: usize = 8;
type Coordinator = CrashCoordinator<CPUS>;
type Lists = VmcsArena<24, CPUS>;

// ---------------------------------------------------------------------------
// A fake CPU for the crash handler.
// ---------------------------------------------------------------------------

/// Something that happens to the CPU right after a named step of the
/// handler (a nested crash, or an observer).
type Interrupt = (&'static str, Box<dyn FnOnce()>);

/// The architectural state the handler changes, and a log of what it did.
struct CpuState {
    cr4_vmxe: bool,
    in_vmx_operation: bool,
    /// VMXOFF fails this way even in VMX operation (dual-monitor SMM).
    vmxoff_fails: Option<Fault>,
    apic_enabled: bool,
    log: Vec<&'static str>,
    /// Runs once, right after the step of that name: a nested crash.
    interrupt: Option<Interrupt>,
}

/// A handle on one fake CPU; clones share it, so a nested "NMI" can run the
/// handler again on the same CPU.
#[derive(Clone)]
struct FakeCpu {
    state: Rc<RefCell<CpuState>>,
    vmx: FakeVmx,
}

impl FakeCpu {
    /// A CPU in VMX operation (CR4.VMXE set, VMXON done).
    fn in_vmx(machine: &Arc<Mutex<Machine>>, cpu: usize) -> Self {
        Self {
            state: Rc::new(RefCell::new(CpuState {
                cr4_vmxe: true,
                in_vmx_operation: true,
                vmxoff_fails: None,
                apic_enabled: true,
                log: Vec::new(),
                interrupt: None,
            })),
            vmx: FakeVmx::on(machine, cpu),
        }
    }

    /// A CPU that never enabled VMX (QEMU TCG, or a crash during boot).
    fn without_vmx(machine: &Arc<Mutex<Machine>>, cpu: usize) -> Self {
        let fake = Self::in_vmx(machine, cpu);
        {
            let mut state = fake.state.borrow_mut();
            state.cr4_vmxe = false;
            state.in_vmx_operation = false;
        }
        fake
    }

    fn did(&self, step: &'static str) {
        let interrupt = {
            let mut state = self.state.borrow_mut();
            state.log.push(step);
            match &state.interrupt {
                Some((at, _)) if *at == step => state.interrupt.take(),
                _ => None,
            }
        };
        if let Some((_, nested)) = interrupt {
            nested();
        }
    }

    fn log(&self) -> Vec<&'static str> {
        self.state.borrow().log.clone()
    }
}

impl Vmx for FakeCpu {
    fn vmclear(&mut self, phys: u64) -> Result<(), VmxError> {
        let in_vmx = self.state.borrow().in_vmx_operation;
        let result = if in_vmx {
            self.vmx.vmclear(phys)
        } else {
            Err(VmxError::NotInVmxOperation)
        };
        self.did("vmclear");
        result
    }

    fn vmptrld(&mut self, phys: u64) -> Result<(), VmxError> {
        self.vmx.vmptrld(phys)
    }
}

impl CrashHardware for FakeCpu {
    fn cr4_vmxe(&mut self) -> bool {
        self.state.borrow().cr4_vmxe
    }

    fn vmxoff(&mut self) -> Result<(), Fault> {
        let result = {
            let mut state = self.state.borrow_mut();
            if !state.in_vmx_operation {
                Err(Fault::InvalidOpcode)
            } else if let Some(fault) = state.vmxoff_fails {
                Err(fault)
            } else {
                state.in_vmx_operation = false;
                Ok(())
            }
        };
        self.did("vmxoff");
        result
    }

    fn clear_cr4_vmxe(&mut self) -> Result<(), Fault> {
        let result = {
            let mut state = self.state.borrow_mut();
            if state.in_vmx_operation {
                Err(Fault::GeneralProtection)
            } else {
                state.cr4_vmxe = false;
                Ok(())
            }
        };
        self.did("clear-vmxe");
        result
    }

    fn disable_local_apic(&mut self) {
        self.state.borrow_mut().apic_enabled = false;
        self.did("apic-off");
    }
}

fn regs(tag: u64) -> CpuRegisters {
    CpuRegisters::from_array(std::array::from_fn(|i| tag << 8 | i as u64))
}

/// `count` VMCSes loaded on `cpu`.
fn load_vmcses(
    lists: &Lists,
    machine: &Arc<Mutex<Machine>>,
    cpu: usize,
    count: u64,
) -> Vec<VmcsId> {
    (0..count)
        .map(|n| {
            let id = lists
                .alloc(0x100_0000 + (cpu as u64 * 16 + n) * 0x1000)
                .unwrap();
            lists
                .load_here(cpu, id, &mut FakeVmx::on(machine, cpu), &mut NoHook)
                .unwrap();
            id
        })
        .collect()
}

/// A clock that advances `step_us` per read and, at given times, checks
/// CPUs in: a deterministic stand-in for other CPUs answering.
struct ScriptedClock<'a> {
    now: u64,
    step_us: u64,
    check_ins: Vec<(u64, usize)>,
    coordinator: &'a Coordinator,
    answers: Vec<(usize, CheckIn)>,
}

impl<'a> ScriptedClock<'a> {
    fn new(coordinator: &'a Coordinator, step_us: u64, check_ins: &[(u64, usize)]) -> Self {
        Self {
            // The first read (the rendezvous start) returns 1000; event
            // times are relative to it.
            now: 1_000 - step_us,
            step_us,
            check_ins: check_ins
                .iter()
                .map(|&(at, cpu)| (1_000 + at, cpu))
                .collect(),
            coordinator,
            answers: Vec::new(),
        }
    }
}

impl Clock for ScriptedClock<'_> {
    fn now_us(&mut self) -> u64 {
        self.now += self.step_us;
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.check_ins.iter().partition(|(at, _)| *at <= now);
        self.check_ins = later;
        for (_, cpu) in due {
            self.answers.push((cpu, self.coordinator.check_in(cpu)));
        }
        now
    }
}

struct StdClock(Instant);

impl Clock for StdClock {
    fn now_us(&mut self) -> u64 {
        self.0.elapsed().as_micros() as u64
    }
}

fn set(cpus: &[usize]) -> CpuSet {
    CpuSet::from_cpus(cpus).unwrap()
}

// ---------------------------------------------------------------------------
// Election and re-entry.
// ---------------------------------------------------------------------------

#[test]
fn exactly_one_of_many_racing_cpus_becomes_coordinator() {
    const RACERS: usize = 16;
    for round in 0..200 {
        let coordinator: CrashCoordinator<RACERS> = CrashCoordinator::new();
        let start = Barrier::new(RACERS);
        let roles: Vec<Role> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..RACERS)
                .map(|cpu| {
                    let (coordinator, start) = (&coordinator, &start);
                    scope.spawn(move || {
                        start.wait();
                        coordinator.enter(cpu)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<usize> = (0..RACERS)
            .filter(|&c| roles[c] == Role::Coordinator)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {roles:?}");
        let winner = winners[0];
        assert_eq!(coordinator.coordinator(), Some(winner));
        for (cpu, role) in roles.iter().enumerate().filter(|&(c, _)| c != winner) {
            assert_eq!(
                *role,
                Role::Responder {
                    coordinator: winner
                },
                "cpu {cpu}"
            );
        }
    }
}

#[test]
fn re_entry_on_the_coordinator_never_starts_a_second_shootdown() {
    let coordinator = Coordinator::new();
    assert_eq!(coordinator.coordinator(), None, "not armed before a crash");
    assert_eq!(coordinator.enter(3), Role::Coordinator);
    assert_eq!(coordinator.enter(3), Role::ReEntered { coordinator: 3 });
    assert_eq!(coordinator.enter(3), Role::ReEntered { coordinator: 3 });
    assert_eq!(coordinator.enter(5), Role::Responder { coordinator: 3 });
    assert_eq!(coordinator.enter(5), Role::ReEntered { coordinator: 3 });
    assert_eq!(coordinator.coordinator(), Some(3));
    assert!(coordinator.status(3).unwrap().entered());
    assert!(!coordinator.status(4).unwrap().entered());
}

#[test]
fn a_cpu_without_a_slot_still_takes_part_in_the_election() {
    let coordinator = Coordinator::new();
    assert_eq!(coordinator.enter(CPUS + 2), Role::Coordinator);
    assert_eq!(
        coordinator.enter(CPUS + 2),
        Role::ReEntered {
            coordinator: CPUS + 2
        }
    );
    assert_eq!(
        coordinator.enter(0),
        Role::Responder {
            coordinator: CPUS + 2
        }
    );
    assert_eq!(coordinator.check_in(CPUS + 2), CheckIn::NoSlot);
}

static CRASH_AT_BOOT: CrashCoordinator<{ crate::MAX_CPUS }> = CrashCoordinator::new();

#[test]
fn a_static_coordinator_is_ready_before_anything_runs() {
    assert_eq!(CRASH_AT_BOOT.coordinator(), None);
    let last = crate::MAX_CPUS - 1;
    let record = CRASH_AT_BOOT.record(last).unwrap();
    assert_eq!(record.regs, None);
    assert_eq!(record.ledger.vmx, VmxExit::NotAttempted);
    assert_eq!(CRASH_AT_BOOT.record(crate::MAX_CPUS), None);
}

// ---------------------------------------------------------------------------
// The per-CPU crash handler.
// ---------------------------------------------------------------------------

#[test]
fn handler_saves_registers_clears_every_vmcs_leaves_vmx_disables_apic_then_checks_in() {
    let coordinator = Coordinator::new();
    let lists = Lists::new();
    let machine = FakeVmx::new_machine(CPUS);
    load_vmcses(&lists, &machine, 2, 3);
    load_vmcses(&lists, &machine, 4, 2);
    let mut cpu = FakeCpu::in_vmx(&machine, 2);
    assert_eq!(coordinator.enter(2), Role::Coordinator);
    let before = coordinator.status(2).unwrap();
    assert!(!before.checked_in());

    let outcome = coordinator.crash_this_cpu(2, &regs(0xAB), &lists, &mut cpu);

    assert_eq!(
        outcome,
        CpuCrashOutcome {
            resumed: false,
            saved_regs: true,
            walk: WalkStep::Walked(VmclearAll {
                visited: 3,
                cleared: 3,
                failed: 0,
                end: WalkEnd::Complete
            }),
            vmx: VmxExit::Left,
            check_in: CheckIn::OnTime,
        }
    );
    assert_eq!(
        cpu.log(),
        [
            "vmclear",
            "vmclear",
            "vmclear",
            "vmxoff",
            "clear-vmxe",
            "apic-off"
        ]
    );
    let state = cpu.state.borrow();
    assert!(!state.cr4_vmxe && !state.in_vmx_operation && !state.apic_enabled);
    let machine = machine.lock().unwrap();
    assert!(machine.active[2].is_empty(), "every VMCS of CPU 2 cleared");
    assert_eq!(
        machine.active[4].len(),
        2,
        "CPU 4's VMCSes are CPU 4's business"
    );
    assert!(machine.violations.is_empty());

    let record = coordinator.record(2).unwrap();
    assert_eq!(record.regs, Some(regs(0xAB)));
    assert_eq!(
        record.ledger.walk,
        Some(VmclearAll {
            visited: 3,
            cleared: 3,
            failed: 0,
            end: WalkEnd::Complete
        })
    );
    assert_eq!(record.ledger.vmx, VmxExit::Left);
    assert!(record.status.checked_in() && record.status.apic_off() && !record.status.late());
}

#[test]
fn apic_is_disabled_before_the_check_in_is_visible() {
    let coordinator = Rc::new(Coordinator::new());
    let lists = Lists::new();
    let machine = FakeVmx::new_machine(CPUS);
    let mut cpu = FakeCpu::in_vmx(&machine, 1);
    let status_at_apic_off = Rc::new(RefCell::new(None));
    {
        let (seen, coordinator) = (Rc::clone(&status_at_apic_off), Rc::clone(&coordinator));
        cpu.state.borrow_mut().interrupt = Some((
            "apic-off",
            Box::new(move || *seen.borrow_mut() = coordinator.status(1)),
        ));
    }
    coordinator.crash_this_cpu(1, &regs(1), &lists, &mut cpu);
    let at_apic_off = status_at_apic_off.borrow().unwrap();
    assert!(at_apic_off.vmx_done() && at_apic_off.walked() && at_apic_off.regs_saved());
    assert!(!at_apic_off.checked_in(), "check-in is the last step");
    assert!(coordinator.status(1).unwrap().checked_in());
}

#[test]
fn vmxoff_is_skipped_when_cr4_vmxe_is_clear() {
    let coordinator = Coordinator::new();
    let lists = Lists::new();
    let machine = FakeVmx::new_machine(CPUS);
    let mut cpu = FakeCpu::without_vmx(&machine, 0);
    let outcome = coordinator.crash_this_cpu(0, &regs(7), &lists, &mut cpu);
    assert_eq!(outcome.walk, WalkStep::SkippedVmxOff { stranded: 0 });
    assert_eq!(outcome.vmx, VmxExit::WasOff);
    assert!(outcome.vmx.is_off());
    assert_eq!(outcome.check_in, CheckIn::OnTime);
    assert_eq!(
        cpu.log(),
        ["apic-off"],
        "no VMCLEAR, no VMXOFF, no CR4 write"
    );
    assert_eq!(coordinator.record(0).unwrap().regs, Some(regs(7)));
}

#[test]
fn entries_listed_while_vmx_is_off_are_counted_as_stranded_not_vmcleared() {
    let coordinator = Coordinator::new();
    let lists = Lists::new();
    let machine = FakeVmx::new_machine(CPUS);
    load_vmcses(&lists, &machine, 3, 2);
    let mut cpu = FakeCpu::without_vmx(&machine, 3);
    let outcome = coordinator.crash_this_cpu(3, &regs(3), &lists, &mut cpu);
    assert_eq!(outcome.walk, WalkStep::SkippedVmxOff { stranded: 2 });
    assert_eq!(coordinator.record(3).unwrap().ledger.vmcs_stranded, 2);
    assert!(!cpu.log().contains(&"vmclear"));
}

#[test]
fn invalid_opcode_from_vmxoff_is_tolerated_and_vmxe_still_cleared() {
    let coordinator = Coordinator::new();
    let lists = Lists::new();
    let machine = FakeVmx::new_machine(CPUS);
    // CR4.VMXE set but VMXON never done (a crash during VMX bring-up).
    let mut cpu = FakeCpu::in_vmx(&machine, 6);
    cpu.state.borrow_mut().in_vmx_operation = false;
    let outcome = coordinator.crash_this_cpu(6, &regs(6), &lists, &mut cpu);
    assert_eq!(outcome.vmx, VmxExit::LeftAfterInvalidOpcode);
    assert!(outcome.vmx.is_off());
    assert!(!cpu.state.borrow().cr4_vmxe);
    assert_eq!(outcome.check_in, CheckIn::OnTime);
    assert_eq!(cpu.log(), ["vmxoff", "clear-vmxe", "apic-off"]);
}

#[test]
fn vmxoff_failing_in_vmx_operation_leaves_vmxe_alone_and_still_checks_in() {
    let coordinator = Coordinator::new();
    let lists = Lists::new();
    let machine = FakeVmx::new_machine(CPUS);
    let mut cpu = FakeCpu::in_vmx(&machine, 1);
    cpu.state.borrow_mut().vmxoff_fails = Some(Fault::VmFail);
    let outcome = coordinator.crash_this_cpu(1, &regs(1), &lists, &mut cpu);
    assert_eq!(outcome.vmx, VmxExit::StillOn(Fault::VmFail));
    assert!(!outcome.vmx.is_off());
    assert_eq!(cpu.log(), ["vmxoff", "apic-off"], "clearing VMXE would #GP");
    assert_eq!(outcome.check_in, CheckIn::OnTime);
    assert_eq!(
        coordinator.record(1).unwrap().ledger.vmx,
        VmxExit::StillOn(Fault::VmFail)
    );
}

#[test]
fn failed_vmclears_are_counted_in_the_ledger() {
    let coordinator = Coordinator::new();
    let lists = Lists::new();
    let machine = FakeVmx::new_machine(CPUS);
    let ids = load_vmcses(&lists, &machine, 5, 3);
    let bad = lists.vmcs_phys(ids[1]).unwrap();
    machine.lock().unwrap().failing_vmclear.insert(bad);
    let mut cpu = FakeCpu::in_vmx(&machine, 5);
    let outcome = coordinator.crash_this_cpu(5, &regs(5), &lists, &mut cpu);
    let expected = VmclearAll {
        visited: 3,
        cleared: 2,
        failed: 1,
        end: WalkEnd::Complete,
    };
    assert_eq!(outcome.walk, WalkStep::Walked(expected));
    assert_eq!(coordinator.record(5).unwrap().ledger.walk, Some(expected));
}

/// A nested crash right after `step` of the handler (an NMI or a fault
/// inside the crash path): the nested run must finish the job. Returns the
/// nested run's outcome, the record right after it, and the CPU.
fn nested_crash_after(
    step: &'static str,
    vmcses: u64,
) -> (CpuCrashOutcome, CrashRecord, FakeCpu, Arc<Mutex<Machine>>) {
    let coordinator = Rc::new(Coordinator::new());
    let lists = Rc::new(Lists::new());
    let machine = FakeVmx::new_machine(CPUS);
    load_vmcses(&lists, &machine, 4, vmcses);
    let cpu = FakeCpu::in_vmx(&machine, 4);
    let nested_result = Rc::new(RefCell::new(None));
    {
        let (coordinator, lists, result) = (
            Rc::clone(&coordinator),
            Rc::clone(&lists),
            Rc::clone(&nested_result),
        );
        let mut nested_cpu = cpu.clone();
        cpu.state.borrow_mut().interrupt = Some((
            step,
            Box::new(move || {
                assert!(matches!(coordinator.enter(4), Role::ReEntered { .. }));
                let outcome = coordinator.crash_this_cpu(4, &regs(0x2), &lists, &mut nested_cpu);
                *result.borrow_mut() = Some((outcome, coordinator.record(4).unwrap()));
            }),
        ));
    }
    assert_eq!(coordinator.enter(4), Role::Coordinator);
    // The outer run goes on after the nested one returns; on hardware the
    // nested run parks the CPU and never returns, so only the nested
    // outcome and the record at that moment matter.
    let _ = coordinator.crash_this_cpu(4, &regs(0x1), &lists, &mut cpu.clone());
    let (outcome, record) = nested_result
        .borrow_mut()
        .take()
        .expect("the nested crash ran");
    (outcome, record, cpu, machine)
}

#[test]
fn nested_crash_in_the_middle_of_the_walk_redoes_the_walk_and_finishes() {
    let (outcome, record, cpu, machine) = nested_crash_after("vmclear", 3);
    assert!(outcome.resumed);
    assert!(!outcome.saved_regs, "the first context is kept");
    assert_eq!(record.regs, Some(regs(0x1)));
    assert_eq!(
        outcome.walk,
        WalkStep::Walked(VmclearAll {
            visited: 3,
            cleared: 3,
            failed: 0,
            end: WalkEnd::Complete
        })
    );
    assert_eq!(outcome.vmx, VmxExit::Left);
    assert_eq!(outcome.check_in, CheckIn::OnTime);
    assert!(machine.lock().unwrap().active[4].is_empty());
    let log = cpu.log();
    assert_eq!(
        &log[..7],
        [
            "vmclear",
            "vmclear",
            "vmclear",
            "vmclear",
            "vmxoff",
            "clear-vmxe",
            "apic-off"
        ]
    );
}

#[test]
fn nested_crash_between_vmxoff_and_cr4_tolerates_the_second_vmxoff() {
    let (outcome, record, cpu, _) = nested_crash_after("vmxoff", 2);
    assert!(outcome.resumed);
    assert_eq!(outcome.walk, WalkStep::DoneEarlier, "the walk had finished");
    assert_eq!(outcome.vmx, VmxExit::LeftAfterInvalidOpcode);
    assert_eq!(outcome.check_in, CheckIn::OnTime);
    assert_eq!(
        record.ledger.walk.unwrap().cleared,
        2,
        "the first run's ledger stands"
    );
    assert!(!cpu.state.borrow().cr4_vmxe);
}

#[test]
fn handler_run_again_after_check_in_changes_nothing() {
    let coordinator = Coordinator::new();
    let lists = Lists::new();
    let machine = FakeVmx::new_machine(CPUS);
    load_vmcses(&lists, &machine, 7, 1);
    let mut cpu = FakeCpu::in_vmx(&machine, 7);
    coordinator.crash_this_cpu(7, &regs(1), &lists, &mut cpu);
    let first = coordinator.record(7).unwrap();
    let again = coordinator.crash_this_cpu(7, &regs(2), &lists, &mut cpu);
    assert_eq!(
        again,
        CpuCrashOutcome {
            resumed: true,
            saved_regs: false,
            walk: WalkStep::DoneEarlier,
            vmx: VmxExit::Left,
            check_in: CheckIn::AlreadyCheckedIn,
        }
    );
    assert_eq!(coordinator.record(7).unwrap(), first);
}

// ---------------------------------------------------------------------------
// The rendezvous.
// ---------------------------------------------------------------------------

#[test]
fn rendezvous_completes_as_soon_as_every_expected_cpu_checks_in() {
    let coordinator = Coordinator::new();
    let mut clock = ScriptedClock::new(&coordinator, 10, &[(30, 1), (50, 4), (200, 2)]);
    let rendezvous = coordinator.wait_for_rendezvous(&set(&[1, 2, 4]), &mut clock, 1_000_000);
    assert!(rendezvous.is_complete());
    assert_eq!(rendezvous.checked_in, set(&[1, 2, 4]));
    assert!(!rendezvous.timed_out && !rendezvous.clock_stalled);
    assert_eq!(
        rendezvous.elapsed_us, 200,
        "ends at the last check-in, not the timeout"
    );
    assert_eq!(coordinator.record(1).unwrap().observed_after_us, Some(30));
    assert_eq!(coordinator.record(2).unwrap().observed_after_us, Some(200));
    assert_eq!(coordinator.record(3).unwrap().observed_after_us, None);
    assert!(
        clock
            .answers
            .iter()
            .all(|&(_, answer)| answer == CheckIn::OnTime)
    );
}

#[test]
fn rendezvous_with_nothing_to_wait_for_returns_at_once() {
    let coordinator = Coordinator::new();
    let mut clock = ScriptedClock::new(&coordinator, 10, &[]);
    let rendezvous = coordinator.wait_for_rendezvous(&CpuSet::new(), &mut clock, 0);
    assert!(rendezvous.is_complete() && !rendezvous.timed_out);
}

#[test]
fn timeout_names_exactly_the_stragglers() {
    let coordinator = Coordinator::new();
    let mut clock = ScriptedClock::new(
        &coordinator,
        7,
        &[(10, 1), (20, 2), (400, 4), (900, 5), (990, 7)],
    );
    let expected = set(&[1, 2, 3, 4, 5, 6, 7]);
    let rendezvous = coordinator.wait_for_rendezvous(&expected, &mut clock, 1_000);
    assert_eq!(rendezvous.checked_in, set(&[1, 2, 4, 5, 7]));
    assert_eq!(rendezvous.stragglers, set(&[3, 6]));
    assert_eq!(
        rendezvous.stuck_in_handler,
        CpuSet::new(),
        "they never answered"
    );
    assert!(rendezvous.timed_out && !rendezvous.is_complete());
    assert!(rendezvous.elapsed_us >= 1_000);
    for cpu in [3, 6] {
        assert!(coordinator.status(cpu).unwrap().straggler());
    }
    assert!(!coordinator.status(1).unwrap().straggler());
}

#[test]
fn zero_timeout_still_counts_cpus_already_checked_in() {
    let coordinator = Coordinator::new();
    coordinator.check_in(2);
    let mut clock = ScriptedClock::new(&coordinator, 1, &[]);
    let rendezvous = coordinator.wait_for_rendezvous(&set(&[2, 3]), &mut clock, 0);
    assert_eq!(rendezvous.checked_in, set(&[2]));
    assert_eq!(rendezvous.stragglers, set(&[3]));
}

#[test]
fn late_check_in_is_recorded_but_does_not_change_the_rendezvous() {
    let coordinator = Coordinator::new();
    // CPU 3 answers at 5 ms, long after the 1 ms timeout.
    let mut clock = ScriptedClock::new(&coordinator, 50, &[(100, 1), (5_000, 3)]);
    let rendezvous = coordinator.wait_for_rendezvous(&set(&[1, 3]), &mut clock, 1_000);
    assert_eq!(rendezvous.stragglers, set(&[3]));
    while clock.check_ins.iter().any(|&(_, cpu)| cpu == 3) {
        clock.now_us();
    }
    assert_eq!(clock.answers, [(1, CheckIn::OnTime), (3, CheckIn::Late)]);
    assert_eq!(coordinator.late_arrivals(), set(&[3]));
    let status = coordinator.status(3).unwrap();
    assert!(status.late() && status.checked_in() && status.straggler());
    assert_eq!(
        rendezvous.stragglers,
        set(&[3]),
        "the result handed out stands"
    );
    assert_eq!(coordinator.record(3).unwrap().observed_after_us, None);
}

#[test]
fn double_check_in_is_ignored() {
    let coordinator = Coordinator::new();
    assert_eq!(coordinator.check_in(4), CheckIn::OnTime);
    assert_eq!(coordinator.check_in(4), CheckIn::AlreadyCheckedIn);
    let mut clock = ScriptedClock::new(&coordinator, 10, &[(20, 4)]);
    let rendezvous = coordinator.wait_for_rendezvous(&set(&[4]), &mut clock, 1_000);
    assert_eq!(rendezvous.checked_in, set(&[4]));
    // The scripted second check-in of CPU 4 comes after the rendezvous.
    while !clock.check_ins.is_empty() {
        clock.now_us();
    }
    assert_eq!(clock.answers, [(4, CheckIn::AlreadyCheckedIn)]);
    assert!(!coordinator.status(4).unwrap().straggler());
    assert_eq!(coordinator.late_arrivals(), CpuSet::new());
}

#[test]
fn straggler_stuck_inside_its_handler_is_told_apart_and_checks_in_late() {
    let coordinator = Rc::new(Coordinator::new());
    let lists = Lists::new();
    let machine = FakeVmx::new_machine(CPUS);
    load_vmcses(&lists, &machine, 5, 1);
    let mut cpu5 = FakeCpu::in_vmx(&machine, 5);
    let rendezvous = Rc::new(RefCell::new(None));
    {
        // CPU 5 hangs in its VMCLEAR while the coordinator's deadline passes.
        let (coordinator, rendezvous) = (Rc::clone(&coordinator), Rc::clone(&rendezvous));
        cpu5.state.borrow_mut().interrupt = Some((
            "vmclear",
            Box::new(move || {
                let mut clock = ScriptedClock::new(&coordinator, 100, &[]);
                let result = coordinator.wait_for_rendezvous(&set(&[2, 5]), &mut clock, 1_000);
                *rendezvous.borrow_mut() = Some(result);
            }),
        ));
    }
    assert_eq!(coordinator.enter(0), Role::Coordinator);
    assert_eq!(coordinator.enter(5), Role::Responder { coordinator: 0 });
    let outcome = coordinator.crash_this_cpu(5, &regs(5), &lists, &mut cpu5);
    let rendezvous = rendezvous.borrow().unwrap();
    assert_eq!(rendezvous.stragglers, set(&[2, 5]));
    assert_eq!(
        rendezvous.stuck_in_handler,
        set(&[5]),
        "CPU 2 never answered; CPU 5 is stuck"
    );
    assert_eq!(outcome.check_in, CheckIn::Late);
    assert_eq!(coordinator.late_arrivals(), set(&[5]));
}

#[test]
fn expected_cpus_without_a_slot_are_stragglers_at_once() {
    let coordinator = Coordinator::new();
    let mut clock = ScriptedClock::new(&coordinator, 10, &[(10, 1)]);
    let rendezvous = coordinator.wait_for_rendezvous(&set(&[1, CPUS + 5]), &mut clock, 1_000);
    assert_eq!(rendezvous.checked_in, set(&[1]));
    assert_eq!(rendezvous.stragglers, set(&[CPUS + 5]));
    assert!(!rendezvous.timed_out, "nothing left worth waiting for");
}

struct StoppedClock(u64);

impl Clock for StoppedClock {
    fn now_us(&mut self) -> u64 {
        self.0
    }
}

#[test]
fn a_stopped_clock_ends_the_wait_instead_of_hanging() {
    let coordinator = Coordinator::new();
    let rendezvous = coordinator.wait_for_rendezvous(&set(&[1]), &mut StoppedClock(42), 1_000);
    assert!(rendezvous.clock_stalled && !rendezvous.timed_out);
    assert_eq!(rendezvous.stragglers, set(&[1]));
}

#[test]
fn check_in_racing_the_deadline_is_counted_exactly_once() {
    for round in 0..300 {
        let coordinator = Coordinator::new();
        let go = Barrier::new(2);
        let timeout_us = 50 + (round % 7) * 20;
        let (rendezvous, answer) = std::thread::scope(|scope| {
            let racer = scope.spawn(|| {
                go.wait();
                std::thread::sleep(Duration::from_micros(timeout_us));
                coordinator.check_in(1)
            });
            go.wait();
            let rendezvous = coordinator.wait_for_rendezvous(
                &set(&[1]),
                &mut StdClock(Instant::now()),
                timeout_us,
            );
            (rendezvous, racer.join().unwrap())
        });
        let counted = rendezvous.checked_in.contains(1);
        let named = rendezvous.stragglers.contains(1);
        assert!(counted != named, "round {round}: {rendezvous:?}");
        assert_eq!(
            answer,
            if counted {
                CheckIn::OnTime
            } else {
                CheckIn::Late
            },
            "round {round}"
        );
        assert_eq!(coordinator.late_arrivals().contains(1), named);
    }
}

// ---------------------------------------------------------------------------
// A whole shootdown with threads as CPUs.
// ---------------------------------------------------------------------------

/// Eight CPUs run guests (two VMCSes loaded each). CPUs 2 and 6 panic at the
/// same moment; one of them coordinates and "sends NMI" to all others, the
/// other cleans up as a responder. CPU 5 spins with NMIs blocked and answers
/// only after the timeout. Afterwards: exactly CPU 5 is named, every other
/// CPU VMCLEARed its VMCSes and left VMX, and CPU 5 shows up as late.
#[test]
fn whole_shootdown_names_the_blocked_cpu_and_cleans_up_everyone_else() {
    let coordinator = Coordinator::new();
    let lists = Lists::new();
    let machine = FakeVmx::new_machine(CPUS);
    for cpu in 0..CPUS {
        load_vmcses(&lists, &machine, cpu, 2);
    }
    let nmi_pending: Vec<AtomicBool> = (0..CPUS).map(|_| AtomicBool::new(false)).collect();
    let nmis_unblocked = AtomicBool::new(false);
    let parked = AtomicUsize::new(0);
    let panic_now = Barrier::new(2);
    let coordinator_result = Mutex::new(None);
    let aborted = AtomicBool::new(false);
    const BLOCKED: usize = 5;

    std::thread::scope(|scope| {
        for cpu in 0..CPUS {
            let (coordinator, lists, machine, nmi_pending) =
                (&coordinator, &lists, &machine, &nmi_pending);
            let (nmis_unblocked, parked, panic_now, coordinator_result, aborted) = (
                &nmis_unblocked,
                &parked,
                &panic_now,
                &coordinator_result,
                &aborted,
            );
            scope.spawn(move || {
                let _abort_others_if_this_fails = AbortOnPanic(aborted);
                let mut hw = FakeCpu::in_vmx(machine, cpu);
                let interrupted = regs(cpu as u64);
                if cpu == 2 || cpu == 6 {
                    panic_now.wait();
                    match coordinator.enter(cpu) {
                        Role::Coordinator => {
                            for (other, pending) in nmi_pending.iter().enumerate() {
                                if other != cpu {
                                    pending.store(true, Ordering::Release);
                                }
                            }
                            let expected = CpuSet::first(CPUS).difference(&set(&[cpu]));
                            let rendezvous = coordinator.wait_for_rendezvous(
                                &expected,
                                &mut StdClock(Instant::now()),
                                200_000,
                            );
                            let own = coordinator.crash_this_cpu(cpu, &interrupted, lists, &mut hw);
                            *coordinator_result.lock().unwrap() = Some((cpu, rendezvous, own));
                            nmis_unblocked.store(true, Ordering::Release);
                        }
                        Role::Responder { .. } => {
                            coordinator.crash_this_cpu(cpu, &interrupted, lists, &mut hw);
                        }
                        Role::ReEntered { .. } => panic!("cpu {cpu} entered once"),
                    }
                    // Parked: the shootdown NMI may still arrive; a parked CPU ignores it.
                    parked.fetch_add(1, Ordering::AcqRel);
                    return;
                }
                // Running guests until the NMI; CPU 5 has NMIs blocked.
                loop {
                    stop_if_aborted(aborted);
                    let blocked = cpu == BLOCKED && !nmis_unblocked.load(Ordering::Acquire);
                    if !blocked && nmi_pending[cpu].load(Ordering::Acquire) {
                        break;
                    }
                    std::thread::yield_now();
                }
                assert!(
                    coordinator.coordinator().is_some(),
                    "an NMI during a crash is the shootdown"
                );
                assert!(matches!(coordinator.enter(cpu), Role::Responder { .. }));
                let outcome = coordinator.crash_this_cpu(cpu, &interrupted, lists, &mut hw);
                let expected = if cpu == BLOCKED {
                    CheckIn::Late
                } else {
                    CheckIn::OnTime
                };
                assert_eq!(outcome.check_in, expected, "cpu {cpu}");
                parked.fetch_add(1, Ordering::AcqRel);
            });
        }
    });

    let (boss, rendezvous, own) = coordinator_result.lock().unwrap().take().unwrap();
    assert!(boss == 2 || boss == 6);
    assert_eq!(rendezvous.stragglers, set(&[BLOCKED]));
    assert_eq!(rendezvous.stuck_in_handler, CpuSet::new());
    assert_eq!(rendezvous.checked_in.len(), CPUS - 2);
    assert!(rendezvous.timed_out);
    assert_eq!(own.vmx, VmxExit::Left);
    assert_eq!(parked.load(Ordering::Acquire), CPUS);
    assert_eq!(coordinator.late_arrivals(), set(&[BLOCKED]));

    let machine = machine.lock().unwrap();
    assert!(machine.violations.is_empty(), "{:?}", machine.violations);
    let mut vmxoff_cpus = 0;
    let mut cleared = 0;
    for cpu in 0..CPUS {
        assert!(
            machine.active[cpu].is_empty(),
            "cpu {cpu} left a VMCS active"
        );
        let record = coordinator.record(cpu).unwrap();
        assert_eq!(record.regs, Some(regs(cpu as u64)));
        cleared += record.ledger.walk.unwrap().cleared;
        vmxoff_cpus += usize::from(record.ledger.vmx.is_off());
    }
    assert_eq!(cleared, 2 * CPUS as u32, "vmcs_cleared == vmcs_loaded");
    assert_eq!(vmxoff_cpus, CPUS);
    let distinct: BTreeSet<u64> = machine.vmclears.iter().map(|&(_, phys)| phys).collect();
    assert_eq!(distinct.len(), 2 * CPUS);
}

// ---------------------------------------------------------------------------
// The register layout of the dump.
// ---------------------------------------------------------------------------

#[test]
fn registers_are_in_user_regs_struct_order() {
    assert_eq!(offset_of!(CpuRegisters, r15), 0);
    assert_eq!(offset_of!(CpuRegisters, orig_rax), 15 * 8);
    assert_eq!(offset_of!(CpuRegisters, rip), 16 * 8);
    assert_eq!(offset_of!(CpuRegisters, rsp), 19 * 8);
    assert_eq!(offset_of!(CpuRegisters, gs), 26 * 8);
    let regs = CpuRegisters {
        rip: 0x1111,
        rsp: 0x2222,
        r15: 0x3333,
        gs: 0x4444,
        ..CpuRegisters::default()
    };
    let array = regs.to_array();
    assert_eq!(
        (array[0], array[16], array[19], array[26]),
        (0x3333, 0x1111, 0x2222, 0x4444)
    );
    assert_eq!(CpuRegisters::from_array(array), regs);
}

#[test]
fn a_record_shows_only_what_was_published() {
    let coordinator = Coordinator::new();
    coordinator.enter(1);
    let record = coordinator.record(1).unwrap();
    assert!(record.status.entered() && !record.status.handler_started());
    assert_eq!(record.regs, None);
    assert_eq!(
        record.ledger,
        Ledger {
            walk: None,
            vmcs_stranded: 0,
            vmx: VmxExit::NotAttempted
        }
    );
}
