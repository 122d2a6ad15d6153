//! The hypervisor's private crash note: why it crashed, who coordinated the
//! shootdown, who did not answer, and what every CPU VMCLEARed.
//!
//! It travels in the ELF core header as a note named
//! [`CRASH_NOTE_NAME`] ("HVCRASH") of type [`NT_HV_CRASH`]. The name is
//! deliberately not "VMCOREINFO": tools such as drgn take that name to
//! mean a Linux kernel dump.
//!
//! # Layout, version 1
//! Little-endian, every section 8-byte aligned inside the note descriptor:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | `version` = 1 |
//! | 4 | 4 | `header_len` = 32 (readers skip a longer header) |
//! | 8 | 4 | `coordinator`: CPU index of the CPU that ran the shootdown |
//! | 12 | 4 | `reason_len`: bytes of UTF-8 |
//! | 16 | 4 | `straggler_count` |
//! | 20 | 4 | `cpu_count` |
//! | 24 | 4 | `vmclear_count`: entries in the VMCLEAR table |
//! | 28 | 4 | reserved, 0 |
//!
//! then, each padded with zeros to a multiple of 8 bytes:
//! 1. the reason, `reason_len` bytes of UTF-8, no NUL;
//! 2. the stragglers: `straggler_count` × u32 APIC ID;
//! 3. the per-CPU ledger: `cpu_count` × 24 bytes: `cpu_index` u32,
//!    `apic_id` u32, `flags` u32 ([`cpu_flags`]), `vmcs_loaded` u32 (counted
//!    from the vCPUs' own state, independently of the loaded-VMCS lists),
//!    `first_vmclear` u32, `vmclear_count` u32: this CPU's entries in the
//!    table below. The CPUs' ranges follow each other in order, with no gap
//!    and no overlap, and together cover the table;
//! 4. the VMCLEAR table: `vmclear_count` × 16 bytes: `vmcs_phys` u64,
//!    `outcome` u32 (0 succeeded, 1 VMfailInvalid, 2 VMfailValid),
//!    `vm_instruction_error` u32 (VMfailValid only, else 0).
//!
//! A reader rejects any other version, and any count or index that does
//! not fit the descriptor.

use core::fmt;

use crate::bytes::{self, OutOfBounds, align_up_usize, u32_at, u64_at};

/// The note's name.
pub const CRASH_NOTE_NAME: &str = "HVCRASH";
/// The note's type: "HVCR" read as a little-endian u32.
pub const NT_HV_CRASH: u32 = u32::from_le_bytes(*b"HVCR");
/// The layout version this crate writes and reads.
pub const CRASH_NOTE_VERSION: u32 = 1;
/// Length of the version-1 header.
pub const HEADER_LEN: usize = 32;
/// Length of one per-CPU ledger record.
pub const CPU_RECORD_LEN: usize = 24;
/// Length of one VMCLEAR table entry.
pub const VMCLEAR_RECORD_LEN: usize = 16;

/// Bits of [`CpuLedger::flags`].
pub mod cpu_flags {
    /// The CPU checked in with the coordinator.
    pub const CHECKED_IN: u32 = 1 << 0;
    /// The CPU was in VMX operation (CR4.VMXE set) when the crash began.
    pub const VMX_WAS_ON: u32 = 1 << 1;
    /// The CPU executed VMXOFF.
    pub const VMXOFF_DONE: u32 = 1 << 2;
    /// This CPU ran the shootdown.
    pub const COORDINATOR: u32 = 1 << 3;
    /// The CPU was in SVM (EFER.SVME set) when the crash began; its
    /// entries in the VMCLEAR table are then VMCBs, each "VMCLEAR" the
    /// SVM clear (clean bits zeroed).
    pub const SVM_WAS_ON: u32 = 1 << 4;
    /// The CPU left SVM: EFER.SVME and VM_HSAVE_PA read back clear.
    pub const SVM_OFF: u32 = 1 << 5;
    /// Its crash NMI came as a guest's exit (it was in guest mode).
    pub const NMI_IN_GUEST: u32 = 1 << 6;
}

