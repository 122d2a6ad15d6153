//! The hypervisor image: the boot sequence, and nothing else.
//!
//! The layers, lowest first (a layer imports only from layers below it;
//! see ARCHITECTURE.md): `arch` (the processor, all assembly; with
//! `mm::phys`, the only `unsafe`), `console`, `mm`, `boot`, `cpu`,
//! `crash`, `virt`, `capture`. This file registers the handlers the lower
//! layers call up through and runs the boot in order.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod arch;
mod boot;
mod capture;
mod console;
mod cpu;
mod crash;
mod mm;
mod virt;

use core::sync::atomic::Ordering;

use hv_core::cmdline::{self, CrashPoint, Finish};

use crate::boot::info::BootInfo;
use crate::cpu::percpu::LocalHalf;
use crate::cpu::{ipi, percpu, smp, time};
use crate::virt::svm::backend::Svm;
use crate::virt::vmx::backend::Vmx;
use crate::virt::{Backend, Selected, Unavailable};

entry_point!(crate::hv_main);

/// The boot information, kept for the hypervisor's lifetime.
static BOOT_INFO: spin::Once<BootInfo> = spin::Once::new();
/// The command-line options in force.
static OPTIONS: spin::Once<cmdline::Options> = spin::Once::new();

/// The TSC at the image's first instruction (the PVH entry's stamp; on a
/// multiboot2 boot, the first Rust instruction's): a capture image reports
/// it as the moment the capture kernel was entered.
static ENTRY_TSC: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Called by the boot stub in long mode on the boot stack.
extern "C" fn hv_main(entered_by: u32, info: u32, magic: u32) -> ! {
    let first_rust = arch::cpu::rdtsc();
    let entry = match arch::boot::pvh_entry_tsc() {
        0 => first_rust,
        stamped => stamped,
    };
    ENTRY_TSC.store(entry, Ordering::Relaxed);
    percpu::init_boot_cpu();
    console::init_serial();
    console::init_logging(log::LevelFilter::Info);
    register_trap_handlers();
    arch::gdt::load_boot_tables();
    arch::idt::load();
    arch::pic::remap_and_mask();
    println!("hv {}: booting", env!("CARGO_PKG_VERSION"));

    let boot = match boot::info::parse(entered_by, info, magic) {
        Ok(boot) => BOOT_INFO.call_once(|| boot),
        Err(error) => {
            log::error!("cannot read the boot information: {error}");
            console::report::line(|o| {
                o.field("panic")
                    .object(|o| o.field("message").display(error))
            });
            console::finish::fail_stop();
        }
    };
    for module in boot.modules() {
        log::info!(
            "boot module at {:#x}, {} bytes, command line '{}'",
            module.start,
            module.len,
            module.cmdline
        );
    }
    let parsed = cmdline::parse(boot.cmdline);
    let options = *OPTIONS.call_once(|| parsed.options);
    // A capture image's report is about the capture only: its own boot
    // must not overwrite what the crashed hypervisor reported.
    console::report::only_capture_lines(options.capture_mode.is_some());
    // A capture image logs NMIs whatever `nmi=` says: one of the old
    // world's may still reach this CPU, and must not stop the capture.
    crash::nmi::set_external_policy(if options.capture_mode.is_some() {
        cmdline::ExternalNmi::Log
    } else {
        options.nmi
    });
    console::report::line(|o| {
        o.field("loader").object(|o| {
            o.field("protocol").str(boot.protocol.name())?;
            o.field("name")
                .option(boot.loader_name, |value, name| value.str(name))
        })
    });
    console::set_level(options.log);
    console::finish::exit_emulator_when_done(options.finish == Finish::Exit);
    crash::set_timeout_ms(options.crash_timeout_ms);
    if let Some(spec) = &options.crash {
        crash::inject::configure(spec);
        log::warn!(
            "crash knob: CPU {} will panic ({:?}, after {} ms)",
            spec.cpu,
            spec.point,
            spec.after_ms
        );
    }
    log::info!("command line: '{}'", boot.cmdline);
    for error in parsed.errors() {
        log::warn!("command line: {error} (ignored)");
    }
    if parsed.dropped_errors() > 0 {
        log::warn!(
            "command line: {} more errors not shown",
            parsed.dropped_errors()
        );
    }
    console::report::line(|o| {
        o.field("cmdline").object(|o| {
            o.field("raw").str(boot.cmdline)?;
            o.field("errors").array(|a| {
                parsed
                    .errors()
                    .try_for_each(|error| a.item().display(error))
            })
        })
    });
    if boot.regions_dropped > 0 {
        log::warn!(
            "memory map: {} entries beyond {} were ignored",
            boot.regions_dropped,
            boot.regions().len()
        );
    }
    if boot.modules_dropped > 0 {
        log::warn!(
            "boot: {} modules beyond {} were ignored",
            boot.modules_dropped,
            boot::info::MAX_MODULES
        );
    }
    if boot.loader_ranges_dropped > 0 {
        log::warn!(
            "boot: {} loader structures could not be kept out of the allocator",
            boot.loader_ranges_dropped
        );
    }
    mm::init(boot.memory_map(), boot.keep_out(), options.crashkernel);
    let record_tables = |stacks: &mm::CpuStacks| {
        percpu::current().set_tables(stacks.tables);
        percpu::shared(0)
            .crash_stack
            .store(stacks.crash, Ordering::Relaxed);
    };
    if options.capture_mode.is_some() {
        mm::switch_to_guarded_stacks(record_tables, capture_main)
    }
    mm::switch_to_guarded_stacks(record_tables, boot_cpu_main)
}

