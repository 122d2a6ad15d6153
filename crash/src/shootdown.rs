//! Crash coordination: one coordinator, every other CPU cleaned up by an
//! NMI, and a bounded rendezvous that names the CPUs that did not answer.
//!
//! When the hypervisor crashes, every VMCS any CPU has loaded must be
//! VMCLEARed and every CPU must leave VMX before the capture kernel runs
//! (see [`crate::loaded_vmcs`] for why). The CPU that crashes first becomes
//! the coordinator: it sends NMI to all other CPUs and waits for them. Each
//! CPU, in its NMI handler (or its own panic path), runs
//! [`CrashCoordinator::crash_this_cpu`]: save the interrupted registers for
//! the dump, VMCLEAR its list, VMXOFF, disable its local APIC, check in.
//!
//! Everything here is lock-free and allocation-free: it runs in NMI context,
//! possibly on a CPU that was interrupted while holding any lock.
//!
//! # Memory-ordering contract
//!
//! Each CPU has one slot: a status word ([`CpuStatus`] bits) plus its crash
//! record (registers and ledger). A CPU writes only its own record, with
//! Relaxed stores, and then publishes each step by setting its status bit
//! with a Release read-modify-write; the check-in bit is the last. Whoever
//! reads a record (the coordinator, the dump writer) loads the status with
//! Acquire first and trusts only the parts whose bits it saw.
//!
//! Check-in and the coordinator giving up on a CPU are both
//! read-modify-writes of that CPU's status word, so they are totally
//! ordered: at the deadline each expected CPU is counted either as checked
//! in or as a straggler, never both, never neither. A CPU that checks in
//! after it was named a straggler learns that it is late ([`CheckIn::Late`])
//! and is listed by [`CrashCoordinator::late_arrivals`]; the rendezvous
//! result already handed out does not change.
//!
//! The election is one compare-and-swap of the coordinator word (AcqRel).
//! That word also arms the NMI handler: once it holds a CPU, an NMI means
//! "crash"; nothing is registered at crash time.

use core::fmt;
use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use crate::cpuset::CpuSet;
use crate::loaded_vmcs::{VmclearAll, VmcsArena, Vmx, WalkEnd};

/// The coordinator word holds a CPU index plus one; 0 means "no crash
/// yet", so that a coordinator in a `static` starts all zero (in .bss).
const NO_CPU: u32 = 0;

/// How many consecutive polls of the rendezvous may read the same time
/// before the clock is declared stalled and the wait ends. About a million
/// polls take tens of milliseconds or more, while the clock has microsecond
/// resolution: only a broken clock stays still that long, and the crash
/// path must not hang on a broken clock.
pub const STALLED_CLOCK_POLLS: u32 = 1 << 20;

pub use hv_abi::regs::CpuRegisters;

/// What a CPU entering the crash path is to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// First in: send the NMIs, wait for the rendezvous, clean up itself,
    /// hand over to the capture kernel.
    Coordinator,
    /// Another CPU coordinates: clean up ([`CrashCoordinator::crash_this_cpu`]),
    /// check in, park. Never start a shootdown.
    Responder {
        /// The coordinating CPU.
        coordinator: usize,
    },
    /// This CPU had already entered the crash path (a fault or panic inside
    /// it, or the shootdown NMI reaching a CPU that was panicking itself).
    /// Finish the local cleanup ([`CrashCoordinator::crash_this_cpu`] picks
    /// up where the interrupted run stopped) and park; never coordinate
    /// again, even if `coordinator` is this CPU.
    ReEntered {
        /// The coordinating CPU (possibly this one).
        coordinator: usize,
    },
}

/// A fault raised by an instruction of the crash path, which the kernel
/// catches with an exception fix-up and reports as a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// #UD: for VMXOFF, the CPU was not in VMX operation.
    InvalidOpcode,
    /// #GP: for a write to CR4, VMXE cannot be cleared in VMX operation.
    GeneralProtection,
    /// VMXOFF reported VMfail (dual-monitor treatment of SMIs active).
    VmFail,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidOpcode => "#UD",
            Self::GeneralProtection => "#GP",
            Self::VmFail => "VMfail",
        })
    }
}

impl core::error::Error for Fault {}