/// How one VMCLEAR ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmclearOutcome {
    /// VMsucceed.
    Succeeded,
    /// VMfailInvalid (no current VMCS, or a bad pointer).
    FailInvalid,
    /// VMfailValid with this VM-instruction error number.
    FailValid(u32),
}

impl VmclearOutcome {
    fn encode(self) -> (u32, u32) {
        match self {
            Self::Succeeded => (0, 0),
            Self::FailInvalid => (1, 0),
            Self::FailValid(error) => (2, error),
        }
    }

    fn decode(code: u32, error: u32) -> Option<Self> {
        match code {
            0 => Some(Self::Succeeded),
            1 => Some(Self::FailInvalid),
            2 => Some(Self::FailValid(error)),
            _ => None,
        }
    }
}

/// One VMCLEAR a CPU executed in the crash path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmclearRecord {
    /// Physical address of the VMCS.
    pub vmcs_phys: u64,
    /// How it ended.
    pub outcome: VmclearOutcome,
}

/// One CPU's part of the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuLedger<'a> {
    /// CPU index (the same as in its `NT_PRSTATUS` note, minus one).
    pub cpu_index: u32,
    /// Its APIC ID.
    pub apic_id: u32,
    /// [`cpu_flags`].
    pub flags: u32,
    /// VMCSes loaded on it at the crash, counted from the vCPUs' own state.
    pub vmcs_loaded: u32,
    /// The VMCLEARs it executed.
    pub vmclears: &'a [VmclearRecord],
}

/// Everything the note carries, as the crash path hands it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashRecord<'a> {
    /// Why the hypervisor crashed.
    pub reason: &'a str,
    /// CPU index of the coordinator.
    pub coordinator: u32,
    /// APIC IDs of the CPUs that did not check in.
    pub stragglers: &'a [u32],
    /// The per-CPU ledger.
    pub cpus: &'a [CpuLedger<'a>],
}

/// Why a note could not be written or read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashNoteError {
    /// The output buffer is too small.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        len: usize,
    },
    /// A count or the total length does not fit the format's fields.
    TooLarge,
    /// The descriptor ends before `needed` bytes.
    Truncated {
        /// Bytes the header's counts need.
        needed: usize,
        /// Bytes present.
        len: usize,
    },
    /// A layout version this reader does not know.
    UnsupportedVersion(u32),
    /// `header_len` is below 32 or not a multiple of 8.
    BadHeaderLength(u32),
    /// The reason is not UTF-8.
    ReasonNotUtf8,
    /// A CPU's VMCLEAR range does not follow the previous CPU's.
    VmclearRangeOutOfOrder {
        /// The CPU index of the offending record.
        cpu_index: u32,
    },
    /// The CPUs' VMCLEAR ranges do not add up to the table.
    VmclearCountMismatch {
        /// `vmclear_count` in the header.
        declared: u32,
        /// Entries the CPU records cover.
        covered: u64,
    },
    /// A VMCLEAR entry has an unknown outcome code.
    BadVmclearOutcome(u32),
}

impl fmt::Display for CrashNoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { needed, len } => {
                write!(
                    f,
                    "the crash note needs {needed} bytes, the buffer holds {len}"
                )
            }
            Self::TooLarge => write!(f, "the crash record is too large for the note format"),
            Self::Truncated { needed, len } => write!(
                f,
                "the crash note is truncated: {len} bytes, its counts need {needed}"
            ),
            Self::UnsupportedVersion(v) => write!(
                f,
                "crash note version {v} is not supported (this reader knows {CRASH_NOTE_VERSION})"
            ),
            Self::BadHeaderLength(len) => write!(f, "crash note header length {len} is invalid"),
            Self::ReasonNotUtf8 => write!(f, "the crash reason is not UTF-8"),
            Self::VmclearRangeOutOfOrder { cpu_index } => write!(
                f,
                "CPU {cpu_index}'s VMCLEAR entries do not follow the previous CPU's"
            ),
            Self::VmclearCountMismatch { declared, covered } => write!(
                f,
                "the VMCLEAR table has {declared} entries, the CPUs account for {covered}"
            ),
            Self::BadVmclearOutcome(code) => write!(f, "unknown VMCLEAR outcome code {code}"),
        }
    }
}

