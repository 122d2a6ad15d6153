//! The crash summary's facts: gathered by the coordinator once every CPU
//! checked in (plain stores into [`FACTS`], no formatting), formatted by
//! `crash::summary` either at once or, when an hv capture image follows,
//! by that image after the jump (`capture::words`), which finds the block
//! through `capture_facts=` on its command line. Formatting kilobytes of
//! report at 64 CPUs and more cost 5 to 10 ms between the crash and the
//! capture kernel under QEMU (`cargo xtask bench crash`); copying the
//! facts costs a fraction of that.

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crash::accounting::VmcsRecords;
use crash::cpuset::CpuSet;
use crash::shootdown::{Rendezvous, VmxExit};
use crash::summary::{
    self, CpuFacts, CpuRecord, Facts, FactsWriter, MAX_REASON, MAX_WORDS, NotOnline, RecordFacts,
    Scalars, SvmExitCode,
};
use smp_boot::bringup::CpuState;

use super::handover::FixedWriter;
use super::records::{self, Records};
use super::{COORDINATOR, Reason, nmi, svm};
use crate::cpu::{percpu, smp, time, watchdog};
use crate::mm::phys;

/// The block (`crash::summary`'s layout): written once, by the
/// coordinator.
static FACTS: [AtomicU64; MAX_WORDS] = [const { AtomicU64::new(0) }; MAX_WORDS];
/// Words of the block once gathered (0: not gathered).
static USED_WORDS: AtomicUsize = AtomicUsize::new(0);

/// The block's physical address (identity-mapped), for the capture
/// image's command line.
pub fn address() -> u64 {
    FACTS.as_ptr() as u64
}

/// What the coordinator knows when it gathers.
pub struct Gathered<'a> {
    /// Its CPU index.
    pub me: usize,
    /// Why.
    pub reason: &'a Reason<'a>,
    /// The CPUs expected to check in.
    pub expected: &'a CpuSet,
    /// The rendezvous.
    pub rendezvous: &'a Rendezvous,
    /// Its own VMX exit.
    pub own_vmx: VmxExit,
    /// The scalars the coordinator timed (the rest are filled here).
    pub scalars: Scalars,
}

/// Copies the facts into [`FACTS`]. Crash path: the coordinator only,
/// once; plain stores.
pub fn gather(gathered: &Gathered<'_>) {
    let cpus = smp::cpus().len();
    let record_count = Records.count();
    let mut sink = &FACTS[..];
    let mut writer = FactsWriter::new(&mut sink, cpus, record_count);
    // One byte past the limit shows a cut.
    let mut reason = [0u8; MAX_REASON + 1];
    let mut cut = FixedWriter::new(&mut reason);
    let _ = write!(cut, "{}", gathered.reason);
    let reason_len = cut.len();
    let lockup = matches!(gathered.reason, Reason::Lockup { .. });
    let scalars = Scalars {
        coordinator: gathered.me,
        coordinator_apic_id: percpu::shared(gathered.me).slot.apic_id(),
        backend: svm::backend(),
        timed_out: gathered.rendezvous.timed_out,
        lockup,
        own_vmx: gathered.own_vmx,
        own_svm: SvmExitCode(svm::LEDGERS.exit(gathered.me).encode()),
        expected: gathered.expected.len() as u64,
        coordinator_stray_nmis: u64::from(nmi::stray_on_coordinator()),
        nested_nmis: u64::from(nmi::nested()),
        ..gathered.scalars
    };
    writer.scalars(&scalars, &reason[..reason_len]);
    let now = time::now_us();
    let mut silent = CpuSet::new();
    if lockup {
        for cpu in watchdog::silent_cpus(now) {
            let _ = silent.insert(cpu);
        }
    }
    for (cpu, shared) in smp::cpus().iter().enumerate() {
        let record = COORDINATOR.record(cpu).map(|record| CpuRecord {
            vmx: record.ledger.vmx,
            visited: record.ledger.walk.map_or(0, |walk| walk.visited),
            observed_after_us: record.observed_after_us,
        });
        let not_online = match shared.slot.state() {
            state @ (CpuState::Starting | CpuState::Failed) => Some((
                if shared.idt_live.load(Ordering::Acquire) {
                    NotOnline::Nmi
                } else {
                    NotOnline::Init
                },
                state == CpuState::Starting,
            )),
            CpuState::Online | CpuState::Offline => None,
        };
        writer.cpu(
            cpu,
            &CpuFacts {
                apic_id: shared.slot.apic_id(),
                checked_in: gathered.rendezvous.checked_in.contains(cpu),
                straggler: gathered.rendezvous.stragglers.contains(cpu),
                record,
                svm: SvmExitCode(svm::LEDGERS.exit(cpu).encode()),
                nmi_in_guest: nmi::crash_nmi_in_guest(cpu),
                nmi_at_us: nmi::nmi_at_us(cpu),
                silent: silent.contains(cpu),
                not_online,
            },
        );
    }
    for record in 0..record_count {
        writer.record(
            record,
            &RecordFacts {
                vmcs: Records.vmcs(record),
                loaded_on: Records.loaded_on(record),
                cleared_by: Records.cleared_by(record),
                repeated_by: records::repeated_by(record),
            },
        );
    }
    USED_WORDS.store(writer.finish(), Ordering::Release);
}

/// Adds the hand-over's facts to the gathered block, for the capture
/// image to print after the summary (nothing if none were gathered).
pub fn store_handover(facts: &summary::HandoverFacts) {
    if USED_WORDS.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut sink = &FACTS[..];
    summary::store_handover(&mut sink, facts);
}

/// Forgets the gathered block (its magic cleared), once the crashed
/// hypervisor printed its summary itself.
pub fn forget() {
    USED_WORDS.store(0, Ordering::Release);
    let mut sink = &FACTS[..];
    summary::invalidate(&mut sink);
}

/// Formats the gathered facts into `out` (nothing if none were gathered).
pub fn write_summary(out: &mut impl Write) {
    let words = USED_WORDS.load(Ordering::Acquire);
    if words == 0 {
        return;
    }
    // The block is ours, in identity-mapped memory, and no longer written.
    let bytes = phys::read(address(), (words * 8) as u64);
    if let Ok(facts) = Facts::parse(bytes) {
        let _ = summary::render(&facts, out);
    }
}