/// How a CPU left VMX in the crash path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmxExit {
    /// Not tried yet.
    #[default]
    NotAttempted,
    /// CR4.VMXE was clear: not in VMX operation, nothing to do (a CPU
    /// without VMX, or one that already left).
    WasOff,
    /// VMXOFF, then CR4.VMXE cleared.
    Left,
    /// VMXOFF raised #UD (CR4.VMXE set but no VMXON yet, or VMXOFF already
    /// done by an interrupted run), tolerated as Linux does; CR4.VMXE cleared.
    LeftAfterInvalidOpcode,
    /// Still in VMX operation (or CR4.VMXE still set) because of this fault.
    StillOn(Fault),
}

impl VmxExit {
    /// Whether the CPU is out of VMX operation with CR4.VMXE clear.
    pub const fn is_off(self) -> bool {
        matches!(
            self,
            Self::WasOff | Self::Left | Self::LeftAfterInvalidOpcode
        )
    }

    const fn encode(self) -> u8 {
        match self {
            Self::NotAttempted => 0,
            Self::WasOff => 1,
            Self::Left => 2,
            Self::LeftAfterInvalidOpcode => 3,
            Self::StillOn(Fault::InvalidOpcode) => 4,
            Self::StillOn(Fault::GeneralProtection) => 5,
            Self::StillOn(Fault::VmFail) => 6,
        }
    }

    const fn decode(raw: u8) -> Self {
        match raw {
            1 => Self::WasOff,
            2 => Self::Left,
            3 => Self::LeftAfterInvalidOpcode,
            4 => Self::StillOn(Fault::InvalidOpcode),
            5 => Self::StillOn(Fault::GeneralProtection),
            6 => Self::StillOn(Fault::VmFail),
            _ => Self::NotAttempted,
        }
    }
}

/// The per-CPU hardware the crash handler drives (the kernel: CR4, VMXOFF,
/// the local APIC; tests: fakes). VMCLEAR comes from [`Vmx`].
pub trait CrashHardware: Vmx {
    /// Whether CR4.VMXE is set.
    fn cr4_vmxe(&mut self) -> bool;
    /// VMXOFF; `Err(Fault::InvalidOpcode)` if the CPU was not in VMX operation.
    fn vmxoff(&mut self) -> Result<(), Fault>;
    /// Clears CR4.VMXE; `Err(Fault::GeneralProtection)` in VMX operation.
    fn clear_cr4_vmxe(&mut self) -> Result<(), Fault>;
    /// Software-disables the local APIC, so that the capture kernel starts
    /// with no interrupt from the old world pending on this CPU.
    fn disable_local_apic(&mut self);
    /// Whether the CPU runs guests with SVM instead (EFER.SVME set): then
    /// step 2 walks its list too, each entry a VMCB and each "VMCLEAR" the
    /// SVM clear (see [`crate::svm`]). `false` where there is no SVM.
    fn svm_enabled(&mut self) -> bool {
        false
    }
    /// Step 3 on SVM: STGI, EFER.SVME off, VM_HSAVE_PA 0, recorded apart
    /// from the VMX ledger ([`crate::svm::SvmLedgers::leave`]). Nothing
    /// where there is no SVM.
    fn leave_svm(&mut self, _cpu: usize) {}
}

/// Microsecond time for the rendezvous (the TSC, or a fake in tests).
pub trait Clock {
    /// Microseconds since an arbitrary origin; should advance.
    fn now_us(&mut self) -> u64;
}

/// What a CPU's check-in achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckIn {
    /// Before the coordinator gave up: counted as checked in.
    OnTime,
    /// After the coordinator named this CPU a straggler: recorded (see
    /// [`CrashCoordinator::late_arrivals`]), but the rendezvous result stands.
    Late,
    /// A second check-in: ignored.
    AlreadyCheckedIn,
    /// The CPU index has no slot (beyond the coordinator's CPU count).
    NoSlot,
}

// Status bits of a CPU's slot.
const ENTERED: u32 = 1 << 0;
const HANDLER_STARTED: u32 = 1 << 1;
const REGS_SAVED: u32 = 1 << 2;
const WALKED: u32 = 1 << 3;
const VMX_DONE: u32 = 1 << 4;
const APIC_OFF: u32 = 1 << 5;
const CHECKED_IN: u32 = 1 << 6;
const GAVE_UP: u32 = 1 << 7;

/// A snapshot of a CPU's crash progress.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CpuStatus(u32);

