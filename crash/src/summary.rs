//! The crash summary, written from raw facts.
//!
//! The coordinator's summary (the shootdown line and the `crash` report
//! object, kilobytes at 64 CPUs and more) used to be formatted on the way
//! from the crash to the capture kernel. Formatting is the slow part: under
//! QEMU's TCG, 5 to 10 ms at 64 CPUs, most of it the first run of the
//! formatting code itself. So the crash path now only copies what the
//! summary is made of into a block of words ([`FactsWriter`]: plain stores,
//! no formatting, no lock), and whoever prints the summary reads the block
//! back ([`Facts`]) and formats it ([`render`]): the capture image after the
//! jump, or the crashed hypervisor itself when no capture image that
//! prints it follows.
//!
//! The block can be read from memory a crash may have damaged, so
//! [`Facts::parse`] checks its magic, counts and length before any use.
//!
//! Layout, every field a little-endian `u64` word: the header
//! ([`HEADER_WORDS`] words, fields at the `H_*` indices, then the reason's
//! bytes), then [`CPU_WORDS`] words per CPU index, then [`RECORD_WORDS`]
//! words per VMCS (or VMCB) record.

use core::fmt::{self, Write};

use hv_core::json;

use crate::accounting::{self, VmcsFate, VmcsRecords};
use crate::cpuset::{CpuSet, MAX_CPUS};
use crate::shootdown::{Fault, VmxExit};
use crate::svm::SvmExit;

/// The block's first word.
pub const MAGIC: u64 = u64::from_le_bytes(*b"HVFACTS1");
/// Longest reason kept; a longer one is cut and marked.
pub const MAX_REASON: usize = 2048;
/// Records at most (one per VMCS or VMCB).
pub const MAX_RECORDS: usize = 1024;

const H_MAGIC: usize = 0;
const H_WORDS: usize = 1;
const H_CPUS: usize = 2;
const H_RECORDS: usize = 3;
const H_COORDINATOR: usize = 4;
const H_COORDINATOR_APIC_ID: usize = 5;
const H_FLAGS: usize = 6;
const H_OWN_VMX: usize = 7;
const H_OWN_SVM: usize = 8;
const H_SHOOTDOWN_US: usize = 9;
const H_STARTED_US: usize = 10;
const H_STARTED_TSC: usize = 11;
const H_WAITING_FROM_US: usize = 12;
const H_ENTERED_TSC: usize = 13;
const H_NMIS_SENDING_TSC: usize = 14;
const H_NMIS_OUT_TSC: usize = 15;
const H_PANIC_TO_NMIS_US: usize = 16;
const H_STRAY_NMIS: usize = 17;
const H_NESTED_NMIS: usize = 18;
const H_EXPECTED: usize = 19;
const H_TEXT_AT: usize = 20;
const H_BACKEND: usize = 21;
const H_HANDOVER: usize = 22;
/// Words of the hand-over's facts ([`HandoverFacts`]).
const HANDOVER_WORDS: usize = 13;
const H_REASON_LEN: usize = H_HANDOVER + HANDOVER_WORDS;
const H_REASON: usize = H_REASON_LEN + 1;
/// Words of the header, the reason's bytes included.
pub const HEADER_WORDS: usize = H_REASON + MAX_REASON / 8;
/// Words per CPU index.
pub const CPU_WORDS: usize = 5;
/// Words per record.
pub const RECORD_WORDS: usize = 4;
/// Words of the largest block.
pub const MAX_WORDS: usize = HEADER_WORDS + MAX_CPUS * CPU_WORDS + MAX_RECORDS * RECORD_WORDS;

/// `H_FLAGS` bits.
mod flag {
    pub const TIMED_OUT: u64 = 1 << 1;
    pub const BROADCAST: u64 = 1 << 2;
    pub const LOCKUP: u64 = 1 << 3;
    pub const WORDS_IN_MAILBOX: u64 = 1 << 4;
    pub const REASON_CUT: u64 = 1 << 5;
    pub const DEFERRED: u64 = 1 << 6;
}

/// Per-CPU flag bits (the CPU's first word, above its APIC ID).
mod cpu_flag {
    pub const CHECKED_IN: u64 = 1 << 32;
    pub const STRAGGLER: u64 = 1 << 33;
    pub const RECORD: u64 = 1 << 34;
    pub const NMI_IN_GUEST_KNOWN: u64 = 1 << 35;
    pub const NMI_IN_GUEST: u64 = 1 << 36;
    pub const NMI_AT_KNOWN: u64 = 1 << 37;
    pub const OBSERVED_KNOWN: u64 = 1 << 38;
    pub const SILENT: u64 = 1 << 39;
    pub const NOT_ONLINE_NMI: u64 = 1 << 40;
    pub const NOT_ONLINE_INIT: u64 = 1 << 41;
    pub const STARTING: u64 = 1 << 42;
}

/// The virtualization backend whose contexts the records hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// None ran.
    #[default]
    None,
    /// VMX: the records are VMCSes.
    Vmx,
    /// SVM: the records are VMCBs.
    Svm,
}

impl Backend {
    /// Its name in the crash report.
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Vmx => "vmx",
            Self::Svm => "svm",
        }
    }

    const fn code(self) -> u64 {
        match self {
            Self::None => 0,
            Self::Vmx => 1,
            Self::Svm => 2,
        }
    }

    const fn from_code(code: u64) -> Self {
        match code {
            1 => Self::Vmx,
            2 => Self::Svm,
            _ => Self::None,
        }
    }
}