/// The handlers the lowest layer calls up through.
fn register_trap_handlers() {
    arch::idt::register(2, crash::nmi::on_nmi);
    arch::idt::register(ipi::CALL_FUNCTION_VECTOR, ipi::on_call_function_ipi);
    arch::idt::register(virt::sched::KICK_VECTOR, virt::sched::on_kick);
    arch::idt::register(cpu::watchdog::TICK_VECTOR, cpu::watchdog::on_tick);
    arch::idt::register(virt::svm::SLICE_TIMER_VECTOR, virt::svm::on_slice_timer);
    arch::idt::register_exceptions(crash::exception::on_exception);
    cpu::watchdog::set_lockup_handler(crash::on_lockup);
}

/// Which LINT pins carry the platform's NMI to each CPU, from the MADT's
/// Local APIC NMI entries; LINT1 on every CPU where the MADT says nothing
/// (the common wiring, and what virtual-wire mode uses for NMI).
fn plan_nmi_pins(topology: Option<&smp_boot::madt::Topology>) {
    let entries = topology.map_or(&[][..], |topology| topology.local_nmis());
    for (index, shared) in smp::cpus().iter().enumerate() {
        let uid = topology.and_then(|topology| {
            topology
                .processors()
                .iter()
                .find(|cpu| cpu.apic_id == shared.slot.apic_id())
                .map(|cpu| cpu.acpi_uid)
        });
        let mut pins = 0u8;
        for entry in entries {
            if uid.is_some_and(|uid| entry.covers(uid)) && entry.lint < 2 {
                pins |= 1 << entry.lint;
                if entry.active_low() {
                    pins |= 1 << (entry.lint + 2);
                }
            }
        }
        if entries.is_empty() {
            pins = 1 << 1;
        }
        percpu::shared(index)
            .nmi_pins
            .store(pins, Ordering::Relaxed);
    }
}

/// This image is a capture kernel: stream the crashed hypervisor's dump.
fn capture_main() -> ! {
    let options = OPTIONS
        .get()
        .expect("options are parsed before the stack switch");
    capture::words::print(options.capture_words, options.capture_facts);
    let rsdp = BOOT_INFO.get().and_then(|boot| boot.rsdp);
    capture::mode::run(
        options.capture_mode.expect("capture mode was asked for"),
        options,
        rsdp,
        ENTRY_TSC.load(Ordering::Relaxed),
        options.capture_purgatory,
    )
}

