//! Bringing up the application processors, and the IPIs between CPUs.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use smp_boot::bringup::{self, Clock, Config, CpuState, StartupIpi};
use smp_boot::madt::MAX_CPUS;
use smp_boot::trampoline;

use crate::arch::{apic, cpu, gdt::DescriptorTables};
use crate::memory::{self, INTERRUPT_STACK_PAGES, MAIN_STACK_PAGES};
use crate::percpu::{self, SharedCpu};
use crate::time;

/// Vector of the call-function IPI.
pub const CALL_FUNCTION_VECTOR: u8 = 0xF0;

/// How many CPUs this run uses (online or failed), boot CPU included.
static CPU_COUNT: AtomicUsize = AtomicUsize::new(1);

/// Test knob: the AP with this APIC ID hangs before it checks in.
static HANG_APIC_ID: AtomicU64 = AtomicU64::new(u64::MAX);

/// What the bring-up did, for the report.
#[derive(Debug, Clone, Copy)]
pub struct BringupReport {
    /// CPUs the MADT offers.
    pub possible: usize,
    /// CPUs asked to start (boot CPU included), after `max_cpus`.
    pub attempted: usize,
    /// CPUs running, boot CPU included.
    pub online: usize,
    /// First INIT to the last AP's check-in.
    pub elapsed_us: u64,
}

/// Bring-up settings from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// At most this many CPUs, boot CPU included.
    pub max_cpus: Option<u32>,
    /// Startup timing.
    pub timing: Config,
    /// Test knob: this AP hangs before it checks in.
    pub hang_apic_id: Option<u32>,
}

struct LocalApicIpi;

impl StartupIpi for LocalApicIpi {
    fn send_init(&mut self, apic_id: u32) {
        apic::send_init(apic_id);
    }

    fn send_startup(&mut self, apic_id: u32, page_number: u8) {
        apic::send_startup(apic_id, page_number);
    }
}

struct TscClock;

impl Clock for TscClock {
    fn now_us(&mut self) -> u64 {
        time::now_us()
    }
}

/// The CPUs of this run, boot CPU first.
pub fn cpus() -> &'static [SharedCpu] {
    &percpu::all_shared()[..CPU_COUNT.load(Ordering::Acquire)]
}

/// Starts every AP of `possible` (APIC IDs in MADT order; up to
/// `max_cpus`), all at once.
pub fn bring_up(possible: impl Iterator<Item = u32>, settings: &Settings) -> BringupReport {
    let own_apic_id = cpu::apic_id();
    // The boot CPU is index 0; the others follow in MADT order.
    let mut apic_ids = [0u32; MAX_CPUS];
    apic_ids[0] = own_apic_id;
    let mut count = 1;
    for apic_id in possible
        .filter(|&apic_id| apic_id != own_apic_id)
        .take(MAX_CPUS - 1)
    {
        apic_ids[count] = apic_id;
        count += 1;
    }
    let possible = count;
    let limit = settings
        .max_cpus
        .map_or(count, |max| (max as usize).clamp(1, count));
    if limit < count {
        log::info!("smp: max_cpus={limit}: starting {limit} of {count} CPUs");
    }
    for (index, &apic_id) in apic_ids[..possible].iter().enumerate() {
        percpu::shared(index).slot.assign(apic_id);
    }
    percpu::shared(0).slot.mark_boot_cpu_online(time::now_us());
    let count = limit;
    if let Some(apic_id) = settings.hang_apic_id {
        HANG_APIC_ID.store(u64::from(apic_id), Ordering::Relaxed);
        log::warn!("smp: test knob: the AP with APIC ID {apic_id} will hang before it checks in");
    }

    let report = |online, elapsed_us| BringupReport {
        possible,
        attempted: count,
        online,
        elapsed_us,
    };
    if count == 1 {
        CPU_COUNT.store(1, Ordering::Release);
        return report(1, 0);
    }
    let Some(stack_tops) = prepare_aps(&apic_ids[..count]) else {
        log::error!("smp: out of memory for AP stacks; running on the boot CPU alone");
        return report(1, 0);
    };
    let Some(page) = install_trampoline(&apic_ids[..count], stack_tops) else {
        return report(1, 0);
    };
    CPU_COUNT.store(count, Ordering::Release);

    log::info!(
        "smp: starting {} APs in parallel (trampoline at {page:#x})",
        count - 1
    );
    let aps = &percpu::all_shared()[1..count];
    let outcome = start_slots(aps, (page >> 12) as u8, &settings.timing);
    for (index, cpu) in percpu::all_shared()[..count].iter().enumerate() {
        if cpu.slot.state() == CpuState::Failed {
            log::error!(
                "smp: CPU {index} (APIC ID {}) did not check in; excluded",
                cpu.slot.apic_id()
            );
        }
    }
    log::info!(
        "smp: {} of {} CPUs online in {} us",
        outcome.online + 1,
        count,
        outcome.elapsed_us
    );
    report(outcome.online + 1, outcome.elapsed_us)
}

