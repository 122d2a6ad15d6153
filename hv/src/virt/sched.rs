//! The run queue: vCPUs moving between cores every slice.
//!
//! Every core with the backend enabled has its own run queue
//! (`hv_core::runqueue`): it takes the vCPU at the head, runs it for a
//! time slice (ended by the backend's timer or by the guest's own exits),
//! and puts it back at the tail, still loaded on that core. vCPUs move by
//! being given away: every few slices a core that has other vCPUs waiting
//! clears the context of the one it just ran, unlinks it from its list,
//! and pushes it to the next core's inbox (or to an idle core's, when one
//! is idle); that core loads it. So every core's set of loaded contexts
//! changes all the time, which is the state the crash path cleans.
//!
//! A vCPU loaded on a core is queued only on that core, so no core ever
//! waits for another to clear a context, and no lock is shared by all
//! cores. (The first design, one global queue whose taker had the old
//! core clear the vCPU by a call-function IPI and waited for it, did not
//! finish its run at 256 cores under QEMU TCG on 2 host cores: each
//! migration waited for another vCPU thread to be scheduled, and most
//! cores were waiting for one another.)
//!
//! Two kinds of guests run here: the in-tree test guest (when no guest
//! module is given), whose vCPUs run until the run's deadline, and
//! platform guests (`virt::guest`), real kernels that run until they stop.
//! A platform vCPU that halts or waits for a SIPI is *parked*: out of the
//! queue until a platform event *kicks* it back. Both transitions happen
//! under the guest's platform lock, so a wake-up is never lost:
//!
//! - park: the running core decides (`halt`, `runnable`) and marks the
//!   vCPU [`PARKED`] while it holds the lock;
//! - kick ([`kick`]), by whoever holds the lock when an event arrives: a
//!   parked vCPU is queued on the core its context is loaded on (or an
//!   idle core, or the kicker's, when it is loaded nowhere) and that core
//!   woken if idle; a running one on another core gets a host IPI
//!   ([`KICK_VECTOR`]) that makes it exit and look again.
//!
//! Idle cores halt with their APIC timer armed at the earliest timer of a
//! parked vCPU or a platform ([`service_timers`]).
//!
//! Everything here is generic over any [`Backend`]: the in-tree guest runs
//! on every backend. A platform vCPU carries its backend's
//! [`PlatformOps`] (made only by a backend that implements
//! `PlatformBackend`), through which it is initialised and run.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crash::loaded_vmcs::{ListError, StorePoint, VmcsId};

use hv_core::exits::{self, Action, GuestRegisters, Stop};
use hv_core::runqueue::{self, Inbox, Links, LocalQueue, Placement, SliceFacts};
use hv_devices::cpu_state::SipiStartState;
use hv_devices::cpuid::HostCpuid;
use hv_devices::platform::{Event, VcpuSet};
use raw_cpuid::native_cpuid::cpuid_count;
use smp_boot::madt::MAX_CPUS;

use super::guest::exits::{ExitContext, Outcome};
use super::guest::glue::NativeCpuid;
use super::guest::{self, KernelStop};
use super::vcpu::sched_state::{DONE, PARKED, QUEUED, RUNNING as ON_CORE};
use super::vcpu::{self, Knobs, MAX_VCPUS, NO_CPU, PlatformVcpu, Vcpu, VcpuLocal};
use super::{Backend, Injection, PlatformBackend, PlatformOps, test_guest};
use crate::arch::cpu;
use crate::arch::{apic, apic_timer, xsave};
use crate::cpu::{ipi, percpu, smp, time, watchdog};
use crate::crash::records::{self, LISTS};
use crate::crash::{self as crash_path, inject};
use crate::mm;

/// The vector of the host IPI that kicks a core: out of guest mode (an
/// external-interrupt exit) or out of its idle halt. Its handler only
/// acknowledges it.
pub const KICK_VECTOR: u8 = 0xF1;

/// Settings from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// vCPUs to create (0: two per core with the backend enabled).
    pub vcpus: usize,
    /// How long guests run at boot.
    pub run_ms: u64,
    /// Time slice before a vCPU goes back to the queue.
    pub slice_us: u64,
    /// Test knobs of the in-tree guest.
    pub knobs: Knobs,
    /// Whether the crash hypercall is honoured.
    pub crash_hypercall_allowed: bool,
    /// Whether the guests keep running on the other cores once the boot
    /// CPU leaves the boot run (an injected crash is to come, see
    /// [`run_until_crash`]). Only for the in-tree guest: platform guests
    /// run until they stop, and a crash during them fires in the run.
    pub keep_running: bool,
}

static VCPUS: spin::Once<&'static [Vcpu]> = spin::Once::new();
/// The links of every run queue (one per vCPU).
static LINKS: Links<MAX_VCPUS> = Links::new();
/// Each core's inbox: vCPUs other cores (or kicks) gave it.
static INBOX: [Inbox; MAX_CPUS] = [const { Inbox::new() }; MAX_CPUS];
/// Each core's own queue, touched by that core alone.
static LOCAL: [LocalQueue; MAX_CPUS] = [const { LocalQueue::new() }; MAX_CPUS];
/// Slices each core has ended (for the rotation).
static SLICES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static RUNNING: AtomicBool = AtomicBool::new(false);
/// The in-tree guest runs until then; platform guests until they stop.
static DEADLINE_US: AtomicU64 = AtomicU64::new(0);
static PLATFORM_GUESTS: AtomicBool = AtomicBool::new(false);
/// Platform vCPUs not yet retired.
static LIVE_VCPUS: AtomicUsize = AtomicUsize::new(0);
static SLICE_US: AtomicU64 = AtomicU64::new(2000);
static CORES_DONE: AtomicUsize = AtomicUsize::new(0);
static STOPPED: AtomicUsize = AtomicUsize::new(0);
static CRASH_HYPERCALL: AtomicBool = AtomicBool::new(false);
/// Each core keeps its own vCPUs: no migration (the run until a crash,
/// [`run_until_crash`]).
static AFFINITY: AtomicBool = AtomicBool::new(false);
/// Cores halted in [`idle_wait`], waiting for a kick.
static IDLE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// The TSC by which [`service_timers`] must run next.
static TIMER_DUE: AtomicU64 = AtomicU64::new(u64::MAX);
/// vCPU runs on a core other than the one that last ran it.
pub static MIGRATIONS: AtomicU64 = AtomicU64::new(0);
/// Slices the backend's timer ended (VMX-preemption timer, SVM's APIC
/// timer).
static PREEMPTIONS: AtomicU64 = AtomicU64::new(0);
/// Kick IPIs sent.
pub static KICKS: AtomicU64 = AtomicU64::new(0);