/// Section sizes of a note with these counts.
#[derive(Clone, Copy, Debug)]
struct Sections {
    reason: usize,
    stragglers: usize,
    cpus: usize,
    vmclears: usize,
}

impl Sections {
    fn new(reason_len: usize, stragglers: usize, cpus: usize, vmclears: usize) -> Option<Self> {
        Some(Self {
            reason: align_up_usize(reason_len, 8)?,
            stragglers: align_up_usize(stragglers.checked_mul(4)?, 8)?,
            cpus: cpus.checked_mul(CPU_RECORD_LEN)?,
            vmclears: vmclears.checked_mul(VMCLEAR_RECORD_LEN)?,
        })
    }

    fn total(&self, header_len: usize) -> Option<usize> {
        header_len
            .checked_add(self.reason)?
            .checked_add(self.stragglers)?
            .checked_add(self.cpus)?
            .checked_add(self.vmclears)
    }
}

/// Descriptor length of a note with these counts, to size the ELF core
/// header region at boot for the worst case. `None` if it overflows.
pub fn desc_len_for(
    reason_len: usize,
    stragglers: usize,
    cpus: usize,
    vmclears: usize,
) -> Option<usize> {
    Sections::new(reason_len, stragglers, cpus, vmclears)?.total(HEADER_LEN)
}

fn to_u32(value: usize) -> Result<u32, CrashNoteError> {
    u32::try_from(value).map_err(|_| CrashNoteError::TooLarge)
}

impl CrashRecord<'_> {
    fn vmclear_total(&self) -> Option<usize> {
        self.cpus
            .iter()
            .try_fold(0usize, |sum, cpu| sum.checked_add(cpu.vmclears.len()))
    }

    /// Length of this record's note descriptor.
    pub fn desc_len(&self) -> Result<usize, CrashNoteError> {
        let vmclears = self.vmclear_total().ok_or(CrashNoteError::TooLarge)?;
        desc_len_for(
            self.reason.len(),
            self.stragglers.len(),
            self.cpus.len(),
            vmclears,
        )
        .ok_or(CrashNoteError::TooLarge)
    }

    /// Writes the note descriptor into `out` and returns its length.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, CrashNoteError> {
        let len = self.desc_len()?;
        let vmclear_total = self.vmclear_total().ok_or(CrashNoteError::TooLarge)?;
        let counts = [
            to_u32(self.reason.len())?,
            to_u32(self.stragglers.len())?,
            to_u32(self.cpus.len())?,
            to_u32(vmclear_total)?,
        ];
        let out_len = out.len();
        let desc = out.get_mut(..len).ok_or(CrashNoteError::BufferTooSmall {
            needed: len,
            len: out_len,
        })?;
        desc.fill(0);
        self.fill(desc, counts)
            .map_err(|OutOfBounds| CrashNoteError::BufferTooSmall {
                needed: len,
                len: out_len,
            })?;
        Ok(len)
    }

    fn fill(&self, desc: &mut [u8], counts: [u32; 4]) -> Result<(), OutOfBounds> {
        let [reason_len, straggler_count, cpu_count, vmclear_count] = counts;
        bytes::put_u32(desc, 0, CRASH_NOTE_VERSION)?;
        bytes::put_u32(desc, 4, HEADER_LEN as u32)?;
        bytes::put_u32(desc, 8, self.coordinator)?;
        bytes::put_u32(desc, 12, reason_len)?;
        bytes::put_u32(desc, 16, straggler_count)?;
        bytes::put_u32(desc, 20, cpu_count)?;
        bytes::put_u32(desc, 24, vmclear_count)?;
        let sections = Sections::new(
            self.reason.len(),
            self.stragglers.len(),
            self.cpus.len(),
            vmclear_count as usize,
        )
        .ok_or(OutOfBounds)?;
        let mut at = HEADER_LEN;
        bytes::put(desc, at, self.reason.as_bytes())?;
        at += sections.reason;
        for (i, apic_id) in self.stragglers.iter().enumerate() {
            bytes::put_u32(desc, at + i * 4, *apic_id)?;
        }
        at += sections.stragglers;
        let mut vmclear_at = at + sections.cpus;
        let mut first = 0u32;
        for cpu in self.cpus {
            // Each count fits: their sum (vmclear_count) does.
            let count = cpu.vmclears.len() as u32;
            for (field, value) in [
                cpu.cpu_index,
                cpu.apic_id,
                cpu.flags,
                cpu.vmcs_loaded,
                first,
                count,
            ]
            .into_iter()
            .enumerate()
            {
                bytes::put_u32(desc, at + field * 4, value)?;
            }
            at += CPU_RECORD_LEN;
            first += count;
            for vmclear in cpu.vmclears {
                let (code, error) = vmclear.outcome.encode();
                bytes::put_u64(desc, vmclear_at, vmclear.vmcs_phys)?;
                bytes::put_u32(desc, vmclear_at + 8, code)?;
                bytes::put_u32(desc, vmclear_at + 12, error)?;
                vmclear_at += VMCLEAR_RECORD_LEN;
            }
        }
        Ok(())
    }
}