/// The rest of the boot, on the boot CPU's guarded stack.
fn boot_cpu_main() -> ! {
    let boot = BOOT_INFO
        .get()
        .expect("boot information is read before the stack switch");
    let options = *OPTIONS
        .get()
        .expect("options are parsed before the stack switch");
    let acpi = boot::acpi::discover(boot);
    let topology = acpi.topology;

    let tsc = time::calibrate(acpi.rsdp);
    match &tsc {
        Ok(tsc) => log::info!(
            "TSC: {}.{:03} MHz ({}; {} measurements, {} rejected, {} disagreements)",
            tsc.khz / 1000,
            tsc.khz % 1000,
            tsc.source.name(),
            tsc.attempts,
            tsc.rejected,
            tsc.disagreements
        ),
        Err(error) => log::warn!("TSC: not calibrated: {error}; assuming 1 GHz"),
    }
    let tsc_khz = tsc.as_ref().ok().map(|tsc| tsc.khz);
    let apic_mode = arch::apic::choose_mode();
    arch::apic::enable();
    arch::cpu::enable_interrupts();
    log::info!("local APIC in {apic_mode} mode");

    let own_apic_id = arch::cpu::apic_id();
    let possible = topology
        .iter()
        .flat_map(|topology| topology.possible().map(|cpu| cpu.apic_id));
    let settings = smp::Settings {
        max_cpus: options.max_cpus,
        timing: smp_boot::bringup::Config {
            init_delay_us: options.init_delay_us,
            sipi_delay_us: options.sipi_delay_us,
            timeout_us: options.ap_timeout_ms * 1000,
        },
        hang_apic_id: options.ap_hang,
        before_check_in: crash::ap_checkpoint,
    };
    // The backend, from CPUID: VMX wherever the CPU has it, else SVM.
    let selected = virt::select();
    match selected {
        Ok(Selected::Vmx) => {
            crash::svm::set_backend_vmx();
            cpu::idle::set_work(virt::sched::join_run::<Vmx>);
        }
        Ok(Selected::Svm) => {
            crash::svm::set_backend_svm();
            cpu::idle::set_work(virt::sched::join_run::<Svm>);
        }
        Err(_) => {}
    }
    let bringup = smp::bring_up(possible, &settings);
    report_memory_per_cpu();
    // The APs unmask their own pins as they come up; the bring-up table
    // is known only now, so the boot CPU plans the pins, unmasks its own,
    // and has the online APs unmask theirs.
    plan_nmi_pins(topology.as_ref());
    ipi::call_on_all(percpu::unmask_nmi_pins, 0);
    capture::load::load_at_boot(boot, &options);
    // The capture load changed page protections: every CPU drops what it
    // cached (and this doubles as the call-function self-test).
    let called = ipi::call_on_all(|_| arch::cpu::flush_tlb(), 0);
    let nmis = ipi::nmi_self_test();
    log::info!("IPIs: call-function ran on {called} CPUs; NMI answered by {nmis} others");

    if crash::inject::point() == Some(CrashPoint::BeforeVmx) {
        crash::inject::trigger_now();
    }
    let watchdog = cpu::watchdog::start(options.watchdog_seconds);
    if watchdog {
        ipi::call_on_all(cpu::watchdog::tick_here, 0);
        log::info!(
            "watchdog: every CPU ticks every {} ms; silent for {} s starts the crash path",
            cpu::watchdog::TICK_MS,
            options.watchdog_seconds
        );
    }
    let virt = run_guests(&options, selected, boot);

    let failed = || {
        smp::cpus()
            .iter()
            .filter(|cpu| cpu.slot.state() == smp_boot::bringup::CpuState::Failed)
    };
    console::report::line(|o| {
        o.field("cpus").object(|o| {
            o.field("possible").u64(bringup.possible as u64)?;
            o.field("online").u64(bringup.online as u64)?;
            o.field("failed")
                .u64_array(failed().map(|cpu| u64::from(cpu.slot.apic_id())))?;
            o.field("attempted").u64(bringup.attempted as u64)?;
            o.field("bsp_apic_id").u64(u64::from(own_apic_id))?;
            o.field("apic_ids")
                .u64_array(smp::cpus().iter().map(|cpu| u64::from(cpu.slot.apic_id())))?;
            // Per CPU index, when it came online (null: not online), on
            // the clock of bringup_us: `bench bringup --plot` draws each AP.
            o.field("online_at_us").array(|a| {
                smp::cpus().iter().try_for_each(|cpu| {
                    let online = cpu.slot.state() == smp_boot::bringup::CpuState::Online;
                    a.item()
                        .option(online.then(|| cpu.slot.online_at_us()), |v, us| v.u64(us))
                })
            })
        })?;
        o.field("bringup_us").u64(bringup.elapsed_us)?;
        o.field("smp").object(|o| {
            o.field("apic_mode").str(apic_mode)?;
            o.field("tsc_khz")
                .option(tsc_khz, |value, khz| value.u64(khz))?;
            o.field("tsc_source").str(match &tsc {
                Ok(tsc) => tsc.source.name(),
                Err(error) => error.source_name(),
            })?;
            o.field("tsc_measured_by").option(
                tsc.as_ref().ok().and_then(|tsc| tsc.measured_by),
                |value, timer| value.str(timer.name()),
            )?;
            o.field("tsc_confirmed_by").option(
                tsc.as_ref().ok().and_then(|tsc| tsc.confirmed_by),
                |value, timer| value.str(timer.name()),
            )?;
            o.field("tsc_cpuid_khz").option(
                tsc.as_ref().ok().and_then(|tsc| tsc.cpuid_khz),
                |value, khz| value.u64(khz),
            )?;
            let (attempts, rejected, disagreements) = match &tsc {
                Ok(tsc) => (tsc.attempts, tsc.rejected, tsc.disagreements),
                Err(error) => (error.attempts, error.rejected, error.disagreements),
            };
            o.field("tsc_attempts").u64(u64::from(attempts))?;
            o.field("tsc_rejected").u64(u64::from(rejected))?;
            o.field("tsc_disagreements").u64(u64::from(disagreements))?;
            o.field("call_function_cpus").u64(called as u64)?;
            o.field("nmi_cpus").u64(nmis as u64)?;
            o.field("nmi_pins")
                .u64_array((0..smp::cpus().len()).map(|index| {
                    u64::from(percpu::shared(index).nmi_pins.load(Ordering::Relaxed))
                }))?;
            o.field("external_nmis")
                .u64(u64::from(crash::nmi::external()))?;
            o.field("watchdog_seconds").option(
                watchdog.then_some(options.watchdog_seconds),
                |value, seconds| value.u64(seconds),
            )
        })?;
        o.field("virt").object(|o| {
            o.field("backend").str(virt.backend)?;
            o.field("reason")
                .option(virt.error, |value, error| value.display(error))?;
            o.field("cpus_in_vmx")
                .u64(virt::vmx::CPUS_IN_VMX.load(Ordering::Relaxed))?;
            o.field("cpus_in_svm")
                .u64(virt::svm::CPUS_IN_SVM.load(Ordering::Relaxed))?;
            o.field("vcpus").u64(virt.run.vcpus as u64)?;
            o.field("vm_exits").u64(virt.run.exits)?;
            o.field("migrations").u64(virt.run.migrations)?;
            o.field("preemptions").u64(virt.run.preemptions)?;
            o.field("stopped").u64(virt.run.stopped as u64)?;
            o.field("platform_guests")
                .u64(virt.run.platform_guests as u64)?;
            o.field("guest_modules_not_run")
                .u64(virt.modules_not_run as u64)?;
            o.field("kicks")
                .u64(virt::sched::KICKS.load(Ordering::Relaxed))?;
            o.field("exits_per_cpu").u64_array(
                (0..smp::cpus().len())
                    .map(|index| virt::cpu(index).vm_exits.load(Ordering::Relaxed)),
            )
        })
    });
    if crash::inject::configured() {
        resume_guests_until_crash(&virt, &options);
        crash::inject::fire_after_boot();
    }
    if options.stray_write {
        crash::inject::stray_write_into_reservation();
    }
    if let Some(hang) = &options.hang {
        crash::inject::hang_after_boot(hang);
        // The run ends in the crash path (the lockup detector or the NMI
        // button), not in `done`.
        cpu::idle::idle();
    }
    console::report::line(|o| o.field("done").bool(true));
    log::info!("boot self-report complete");
    console::finish::success_stop()
}