/// What a CPU that was not online when the crash came got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOnline {
    /// Its IDT was live: the NMI, like the others.
    Nmi,
    /// No IDT yet: INIT.
    Init,
}

/// One CPU index's facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuFacts {
    /// Its APIC ID.
    pub apic_id: u32,
    /// It checked in.
    pub checked_in: bool,
    /// It was expected and did not check in.
    pub straggler: bool,
    /// Its crash record, if it left one: how it left VMX, how many list
    /// entries its walk visited, and when the rendezvous saw it (us after
    /// the wait began).
    pub record: Option<CpuRecord>,
    /// Its SVM ledger's exit.
    pub svm: SvmExitCode,
    /// Whether its crash NMI came as a guest's VM exit (`None`: it took
    /// none).
    pub nmi_in_guest: Option<bool>,
    /// When it took the crash NMI (us since boot).
    pub nmi_at_us: Option<u64>,
    /// The lockup detector found it silent.
    pub silent: bool,
    /// Not online at the crash: what it got, and whether it was still
    /// starting (else it had failed).
    pub not_online: Option<(NotOnline, bool)>,
}

/// A CPU's crash record, as the summary uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuRecord {
    /// How it left VMX.
    pub vmx: VmxExit,
    /// List entries its walk visited.
    pub visited: u32,
    /// When the rendezvous saw it checked in (us after the wait began).
    pub observed_after_us: Option<u64>,
}

/// An [`SvmExit`] as stored (its ledger encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SvmExitCode(pub u32);

impl SvmExitCode {
    /// The exit.
    pub fn exit(self) -> SvmExit {
        SvmExit::decode(self.0)
    }
}

/// One record (a VMCS or VMCB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordFacts {
    /// Its physical address.
    pub vmcs: u64,
    /// The CPU whose cache may hold it.
    pub loaded_on: Option<usize>,
    /// The CPU that executed its crash-time clear.
    pub cleared_by: Option<usize>,
    /// The CPU whose crash-time clear repeated its unload's.
    pub repeated_by: Option<usize>,
}

/// The block's scalar facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scalars {
    /// The coordinator's CPU index.
    pub coordinator: usize,
    /// Its APIC ID.
    pub coordinator_apic_id: u32,
    /// The virtualization backend (on SVM the records are VMCBs).
    pub backend: Backend,
    /// The rendezvous gave up waiting.
    pub timed_out: bool,
    /// The NMIs went out as one all-but-self IPI.
    pub nmi_broadcast: bool,
    /// The crash is a lockup.
    pub lockup: bool,
    /// The crash words went into the mailbox (not straight to the UART).
    pub words_in_mailbox: bool,
    /// The summary was left for the capture image to format (else the
    /// crashed hypervisor printed it).
    pub deferred: bool,
    /// The coordinator's own VMX exit.
    pub own_vmx: VmxExit,
    /// Its own SVM exit.
    pub own_svm: SvmExitCode,
    /// Panic to rendezvous, us.
    pub shootdown_us: u64,
    /// When the coordinator began (us since boot).
    pub started_us: u64,
    /// Its TSC then.
    pub started_tsc: u64,
    /// From its start to the wait's start, us.
    pub waiting_from_us: u64,
    /// The first CPU's entry into the crash path (TSC).
    pub entered_tsc: u64,
    /// Just before the first NMI's ICR write (TSC).
    pub nmis_sending_tsc: u64,
    /// After the last NMI (TSC).
    pub nmis_out_tsc: u64,
    /// Entry to NMIs out, us.
    pub panic_to_nmis_us: u64,
    /// Stray NMIs the coordinator took.
    pub coordinator_stray_nmis: u64,
    /// Nested NMIs.
    pub nested_nmis: u64,
    /// CPUs expected to check in.
    pub expected: u64,
    /// Bytes of crash words in the mailbox before the summary: a printer
    /// puts the summary there.
    pub text_at: u64,
}

fn encode_fault(fault: Fault) -> u64 {
    match fault {
        Fault::InvalidOpcode => 1,
        Fault::GeneralProtection => 2,
        Fault::VmFail => 3,
    }
}

fn encode_vmx(exit: VmxExit) -> u64 {
    match exit {
        VmxExit::NotAttempted => 0,
        VmxExit::WasOff => 1,
        VmxExit::Left => 2,
        VmxExit::LeftAfterInvalidOpcode => 3,
        VmxExit::StillOn(fault) => 0x10 | encode_fault(fault),
    }
}

fn decode_vmx(raw: u64) -> VmxExit {
    match raw {
        1 => VmxExit::WasOff,
        2 => VmxExit::Left,
        3 => VmxExit::LeftAfterInvalidOpcode,
        0x11 => VmxExit::StillOn(Fault::InvalidOpcode),
        0x12 => VmxExit::StillOn(Fault::GeneralProtection),
        0x13 => VmxExit::StillOn(Fault::VmFail),
        _ => VmxExit::NotAttempted,
    }
}

fn cpu_plus_one(cpu: Option<usize>) -> u64 {
    cpu.map_or(0, |cpu| cpu as u64 + 1)
}

fn cpu_from(word: u64) -> Option<usize> {
    word.checked_sub(1).map(|cpu| cpu as usize)
}

/// Where the crash path stores words: plain stores, nothing else.
pub trait WordSink {
    /// Stores `value` at word `index` (an index past the end is dropped).
    fn store(&mut self, index: usize, value: u64);
}