impl CpuStatus {
    /// The CPU called [`CrashCoordinator::enter`].
    pub const fn entered(self) -> bool {
        self.0 & ENTERED != 0
    }
    /// The CPU started [`CrashCoordinator::crash_this_cpu`].
    pub const fn handler_started(self) -> bool {
        self.0 & HANDLER_STARTED != 0
    }
    /// Its interrupted registers are in its record.
    pub const fn regs_saved(self) -> bool {
        self.0 & REGS_SAVED != 0
    }
    /// Its loaded-VMCS list was walked (or counted, with VMX off).
    pub const fn walked(self) -> bool {
        self.0 & WALKED != 0
    }
    /// Its VMX exit was attempted; the ledger says how it went.
    pub const fn vmx_done(self) -> bool {
        self.0 & VMX_DONE != 0
    }
    /// Its local APIC is disabled.
    pub const fn apic_off(self) -> bool {
        self.0 & APIC_OFF != 0
    }
    /// It checked in (on time or late).
    pub const fn checked_in(self) -> bool {
        self.0 & CHECKED_IN != 0
    }
    /// The coordinator named it a straggler.
    pub const fn straggler(self) -> bool {
        self.0 & GAVE_UP != 0
    }
    /// Named a straggler, and checked in afterwards.
    pub const fn late(self) -> bool {
        self.straggler() && self.checked_in()
    }
}

impl fmt::Debug for CpuStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuStatus")
            .field("entered", &self.entered())
            .field("handler_started", &self.handler_started())
            .field("regs_saved", &self.regs_saved())
            .field("walked", &self.walked())
            .field("vmx_done", &self.vmx_done())
            .field("apic_off", &self.apic_off())
            .field("checked_in", &self.checked_in())
            .field("straggler", &self.straggler())
            .finish()
    }
}

/// The crash ledger of one CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ledger {
    /// The crash walk of its list; `None` if not done, or skipped because
    /// VMX was off.
    pub walk: Option<VmclearAll>,
    /// Entries on its list that could not be VMCLEARed because the CPU was
    /// no longer in VMX operation (should be 0; a VMCS missing from the
    /// summary's `vmcs_cleared` shows up here or nowhere).
    pub vmcs_stranded: u32,
    /// How it left VMX.
    pub vmx: VmxExit,
}

/// Everything published about one CPU's crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashRecord {
    /// Its progress.
    pub status: CpuStatus,
    /// The interrupted registers, once saved.
    pub regs: Option<CpuRegisters>,
    /// Its ledger (parts not yet published read as not done).
    pub ledger: Ledger,
    /// When the rendezvous first saw it checked in, in microseconds after
    /// the wait began (for the per-CPU NMI latency of the benchmark).
    pub observed_after_us: Option<u64>,
}

/// What [`CrashCoordinator::crash_this_cpu`] did about the VMCS list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkStep {
    /// Walked and VMCLEARed.
    Walked(VmclearAll),
    /// An earlier, interrupted run on this CPU had finished the walk.
    DoneEarlier,
    /// CR4.VMXE was clear, so VMCLEAR would #UD: not attempted. `stranded`
    /// entries were on the list anyway (0 on a healthy system).
    SkippedVmxOff {
        /// Entries found on the list.
        stranded: u32,
    },
}

/// What [`CrashCoordinator::crash_this_cpu`] did on one CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuCrashOutcome {
    /// An earlier run of the handler on this CPU had started (this run
    /// interrupted it, or came after it); steps it finished were skipped.
    pub resumed: bool,
    /// This run saved the registers (false when an earlier run had: the
    /// first context, the one that crashed, is the one kept).
    pub saved_regs: bool,
    /// The list walk.
    pub walk: WalkStep,
    /// How the CPU left VMX (from the earlier run if it had got that far).
    pub vmx: VmxExit,
    /// The check-in.
    pub check_in: CheckIn,
}