/// What the guest phase did.
struct VirtOutcome {
    /// The backend's name in the report ("none" when no guest ran).
    backend: &'static str,
    /// The backend that ran the guests.
    selected: Option<Selected>,
    /// Why no guest ran.
    error: Option<Unavailable>,
    /// Guest modules that did not run because the backend cannot run
    /// platform guests (or there is none); each was reported refused.
    modules_not_run: usize,
    run: virt::sched::RunSummary,
}

/// Enables the chosen backend on every core and runs the guests: the
/// guest modules until they all stopped, or the in-tree guest for a while
/// when there are none (or the backend cannot run them). Without a
/// backend (a CPU with neither VMX nor SVM) this reports why and the
/// hypervisor carries on.
fn run_guests(
    options: &cmdline::Options,
    selected: Result<Selected, Unavailable>,
    boot: &'static BootInfo,
) -> VirtOutcome {
    match selected {
        Ok(Selected::Vmx) => run_with::<Vmx>(
            options,
            boot,
            Selected::Vmx,
            Unavailable::Vmx(virt::vmx::VmxError::VmxonFailed),
        ),
        Ok(Selected::Svm) => run_with::<Svm>(
            options,
            boot,
            Selected::Svm,
            Unavailable::Svm(virt::svm::SvmError::EnableFailed),
        ),
        Err(error) => {
            log::warn!("virt: {error}; no guests will run");
            // The crash path's VMXOFF must survive a #UD; with no VMX, VMXOFF
            // is exactly that case: check that the fix-up catches it.
            let outcome = arch::fixup::vmxoff();
            log::info!("vmx: VMXOFF outside VMX operation: {outcome:?} (tolerated)");
            VirtOutcome {
                backend: "none",
                selected: None,
                error: Some(error),
                modules_not_run: refuse_guest_modules(boot, format_args!("no backend: {error}")),
                run: virt::sched::RunSummary::default(),
            }
        }
    }
}

