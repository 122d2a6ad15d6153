//! Host tests of the loaded-VMCS list protocol.
//!
//! The core check: simulate the crash NMI after *every single store* of an
//! operation (a fresh world per store, the crash walk run from the hook on
//! the CPU that made the store), and assert that the walk leaves nothing
//! active on that CPU, touches no freed entry and no other CPU's VMCS, and
//! ends normally. The broken orders are run through the same checker to
//! show that it catches them.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::*;
use crate::fake::{AbortOnPanic, FakeVmx, Machine, Rng, stop_if_aborted};

const TEST_ENTRIES: usize = 12;
const TEST_CPUS: usize = 3;
type Arena = VmcsArena<TEST_ENTRIES, TEST_CPUS>;
type SharedMachine = Arc<Mutex<Machine>>;

/// Freed VMCS regions get an address in this range, which the fake VMX
/// reports as a use-after-free when touched.
const POISON_PHYS: u64 = 0xDEAD_0000_0000;
/// Freed entries' links point here, outside the arena: a walk that follows
/// one ends with `BadIndex`, which the checker reports.
const POISON_LINK: u32 = 0xDEAD_BEEF;

fn vmcs_region(n: u64) -> u64 {
    0x10_0000 + n * 0x1000
}

// ---------------------------------------------------------------------------
// The world of one scenario, and the checks.
// ---------------------------------------------------------------------------

struct World {
    arena: Box<Arena>,
    machine: SharedMachine,
    next_region: Cell<u64>,
}

impl World {
    fn new() -> Self {
        Self {
            arena: Box::new(Arena::new()),
            machine: FakeVmx::new_machine(TEST_CPUS),
            next_region: Cell::new(0),
        }
    }

    fn vmx(&self, cpu: usize) -> FakeVmx {
        FakeVmx::on(&self.machine, cpu)
    }

    fn alloc(&self) -> VmcsId {
        let n = self.next_region.get();
        self.next_region.set(n + 1);
        self.arena.alloc(vmcs_region(n)).unwrap()
    }

    /// A new VMCS, loaded (listed and active) on `cpu`.
    fn loaded(&self, cpu: usize) -> VmcsId {
        let id = self.alloc();
        let loaded = self
            .arena
            .load_here(cpu, id, &mut self.vmx(cpu), &mut NoHook)
            .unwrap();
        assert!(loaded.newly_on_this_cpu && loaded.vmptrld);
        id
    }

    fn phys(&self, id: VmcsId) -> u64 {
        self.arena.vmcs_phys(id).unwrap()
    }

    /// The entries on `cpu`'s list, front first.
    fn list(&self, cpu: usize) -> Vec<VmcsId> {
        let mut ids = Vec::new();
        let walk = self.arena.walk_on(cpu, |id, _| ids.push(id));
        assert_eq!(walk.end, WalkEnd::Complete);
        ids
    }

    /// Frees the entry and poisons it like freed memory: a walk that reaches
    /// it afterwards VMCLEARs a poisoned address (a use-after-free in the
    /// fake) and follows a poisoned link (the walk ends with `BadIndex`).
    fn free_and_poison(&self, id: VmcsId) {
        self.arena.free(id).unwrap();
        let entry = &self.arena.entries[id.index()];
        let poison = POISON_PHYS | u64::from(id.0) << 12;
        entry.vmcs_phys.store(poison, Ordering::Relaxed);
        entry.next.store(POISON_LINK, Ordering::Relaxed);
        entry.prev.store(POISON_LINK, Ordering::Relaxed);
        self.machine.lock().unwrap().poisoned.insert(poison);
    }

    /// The structural invariants between operations, and the one the crash
    /// path depends on: every VMCS active on a CPU is on that CPU's list.
    fn assert_consistent(&self) {
        let machine = self.machine.lock().unwrap();
        assert!(machine.violations.is_empty(), "{:?}", machine.violations);
        for cpu in 0..TEST_CPUS {
            let mut ids = Vec::new();
            let walk = self.arena.walk_on(cpu, |id, _| ids.push(id));
            assert_eq!(walk.end, WalkEnd::Complete, "cpu {cpu}");
            let mut expected_prev = NONE;
            for &id in &ids {
                let entry = &self.arena.entries[id.index()];
                assert_eq!(entry.state.load(Ordering::Relaxed), ALLOCATED);
                assert_eq!(entry.cpu.load(Ordering::Relaxed), cpu as u32, "{id:?}");
                assert_eq!(entry.prev.load(Ordering::Relaxed), expected_prev, "{id:?}");
                expected_prev = id.0;
            }
            let listed: BTreeSet<VmcsId> = ids.iter().copied().collect();
            assert_eq!(listed.len(), ids.len(), "cpu {cpu}: an entry twice");
            for (index, entry) in self.arena.entries.iter().enumerate() {
                if entry.state.load(Ordering::Relaxed) == ALLOCATED
                    && entry.cpu.load(Ordering::Relaxed) == cpu as u32
                {
                    assert!(
                        listed.contains(&VmcsId(index as u32)),
                        "cpu {cpu}: {index} unlisted"
                    );
                }
            }
            let listed_phys: BTreeSet<u64> = ids.iter().map(|&id| self.phys(id)).collect();
            assert!(
                machine.active[cpu].is_subset(&listed_phys),
                "cpu {cpu}: active {:x?} but listed {:x?}",
                machine.active[cpu],
                listed_phys
            );
            let current = self.arena.current(cpu).unwrap().map(|id| self.phys(id));
            assert_eq!(current, machine.current[cpu], "cpu {cpu}: current VMCS");
        }
    }
}

