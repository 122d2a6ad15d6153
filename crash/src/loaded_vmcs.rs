//! The per-CPU lists of loaded VMCSes (Linux `loaded_vmcss_on_cpu`), and the
//! NMI-safe walk that VMCLEARs them when the hypervisor crashes.
//!
//! Why this exists: a VMCS that a CPU has loaded (VMPTRLD) may sit in that
//! CPU's VMCS cache, which is not snooped. If it is still cached when the
//! capture kernel runs, its eventual write-back overwrites memory the new
//! kernel owns. VMXOFF does not flush that cache on existing Intel CPUs, and
//! after VMXOFF a VMCLEAR is impossible (#UD). So, before VMXOFF, every CPU
//! must VMCLEAR every VMCS it has loaded, and it finds them through its list
//! here, even when the crash NMI lands in the middle of an update of that
//! very list (Linux commit 31603d4fc2bb, "Always VMCLEAR in-use VMCSes during
//! crash with kexec support").
//!
//! Entries live in a fixed arena and link to each other by index, so the
//! lists need neither an allocator nor `unsafe`. The memory-ordering
//! contract is on [`VmcsArena`].

use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

/// The "no entry" and "no CPU" value of every index field.
const NONE: u32 = u32::MAX;

/// Allocation states of an arena slot.
const FREE: u8 = 0;
const SETTING_UP: u8 = 1;
const ALLOCATED: u8 = 2;

/// A VMCS region must be 4 KiB aligned (SDM 24.2).
const VMCS_ALIGN_MASK: u64 = 0xFFF;

/// One entry of a [`VmcsArena`]: a VMCS and its links in a CPU's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmcsId(u32);

impl VmcsId {
    /// The entry's index in its arena.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// A VMX instruction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmxError {
    /// VMfailInvalid: no current VMCS, or the operand was rejected.
    FailInvalid,
    /// VMfailValid, with the VM-instruction error number.
    FailValid {
        /// The VM-instruction error field.
        instruction_error: u32,
    },
    /// The instruction raised #UD: the CPU is not in VMX operation (for
    /// example an NMI already did VMXOFF). The kernel catches the fault with
    /// an exception fix-up and returns this.
    NotInVmxOperation,
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FailInvalid => f.write_str("VMfailInvalid"),
            Self::FailValid { instruction_error } => {
                write!(f, "VMfailValid (VM-instruction error {instruction_error})")
            }
            Self::NotInVmxOperation => f.write_str("#UD: not in VMX operation"),
        }
    }
}

impl core::error::Error for VmxError {}

/// The VMX instructions the lists need, executed on the calling CPU.
///
/// The kernel implements this with the real instructions; host tests use a
/// fake that tracks which VMCS is cached on which CPU.
pub trait Vmx {
    /// VMCLEAR: writes the VMCS at `vmcs_phys` back to memory, marks it
    /// clear and inactive on this CPU. Harmless on a VMCS that is not active.
    fn vmclear(&mut self, vmcs_phys: u64) -> Result<(), VmxError>;

    /// VMPTRLD: makes the VMCS at `vmcs_phys` active and current on this CPU.
    /// From here on the CPU may cache it.
    fn vmptrld(&mut self, vmcs_phys: u64) -> Result<(), VmxError>;
}

impl<V: Vmx + ?Sized> Vmx for &mut V {
    fn vmclear(&mut self, vmcs_phys: u64) -> Result<(), VmxError> {
        (**self).vmclear(vmcs_phys)
    }

    fn vmptrld(&mut self, vmcs_phys: u64) -> Result<(), VmxError> {
        (**self).vmptrld(vmcs_phys)
    }
}

