//! The hand-over to the capture kernel: the last thing the coordinator
//! does. The capture layer loaded the kernel and digested it at boot, and
//! left a [`Plan`] here; at crash time this writes the ELF core header
//! (the one piece left out of the digests), checks every digest and jumps
//! through the purgatory. It returns only when there is no capture kernel,
//! or when it refuses to jump (the header does not fit, or a digest does
//! not match), having said why.

use core::fmt::Write;
use core::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use crash::cpuset::CpuSet;
use crash::shootdown::VmxExit;
use crash::summary::{self, HandoverFacts};
use hv_abi::crash_note::{CpuLedger, CrashRecord, VmclearOutcome, VmclearRecord, cpu_flags};
use hv_core::cmdline::CoordinatorStep;
use kexec_loader::PhysRange;
use kexec_loader::elfcore::{
    CpuState, ElfCoreError, MemorySegment, PreparedHeader, complete_core_header,
};
use smp_boot::bringup::CpuState as BringupState;
use smp_boot::madt::MAX_CPUS;

use super::COORDINATOR;
use super::purgatory::{HvCheck, HvTable};
use super::records::{MAX_VMCS, Records};
use super::words::Words;
use crate::arch::cpu;
use crate::cpu::{percpu, smp};
use crate::mm::{self, phys};

/// Memory ranges a dump can describe: the firmware map's regions, one of
/// which the reservation may split in two.
pub const MAX_SEGMENTS: usize = hv_core::memmap::MAX_REGIONS + 1;
/// Digested pieces at most: the capture image's segments, its boot data,
/// the purgatory.
pub const DIGESTS: usize = kexec_loader::pvh::MAX_LOAD_SEGMENTS + 2;
/// Longest crash reason kept in the dump.
pub const MAX_REASON: usize = 256;

/// Which capture kernel is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Linux bzImage (64-bit boot protocol).
    Linux,
    /// The hv image in capture mode (PVH entry).
    Hv,
}

impl Kind {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Linux => "linux",
            Kind::Hv => "hv",
        }
    }
}

/// Everything the crash path needs, fixed at boot by the capture layer.
#[derive(Debug)]
pub struct Plan {
    /// The kernel's kind.
    pub kind: Kind,
    /// The core header region (left out of the digests): the header, then
    /// the crash words mailbox.
    pub elfcorehdr: PhysRange,
    /// The region's tail: the crash words mailbox (`crash::words`), which
    /// the capture image prints; armed only for the hv image.
    pub mailbox: PhysRange,
    /// The purgatory's area.
    pub purgatory: u64,
    /// Every loaded piece's digest, sealed (the purgatory keeps its own
    /// copy in the reservation).
    pub digests: HvTable,
    /// The memory the dump describes (at most [`MAX_SEGMENTS`], in boot
    /// memory).
    pub segments: &'static [MemorySegment],
    /// The core header's parts that do not depend on the crash, prepared
    /// at load time (with hv's own image as loaded: the dump's `NT_AUXV`
    /// and `NT_FILE` notes, through which drgn matches `-s hv` to it).
    pub header: PreparedCopy,
}

/// The prepared parts of the core header, in hv's own memory: the crash
/// path copies them into the header region (which hv may write, so a
/// stray write there is undone) and completes the header.
#[derive(Debug)]
pub struct PreparedCopy {
    /// The bytes, `prepared.fixed_len()` of them.
    pub bytes: &'static [u8],
    /// Where the crash's parts go.
    pub prepared: PreparedHeader,
}

/// Buffers the crash path fills to write the core header (it allocates
/// nothing): made at boot, taken once by the coordinator.
#[derive(Debug)]
struct Scratch {
    cpus: &'static mut [CpuState],
    ledgers: &'static mut [CpuLedger<'static>],
    vmclears: &'static mut [VmclearRecord],
    stragglers: &'static mut [u32],
    reason: [u8; MAX_REASON],
}

static PLAN: spin::Once<Plan> = spin::Once::new();
static SCRATCH: phys::ClaimOnce<Scratch> = phys::ClaimOnce::new();
/// Hand-over attempts begun: a second one follows a crash inside the
/// first, and writes a smaller header; there is no third.
static ATTEMPTS: AtomicU32 = AtomicU32::new(0);