/// The longest an idle core sleeps without looking again.
const IDLE_MAX_US: u64 = 10_000;

/// Every how many of its slices a core gives a vCPU to the next core.
const ROTATE_EVERY: u64 = 2;

/// The hook the list protocol calls between its stores: keeps the
/// context's record in step, and is where test crashes are injected.
fn store_hook(id: VmcsId) -> impl FnMut(StorePoint) {
    move |point| {
        records::track(id, point);
        inject::at_store(point);
    }
}

/// The vCPUs.
pub fn vcpus() -> &'static [Vcpu] {
    VCPUS.get().copied().unwrap_or(&[])
}

/// Creates the vCPUs (made by `make(index)`, the first `count`) and deals
/// them over the cores with the backend enabled; returns how many exist.
fn create(count: usize, make: impl FnMut(usize) -> Vcpu) -> usize {
    let count = count.min(MAX_VCPUS);
    let Some(storage) = mm::alloc_permanent_slice_with(count, make) else {
        log::error!("out of memory for {count} vCPUs");
        return 0;
    };
    let created = storage.iter().take_while(|vcpu| vcpu.exists()).count();
    let vcpus = &storage[..created];
    VCPUS.call_once(|| vcpus);
    let cores = smp::cpus().len();
    let me = percpu::current_cpu_index() as usize;
    for index in 0..created {
        let home = runqueue::home_core(index, cores, runs_guests).unwrap_or(me);
        queue_on(home, index);
    }
    created
}

/// Whether core `cpu` runs guests (the backend is enabled on it).
fn runs_guests(cpu: usize) -> bool {
    super::cpu(cpu).enabled.load(Ordering::Acquire)
}

/// Queues vCPU `index` on core `cpu` (its context loaded there or
/// nowhere), waking that core if it is idle.
fn queue_on(cpu: usize, index: usize) {
    if !INBOX[cpu].push(&LINKS, index) {
        log::error!("vCPU {index} cannot be queued");
        return;
    }
    if cpu != percpu::current_cpu_index() as usize && IDLE[cpu].swap(false, Ordering::SeqCst) {
        send_kick(cpu);
    }
}

/// The core vCPU `index` must be queued on: the one its context is loaded
/// on, else `otherwise`.
fn home_of(index: usize, otherwise: usize) -> usize {
    match vcpus()[index].shared.loaded_on.load(Ordering::Acquire) {
        NO_CPU => otherwise,
        cpu => cpu as usize,
    }
}

/// Claims an idle core other than this one (it is no longer idle then).
fn claim_idle_core() -> Option<usize> {
    let me = percpu::current_cpu_index() as usize;
    let online = smp::cpus().len();
    (0..online).find(|&cpu| cpu != me && IDLE[cpu].swap(false, Ordering::AcqRel))
}

/// Whether some core other than this one is idle.
fn some_core_idle() -> bool {
    let me = percpu::current_cpu_index() as usize;
    let online = smp::cpus().len();
    IDLE.iter()
        .take(online)
        .enumerate()
        .any(|(cpu, idle)| cpu != me && idle.load(Ordering::Relaxed))
}

/// Where vCPU `index` goes after a slice that ended with it runnable:
/// back on this core's queue, or cleared here and given to another core.
fn place_after_slice<B: Backend>(me: usize, index: usize) {
    let migrate = !AFFINITY.load(Ordering::Relaxed);
    let placement = runqueue::after_slice(SliceFacts {
        migrate,
        slices_here: SLICES[me].fetch_add(1, Ordering::Relaxed) + 1,
        queued_here: LOCAL[me].len() + usize::from(!INBOX[me].is_empty()),
        idle_core: migrate && some_core_idle(),
        rotate_every: ROTATE_EVERY,
    });
    let next_core = || runqueue::next_core(me, smp::cpus().len(), runs_guests);
    let target = match placement {
        Placement::Keep => None,
        // The idle core seen may have been woken meanwhile: then the
        // ring's next core.
        Placement::ToIdleCore => claim_idle_core().or_else(next_core),
        Placement::ToNextCore => next_core(),
    };
    match target {
        Some(cpu) if home_of(index, me) == me => {
            clear_here::<B>(index);
            queue_on(cpu, index);
        }
        _ => {
            LOCAL[me].push_back(&LINKS, index);
        }
    }
}

/// Clears vCPU `index`'s context and unlinks it, on the calling CPU, which
/// holds it: before it gives the vCPU to another core, or (the fallback
/// of [`load_here`]) as a call-function IPI from the CPU that wants it.
fn clear_here<B: Backend>(index: usize) {
    let vcpu = &vcpus()[index];
    let Some(id) = vcpu.shared.list_id else {
        return;
    };
    let cpu = percpu::current_cpu_index() as usize;
    let mut instructions = B::Instructions::default();
    if let Err(error) = LISTS.unload(cpu, id, &mut instructions, &mut store_hook(id)) {
        log::error!("{}: unloading vCPU {index} on CPU {cpu}: {error}", B::NAME);
    }
    vcpu.shared.loaded_on.store(NO_CPU, Ordering::Release);
}

