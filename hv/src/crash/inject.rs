//! Test crash injection (`crash=cpu:N,after_ms:T[,point:NAME]`): a chosen
//! CPU panics at a chosen time, optionally at a named point of the
//! loaded-VMCS list protocol or of the boot.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use crash::loaded_vmcs::StorePoint;
use hv_core::cmdline::{CoordinatorStep, CrashPoint, CrashSpec};

use smp_boot::bringup::CpuState;

use crate::cpu::{ipi, percpu, smp, time};

const NO_CPU: u32 = u32::MAX;

static CPU: AtomicU32 = AtomicU32::new(NO_CPU);
static AFTER_US: AtomicU64 = AtomicU64::new(0);
static AT_US: AtomicU64 = AtomicU64::new(u64::MAX);
static POINT: AtomicU8 = AtomicU8::new(NO_POINT);
static FIRED: AtomicBool = AtomicBool::new(false);

const NO_POINT: u8 = 0xFF;

fn encode(point: CrashPoint) -> u8 {
    match point {
        CrashPoint::ListAdd(store) => store,
        CrashPoint::ListRemove(store) => 0x10 | store,
        CrashPoint::VmclearUnlink => 0x20,
        CrashPoint::VcpuLoad => 0x21,
        CrashPoint::NmiBlocked => 0x22,
        CrashPoint::DoublePanic => 0x23,
        CrashPoint::BeforeVmx => 0x24,
        CrashPoint::Bringup => 0x25,
        CrashPoint::HandoverPanic => 0x26,
        CrashPoint::ExternalNmi => 0x27,
        CrashPoint::CoordinatorNmi(step) => {
            0x30 + CoordinatorStep::ALL
                .iter()
                .position(|candidate| *candidate == step)
                .unwrap_or(0) as u8
        }
    }
}

fn decode(raw: u8) -> Option<CrashPoint> {
    Some(match raw {
        0..=7 => CrashPoint::ListAdd(raw),
        0x10..=0x17 => CrashPoint::ListRemove(raw & 7),
        0x20 => CrashPoint::VmclearUnlink,
        0x21 => CrashPoint::VcpuLoad,
        0x22 => CrashPoint::NmiBlocked,
        0x23 => CrashPoint::DoublePanic,
        0x24 => CrashPoint::BeforeVmx,
        0x25 => CrashPoint::Bringup,
        0x26 => CrashPoint::HandoverPanic,
        0x27 => CrashPoint::ExternalNmi,
        0x30..=0x3F => {
            CrashPoint::CoordinatorNmi(*CoordinatorStep::ALL.get(usize::from(raw - 0x30))?)
        }
        _ => return None,
    })
}

/// The list stores of `add` and `remove`, numbered as `list_addN` and
/// `list_removeN` count them.
const ADD_STORES: [StorePoint; 5] = [
    StorePoint::AddClaim,
    StorePoint::AddSetNext,
    StorePoint::AddSetPrev,
    StorePoint::AddBackLink,
    StorePoint::AddPublish,
];
const REMOVE_STORES: [StorePoint; 3] = [
    StorePoint::RemoveUnlink,
    StorePoint::RemoveBackLink,
    StorePoint::RemoveReleaseCpu,
];

/// Records the knob at boot; the clock starts at [`start_clock`].
pub fn configure(spec: &CrashSpec) {
    if let Some(point) = spec.point {
        let out_of_range = match point {
            CrashPoint::ListAdd(store) => usize::from(store) >= ADD_STORES.len(),
            CrashPoint::ListRemove(store) => usize::from(store) >= REMOVE_STORES.len(),
            _ => false,
        };
        if out_of_range {
            log::warn!(
                "crash knob: {point:?} names a store the list protocol does not make; it will never fire"
            );
        }
        POINT.store(encode(point), Ordering::Relaxed);
    }
    CPU.store(spec.cpu, Ordering::Relaxed);
    AFTER_US.store(spec.after_ms.saturating_mul(1000), Ordering::Relaxed);
}

