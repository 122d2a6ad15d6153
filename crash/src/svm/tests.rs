//! Host tests of the crash path on SVM, with fake CPUs: the order of the
//! way out (STGI, EFER.SVME off, VM_HSAVE_PA 0), what happens when a step
//! fails or is interrupted, and the crash NMI after every store of a VMCB
//! list update (load, unload at every position), the whole handler
//! ([`CrashCoordinator::crash_this_cpu`]) run from the hook each time.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use super::*;
use crate::fake::{FakeVmx, Machine};
use crate::loaded_vmcs::{
    NoHook, StoreHook, StorePoint, VmcsArena, VmcsId, Vmx, VmxError, WalkEnd,
};
use crate::shootdown::{CheckIn, CpuRegisters, CrashCoordinator, CrashHardware, VmxExit, WalkStep};

const CPUS: usize = 3;
const ENTRIES: usize = 12;
type Arena = VmcsArena<ENTRIES, CPUS>;

/// Every clean bit the APM defines (intercepts to AVIC): what a VMCB looks
/// like after a VMRUN on a CPU that may cache it.
const ALL_CLEAN: u32 = 0xFFF;

fn vmcb_region(n: u64) -> u64 {
    0x20_0000 + n * 0x1000
}

/// One fake CPU's SVM state.
#[derive(Debug, Clone)]
struct SvmCpuState {
    svme: bool,
    gif: bool,
    hsave: u64,
    apic_enabled: bool,
    /// EFER.SVME stays set whatever is written (a read-back must see it).
    svme_sticks: bool,
    /// STGI raises this even with EFER.SVME set.
    stgi_fault: Option<Fault>,
}

impl SvmCpuState {
    /// A CPU running guests: SVM on, a host save area, GIF = 0 (the NMI
    /// came between CLGI and STGI, as a #VMEXIT's NMI does).
    fn in_svm() -> Self {
        Self {
            svme: true,
            gif: false,
            hsave: 0x7_F000,
            apic_enabled: true,
            svme_sticks: false,
            stgi_fault: None,
        }
    }
}

/// The fake machine: per-CPU SVM state, each VMCB's clean bits, and a log
/// of every step, as (cpu, step).
#[derive(Debug)]
struct SvmMachine {
    cpus: Vec<SvmCpuState>,
    clean_bits: BTreeMap<u64, u32>,
    log: Vec<(usize, &'static str)>,
}

type Shared<T> = Rc<RefCell<T>>;

/// Something that happens right after a named step (a nested crash).
type Interrupt = (&'static str, Box<dyn FnOnce()>);

/// A handle on one fake CPU. The loaded-VMCB bookkeeping (which VMCB is in
/// use on which CPU, misuse) is the VMX fake's: SVM's "load" and "clear"
/// have the same rules, only the hardware behind them differs.
#[derive(Clone)]
struct FakeSvmCpu {
    cpu: usize,
    vmx: FakeVmx,
    svm: Shared<SvmMachine>,
    ledgers: Rc<SvmLedgers<CPUS>>,
    /// Runs once, right after the step of that name (a nested crash).
    interrupt: Shared<Option<Interrupt>>,
}

impl FakeSvmCpu {
    fn state(&self) -> SvmCpuState {
        self.svm.borrow().cpus[self.cpu].clone()
    }

    fn did(&self, step: &'static str) {
        self.svm.borrow_mut().log.push((self.cpu, step));
        let interrupt = {
            let mut slot = self.interrupt.borrow_mut();
            match &*slot {
                Some((at, _)) if *at == step => slot.take(),
                _ => None,
            }
        };
        if let Some((_, nested)) = interrupt {
            nested();
        }
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut SvmCpuState) -> R) -> R {
        f(&mut self.svm.borrow_mut().cpus[self.cpu])
    }
}

impl Vmx for FakeSvmCpu {
    /// The SVM clear: zero the clean bits; the CPU no longer uses it.
    fn vmclear(&mut self, phys: u64) -> Result<(), VmxError> {
        self.vmx.vmclear(phys)?;
        self.svm.borrow_mut().clean_bits.insert(phys, 0);
        self.did("clear");
        Ok(())
    }

    /// The SVM load: this CPU runs the VMCB from now on, and may keep a
    /// cached copy of every field its clean bits mark.
    fn vmptrld(&mut self, phys: u64) -> Result<(), VmxError> {
        self.vmx.vmptrld(phys)?;
        self.svm.borrow_mut().clean_bits.insert(phys, ALL_CLEAN);
        Ok(())
    }
}

impl SvmHardware for FakeSvmCpu {
    fn efer_svme(&mut self) -> bool {
        self.state().svme
    }

