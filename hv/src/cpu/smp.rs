//! Bringing up the application processors.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use smp_boot::bringup::{self, Clock, Config, CpuState, StartupIpi};
use smp_boot::madt::MAX_CPUS;
use smp_boot::trampoline;

use super::percpu::{self, LocalHalf, SharedCpu};
use super::time;
use crate::arch::{apic, cpu};
use crate::mm::{self, phys};

/// How many CPUs this run uses (online or failed), boot CPU included.
static CPU_COUNT: AtomicUsize = AtomicUsize::new(1);

/// Every CPU the MADT enables was started (none left out by `max_cpus` or
/// by the table's size).
static EVERY_PRESENT_CPU_STARTED: AtomicBool = AtomicBool::new(false);

/// Bytes the allocator gave the APs' stacks, tables and local halves in
/// the last bring-up (page tables split for their guard pages included),
/// and how many APs they were for.
static AP_MEMORY: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// What the last bring-up allocated for its APs: (bytes, APs).
pub fn ap_memory() -> (u64, u64) {
    (
        AP_MEMORY[0].load(Ordering::Relaxed),
        AP_MEMORY[1].load(Ordering::Relaxed),
    )
}

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
    /// When the first INIT went out (the clock of [`time::now_us`]; 0 when
    /// none did).
    pub started_us: u64,
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
    /// Runs on every AP, with its index, just before it checks in (a
    /// crash-injection point of the layer above, handed over so that this
    /// layer imports nothing above it).
    pub before_check_in: fn(usize),
}

/// [`Settings::before_check_in`], for the APs.
static BEFORE_CHECK_IN: crate::arch::atomic_fn::AtomicCallFn =
    crate::arch::atomic_fn::AtomicCallFn::new();

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

/// Whether every present CPU runs this kernel: all were started, and each
/// is online. Then an all-but-self IPI reaches exactly the other online
/// CPUs.
pub fn every_present_cpu_online() -> bool {
    EVERY_PRESENT_CPU_STARTED.load(Ordering::Acquire)
        && cpus()
            .iter()
            .all(|cpu| cpu.slot.state() == CpuState::Online)
}

/// Starts every AP of `possible` (APIC IDs in MADT order; up to
/// `max_cpus`), all at once.
pub fn bring_up(possible: impl Iterator<Item = u32>, settings: &Settings) -> BringupReport {
    let own_apic_id = cpu::apic_id();
    // The boot CPU is index 0; the others follow in MADT order.
    let mut apic_ids = [0u32; MAX_CPUS];
    apic_ids[0] = own_apic_id;
    let mut count = 1;
    let mut others = possible.filter(|&apic_id| apic_id != own_apic_id);
    for apic_id in others.by_ref().take(MAX_CPUS - 1) {
        apic_ids[count] = apic_id;
        count += 1;
    }
    let left_out = others.count();
    if left_out > 0 {
        log::warn!("smp: {left_out} CPUs beyond the {MAX_CPUS} supported are left waiting");
    }
    let limit = settings
        .max_cpus
        .map_or(count, |max| (max as usize).clamp(1, count));
    if limit < count {
        log::info!("smp: max_cpus={limit}: starting {limit} of {count} CPUs");
    }
    // Before any AP runs: the crash path's all-but-self NMI relies on it.
    EVERY_PRESENT_CPU_STARTED.store(left_out == 0 && limit == count, Ordering::Release);
    start(&apic_ids[..count], limit, None, settings)
}

/// Starts the CPUs with these APIC IDs (the calling CPU's own is left
/// out) as this kernel's APs, all at once, through a trampoline written to
/// `page`: a page below 1 MiB that the caller owns for the purpose (hv's
/// capture mode borrows one of the old kernel's, whose bytes it saved).
/// Which of them came up is then in [`cpus`] (index 1 on, in this order).
/// [`every_present_cpu_online`] stays false: the machine may hold CPUs
/// that were not asked, or did not answer.
pub fn wake(apic_ids: impl Iterator<Item = u32>, page: u64, settings: &Settings) -> BringupReport {
    let own_apic_id = cpu::apic_id();
    let mut all = [0u32; MAX_CPUS];
    all[0] = own_apic_id;
    let mut count = 1;
    for apic_id in apic_ids
        .filter(|&apic_id| apic_id != own_apic_id)
        .take(MAX_CPUS - 1)
    {
        all[count] = apic_id;
        count += 1;
    }
    start(&all[..count], count, Some(page), settings)
}