/// A point just after one store (or one VMX instruction) of a list update.
///
/// Every store that [`VmcsArena::add`], [`VmcsArena::remove`],
/// [`VmcsArena::load_here`] and [`VmcsArena::unload`] make is followed by a
/// [`StoreHook::after_store`] call naming the point. Production passes
/// [`NoHook`]; the kernel's fault injection (a crash at a named point) and
/// the host tests (an NMI after every single store) pass their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorePoint {
    /// `add`: the entry's `cpu` claimed (NONE -> this CPU, Acquire).
    AddClaim,
    /// `add`: the entry's `next` set to the list's old first entry.
    AddSetNext,
    /// `add`: the entry's `prev` set to the head.
    AddSetPrev,
    /// `add`: the old first entry's `prev` set to the entry (non-empty list only).
    AddBackLink,
    /// `add`: the head points at the entry (Release): the entry is published.
    AddPublish,
    /// `load_here`: VMPTRLD done, the VMCS is active here and may be cached.
    LoadVmptrld,
    /// `load_here`: this CPU's current-VMCS record updated.
    LoadSetCurrent,
    /// `unload`: VMCLEAR done, the entry still linked.
    UnloadVmclear,
    /// `unload`: this CPU's current-VMCS record cleared (only if it was this VMCS).
    UnloadResetCurrent,
    /// `unload`: the entry's launched flag cleared (next entry is a VMLAUNCH).
    UnloadResetLaunched,
    /// `remove`: the predecessor (or head) skips the entry (Release): unlinked.
    RemoveUnlink,
    /// `remove`: the successor's `prev` set to the entry's predecessor (if any).
    RemoveBackLink,
    /// `remove`: the entry's `cpu` set to NONE (Release): another CPU may take it.
    RemoveReleaseCpu,
}

impl StorePoint {
    /// Every point, in the order the stores happen within an operation.
    pub const ALL: [StorePoint; 13] = [
        Self::AddClaim,
        Self::AddSetNext,
        Self::AddSetPrev,
        Self::AddBackLink,
        Self::AddPublish,
        Self::LoadVmptrld,
        Self::LoadSetCurrent,
        Self::UnloadVmclear,
        Self::UnloadResetCurrent,
        Self::UnloadResetLaunched,
        Self::RemoveUnlink,
        Self::RemoveBackLink,
        Self::RemoveReleaseCpu,
    ];

    /// The point's name on the command line (`crash=...,point:NAME`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::AddClaim => "add-claim",
            Self::AddSetNext => "add-set-next",
            Self::AddSetPrev => "add-set-prev",
            Self::AddBackLink => "add-back-link",
            Self::AddPublish => "add-publish",
            Self::LoadVmptrld => "load-vmptrld",
            Self::LoadSetCurrent => "load-set-current",
            Self::UnloadVmclear => "unload-vmclear",
            Self::UnloadResetCurrent => "unload-reset-current",
            Self::UnloadResetLaunched => "unload-reset-launched",
            Self::RemoveUnlink => "remove-unlink",
            Self::RemoveBackLink => "remove-back-link",
            Self::RemoveReleaseCpu => "remove-release-cpu",
        }
    }

    /// The point called `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|point| point.name() == name)
    }
}

/// Called after every store of a list update; see [`StorePoint`].
pub trait StoreHook {
    /// The store at `point` has just been made.
    fn after_store(&mut self, point: StorePoint);
}

/// The production hook: does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;

impl StoreHook for NoHook {
    #[inline(always)]
    fn after_store(&mut self, _point: StorePoint) {}
}

impl<F: FnMut(StorePoint)> StoreHook for F {
    fn after_store(&mut self, point: StorePoint) {
        self(point)
    }
}

/// Why a list operation was refused. A refused operation changed nothing,
/// except where a variant says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListError {
    /// The CPU index is beyond the arena's CPU count.
    NoSuchCpu {
        /// The CPU index given.
        cpu: usize,
    },
    /// The entry is out of range or not allocated.
    NoSuchEntry {
        /// The entry given.
        id: VmcsId,
    },
    /// Every entry of the arena is in use.
    ArenaFull,
    /// A VMCS region must be 4 KiB aligned.
    MisalignedVmcs {
        /// The address given.
        phys: u64,
    },
    /// The VMCS is on another CPU's list: that CPU must unload it first.
    LoadedElsewhere {
        /// The CPU whose list holds it.
        cpu: usize,
    },
    /// `add` of an entry that is already on this CPU's list.
    AlreadyOnThisCpu,
    /// `remove` of an entry that is not on this CPU's list.
    NotOnThisCpu {
        /// Where the entry is, if anywhere.
        loaded_on: Option<usize>,
    },
    /// `free` of an entry that is still on a CPU's list.
    StillLoaded {
        /// The CPU whose list holds it.
        cpu: usize,
    },
    /// A link of the list points outside the arena: the list is corrupt.
    CorruptLink {
        /// The bad index.
        index: u32,
    },
    /// A VMX instruction failed. After a failed VMCLEAR in `unload`, the
    /// entry stays on the list, so the crash walk still tries it.
    Vmx(VmxError),
}