impl WordSink for [u64] {
    fn store(&mut self, index: usize, value: u64) {
        if let Some(word) = self.get_mut(index) {
            *word = value;
        }
    }
}

impl WordSink for &[core::sync::atomic::AtomicU64] {
    fn store(&mut self, index: usize, value: u64) {
        if let Some(word) = self.get(index) {
            word.store(value, core::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Fills a block, for `cpus` CPU indices and `records` records (each
/// capped at its maximum). The crash path calls its methods in any order;
/// [`finish`](Self::finish) makes the block valid, last.
#[derive(Debug)]
pub struct FactsWriter<'a, S: WordSink + ?Sized> {
    sink: &'a mut S,
    cpus: usize,
    records: usize,
}

impl<'a, S: WordSink + ?Sized> FactsWriter<'a, S> {
    /// Starts a block in `sink`: its magic is cleared until
    /// [`finish`](Self::finish).
    pub fn new(sink: &'a mut S, cpus: usize, records: usize) -> Self {
        sink.store(H_MAGIC, 0);
        sink.store(H_HANDOVER, 0);
        Self {
            sink,
            cpus: cpus.min(MAX_CPUS),
            records: records.min(MAX_RECORDS),
        }
    }

    /// Words the block takes.
    pub fn words(&self) -> usize {
        HEADER_WORDS + self.cpus * CPU_WORDS + self.records * RECORD_WORDS
    }

    /// The scalars and the reason.
    pub fn scalars(&mut self, scalars: &Scalars, reason: &[u8]) {
        let mut flags = 0;
        for (set, bit) in [
            (scalars.timed_out, flag::TIMED_OUT),
            (scalars.nmi_broadcast, flag::BROADCAST),
            (scalars.lockup, flag::LOCKUP),
            (scalars.words_in_mailbox, flag::WORDS_IN_MAILBOX),
            (scalars.deferred, flag::DEFERRED),
            (reason.len() > MAX_REASON, flag::REASON_CUT),
        ] {
            if set {
                flags |= bit;
            }
        }
        let words = [
            (H_COORDINATOR, scalars.coordinator as u64),
            (
                H_COORDINATOR_APIC_ID,
                u64::from(scalars.coordinator_apic_id),
            ),
            (H_FLAGS, flags),
            (H_OWN_VMX, encode_vmx(scalars.own_vmx)),
            (H_OWN_SVM, u64::from(scalars.own_svm.0)),
            (H_SHOOTDOWN_US, scalars.shootdown_us),
            (H_STARTED_US, scalars.started_us),
            (H_STARTED_TSC, scalars.started_tsc),
            (H_WAITING_FROM_US, scalars.waiting_from_us),
            (H_ENTERED_TSC, scalars.entered_tsc),
            (H_NMIS_SENDING_TSC, scalars.nmis_sending_tsc),
            (H_NMIS_OUT_TSC, scalars.nmis_out_tsc),
            (H_PANIC_TO_NMIS_US, scalars.panic_to_nmis_us),
            (H_STRAY_NMIS, scalars.coordinator_stray_nmis),
            (H_NESTED_NMIS, scalars.nested_nmis),
            (H_EXPECTED, scalars.expected),
            (H_TEXT_AT, scalars.text_at),
            (H_BACKEND, scalars.backend.code()),
        ];
        for (index, value) in words {
            self.sink.store(index, value);
        }
        let reason = &reason[..reason.len().min(MAX_REASON)];
        self.sink.store(H_REASON_LEN, reason.len() as u64);
        for (i, chunk) in reason.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.sink.store(H_REASON + i, u64::from_le_bytes(word));
        }
    }

    /// CPU index `cpu`'s facts (ignored past the block's CPUs).
    pub fn cpu(&mut self, cpu: usize, facts: &CpuFacts) {
        if cpu >= self.cpus {
            return;
        }
        let mut first = u64::from(facts.apic_id);
        let mut set = |yes: bool, bit: u64| {
            if yes {
                first |= bit;
            }
        };
        set(facts.checked_in, cpu_flag::CHECKED_IN);
        set(facts.straggler, cpu_flag::STRAGGLER);
        set(facts.record.is_some(), cpu_flag::RECORD);
        set(facts.nmi_in_guest.is_some(), cpu_flag::NMI_IN_GUEST_KNOWN);
        set(facts.nmi_in_guest == Some(true), cpu_flag::NMI_IN_GUEST);
        set(facts.nmi_at_us.is_some(), cpu_flag::NMI_AT_KNOWN);
        let observed = facts.record.and_then(|record| record.observed_after_us);
        set(observed.is_some(), cpu_flag::OBSERVED_KNOWN);
        set(facts.silent, cpu_flag::SILENT);
        if let Some((action, starting)) = facts.not_online {
            set(action == NotOnline::Nmi, cpu_flag::NOT_ONLINE_NMI);
            set(action == NotOnline::Init, cpu_flag::NOT_ONLINE_INIT);
            set(starting, cpu_flag::STARTING);
        }
        let base = HEADER_WORDS + cpu * CPU_WORDS;
        let vmx = facts.record.map_or(0, |record| encode_vmx(record.vmx));
        let visited = facts.record.map_or(0, |record| u64::from(record.visited));
        self.sink.store(base, first);
        self.sink
            .store(base + 1, vmx | (u64::from(facts.svm.0) << 32));
        self.sink.store(base + 2, visited);
        self.sink.store(base + 3, facts.nmi_at_us.unwrap_or(0));
        self.sink.store(base + 4, observed.unwrap_or(0));
    }

    /// Record `record`'s facts (ignored past the block's records).
    pub fn record(&mut self, record: usize, facts: &RecordFacts) {
        if record >= self.records {
            return;
        }
        let base = HEADER_WORDS + self.cpus * CPU_WORDS + record * RECORD_WORDS;
        self.sink.store(base, facts.vmcs);
        self.sink.store(base + 1, cpu_plus_one(facts.loaded_on));
        self.sink.store(base + 2, cpu_plus_one(facts.cleared_by));
        self.sink.store(base + 3, cpu_plus_one(facts.repeated_by));
    }

    /// Makes the block valid: its counts, then its magic.
    pub fn finish(self) -> usize {
        let words = self.words();
        self.sink.store(H_WORDS, words as u64);
        self.sink.store(H_CPUS, self.cpus as u64);
        self.sink.store(H_RECORDS, self.records as u64);
        self.sink.store(H_MAGIC, MAGIC);
        words
    }
}

/// The hand-over's facts: what its line and its `capture` report line
/// say. The crash path stores them with [`store_handover`] once it is
/// about to jump; [`render_handover`] writes the two lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HandoverFacts {
    /// The capture kernel is the hv image (else Linux).
    pub kernel_hv: bool,
    /// CPU notes in the core header.
    pub cpu_notes: u64,
    /// Memory ranges the dump describes.
    pub memory_ranges: u64,
    /// hv's own digest check: `Some(true)` verified, `Some(false)` a
    /// mismatch, `None` skipped (`capture_hv_check=off`).
    pub digest_ok: Option<bool>,
    /// The hand-over's time, microseconds since the TSC's origin.
    pub handover_us: u64,
    /// Its TSC.
    pub handover_tsc: u64,
    /// The coordinator's step stamps (TSC): rendezvous, own cleanup,
    /// summary, core header, digest check done, digest check begun.
    pub steps_tsc: [u64; 6],
    /// Hand-over attempts begun.
    pub attempt: u64,
    /// Stray NMIs the coordinator took.
    pub coordinator_stray_nmis: u64,
}

mod handover_flag {
    pub const PRESENT: u64 = 1 << 0;
    pub const KERNEL_HV: u64 = 1 << 1;
    pub const DIGEST_KNOWN: u64 = 1 << 2;
    pub const DIGEST_OK: u64 = 1 << 3;
}

/// Makes a block unreadable (its magic cleared): its summary was said.
pub fn invalidate<S: WordSink + ?Sized>(sink: &mut S) {
    sink.store(H_MAGIC, 0);
}

/// Stores the hand-over's facts into a block [`FactsWriter::finish`]
/// already made valid; they count once their flags word is stored, last.
pub fn store_handover<S: WordSink + ?Sized>(sink: &mut S, facts: &HandoverFacts) {
    let words = [
        facts.cpu_notes,
        facts.memory_ranges,
        facts.handover_us,
        facts.handover_tsc,
        facts.steps_tsc[0],
        facts.steps_tsc[1],
        facts.steps_tsc[2],
        facts.steps_tsc[3],
        facts.steps_tsc[4],
        facts.attempt,
        facts.coordinator_stray_nmis,
        facts.steps_tsc[5],
    ];
    for (i, value) in words.into_iter().enumerate() {
        sink.store(H_HANDOVER + 1 + i, value);
    }
    let mut flags = handover_flag::PRESENT;
    if facts.kernel_hv {
        flags |= handover_flag::KERNEL_HV;
    }
    if let Some(ok) = facts.digest_ok {
        flags |= handover_flag::DIGEST_KNOWN;
        if ok {
            flags |= handover_flag::DIGEST_OK;
        }
    }
    sink.store(H_HANDOVER, flags);
}

/// Writes the hand-over's line (when it jumps) and its `capture` report
/// line; `refused` is why it does not jump.
pub fn render_handover<W: Write>(
    facts: &HandoverFacts,
    refused: Option<&dyn fmt::Display>,
    out: &mut W,
) -> fmt::Result {
    let kernel = if facts.kernel_hv { "hv" } else { "linux" };
    if refused.is_none() {
        let said = match facts.digest_ok {
            Some(_) => "digests verified",
            None => "hv's own digest check skipped (capture_hv_check=off), the purgatory checks",
        };
        writeln!(
            out,
            "*** hv: capture: {} CPU notes, {} memory ranges; {said}; jumping to the {kernel} capture kernel",
            facts.cpu_notes, facts.memory_ranges,
        )?;
    }
    json::report_line(out, |o| {
        o.field("capture").object(|o| {
            o.field("kernel").str(kernel)?;
            o.field("digest_ok")
                .option(facts.digest_ok, |value, ok| value.bool(ok))?;
            if facts.digest_ok.is_none() {
                o.field("hv_check").str("skipped")?;
            }
            o.field("jumped").bool(refused.is_none())?;
            // A timestamp (microseconds since the TSC's origin), not a
            // duration: kept for compatibility; `handover_tsc` is the raw
            // count, comparable with the other `*_tsc` fields.
            o.field("handover_us").u64(facts.handover_us)?;
            o.field("handover_tsc").u64(facts.handover_tsc)?;
            for (name, tsc) in [
                "rendezvous_tsc",
                "cleanup_tsc",
                "summary_tsc",
                "header_tsc",
                "digests_tsc",
                "digests_start_tsc",
            ]
            .into_iter()
            .zip(facts.steps_tsc)
            {
                o.field(name).u64(tsc)?;
            }
            o.field("attempt").u64(facts.attempt)?;
            o.field("coordinator_stray_nmis")
                .u64(facts.coordinator_stray_nmis)?;
            o.field("refused")
                .option(refused, |value, error| value.display(error))
        })
    })
}

/// Why a block cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactsError {
    /// Shorter than its header.
    Short,
    /// The magic is missing: the crash path never finished the block.
    NoMagic,
    /// Counts beyond the limits, or that do not match its length.
    BadCounts,
}

impl fmt::Display for FactsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Short => "the block is shorter than its header",
            Self::NoMagic => "the block has no magic (the crash path did not finish it)",
            Self::BadCounts => "the block's counts do not match its length",
        })
    }
}

