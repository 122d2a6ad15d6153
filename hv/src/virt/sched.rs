//! The run queue: vCPUs moving between cores every slice.
//!
//! All vCPUs sit in one FIFO run queue. Every core with the backend
//! enabled takes the vCPU at the head, runs it for a time slice (ended by
//! the backend's timer or by the guest's own exits), and puts it back at
//! the tail, still loaded on that core. With more vCPUs than cores they
//! keep moving: a core that takes a vCPU last loaded elsewhere first has
//! the old core clear it (call-function IPI), then loads it. So every
//! core's set of loaded contexts changes all the time, which is the state
//! the crash path cleans.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crash::loaded_vmcs::{ListError, StorePoint, VmcsId};

use hv_core::exits::{self, Action, GuestRegisters, Stop};
use raw_cpuid::native_cpuid::cpuid_count;
use spin::Mutex;

use super::vcpu::{self, Knobs, MAX_VCPUS, Vcpu, VcpuLocal};
use super::{Backend, test_guest};
use crate::arch::cpu;
use crate::cpu::{ipi, percpu, time};
use crate::crash::records::{self, LISTS};
use crate::crash::{self as crash_path, inject};
use crate::mm;

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
    /// [`run_until_crash`]).
    pub keep_running: bool,
}

static VCPUS: spin::Once<&'static [Vcpu]> = spin::Once::new();
static RUN_QUEUE: Mutex<RunQueue> = Mutex::new(RunQueue::new());
static RUNNING: AtomicBool = AtomicBool::new(false);
static DEADLINE_US: AtomicU64 = AtomicU64::new(0);
static SLICE_US: AtomicU64 = AtomicU64::new(2000);
static CORES_DONE: AtomicUsize = AtomicUsize::new(0);
static STOPPED: AtomicUsize = AtomicUsize::new(0);
static CRASH_HYPERCALL: AtomicBool = AtomicBool::new(false);
/// Cores take a vCPU already loaded on them first (the run until a
/// crash, [`run_until_crash`]).
static AFFINITY: AtomicBool = AtomicBool::new(false);
/// vCPU loads on a core other than the one that last had it.
pub static MIGRATIONS: AtomicU64 = AtomicU64::new(0);
/// Slices the backend's timer ended (VMX-preemption timer, SVM's APIC
/// timer).
static PREEMPTIONS: AtomicU64 = AtomicU64::new(0);

struct RunQueue {
    slots: [u16; MAX_VCPUS],
    head: usize,
    len: usize,
}

impl RunQueue {
    const fn new() -> Self {
        Self {
            slots: [0; MAX_VCPUS],
            head: 0,
            len: 0,
        }
    }

    fn push(&mut self, index: usize) {
        if self.len < MAX_VCPUS {
            self.slots[(self.head + self.len) % MAX_VCPUS] = index as u16;
            self.len += 1;
        }
    }

    /// Takes the first queued vCPU for which `wanted` holds, if any.
    fn take_first(&mut self, wanted: impl Fn(usize) -> bool) -> Option<usize> {
        let position = (0..self.len)
            .find(|&offset| wanted(usize::from(self.slots[(self.head + offset) % MAX_VCPUS])))?;
        let index = self.slots[(self.head + position) % MAX_VCPUS];
        for offset in position..self.len - 1 {
            self.slots[(self.head + offset) % MAX_VCPUS] =
                self.slots[(self.head + offset + 1) % MAX_VCPUS];
        }
        self.len -= 1;
        Some(usize::from(index))
    }

    fn pop(&mut self) -> Option<usize> {
        (self.len > 0).then(|| {
            let index = self.slots[self.head];
            self.head = (self.head + 1) % MAX_VCPUS;
            self.len -= 1;
            usize::from(index)
        })
    }
}

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

/// Creates the vCPUs of the in-tree guest and queues them.
fn create<B: Backend>(count: usize, knobs: Knobs) -> usize {
    let count = count.min(MAX_VCPUS);
    let Some(storage) =
        mm::alloc_permanent_slice_with(count, |index| vcpu::make::<B>(index, knobs))
    else {
        log::error!("{}: out of memory for {count} vCPUs", B::NAME);
        return 0;
    };
    let created = storage.iter().take_while(|vcpu| vcpu.exists()).count();
    let vcpus = &storage[..created];
    VCPUS.call_once(|| vcpus);
    let mut queue = RUN_QUEUE.lock();
    for index in 0..created {
        queue.push(index);
    }
    created
}

/// Clears vCPU `index`'s context and unlinks it, on the calling CPU, which
/// holds it (call-function IPI from the CPU that wants it).
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
            MIGRATIONS.fetch_add(1, Ordering::Relaxed);
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
    if loaded.newly_on_this_cpu {
        local.launched = false;
    }
    if !local.initialized {
        B::init_guest(
            &vcpu.shared.context,
            test_guest::LOAD_ADDRESS,
            test_guest::STACK_TOP,
        );
        local.initialized = true;
    }
    B::refresh_host_state();
    true
}