impl fmt::Display for ListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchCpu { cpu } => write!(f, "no loaded-VMCS list for CPU {cpu}"),
            Self::NoSuchEntry { id } => write!(f, "VMCS entry {} is not allocated", id.0),
            Self::ArenaFull => f.write_str("every loaded-VMCS entry is in use"),
            Self::MisalignedVmcs { phys } => write!(f, "VMCS at {phys:#x} is not 4 KiB aligned"),
            Self::LoadedElsewhere { cpu } => write!(f, "VMCS is loaded on CPU {cpu}"),
            Self::AlreadyOnThisCpu => f.write_str("VMCS is already on this CPU's list"),
            Self::NotOnThisCpu {
                loaded_on: Some(cpu),
            } => {
                write!(f, "VMCS is not on this CPU's list but on CPU {cpu}'s")
            }
            Self::NotOnThisCpu { loaded_on: None } => f.write_str("VMCS is on no list"),
            Self::StillLoaded { cpu } => write!(f, "VMCS is still loaded on CPU {cpu}"),
            Self::CorruptLink { index } => write!(f, "loaded-VMCS list links to bad index {index}"),
            Self::Vmx(error) => write!(f, "VMX instruction failed: {error}"),
        }
    }
}

impl core::error::Error for ListError {}

impl From<VmxError> for ListError {
    fn from(error: VmxError) -> Self {
        Self::Vmx(error)
    }
}

/// What [`VmcsArena::load_here`] (or [`VmcsArena::load_on`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// The CPU that had to VMCLEAR the VMCS first (`load_on` only).
    pub evicted_from: Option<usize>,
    /// The VMCS was added to this CPU's list: it is clear (use VMLAUNCH)
    /// and its host-state fields (GS base, TR, GDTR/IDTR bases...) still
    /// describe another CPU or none, so the caller must refresh them.
    pub newly_on_this_cpu: bool,
    /// A VMPTRLD was issued (false: it already was this CPU's current VMCS).
    pub vmptrld: bool,
}

/// What [`VmcsArena::unload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unloaded {
    /// VMCLEARed and unlinked; the entry is on no list now.
    Cleared,
    /// The entry was not on this CPU's list: nothing to do. The normal answer
    /// of a remote-clear IPI that lost a race with another unload.
    NotLoadedHere,
}

/// Why a forward walk stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkEnd {
    /// It reached the end of the list.
    Complete,
    /// A `next` pointed outside the arena (corruption): the walk stopped there.
    BadIndex {
        /// The bad index.
        index: u32,
    },
    /// It visited as many entries as the arena holds and the list still went
    /// on: a cycle (corruption). Stopped so the crash path never hangs.
    StepLimit,
    /// The CPU has no list in this arena.
    NoSuchCpu,
}

/// What a forward walk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// Entries reached.
    pub visited: u32,
    /// Why it stopped.
    pub end: WalkEnd,
}

/// What [`VmcsArena::crash_vmclear_all`] did, for the crash ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmclearAll {
    /// Entries reached.
    pub visited: u32,
    /// VMCLEARs that succeeded.
    pub cleared: u32,
    /// VMCLEARs that failed (the walk goes on past them).
    pub failed: u32,
    /// Why the walk stopped.
    pub end: WalkEnd,
}

#[derive(Debug)]
struct Entry {
    /// FREE, SETTING_UP or ALLOCATED.
    state: AtomicU8,
    /// The next entry on the list, or NONE. Written by the owning CPU only;
    /// read by the NMI walker.
    next: AtomicU32,
    /// The previous entry, or NONE when the head is the predecessor. Written
    /// and read by the owning CPU only; the walker never reads it.
    prev: AtomicU32,
    /// Physical address of the VMCS region. Written by `alloc` only.
    vmcs_phys: AtomicU64,
    /// The CPU whose list holds the entry, or NONE. NONE -> c and c -> NONE
    /// are both done by CPU c.
    cpu: AtomicU32,
    /// VMLAUNCH succeeded since the last VMCLEAR: the next entry is a VMRESUME.
    launched: AtomicBool,
}