/// A validated crash note, borrowed from its descriptor bytes.
#[derive(Clone, Copy, Debug)]
pub struct CrashNote<'a> {
    coordinator: u32,
    reason: &'a str,
    stragglers: &'a [u8],
    cpus: &'a [u8],
    vmclears: &'a [u8],
}

/// One CPU's ledger record, as read.
#[derive(Clone, Copy, Debug)]
pub struct CpuLedgerView<'a> {
    /// CPU index.
    pub cpu_index: u32,
    /// APIC ID.
    pub apic_id: u32,
    /// [`cpu_flags`].
    pub flags: u32,
    /// VMCSes loaded on it at the crash.
    pub vmcs_loaded: u32,
    vmclears: &'a [u8],
}

impl<'a> CpuLedgerView<'a> {
    /// The VMCLEARs it executed, in order.
    pub fn vmclears(&self) -> impl ExactSizeIterator<Item = VmclearRecord> + 'a {
        self.vmclears
            .chunks_exact(VMCLEAR_RECORD_LEN)
            .map(decode_vmclear)
    }

    /// Number of VMCLEARs it executed.
    pub fn vmclear_count(&self) -> usize {
        self.vmclears.len() / VMCLEAR_RECORD_LEN
    }
}

/// Decodes an entry that [`CrashNote::parse`] already validated.
fn decode_vmclear(entry: &[u8]) -> VmclearRecord {
    let vmcs_phys = u64_at(entry, 0).unwrap_or(0);
    let code = u32_at(entry, 8).unwrap_or(u32::MAX);
    let error = u32_at(entry, 12).unwrap_or(0);
    VmclearRecord {
        vmcs_phys,
        // Validated by `parse`; the fallback is never taken.
        outcome: VmclearOutcome::decode(code, error).unwrap_or(VmclearOutcome::FailInvalid),
    }
}

