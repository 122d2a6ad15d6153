//! The crash path's VMCS accounting: the loaded-VMCS lists checked against
//! an independent record.
//!
//! Every VMCS has its own record, kept apart from the lists: the CPU whose
//! VMCS cache may hold it (`loaded_on`: set right after its list entry is
//! published, before VMPTRLD; cleared right after VMCLEAR, before the
//! unlink), and the CPU that executed its crash-time VMCLEAR
//! (`cleared_by`). After the shootdown every VMCS some record says is
//! loaded must have been cleared, by the CPU the record names, unless that
//! CPU is a straggler (then nobody could clear it). Anything else is a
//! VMCS the lists lost: the bug this crate exists to prevent.

use hv_abi::crash_note::{VmclearOutcome, VmclearRecord};

use crate::cpuset::CpuSet;

/// The per-VMCS records, as the kernel keeps them.
pub trait VmcsRecords {
    /// How many records there are (indexes `0..count`).
    fn count(&self) -> usize;
    /// The VMCS's physical address.
    fn vmcs(&self, record: usize) -> u64;
    /// The CPU whose VMCS cache may hold it, if any.
    fn loaded_on(&self, record: usize) -> Option<usize>;
    /// The CPU that executed its crash-time VMCLEAR, if any did.
    fn cleared_by(&self, record: usize) -> Option<usize>;
}

/// What the records say after a shootdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accounting {
    /// VMCSes the records say may be cached on some CPU.
    pub loaded: u64,
    /// Of those, VMCLEARed in the crash path.
    pub cleared: u64,
    /// Of the cleared, by a CPU other than the one `loaded_on` names (the
    /// lists and the records disagree: should be 0).
    pub cleared_elsewhere: u64,
    /// Of those loaded, on CPUs that never checked in (they cannot be
    /// cleared).
    pub on_stragglers: u64,
    /// Of those loaded, not cleared though their CPU checked in: lost.
    pub lost: u64,
}

/// How one loaded VMCS ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmcsFate {
    /// Cleared by the CPU its record names.
    Cleared,
    /// Cleared, but by another CPU.
    ClearedElsewhere {
        /// The CPU that cleared it.
        by: usize,
    },
    /// Not cleared: its CPU is a straggler.
    OnStraggler,
    /// Not cleared, though its CPU checked in.
    Lost,
}

/// The fate of record `record`, if its VMCS was loaded at the crash.
pub fn fate(records: &impl VmcsRecords, record: usize, stragglers: &CpuSet) -> Option<VmcsFate> {
    let on = records.loaded_on(record)?;
    Some(match records.cleared_by(record) {
        Some(by) if by == on => VmcsFate::Cleared,
        Some(by) => VmcsFate::ClearedElsewhere { by },
        None if stragglers.contains(on) => VmcsFate::OnStraggler,
        None => VmcsFate::Lost,
    })
}

/// Counts every record's fate.
pub fn account(records: &impl VmcsRecords, stragglers: &CpuSet) -> Accounting {
    let mut accounting = Accounting::default();
    for record in 0..records.count() {
        let Some(fate) = fate(records, record, stragglers) else {
            continue;
        };
        accounting.loaded += 1;
        match fate {
            VmcsFate::Cleared => accounting.cleared += 1,
            VmcsFate::ClearedElsewhere { .. } => {
                accounting.cleared += 1;
                accounting.cleared_elsewhere += 1;
            }
            VmcsFate::OnStraggler => accounting.on_stragglers += 1,
            VmcsFate::Lost => accounting.lost += 1,
        }
    }
    accounting
}

/// Fills `out` with CPU `cpu`'s part of the ledger: each VMCS the records
/// say it held, and whether it was VMCLEARed. Returns how many it wrote
/// (at most `out.len()`) and how many the CPU held.
pub fn cpu_ledger(
    records: &impl VmcsRecords,
    cpu: usize,
    out: &mut [VmclearRecord],
) -> (usize, usize) {
    let mut held = 0;
    let mut written = 0;
    for record in (0..records.count()).filter(|&r| records.loaded_on(r) == Some(cpu)) {
        held += 1;
        if let Some(slot) = out.get_mut(written) {
            *slot = VmclearRecord {
                vmcs_phys: records.vmcs(record),
                outcome: if records.cleared_by(record).is_some() {
                    VmclearOutcome::Succeeded
                } else {
                    VmclearOutcome::FailInvalid
                },
            };
            written += 1;
        }
    }
    (written, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (vmcs, loaded_on, cleared_by)
    struct Table(Vec<(u64, Option<usize>, Option<usize>)>);

    impl VmcsRecords for Table {
        fn count(&self) -> usize {
            self.0.len()
        }
        fn vmcs(&self, record: usize) -> u64 {
            self.0[record].0
        }
        fn loaded_on(&self, record: usize) -> Option<usize> {
            self.0[record].1
        }
        fn cleared_by(&self, record: usize) -> Option<usize> {
            self.0[record].2
        }
    }

    #[test]
    fn every_fate_is_counted_once() {
        let table = Table(vec![
            (0x1000, None, None),       // never loaded
            (0x2000, Some(1), Some(1)), // cleared where it was
            (0x3000, Some(2), Some(3)), // cleared by another CPU
            (0x4000, Some(4), None),    // on a straggler
            (0x5000, Some(1), None),    // lost
        ]);
        let stragglers = CpuSet::from_cpus(&[4]).unwrap();
        assert_eq!(
            account(&table, &stragglers),
            Accounting {
                loaded: 4,
                cleared: 2,
                cleared_elsewhere: 1,
                on_stragglers: 1,
                lost: 1,
            }
        );
        assert_eq!(fate(&table, 0, &stragglers), None);
        assert_eq!(
            fate(&table, 2, &stragglers),
            Some(VmcsFate::ClearedElsewhere { by: 3 })
        );
        assert_eq!(fate(&table, 4, &stragglers), Some(VmcsFate::Lost));
    }

    #[test]
    fn a_cpu_ledger_lists_what_its_records_hold() {
        let table = Table(vec![
            (0x2000, Some(1), Some(1)),
            (0x3000, Some(2), Some(2)),
            (0x5000, Some(1), None),
        ]);
        let mut out = [VmclearRecord {
            vmcs_phys: 0,
            outcome: VmclearOutcome::Succeeded,
        }; 4];
        assert_eq!(cpu_ledger(&table, 1, &mut out), (2, 2));
        assert_eq!(out[0].vmcs_phys, 0x2000);
        assert_eq!(out[0].outcome, VmclearOutcome::Succeeded);
        assert_eq!(out[1].vmcs_phys, 0x5000);
        assert_eq!(out[1].outcome, VmclearOutcome::FailInvalid);
        // A short buffer keeps the count of what the CPU held.
        assert_eq!(cpu_ledger(&table, 1, &mut out[..1]), (1, 2));
        assert_eq!(cpu_ledger(&table, 7, &mut out), (0, 0));
    }
}