impl Entry {
    const fn new() -> Self {
        Self {
            state: AtomicU8::new(FREE),
            next: AtomicU32::new(NONE),
            prev: AtomicU32::new(NONE),
            vmcs_phys: AtomicU64::new(0),
            cpu: AtomicU32::new(NONE),
            launched: AtomicBool::new(false),
        }
    }
}

fn cpu_of(raw: u32) -> Option<usize> {
    (raw != NONE).then_some(raw as usize)
}

/// The entries of every loaded-VMCS list, and one list per possible CPU.
///
/// `ENTRIES` bounds the VMCSes that can exist at once (one per vCPU, plus
/// any spare); `CPUS` is the number of possible CPUs (`MAX_CPUS`). Every
/// list exists from construction: `new` is a `const fn`, so the arena is a
/// `static` that is valid before any CPU starts and before VMX is ever on,
/// and the crash path never meets a CPU without a list.
///
/// # Memory-ordering contract
///
/// **Who writes.** CPU *c*'s list (its head, and `next`/`prev` of the
/// entries on it) is written only by CPU *c*, with interrupts disabled, in
/// [`add`](Self::add), [`remove`](Self::remove), [`load_here`](Self::load_here)
/// and [`unload`](Self::unload). With interrupts off, the call-function IPI
/// (through which other CPUs ask *c* to unload) cannot nest inside an
/// update. NMIs are not blocked: the crash NMI may run the walker between
/// *any* two stores; [`StorePoint`] names each of them. An entry's `cpu`
/// goes NONE -> *c* (compare-and-swap, Acquire, first store of `add`) and
/// *c* -> NONE (Release, last store of `remove`), both by *c*. `prev` is
/// written and read by the owner only.
///
/// **Publishing.** `add` sets every field of the entry first (`cpu`, `next`
/// = old first entry, `prev`, the old first entry's `prev`), then publishes
/// it with one Release store of the predecessor's `next`, which is the
/// CPU's head (entries are added at the front, like Linux `list_add`).
/// [`load_here`](Self::load_here) adds the entry *before* its VMPTRLD, so an
/// entry that the walker can miss (not yet published) is never active, and
/// hence never cached. VMPTRLD first would open a window in which the VMCS
/// may be cached but is unreachable; a host test shows that leak.
///
/// **Unpublishing.** [`unload`](Self::unload) VMCLEARs first and only then
/// unlinks, with one Release store of the predecessor's `next` (or head).
/// The entry's own `next` is left as it was, so a walk that reaches the
/// entry before the unlink still goes on correctly. The opposite order
/// (Linux before 31603d4fc2bb) opens a window in which the VMCS is
/// unreachable but still cached, and neither the walker nor unload clears
/// it; a host test shows that leak too.
///
/// **What the NMI walker may see** ([`crash_vmclear_all`](Self::crash_vmclear_all)
/// and [`walk_on`](Self::walk_on)): it follows `next` from the head and never
/// reads `prev`, so a half-updated `prev` is harmless.
/// - An entry being added is missed until the publishing store, and it is
///   not active before that, so nothing is lost.
/// - An entry being removed is still seen until the unlink store; since it
///   was VMCLEARed before, the walker VMCLEARs it a second time, which is
///   harmless. After the unlink it is unreachable, so an entry freed (and
///   reused) after `remove` is never touched.
/// - It never hangs: it takes at most `ENTRIES` steps and stops at any index
///   outside the arena, reporting how it ended ([`WalkEnd`]).
///
/// The walker runs on the CPU whose update it interrupted, so it sees that
/// CPU's stores in program order; the Release stores and Acquire loads of
/// the links keep the compiler from reordering around them (free on x86:
/// plain `mov`s) and keep the contract valid for any other reader.
///
/// **Between CPUs (migration).** A VMCS moves from CPU A to CPU B as:
///
/// ```text
/// A, in B's IPI, irqs off:  VMCLEAR; unlink (Release); cpu = NONE (Release)
/// B, irqs off:              CAS cpu NONE -> B (Acquire); next, prev; publish (Release); VMPTRLD
/// ```
///
/// A's Release store of `cpu = NONE` pairs with B's Acquire compare-and-swap,
/// like Linux's `smp_wmb()` before `loaded_vmcs->cpu = -1` in
/// `__loaded_vmcs_clear()` with the `smp_rmb()` in `vmx_vcpu_load_vmcs()`.
/// It orders everything A did (its VMCLEAR, its read of the entry's `next`
/// for the unlink) before B rewrites `next`/`prev`. Without it, A could read
/// B's new `next`, splice B's list into its own, and its crash walk would
/// VMCLEAR VMCSes active on B. The IPI's own completion orders this too in
/// practice; the pair keeps the lists correct whatever the IPI does.
/// Allocation pairs the same way: `free` checks `cpu == NONE` (Acquire) and
/// releases the slot (Release); `alloc` claims it (Acquire).
#[derive(Debug)]
pub struct VmcsArena<const ENTRIES: usize, const CPUS: usize> {
    entries: [Entry; ENTRIES],
    /// Per CPU: the first entry of its list, or NONE.
    heads: [AtomicU32; CPUS],
    /// Per CPU: the entry it last VMPTRLDed and has not VMCLEARed, or NONE.
    /// Owner-only; it saves a VMPTRLD when the same vCPU runs again.
    current: [AtomicU32; CPUS],
}