impl<'a> CrashNote<'a> {
    /// Validates a note descriptor. Bytes after the last section are
    /// ignored (the note may be padded).
    pub fn parse(desc: &'a [u8]) -> Result<Self, CrashNoteError> {
        use CrashNoteError as E;
        let truncated = |needed: usize| E::Truncated {
            needed,
            len: desc.len(),
        };
        let field = |offset: usize| u32_at(desc, offset).ok_or(truncated(HEADER_LEN));
        let version = field(0)?;
        if version != CRASH_NOTE_VERSION {
            return Err(E::UnsupportedVersion(version));
        }
        let header_len = field(4)?;
        if (header_len as usize) < HEADER_LEN || !header_len.is_multiple_of(8) {
            return Err(E::BadHeaderLength(header_len));
        }
        let coordinator = field(8)?;
        let reason_len = field(12)? as usize;
        let straggler_count = field(16)? as usize;
        let cpu_count = field(20)? as usize;
        let vmclear_count = field(24)?;
        let sections = Sections::new(
            reason_len,
            straggler_count,
            cpu_count,
            vmclear_count as usize,
        )
        .ok_or(E::TooLarge)?;
        let total = sections.total(header_len as usize).ok_or(E::TooLarge)?;
        if desc.len() < total {
            return Err(truncated(total));
        }

        let mut at = header_len as usize;
        let mut take = |len: usize, padded: usize| {
            let section = bytes::slice_at(desc, at, len);
            at = at.saturating_add(padded);
            section.ok_or(truncated(total))
        };
        let reason = take(reason_len, sections.reason)?;
        let reason = core::str::from_utf8(reason).map_err(|_| E::ReasonNotUtf8)?;
        let stragglers = take(straggler_count * 4, sections.stragglers)?;
        let cpus = take(sections.cpus, sections.cpus)?;
        let vmclears = take(sections.vmclears, sections.vmclears)?;

        let mut covered = 0u64;
        for record in cpus.chunks_exact(CPU_RECORD_LEN) {
            let cpu_index = u32_at(record, 0).ok_or(truncated(total))?;
            let first = u32_at(record, 16).ok_or(truncated(total))?;
            let count = u32_at(record, 20).ok_or(truncated(total))?;
            if u64::from(first) != covered {
                return Err(E::VmclearRangeOutOfOrder { cpu_index });
            }
            covered += u64::from(count);
            if covered > u64::from(vmclear_count) {
                return Err(E::VmclearCountMismatch {
                    declared: vmclear_count,
                    covered,
                });
            }
        }
        if covered != u64::from(vmclear_count) {
            return Err(E::VmclearCountMismatch {
                declared: vmclear_count,
                covered,
            });
        }
        for entry in vmclears.chunks_exact(VMCLEAR_RECORD_LEN) {
            let code = u32_at(entry, 8).ok_or(truncated(total))?;
            if VmclearOutcome::decode(code, 0).is_none() {
                return Err(E::BadVmclearOutcome(code));
            }
        }
        Ok(Self {
            coordinator,
            reason,
            stragglers,
            cpus,
            vmclears,
        })
    }