/// A block read back, from little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    bytes: &'a [u8],
    cpus: usize,
    records: usize,
}

impl<'a> Facts<'a> {
    /// Checks a block (`bytes` may be longer than it).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FactsError> {
        let word = |index: usize| -> Option<u64> {
            let at = index.checked_mul(8)?;
            let bytes = bytes.get(at..at + 8)?;
            Some(u64::from_le_bytes(bytes.try_into().ok()?))
        };
        if bytes.len() < HEADER_WORDS * 8 {
            return Err(FactsError::Short);
        }
        if word(H_MAGIC) != Some(MAGIC) {
            return Err(FactsError::NoMagic);
        }
        let (Some(words), Some(cpus), Some(records), Some(reason_len)) = (
            word(H_WORDS),
            word(H_CPUS),
            word(H_RECORDS),
            word(H_REASON_LEN),
        ) else {
            return Err(FactsError::Short);
        };
        if cpus > MAX_CPUS as u64
            || records > MAX_RECORDS as u64
            || reason_len > MAX_REASON as u64
            || words
                != (HEADER_WORDS as u64 + cpus * CPU_WORDS as u64 + records * RECORD_WORDS as u64)
            || words > (bytes.len() / 8) as u64
        {
            return Err(FactsError::BadCounts);
        }
        let cpus = cpus as usize;
        let records = records as usize;
        Ok(Self {
            bytes: &bytes[..words as usize * 8],
            cpus,
            records,
        })
    }

    fn word(&self, index: usize) -> u64 {
        let at = index * 8;
        self.bytes
            .get(at..at + 8)
            .and_then(|bytes| bytes.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    }

    /// Bytes the block takes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the block is empty (never: a block has its header).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// CPU indices.
    pub fn cpus(&self) -> usize {
        self.cpus
    }

    /// The scalars.
    pub fn scalars(&self) -> Scalars {
        let flags = self.word(H_FLAGS);
        Scalars {
            coordinator: self.word(H_COORDINATOR) as usize,
            coordinator_apic_id: self.word(H_COORDINATOR_APIC_ID) as u32,
            backend: Backend::from_code(self.word(H_BACKEND)),
            timed_out: flags & flag::TIMED_OUT != 0,
            nmi_broadcast: flags & flag::BROADCAST != 0,
            lockup: flags & flag::LOCKUP != 0,
            words_in_mailbox: flags & flag::WORDS_IN_MAILBOX != 0,
            deferred: flags & flag::DEFERRED != 0,
            own_vmx: decode_vmx(self.word(H_OWN_VMX)),
            own_svm: SvmExitCode(self.word(H_OWN_SVM) as u32),
            shootdown_us: self.word(H_SHOOTDOWN_US),
            started_us: self.word(H_STARTED_US),
            started_tsc: self.word(H_STARTED_TSC),
            waiting_from_us: self.word(H_WAITING_FROM_US),
            entered_tsc: self.word(H_ENTERED_TSC),
            nmis_sending_tsc: self.word(H_NMIS_SENDING_TSC),
            nmis_out_tsc: self.word(H_NMIS_OUT_TSC),
            panic_to_nmis_us: self.word(H_PANIC_TO_NMIS_US),
            coordinator_stray_nmis: self.word(H_STRAY_NMIS),
            nested_nmis: self.word(H_NESTED_NMIS),
            expected: self.word(H_EXPECTED),
            text_at: self.word(H_TEXT_AT),
        }
    }

    /// The hand-over's facts, if the crash path left them (it was about
    /// to jump).
    pub fn handover(&self) -> Option<HandoverFacts> {
        let flags = self.word(H_HANDOVER);
        if flags & handover_flag::PRESENT == 0 {
            return None;
        }
        let word = |i: usize| self.word(H_HANDOVER + 1 + i);
        Some(HandoverFacts {
            kernel_hv: flags & handover_flag::KERNEL_HV != 0,
            cpu_notes: word(0),
            memory_ranges: word(1),
            digest_ok: (flags & handover_flag::DIGEST_KNOWN != 0)
                .then_some(flags & handover_flag::DIGEST_OK != 0),
            handover_us: word(2),
            handover_tsc: word(3),
            steps_tsc: [word(4), word(5), word(6), word(7), word(8), word(11)],
            attempt: word(9),
            coordinator_stray_nmis: word(10),
        })
    }

    /// The reason's bytes (cut at [`MAX_REASON`]), and whether it was cut.
    pub fn reason(&self) -> (&'a [u8], bool) {
        let len = self.word(H_REASON_LEN) as usize;
        let start = H_REASON * 8;
        let bytes: &'a [u8] = self.bytes;
        (
            bytes.get(start..start + len).unwrap_or(&[]),
            self.word(H_FLAGS) & flag::REASON_CUT != 0,
        )
    }

    /// CPU index `cpu`'s facts (all clear past the block's CPUs).
    pub fn cpu(&self, cpu: usize) -> CpuFacts {
        if cpu >= self.cpus {
            return CpuFacts::default();
        }
        let base = HEADER_WORDS + cpu * CPU_WORDS;
        let first = self.word(base);
        let exits = self.word(base + 1);
        let has = |bit: u64| first & bit != 0;
        let not_online = if has(cpu_flag::NOT_ONLINE_NMI) {
            Some((NotOnline::Nmi, has(cpu_flag::STARTING)))
        } else if has(cpu_flag::NOT_ONLINE_INIT) {
            Some((NotOnline::Init, has(cpu_flag::STARTING)))
        } else {
            None
        };
        CpuFacts {
            apic_id: first as u32,
            checked_in: has(cpu_flag::CHECKED_IN),
            straggler: has(cpu_flag::STRAGGLER),
            record: has(cpu_flag::RECORD).then(|| CpuRecord {
                vmx: decode_vmx(exits & 0xFFFF_FFFF),
                visited: self.word(base + 2) as u32,
                observed_after_us: has(cpu_flag::OBSERVED_KNOWN).then(|| self.word(base + 4)),
            }),
            svm: SvmExitCode((exits >> 32) as u32),
            nmi_in_guest: has(cpu_flag::NMI_IN_GUEST_KNOWN).then(|| has(cpu_flag::NMI_IN_GUEST)),
            nmi_at_us: has(cpu_flag::NMI_AT_KNOWN).then(|| self.word(base + 3)),
            silent: has(cpu_flag::SILENT),
            not_online,
        }
    }

    /// Record `record`'s facts (all clear past the block's records).
    pub fn record(&self, record: usize) -> RecordFacts {
        if record >= self.records {
            return RecordFacts::default();
        }
        let base = HEADER_WORDS + self.cpus * CPU_WORDS + record * RECORD_WORDS;
        RecordFacts {
            vmcs: self.word(base),
            loaded_on: cpu_from(self.word(base + 1)),
            cleared_by: cpu_from(self.word(base + 2)),
            repeated_by: cpu_from(self.word(base + 3)),
        }
    }

    fn set_of(&self, pick: impl Fn(&CpuFacts) -> bool) -> CpuSet {
        let mut set = CpuSet::new();
        for cpu in 0..self.cpus {
            if pick(&self.cpu(cpu)) {
                let _ = set.insert(cpu);
            }
        }
        set
    }
}