/// Allocates the crash-time buffers, element by element (they are far too
/// large for a stack). `false` when memory ran out.
pub fn alloc_scratch() -> bool {
    use mm::alloc_permanent_slice_with as slice;
    let buffers = (
        slice(MAX_CPUS, |_| CpuState {
            cpu_index: 0,
            regs: Default::default(),
        }),
        slice(MAX_CPUS, |_| CpuLedger {
            cpu_index: 0,
            apic_id: 0,
            flags: 0,
            vmcs_loaded: 0,
            vmclears: &[],
        }),
        slice(MAX_VMCS, |_| VmclearRecord {
            vmcs_phys: 0,
            outcome: VmclearOutcome::Succeeded,
        }),
        slice(MAX_CPUS, |_| 0u32),
    );
    let (Some(cpus), Some(ledgers), Some(vmclears), Some(stragglers)) = buffers else {
        return false;
    };
    let Some(scratch) = mm::alloc_permanent(Scratch {
        cpus,
        ledgers,
        vmclears,
        stragglers,
        reason: [0; MAX_REASON],
    }) else {
        return false;
    };
    SCRATCH.put(scratch);
    true
}

/// The purgatory's area, once a capture kernel is loaded (the
/// `nmi_in_purgatory` knob waits for the purgatory's entry stamp there).
pub fn purgatory_area() -> Option<u64> {
    PLAN.get().map(|plan| plan.purgatory)
}

/// Leaves the capture layer's plan for the crash path.
pub fn install(plan: Plan) -> &'static Plan {
    PLAN.call_once(|| plan)
}

/// What the coordinator knows at hand-over time.
pub struct Handover<'a> {
    /// The coordinator's CPU index.
    pub coordinator: usize,
    /// CPUs that checked in.
    pub checked_in: &'a CpuSet,
    /// CPUs that did not.
    pub stragglers: &'a CpuSet,
    /// Why the machine crashed.
    pub reason: &'a dyn core::fmt::Display,
}

/// `core::fmt::Write` into a fixed buffer, cutting what does not fit.
pub(super) struct FixedWriter<'a> {
    buffer: &'a mut [u8],
    len: usize,
}

impl<'a> FixedWriter<'a> {
    /// An empty writer into `buffer`.
    pub(super) fn new(buffer: &'a mut [u8]) -> Self {
        Self { buffer, len: 0 }
    }