    fn stgi(&mut self) -> Result<(), Fault> {
        let result = self.with_state(|state| {
            if !state.svme {
                return Err(Fault::InvalidOpcode);
            }
            if let Some(fault) = state.stgi_fault {
                return Err(fault);
            }
            state.gif = true;
            Ok(())
        });
        self.did("stgi");
        result
    }

    fn clear_efer_svme(&mut self) -> Result<(), Fault> {
        self.with_state(|state| state.svme = state.svme_sticks);
        self.did("clear svme");
        Ok(())
    }

    fn clear_hsave_pa(&mut self) -> Result<(), Fault> {
        self.with_state(|state| state.hsave = 0);
        self.did("clear hsave");
        Ok(())
    }

    fn hsave_pa(&mut self) -> u64 {
        self.state().hsave
    }
}

impl CrashHardware for FakeSvmCpu {
    fn cr4_vmxe(&mut self) -> bool {
        // An AMD CPU has no CR4.VMXE.
        false
    }

    fn vmxoff(&mut self) -> Result<(), Fault> {
        self.did("vmxoff");
        Err(Fault::InvalidOpcode)
    }

    fn clear_cr4_vmxe(&mut self) -> Result<(), Fault> {
        self.did("clear cr4.vmxe");
        Ok(())
    }

    fn disable_local_apic(&mut self) {
        self.with_state(|state| state.apic_enabled = false);
        self.did("apic off");
    }

    fn svm_enabled(&mut self) -> bool {
        self.state().svme
    }

    fn leave_svm(&mut self, cpu: usize) {
        let ledgers = Rc::clone(&self.ledgers);
        ledgers.leave(cpu, self);
    }
}

/// One scenario's machine: the lists, the fake CPUs, the crash state.
struct World {
    arena: Box<Arena>,
    machine: Arc<Mutex<Machine>>,
    svm: Shared<SvmMachine>,
    ledgers: Rc<SvmLedgers<CPUS>>,
    coordinator: Box<CrashCoordinator<CPUS>>,
    next_region: Cell<u64>,
}

impl World {
    fn new() -> Self {
        Self {
            arena: Box::new(Arena::new()),
            machine: FakeVmx::new_machine(CPUS),
            svm: Rc::new(RefCell::new(SvmMachine {
                cpus: vec![SvmCpuState::in_svm(); CPUS],
                clean_bits: BTreeMap::new(),
                log: Vec::new(),
            })),
            ledgers: Rc::new(SvmLedgers::new()),
            coordinator: Box::new(CrashCoordinator::new()),
            next_region: Cell::new(0),
        }
    }

    fn cpu(&self, cpu: usize) -> FakeSvmCpu {
        FakeSvmCpu {
            cpu,
            vmx: FakeVmx::on(&self.machine, cpu),
            svm: Rc::clone(&self.svm),
            ledgers: Rc::clone(&self.ledgers),
            interrupt: Rc::new(RefCell::new(None)),
        }
    }

    fn alloc(&self) -> VmcsId {
        let n = self.next_region.get();
        self.next_region.set(n + 1);
        self.arena.alloc(vmcb_region(n)).unwrap()
    }

    /// A new VMCB, loaded (listed, run) on `cpu`.
    fn loaded(&self, cpu: usize) -> VmcsId {
        let id = self.alloc();
        self.arena
            .load_here(cpu, id, &mut self.cpu(cpu), &mut NoHook)
            .unwrap();
        id
    }

    fn phys(&self, id: VmcsId) -> u64 {
        self.arena.vmcs_phys(id).unwrap()
    }

    fn log(&self, cpu: usize) -> Vec<&'static str> {
        self.svm
            .borrow()
            .log
            .iter()
            .filter(|(c, _)| *c == cpu)
            .map(|(_, step)| *step)
            .collect()
    }

    /// The crash handler on `cpu`, as its NMI runs it.
    fn crash(&self, cpu: usize, hw: &mut FakeSvmCpu) -> crate::shootdown::CpuCrashOutcome {
        self.coordinator.enter(cpu);
        self.coordinator
            .crash_this_cpu(cpu, &CpuRegisters::default(), &self.arena, hw)
    }
}