/// What the crash walk found when an NMI hit one point.
#[derive(Debug, Clone)]
struct NmiCheck {
    /// The store just made; `None` for a crash after the whole operation.
    at: Option<StorePoint>,
    cpu: usize,
    walk: VmclearAll,
    /// VMCSes still active (maybe cached) on the CPU after the walk.
    leaked: BTreeSet<u64>,
    violations: Vec<String>,
}

impl NmiCheck {
    fn is_safe(&self) -> bool {
        self.leaked.is_empty() && self.violations.is_empty() && self.walk.end == WalkEnd::Complete
    }
}

/// The crash NMI on `cpu`: run the walk, then look at what is left.
fn crash_nmi(
    arena: &Arena,
    machine: &SharedMachine,
    cpu: usize,
    at: Option<StorePoint>,
) -> NmiCheck {
    let before = machine.lock().unwrap().violations.len();
    let walk = arena.crash_vmclear_all(cpu, &mut FakeVmx::on(machine, cpu));
    assert!(walk.visited as usize <= TEST_ENTRIES, "the walk is bounded");
    let m = machine.lock().unwrap();
    NmiCheck {
        at,
        cpu,
        walk,
        leaked: m.active[cpu].clone(),
        violations: m.violations[before..].to_vec(),
    }
}

/// Counts stores across all CPUs of one scenario run and fires the crash NMI
/// after store number `target`.
#[derive(Clone)]
struct Injection {
    stores: Rc<Cell<usize>>,
    points: Rc<RefCell<Vec<StorePoint>>>,
    target: usize,
    fired: Rc<RefCell<Option<NmiCheck>>>,
}

impl Injection {
    fn at(target: usize) -> Self {
        Self {
            stores: Rc::new(Cell::new(0)),
            points: Rc::new(RefCell::new(Vec::new())),
            target,
            fired: Rc::new(RefCell::new(None)),
        }
    }

    fn never() -> Self {
        Self::at(usize::MAX)
    }

    /// The hook for stores made by `cpu`.
    fn on<'a>(&self, world: &'a World, cpu: usize) -> NmiHook<'a> {
        NmiHook {
            injection: self.clone(),
            arena: &world.arena,
            machine: Arc::clone(&world.machine),
            cpu,
        }
    }
}

struct NmiHook<'a> {
    injection: Injection,
    arena: &'a Arena,
    machine: SharedMachine,
    cpu: usize,
}

impl StoreHook for NmiHook<'_> {
    fn after_store(&mut self, point: StorePoint) {
        let n = self.injection.stores.get();
        self.injection.stores.set(n + 1);
        self.injection.points.borrow_mut().push(point);
        if n == self.injection.target {
            let check = crash_nmi(self.arena, &self.machine, self.cpu, Some(point));
            *self.injection.fired.borrow_mut() = Some(check);
        }
    }
}

/// Runs `op` once per store it makes, on a fresh world from `setup` each
/// time, with the crash NMI after that store; then once more with the crash
/// on every CPU after `op` and `after` (e.g. freeing the entry) are done.
/// Returns every check and the store points of one run.
fn nmi_after_every_store(
    setup: impl Fn() -> World,
    op: impl Fn(&World, &Injection),
    after: impl Fn(&World),
) -> (Vec<NmiCheck>, Vec<StorePoint>) {
    let world = setup();
    let counting = Injection::never();
    op(&world, &counting);
    let points = counting.points.borrow().clone();
    assert!(!points.is_empty(), "the operation made no store");

    let mut checks = Vec::new();
    for target in 0..points.len() {
        let world = setup();
        let injection = Injection::at(target);
        op(&world, &injection);
        let check = injection.fired.borrow_mut().take();
        checks.push(check.expect("every counted store is reached again"));
    }
    let world = setup();
    op(&world, &Injection::never());
    after(&world);
    world.assert_consistent();
    for cpu in 0..TEST_CPUS {
        checks.push(crash_nmi(&world.arena, &world.machine, cpu, None));
    }
    (checks, points)
}

fn assert_all_safe(checks: &[NmiCheck], what: &str) {
    for check in checks {
        assert!(check.is_safe(), "{what}: {check:?}");
    }
}

/// A list of `len` loaded VMCSes on CPU 0 (returned front first), two more
/// on CPU 1 (a walk on CPU 0 touching them is a violation), and a freed,
/// poisoned entry that used to sit in the middle of CPU 0's list.
fn list_of(len: usize) -> (World, Vec<VmcsId>) {
    let world = World::new();
    world.loaded(1);
    world.loaded(1);
    for _ in 0..len / 2 {
        world.loaded(0);
    }
    let ghost = world.loaded(0);
    for _ in len / 2..len {
        world.loaded(0);
    }
    world
        .arena
        .unload(0, ghost, &mut world.vmx(0), &mut NoHook)
        .unwrap();
    world.free_and_poison(ghost);
    let ids = world.list(0);
    assert_eq!(ids.len(), len);
    world.assert_consistent();
    (world, ids)
}

// ---------------------------------------------------------------------------
// An NMI after every store of load (add) and unload (remove).
// ---------------------------------------------------------------------------

