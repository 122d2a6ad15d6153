//! Test doubles shared by the host tests: a fake VMX that tracks which VMCS
//! is active (and so possibly cached) on which fake CPU, and a seeded PRNG.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::loaded_vmcs::{Vmx, VmxError};

/// What the fake hardware knows: per CPU, the VMCSes made active by VMPTRLD
/// and not yet VMCLEARed (the ones the CPU may hold in its non-coherent
/// VMCS cache), and everything the software did that real hardware would
/// punish.
#[derive(Debug, Default)]
pub struct Machine {
    /// Per CPU: active VMCSes.
    pub active: Vec<BTreeSet<u64>>,
    /// Per CPU: the current VMCS.
    pub current: Vec<Option<u64>>,
    /// VMCS regions that were freed: touching one is a use-after-free.
    pub poisoned: BTreeSet<u64>,
    /// VMCLEARs that fail (VMfailInvalid) instead of clearing.
    pub failing_vmclear: BTreeSet<u64>,
    /// Misuse found: VMPTRLD of a VMCS active on another CPU (two caches
    /// holding one VMCS), VMCLEAR on the wrong CPU, touching freed memory.
    pub violations: Vec<String>,
    /// Every VMCLEAR executed, as (cpu, phys).
    pub vmclears: Vec<(usize, u64)>,
    /// Every VMPTRLD executed, as (cpu, phys).
    pub vmptrlds: Vec<(usize, u64)>,
}

impl Machine {
    pub fn new(cpus: usize) -> Self {
        Self {
            active: vec![BTreeSet::new(); cpus],
            current: vec![None; cpus],
            ..Self::default()
        }
    }

    fn active_elsewhere(&self, cpu: usize, phys: u64) -> Option<usize> {
        (0..self.active.len()).find(|&other| other != cpu && self.active[other].contains(&phys))
    }
}

/// A handle on the shared [`Machine`] that executes VMX instructions as one
/// CPU. Cheap to clone, so an "NMI" hook can hold its own handle while the
/// interrupted operation holds another.
#[derive(Debug, Clone)]
pub struct FakeVmx {
    pub cpu: usize,
    pub machine: Arc<Mutex<Machine>>,
}

impl FakeVmx {
    pub fn new_machine(cpus: usize) -> Arc<Mutex<Machine>> {
        Arc::new(Mutex::new(Machine::new(cpus)))
    }

    pub fn on(machine: &Arc<Mutex<Machine>>, cpu: usize) -> Self {
        Self {
            cpu,
            machine: Arc::clone(machine),
        }
    }

    pub fn machine(&self) -> MutexGuard<'_, Machine> {
        self.machine.lock().unwrap()
    }
}

impl Vmx for FakeVmx {
    fn vmclear(&mut self, phys: u64) -> Result<(), VmxError> {
        let cpu = self.cpu;
        let mut m = self.machine();
        m.vmclears.push((cpu, phys));
        if m.poisoned.contains(&phys) {
            m.violations
                .push(format!("cpu {cpu}: VMCLEAR of freed VMCS {phys:#x}"));
        }
        if let Some(other) = m.active_elsewhere(cpu, phys) {
            m.violations.push(format!(
                "cpu {cpu}: VMCLEAR of VMCS {phys:#x} active on cpu {other}"
            ));
        }
        if m.failing_vmclear.contains(&phys) {
            return Err(VmxError::FailInvalid);
        }
        m.active[cpu].remove(&phys);
        if m.current[cpu] == Some(phys) {
            m.current[cpu] = None;
        }
        Ok(())
    }

    fn vmptrld(&mut self, phys: u64) -> Result<(), VmxError> {
        let cpu = self.cpu;
        let mut m = self.machine();
        m.vmptrlds.push((cpu, phys));
        if m.poisoned.contains(&phys) {
            m.violations
                .push(format!("cpu {cpu}: VMPTRLD of freed VMCS {phys:#x}"));
        }
        if let Some(other) = m.active_elsewhere(cpu, phys) {
            m.violations.push(format!(
                "cpu {cpu}: VMPTRLD of VMCS {phys:#x} still active on cpu {other}"
            ));
        }
        m.active[cpu].insert(phys);
        m.current[cpu] = Some(phys);
        Ok(())
    }
}

/// The stress tests' generator: the workspace's seeded one (fastrand), so
/// the seed in every failure message replays the run.
#[derive(Debug, Clone)]
pub struct Rng(fastrand::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    /// Uniform in `0..bound` (bound > 0).
    pub fn below(&mut self, bound: usize) -> usize {
        self.0.usize(0..bound)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.0.u64(0..100) < percent
    }
}

/// Raises `flag` if the thread holding it panics, so that the other threads
/// of a multithreaded test stop waiting for it and the test fails instead of
/// hanging.
#[derive(Debug)]
pub struct AbortOnPanic<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

/// Panics if another thread of the test has panicked (see [`AbortOnPanic`]).
pub fn stop_if_aborted(flag: &std::sync::atomic::AtomicBool) {
    assert!(
        !flag.load(std::sync::atomic::Ordering::Acquire),
        "another thread of this test failed"
    );
}