/// [`run_guests`] with backend `B`; `none_enabled` is the reason when no
/// CPU could enable it.
fn run_with<B: Backend>(
    options: &cmdline::Options,
    boot: &'static BootInfo,
    selected: Selected,
    none_enabled: Unavailable,
) -> VirtOutcome {
    ipi::call_on_all(virt::enable_here::<B>, 0);
    let enabled = virt::enabled_cpus();
    log::info!(
        "{}: enabled on {enabled} of {} CPUs",
        B::NAME,
        smp::cpus().len()
    );
    if enabled == 0 {
        return VirtOutcome {
            backend: "none",
            selected: None,
            error: Some(none_enabled),
            modules_not_run: refuse_guest_modules(boot, format_args!("no backend: {none_enabled}")),
            run: virt::sched::RunSummary::default(),
        };
    }
    let (guests, modules_not_run) = plan_guests::<B>(boot, options);
    let platform = matches!(guests, virt::sched::Guests::Platform { .. });
    let settings = virt::sched::Settings {
        vcpus: options.vcpus as usize,
        run_ms: options.guest_run_ms,
        slice_us: options.slice_us,
        knobs: virt::vcpu::Knobs {
            misbehaving: options.guest_misbehave,
            crash_caller: options.guest_crash_call,
        },
        crash_hypercall_allowed: options.crash_hypercall,
        // Platform guests run until they stop: a crash due while they run
        // fires in the run, and must not be held for the boot report.
        keep_running: !platform && crash_after_boot_report(options),
    };
    let run = virt::sched::run_at_boot::<B>(&settings, guests);
    log::info!(
        "{}: {} vCPUs, {} VM exits, {} migrations, {} stopped",
        B::NAME,
        run.vcpus,
        run.exits,
        run.migrations,
        run.stopped
    );
    VirtOutcome {
        backend: B::NAME,
        selected: Some(selected),
        error: None,
        modules_not_run,
        run,
    }
}

/// The guests backend `B` runs: the guest modules, each on its virtual
/// platform, when there are any and `B` has the glue for them; else the
/// in-tree guest. Also how many guest modules do not run (each reported
/// refused with the reason, never dropped in silence).
fn plan_guests<B: Backend>(
    boot: &'static BootInfo,
    options: &cmdline::Options,
) -> (virt::sched::Guests, usize) {
    let modules = virt::guest::guest_modules(boot.modules());
    if modules == 0 {
        return (virt::sched::Guests::TestGuest, 0);
    }
    let Some(ops) = B::PLATFORM else {
        log::warn!(
            "{}: this backend has no platform glue; guest modules not run: {modules}; \
             the in-tree guest runs instead",
            B::NAME
        );
        let refused = refuse_guest_modules(
            boot,
            format_args!("the {} backend has no platform glue", B::NAME),
        );
        return (virt::sched::Guests::TestGuest, refused);
    };
    let created = (ops.create_guests)(boot, options);
    log::info!(
        "guests: {} of {} guest modules created, {} vCPUs",
        created.guests,
        created.modules,
        created.vcpus
    );
    let guests = virt::sched::Guests::Platform {
        vcpus: created.vcpus,
        ops,
    };
    (guests, 0)
}

/// Reports every guest module refused, for `why`; returns how many.
fn refuse_guest_modules(boot: &'static BootInfo, why: core::fmt::Arguments<'_>) -> usize {
    virt::guest::refuse_all(boot.modules(), "backend_unsupported", why)
}