impl VmcsRecords for Facts<'_> {
    fn count(&self) -> usize {
        self.records
    }

    fn vmcs(&self, record: usize) -> u64 {
        self.record(record).vmcs
    }

    fn loaded_on(&self, record: usize) -> Option<usize> {
        self.record(record).loaded_on
    }

    fn cleared_by(&self, record: usize) -> Option<usize> {
        self.record(record).cleared_by
    }
}

/// What the accounting says of the contexts of one kind (VMCS or VMCB).
#[derive(Debug, Clone, Copy, Default)]
struct Accounted {
    accounting: accounting::Accounting,
    visited: u64,
}

impl Accounted {
    /// Its six report fields, named for its kind, in the report's order:
    /// loaded, cleared, visited, on stragglers, cleared elsewhere, lost.
    fn fields<W: Write>(&self, o: &mut json::Object<'_, W>, names: [&str; 6]) -> fmt::Result {
        let a = &self.accounting;
        let values = [
            a.loaded,
            a.cleared,
            self.visited,
            a.on_stragglers,
            a.cleared_elsewhere,
            a.lost,
        ];
        names
            .into_iter()
            .zip(values)
            .try_for_each(|(name, value)| o.field(name).u64(value))
    }
}

fn vmx_exit_name(exit: VmxExit) -> &'static str {
    match exit {
        VmxExit::NotAttempted => "not_attempted",
        VmxExit::Left => "vmxoff",
        VmxExit::LeftAfterInvalidOpcode => "vmxoff_after_ud",
        VmxExit::WasOff => "was_off",
        VmxExit::StillOn(_) => "still_on",
    }
}