fn start_slots(aps: &[SharedCpu], page_number: u8, timing: &Config) -> bringup::Outcome {
    bringup::start_all(
        aps.iter().map(|cpu| &cpu.slot),
        page_number,
        timing,
        &mut LocalApicIpi,
        &mut TscClock,
    )
}

/// Allocates every AP's stacks, GDT/TSS and local half. Returns the
/// physical address of the stack-top table (by CPU index).
fn prepare_aps(apic_ids: &[u32]) -> Option<u64> {
    let stack_tops = memory::alloc_permanent_slice::<u64>(apic_ids.len())?;
    for (index, &apic_id) in apic_ids.iter().enumerate().skip(1) {
        let main = memory::alloc_guarded_stack(MAIN_STACK_PAGES)?;
        let nmi = memory::alloc_guarded_stack(INTERRUPT_STACK_PAGES)?;
        let double_fault = memory::alloc_guarded_stack(INTERRUPT_STACK_PAGES)?;
        let machine_check = memory::alloc_guarded_stack(INTERRUPT_STACK_PAGES)?;
        let tables =
            memory::alloc_permanent(DescriptorTables::new(nmi, double_fault, machine_check))?;
        let local = memory::alloc_permanent(percpu::new_local(apic_id, tables))?;
        percpu::register(index, local);
        stack_tops[index] = main;
    }
    Some(stack_tops.as_ptr() as u64)
}

/// Copies the trampoline below 1 MiB with its parameters.
fn install_trampoline(apic_ids: &[u32], stack_tops: u64) -> Option<u64> {
    let ids = memory::alloc_permanent_slice::<u32>(apic_ids.len())?;
    ids.copy_from_slice(apic_ids);
    let Some(page) = memory::alloc_low_page() else {
        log::error!(
            "smp: no free page below 1 MiB for the AP trampoline; running on the boot CPU alone"
        );
        return None;
    };
    let entry = ap_entry as *const () as u64;
    let Some(parameters) = trampoline::parameters(
        page as u32,
        cpu::cr3(),
        ids.as_ptr() as u64,
        stack_tops,
        apic_ids.len() as u32,
        entry,
    ) else {
        log::error!(
            "smp: page tables above 4 GiB cannot be reached from the trampoline; running on the boot CPU alone"
        );
        return None;
    };
    // SAFETY: the page is ours (fresh from the allocator), identity-mapped,
    // and no AP runs yet.
    let destination = unsafe { core::slice::from_raw_parts_mut(page as *mut u8, 4096) };
    trampoline::write_blob(destination, &parameters).ok()?;
    Some(page)
}

/// Where every AP lands in 64-bit mode, on its own stack.
extern "C" fn ap_entry(index: u64) -> ! {
    let index = index as usize;
    let Some(local) = percpu::install_for(index) else {
        cpu::halt_forever();
    };
    // SAFETY: the boot CPU built these tables for this CPU alone.
    unsafe { (*local.tables).load() };
    crate::arch::idt::load();
    apic::enable();
    if HANG_APIC_ID.load(Ordering::Relaxed) == u64::from(local.apic_id) {
        // Test knob: never check in; wait with NMIs open so a crash can
        // still collect this CPU.
        cpu::halt_forever();
    }
    crate::inject::at_stage(hv_core::cmdline::CrashPoint::Bringup);
    if percpu::shared(index).slot.check_in(time::now_us()).is_err() {
        log::warn!("smp: CPU {index} came up after the deadline; parking it");
        cpu::halt_forever();
    }
    log::debug!("smp: CPU {index} (APIC ID {}) online", local.apic_id);
    idle()
}

/// An online CPU with nothing to do: serve IPIs, and join the guest run
/// when it starts.
pub fn idle() -> ! {
    let me = percpu::current_cpu_index() as usize;
    loop {
        if crate::guests::running()
            && !percpu::shared(me)
                .joined_guests
                .swap(true, Ordering::AcqRel)
        {
            // SAFETY: guests run with interrupts off between explicit windows.
            unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
            crate::guests::run_loop();
        }
        // SAFETY: `sti; hlt` waits for the next interrupt without missing
        // one that arrives in between (STI's one-instruction shadow).
        unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) };
    }
}