/// What [`CrashCoordinator::wait_for_rendezvous`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rendezvous {
    /// The CPUs waited for.
    pub expected: CpuSet,
    /// Expected CPUs that checked in before the coordinator gave up.
    pub checked_in: CpuSet,
    /// Expected CPUs that did not: named, never to be counted later.
    pub stragglers: CpuSet,
    /// The stragglers that had started the crash handler but not finished it
    /// (stuck in a VMCLEAR, say), as opposed to never answering the NMI.
    pub stuck_in_handler: CpuSet,
    /// Start of the wait to the last check-in seen, or to giving up.
    pub elapsed_us: u64,
    /// The timeout expired.
    pub timed_out: bool,
    /// The clock stood still for [`STALLED_CLOCK_POLLS`] polls: gave up early.
    pub clock_stalled: bool,
}

impl Rendezvous {
    /// Every expected CPU checked in.
    pub fn is_complete(&self) -> bool {
        self.stragglers.is_empty()
    }
}

/// A `WalkEnd` in one word: the tag in the high half, a bad index in the low.
const fn encode_walk_end(end: WalkEnd) -> u64 {
    match end {
        WalkEnd::Complete => 1 << 32,
        WalkEnd::BadIndex { index } => 2 << 32 | index as u64,
        WalkEnd::StepLimit => 3 << 32,
        WalkEnd::NoSuchCpu => 4 << 32,
    }
}

const fn decode_walk_end(raw: u64) -> Option<WalkEnd> {
    match raw >> 32 {
        1 => Some(WalkEnd::Complete),
        2 => Some(WalkEnd::BadIndex { index: raw as u32 }),
        3 => Some(WalkEnd::StepLimit),
        4 => Some(WalkEnd::NoSuchCpu),
        _ => None,
    }
}

/// One CPU's check-in word and crash record.
#[derive(Debug)]
struct CrashSlot {
    status: AtomicU32,
    regs: [AtomicU64; CpuRegisters::COUNT],
    vmcs_visited: AtomicU32,
    vmcs_cleared: AtomicU32,
    vmcs_failed: AtomicU32,
    vmcs_stranded: AtomicU32,
    /// `encode_walk_end`, 0 when no walk was done.
    walk_end: AtomicU64,
    vmx_exit: AtomicU8,
    /// u64::MAX until the rendezvous sees the check-in.
    observed_after_us: AtomicU64,
}

impl CrashSlot {
    const fn new() -> Self {
        Self {
            status: AtomicU32::new(0),
            regs: [const { AtomicU64::new(0) }; CpuRegisters::COUNT],
            vmcs_visited: AtomicU32::new(0),
            vmcs_cleared: AtomicU32::new(0),
            vmcs_failed: AtomicU32::new(0),
            vmcs_stranded: AtomicU32::new(0),
            walk_end: AtomicU64::new(0),
            vmx_exit: AtomicU8::new(0),
            // Stored plus one, so that the slot starts all zero (a static
            // of them lands in .bss, not in an image's data).
            observed_after_us: AtomicU64::new(0),
        }
    }

    /// Publishes a step: everything stored before it is visible to whoever
    /// sees the bit (Acquire).
    fn publish(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::Release);
    }

    fn ledger(&self) -> Ledger {
        let walk = decode_walk_end(self.walk_end.load(Ordering::Relaxed)).map(|end| VmclearAll {
            visited: self.vmcs_visited.load(Ordering::Relaxed),
            cleared: self.vmcs_cleared.load(Ordering::Relaxed),
            failed: self.vmcs_failed.load(Ordering::Relaxed),
            end,
        });
        Ledger {
            walk,
            vmcs_stranded: self.vmcs_stranded.load(Ordering::Relaxed),
            vmx: VmxExit::decode(self.vmx_exit.load(Ordering::Relaxed)),
        }
    }
}

/// The crash state of the whole machine: the coordinator election and one
/// check-in slot and crash record per possible CPU (`CPUS`, at most
/// [`CpuSet::CAPACITY`]). `new` is a `const fn`: the kernel keeps one in a
/// `static`, valid from the first instruction, so a crash before or during
/// bring-up finds every slot in place.
///
/// One-shot: a machine crashes once. See the module documentation for the
/// memory-ordering contract.
#[derive(Debug)]
pub struct CrashCoordinator<const CPUS: usize> {
    coordinator: AtomicU32,
    slots: [CrashSlot; CPUS],
}

impl<const CPUS: usize> Default for CrashCoordinator<CPUS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const CPUS: usize> CrashCoordinator<CPUS> {
    /// No crash yet; every slot empty.
    pub const fn new() -> Self {
        const {
            assert!(CPUS <= CpuSet::CAPACITY);
        }
        Self {
            coordinator: AtomicU32::new(NO_CPU),
            slots: [const { CrashSlot::new() }; CPUS],
        }
    }