#[test]
fn the_way_out_is_stgi_then_svme_off_then_hsave_zero_after_every_vmcb() {
    let world = World::new();
    let (a, b) = (world.loaded(1), world.loaded(1));
    world.loaded(2);
    let outcome = world.crash(1, &mut world.cpu(1));

    assert_eq!(
        world.log(1),
        [
            "clear",
            "clear",
            "stgi",
            "clear svme",
            "clear hsave",
            "apic off"
        ]
    );
    let state = world.cpu(1).state();
    assert!(state.gif && !state.svme && state.hsave == 0 && !state.apic_enabled);
    assert_eq!(world.ledgers.exit(1), SvmExit::Left);
    assert_eq!(outcome.check_in, CheckIn::OnTime);
    // VMX was never on: nothing VMX-specific ran, and its ledger says so.
    assert_eq!(outcome.vmx, VmxExit::WasOff);
    match outcome.walk {
        WalkStep::Walked(walk) => {
            assert_eq!((walk.visited, walk.cleared, walk.failed), (2, 2, 0));
            assert_eq!(walk.end, WalkEnd::Complete);
        }
        other => panic!("the VMCB list was not walked: {other:?}"),
    }
    let svm = world.svm.borrow();
    assert_eq!(svm.clean_bits[&world.phys(a)], 0);
    assert_eq!(svm.clean_bits[&world.phys(b)], 0);
    // CPU 2's VMCB is CPU 2's business.
    assert_eq!(svm.clean_bits[&vmcb_region(2)], ALL_CLEAN);
    assert!(world.machine.lock().unwrap().active[1].is_empty());
    assert!(world.machine.lock().unwrap().violations.is_empty());
}

#[test]
fn a_cpu_never_in_svm_gets_no_stgi_but_its_host_save_area_still_cleared() {
    let world = World::new();
    world.svm.borrow_mut().cpus[0].svme = false;
    world.svm.borrow_mut().cpus[0].gif = true;
    let outcome = world.crash(0, &mut world.cpu(0));
    // STGI would raise #UD with EFER.SVME clear: not attempted.
    assert_eq!(world.log(0), ["clear hsave", "apic off"]);
    assert_eq!(world.ledgers.exit(0), SvmExit::WasOff);
    assert!(SvmExit::WasOff.is_off() && !SvmExit::WasOff.was_on());
    assert_eq!(outcome.walk, WalkStep::SkippedVmxOff { stranded: 0 });
}

#[test]
fn a_failing_stgi_is_reported_and_svm_is_still_switched_off() {
    let world = World::new();
    world.loaded(0);
    world.svm.borrow_mut().cpus[0].stgi_fault = Some(Fault::GeneralProtection);
    world.crash(0, &mut world.cpu(0));
    let exit = world.ledgers.exit(0);
    assert_eq!(
        exit,
        SvmExit::Failed {
            step: SvmStep::Stgi,
            fault: Some(Fault::GeneralProtection)
        }
    );
    assert!(!exit.is_off() && exit.was_on());
    let state = world.cpu(0).state();
    assert!(!state.svme && state.hsave == 0);
    assert_eq!(world.log(0).last(), Some(&"apic off"));
}

#[test]
fn svme_that_does_not_read_back_clear_is_not_called_off() {
    let world = World::new();
    world.svm.borrow_mut().cpus[2].svme_sticks = true;
    world.crash(2, &mut world.cpu(2));
    assert_eq!(
        world.ledgers.exit(2),
        SvmExit::Failed {
            step: SvmStep::ClearSvme,
            fault: None
        }
    );
    assert!(
        world
            .ledgers
            .exit(2)
            .to_string()
            .starts_with("STILL IN SVM")
    );
}

#[test]
fn every_exit_survives_its_encoding() {
    let mut exits = vec![SvmExit::NotAttempted, SvmExit::WasOff, SvmExit::Left];
    for step in [SvmStep::Stgi, SvmStep::ClearSvme, SvmStep::ClearHsave] {
        for fault in [
            None,
            Some(Fault::InvalidOpcode),
            Some(Fault::GeneralProtection),
            Some(Fault::VmFail),
        ] {
            exits.push(SvmExit::Failed { step, fault });
        }
    }
    for exit in exits {
        assert_eq!(SvmExit::decode(exit.encode()), exit);
    }
}