/// Sends an NMI to every other CPU and counts the online ones that took it
/// within 100 ms: the crash path's shootdown depends on exactly this.
pub fn nmi_self_test() -> usize {
    let own = percpu::current_cpu_index() as usize;
    let before: [u32; MAX_CPUS] =
        core::array::from_fn(|index| percpu::shared(index).nmis.load(Ordering::Relaxed));
    send_nmi_to_online_others();
    let others = || {
        cpus()
            .iter()
            .enumerate()
            .filter(move |&(index, cpu)| index != own && cpu.slot.state() == CpuState::Online)
    };
    let deadline = time::now_us() + 100_000;
    let answered = || {
        others()
            .filter(|&(index, cpu)| cpu.nmis.load(Ordering::Relaxed) > before[index])
            .count()
    };
    while answered() < others().count() && time::now_us() < deadline {
        core::hint::spin_loop();
    }
    answered()
}

/// Sends an NMI to every other online CPU, one by one. Never the
/// all-but-self shorthand: it would also reach CPUs this run did not start
/// (beyond `max_cpus`, or ones that failed), which may still be in firmware
/// with no IDT for an NMI. Lock-free: the crash shootdown uses it. Returns
/// how many NMIs it sent.
pub fn send_nmi_to_online_others() -> usize {
    let own = percpu::current_cpu_index() as usize;
    let mut sent = 0;
    for (index, cpu) in cpus().iter().enumerate() {
        if index != own && cpu.slot.state() == CpuState::Online {
            apic::send_nmi(cpu.slot.apic_id());
            sent += 1;
        }
    }
    sent
}

/// A pending call-function request of one target CPU.
///
/// The sender owns the slot from winning `busy` until it releases it; the
/// target reads `function`/`argument` after an acquire load of `requested`
/// and publishes completion with a release store of `completed`.
#[derive(Debug)]
pub struct CallSlot {
    busy: AtomicBool,
    function: AtomicUsize,
    argument: AtomicUsize,
    requested: AtomicU64,
    completed: AtomicU64,
}

impl CallSlot {
    /// An idle slot.
    pub const fn new() -> Self {
        Self {
            busy: AtomicBool::new(false),
            function: AtomicUsize::new(0),
            argument: AtomicUsize::new(0),
            requested: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        }
    }
}

/// Runs `function(argument)` on CPU `index` and waits for it to finish,
/// like Linux's `smp_call_function_single(..., wait = 1)`. Returns `false`
/// if that CPU is not online.
pub fn call_on(index: usize, function: fn(usize), argument: usize) -> bool {
    let Some(target) = cpus().get(index) else {
        return false;
    };
    if target.slot.state() != CpuState::Online {
        return false;
    }
    if index == percpu::current_cpu_index() as usize {
        function(argument);
        return true;
    }
    let call = &target.call;
    while call
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    call.function.store(function as usize, Ordering::Relaxed);
    call.argument.store(argument, Ordering::Relaxed);
    let ticket = call.requested.load(Ordering::Relaxed) + 1;
    call.requested.store(ticket, Ordering::Release);
    apic::send_fixed(target.slot.apic_id(), CALL_FUNCTION_VECTOR);
    // Interrupts stay open while waiting: the target may be waiting for
    // this CPU at the same moment.
    let interrupts_were_on = cpu::interrupts_enabled();
    cpu::enable_interrupts();
    while call.completed.load(Ordering::Acquire) < ticket {
        core::hint::spin_loop();
    }
    if !interrupts_were_on {
        cpu::disable_interrupts();
    }
    call.busy.store(false, Ordering::Release);
    true
}

/// Asks CPU `index` to run `function(argument)` and does not wait for it
/// (the crash injection: the target never finishes).
pub fn send_call(index: usize, function: fn(usize), argument: usize) -> bool {
    let Some(target) = cpus().get(index) else {
        return false;
    };
    let call = &target.call;
    if call
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    call.function.store(function as usize, Ordering::Relaxed);
    call.argument.store(argument, Ordering::Relaxed);
    let ticket = call.requested.load(Ordering::Relaxed) + 1;
    call.requested.store(ticket, Ordering::Release);
    apic::send_fixed(target.slot.apic_id(), CALL_FUNCTION_VECTOR);
    true
}

/// Runs `function(argument)` on every online CPU (this one too) and waits.
/// Returns on how many CPUs it ran.
pub fn call_on_all(function: fn(usize), argument: usize) -> usize {
    (0..cpus().len())
        .filter(|&index| call_on(index, function, argument))
        .count()
}

/// The call-function IPI handler.
pub fn on_call_function_ipi() {
    let call = &percpu::shared(percpu::current_cpu_index() as usize).call;
    let ticket = call.requested.load(Ordering::Acquire);
    if ticket > call.completed.load(Ordering::Relaxed) {
        let address = call.function.load(Ordering::Relaxed);
        let argument = call.argument.load(Ordering::Relaxed);
        // SAFETY: `call_on` stored a valid `fn(usize)` in `function` before
        // the release store of `requested` that the acquire above read.
        let function: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(address) };
        function(argument);
        call.completed.store(ticket, Ordering::Release);
    }
    apic::end_of_interrupt();
}