/// Makes vCPU `index` current on this CPU, taking it from another CPU
/// first if needed, and refreshes the host state.
fn load_here<B: Backend>(index: usize, local: &mut VcpuLocal) -> bool {
    let vcpu = &vcpus()[index];
    let Some(id) = vcpu.shared.list_id else {
        return false;
    };
    let me = percpu::current_cpu_index() as usize;
    // The eviction waits for another CPU: interrupts on, or two CPUs
    // evicting from each other would deadlock.
    cpu::enable_interrupts();
    let evicted = LISTS.evict_from_other_cpu(me, id, |owner, _| {
        if ipi::call_on(owner, clear_here::<B>, index) {
            Ok(())
        } else {
            Err(ListError::LoadedElsewhere { cpu: owner })
        }
    });
    cpu::disable_interrupts();
    match evicted {
        Ok(Some(_)) => {
            // The scheduler queues a loaded vCPU only where it is loaded:
            // this is a bug, survived.
            log::warn!("{}: vCPU {index} had to be evicted to CPU {me}", B::NAME);
        }
        Ok(None) => {}
        Err(error) => {
            log::error!("{}: cannot take vCPU {index} to CPU {me}: {error}", B::NAME);
            return false;
        }
    }
    let mut instructions = B::Instructions::default();
    let loaded = match LISTS.load_here(me, id, &mut instructions, &mut store_hook(id)) {
        Ok(loaded) => loaded,
        Err(error) => {
            log::error!("{}: loading vCPU {index} on CPU {me}: {error}", B::NAME);
            return false;
        }
    };
    vcpu.shared.loaded_on.store(me as u32, Ordering::Release);
    if loaded.newly_on_this_cpu {
        local.launched = false;
    }
    if !local.initialized {
        match vcpu.shared.platform {
            None => B::init_guest(
                &vcpu.shared.context,
                test_guest::LOAD_ADDRESS,
                test_guest::STACK_TOP,
            ),
            Some(platform) => (platform.ops.init_vcpu)(&vcpu.shared.context, platform),
        }
        local.initialized = true;
    }
    B::refresh_host_state();
    if let Some(platform) = vcpu.shared.platform {
        guest::note_core(platform.guest, me, loaded_cores(platform.guest));
    }
    true
}

/// On how many different cores the contexts of guest `index` are loaded.
fn loaded_cores(index: usize) -> u32 {
    let info = guest::info(index);
    let mut seen = [NO_CPU; 64];
    let mut count = 0;
    for vcpu in &vcpus()[info.first_vcpu..info.first_vcpu + info.vcpus] {
        let cpu = vcpu.shared.loaded_on.load(Ordering::Acquire);
        if cpu != NO_CPU && !seen[..count].contains(&cpu) && count < seen.len() {
            seen[count] = cpu;
            count += 1;
        }
    }
    count as u32
}

/// Whether the boot-time guest run is on.
pub fn running() -> bool {
    RUNNING.load(Ordering::Acquire)
}

/// What became of a vCPU after its slice.
pub enum SliceEnd {
    /// Back to the queue.
    Requeue,
    /// Parked (its state says so already): nothing to do.
    Parked,
    /// Retired or stopped: never again.
    Done,
    /// Another core still holds it: try again later.
    Busy,
}

/// The vCPU this core runs next: the head of its queue, after what its
/// inbox brought.
fn next_vcpu(cpu: usize) -> Option<usize> {
    LOCAL[cpu].take_inbox(&LINKS, &INBOX[cpu]);
    LOCAL[cpu].pop_front(&LINKS)
}

/// Runs guests on this core until the run ends (the in-tree guest's
/// deadline, or the last platform vCPU retired), then checks out.
pub fn run_loop<B: Backend>() {
    run_loop_until::<B>(|| DEADLINE_US.load(Ordering::Relaxed));
    CORES_DONE.fetch_add(1, Ordering::AcqRel);
}

/// Runs guests on this core while the run is on, until `deadline()`.
fn run_loop_until<B: Backend>(deadline: impl Fn() -> u64) {
    let me = percpu::current_cpu_index() as usize;
    if !super::cpu(me).enabled.load(Ordering::Acquire) {
        return;
    }
    let platform = PLATFORM_GUESTS.load(Ordering::Acquire);
    while running() && time::now_us() < deadline() {
        if platform {
            service_timers();
        }
        let next = next_vcpu(me);
        let Some(index) = next else {
            inject::check_time();
            // Halted, not spinning: under an emulator whose CPUs share a
            // few host cores, a spinning idle core takes host time from
            // the ones running guests.
            idle_wait();
            cpu::interrupt_window();
            continue;
        };
        let shared = &vcpus()[index].shared;
        let previous = shared.on_cpu.swap(me as u32, Ordering::Relaxed);
        if previous != NO_CPU && previous != me as u32 {
            MIGRATIONS.fetch_add(1, Ordering::Relaxed);
        }
        shared.sched.store(ON_CORE, Ordering::Release);
        match run_slice::<B>(index) {
            SliceEnd::Requeue => {
                shared.sched.store(QUEUED, Ordering::Release);
                place_after_slice::<B>(me, index);
            }
            SliceEnd::Busy => {
                shared.sched.store(QUEUED, Ordering::Release);
                queue_on(home_of(index, me), index);
            }
            SliceEnd::Parked | SliceEnd::Done => {}
        }
        cpu::interrupt_window();
    }
}

/// The idle work of every CPU: join the guest run once, when it is on.
pub fn join_run<B: Backend>(cpu: usize) {
    if running() && !super::cpu(cpu).joined.swap(true, Ordering::AcqRel) {
        // Guests run with interrupts off between explicit windows.
        crate::arch::cpu::disable_interrupts();
        run_loop::<B>();
    }
}

/// The kick IPI's handler: the interrupt itself was the point.
pub fn on_kick(_: &mut crate::arch::idt::TrapFrame) {
    apic::end_of_interrupt();
}