#[test]
fn nmi_after_every_store_of_load_clears_everything_active() {
    for len in 0..=5 {
        let setup = || {
            let (world, _) = list_of(len);
            world.alloc();
            world
        };
        let (checks, points) = nmi_after_every_store(
            setup,
            |world, injection| {
                let id = the_unlisted_entry(world);
                world
                    .arena
                    .load_here(0, id, &mut world.vmx(0), &mut injection.on(world, 0))
                    .unwrap();
            },
            |_| {},
        );
        let mut expected = vec![
            StorePoint::AddClaim,
            StorePoint::AddSetNext,
            StorePoint::AddSetPrev,
        ];
        if len > 0 {
            expected.push(StorePoint::AddBackLink);
        }
        expected.extend([
            StorePoint::AddPublish,
            StorePoint::LoadVmptrld,
            StorePoint::LoadSetCurrent,
        ]);
        assert_eq!(points, expected, "len {len}: one NMI per store");
        assert_all_safe(&checks, &format!("load onto a list of {len}"));
    }
}

/// The allocated entry that is on no list (the one a scenario will load).
fn the_unlisted_entry(world: &World) -> VmcsId {
    let unlisted: Vec<VmcsId> = (0..TEST_ENTRIES as u32)
        .map(VmcsId)
        .filter(|&id| world.arena.loaded_on(id) == Ok(None))
        .collect();
    assert_eq!(unlisted.len(), 1);
    unlisted[0]
}

#[test]
fn nmi_after_every_store_of_unload_at_every_position_clears_everything_active() {
    for len in 1..=5 {
        for position in 0..len {
            let (checks, points) = nmi_after_every_store(
                || list_of(len).0,
                |world, injection| {
                    let id = world.list(0)[position];
                    let unloaded = world
                        .arena
                        .unload(0, id, &mut world.vmx(0), &mut injection.on(world, 0))
                        .unwrap();
                    assert_eq!(unloaded, Unloaded::Cleared);
                },
                |world| {
                    // Whatever is unlisted now was just unloaded: free it.
                    let id = the_unlisted_entry(world);
                    world.free_and_poison(id);
                },
            );
            let is_current = position == 0;
            let has_successor = position + 1 < len;
            let mut expected = vec![StorePoint::UnloadVmclear];
            if is_current {
                expected.push(StorePoint::UnloadResetCurrent);
            }
            expected.extend([StorePoint::UnloadResetLaunched, StorePoint::RemoveUnlink]);
            if has_successor {
                expected.push(StorePoint::RemoveBackLink);
            }
            expected.push(StorePoint::RemoveReleaseCpu);
            assert_eq!(points, expected, "len {len} position {position}");
            assert_all_safe(&checks, &format!("unload position {position} of {len}"));
        }
    }
}

#[test]
fn nmi_during_unload_may_vmclear_the_leaving_entry_twice_which_is_harmless() {
    let (checks, _) = nmi_after_every_store(
        || list_of(3).0,
        |world, injection| {
            let id = world.list(0)[1];
            world
                .arena
                .unload(0, id, &mut world.vmx(0), &mut injection.on(world, 0))
                .unwrap();
        },
        |_| {},
    );
    let still_seen = checks
        .iter()
        .find(|check| check.at == Some(StorePoint::UnloadVmclear))
        .unwrap();
    assert_eq!(
        still_seen.walk.visited, 3,
        "before the unlink the walk still reaches it"
    );
    let gone = checks
        .iter()
        .find(|check| check.at == Some(StorePoint::RemoveUnlink))
        .unwrap();
    assert_eq!(gone.walk.visited, 2, "after the unlink it does not");
    assert!(still_seen.is_safe() && gone.is_safe());
}