    /// Bytes written so far.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Write for FixedWriter<'_> {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let take = text.len().min(self.buffer.len() - self.len);
        self.buffer[self.len..self.len + take].copy_from_slice(&text.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// Fills the per-CPU ledger: for every online CPU, each VMCS its records
/// say it held and whether it was VMCLEARed. Returns how many ledgers.
fn fill_ledgers(
    ledgers: &mut [CpuLedger<'static>],
    vmclears: &'static mut [VmclearRecord],
    coordinator: usize,
    checked_in: &CpuSet,
) -> usize {
    let mut remaining = vmclears;
    let mut count = 0;
    for (cpu, shared) in smp::cpus().iter().enumerate().take(ledgers.len()) {
        if shared.slot.state() != BringupState::Online {
            continue;
        }
        let (written, held) = crash::accounting::cpu_ledger(&Records, cpu, remaining);
        // Split off this CPU's part: final once filled, the rest stays
        // writable for the next CPUs.
        let (mine, rest) = core::mem::take(&mut remaining).split_at_mut(written);
        remaining = rest;
        let vmx = COORDINATOR.record(cpu).map(|record| record.ledger.vmx);
        let mut flags = 0;
        if checked_in.contains(cpu) {
            flags |= cpu_flags::CHECKED_IN;
        }
        if cpu == coordinator {
            flags |= cpu_flags::COORDINATOR;
        }
        if matches!(
            vmx,
            Some(VmxExit::Left | VmxExit::LeftAfterInvalidOpcode | VmxExit::StillOn(_))
        ) {
            flags |= cpu_flags::VMX_WAS_ON;
        }
        if matches!(vmx, Some(VmxExit::Left | VmxExit::LeftAfterInvalidOpcode)) {
            flags |= cpu_flags::VMXOFF_DONE;
        }
        let svm = super::svm::LEDGERS.exit(cpu);
        if svm.was_on() {
            flags |= cpu_flags::SVM_WAS_ON;
        }
        if svm.was_on() && svm.is_off() {
            flags |= cpu_flags::SVM_OFF;
        }
        if super::nmi::crash_nmi_in_guest(cpu) == Some(true) {
            flags |= cpu_flags::NMI_IN_GUEST;
        }
        ledgers[count] = CpuLedger {
            cpu_index: cpu as u32,
            apic_id: shared.slot.apic_id(),
            flags,
            vmcs_loaded: held as u32,
            vmclears: mine,
        };
        count += 1;
    }
    count
}

/// Writes the ELF core header, checks the digests and jumps to the
/// capture kernel. Returns only when there is no capture kernel, or when
/// the jump is refused (having said why).
pub fn hand_over(handover: &Handover<'_>) {
    let Some(plan) = PLAN.get() else { return };
    let attempt = ATTEMPTS.fetch_add(1, Ordering::AcqRel) + 1;
    if attempt > 2 {
        let _ = writeln!(
            Words,
            "*** hv: capture: refused: the hand-over failed twice; not jumping"
        );
        report_capture(plan, Some(false), Some(&"the hand-over failed twice"));
        return;
    }
    // The second attempt follows a crash inside the first: it leaves out
    // the ledger, the part most likely to have failed.
    let with_ledger = attempt == 1;
    let Some(scratch) = SCRATCH.claim(handover.coordinator as u32) else {
        let _ = writeln!(
            Words,
            "*** hv: capture: refused: the crash-time buffers are another CPU's; not jumping"
        );
        report_capture(plan, Some(false), Some(&"the crash-time buffers are gone"));
        return;
    };
    // The crashing CPU first: gdb makes the first note its current thread.
    let order = core::iter::once(handover.coordinator).chain(
        handover
            .checked_in
            .iter()
            .filter(|&cpu| cpu != handover.coordinator),
    );
    let mut cpu_count = 0;
    for cpu in order {
        if let Some(regs) = COORDINATOR.record(cpu).and_then(|record| record.regs) {
            scratch.cpus[cpu_count] = CpuState {
                cpu_index: cpu as u32,
                regs,
            };
            cpu_count += 1;
        }
    }
    let mut straggler_count = 0;
    for cpu in handover.stragglers {
        scratch.stragglers[straggler_count] = percpu::shared(cpu).slot.apic_id();
        straggler_count += 1;
    }
    super::inject::coordinator_step(CoordinatorStep::CoreHeader);
    super::inject::at_handover(attempt);
    let ledger_count = if with_ledger {
        let vmclears = core::mem::take(&mut scratch.vmclears);
        fill_ledgers(
            scratch.ledgers,
            vmclears,
            handover.coordinator,
            handover.checked_in,
        )
    } else {
        0
    };
    let mut writer = FixedWriter::new(&mut scratch.reason);
    let _ = write!(writer, "{}", handover.reason);
    let reason_len = writer.len();
    let reason_text = core::str::from_utf8(&scratch.reason[..reason_len]).unwrap_or("crash");
    let record = CrashRecord {
        reason: reason_text,
        coordinator: handover.coordinator as u32,
        stragglers: &scratch.stragglers[..straggler_count],
        cpus: &scratch.ledgers[..ledger_count],
    };
    // The core header region lies in the reservation, left out of every
    // allocator and of the digests; only this CPU writes it now: the
    // parts prepared at load time, then the crash's.
    let header_room = plan.elfcorehdr.len - plan.mailbox.len;
    let written = phys::with_bytes_mut(plan.elfcorehdr.start, header_room, |out| {
        let fixed = plan.header.bytes;
        let room = out.len();
        out.get_mut(..fixed.len())
            .ok_or(ElfCoreError::BufferTooSmall {
                needed: fixed.len(),
                len: room,
            })?
            .copy_from_slice(fixed);
        complete_core_header(
            out,
            &plan.header.prepared,
            &scratch.cpus[..cpu_count],
            &record,
        )
    });
    super::stamp(super::Step::CoreHeader);
    if let Err(error) = written {
        let _ = writeln!(
            Words,
            "*** hv: capture: cannot write the ELF core header: {error}; not jumping"
        );
        report_capture(plan, Some(false), Some(&error));
        return;
    }
    // The hypervisor's own check first (a fast refusal, said here); the
    // purgatory checks again from the reservation, on its own copy. It
    // passed during the rendezvous, or is made (again) now: a failure's
    // reason is said here, in its place among the hand-over's words.
    let checked = match early_verdict() {
        Some(verdict) => Ok(verdict),
        None => check_digests(plan),
    };
    let checked = match checked {
        Ok(checked) => checked,
        Err(error) => {
            let _ = writeln!(Words, "*** hv: capture: {error}");
            report_capture(plan, Some(false), Some(&error));
            return;
        }
    };
    let digest_ok = match checked {
        HvCheck::Verified => Some(true),
        HvCheck::Skipped => None,
    };
    let facts = handover_facts(plan, digest_ok, cpu_count);
    // Left for the capture image with the summary, or said now.
    if super::words::summary_deferred() {
        super::facts::store_handover(&facts);
    } else {
        let _ = summary::render_handover(&facts, None, &mut Words);
    }
    crate::console::wait_transmitter_empty();
    super::inject::coordinator_step(CoordinatorStep::Purgatory);
    crate::arch::blobs::jump_to_purgatory(plan.purgatory)
}

/// The verdict of the digest check made during the rendezvous, when it
/// passed: 0 none, 1 verified, 2 skipped.
static EARLY_VERDICT: AtomicU8 = AtomicU8::new(0);

/// Checks the capture kernel's digests while the other CPUs answer the
/// shootdown: the check reads only the reservation and needs nothing from
/// them, and the coordinator would otherwise only wait. Keeps a passing
/// verdict for [`hand_over`]; a failing one is made again there, which
/// says why.
pub fn check_digests_early() {
    let Some(plan) = PLAN.get() else { return };
    let code = match check_digests(plan) {
        Ok(HvCheck::Verified) => 1,
        Ok(HvCheck::Skipped) => 2,
        Err(_) => 0,
    };
    EARLY_VERDICT.store(code, Ordering::Release);
}

fn early_verdict() -> Option<HvCheck> {
    match EARLY_VERDICT.load(Ordering::Acquire) {
        1 => Some(HvCheck::Verified),
        2 => Some(HvCheck::Skipped),
        _ => None,
    }
}

/// hv's own digest check, stamped.
fn check_digests(plan: &Plan) -> Result<HvCheck, kexec_loader::purgatory::CheckError> {
    super::stamp(super::Step::DigestsStart);
    super::inject::coordinator_step(CoordinatorStep::DigestCheck);
    let checked = super::purgatory::check_before_jump(&plan.digests);
    super::stamp(super::Step::Digests);
    checked
}

/// What the hand-over's lines say, stamped now.
fn handover_facts(plan: &Plan, digest_ok: Option<bool>, cpu_notes: usize) -> HandoverFacts {
    let now = cpu::rdtsc();
    use super::Step;
    HandoverFacts {
        kernel_hv: plan.kind == Kind::Hv,
        cpu_notes: cpu_notes as u64,
        memory_ranges: plan.segments.len() as u64,
        digest_ok,
        handover_us: crate::cpu::time::tsc_to_us(now),
        handover_tsc: now,
        steps_tsc: [
            Step::Rendezvous,
            Step::Cleanup,
            Step::Summary,
            Step::CoreHeader,
            Step::Digests,
            Step::DigestsStart,
        ]
        .map(super::stamped),
        attempt: u64::from(ATTEMPTS.load(Ordering::Relaxed)),
        coordinator_stray_nmis: u64::from(super::nmi::stray_on_coordinator()),
    }
}

/// The `capture` report line of a refused hand-over: `digest_ok` is the
/// hypervisor's own check's verdict (`None`: skipped or not reached).
fn report_capture(plan: &Plan, digest_ok: Option<bool>, error: Option<&dyn core::fmt::Display>) {
    let facts = handover_facts(plan, digest_ok, 0);
    let _ = summary::render_handover(&facts, error, &mut Words);
}