    /// Why the hypervisor crashed.
    pub fn reason(&self) -> &'a str {
        self.reason
    }

    /// CPU index of the coordinator.
    pub fn coordinator(&self) -> u32 {
        self.coordinator
    }

    /// APIC IDs of the CPUs that did not check in.
    pub fn stragglers(&self) -> impl ExactSizeIterator<Item = u32> + 'a {
        self.stragglers
            .chunks_exact(4)
            .map(|b| u32_at(b, 0).unwrap_or(0))
    }

    /// The per-CPU ledger.
    pub fn cpus(&self) -> impl ExactSizeIterator<Item = CpuLedgerView<'a>> + 'a {
        let vmclears = self.vmclears;
        self.cpus.chunks_exact(CPU_RECORD_LEN).map(move |record| {
            let field = |i: usize| u32_at(record, i * 4).unwrap_or(0);
            // `parse` checked that every range lies inside the table.
            let first = field(4) as usize * VMCLEAR_RECORD_LEN;
            let len = field(5) as usize * VMCLEAR_RECORD_LEN;
            CpuLedgerView {
                cpu_index: field(0),
                apic_id: field(1),
                flags: field(2),
                vmcs_loaded: field(3),
                vmclears: bytes::slice_at(vmclears, first, len).unwrap_or_default(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU0_CLEARS: [VmclearRecord; 2] = [
        VmclearRecord {
            vmcs_phys: 0x7f00_1000,
            outcome: VmclearOutcome::Succeeded,
        },
        VmclearRecord {
            vmcs_phys: 0x7f00_2000,
            outcome: VmclearOutcome::FailValid(5),
        },
    ];
    const CPU2_CLEARS: [VmclearRecord; 1] = [VmclearRecord {
        vmcs_phys: 0x7f00_3000,
        outcome: VmclearOutcome::FailInvalid,
    }];

    fn ledger() -> [CpuLedger<'static>; 3] {
        [
            CpuLedger {
                cpu_index: 0,
                apic_id: 0,
                flags: cpu_flags::CHECKED_IN | cpu_flags::VMX_WAS_ON | cpu_flags::VMXOFF_DONE,
                vmcs_loaded: 2,
                vmclears: &CPU0_CLEARS,
            },
            CpuLedger {
                cpu_index: 1,
                apic_id: 2,
                flags: 0,
                vmcs_loaded: 1,
                vmclears: &[],
            },
            CpuLedger {
                cpu_index: 2,
                apic_id: 4,
                flags: cpu_flags::CHECKED_IN | cpu_flags::COORDINATOR,
                vmcs_loaded: 1,
                vmclears: &CPU2_CLEARS,
            },
        ]
    }

    fn written(record: &CrashRecord<'_>) -> Vec<u8> {
        let mut out = vec![0xEEu8; record.desc_len().unwrap()];
        let len = record.write(&mut out).unwrap();
        assert_eq!(len, out.len());
        out
    }

    #[test]
    fn a_record_round_trips() {
        let cpus = ledger();
        let record = CrashRecord {
            reason: "panicked at hv/src/main.rs:42:5: boom",
            coordinator: 2,
            stragglers: &[2],
            cpus: &cpus,
        };
        let desc = written(&record);
        assert_eq!(desc.len(), 32 + 40 + 8 + 3 * 24 + 3 * 16);
        let note = CrashNote::parse(&desc).unwrap();
        assert_eq!(note.reason(), record.reason);
        assert_eq!(note.coordinator(), 2);
        assert_eq!(note.stragglers().collect::<Vec<_>>(), vec![2]);
        let read: Vec<_> = note.cpus().collect();
        assert_eq!(read.len(), 3);
        for (view, original) in read.iter().zip(cpus.iter()) {
            assert_eq!(view.cpu_index, original.cpu_index);
            assert_eq!(view.apic_id, original.apic_id);
            assert_eq!(view.flags, original.flags);
            assert_eq!(view.vmcs_loaded, original.vmcs_loaded);
            assert_eq!(view.vmclear_count(), original.vmclears.len());
            assert_eq!(view.vmclears().collect::<Vec<_>>(), original.vmclears);
        }
    }

    #[test]
    fn the_header_is_laid_out_as_documented() {
        let cpus = ledger();
        let record = CrashRecord {
            reason: "x",
            coordinator: 7,
            stragglers: &[9, 10, 11],
            cpus: &cpus,
        };
        let desc = written(&record);
        let words: Vec<u32> = (0..8).map(|i| u32_at(&desc, i * 4).unwrap()).collect();
        assert_eq!(words, [1, 32, 7, 1, 3, 3, 3, 0]);
        assert_eq!(&desc[32..40], b"x\0\0\0\0\0\0\0");
        assert_eq!(u32_at(&desc, 40), Some(9));
        assert_eq!(u32_at(&desc, 48), Some(11));
        assert_eq!(u32_at(&desc, 52), Some(0), "straggler padding");
        // CPU 2's record: first_vmclear 2, count 1.
        assert_eq!(u32_at(&desc, 56 + 2 * 24 + 16), Some(2));
        assert_eq!(u32_at(&desc, 56 + 2 * 24 + 20), Some(1));
        // The VMCLEAR table after the ledger.
        let table = 56 + 3 * 24;
        assert_eq!(u64_at(&desc, table + 16), Some(0x7f00_2000));
        assert_eq!(u32_at(&desc, table + 24), Some(2));
        assert_eq!(u32_at(&desc, table + 28), Some(5));
        assert_eq!(desc_len_for(1, 3, 3, 3), Some(desc.len()));
    }

    #[test]
    fn an_empty_record_round_trips() {
        let record = CrashRecord {
            reason: "",
            coordinator: 0,
            stragglers: &[],
            cpus: &[],
        };
        let desc = written(&record);
        assert_eq!(desc.len(), HEADER_LEN);
        let note = CrashNote::parse(&desc).unwrap();
        assert_eq!(note.reason(), "");
        assert_eq!(note.cpus().count(), 0);
        assert_eq!(note.stragglers().count(), 0);
    }

    #[test]
    fn a_small_buffer_is_refused_untouched() {
        let cpus = ledger();
        let record = CrashRecord {
            reason: "r",
            coordinator: 0,
            stragglers: &[],
            cpus: &cpus,
        };
        let needed = record.desc_len().unwrap();
        let mut out = vec![0xEEu8; needed - 1];
        assert_eq!(
            record.write(&mut out).unwrap_err(),
            CrashNoteError::BufferTooSmall {
                needed,
                len: needed - 1
            }
        );
        assert!(out.iter().all(|&b| b == 0xEE));
    }

    fn good_desc() -> Vec<u8> {
        let cpus = ledger();
        written(&CrashRecord {
            reason: "reason",
            coordinator: 2,
            stragglers: &[2],
            cpus: &cpus,
        })
    }

    #[test]
    fn every_truncation_is_refused() {
        let desc = good_desc();
        for len in 0..desc.len() {
            let err = CrashNote::parse(&desc[..len]).unwrap_err();
            assert!(
                matches!(err, CrashNoteError::Truncated { .. }),
                "length {len}: {err:?}"
            );
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut desc = good_desc();
        desc[0] = 2;
        assert_eq!(
            CrashNote::parse(&desc).unwrap_err(),
            CrashNoteError::UnsupportedVersion(2)
        );
        for header_len in [0u32, 24, 33] {
            let mut desc = good_desc();
            desc[4..8].copy_from_slice(&header_len.to_le_bytes());
            assert_eq!(
                CrashNote::parse(&desc).unwrap_err(),
                CrashNoteError::BadHeaderLength(header_len)
            );
        }
        let mut desc = good_desc();
        desc[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            CrashNote::parse(&desc).unwrap_err(),
            CrashNoteError::Truncated { .. } | CrashNoteError::TooLarge
        ));
        let mut desc = good_desc();
        desc[32] = 0xff;
        assert_eq!(
            CrashNote::parse(&desc).unwrap_err(),
            CrashNoteError::ReasonNotUtf8
        );
    }

    #[test]
    fn a_longer_header_is_skipped() {
        let desc = good_desc();
        let mut longer = desc[..32].to_vec();
        longer[4..8].copy_from_slice(&40u32.to_le_bytes());
        longer.extend_from_slice(&[0xAB; 8]);
        longer.extend_from_slice(&desc[32..]);
        let note = CrashNote::parse(&longer).unwrap();
        assert_eq!(note.reason(), "reason");
        assert_eq!(note.cpus().count(), 3);
    }

    #[test]
    fn inconsistent_vmclear_ranges_are_refused() {
        let ledger_at = 32 + 8 + 8;
        // CPU 2's first entry moved back onto CPU 0's.
        let mut desc = good_desc();
        desc[ledger_at + 2 * 24 + 16..][..4].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            CrashNote::parse(&desc).unwrap_err(),
            CrashNoteError::VmclearRangeOutOfOrder { cpu_index: 2 }
        );
        // CPU 2 claims two entries: one more than the table holds.
        let mut desc = good_desc();
        desc[ledger_at + 2 * 24 + 20..][..4].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            CrashNote::parse(&desc).unwrap_err(),
            CrashNoteError::VmclearCountMismatch {
                declared: 3,
                covered: 4
            }
        );
        // CPU 2 claims none: one entry unaccounted for.
        let mut desc = good_desc();
        desc[ledger_at + 2 * 24 + 20..][..4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            CrashNote::parse(&desc).unwrap_err(),
            CrashNoteError::VmclearCountMismatch {
                declared: 3,
                covered: 2
            }
        );
        let mut desc = good_desc();
        let table = ledger_at + 3 * 24;
        desc[table + 8..][..4].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(
            CrashNote::parse(&desc).unwrap_err(),
            CrashNoteError::BadVmclearOutcome(9)
        );
    }

    #[test]
    fn every_crash_note_error_has_a_message() {
        let errors = [
            CrashNoteError::BufferTooSmall { needed: 2, len: 1 },
            CrashNoteError::TooLarge,
            CrashNoteError::Truncated { needed: 2, len: 1 },
            CrashNoteError::UnsupportedVersion(2),
            CrashNoteError::BadHeaderLength(0),
            CrashNoteError::ReasonNotUtf8,
            CrashNoteError::VmclearRangeOutOfOrder { cpu_index: 1 },
            CrashNoteError::VmclearCountMismatch {
                declared: 1,
                covered: 2,
            },
            CrashNoteError::BadVmclearOutcome(7),
        ];
        for error in errors {
            assert!(error.to_string().len() > 10, "{error:?}");
        }
    }
}
