//! The loaded-VMCS lists and each VMCS's own record.
//!
//! [`LISTS`] holds every CPU's list of the VMCSes loaded on it (the crash
//! crate's NMI-safe arena, Linux's `loaded_vmcss_on_cpu`). Beside it,
//! every VMCS has a record kept apart from the lists, so that the crash
//! summary can check the lists against it (`crash::accounting`):
//!
//! - `loaded_on`: the CPU whose VMCS cache may hold it, set by the store
//!   hook ([`track`]) right after its list entry is published (before VMPTRLD), and
//!   cleared right after VMCLEAR (before the unlink);
//! - `cleared_by`: the CPU that executed its crash-time VMCLEAR.
//!
//! Both exist for every possible VMCS from the first instruction, before
//! VMX is on: the crash path never finds a missing record. Written by the
//! virtualization layer (loads and unloads, with interrupts off) and by
//! the crash path; read by the crash summary. No lock anywhere.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crash::accounting::VmcsRecords;
use crash::loaded_vmcs::{ListError, StorePoint, VmcsArena, VmcsId};
use smp_boot::madt::MAX_CPUS;

use crate::cpu::percpu;

/// At most this many VMCSes (vCPUs).
pub const MAX_VMCS: usize = 1024;

/// Every CPU's list of loaded VMCSes. Exists for every possible CPU from
/// the first instruction, before VMX is on.
pub static LISTS: VmcsArena<MAX_VMCS, MAX_CPUS> = VmcsArena::new();

/// `loaded_on` and `cleared_by` hold a CPU index plus one; 0 is "none",
/// so the records start all zero (in .bss, not in the image's data).
const NO_CPU: u32 = 0;

#[derive(Debug)]
struct Record {
    vmcs: AtomicU64,
    loaded_on: AtomicU32,
    cleared_by: AtomicU32,
}

static RECORDS: [Record; MAX_VMCS] = [const {
    Record {
        vmcs: AtomicU64::new(0),
        loaded_on: AtomicU32::new(NO_CPU),
        cleared_by: AtomicU32::new(NO_CPU),
    }
}; MAX_VMCS];

/// One past the highest record in use.
static IN_USE: AtomicUsize = AtomicUsize::new(0);

/// Gives the VMCS at `vmcs` a list entry and a record.
pub fn register(vmcs: u64) -> Result<VmcsId, ListError> {
    let id = LISTS.alloc(vmcs)?;
    RECORDS[id.index()].vmcs.store(vmcs, Ordering::Release);
    IN_USE.fetch_max(id.index() + 1, Ordering::AcqRel);
    Ok(id)
}

/// Keeps the record of list entry `id` in step with the list protocol;
/// called from the protocol's hook between its stores.
pub fn track(id: VmcsId, point: StorePoint) {
    let record = &RECORDS[id.index()];
    match point {
        StorePoint::AddPublish => record
            .loaded_on
            .store(percpu::current_cpu_index() + 1, Ordering::Release),
        // After VMCLEAR, and after a failed VMPTRLD's unlink (which skips
        // the VMCLEAR point): nothing of it is cached here.
        StorePoint::UnloadVmclear | StorePoint::RemoveReleaseCpu => {
            record.loaded_on.store(NO_CPU, Ordering::Release)
        }
        _ => {}
    }
}

/// Crash path: credits the VMCLEAR of the VMCS at `vmcs` to `cpu`, the
/// CPU that executed it. A linear scan; no lock.
pub fn note_crash_vmclear(vmcs: u64, cpu: usize) {
    let in_use = IN_USE.load(Ordering::Acquire);
    if let Some(record) = RECORDS[..in_use]
        .iter()
        .find(|record| record.vmcs.load(Ordering::Acquire) == vmcs)
    {
        record.cleared_by.store(cpu as u32 + 1, Ordering::Release);
    }
}

/// The records, for `crash::accounting`.
#[derive(Debug, Clone, Copy)]
pub struct Records;

fn cpu(value: u32) -> Option<usize> {
    value.checked_sub(1).map(|cpu| cpu as usize)
}

impl VmcsRecords for Records {
    fn count(&self) -> usize {
        IN_USE.load(Ordering::Acquire)
    }

    fn vmcs(&self, record: usize) -> u64 {
        RECORDS[record].vmcs.load(Ordering::Acquire)
    }

    fn loaded_on(&self, record: usize) -> Option<usize> {
        cpu(RECORDS[record].loaded_on.load(Ordering::Acquire))
    }

    fn cleared_by(&self, record: usize) -> Option<usize> {
        cpu(RECORDS[record].cleared_by.load(Ordering::Acquire))
    }
}