    /// The coordinating CPU, once a crash has begun. The NMI handler's test
    /// for "this NMI is the crash shootdown".
    pub fn coordinator(&self) -> Option<usize> {
        let raw = self.coordinator.load(Ordering::Acquire);
        raw.checked_sub(1).map(|cpu| cpu as usize)
    }

    /// The first step of every CPU entering the crash path (a panic, a fatal
    /// exception, the crash hypercall, or the shootdown NMI). The first CPU
    /// ever to call it wins the election and coordinates; every later call
    /// gets another role, so there is never a second shootdown. A second
    /// call on the same CPU is reported as [`Role::ReEntered`].
    pub fn enter(&self, cpu: usize) -> Role {
        let first_time_here = match self.slots.get(cpu) {
            Some(slot) => slot.status.fetch_or(ENTERED, Ordering::AcqRel) & ENTERED == 0,
            None => true,
        };
        if !first_time_here {
            let coordinator = self.coordinator().unwrap_or(cpu);
            return Role::ReEntered { coordinator };
        }
        // NO_CPU means "no crash yet": no index may be confused with it.
        let me = cpu.min(u32::MAX as usize - 1) as u32 + 1;
        match self
            .coordinator
            .compare_exchange(NO_CPU, me, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Role::Coordinator,
            // Only for a CPU without a slot: no status bit to tell us.
            Err(winner) if winner == me => Role::ReEntered {
                coordinator: winner as usize - 1,
            },
            Err(winner) => Role::Responder {
                coordinator: winner as usize - 1,
            },
        }
    }

    /// The crash handler of one CPU, run on that CPU with interrupts off: by
    /// every CPU the NMI reaches, by a CPU that crashes while another
    /// coordinates, and by the coordinator itself after the rendezvous.
    ///
    /// In order:
    /// 1. save `interrupted` (the registers of the context the NMI or fault
    ///    interrupted) into the CPU's record;
    /// 2. if CR4.VMXE is set, VMCLEAR every entry of its list in `lists`
    ///    ([`VmcsArena::crash_vmclear_all`]); if clear, VMCLEAR would #UD, so
    ///    only count the entries (Linux skips the same way);
    /// 3. if CR4.VMXE is set, VMXOFF, tolerating #UD, then clear CR4.VMXE;
    ///    on SVM (EFER.SVME instead of CR4.VMXE, step 2 walking VMCBs),
    ///    leave SVM ([`CrashHardware::leave_svm`]);
    /// 4. disable the local APIC;
    /// 5. check in.
    ///
    /// The caller then parks the CPU (`cli; hlt` in a loop, never MWAIT),
    /// unless it is the coordinator.
    ///
    /// It can be re-run on a CPU whose earlier run was interrupted (a fault
    /// or NMI inside the crash path): finished steps are skipped (the walk
    /// is redone if it had not finished: VMCLEARing twice is harmless), and
    /// the first saved registers are kept.
    pub fn crash_this_cpu<const ENTRIES: usize, const LIST_CPUS: usize, H>(
        &self,
        cpu: usize,
        interrupted: &CpuRegisters,
        lists: &VmcsArena<ENTRIES, LIST_CPUS>,
        hw: &mut H,
    ) -> CpuCrashOutcome
    where
        H: CrashHardware + ?Sized,
    {
        let slot = self.slots.get(cpu);
        let done = slot.map_or(0, |slot| {
            slot.status.fetch_or(HANDLER_STARTED, Ordering::AcqRel)
        });
        let resumed = done & HANDLER_STARTED != 0;

        let saved_regs = match slot {
            Some(slot) if done & REGS_SAVED == 0 => {
                for (cell, value) in slot.regs.iter().zip(interrupted.to_array()) {
                    cell.store(value, Ordering::Relaxed);
                }
                slot.publish(REGS_SAVED);
                true
            }
            _ => false,
        };

        let vmxe = hw.cr4_vmxe();
        // A CPU runs guests with VMX or with SVM, never both.
        let svme = !vmxe && hw.svm_enabled();
        let walk = if done & WALKED != 0 {
            WalkStep::DoneEarlier
        } else if vmxe || svme {
            let walk = lists.crash_vmclear_all(cpu, hw);
            if let Some(slot) = slot {
                slot.vmcs_visited.store(walk.visited, Ordering::Relaxed);
                slot.vmcs_cleared.store(walk.cleared, Ordering::Relaxed);
                slot.vmcs_failed.store(walk.failed, Ordering::Relaxed);
                slot.walk_end
                    .store(encode_walk_end(walk.end), Ordering::Relaxed);
                slot.publish(WALKED);
            }
            WalkStep::Walked(walk)
        } else {
            let stranded = lists.walk_on(cpu, |_, _| {}).visited;
            if let Some(slot) = slot {
                slot.vmcs_stranded.store(stranded, Ordering::Relaxed);
                slot.publish(WALKED);
            }
            WalkStep::SkippedVmxOff { stranded }
        };

        let vmx = match slot {
            Some(slot) if done & VMX_DONE != 0 => {
                VmxExit::decode(slot.vmx_exit.load(Ordering::Relaxed))
            }
            _ => {
                let vmx = leave_vmx(hw, vmxe);
                if let Some(slot) = slot {
                    slot.vmx_exit.store(vmx.encode(), Ordering::Relaxed);
                    slot.publish(VMX_DONE);
                }
                vmx
            }
        };

        hw.leave_svm(cpu);

        // Harmless to repeat, so not skipped on a re-run.
        hw.disable_local_apic();
        if let Some(slot) = slot {
            slot.publish(APIC_OFF);
        }

        CpuCrashOutcome {
            resumed,
            saved_regs,
            walk,
            vmx,
            check_in: self.check_in(cpu),
        }
    }