fn send_kick(cpu: usize) {
    if let Some(target) = smp::cpus().get(cpu) {
        KICKS.fetch_add(1, Ordering::Relaxed);
        apic::send_fixed(target.slot.apic_id(), KICK_VECTOR);
    }
}

/// An idle core: halt until a kick, the next timer of a parked vCPU or a
/// platform, or [`IDLE_MAX_US`] (crash injection and time limits are
/// looked at then). Without a TSC-deadline timer, a core of the in-tree
/// guest's run halts until the lockup detector's next tick or a kick; a
/// core of platform guests, whose timers need better, looks again soon.
fn idle_wait() {
    let me = percpu::current_cpu_index() as usize;
    IDLE[me].store(true, Ordering::SeqCst);
    if !INBOX[me].is_empty() || !LOCAL[me].is_empty() || !running() {
        IDLE[me].store(false, Ordering::SeqCst);
        return;
    }
    let now = cpu::rdtsc();
    let platform = PLATFORM_GUESTS.load(Ordering::Acquire);
    let timers = if platform {
        TIMER_DUE.load(Ordering::Acquire)
    } else {
        u64::MAX
    };
    let wake = timers.min(now.saturating_add(time::us_to_tsc(IDLE_MAX_US)));
    if apic_timer::has_tsc_deadline() {
        // With the lockup detector on, the APIC timer is its periodic
        // tick. While this core halts the timer is its alarm clock
        // instead, ringing on the tick's vector (a wake is a tick: a
        // heartbeat and a look at the other CPUs); the periodic tick is
        // back before the core runs guests again.
        let ticking = watchdog::threshold_us() > 0;
        let vector = if ticking {
            watchdog::TICK_VECTOR
        } else {
            KICK_VECTOR
        };
        apic_timer::arm(vector, wake);
        cpu::wait_for_interrupt();
        cpu::disable_interrupts();
        if ticking {
            watchdog::tick_here(0);
        }
    } else if !platform && watchdog::threshold_us() > 0 {
        cpu::wait_for_interrupt();
        cpu::disable_interrupts();
    } else {
        // No alarm clock: look again soon.
        while cpu::rdtsc() < wake.min(now + time::us_to_tsc(100))
            && IDLE[me].load(Ordering::Acquire)
        {
            core::hint::spin_loop();
        }
    }
    IDLE[me].store(false, Ordering::SeqCst);
}

/// Records that [`service_timers`] must run by TSC `at`.
fn note_timer(at: u64) {
    TIMER_DUE.fetch_min(at, Ordering::AcqRel);
}

/// Brings every platform's timers up to date when one is due: kicks the
/// vCPUs whose timers fired, stops guests past their time limit, and notes
/// when to look again.
fn service_timers() {
    let now = cpu::rdtsc();
    if now < TIMER_DUE.load(Ordering::Acquire) {
        return;
    }
    TIMER_DUE.store(u64::MAX, Ordering::Release);
    for index in 0..guest::infos().len() {
        if guest::is_stopped(index) {
            continue;
        }
        if guest::timed_out(index, now) {
            stop_guest(index, Some(KernelStop::Timeout));
            continue;
        }
        note_timer(guest::timeout_at(index));
        let info = guest::info(index);
        let mut platform = guest::platform(index).lock();
        let Some(platform) = platform.as_mut() else {
            continue;
        };
        let fired = platform.poll();
        kick_set(index, fired);
        for number in 0..info.vcpus {
            let vcpu = &vcpus()[info.first_vcpu + number];
            if vcpu.shared.sched.load(Ordering::Acquire) == PARKED
                && let Some(deadline) = platform.next_deadline(number)
            {
                note_timer(deadline);
            }
        }
        if let Some(deadline) = platform.next_platform_deadline() {
            note_timer(deadline);
        }
    }
}

/// Kicks the vCPUs of guest `guest_index` in `set` (platform lock held).
pub fn kick_set(guest_index: usize, set: VcpuSet) {
    let first = guest::info(guest_index).first_vcpu;
    for number in set.iter() {
        kick(first + number);
    }
}