/// Whether a crash is configured at all.
pub fn configured() -> bool {
    CPU.load(Ordering::Relaxed) != NO_CPU
}

/// The configured point.
pub fn point() -> Option<CrashPoint> {
    decode(POINT.load(Ordering::Relaxed))
}

/// The CPU (index) the knob names.
pub fn target_cpu() -> Option<usize> {
    let cpu = CPU.load(Ordering::Relaxed);
    (cpu != NO_CPU).then_some(cpu as usize)
}

/// Starts the `after_ms` clock (when the guests start, or after boot).
pub fn start_clock() {
    AT_US.store(
        time::now_us().saturating_add(AFTER_US.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
}

/// Whether [`start_clock`] ran.
pub fn clock_started() -> bool {
    AT_US.load(Ordering::Relaxed) != u64::MAX
}

/// Microseconds until the `after_ms` time (0 once it has come).
pub fn until_due_us() -> u64 {
    AT_US.load(Ordering::Relaxed).saturating_sub(time::now_us())
}

/// Whether the `after_ms` time has come.
pub fn due() -> bool {
    time::now_us() >= AT_US.load(Ordering::Relaxed)
}

fn fire(what: &str) -> ! {
    FIRED.store(true, Ordering::Relaxed);
    panic!(
        "injected crash on CPU {} ({what})",
        percpu::current_cpu_index()
    )
}

/// Whether the injected crash already happened.
pub fn fired() -> bool {
    FIRED.load(Ordering::Relaxed)
}

fn is_target() -> bool {
    CPU.load(Ordering::Relaxed) == percpu::current_cpu_index()
}

/// Holds time-based injection back until [`release`]: the crash is meant
/// for after the boot report, which must come out first however late it
/// is (guests keep running meanwhile).
static HELD: AtomicBool = AtomicBool::new(false);

/// Holds time-based injection back until [`release`].
pub fn hold() {
    HELD.store(true, Ordering::Release);
}

/// Lets time-based injection fire again (the boot report is out).
pub fn release() {
    HELD.store(false, Ordering::Release);
}

/// Whether the crash itself is time-based: no point, or a point that
/// disturbs a crash rather than causing one.
pub fn time_based() -> bool {
    point().is_none_or(|point| point.disturbs_the_crash())
}

/// Time-based injection: called on the target CPU from the guest loop.
pub fn check_time() {
    if time_based() && is_target() && !HELD.load(Ordering::Acquire) && due() {
        fire("after_ms elapsed");
    }
}

/// The coordinator's progress, for the points that disturb it: 0 none, 1
/// the NMIs are out, then a step's code ([`step_code`]).
static STEP: AtomicU8 = AtomicU8::new(0);
const STEP_NMIS_OUT: u8 = 1;

/// The steps' codes, in the order the coordinator reaches them: its
/// digest check runs during the rendezvous, before its own cleanup.
fn step_code(step: CoordinatorStep) -> u8 {
    match step {
        CoordinatorStep::DigestCheck => 2,
        CoordinatorStep::AfterCleanup => 3,
        CoordinatorStep::CoreHeader => 4,
        CoordinatorStep::Purgatory | CoordinatorStep::Storm => 5,
    }
}

/// The CPU that sends the disturbing NMIs of `nmi_*` and `external_nmi`:
/// the highest online CPU other than the knob's target (which crashes).
fn nmi_source() -> Option<usize> {
    let point = point()?;
    if !matches!(
        point,
        CrashPoint::CoordinatorNmi(_) | CrashPoint::ExternalNmi
    ) {
        return None;
    }
    let target = target_cpu()?;
    (0..smp::cpus().len())
        .rev()
        .find(|&cpu| cpu != target && smp::cpus()[cpu].slot.state() == CpuState::Online)
}

/// The coordinator: its NMIs are out.
pub fn nmi_source_release() {
    STEP.store(STEP_NMIS_OUT, Ordering::Release);
}

/// The coordinator reached `step`. For `point:nmi_<step>` it waits
/// (bounded) until the source's NMI reached it, so that the NMI lands
/// inside the step; the purgatory's NMI cannot be waited for.
pub fn coordinator_step(step: CoordinatorStep) {
    // Never backwards: a digest check made again in the hand-over (after
    // a failing one) must not re-arm an earlier step's NMI.
    STEP.fetch_max(step_code(step), Ordering::AcqRel);
    if point() != Some(CrashPoint::CoordinatorNmi(step)) || step == CoordinatorStep::Purgatory {
        return;
    }
    if nmi_source().is_none() {
        return;
    }
    let before = super::nmi::stray_on_coordinator();
    let deadline = time::now_us() + 500_000;
    while super::nmi::stray_on_coordinator() == before && time::now_us() < deadline {
        core::hint::spin_loop();
    }
}

/// `point:handover_panic`: the first hand-over attempt panics.
pub fn at_handover(attempt: u32) {
    if point() == Some(CrashPoint::HandoverPanic) && attempt == 1 {
        FIRED.store(true, Ordering::Relaxed);
        panic!("injected panic inside the hand-over");
    }
}

/// A checked-in CPU's last duty before it parks: if it is the knob's NMI
/// source, it sends the disturbing NMIs, then parks like the others.
pub fn nmi_source_duty(me: usize) {
    let Some(point) = point() else { return };
    if nmi_source() != Some(me) {
        return;
    }
    let wanted = match point {
        // The storm starts where `nmi_in_purgatory`'s one NMI goes.
        CrashPoint::CoordinatorNmi(CoordinatorStep::Storm) => step_code(CoordinatorStep::Purgatory),
        CrashPoint::CoordinatorNmi(step) => step_code(step),
        _ => STEP_NMIS_OUT,
    };
    let deadline = time::now_us() + 3_000_000;
    while STEP.load(Ordering::Acquire) < wanted && time::now_us() < deadline {
        core::hint::spin_loop();
    }
    if STEP.load(Ordering::Acquire) < wanted {
        return;
    }
    // Its own cleanup disabled its local APIC: sending needs it again.
    crate::arch::apic::software_enable();
    match point {
        CrashPoint::CoordinatorNmi(step) => {
            if matches!(step, CoordinatorStep::Purgatory | CoordinatorStep::Storm) {
                wait_for_the_purgatory();
            }
            if let Some(coordinator) = super::COORDINATOR.coordinator() {
                let apic_id = smp::cpus()[coordinator].slot.apic_id();
                crate::arch::apic::send_nmi(apic_id);
                if step == CoordinatorStep::Storm {
                    storm(apic_id);
                }
            }
        }
        _ => {
            // As the NMI button does: every CPU, whatever it is doing.
            for (cpu, shared) in smp::cpus().iter().enumerate() {
                if cpu != me && shared.slot.state() == CpuState::Online {
                    crate::arch::apic::send_nmi(shared.slot.apic_id());
                }
            }
        }
    }
    crate::arch::apic::disable();
}

/// `point:nmi_storm`: an NMI every [`STORM_GAP_US`] for [`STORM_US`], from
/// the purgatory's entry through the capture image's early boot (its
/// switch to long mode, its first GDT, its own IDT), where a real
/// machine's stray NMIs (an operator's button, a late shootdown IPI) may
/// land. A capture image that INITs this CPU ends the storm early.
fn storm(apic_id: u32) {
    let end = time::now_us() + STORM_US;
    while time::now_us() < end {
        time::delay_us(STORM_GAP_US);
        crate::arch::apic::send_nmi(apic_id);
    }
}

/// How long `point:nmi_storm` lasts: longer than the way from the
/// purgatory to the capture image's report under QEMU and Bochs.
const STORM_US: u64 = 200_000;
/// The gap between two NMIs of the storm. The windows of the way in are
/// shorter (a few instructions each), so one run hits some of them and a
/// stress run hits them all.
const STORM_GAP_US: u64 = 30;

/// `point:nmi_in_purgatory`: waits (bounded) until the purgatory stamped
/// its entry, so that the NMI lands inside it (it then checks every
/// digest, for milliseconds) rather than on the way there: a fixed delay
/// after the step's mark was too short in Bochs, whose CPUs take turns.
fn wait_for_the_purgatory() {
    let Some(area) = super::handover::purgatory_area() else {
        time::delay_us(20);
        return;
    };
    let deadline = time::now_us() + 1_000_000;
    while super::purgatory::stamps(area).entry_tsc == 0 && time::now_us() < deadline {
        // Read the stamp afresh each time: the coordinator writes it.
        core::sync::atomic::fence(Ordering::Acquire);
        core::hint::spin_loop();
    }
}

/// Point-based injection inside the list protocol.
pub fn at_store(store: StorePoint) {
    let Some(point) = point() else { return };
    let matches = match point {
        CrashPoint::ListAdd(n) => ADD_STORES.get(usize::from(n)) == Some(&store),
        CrashPoint::ListRemove(n) => REMOVE_STORES.get(usize::from(n)) == Some(&store),
        CrashPoint::VmclearUnlink => store == StorePoint::UnloadVmclear,
        CrashPoint::VcpuLoad => store == StorePoint::LoadVmptrld,
        _ => false,
    };
    if matches && is_target() && due() {
        fire(store.name());
    }
}

/// Point-based injection at a boot stage (`before_vmx`, `bringup`).
pub fn at_stage(stage: CrashPoint) {
    if point() == Some(stage) && is_target() {
        fire("boot stage");
    }
}

/// Runs on a CPU asked (by IPI) to crash once the CPU that asked has had
/// 10 ms to get itself stuck (`nmi_blocked` on the boot CPU).
pub fn crash_after_delay(_: usize) {
    time::delay_us(10_000);
    fire("after the stuck CPU blocked its NMIs");
}

/// Runs on a CPU asked (by IPI) to crash now.
pub fn crash_here(_: usize) {
    fire("after_ms elapsed");
}

/// `point:bringup`, on every AP just before it checks in.
pub fn at_bringup(_index: usize) {
    at_stage(CrashPoint::Bringup);
}

/// Has the knob's target CPU panic now (through an IPI if it is another).
pub fn trigger_now() {
    let Some(target) = target_cpu() else {
        return;
    };
    if target == percpu::current_cpu_index() as usize {
        crash_here(0);
    }
    if !ipi::call_on(target, crash_here, 0) {
        log::error!("crash knob: CPU {target} is not online; no crash injected");
    }
}

/// The crash knob's cases the guest run did not already fire, once the
/// boot report is out.
pub fn fire_after_boot() {
    if fired() {
        // Another CPU's injected crash is under way (the guests ran on
        // after the boot report): its shootdown NMI ends this CPU too,
        // which must not go on to report `done` meanwhile.
        loop {
            core::hint::spin_loop();
        }
    }
    let point = point().filter(|point| !point.disturbs_the_crash());
    if let Some(point) = point.filter(|point| point.needs_vmx()) {
        // Points of the loaded-VMCS list protocol exist only while guests
        // run; the run is over (or never started: no VMX) and it was not hit.
        log::error!(
            "crash knob: injection point {point:?} was never reached (it needs a guest run)"
        );
        crate::console::report::line(|o| {
            o.field("crash_injection")
                .object(|o| o.field("fired").bool(false))
        });
        return;
    }
    if !clock_started() {
        start_clock();
    }
    while !due() {
        core::hint::spin_loop();
    }
    let Some(target) = target_cpu() else {
        return;
    };
    let me = percpu::current_cpu_index() as usize;
    let cpus = smp::cpus().len();
    match point {
        Some(CrashPoint::NmiBlocked) => {
            // The target spins inside an NMI handler, so it cannot take the
            // shootdown NMI; another CPU panics and must name it.
            let panicker = if target == 0 { 1 % cpus } else { 0 };
            super::nmi::SPIN_IN_NMI.store(target as u32, Ordering::Relaxed);
            if target == me {
                // This CPU is about to block itself: have the panicker wait
                // until it surely has, then panic.
                ipi::send_call(panicker, crash_after_delay, 0);
            }
            if let Some(cpu) = smp::cpus().get(target) {
                crate::arch::apic::send_nmi(cpu.slot.apic_id());
            }
            time::delay_us(10_000);
            if panicker == me {
                crash_here(0);
            }
            ipi::call_on(panicker, crash_here, 0);
        }
        Some(CrashPoint::DoublePanic) => {
            let other = (target + 1) % cpus;
            for cpu in [target, other] {
                if cpu != me {
                    ipi::send_call(cpu, crash_here, 0);
                }
            }
            if [target, other].contains(&me) {
                crash_here(0);
            }
            time::delay_us(1_000_000);
        }
        _ => trigger_now(),
    }
}

/// `hang=...`: the chosen CPU hangs, after the boot report: with
/// interrupts off, spinning; or holding a lock the next CPU waits for,
/// both with interrupts off.
pub fn hang_after_boot(spec: &hv_core::cmdline::HangSpec) {
    time::delay_us(spec.after_ms.saturating_mul(1000));
    let cpus = smp::cpus().len();
    let target = spec.cpu as usize;
    if target >= cpus {
        log::error!("hang knob: CPU {target} does not exist; nothing hangs");
        return;
    }
    log::warn!("hang knob: CPU {target} hangs now ({:?})", spec.how);
    match spec.how {
        hv_core::cmdline::HangHow::Spin => {
            send_or_run(target, hang_spinning);
        }
        hv_core::cmdline::HangHow::Lock => {
            send_or_run(target, hang_holding_lock);
            time::delay_us(10_000);
            let waiter = (target + 1) % cpus;
            if waiter != target {
                send_or_run(waiter, hang_waiting_for_lock);
            }
        }
    }
}

/// Runs `function` on CPU `cpu` without waiting, or here if it is this one.
fn send_or_run(cpu: usize, function: fn(usize)) {
    if cpu == percpu::current_cpu_index() as usize {
        function(0);
    } else if !ipi::send_call(cpu, function, 0) {
        log::error!("hang knob: CPU {cpu} did not take the request");
    }
}

/// The lock of `hang=...,how:lock`.
static HANG_LOCK: spin::Mutex<()> = spin::Mutex::new(());

#[inline(never)]
fn hang_spinning(_: usize) {
    crate::arch::cpu::disable_interrupts();
    loop {
        core::hint::spin_loop();
    }
}

#[inline(never)]
fn hang_holding_lock(_: usize) {
    crate::arch::cpu::disable_interrupts();
    let _held = HANG_LOCK.lock();
    loop {
        core::hint::spin_loop();
    }
}

#[inline(never)]
fn hang_waiting_for_lock(_: usize) {
    crate::arch::cpu::disable_interrupts();
    // Its own wait loop, not `lock()`: with the holder's body, the two
    // functions fold into one and a dump's backtrace names the holder.
    loop {
        if let Some(_never) = HANG_LOCK.try_lock() {
            loop {
                core::hint::spin_loop();
            }
        }
        core::hint::spin_loop();
    }
}

/// `stray_write=reservation`: after the boot report, a write into the
/// loaded capture kernel, which the page tables make read-only: it must
/// fault at once (and the crash it starts must still capture).
pub fn stray_write_into_reservation() {
    let Some(&(start, len)) = crate::mm::CRASH_RESERVATION.get() else {
        log::error!("stray write knob: no reservation; nothing written");
        return;
    };
    let address = start + len / 4;
    log::warn!("stray write knob: writing into the reservation at {address:#x}");
    crate::mm::phys::write(address, &[0xA5]);
    log::error!("stray write knob: the write at {address:#x} did not fault");
}