/// Whether the guests go on running after the boot run, until the
/// injected crash comes: for a time-based crash due after the run (which
/// then waits for the boot report), and for a point of the loaded-context
/// protocol that the run did not reach (the run's end must not cut it
/// short).
fn crash_after_boot_report(options: &cmdline::Options) -> bool {
    let Some(spec) = options.crash.as_ref() else {
        return false;
    };
    let time_after_run = spec.point.is_none_or(|point| point.disturbs_the_crash())
        && spec.after_ms >= options.guest_run_ms;
    if time_after_run {
        crash::inject::hold();
    }
    time_after_run || spec.point.is_some_and(|point| point.needs_vmx())
}

/// How long the boot report may take to go out before the crash. The
/// CPU draining the log ring may be one running guests: at 512 CPUs under
/// QEMU TCG on 2 host cores, its share of the host wrote the 9 KiB `cpus`
/// line at about 100 bytes a second (a 10 s limit cut it, and once a 90 s
/// one did).
const FLUSH_BEFORE_CRASH_US: u64 = 300_000_000;

/// How long guests keep running after the boot report for a crash at a
/// point of the loaded-context protocol that has not fired yet.
const POINT_WAIT_US: u64 = 2_000_000;

/// After the boot report, with an injected crash to come: this CPU runs
/// guests again (the others never stopped) until it does. A time-based
/// crash gets long slices, each core keeping to its own vCPUs, so that
/// its NMIs find CPUs in guest mode; a point of the list protocol gets
/// the boot run's short slices and migrations, which make its stores.
fn resume_guests_until_crash(virt: &VirtOutcome, options: &cmdline::Options) {
    // The crash stops the ring's drain where it is: the boot report must
    // be out first (a crash already due fires at once, and with 512 CPUs
    // the `cpus` line was seen cut by it).
    let deadline = time::now_us().saturating_add(FLUSH_BEFORE_CRASH_US);
    while !console::drain_all() {
        if time::now_us() >= deadline {
            log::warn!("the boot report was not all out after {FLUSH_BEFORE_CRASH_US} us");
            break;
        }
        core::hint::spin_loop();
    }
    crash::inject::release();
    if !virt::sched::running() || crash::inject::fired() || !crash::inject::clock_started() {
        return;
    }
    let point = crash::inject::point().is_some_and(|point| point.needs_vmx());
    let (limit_us, slice_us, affinity) = if point {
        let limit = crash::inject::until_due_us().saturating_add(POINT_WAIT_US);
        (limit, options.slice_us, false)
    } else {
        let limit = crash::inject::until_due_us().saturating_add(1_000_000);
        (limit, limit, true)
    };
    match virt.selected {
        Some(Selected::Vmx) => {
            virt::sched::run_until_crash::<Vmx>(limit_us, slice_us, affinity);
        }
        Some(Selected::Svm) => {
            virt::sched::run_until_crash::<Svm>(limit_us, slice_us, affinity);
        }
        None => {}
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crash::on_panic(info)
}

/// Reports what each CPU costs in memory (issue 14): what the bring-up
/// allocated per AP (stacks with their guard pages, GDT/TSS, local half,
/// page tables split for the guards), measured on the frame allocator,
/// and the image's static data, which holds every array sized for
/// `MAX_CPUS` possible CPUs whatever the machine has.
fn report_memory_per_cpu() {
    let (ap_bytes, aps) = smp::ap_memory();
    let page = 4096;
    let stack_pages = mm::MAIN_STACK_PAGES
        + mm::CRASH_STACK_PAGES
        + 3 * mm::INTERRUPT_STACK_PAGES
        // One guard page below each of the five stacks.
        + 5;
    let per_ap = ap_bytes.checked_div(aps);
    log::info!(
        "memory: {} KiB per AP ({aps} APs, {} KiB); image static data {} KiB for up to {} CPUs",
        per_ap.unwrap_or(0) / 1024,
        ap_bytes / 1024,
        mm::image_static_bytes() / 1024,
        smp_boot::madt::MAX_CPUS
    );
    console::report::line(|o| {
        o.field("memory_per_cpu").object(|o| {
            o.field("aps").u64(aps)?;
            o.field("ap_bytes").u64(ap_bytes)?;
            o.field("per_ap_bytes")
                .option(per_ap, |value, bytes| value.u64(bytes))?;
            o.field("stack_bytes").u64(stack_pages * page)?;
            o.field("shared_half_bytes")
                .u64(core::mem::size_of::<cpu::percpu::SharedCpu>() as u64)?;
            o.field("image_static_bytes")
                .u64(mm::image_static_bytes())?;
            o.field("max_cpus").u64(smp_boot::madt::MAX_CPUS as u64)
        })
    });
}