    /// Checks `cpu` in: one Release read-modify-write of its status word,
    /// which publishes its whole record. [`crash_this_cpu`](Self::crash_this_cpu)
    /// ends with it.
    pub fn check_in(&self, cpu: usize) -> CheckIn {
        let Some(slot) = self.slots.get(cpu) else {
            return CheckIn::NoSlot;
        };
        let before = slot.status.fetch_or(CHECKED_IN, Ordering::Release);
        if before & CHECKED_IN != 0 {
            CheckIn::AlreadyCheckedIn
        } else if before & GAVE_UP != 0 {
            CheckIn::Late
        } else {
            CheckIn::OnTime
        }
    }

    /// The coordinator's wait: polls until every CPU of `expected` has
    /// checked in, or `timeout_us` has passed on `clock` (or the clock stood
    /// still, see [`STALLED_CLOCK_POLLS`]). Then gives up on the rest, each
    /// with one compare-and-swap that races fairly with its check-in, so the
    /// stragglers named are exactly those that will never be counted.
    /// Expected CPUs without a slot are stragglers at once. Call it once.
    pub fn wait_for_rendezvous<C: Clock + ?Sized>(
        &self,
        expected: &CpuSet,
        clock: &mut C,
        timeout_us: u64,
    ) -> Rendezvous {
        let start = clock.now_us();
        let deadline = start.saturating_add(timeout_us);
        let mut pending = CpuSet::new();
        let mut stragglers = CpuSet::new();
        for cpu in expected {
            // Cannot fail: `cpu` came out of a CpuSet.
            let _ = if cpu < CPUS {
                pending.insert(cpu)
            } else {
                stragglers.insert(cpu)
            };
        }
        let mut checked_in = CpuSet::new();
        let mut now = start;
        let mut elapsed_us = 0;
        let mut last_distinct_time = start;
        let mut polls_without_tick = 0u32;
        let mut timed_out = false;
        let mut clock_stalled = false;
        loop {
            for cpu in pending.iter() {
                let slot = &self.slots[cpu];
                if slot.status.load(Ordering::Acquire) & CHECKED_IN != 0 {
                    pending.remove(cpu);
                    let _ = checked_in.insert(cpu);
                    elapsed_us = now.saturating_sub(start);
                    slot.observed_after_us
                        .store(elapsed_us.saturating_add(1), Ordering::Relaxed);
                }
            }
            if pending.is_empty() {
                break;
            }
            now = clock.now_us();
            if now >= deadline {
                timed_out = true;
                break;
            }
            if now == last_distinct_time {
                polls_without_tick += 1;
                if polls_without_tick >= STALLED_CLOCK_POLLS {
                    clock_stalled = true;
                    break;
                }
            } else {
                last_distinct_time = now;
                polls_without_tick = 0;
            }
            core::hint::spin_loop();
        }

        let mut stuck_in_handler = CpuSet::new();
        for cpu in pending.iter() {
            let slot = &self.slots[cpu];
            match give_up(slot) {
                GiveUp::CheckedInJustNow => {
                    let _ = checked_in.insert(cpu);
                    slot.observed_after_us.store(
                        now.saturating_sub(start).saturating_add(1),
                        Ordering::Relaxed,
                    );
                }
                GiveUp::Straggler { in_handler } => {
                    let _ = stragglers.insert(cpu);
                    if in_handler {
                        let _ = stuck_in_handler.insert(cpu);
                    }
                }
            }
        }
        if !pending.is_empty() {
            elapsed_us = now.saturating_sub(start);
        }
        Rendezvous {
            expected: *expected,
            checked_in,
            stragglers,
            stuck_in_handler,
            elapsed_us,
            timed_out,
            clock_stalled,
        }
    }