/// A platform event for vCPU `index`: queue it if parked, interrupt it if
/// it runs on another core. Called with its guest's platform lock held.
pub fn kick(index: usize) {
    let Some(vcpu) = vcpus().get(index) else {
        return;
    };
    let shared = &vcpu.shared;
    match shared.sched.load(Ordering::Acquire) {
        PARKED
            if shared
                .sched
                .compare_exchange(PARKED, QUEUED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok() =>
        {
            let me = percpu::current_cpu_index() as usize;
            let target = match shared.loaded_on.load(Ordering::Acquire) {
                NO_CPU => claim_idle_core().unwrap_or(me),
                cpu => cpu as usize,
            };
            queue_on(target, index);
        }
        ON_CORE => {
            let cpu = shared.on_cpu.load(Ordering::Acquire);
            if cpu != percpu::current_cpu_index() {
                send_kick(cpu as usize);
            }
        }
        _ => {}
    }
}

/// Parks vCPU `index` (its guest's platform lock held): out of the queue
/// until a kick; its timer, if any, is noted.
pub fn park(index: usize, deadline: Option<u64>) {
    vcpus()[index].shared.sched.store(PARKED, Ordering::Release);
    if let Some(deadline) = deadline {
        note_timer(deadline);
    }
}

/// Notes a platform-wide deadline (the PIT's), with the platform lock held.
pub fn note_platform_deadline(deadline: Option<u64>) {
    if let Some(deadline) = deadline {
        note_timer(deadline);
    }
}

/// Retires vCPU `index`: never run again.
fn retire(index: usize) {
    let vcpu = &vcpus()[index];
    vcpu.mark_stopped();
    vcpu.shared.sched.store(DONE, Ordering::Release);
    if let Some(platform) = vcpu.shared.platform {
        guest::shared(platform.guest)
            .live_vcpus
            .fetch_sub(1, Ordering::AcqRel);
    }
    if LIVE_VCPUS.fetch_sub(1, Ordering::AcqRel) == 1 {
        // The last one: the run is over; wake every core to see it.
        RUNNING.store(false, Ordering::Release);
        for cpu in 0..smp::cpus().len() {
            if cpu != percpu::current_cpu_index() as usize {
                send_kick(cpu);
            }
        }
    }
}

/// Stops guest `index` (for `why`, if hv is the one stopping it), reports
/// it, and retires its parked vCPUs; running ones are kicked and retire
/// at their next look. No platform lock may be held.
pub fn stop_guest(index: usize, why: Option<KernelStop>) {
    if let Some(why) = why {
        guest::stop_by_kernel(index, why);
    }
    guest::mark_stopped(index);
    let info = guest::info(index);
    for global in info.first_vcpu..info.first_vcpu + info.vcpus {
        let shared = &vcpus()[global].shared;
        match shared.sched.load(Ordering::Acquire) {
            PARKED
                if shared
                    .sched
                    .compare_exchange(PARKED, DONE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok() =>
            {
                retire(global);
            }
            ON_CORE => {
                let cpu = shared.on_cpu.load(Ordering::Acquire);
                if cpu != percpu::current_cpu_index() {
                    send_kick(cpu as usize);
                }
            }
            _ => {}
        }
    }
}

/// The hypervisor's side of an exit of vCPU `index`.
struct HostServices<'a> {
    index: usize,
    console: &'a mut [u8; 96],
    console_len: &'a mut usize,
}

impl exits::Host for HostServices<'_> {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let result = cpuid_count(leaf, subleaf);
        [result.eax, result.ebx, result.ecx, result.edx]
    }

    fn console(&mut self, byte: u8) {
        let (buffer, len) = (&mut *self.console, &mut *self.console_len);
        if byte != b'\n' && *len < buffer.len() {
            buffer[*len] = byte;
            *len += 1;
        }
        if byte == b'\n' || *len == buffer.len() {
            let line = core::str::from_utf8(&buffer[..*len]).unwrap_or("<not UTF-8>");
            log::info!("[vcpu {}] {line}", self.index);
            *len = 0;
        }
    }

    fn crash_hypercall_allowed(&self) -> bool {
        CRASH_HYPERCALL.load(Ordering::Relaxed)
    }
}

/// The exited vCPU, for `hv_core::exits`.
struct ExitedGuest<'a, B> {
    registers: &'a mut GuestRegisters,
    backend: core::marker::PhantomData<B>,
}

impl<B: Backend> exits::Guest for ExitedGuest<'_, B> {
    fn registers(&mut self) -> &mut GuestRegisters {
        self.registers
    }

    fn skip_instruction(&mut self) {
        B::skip_instruction();
    }
}

/// Runs one slice of vCPU `index`.
fn run_slice<B: Backend>(index: usize) -> SliceEnd {
    let vcpu = &vcpus()[index];
    if let Some(platform) = vcpu.shared.platform
        && guest::is_stopped(platform.guest)
    {
        retire(index);
        return SliceEnd::Done;
    }
    let Some(mut local) = vcpu.local.try_lock() else {
        return SliceEnd::Busy;
    };
    if !load_here::<B>(index, &mut local) {
        return SliceEnd::Requeue;
    }
    match vcpu.shared.platform {
        None => run_test_slice::<B>(index, &mut local),
        Some(platform) => (platform.ops.run_slice)(index, platform, &mut local),
    }
}

/// A slice of the in-tree test guest.
fn run_test_slice<B: Backend>(index: usize, local: &mut VcpuLocal) -> SliceEnd {
    let vcpu = &vcpus()[index];
    let cpu = percpu::current_cpu_index() as usize;
    let slice_us = SLICE_US.load(Ordering::Relaxed);
    let slice_end = time::now_us() + slice_us;
    loop {
        let launched = local.launched;
        let exit = B::enter(&mut local.registers, launched, slice_us);
        if exit == exits::Exit::Preempted {
            PREEMPTIONS.fetch_add(1, Ordering::Relaxed);
        }
        if !matches!(exit, exits::Exit::EntryFailed { .. }) {
            local.launched = true;
            vcpu.shared.exits.fetch_add(1, Ordering::Relaxed);
            super::cpu(cpu).vm_exits.fetch_add(1, Ordering::Relaxed);
        }
        let VcpuLocal {
            registers,
            console,
            console_len,
            ..
        } = &mut *local;
        let action = exits::dispatch(
            exit,
            &mut ExitedGuest::<B> {
                registers,
                backend: core::marker::PhantomData,
            },
            &mut HostServices {
                index,
                console,
                console_len,
            },
        );
        let end_slice = match action {
            Action::Resume => false,
            Action::EndSlice => true,
            // A host NMI arrived in the guest: hand it to the hypervisor's
            // own handler, as if it came now.
            Action::HostNmi => {
                if !B::NMI_DELIVERED_AFTER_EXIT {
                    crash_path::nmi::as_guest_exit(cpu, cpu::run_nmi_handler);
                }
                false
            }
            Action::HostInterrupts => {
                cpu::interrupt_window();
                false
            }
            Action::Stop(why) => {
                stop::<B>(index, why);
                return SliceEnd::Done;
            }
            Action::Crash => {
                let regs = cpu::current_regs();
                crash_path::crash(crash_path::Reason::Hypercall { vcpu: index }, &regs)
            }
        };
        inject::check_time();
        if end_slice || time::now_us() >= slice_end || !running() {
            return SliceEnd::Requeue;
        }
    }
}