#[test]
fn nmi_during_add_misses_the_new_entry_only_before_it_is_active() {
    let (checks, _) = nmi_after_every_store(
        || {
            let (world, _) = list_of(2);
            world.alloc();
            world
        },
        |world, injection| {
            let id = the_unlisted_entry(world);
            world
                .arena
                .load_here(0, id, &mut world.vmx(0), &mut injection.on(world, 0))
                .unwrap();
        },
        |_| {},
    );
    for check in &checks[..checks.len() - TEST_CPUS] {
        let published = matches!(
            check.at,
            Some(StorePoint::AddPublish | StorePoint::LoadVmptrld | StorePoint::LoadSetCurrent)
        );
        assert_eq!(
            check.walk.visited,
            if published { 3 } else { 2 },
            "{check:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// The broken orders fail the same checks.
// ---------------------------------------------------------------------------

/// The order Linux had before 31603d4fc2bb: unlink, then VMCLEAR.
fn broken_unload_unlink_first(world: &World, cpu: usize, id: VmcsId, hook: &mut impl StoreHook) {
    world.arena.remove(cpu, id, hook).unwrap();
    world.vmx(cpu).vmclear(world.phys(id)).unwrap();
    hook.after_store(StorePoint::UnloadVmclear);
    if world.arena.current[cpu].load(Ordering::Relaxed) == id.0 {
        world.arena.current[cpu].store(NONE, Ordering::Relaxed);
        hook.after_store(StorePoint::UnloadResetCurrent);
    }
}

/// VMPTRLD before the add: active before it is reachable.
fn broken_load_vmptrld_first(world: &World, cpu: usize, id: VmcsId, hook: &mut impl StoreHook) {
    world.vmx(cpu).vmptrld(world.phys(id)).unwrap();
    hook.after_store(StorePoint::LoadVmptrld);
    world.arena.add(cpu, id, hook).unwrap();
    world.arena.current[cpu].store(id.0, Ordering::Relaxed);
    hook.after_store(StorePoint::LoadSetCurrent);
}

/// An add that publishes the entry before setting its `next`.
fn broken_add_publish_first(world: &World, cpu: usize, id: VmcsId, hook: &mut impl StoreHook) {
    let arena = &world.arena;
    let entry = &arena.entries[id.index()];
    let old_first = arena.heads[cpu].load(Ordering::Relaxed);
    entry.cpu.store(cpu as u32, Ordering::Relaxed);
    hook.after_store(StorePoint::AddClaim);
    arena.heads[cpu].store(id.0, Ordering::Release);
    hook.after_store(StorePoint::AddPublish);
    entry.next.store(old_first, Ordering::Relaxed);
    hook.after_store(StorePoint::AddSetNext);
    entry.prev.store(NONE, Ordering::Relaxed);
    hook.after_store(StorePoint::AddSetPrev);
    if let Some(old) = arena.entries.get(old_first as usize) {
        old.prev.store(id.0, Ordering::Relaxed);
        hook.after_store(StorePoint::AddBackLink);
    }
    world.vmx(cpu).vmptrld(world.phys(id)).unwrap();
    hook.after_store(StorePoint::LoadVmptrld);
    arena.current[cpu].store(id.0, Ordering::Relaxed);
    hook.after_store(StorePoint::LoadSetCurrent);
}

fn leaks(checks: &[NmiCheck]) -> Vec<&NmiCheck> {
    checks
        .iter()
        .filter(|check| !check.leaked.is_empty())
        .collect()
}

#[test]
fn broken_order_unlink_before_vmclear_leaks_a_cached_vmcs_at_every_position() {
    for len in 1..=5 {
        for position in 0..len {
            let (checks, _) = nmi_after_every_store(
                || list_of(len).0,
                |world, injection| {
                    let id = world.list(0)[position];
                    broken_unload_unlink_first(world, 0, id, &mut injection.on(world, 0));
                },
                |_| {},
            );
            let leaked = leaks(&checks);
            assert!(
                !leaked.is_empty(),
                "len {len} position {position}: checker missed the leak"
            );
            // Exactly the stores between the unlink and the VMCLEAR leak the
            // entry being unloaded, and nothing else ever leaks.
            let (reference, ids) = list_of(len);
            let victim_phys = reference.phys(ids[position]);
            for check in &leaked {
                assert_eq!(check.leaked, BTreeSet::from([victim_phys]), "{check:?}");
                assert!(
                    matches!(
                        check.at,
                        Some(
                            StorePoint::RemoveUnlink
                                | StorePoint::RemoveBackLink
                                | StorePoint::RemoveReleaseCpu
                        )
                    ),
                    "{check:?}"
                );
            }
        }
    }
}

#[test]
fn broken_order_vmptrld_before_add_leaks_a_cached_vmcs() {
    for len in 0..=5 {
        let (checks, _) = nmi_after_every_store(
            || {
                let (world, _) = list_of(len);
                world.alloc();
                world
            },
            |world, injection| {
                let id = the_unlisted_entry(world);
                broken_load_vmptrld_first(world, 0, id, &mut injection.on(world, 0));
            },
            |_| {},
        );
        let leaked = leaks(&checks);
        assert!(!leaked.is_empty(), "len {len}: checker missed the leak");
        assert!(leaked.iter().all(|c| c.at != Some(StorePoint::AddPublish)));
    }
}

#[test]
fn broken_order_publish_before_next_loses_the_rest_of_the_list() {
    for len in 1..=5 {
        let (checks, _) = nmi_after_every_store(
            || {
                let (world, _) = list_of(len);
                world.alloc();
                world
            },
            |world, injection| {
                let id = the_unlisted_entry(world);
                broken_add_publish_first(world, 0, id, &mut injection.on(world, 0));
            },
            |_| {},
        );
        let leaked = leaks(&checks);
        assert_eq!(leaked.len(), 1, "len {len}: {checks:?}");
        assert_eq!(leaked[0].at, Some(StorePoint::AddPublish));
        assert_eq!(leaked[0].leaked.len(), len, "every older entry is missed");
    }
}

// ---------------------------------------------------------------------------
// Migration between CPUs.
// ---------------------------------------------------------------------------

/// `load_on` with the remote clear run directly on the owner (what the
/// call-function IPI does), with NMI injection on both CPUs.
fn migrate(world: &World, to: usize, id: VmcsId, injection: &Injection) -> Loaded {
    world
        .arena
        .load_on(
            to,
            id,
            &mut world.vmx(to),
            &mut injection.on(world, to),
            |owner, id| {
                world
                    .arena
                    .unload(
                        owner,
                        id,
                        &mut world.vmx(owner),
                        &mut injection.on(world, owner),
                    )
                    .map(|_| ())
            },
        )
        .unwrap()
}

#[test]
fn nmi_after_every_store_of_a_migration_clears_everything_on_both_cpus() {
    for len in 1..=4 {
        for position in 0..len {
            let (checks, points) = nmi_after_every_store(
                || {
                    let (world, _) = list_of(len);
                    world.loaded(2);
                    world
                },
                |world, injection| {
                    let id = world.list(0)[position];
                    let loaded = migrate(world, 2, id, injection);
                    assert_eq!(loaded.evicted_from, Some(0));
                    assert!(loaded.newly_on_this_cpu);
                },
                |world| {
                    assert_eq!(world.list(0).len(), len - 1);
                    assert_eq!(world.list(2).len(), 2);
                },
            );
            assert!(points.contains(&StorePoint::RemoveReleaseCpu));
            assert!(points.contains(&StorePoint::AddPublish));
            let cpus: BTreeSet<usize> = checks
                .iter()
                .filter(|c| c.at.is_some())
                .map(|c| c.cpu)
                .collect();
            assert_eq!(cpus, BTreeSet::from([0, 2]), "NMIs hit both CPUs' stores");
            assert_all_safe(&checks, &format!("migrate position {position} of {len}"));
        }
    }
}

#[test]
fn migration_a_to_b_to_c_and_back_keeps_one_active_copy_and_relaunches() {
    let world = World::new();
    let id = world.loaded(0);
    world.arena.mark_launched(id).unwrap();
    let phys = world.phys(id);
    for (to, from) in [(1, 0), (2, 1), (0, 2), (0, 0)] {
        let loaded = migrate(&world, to, id, &Injection::never());
        world.assert_consistent();
        assert_eq!(world.arena.loaded_on(id), Ok(Some(to)));
        let machine = world.machine.lock().unwrap();
        let holders: Vec<usize> = (0..TEST_CPUS)
            .filter(|&c| machine.active[c].contains(&phys))
            .collect();
        assert_eq!(holders, [to]);
        drop(machine);
        if to == from {
            assert_eq!(loaded.evicted_from, None);
            assert!(
                !loaded.newly_on_this_cpu && !loaded.vmptrld,
                "already current here"
            );
            assert!(
                world.arena.is_launched(id).unwrap(),
                "no VMCLEAR: still VMRESUME"
            );
        } else {
            assert_eq!(loaded.evicted_from, Some(from));
            assert!(loaded.newly_on_this_cpu, "host state must be refreshed");
            assert!(
                !world.arena.is_launched(id).unwrap(),
                "VMCLEARed: next is VMLAUNCH"
            );
            world.arena.mark_launched(id).unwrap();
        }
    }
    let machine = world.machine.lock().unwrap();
    assert_eq!(machine.vmclears, [(0, phys), (1, phys), (2, phys)]);
}

#[test]
fn switching_vmcs_on_one_cpu_vmptrlds_without_relisting() {
    let world = World::new();
    let a = world.loaded(0);
    let b = world.loaded(0);
    let vmptrlds = || world.machine.lock().unwrap().vmptrlds.len();
    assert_eq!(vmptrlds(), 2);
    let again = world
        .arena
        .load_here(0, b, &mut world.vmx(0), &mut NoHook)
        .unwrap();
    assert!(!again.vmptrld && !again.newly_on_this_cpu);
    assert_eq!(vmptrlds(), 2, "the current VMCS is not reloaded");
    let back = world
        .arena
        .load_here(0, a, &mut world.vmx(0), &mut NoHook)
        .unwrap();
    assert!(back.vmptrld && !back.newly_on_this_cpu);
    assert_eq!(vmptrlds(), 3);
    assert_eq!(world.list(0), [b, a], "no second add");
    world.assert_consistent();
}

#[test]
fn load_here_refuses_a_vmcs_still_loaded_elsewhere() {
    let world = World::new();
    let id = world.loaded(0);
    let refused = world.arena.load_here(1, id, &mut world.vmx(1), &mut NoHook);
    assert_eq!(refused, Err(ListError::LoadedElsewhere { cpu: 0 }));
    assert_eq!(
        world.arena.add(1, id, &mut NoHook),
        Err(ListError::LoadedElsewhere { cpu: 0 })
    );
    assert_eq!(
        world.arena.add(0, id, &mut NoHook),
        Err(ListError::AlreadyOnThisCpu)
    );
    world.assert_consistent();
}

#[test]
fn eviction_that_did_not_clear_is_reported_and_nothing_is_loaded() {
    let world = World::new();
    let id = world.loaded(0);
    let result = world
        .arena
        .load_on(1, id, &mut world.vmx(1), &mut NoHook, |_, _| Ok(()));
    assert_eq!(result, Err(ListError::LoadedElsewhere { cpu: 0 }));
    let failing = world
        .arena
        .load_on(1, id, &mut world.vmx(1), &mut NoHook, |_, _| {
            Err(ListError::Vmx(VmxError::FailInvalid))
        });
    assert_eq!(failing, Err(ListError::Vmx(VmxError::FailInvalid)));
    assert_eq!(world.list(1), []);
    world.assert_consistent();
}

#[test]
fn remote_unload_that_lost_a_race_changes_nothing() {
    let world = World::new();
    let id = world.loaded(0);
    let late = world.arena.unload(1, id, &mut world.vmx(1), &mut NoHook);
    assert_eq!(late, Ok(Unloaded::NotLoadedHere));
    assert_eq!(world.machine.lock().unwrap().vmclears, []);
    assert_eq!(
        world.arena.remove(1, id, &mut NoHook),
        Err(ListError::NotOnThisCpu { loaded_on: Some(0) })
    );
    world.assert_consistent();
}

// ---------------------------------------------------------------------------
// Failures and corruption.
// ---------------------------------------------------------------------------

#[test]
fn failed_vmclear_keeps_the_entry_listed_so_the_crash_walk_retries_it() {
    let world = World::new();
    let id = world.loaded(0);
    let phys = world.phys(id);
    world.machine.lock().unwrap().failing_vmclear.insert(phys);
    let result = world.arena.unload(0, id, &mut world.vmx(0), &mut NoHook);
    assert_eq!(result, Err(ListError::Vmx(VmxError::FailInvalid)));
    assert_eq!(world.list(0), [id]);
    assert_eq!(world.arena.free(id), Err(ListError::StillLoaded { cpu: 0 }));
    let walk = world.arena.crash_vmclear_all(0, &mut world.vmx(0));
    assert_eq!((walk.visited, walk.cleared, walk.failed), (1, 0, 1));
    world.machine.lock().unwrap().failing_vmclear.clear();
    assert_eq!(
        world.arena.unload(0, id, &mut world.vmx(0), &mut NoHook),
        Ok(Unloaded::Cleared)
    );
    world.arena.free(id).unwrap();
    world.assert_consistent();
}

#[test]
fn crash_walk_counts_failures_and_goes_on_past_them() {
    let world = World::new();
    let ids: Vec<VmcsId> = (0..4).map(|_| world.loaded(0)).collect();
    world
        .machine
        .lock()
        .unwrap()
        .failing_vmclear
        .insert(world.phys(ids[2]));
    let walk = world.arena.crash_vmclear_all(0, &mut world.vmx(0));
    assert_eq!(
        walk,
        VmclearAll {
            visited: 4,
            cleared: 3,
            failed: 1,
            end: WalkEnd::Complete
        }
    );
    assert_eq!(
        world.machine.lock().unwrap().active[0],
        BTreeSet::from([world.phys(ids[2])])
    );
}

#[test]
fn failed_vmptrld_unlinks_the_new_entry_again() {
    struct RefusingVmx;
    impl Vmx for RefusingVmx {
        fn vmclear(&mut self, _: u64) -> Result<(), VmxError> {
            panic!("nothing was loaded, nothing to clear")
        }
        fn vmptrld(&mut self, _: u64) -> Result<(), VmxError> {
            Err(VmxError::FailValid {
                instruction_error: 9,
            })
        }
    }
    let world = World::new();
    let kept = world.loaded(0);
    let id = world.alloc();
    let result = world.arena.load_here(0, id, &mut RefusingVmx, &mut NoHook);
    assert_eq!(
        result,
        Err(ListError::Vmx(VmxError::FailValid {
            instruction_error: 9
        }))
    );
    assert_eq!(world.arena.loaded_on(id), Ok(None));
    assert_eq!(world.list(0), [kept]);
    world.assert_consistent();
}

#[test]
fn crash_walk_stops_at_a_link_outside_the_arena() {
    let world = World::new();
    let ids: Vec<VmcsId> = (0..3).map(|_| world.loaded(0)).collect();
    // ids[1] is in the middle of the list (front is ids[2]).
    world.arena.entries[ids[1].index()]
        .next
        .store(4000, Ordering::Relaxed);
    let walk = world.arena.crash_vmclear_all(0, &mut world.vmx(0));
    assert_eq!(walk.end, WalkEnd::BadIndex { index: 4000 });
    assert_eq!((walk.visited, walk.cleared), (2, 2));
}

#[test]
fn crash_walk_terminates_on_a_cycle() {
    let world = World::new();
    let ids: Vec<VmcsId> = (0..3).map(|_| world.loaded(0)).collect();
    // Tail (ids[0]) back to the front (ids[2]).
    world.arena.entries[ids[0].index()]
        .next
        .store(ids[2].0, Ordering::Relaxed);
    let walk = world.arena.crash_vmclear_all(0, &mut world.vmx(0));
    assert_eq!(walk.end, WalkEnd::StepLimit);
    assert_eq!(walk.visited as usize, TEST_ENTRIES);
    assert!(world.machine.lock().unwrap().active[0].is_empty());
}

#[test]
fn crash_walk_never_reads_prev() {
    let world = World::new();
    for _ in 0..4 {
        world.loaded(0);
    }
    for entry in &world.arena.entries {
        entry.prev.store(POISON_LINK, Ordering::Relaxed);
    }
    let walk = world.arena.crash_vmclear_all(0, &mut world.vmx(0));
    assert_eq!(
        (walk.visited, walk.cleared, walk.end),
        (4, 4, WalkEnd::Complete)
    );
}

#[test]
fn crash_walk_of_an_unknown_cpu_reports_it() {
    let world = World::new();
    let walk = world.arena.crash_vmclear_all(TEST_CPUS, &mut world.vmx(0));
    assert_eq!(walk.end, WalkEnd::NoSuchCpu);
    assert_eq!(walk.visited, 0);
}

#[test]
fn operations_reject_bad_arguments_without_changing_anything() {
    let world = World::new();
    assert_eq!(
        world.arena.alloc(0x1234),
        Err(ListError::MisalignedVmcs { phys: 0x1234 })
    );
    let id = world.loaded(0);
    assert_eq!(
        world
            .arena
            .load_here(TEST_CPUS, id, &mut world.vmx(0), &mut NoHook),
        Err(ListError::NoSuchCpu { cpu: TEST_CPUS })
    );
    let stranger = VmcsId(TEST_ENTRIES as u32 - 1);
    assert_eq!(
        world.arena.free(stranger),
        Err(ListError::NoSuchEntry { id: stranger })
    );
    assert_eq!(world.arena.free(id), Err(ListError::StillLoaded { cpu: 0 }));
    while world.arena.alloc(0x1000).is_ok() {}
    assert_eq!(world.arena.alloc(0x1000), Err(ListError::ArenaFull));
    assert_eq!(world.list(0), [id]);
}

#[test]
fn add_refuses_a_list_whose_head_is_corrupt() {
    let world = World::new();
    let id = world.alloc();
    world.arena.heads[0].store(999, Ordering::Relaxed);
    assert_eq!(
        world.arena.add(0, id, &mut NoHook),
        Err(ListError::CorruptLink { index: 999 })
    );
    assert_eq!(world.arena.loaded_on(id), Ok(None), "not claimed");
}

static BOOT_TIME_LISTS: VmcsArena<4, { crate::MAX_CPUS }> = VmcsArena::new();

#[test]
fn every_possible_cpu_has_an_empty_list_from_construction() {
    for cpu in [0, 1, crate::MAX_CPUS - 1] {
        let walk =
            BOOT_TIME_LISTS.crash_vmclear_all(cpu, &mut FakeVmx::on(&FakeVmx::new_machine(1), 0));
        assert_eq!(
            walk,
            VmclearAll {
                visited: 0,
                cleared: 0,
                failed: 0,
                end: WalkEnd::Complete
            }
        );
    }
}

#[test]
fn store_point_names_round_trip() {
    for point in StorePoint::ALL {
        assert_eq!(StorePoint::from_name(point.name()), Some(point));
    }
    assert_eq!(StorePoint::from_name("no-such-point"), None);
    let names: BTreeSet<&str> = StorePoint::ALL.iter().map(|p| p.name()).collect();
    assert_eq!(names.len(), StorePoint::ALL.len());
}

// ---------------------------------------------------------------------------
// Randomized: many operations, the crash NMI at random stores.
// ---------------------------------------------------------------------------

/// Fires the crash NMI at store number `fire_at` counted from the hook's
/// creation (for any CPU of the operation).
struct RandomNmi<'a> {
    world: &'a World,
    cpu: usize,
    stores: Rc<Cell<usize>>,
    fire_at: Option<usize>,
    fired: Rc<RefCell<Option<NmiCheck>>>,
}

impl StoreHook for RandomNmi<'_> {
    fn after_store(&mut self, point: StorePoint) {
        let n = self.stores.get();
        self.stores.set(n + 1);
        if Some(n) == self.fire_at && self.fired.borrow().is_none() {
            let check = crash_nmi(
                &self.world.arena,
                &self.world.machine,
                self.cpu,
                Some(point),
            );
            *self.fired.borrow_mut() = Some(check);
        }
    }
}

/// One run of `operations` random operations; returns the store point at
/// which the crash NMI fired, if it did (the run ends there).
fn random_run(seed: u64, operations: usize) -> Option<StorePoint> {
    let mut rng = Rng::new(seed);
    let world = World::new();
    let mut allocated: Vec<VmcsId> = Vec::new();
    for step in 0..operations {
        let stores = Rc::new(Cell::new(0));
        let fired = Rc::new(RefCell::new(None));
        let fire_at = rng.chance(4).then(|| rng.below(8));
        let hook = |cpu| RandomNmi {
            world: &world,
            cpu,
            stores: Rc::clone(&stores),
            fire_at,
            fired: Rc::clone(&fired),
        };
        let cpu = rng.below(TEST_CPUS);
        match rng.below(10) {
            0 | 1 if allocated.len() < TEST_ENTRIES => allocated.push(world.alloc()),
            2 if !allocated.is_empty() => {
                let id = allocated.swap_remove(rng.below(allocated.len()));
                if let Some(owner) = world.arena.loaded_on(id).unwrap() {
                    let unloaded =
                        world
                            .arena
                            .unload(owner, id, &mut world.vmx(owner), &mut hook(owner));
                    assert_eq!(unloaded, Ok(Unloaded::Cleared));
                }
                world.free_and_poison(id);
            }
            3 | 4 if !allocated.is_empty() => {
                let id = allocated[rng.below(allocated.len())];
                if let Some(owner) = world.arena.loaded_on(id).unwrap() {
                    let unloaded =
                        world
                            .arena
                            .unload(owner, id, &mut world.vmx(owner), &mut hook(owner));
                    assert_eq!(unloaded, Ok(Unloaded::Cleared));
                }
            }
            _ if !allocated.is_empty() => {
                let id = allocated[rng.below(allocated.len())];
                world
                    .arena
                    .load_on(cpu, id, &mut world.vmx(cpu), &mut hook(cpu), |owner, id| {
                        world
                            .arena
                            .unload(owner, id, &mut world.vmx(owner), &mut hook(owner))
                            .map(|_| ())
                    })
                    .unwrap();
                if rng.chance(50) {
                    world.arena.mark_launched(id).unwrap();
                }
            }
            _ => {}
        }
        if let Some(check) = fired.borrow_mut().take() {
            assert!(check.is_safe(), "seed {seed} step {step}: {check:?}");
            return check.at; // the machine crashed: this run is over
        }
        world.assert_consistent();
    }
    for cpu in 0..TEST_CPUS {
        let check = crash_nmi(&world.arena, &world.machine, cpu, None);
        assert!(check.is_safe(), "seed {seed} at the end: {check:?}");
    }
    None
}

#[test]
fn random_operations_with_the_crash_nmi_at_random_stores_never_leak() {
    let mut crashed_at = BTreeSet::new();
    let mut crashes = 0;
    for seed in 0..2000 {
        if let Some(point) = random_run(seed, 80) {
            crashes += 1;
            crashed_at.insert(point.name());
        }
    }
    assert!(crashes > 1000, "most runs end in a crash: {crashes}");
    let every_point: BTreeSet<&str> = StorePoint::ALL.iter().map(|p| p.name()).collect();
    assert_eq!(crashed_at, every_point, "the NMI hit every kind of store");
}

// ---------------------------------------------------------------------------
// Real threads: CPUs migrating vCPUs between each other through "IPIs".
// ---------------------------------------------------------------------------

type ClearRequest = (VmcsId, mpsc::Sender<Result<Unloaded, ListError>>);

/// Each thread is a CPU. A vCPU (one VMCS) runs on one CPU at a time (its
/// `running` token, like KVM's vcpu mutex) but stays loaded where it last
/// ran, so loading it elsewhere needs the old CPU to VMCLEAR it: the thread
/// posts a request to the owner's mailbox (the call-function IPI) and waits,
/// serving its own mailbox meanwhile (as a CPU with interrupts enabled
/// would). Checks that a VMCS is never active on two CPUs, that every load
/// finds it free after the eviction (the release/acquire handoff of `cpu`),
/// and that the lists are consistent at the end.
#[test]
fn cpus_migrating_vcpus_concurrently_keep_each_vmcs_on_one_list() {
    const CPUS: usize = 4;
    const VCPUS: usize = 6;
    /// Every CPU goes on until the CPUs together have migrated this often
    /// (running alone, a CPU would only reload its own VMCSes).
    const MIGRATIONS: usize = 2000;
    const TIME_CAP: std::time::Duration = std::time::Duration::from_secs(30);
    let arena: VmcsArena<VCPUS, CPUS> = VmcsArena::new();
    let machine = FakeVmx::new_machine(CPUS);
    let ids: Vec<VmcsId> = (0..VCPUS as u64)
        .map(|n| arena.alloc(vmcs_region(n)).unwrap())
        .collect();
    let running: Vec<AtomicBool> = (0..VCPUS).map(|_| AtomicBool::new(false)).collect();
    let mailboxes: Vec<Mutex<VecDeque<ClearRequest>>> =
        (0..CPUS).map(|_| Mutex::new(VecDeque::new())).collect();
    let finished = AtomicUsize::new(0);
    let migrations = AtomicUsize::new(0);
    let start = std::sync::Barrier::new(CPUS);
    let aborted = AtomicBool::new(false);
    let started_at = std::time::Instant::now();

    let serve = |cpu: usize, vmx: &mut FakeVmx| {
        while let Some((id, reply)) = mailboxes[cpu].lock().unwrap().pop_front() {
            let _ = reply.send(arena.unload(cpu, id, vmx, &mut NoHook));
        }
    };

    std::thread::scope(|scope| {
        for cpu in 0..CPUS {
            let (arena, machine, ids, running, mailboxes) =
                (&arena, &machine, &ids, &running, &mailboxes);
            let (finished, migrations, serve, start, aborted) =
                (&finished, &migrations, &serve, &start, &aborted);
            scope.spawn(move || {
                let _abort_others_if_this_fails = AbortOnPanic(aborted);
                let mut rng = Rng::new(0xC0FFEE + cpu as u64);
                let mut vmx = FakeVmx::on(machine, cpu);
                start.wait();
                while migrations.load(Ordering::Relaxed) < MIGRATIONS
                    && started_at.elapsed() < TIME_CAP
                {
                    serve(cpu, &mut vmx);
                    let v = rng.below(VCPUS);
                    if running[v]
                        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                        .is_err()
                    {
                        continue;
                    }
                    let evicted = arena
                        .evict_from_other_cpu(cpu, ids[v], |owner, id| {
                            let (reply, answer) = mpsc::channel();
                            mailboxes[owner].lock().unwrap().push_back((id, reply));
                            loop {
                                stop_if_aborted(aborted);
                                serve(cpu, &mut vmx);
                                match answer.try_recv() {
                                    Ok(result) => {
                                        assert_eq!(result, Ok(Unloaded::Cleared));
                                        return Ok(());
                                    }
                                    Err(_) => std::thread::yield_now(),
                                }
                            }
                        })
                        .unwrap();
                    if evicted.is_some() {
                        migrations.fetch_add(1, Ordering::Relaxed);
                    }
                    // "Interrupts off" from here: nobody else touches this list.
                    let loaded = arena.load_here(cpu, ids[v], &mut vmx, &mut NoHook).unwrap();
                    if evicted.is_some() {
                        assert!(loaded.newly_on_this_cpu, "evicted, so added here");
                    }
                    let phys = arena.vmcs_phys(ids[v]).unwrap();
                    assert_eq!(machine.lock().unwrap().current[cpu], Some(phys));
                    arena.mark_launched(ids[v]).unwrap();
                    if rng.chance(10) {
                        // Eager unload, as when a vCPU is destroyed.
                        let unloaded = arena.unload(cpu, ids[v], &mut vmx, &mut NoHook);
                        assert_eq!(unloaded, Ok(Unloaded::Cleared));
                    }
                    running[v].store(false, Ordering::Release);
                }
                finished.fetch_add(1, Ordering::AcqRel);
                while finished.load(Ordering::Acquire) < CPUS {
                    stop_if_aborted(aborted);
                    serve(cpu, &mut vmx);
                    std::thread::yield_now();
                }
            });
        }
    });

    let machine = machine.lock().unwrap();
    assert!(machine.violations.is_empty(), "{:?}", machine.violations);
    assert!(
        migrations.load(Ordering::Relaxed) >= MIGRATIONS,
        "the test must actually migrate"
    );
    let mut seen = BTreeSet::new();
    for cpu in 0..CPUS {
        let mut listed = BTreeSet::new();
        let walk = arena.walk_on(cpu, |id, phys| {
            assert!(seen.insert(id), "{id:?} on two lists");
            assert_eq!(arena.loaded_on(id), Ok(Some(cpu)));
            listed.insert(phys);
        });
        assert_eq!(walk.end, WalkEnd::Complete);
        assert_eq!(machine.active[cpu], listed, "cpu {cpu}: active == listed");
    }
    for &id in &ids {
        assert_eq!(seen.contains(&id), arena.loaded_on(id).unwrap().is_some());
    }
}