#[test]
fn a_nested_crash_after_stgi_finishes_the_way_out_once_and_remembers_svm_was_on() {
    let world = World::new();
    world.loaded(0);
    let hw = world.cpu(0);
    let nested = {
        let world_ledgers = Rc::clone(&world.ledgers);
        let mut inner = hw.clone();
        // The NMI held pending by GIF = 0 arrives at STGI and runs the
        // handler again on the same CPU; it does the rest of the way out.
        move || {
            let exit = world_ledgers.leave(0, &mut inner);
            assert_eq!(exit, SvmExit::Left, "the nested run knows SVM was on");
        }
    };
    *hw.interrupt.borrow_mut() = Some(("stgi", Box::new(nested)));
    world.crash(0, &mut hw.clone());
    assert_eq!(
        world.log(0),
        [
            "clear",
            "stgi",
            // The nested run: SVM still on, so it does every step.
            "stgi",
            "clear svme",
            "clear hsave",
            // The interrupted run goes on; clearing twice is harmless.
            "clear svme",
            "clear hsave",
            "apic off",
        ]
    );
    assert_eq!(world.ledgers.exit(0), SvmExit::Left);
    // A run after the record is complete does nothing.
    let before = world.log(0).len();
    assert_eq!(world.ledgers.leave(0, &mut world.cpu(0)), SvmExit::Left);
    assert_eq!(world.log(0).len(), before);
}

// ---------------------------------------------------------------------------
// The crash NMI after every store of a VMCB list update.
// ---------------------------------------------------------------------------

/// What the whole crash handler left behind when an NMI hit one point.
#[derive(Debug)]
struct NmiCheck {
    at: Option<StorePoint>,
    /// VMCBs in use on the CPU when the NMI came.
    in_use: usize,
    /// VMCBs the CPU was using when the NMI came whose clean bits are not
    /// zero afterwards (a cached copy could still be trusted).
    still_clean: Vec<u64>,
    /// VMCBs still in use on the CPU after the handler.
    leaked: Vec<u64>,
    violations: Vec<String>,
    exit: SvmExit,
    gif: bool,
    svme: bool,
    hsave: u64,
    checked_in: bool,
    log: Vec<&'static str>,
}

impl NmiCheck {
    fn is_safe(&self) -> bool {
        self.still_clean.is_empty()
            && self.leaked.is_empty()
            && self.violations.is_empty()
            && self.exit == SvmExit::Left
            && self.gif
            && !self.svme
            && self.hsave == 0
            && self.checked_in
            && self.svm_steps_in_order()
    }

    /// STGI before EFER.SVME off before VM_HSAVE_PA 0, all after the walk.
    fn svm_steps_in_order(&self) -> bool {
        let at = |step| self.log.iter().position(|s| *s == step);
        let last_clear = self.log.iter().rposition(|s| *s == "clear");
        match (at("stgi"), at("clear svme"), at("clear hsave")) {
            (Some(stgi), Some(svme), Some(hsave)) => {
                stgi < svme && svme < hsave && last_clear.is_none_or(|c| c < stgi)
            }
            _ => false,
        }
    }
}

/// The crash on `cpu` from inside a list update: the whole handler.
fn crash_nmi(world: &World, cpu: usize, at: Option<StorePoint>) -> NmiCheck {
    let in_use: Vec<u64> = world.machine.lock().unwrap().active[cpu]
        .iter()
        .copied()
        .collect();
    let violations_before = world.machine.lock().unwrap().violations.len();
    let log_before = world.svm.borrow().log.len();
    let outcome = world.crash(cpu, &mut world.cpu(cpu));
    let machine = world.machine.lock().unwrap();
    let svm = world.svm.borrow();
    let state = &svm.cpus[cpu];
    NmiCheck {
        at,
        in_use: in_use.len(),
        still_clean: in_use
            .into_iter()
            .filter(|phys| svm.clean_bits.get(phys).copied().unwrap_or(0) != 0)
            .collect(),
        leaked: machine.active[cpu].iter().copied().collect(),
        violations: machine.violations[violations_before..].to_vec(),
        exit: world.ledgers.exit(cpu),
        gif: state.gif,
        svme: state.svme,
        hsave: state.hsave,
        checked_in: outcome.check_in == CheckIn::OnTime,
        log: svm.log[log_before..]
            .iter()
            .filter(|(c, _)| *c == cpu)
            .map(|(_, step)| *step)
            .collect(),
    }
}

/// Fires the crash NMI after store number `target` of one scenario run.
struct NmiAfter<'a> {
    world: &'a World,
    cpu: usize,
    stores: &'a Cell<usize>,
    points: &'a RefCell<Vec<StorePoint>>,
    target: usize,
    fired: &'a RefCell<Option<NmiCheck>>,
}

impl StoreHook for NmiAfter<'_> {
    fn after_store(&mut self, point: StorePoint) {
        let n = self.stores.get();
        self.stores.set(n + 1);
        self.points.borrow_mut().push(point);
        if n == self.target {
            *self.fired.borrow_mut() = Some(crash_nmi(self.world, self.cpu, Some(point)));
        }
    }
}