/// Every state component hv offers guests and the CPU has: XSAVE and
/// XRSTOR switch all of them whatever the guest's XCR0, since some live
/// outside it (PKRU, which WRPKRU reaches with CR4.PKE alone).
fn switched_components() -> u64 {
    static FULL: spin::Once<u64> = spin::Once::new();
    *FULL.call_once(|| {
        hv_devices::cpuid::CpuidPolicy::new(hv_devices::cpuid::GuestFeatures::new(1))
            .supported_xcr0(&NativeCpuid)
            .max(1)
    })
}

/// Puts a vCPU's extended state (saved by [`save_extended_state`]) on
/// this core, then its XCR0.
fn restore_extended_state(area: u64, xcr0: u64) {
    let has_xsave = xsave::has_xsave();
    xsave::xsetbv_if_supported(switched_components());
    xsave::restore(area, has_xsave);
    xsave::xsetbv_if_supported(xcr0);
}

/// Saves the extended state of the vCPU leaving this core.
fn save_extended_state(area: u64) {
    let has_xsave = xsave::has_xsave();
    xsave::xsetbv_if_supported(switched_components());
    xsave::save(area, has_xsave);
}

/// What the entry decision of a platform vCPU found.
enum Entry {
    /// Enter, with the preemption timer at this TSC.
    Go(u64),
    /// The vCPU waits (parked under the lock).
    Park,
    /// The guest stopped.
    Stopped,
}