/// Per-CPU counts over the records, in one pass.
struct PerCpu {
    loaded_on: [u16; MAX_CPUS],
    credits: [u16; MAX_CPUS],
    repeats: [u16; MAX_CPUS],
}

impl PerCpu {
    fn of(facts: &Facts<'_>) -> Self {
        let mut counts = Self {
            loaded_on: [0; MAX_CPUS],
            credits: [0; MAX_CPUS],
            repeats: [0; MAX_CPUS],
        };
        // At most MAX_RECORDS (1024) records: a u16 count cannot wrap.
        let bump = |array: &mut [u16; MAX_CPUS], cpu: Option<usize>| {
            if let Some(slot) = cpu.and_then(|cpu| array.get_mut(cpu)) {
                *slot += 1;
            }
        };
        for record in 0..facts.records {
            let record = facts.record(record);
            bump(&mut counts.loaded_on, record.loaded_on);
            bump(&mut counts.credits, record.cleared_by);
            bump(&mut counts.repeats, record.repeated_by);
        }
        counts
    }
}

/// `array`'s first `cpus` counts, or zeros where the records are of the
/// other kind.
fn per_cpu_of_kind(
    array: &[u16; MAX_CPUS],
    cpus: usize,
    this_kind: bool,
) -> impl Iterator<Item = u64> + '_ {
    array[..cpus.min(MAX_CPUS)]
        .iter()
        .map(move |&count| if this_kind { u64::from(count) } else { 0 })
}