impl<const ENTRIES: usize, const CPUS: usize> Default for VmcsArena<ENTRIES, CPUS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const ENTRIES: usize, const CPUS: usize> VmcsArena<ENTRIES, CPUS> {
    /// Empty lists for every CPU, every entry free.
    pub const fn new() -> Self {
        const {
            assert!(ENTRIES < NONE as usize && CPUS < NONE as usize);
        }
        Self {
            entries: [const { Entry::new() }; ENTRIES],
            heads: [const { AtomicU32::new(NONE) }; CPUS],
            current: [const { AtomicU32::new(NONE) }; CPUS],
        }
    }

    /// Takes a free entry for the VMCS region at `vmcs_phys` (4 KiB
    /// aligned). The entry is on no list until it is loaded. Lock-free.
    pub fn alloc(&self, vmcs_phys: u64) -> Result<VmcsId, ListError> {
        if vmcs_phys & VMCS_ALIGN_MASK != 0 {
            return Err(ListError::MisalignedVmcs { phys: vmcs_phys });
        }
        for (index, entry) in self.entries.iter().enumerate() {
            if entry
                .state
                .compare_exchange(FREE, SETTING_UP, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                entry.vmcs_phys.store(vmcs_phys, Ordering::Relaxed);
                entry.next.store(NONE, Ordering::Relaxed);
                entry.prev.store(NONE, Ordering::Relaxed);
                entry.launched.store(false, Ordering::Relaxed);
                entry.state.store(ALLOCATED, Ordering::Release);
                return Ok(VmcsId(index as u32));
            }
        }
        Err(ListError::ArenaFull)
    }

    /// Returns an entry to the arena. It must be on no list: unload it first
    /// (on the CPU that has it loaded).
    pub fn free(&self, id: VmcsId) -> Result<(), ListError> {
        let entry = self.allocated(id)?;
        if let Some(cpu) = cpu_of(entry.cpu.load(Ordering::Acquire)) {
            return Err(ListError::StillLoaded { cpu });
        }
        entry
            .state
            .compare_exchange(ALLOCATED, FREE, Ordering::Release, Ordering::Relaxed)
            .map(|_| ())
            .map_err(|_| ListError::NoSuchEntry { id })
    }

    /// Physical address of the entry's VMCS region.
    pub fn vmcs_phys(&self, id: VmcsId) -> Result<u64, ListError> {
        Ok(self.allocated(id)?.vmcs_phys.load(Ordering::Relaxed))
    }

    /// The CPU whose list holds the entry, if any.
    pub fn loaded_on(&self, id: VmcsId) -> Result<Option<usize>, ListError> {
        Ok(cpu_of(self.allocated(id)?.cpu.load(Ordering::Acquire)))
    }

    /// Whether the next VM entry with this VMCS must be a VMRESUME.
    pub fn is_launched(&self, id: VmcsId) -> Result<bool, ListError> {
        Ok(self.allocated(id)?.launched.load(Ordering::Relaxed))
    }