/// Starts `apic_ids[1..count]` (index 0 is the calling CPU); the rest of
/// `apic_ids` get slots but stay offline. The trampoline goes to `page`,
/// or to a free low page of the allocator's.
fn start(apic_ids: &[u32], count: usize, page: Option<u64>, settings: &Settings) -> BringupReport {
    let possible = apic_ids.len();
    for (index, &apic_id) in apic_ids.iter().enumerate() {
        percpu::shared(index).slot.assign(apic_id);
    }
    percpu::shared(0).slot.mark_boot_cpu_online(time::now_us());
    BEFORE_CHECK_IN.store(settings.before_check_in, Ordering::Relaxed);
    if let Some(apic_id) = settings.hang_apic_id {
        HANG_APIC_ID.store(u64::from(apic_id), Ordering::Relaxed);
        log::warn!("smp: test knob: the AP with APIC ID {apic_id} will hang before it checks in");
    }

    let report = |online, elapsed_us, started_us| BringupReport {
        possible,
        attempted: count,
        online,
        elapsed_us,
        started_us,
    };
    if count == 1 {
        CPU_COUNT.store(1, Ordering::Release);
        return report(1, 0, 0);
    }
    let free_before = mm::free_bytes();
    let Some(stack_tops) = prepare_aps(&apic_ids[..count]) else {
        log::error!("smp: out of memory for AP stacks; running on the boot CPU alone");
        return report(1, 0, 0);
    };
    AP_MEMORY[0].store(
        free_before.saturating_sub(mm::free_bytes()),
        Ordering::Relaxed,
    );
    AP_MEMORY[1].store((count - 1) as u64, Ordering::Relaxed);
    let Some(page) = page.or_else(|| {
        let page = mm::alloc_low_page();
        if page.is_none() {
            log::error!(
                "smp: no free page below 1 MiB for the AP trampoline; running on the boot CPU alone"
            );
        }
        page
    }) else {
        return report(1, 0, 0);
    };
    if install_trampoline(&apic_ids[..count], stack_tops, page).is_none() {
        return report(1, 0, 0);
    }
    CPU_COUNT.store(count, Ordering::Release);

    log::info!(
        "smp: starting {} APs in parallel (trampoline at {page:#x})",
        count - 1
    );
    let aps = &percpu::all_shared()[1..count];
    let started_us = time::now_us();
    let outcome = start_slots(aps, (page >> 12) as u8, &settings.timing);
    for (index, cpu) in percpu::all_shared()[..count].iter().enumerate() {
        if cpu.slot.state() == CpuState::Failed {
            // INIT puts it back to waiting for a SIPI, whatever it was
            // doing: a late AP must not run on into the kernel.
            apic::send_init(cpu.slot.apic_id());
            log::error!(
                "smp: CPU {index} (APIC ID {}) did not check in; excluded and sent INIT",
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
    report(outcome.online + 1, outcome.elapsed_us, started_us)
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
    let stack_tops = mm::alloc_permanent_slice::<u64>(apic_ids.len())?;
    for (index, &apic_id) in apic_ids.iter().enumerate().skip(1) {
        let stacks = mm::alloc_cpu_stacks()?;
        let local = mm::alloc_permanent(percpu::new_local(index as u32, apic_id))?;
        local.set_tables(stacks.tables);
        percpu::shared(index)
            .crash_stack
            .store(stacks.crash, Ordering::Relaxed);
        percpu::register(index, local);
        stack_tops[index] = stacks.main;
    }
    Some(stack_tops.as_ptr() as u64)
}

/// Copies the trampoline with its parameters to `page` (below 1 MiB).
fn install_trampoline(apic_ids: &[u32], stack_tops: u64, page: u64) -> Option<u64> {
    let ids = mm::alloc_permanent_slice::<u32>(apic_ids.len())?;
    ids.copy_from_slice(apic_ids);
    let entry = ap_entry as *const () as u64;
    let parameters = u32::try_from(page).ok().and_then(|page| {
        trampoline::parameters(
            page,
            cpu::cr3(),
            ids.as_ptr() as u64,
            stack_tops,
            apic_ids.len() as u32,
            entry,
        )
    });
    let Some(parameters) = parameters else {
        log::error!(
            "smp: the trampoline page {page:#x} or the page tables lie out of the trampoline's reach; running on the boot CPU alone"
        );
        return None;
    };
    // The page is the caller's (fresh from the allocator, or borrowed and
    // saved by the capture), and no AP runs yet.
    phys::with_bytes_mut(page, 4096, |destination| {
        trampoline::write_blob(destination, &parameters)
    })
    .ok()?;
    Some(page)
}

/// Where every AP lands in 64-bit mode, on its own stack.
extern "C" fn ap_entry(index: u64) -> ! {
    let index = index as usize;
    let Some(local) = percpu::install_for(index) else {
        cpu::halt_forever();
    };
    if let Some(tables) = local.tables() {
        tables.load();
    }
    crate::arch::idt::load();
    percpu::shared(index)
        .idt_live
        .store(true, Ordering::Release);
    apic::enable();
    percpu::unmask_nmi_pins(index);
    if HANG_APIC_ID.load(Ordering::Relaxed) == u64::from(local.apic_id()) {
        // Test knob: never check in; wait with NMIs open so a crash can
        // still collect this CPU.
        cpu::halt_forever();
    }
    if let Some(hook) = BEFORE_CHECK_IN.load(Ordering::Relaxed) {
        hook(index);
    }
    if percpu::shared(index).slot.check_in(time::now_us()).is_err() {
        log::warn!("smp: CPU {index} came up after the deadline; parking it");
        cpu::halt_forever();
    }
    log::debug!("smp: CPU {index} (APIC ID {}) online", local.apic_id());
    super::idle::idle()
}