    /// A snapshot of `cpu`'s progress.
    pub fn status(&self, cpu: usize) -> Option<CpuStatus> {
        let slot = self.slots.get(cpu)?;
        Some(CpuStatus(slot.status.load(Ordering::Acquire)))
    }

    /// Everything `cpu` has published (for the summary and the dump notes).
    pub fn record(&self, cpu: usize) -> Option<CrashRecord> {
        let slot = self.slots.get(cpu)?;
        let status = CpuStatus(slot.status.load(Ordering::Acquire));
        let regs = status.regs_saved().then(|| {
            let mut raw = [0; CpuRegisters::COUNT];
            for (value, cell) in raw.iter_mut().zip(&slot.regs) {
                *value = cell.load(Ordering::Relaxed);
            }
            CpuRegisters::from_array(raw)
        });
        let mut ledger = slot.ledger();
        if !status.walked() {
            ledger.walk = None;
            ledger.vmcs_stranded = 0;
        }
        if !status.vmx_done() {
            ledger.vmx = VmxExit::NotAttempted;
        }
        let observed = slot.observed_after_us.load(Ordering::Relaxed);
        Some(CrashRecord {
            status,
            regs,
            ledger,
            observed_after_us: observed.checked_sub(1),
        })
    }

    /// CPUs that checked in after the rendezvous had named them stragglers.
    pub fn late_arrivals(&self) -> CpuSet {
        let mut late = CpuSet::new();
        for (cpu, slot) in self.slots.iter().enumerate() {
            if CpuStatus(slot.status.load(Ordering::Acquire)).late() {
                let _ = late.insert(cpu);
            }
        }
        late
    }
}

enum GiveUp {
    CheckedInJustNow,
    Straggler { in_handler: bool },
}

/// Marks the CPU a straggler unless it has checked in. A compare-and-swap
/// loop rather than `fetch_or`, so that a CPU that checked in is never
/// marked; it retries only when the CPU set one of its own bits meanwhile,
/// which it can do a handful of times at most.
fn give_up(slot: &CrashSlot) -> GiveUp {
    let mut status = slot.status.load(Ordering::Acquire);
    loop {
        if status & CHECKED_IN != 0 {
            return GiveUp::CheckedInJustNow;
        }
        match slot.status.compare_exchange(
            status,
            status | GAVE_UP,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                return GiveUp::Straggler {
                    in_handler: status & HANDLER_STARTED != 0,
                };
            }
            Err(now) => status = now,
        }
    }
}

/// Step 3 of the crash handler: VMXOFF only with CR4.VMXE set, #UD
/// tolerated, then clear CR4.VMXE.
fn leave_vmx<H: CrashHardware + ?Sized>(hw: &mut H, vmxe: bool) -> VmxExit {
    if !vmxe {
        return VmxExit::WasOff;
    }
    let left = match hw.vmxoff() {
        Ok(()) => VmxExit::Left,
        Err(Fault::InvalidOpcode) => VmxExit::LeftAfterInvalidOpcode,
        // Still in VMX operation: clearing CR4.VMXE would #GP.
        Err(fault) => return VmxExit::StillOn(fault),
    };
    match hw.clear_cr4_vmxe() {
        Ok(()) => left,
        Err(fault) => VmxExit::StillOn(fault),
    }
}

#[cfg(test)]
mod tests;