/// Whether the boot-time guest run is on.
pub fn running() -> bool {
    RUNNING.load(Ordering::Acquire)
}

/// The vCPU this core runs next: the head of the queue, or with
/// [`AFFINITY`] the first one already loaded here (else the head).
fn next_vcpu(cpu: usize) -> Option<usize> {
    let mut queue = RUN_QUEUE.lock();
    if AFFINITY.load(Ordering::Relaxed) {
        let loaded_here = |index: usize| {
            vcpus()[index]
                .shared
                .list_id
                .is_some_and(|id| LISTS.loaded_on(id) == Ok(Some(cpu)))
        };
        if let Some(index) = queue.take_first(loaded_here) {
            return Some(index);
        }
    }
    queue.pop()
}

/// Runs guests on this core until the deadline, then checks out.
pub fn run_loop<B: Backend>() {
    run_loop_until::<B>(|| DEADLINE_US.load(Ordering::Relaxed));
    CORES_DONE.fetch_add(1, Ordering::AcqRel);
}

/// Runs guests on this core while the run is on, until `deadline()`.
fn run_loop_until<B: Backend>(deadline: impl Fn() -> u64) {
    let cpu = percpu::current_cpu_index() as usize;
    if !super::cpu(cpu).enabled.load(Ordering::Acquire) {
        return;
    }
    while running() && time::now_us() < deadline() {
        let next = next_vcpu(cpu);
        let Some(index) = next else {
            inject::check_time();
            cpu::interrupt_window();
            continue;
        };
        let keep = run_slice::<B>(index);
        if keep {
            RUN_QUEUE.lock().push(index);
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

/// Runs one slice of vCPU `index`; `false` when it was stopped.
fn run_slice<B: Backend>(index: usize) -> bool {
    let vcpu = &vcpus()[index];
    let Some(mut local) = vcpu.local.try_lock() else {
        return true;
    };
    if !load_here::<B>(index, &mut local) {
        return true;
    }
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
                return false;
            }
            Action::Crash => {
                let regs = cpu::current_regs();
                crash_path::crash(crash_path::Reason::Hypercall { vcpu: index }, &regs)
            }
        };
        inject::check_time();
        if end_slice || time::now_us() >= slice_end || !running() {
            return true;
        }
    }
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
}

/// Runs every vCPU across every core with the backend for
/// `settings.run_ms`.
pub fn run_at_boot<B: Backend>(settings: &Settings) -> RunSummary {
    let cores = super::enabled_cpus();
    let wanted = if settings.vcpus == 0 {
        2 * cores
    } else {
        settings.vcpus
    };
    let created = create::<B>(wanted, settings.knobs);
    log::info!(
        "{}: {created} vCPUs on {cores} cores for {} ms, slice {} us",
        B::NAME,
        settings.run_ms,
        settings.slice_us
    );
    SLICE_US.store(settings.slice_us.max(1), Ordering::Relaxed);
    CRASH_HYPERCALL.store(settings.crash_hypercall_allowed, Ordering::Relaxed);
    // No deadline until every core is awake: waking them one by one takes
    // a while under an emulator. The crash knob's clock starts then too.
    DEADLINE_US.store(u64::MAX, Ordering::Relaxed);
    RUNNING.store(true, Ordering::Release);
    // Wake the idle APs; each joins from its idle loop.
    let woken = ipi::call_on_all(|_| {}, 0);
    inject::start_clock();
    let end = time::now_us() + settings.run_ms * 1000;
    // The run also goes on (bounded) until every core has run a guest: an
    // emulator that shares a few host cores among many CPUs can starve one
    // of them for the whole run.
    let latest = end.saturating_add(RUN_UNTIL_EVERY_CORE_EXITED_US);
    // This CPU joins with interrupts off, like the others; it ends the run.
    cpu::disable_interrupts();
    let me = percpu::current_cpu_index() as usize;
    super::cpu(me).joined.store(true, Ordering::Release);
    run_loop_until::<B>(|| if every_core_exited() { end } else { latest });
    if !settings.keep_running {
        DEADLINE_US.store(0, Ordering::Relaxed);
        CORES_DONE.fetch_add(1, Ordering::AcqRel);
        // Bounded: a core stuck for good must not hang the boot (under an
        // emulator whose CPUs share a few host cores, the last slices can
        // take a second or more to wind down).
        let online = woken.max(1);
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
    cpu::enable_interrupts();
    RunSummary {
        vcpus: created,
        stopped: STOPPED.load(Ordering::Relaxed),
        exits: vcpus()
            .iter()
            .map(|vcpu| vcpu.shared.exits.load(Ordering::Relaxed))
            .sum(),
        migrations: MIGRATIONS.load(Ordering::Relaxed),
        preemptions: PREEMPTIONS.load(Ordering::Relaxed),
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