/// Decides what vCPU `number` of its guest does before an entry: the
/// platform says whether it can run, whether it starts (SIPI), and which
/// event it takes. Parks it, under the platform lock, when it cannot run.
fn prepare_entry<B: PlatformBackend>(
    index: usize,
    platform: PlatformVcpu,
    local: &mut VcpuLocal,
    slice_end: u64,
) -> Entry {
    let g = platform.guest;
    if guest::is_stopped(g) {
        return Entry::Stopped;
    }
    let now = cpu::rdtsc();
    if guest::timed_out(g, now) {
        stop_guest(g, Some(KernelStop::Timeout));
        return Entry::Stopped;
    }
    let mut lock = guest::platform(g).lock();
    let Some(p) = lock.as_mut() else {
        return Entry::Stopped;
    };
    if p.stop_reason().is_some() {
        drop(lock);
        stop_guest(g, None);
        return Entry::Stopped;
    }
    let n = platform.number;
    if !p.runnable(n) {
        park(index, p.next_deadline(n));
        return Entry::Park;
    }
    if let Some(vector) = p.take_start(n) {
        let signature = NativeCpuid.cpuid(1, 0).eax;
        let start = SipiStartState::new(vector, signature);
        B::load_sipi_start(&start);
        local.registers = GuestRegisters {
            rdx: start.edx,
            ..GuestRegisters::default()
        };
        local.xcr0 = 1;
        local.cr2 = 0;
        local.nmi_may_block = false;
        mm::phys::with_bytes_mut(platform.xsave_area, xsave::AREA_BYTES, xsave::init_area);
        restore_extended_state(platform.xsave_area, 1);
    }
    let decision = p.next_event(n, B::interrupt_state());
    if decision.inject == Some(Event::Nmi) {
        local.nmi_may_block = true;
    }
    if let Some(event) = decision.inject {
        B::inject(match event {
            Event::Nmi => Injection::Nmi,
            Event::Interrupt(vector) => Injection::Interrupt(vector),
        });
    }
    B::set_windows(decision.interrupt_window, decision.nmi_window);
    let deadline = [
        p.next_deadline(n),
        p.next_platform_deadline(),
        Some(slice_end),
        Some(guest::timeout_at(g)),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(slice_end);
    Entry::Go(deadline)
}

/// A slice of a platform vCPU: its extended state and CR2 come onto the
/// core, it runs until the slice ends, it parks or its guest stops, and
/// they go back.
pub(super) fn run_platform_slice<B: PlatformBackend>(
    index: usize,
    platform: PlatformVcpu,
    local: &mut VcpuLocal,
) -> SliceEnd {
    let vcpu = &vcpus()[index];
    let cpu = percpu::current_cpu_index() as usize;
    restore_extended_state(platform.xsave_area, local.xcr0);
    crate::arch::guest_switch::write_cr2(local.cr2);
    let tsc_per_us = time::us_to_tsc(1).max(1);
    let slice_end = cpu::rdtsc() + time::us_to_tsc(SLICE_US.load(Ordering::Relaxed));
    let end = loop {
        let deadline = match prepare_entry::<B>(index, platform, local, slice_end) {
            Entry::Go(deadline) => deadline,
            Entry::Park => break SliceEnd::Parked,
            Entry::Stopped => break SliceEnd::Done,
        };
        let now = cpu::rdtsc();
        let slice_us = deadline.saturating_sub(now) / tsc_per_us;
        let launched = local.launched;
        let exit = B::enter(&mut local.registers, launched, slice_us);
        // The preemption timer also stands for the vCPU's and platform's
        // timers here: count only the exits that ended the slice.
        if exit == exits::Exit::Preempted && cpu::rdtsc() >= slice_end {
            PREEMPTIONS.fetch_add(1, Ordering::Relaxed);
        }
        if !matches!(exit, exits::Exit::EntryFailed { .. }) {
            local.launched = true;
            vcpu.shared.exits.fetch_add(1, Ordering::Relaxed);
            super::cpu(cpu).vm_exits.fetch_add(1, Ordering::Relaxed);
        }
        // NMI blocking is the vCPU's own only if an NMI reached it since
        // it was last seen unblocked; otherwise the CPU carried it over
        // from another VMCS (Bochs 2.7): forget it.
        if B::interrupt_state().blocked_by_nmi {
            if !local.nmi_may_block {
                B::clear_nmi_blocking();
            }
        } else {
            local.nmi_may_block = false;
        }
        let flood = guest::count_exit(platform.guest);
        let outcome = super::guest::exits::handle::<B>(
            exit,
            &mut ExitContext {
                index,
                platform,
                registers: &mut local.registers,
                xcr0: &mut local.xcr0,
            },
        );
        inject::check_time();
        if flood {
            stop_guest(
                platform.guest,
                Some(KernelStop::ExitFlood {
                    exits: guest::shared(platform.guest).exits.load(Ordering::Relaxed),
                }),
            );
            break SliceEnd::Done;
        }
        match outcome {
            Outcome::Resume => {}
            Outcome::HostNmi => {
                if !B::NMI_DELIVERED_AFTER_EXIT {
                    crash_path::nmi::as_guest_exit(cpu, cpu::run_nmi_handler);
                }
            }
            Outcome::HostInterrupts => cpu::interrupt_window(),
            Outcome::Parked => break SliceEnd::Parked,
            Outcome::Stopped => {
                stop_guest(platform.guest, None);
                break SliceEnd::Done;
            }
            Outcome::KernelStop(why) => {
                stop_guest(platform.guest, Some(why));
                break SliceEnd::Done;
            }
        }
        if cpu::rdtsc() >= slice_end || !running() {
            break SliceEnd::Requeue;
        }
    };
    local.cr2 = crate::arch::guest_switch::read_cr2();
    // The guest's XCR0 as the CPU has it: the glue loads it at XSETBV
    // exits, but under QEMU TCG's SVM a guest's XCR0 was seen to change
    // without one, and reverted at its next slice (kvm-unit-tests xsave).
    if let Some(xcr0) = xsave::xcr0() {
        local.xcr0 = xcr0;
    }
    save_extended_state(platform.xsave_area);
    if matches!(end, SliceEnd::Done) {
        retire(index);
    }
    end
}

fn stop<B: Backend>(index: usize, why: Stop) {
    vcpus()[index].mark_stopped();
    STOPPED.fetch_add(1, Ordering::Relaxed);
    let rip = B::guest_rip();
    let cpu = percpu::current_cpu_index();
    log::warn!(
        "{}: vCPU {index} stopped on CPU {cpu} at guest rip {rip:#x}: {why:?}",
        B::NAME
    );
    // `detail`: the exit qualification, the instruction error, or the
    // exit reason, whichever the stop has.
    let (kind, gpa, detail) = why.report();
    let kind = match why {
        Stop::NestedPageFault { .. } => B::NESTED_PAGE_FAULT,
        _ => kind,
    };
    // Keyed by vCPU, so the reports of several stopped guests merge.
    let mut key = [0u8; 8];
    let key = decimal(index, &mut key);
    crate::console::report::line(|o| {
        o.field("guests_stopped").object(|o| {
            o.field(key).object(|o| {
                o.field("cpu").u64(u64::from(cpu))?;
                o.field("reason").str(kind)?;
                o.field("gpa").option(gpa, |value, gpa| value.u64(gpa))?;
                o.field("detail").u64(detail)?;
                o.field("rip").u64(rip)
            })
        })
    });
}

/// `value` in decimal, in `buffer`.
fn decimal(mut value: usize, buffer: &mut [u8; 8]) -> &str {
    let mut start = buffer.len();
    loop {
        start -= 1;
        buffer[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 || start == 0 {
            break;
        }
    }
    core::str::from_utf8(&buffer[start..]).unwrap_or("?")
}

/// How long the boot run may go on past `guest_run_ms` for a core that
/// has not taken a VM exit yet.
const RUN_UNTIL_EVERY_CORE_EXITED_US: u64 = 5_000_000;

/// How long the end of the boot run waits for every core to leave it.
const WIND_DOWN_US: u64 = 5_000_000;

/// Whether every core with the backend enabled has taken a VM exit.
fn every_core_exited() -> bool {
    (0..crate::cpu::smp::cpus().len()).all(|index| {
        let cpu = super::cpu(index);
        !cpu.enabled.load(Ordering::Acquire) || cpu.vm_exits.load(Ordering::Relaxed) > 0
    })
}

/// What the boot-time guest run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunSummary {
    /// vCPUs created.
    pub vcpus: usize,
    /// vCPUs stopped for good.
    pub stopped: usize,
    /// VM exits in all.
    pub exits: u64,
    /// Loads on a different core.
    pub migrations: u64,
    /// Slices the backend's timer ended.
    pub preemptions: u64,
    /// Platform guests created (0: the in-tree guest ran).
    pub platform_guests: usize,
}

/// The guests the run has: the in-tree guest, or platform guests.
#[derive(Debug, Clone, Copy)]
pub enum Guests {
    /// The in-tree test guest, for `run_ms`.
    TestGuest,
    /// Platform guests (already created by their backend's
    /// [`PlatformOps::create_guests`]), with their vCPU count, until every
    /// one stopped.
    Platform {
        /// Their vCPUs in all.
        vcpus: usize,
        /// The backend's platform entry points.
        ops: PlatformOps,
    },
}

/// Reports each platform guest's contexts (VMCS addresses, vCPU order),
/// which the crash dump's VMCLEAR ledger names.
fn report_vmcses(created: usize) {
    for (g, info) in guest::infos().iter().enumerate() {
        let end = (info.first_vcpu + info.vcpus).min(created);
        let pages = vcpus()[info.first_vcpu.min(end)..end]
            .iter()
            .map(|vcpu| vcpu.shared.context.page);
        let mut key = [0u8; 8];
        let key = decimal(g, &mut key);
        crate::console::report::line(|o| {
            o.field("guests")
                .object(|o| o.field(key).object(|o| o.field("vmcs").u64_array(pages)))
        });
    }
}

/// Runs every vCPU across every core with the backend: the in-tree guest
/// for `settings.run_ms`, platform guests until they all stopped.
pub fn run_at_boot<B: Backend>(settings: &Settings, guests: Guests) -> RunSummary {
    let cores = super::enabled_cpus();
    let (created, platform_guests) = match guests {
        Guests::TestGuest => {
            let wanted = if settings.vcpus == 0 {
                2 * cores
            } else {
                settings.vcpus
            };
            let knobs = settings.knobs;
            let created = create(wanted, |index| vcpu::make::<B>(index, knobs));
            log::info!(
                "{}: {created} vCPUs on {cores} cores for {} ms, slice {} us",
                B::NAME,
                settings.run_ms,
                settings.slice_us
            );
            (created, 0)
        }
        Guests::Platform { vcpus, ops } => {
            let created = create(vcpus, |index| {
                // The guests' vCPUs are numbered in guest order.
                let infos = guest::infos();
                let g = infos
                    .iter()
                    .rposition(|info| info.first_vcpu <= index)
                    .unwrap_or(0);
                (ops.make_vcpu)(g, index - infos[g].first_vcpu)
            });
            if created < vcpus {
                log::error!("{}: only {created} of {vcpus} guest vCPUs exist", B::NAME);
            }
            log::info!(
                "{}: {} guests, {created} vCPUs on {cores} cores, slice {} us",
                B::NAME,
                guest::infos().len(),
                settings.slice_us
            );
            report_vmcses(created);
            LIVE_VCPUS.store(created, Ordering::Release);
            PLATFORM_GUESTS.store(true, Ordering::Release);
            (created, guest::infos().len())
        }
    };
    SLICE_US.store(settings.slice_us.max(1), Ordering::Relaxed);
    CRASH_HYPERCALL.store(settings.crash_hypercall_allowed, Ordering::Relaxed);
    // No deadline until every core is awake: waking them one by one takes
    // a while under an emulator. The crash knob's clock starts then too.
    DEADLINE_US.store(u64::MAX, Ordering::Relaxed);
    guest::start_all();
    note_timer(0);
    RUNNING.store(created > 0, Ordering::Release);
    // Wake the idle APs; each joins from its idle loop. A kick, not a
    // call waited for: each wait would be for another vCPU thread to be
    // scheduled, one after the other, under an emulator.
    let me = percpu::current_cpu_index() as usize;
    let online = smp::cpus()
        .iter()
        .filter(|cpu| cpu.slot.state() == smp_boot::bringup::CpuState::Online)
        .count();
    for (cpu, slot) in smp::cpus().iter().enumerate() {
        if cpu != me && slot.slot.state() == smp_boot::bringup::CpuState::Online {
            send_kick(cpu);
        }
    }
    inject::start_clock();
    // Platform guests run until the last one stopped (its last vCPU's
    // retirement ends the run); the in-tree guest for `run_ms`.
    let end = if platform_guests > 0 {
        u64::MAX
    } else {
        time::now_us() + settings.run_ms * 1000
    };
    // The run also goes on (bounded) until every core has run a guest: an
    // emulator that shares a few host cores among many CPUs can starve one
    // of them for the whole run.
    let latest = end.saturating_add(RUN_UNTIL_EVERY_CORE_EXITED_US);
    // This CPU joins with interrupts off, like the others; it ends the run.
    cpu::disable_interrupts();
    super::cpu(me).joined.store(true, Ordering::Release);
    run_loop_until::<B>(|| if every_core_exited() { end } else { latest });
    // A core still in its last slice may take a vCPU loaded here and ask
    // this CPU to clear it (call-function IPI): serve it from now on, or
    // that core waits out the whole wind-down below.
    cpu::enable_interrupts();
    if !settings.keep_running || platform_guests > 0 {
        DEADLINE_US.store(0, Ordering::Relaxed);
        CORES_DONE.fetch_add(1, Ordering::AcqRel);
        // Bounded: a core stuck for good must not hang the boot (under an
        // emulator whose CPUs share a few host cores, the last slices can
        // take a second or more to wind down).
        let online = online.max(1);
        let deadline = time::now_us() + WIND_DOWN_US + settings.slice_us;
        while CORES_DONE.load(Ordering::Acquire) < online && time::now_us() < deadline {
            core::hint::spin_loop();
        }
        let done = CORES_DONE.load(Ordering::Acquire);
        if done < online {
            log::warn!(
                "{}: {} of {online} cores still in the guest run after {} ms",
                B::NAME,
                online - done,
                WIND_DOWN_US / 1000
            );
        }
        RUNNING.store(false, Ordering::Release);
    }
    RunSummary {
        vcpus: created,
        stopped: STOPPED.load(Ordering::Relaxed),
        exits: vcpus()
            .iter()
            .map(|vcpu| vcpu.shared.exits.load(Ordering::Relaxed))
            .sum(),
        migrations: MIGRATIONS.load(Ordering::Relaxed),
        preemptions: PREEMPTIONS.load(Ordering::Relaxed),
        platform_guests,
    }
}

/// After the boot report of a run with [`Settings::keep_running`] (the
/// other cores never stopped): this CPU runs guests again, until the
/// injected crash comes (it fires on its CPU from the guest loop) or
/// `limit_us` passes; then the run ends on every core. So the crash's
/// NMIs find CPUs in guest mode, as a crash in production would.
///
/// The slices become `slice_us` long, and with `affinity` each core takes
/// a vCPU already loaded on it first: a migration makes a core wait for
/// another to clear the vCPU, which under an emulator whose CPUs share a
/// few host cores takes milliseconds, and with the boot run's short slices
/// and strict FIFO most CPUs would be waiting for one another, not running
/// a guest, when the NMI comes. (A crash at a point of the list protocol
/// needs the migrations instead: no affinity, short slices.)
pub fn run_until_crash<B: Backend>(limit_us: u64, slice_us: u64, affinity: bool) {
    if vcpus().is_empty() || !running() {
        return;
    }
    SLICE_US.store(slice_us.max(1), Ordering::Relaxed);
    AFFINITY.store(affinity, Ordering::Relaxed);
    let end = time::now_us().saturating_add(limit_us);
    cpu::disable_interrupts();
    run_loop_until::<B>(|| end);
    DEADLINE_US.store(0, Ordering::Relaxed);
    RUNNING.store(false, Ordering::Release);
    cpu::enable_interrupts();
}