/// Runs `op` (on CPU 0) once per store it makes, each time on a fresh
/// world from `setup` with the NMI after that store; returns every check
/// and the points of one run.
fn nmi_after_every_store(
    setup: impl Fn() -> (World, VmcsId),
    op: impl Fn(&World, VmcsId, &mut NmiAfter<'_>),
) -> (Vec<NmiCheck>, Vec<StorePoint>) {
    let (stores, points, fired) = (Cell::new(0), RefCell::new(Vec::new()), RefCell::new(None));
    let (world, id) = setup();
    op(
        &world,
        id,
        &mut NmiAfter {
            world: &world,
            cpu: 0,
            stores: &stores,
            points: &points,
            target: usize::MAX,
            fired: &fired,
        },
    );
    let points = points.into_inner();
    assert!(!points.is_empty());
    let mut checks = Vec::new();
    for target in 0..points.len() {
        let (world, id) = setup();
        let (stores, scratch, fired) = (Cell::new(0), RefCell::new(Vec::new()), RefCell::new(None));
        op(
            &world,
            id,
            &mut NmiAfter {
                world: &world,
                cpu: 0,
                stores: &stores,
                points: &scratch,
                target,
                fired: &fired,
            },
        );
        checks.push(fired.into_inner().expect("every store is reached again"));
    }
    // And a crash after the whole operation.
    let (world, id) = setup();
    op(
        &world,
        id,
        &mut NmiAfter {
            world: &world,
            cpu: 0,
            stores: &Cell::new(0),
            points: &RefCell::new(Vec::new()),
            target: usize::MAX,
            fired: &RefCell::new(None),
        },
    );
    checks.push(crash_nmi(&world, 0, None));
    (checks, points)
}

/// CPU 0 with `len` VMCBs loaded, one on CPU 1 (CPU 0's crash must not
/// touch it), and one more allocated for the scenario.
fn vmcbs(len: usize) -> (World, Vec<VmcsId>) {
    let world = World::new();
    world.loaded(1);
    let ids = (0..len).map(|_| world.loaded(0)).collect();
    (world, ids)
}

#[test]
fn nmi_after_every_store_of_a_vmcb_load_leaves_nothing_in_use_and_svm_off() {
    for len in 0..=4 {
        let (checks, points) = nmi_after_every_store(
            || {
                let (world, _) = vmcbs(len);
                let id = world.alloc();
                (world, id)
            },
            |world, id, hook| {
                world
                    .arena
                    .load_here(0, id, &mut world.cpu(0), hook)
                    .unwrap();
            },
        );
        assert!(points.contains(&StorePoint::AddPublish));
        assert!(points.contains(&StorePoint::LoadVmptrld));
        for check in &checks {
            assert!(check.is_safe(), "load onto {len}: {check:#?}");
        }
        // From the VMPTRLD on, the new VMCB is in use too, and was cleared.
        let after_load = checks
            .iter()
            .find(|check| check.at == Some(StorePoint::LoadVmptrld))
            .unwrap();
        assert_eq!(after_load.in_use, len + 1);
    }
}

#[test]
fn nmi_after_every_store_of_a_vmcb_unload_at_every_position_leaves_nothing_in_use() {
    for len in 1..=4 {
        for position in 0..len {
            let (checks, points) = nmi_after_every_store(
                || {
                    let (world, ids) = vmcbs(len);
                    (world, ids[position])
                },
                |world, id, hook| {
                    world.arena.unload(0, id, &mut world.cpu(0), hook).unwrap();
                },
            );
            assert_eq!(points.first(), Some(&StorePoint::UnloadVmclear));
            assert_eq!(points.last(), Some(&StorePoint::RemoveReleaseCpu));
            for check in &checks {
                assert!(check.is_safe(), "unload {position} of {len}: {check:#?}");
            }
        }
    }
}

#[test]
fn the_checker_catches_svm_switched_off_before_the_vmcbs_were_cleared() {
    // A broken order: leaving SVM first, then walking. The walk then finds
    // EFER.SVME clear and counts the VMCBs as stranded: still in use.
    let world = World::new();
    world.loaded(0);
    world.loaded(0);
    let mut hw = world.cpu(0);
    world.ledgers.leave(0, &mut hw);
    let check = crash_nmi(&world, 0, None);
    assert!(!check.is_safe());
    assert_eq!(check.leaked.len(), 2, "{check:#?}");
}