/// Writes the summary: a line for each VMCS (VMCB) left uncleared or
/// cleared by another CPU, the shootdown line and the `crash` report line.
pub fn render<W: Write>(facts: &Facts<'_>, out: &mut W) -> fmt::Result {
    let s = facts.scalars();
    let me = s.coordinator;
    let cpus = facts.cpus;
    let checked_in = facts.set_of(|cpu| cpu.checked_in);
    let stragglers = facts.set_of(|cpu| cpu.straggler);
    let (mut vmxoff_cpus, mut vmxoff_executed, mut vmx_was_on, mut visited) = (0, 0, 0, 0);
    let (mut svm_off_cpus, mut svm_was_on) = (0u64, 0u64);
    for cpu in checked_in.iter().chain(core::iter::once(me)) {
        let cpu_facts = facts.cpu(cpu);
        let svm_exit = cpu_facts.svm.exit();
        svm_was_on += u64::from(svm_exit.was_on());
        if cpu != me {
            svm_off_cpus += u64::from(svm_exit.is_off());
        }
        let Some(record) = cpu_facts.record else {
            continue;
        };
        // `vmxoff_cpus` (the old field) counts CPUs out of VMX however
        // they got there, the coordinator aside; `vmxoff_executed` only
        // those that executed VMXOFF.
        if cpu != me {
            vmxoff_cpus += u64::from(record.vmx.is_off());
            visited += u64::from(record.visited);
        }
        // A VMXOFF that raised #UD found the CPU outside VMX operation.
        let executed = record.vmx == VmxExit::Left;
        vmxoff_executed += u64::from(executed);
        vmx_was_on += u64::from(executed || matches!(record.vmx, VmxExit::StillOn(_)));
    }
    let own_svm = s.own_svm.exit();
    let on_svm = s.backend == Backend::Svm;
    let accounting = accounting::account(facts, &stragglers);
    // The lists hold VMCSes or VMCBs, never both: the other kind counts 0.
    let this = Accounted {
        accounting,
        visited,
    };
    let (vmcs, vmcb) = if on_svm {
        (Accounted::default(), this)
    } else {
        (this, Accounted::default())
    };
    let nmi_in_guest_cpus = (0..cpus)
        .filter(|&cpu| facts.cpu(cpu).nmi_in_guest == Some(true))
        .count();
    let kind_name = if on_svm { "VMCB" } else { "VMCS" };
    for record in 0..facts.records {
        let fate = accounting::fate(facts, record, &stragglers);
        let (Some(fate @ (VmcsFate::Lost | VmcsFate::ClearedElsewhere { .. })), Some(on)) =
            (fate, facts.record(record).loaded_on)
        else {
            continue;
        };
        writeln!(
            out,
            "*** hv: {kind_name} {:#x} (record {record}) loaded on CPU {on} by its record: {fate:?}",
            facts.record(record).vmcs,
        )?;
    }
    if on_svm {
        writeln!(
            out,
            "*** hv: shootdown: {} of {} CPUs checked in in {} us; VMCB loaded {}, cleared {}; SVM off on {svm_off_cpus} of {} others; own: {own_svm}; NMI in guest mode on {nmi_in_guest_cpus}",
            checked_in.len(),
            s.expected,
            s.shootdown_us,
            accounting.loaded,
            accounting.cleared,
            checked_in.len(),
        )?;
    } else {
        let vmx_words = if vmx_was_on == 0 {
            "no VMX ran"
        } else {
            "VMXOFF executed"
        };
        writeln!(
            out,
            "*** hv: shootdown: {} of {} CPUs checked in in {} us; VMCS loaded {}, cleared {}; {vmx_words} on {vmxoff_executed} of {vmx_was_on} CPUs with VMX on; own VMX exit {:?}; NMI in guest mode on {nmi_in_guest_cpus}",
            checked_in.len(),
            s.expected,
            s.shootdown_us,
            accounting.loaded,
            accounting.cleared,
            s.own_vmx,
        )?;
    }
    let per_cpu = PerCpu::of(facts);
    let (reason, cut) = facts.reason();
    let reason = core::str::from_utf8(reason).unwrap_or("(not UTF-8)");
    json::report_line(out, |o| {
        o.field("crash").object(|o| {
            o.field("cpu").u64(u64::from(s.coordinator_apic_id))?;
            o.field("cpu_index").u64(me as u64)?;
            if cut {
                o.field("reason")
                    .display(format_args!("{reason} [truncated]"))?;
            } else {
                o.field("reason").str(reason)?;
            }
            o.field("expected").u64(s.expected)?;
            o.field("checked_in").u64(checked_in.len() as u64)?;
            o.field("stragglers").u64_array(
                stragglers
                    .iter()
                    .map(|cpu| u64::from(facts.cpu(cpu).apic_id)),
            )?;
            o.field("backend").str(s.backend.name())?;
            vmcs.fields(
                o,
                [
                    "vmcs_loaded",
                    "vmcs_cleared",
                    "vmcs_visited",
                    "vmcs_on_stragglers",
                    "vmcs_cleared_elsewhere",
                    "vmcs_lost",
                ],
            )?;
            vmcb.fields(
                o,
                [
                    "vmcb_loaded",
                    "vmcb_cleared",
                    "vmcb_visited",
                    "vmcb_on_stragglers",
                    "vmcb_cleared_elsewhere",
                    "vmcb_lost",
                ],
            )?;
            o.field("svm_off_cpus").u64(svm_off_cpus)?;
            o.field("svm_was_on_cpus").u64(svm_was_on)?;
            o.field("coordinator_svm_off").bool(own_svm.is_off())?;
            o.field("nmi_in_guest_cpus").u64(nmi_in_guest_cpus as u64)?;
            // Per CPU index: whether its crash NMI came as a guest's VM
            // exit (null: it took none).
            o.field("nmi_in_guest").array(|a| {
                (0..cpus).try_for_each(|cpu| {
                    a.item()
                        .option(facts.cpu(cpu).nmi_in_guest, |value, yes| value.bool(yes))
                })
            })?;
            o.field("vmxoff_cpus").u64(vmxoff_cpus)?;
            o.field("vmxoff_executed").u64(vmxoff_executed)?;
            o.field("vmx_was_on_cpus").u64(vmx_was_on)?;
            o.field("coordinator_vmx_off").bool(s.own_vmx.is_off())?;
            o.field("coordinator_vmx_exit")
                .str(vmx_exit_name(s.own_vmx))?;
            // Per CPU index: the VMCSes (on SVM, VMCBs) its records say it
            // held at the crash, and the crash VMCLEARs (SVM clears) it
            // executed itself; the other kind's lists are all zeros. Of
            // those, the repeats: VMCSes whose own unload had cleared them
            // already (the crash came between VMCLEAR and unlink).
            let of_kind = |svm_kind: bool, array| per_cpu_of_kind(array, cpus, on_svm == svm_kind);
            o.field("vmcs_loaded_per_cpu")
                .u64_array(of_kind(false, &per_cpu.loaded_on))?;
            o.field("vmclear_credits")
                .u64_array(of_kind(false, &per_cpu.credits))?;
            o.field("vmclear_repeats")
                .u64_array(of_kind(false, &per_cpu.repeats))?;
            o.field("vmcb_loaded_per_cpu")
                .u64_array(of_kind(true, &per_cpu.loaded_on))?;
            o.field("vmcb_clear_credits")
                .u64_array(of_kind(true, &per_cpu.credits))?;
            o.field("vmcb_clear_repeats")
                .u64_array(of_kind(true, &per_cpu.repeats))?;
            o.field("shootdown_us").u64(s.shootdown_us)?;
            o.field("panic_to_nmis_us").u64(s.panic_to_nmis_us)?;
            o.field("nmi_broadcast").bool(s.nmi_broadcast)?;
            // Held in the mailbox for the capture image to print, or
            // printed before the hand-over.
            o.field("words").str(if s.words_in_mailbox {
                "mailbox"
            } else {
                "console"
            })?;
            // Raw TSC: a capture kernel's own clock has another
            // calibration, the TSC is the one clock both share.
            o.field("started_tsc").u64(s.started_tsc)?;
            o.field("entered_tsc").u64(s.entered_tsc)?;
            o.field("nmis_sending_tsc").u64(s.nmis_sending_tsc)?;
            o.field("nmis_out_tsc").u64(s.nmis_out_tsc)?;
            o.field("timed_out").bool(s.timed_out)?;
            o.field("not_online").array(|a| {
                (0..cpus).try_for_each(|cpu| {
                    let cpu = facts.cpu(cpu);
                    let Some((action, starting)) = cpu.not_online else {
                        return Ok(());
                    };
                    a.item().object(|o| {
                        o.field("apic_id").u64(u64::from(cpu.apic_id))?;
                        o.field("state")
                            .str(if starting { "starting" } else { "failed" })?;
                        o.field("action").str(match action {
                            NotOnline::Nmi => "nmi",
                            NotOnline::Init => "init",
                        })
                    })
                })
            })?;
            o.field("coordinator_stray_nmis")
                .u64(s.coordinator_stray_nmis)?;
            o.field("nested_nmis").u64(s.nested_nmis)?;
            o.field("lockup_cpus").u64_array(
                (0..cpus)
                    .filter(|&cpu| s.lockup && facts.cpu(cpu).silent)
                    .map(|cpu| u64::from(facts.cpu(cpu).apic_id)),
            )?;
            // Per CPU index: from the first NMI sent to that CPU taking
            // it (null: never took it), the per-CPU NMI latency.
            o.field("nmi_latency_us").array(|a| {
                (0..cpus).try_for_each(|cpu| {
                    let latency = facts
                        .cpu(cpu)
                        .nmi_at_us
                        .map(|at| at.saturating_sub(s.started_us));
                    a.item().option(latency, |value, us| value.u64(us))
                })
            })?;
            // Per CPU index: from the first NMI sent to the rendezvous
            // seeing that CPU checked in (null: never seen).
            o.field("checkin_us").array(|a| {
                (0..cpus).try_for_each(|cpu| {
                    let seen = facts
                        .cpu(cpu)
                        .record
                        .and_then(|record| record.observed_after_us)
                        .map(|us| s.waiting_from_us.saturating_add(us));
                    a.item().option(seen, |value, us| value.u64(us))
                })
            })
        })
    })
}

#[cfg(test)]
mod tests;