    /// Records a successful VMLAUNCH; VMCLEAR (in `unload`) undoes it.
    pub fn mark_launched(&self, id: VmcsId) -> Result<(), ListError> {
        self.allocated(id)?.launched.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The entry `cpu` last made current with VMPTRLD, if still loaded.
    pub fn current(&self, cpu: usize) -> Result<Option<VmcsId>, ListError> {
        let raw = self.cpu_slot(&self.current, cpu)?.load(Ordering::Relaxed);
        Ok((raw != NONE).then_some(VmcsId(raw)))
    }

    /// Puts the entry at the front of `cpu`'s list. Run on `cpu`, interrupts
    /// disabled. The entry must be on no list (its `cpu` is claimed with a
    /// compare-and-swap, so two CPUs can never both add it).
    ///
    /// Every field is set before the single Release store of the head that
    /// publishes the entry; see the contract on [`VmcsArena`].
    pub fn add<H: StoreHook + ?Sized>(
        &self,
        cpu: usize,
        id: VmcsId,
        hook: &mut H,
    ) -> Result<(), ListError> {
        let head = self.cpu_slot(&self.heads, cpu)?;
        let entry = self.allocated(id)?;
        let old_first = head.load(Ordering::Relaxed);
        let old_first_entry = self.link(old_first)?;

        // Pairs with the Release store of `cpu = NONE` at the end of the
        // previous owner's `remove` (Linux: smp_rmb() in vmx_vcpu_load_vmcs).
        entry
            .cpu
            .compare_exchange(NONE, cpu as u32, Ordering::Acquire, Ordering::Acquire)
            .map_err(|owner| {
                if owner as usize == cpu {
                    ListError::AlreadyOnThisCpu
                } else {
                    ListError::LoadedElsewhere {
                        cpu: owner as usize,
                    }
                }
            })?;
        hook.after_store(StorePoint::AddClaim);
        entry.next.store(old_first, Ordering::Relaxed);
        hook.after_store(StorePoint::AddSetNext);
        entry.prev.store(NONE, Ordering::Relaxed);
        hook.after_store(StorePoint::AddSetPrev);
        if let Some(old_first_entry) = old_first_entry {
            old_first_entry.prev.store(id.0, Ordering::Relaxed);
            hook.after_store(StorePoint::AddBackLink);
        }
        // The one store that makes the entry reachable by the walker.
        head.store(id.0, Ordering::Release);
        hook.after_store(StorePoint::AddPublish);
        Ok(())
    }

    /// Unlinks the entry from `cpu`'s list. Run on `cpu`, interrupts
    /// disabled. Does not VMCLEAR: use [`unload`](Self::unload), which
    /// VMCLEARs first; `remove` alone is for an entry that is not active
    /// (a failed VMPTRLD).
    pub fn remove<H: StoreHook + ?Sized>(
        &self,
        cpu: usize,
        id: VmcsId,
        hook: &mut H,
    ) -> Result<(), ListError> {
        let head = self.cpu_slot(&self.heads, cpu)?;
        let entry = self.allocated(id)?;
        let owner = entry.cpu.load(Ordering::Relaxed);
        if owner as usize != cpu {
            return Err(ListError::NotOnThisCpu {
                loaded_on: cpu_of(owner),
            });
        }
        let next = entry.next.load(Ordering::Relaxed);
        let prev = entry.prev.load(Ordering::Relaxed);
        let next_entry = self.link(next)?;
        let predecessor_next = match self.link(prev)? {
            Some(prev_entry) => &prev_entry.next,
            None => head,
        };

        // The unlink. Until here the walker still reaches the entry, whose
        // `next` is intact; from here on it cannot.
        predecessor_next.store(next, Ordering::Release);
        hook.after_store(StorePoint::RemoveUnlink);
        if let Some(next_entry) = next_entry {
            next_entry.prev.store(prev, Ordering::Relaxed);
            hook.after_store(StorePoint::RemoveBackLink);
        }
        // Last: hands the entry to whichever CPU loads it next; pairs with
        // the Acquire claim in its `add` (Linux: smp_wmb() before
        // `loaded_vmcs->cpu = -1`).
        entry.cpu.store(NONE, Ordering::Release);
        hook.after_store(StorePoint::RemoveReleaseCpu);
        Ok(())
    }

    /// Makes the VMCS current on `cpu`: adds it to the list if needed, then
    /// VMPTRLDs it. Run on `cpu`, interrupts disabled. The VMCS must not be
    /// loaded on another CPU ([`ListError::LoadedElsewhere`]): evict it first
    /// with [`evict_from_other_cpu`](Self::evict_from_other_cpu).
    ///
    /// The add comes before the VMPTRLD so that a VMCS is never active
    /// without being reachable by the crash walk. If the VMPTRLD fails the
    /// entry is unlinked again (a failed VMPTRLD leaves nothing active).
    pub fn load_here<V: Vmx + ?Sized, H: StoreHook + ?Sized>(
        &self,
        cpu: usize,
        id: VmcsId,
        vmx: &mut V,
        hook: &mut H,
    ) -> Result<Loaded, ListError> {
        let current = self.cpu_slot(&self.current, cpu)?;
        let entry = self.allocated(id)?;
        let owner = entry.cpu.load(Ordering::Acquire);
        let newly_on_this_cpu = if owner == NONE {
            self.add(cpu, id, hook)?;
            true
        } else if owner as usize == cpu {
            false
        } else {
            return Err(ListError::LoadedElsewhere {
                cpu: owner as usize,
            });
        };
        if !newly_on_this_cpu && current.load(Ordering::Relaxed) == id.0 {
            return Ok(Loaded {
                evicted_from: None,
                newly_on_this_cpu,
                vmptrld: false,
            });
        }
        if let Err(error) = vmx.vmptrld(entry.vmcs_phys.load(Ordering::Relaxed)) {
            if newly_on_this_cpu {
                // Cannot fail: the entry was just added on this CPU.
                self.remove(cpu, id, hook)?;
            }
            return Err(ListError::Vmx(error));
        }
        hook.after_store(StorePoint::LoadVmptrld);
        current.store(id.0, Ordering::Relaxed);
        hook.after_store(StorePoint::LoadSetCurrent);
        Ok(Loaded {
            evicted_from: None,
            newly_on_this_cpu,
            vmptrld: true,
        })
    }

    /// If the VMCS is loaded on a CPU other than `cpu`, has that CPU VMCLEAR
    /// and unlink it by calling `clear_remote(owner, id)`, which must return
    /// only once the owner has run [`unload`](Self::unload) for it (the
    /// kernel: a call-function IPI, waited for). Returns the old owner.
    ///
    /// Run on `cpu` (pinned) with interrupts *enabled*, before
    /// [`load_here`](Self::load_here): waiting for another CPU with
    /// interrupts off deadlocks when that CPU is waiting for this one.
    pub fn evict_from_other_cpu(
        &self,
        cpu: usize,
        id: VmcsId,
        clear_remote: impl FnOnce(usize, VmcsId) -> Result<(), ListError>,
    ) -> Result<Option<usize>, ListError> {
        self.cpu_slot(&self.heads, cpu)?;
        let entry = self.allocated(id)?;
        let owner = match cpu_of(entry.cpu.load(Ordering::Acquire)) {
            Some(owner) if owner != cpu => owner,
            _ => return Ok(None),
        };
        clear_remote(owner, id)?;
        match cpu_of(entry.cpu.load(Ordering::Acquire)) {
            None => Ok(Some(owner)),
            Some(still) => Err(ListError::LoadedElsewhere { cpu: still }),
        }
    }

    /// [`evict_from_other_cpu`](Self::evict_from_other_cpu) then
    /// [`load_here`](Self::load_here), for callers whose `clear_remote` may
    /// wait with interrupts disabled (it services incoming requests while it
    /// waits). Otherwise call the two halves, enabling interrupts between.
    pub fn load_on<V: Vmx + ?Sized, H: StoreHook + ?Sized>(
        &self,
        cpu: usize,
        id: VmcsId,
        vmx: &mut V,
        hook: &mut H,
        clear_remote: impl FnOnce(usize, VmcsId) -> Result<(), ListError>,
    ) -> Result<Loaded, ListError> {
        let evicted_from = self.evict_from_other_cpu(cpu, id, clear_remote)?;
        let loaded = self.load_here(cpu, id, vmx, hook)?;
        Ok(Loaded {
            evicted_from,
            ..loaded
        })
    }

    /// VMCLEARs the VMCS, *then* unlinks it from `cpu`'s list. Run on `cpu`,
    /// interrupts disabled (directly, or as the handler of another CPU's
    /// eviction IPI). An entry that is not on this CPU's list is left alone
    /// ([`Unloaded::NotLoadedHere`]).
    ///
    /// The order is the point of Linux 31603d4fc2bb: unlinking first would
    /// let a crash NMI between the two find the VMCS on no list while it is
    /// still cached. If the VMCLEAR fails, the entry stays linked.
    pub fn unload<V: Vmx + ?Sized, H: StoreHook + ?Sized>(
        &self,
        cpu: usize,
        id: VmcsId,
        vmx: &mut V,
        hook: &mut H,
    ) -> Result<Unloaded, ListError> {
        let current = self.cpu_slot(&self.current, cpu)?;
        let entry = self.allocated(id)?;
        if entry.cpu.load(Ordering::Acquire) as usize != cpu {
            return Ok(Unloaded::NotLoadedHere);
        }
        vmx.vmclear(entry.vmcs_phys.load(Ordering::Relaxed))?;
        hook.after_store(StorePoint::UnloadVmclear);
        // VMCLEAR of the current VMCS invalidates the current-VMCS pointer.
        if current.load(Ordering::Relaxed) == id.0 {
            current.store(NONE, Ordering::Relaxed);
            hook.after_store(StorePoint::UnloadResetCurrent);
        }
        entry.launched.store(false, Ordering::Relaxed);
        hook.after_store(StorePoint::UnloadResetLaunched);
        self.remove(cpu, id, hook)?;
        Ok(Unloaded::Cleared)
    }

    /// The crash walk: VMCLEARs every entry on `cpu`'s list. Run on `cpu`,
    /// from the crash NMI handler (or the crash path), possibly in the middle
    /// of any list update of that CPU. Forward only, never reads `prev`,
    /// writes nothing, goes on past a failed VMCLEAR, and stops after
    /// `ENTRIES` entries or at an index outside the arena.
    pub fn crash_vmclear_all<V: Vmx + ?Sized>(&self, cpu: usize, vmx: &mut V) -> VmclearAll {
        let mut cleared = 0;
        let mut failed = 0;
        let walk = self.walk_on(cpu, |_, phys| match vmx.vmclear(phys) {
            Ok(()) => cleared += 1,
            Err(_) => failed += 1,
        });
        VmclearAll {
            visited: walk.visited,
            cleared,
            failed,
            end: walk.end,
        }
    }

    /// Calls `visit(id, vmcs_phys)` for each entry on `cpu`'s list, front to
    /// back, with the same guarantees as
    /// [`crash_vmclear_all`](Self::crash_vmclear_all) (which it implements).
    /// Also how the crash path counts VMCSes it cannot clear.
    pub fn walk_on(&self, cpu: usize, mut visit: impl FnMut(VmcsId, u64)) -> Walk {
        let Some(head) = self.heads.get(cpu) else {
            return Walk {
                visited: 0,
                end: WalkEnd::NoSuchCpu,
            };
        };
        let mut index = head.load(Ordering::Acquire);
        let mut visited = 0u32;
        while index != NONE {
            let Some(entry) = self.entries.get(index as usize) else {
                return Walk {
                    visited,
                    end: WalkEnd::BadIndex { index },
                };
            };
            if visited as usize == ENTRIES {
                return Walk {
                    visited,
                    end: WalkEnd::StepLimit,
                };
            }
            visited += 1;
            visit(VmcsId(index), entry.vmcs_phys.load(Ordering::Relaxed));
            index = entry.next.load(Ordering::Acquire);
        }
        Walk {
            visited,
            end: WalkEnd::Complete,
        }
    }

    fn cpu_slot<'a>(
        &self,
        slots: &'a [AtomicU32; CPUS],
        cpu: usize,
    ) -> Result<&'a AtomicU32, ListError> {
        slots.get(cpu).ok_or(ListError::NoSuchCpu { cpu })
    }

    fn allocated(&self, id: VmcsId) -> Result<&Entry, ListError> {
        self.entries
            .get(id.index())
            .filter(|entry| entry.state.load(Ordering::Acquire) == ALLOCATED)
            .ok_or(ListError::NoSuchEntry { id })
    }

    /// The entry a link points at: `None` for NONE, an error for a link out
    /// of the arena.
    fn link(&self, index: u32) -> Result<Option<&Entry>, ListError> {
        if index == NONE {
            return Ok(None);
        }
        self.entries
            .get(index as usize)
            .map(Some)
            .ok_or(ListError::CorruptLink { index })
    }
}

#[cfg(test)]
mod tests;
