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
use crate::virt::Backend;
use crate::virt::vmx::backend::Vmx;

entry_point!(crate::hv_main);

/// The boot information, kept for the hypervisor's lifetime.
static BOOT_INFO: spin::Once<BootInfo> = spin::Once::new();
/// The command-line options in force.
static OPTIONS: spin::Once<cmdline::Options> = spin::Once::new();

/// Called by the boot stub in long mode on the boot stack.
extern "C" fn hv_main(entered_by: u32, info: u32, magic: u32) -> ! {
    percpu::init_boot_cpu();
    console::init_serial();
    console::init_logging(log::LevelFilter::Info);
    register_trap_handlers();
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
    mm::init(boot.memory_map(), boot.keep_out(), options.crashkernel);
    let record_tables = |tables| percpu::current().set_tables(tables);
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
    arch::idt::register_exceptions(crash::exception::on_exception);
}

/// This image is a capture kernel: stream the crashed hypervisor's dump.
fn capture_main() -> ! {
    let options = OPTIONS
        .get()
        .expect("options are parsed before the stack switch");
    capture::mode::run(
        options.capture_mode.expect("capture mode was asked for"),
        options.capture_sink,
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
    let topology = boot::acpi::discover(boot);

    let tsc_khz = time::calibrate();
    match tsc_khz {
        Some(khz) => log::info!("TSC: {} MHz", khz / 1000),
        None => log::warn!("TSC: the PIT did not answer; assuming 1 GHz"),
    }
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
        before_check_in: crash::inject::at_bringup,
    };
    cpu::idle::set_work(virt::sched::join_run::<Vmx>);
    let bringup = smp::bring_up(possible, &settings);
    capture::load::load_at_boot(boot, &options);
    let called = ipi::call_on_all(|_| {}, 0);
    let nmis = ipi::nmi_self_test();
    log::info!("IPIs: call-function ran on {called} CPUs; NMI answered by {nmis} others");

    if crash::inject::point() == Some(CrashPoint::BeforeVmx) {
        crash::inject::trigger_now();
    }
    let virt = run_guests(&options, boot);

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
                .u64_array(smp::cpus().iter().map(|cpu| u64::from(cpu.slot.apic_id())))
        })?;
        o.field("bringup_us").u64(bringup.elapsed_us)?;
        o.field("smp").object(|o| {
            o.field("apic_mode").str(apic_mode)?;
            o.field("tsc_khz")
                .option(tsc_khz, |value, khz| value.u64(khz))?;
            o.field("call_function_cpus").u64(called as u64)?;
            o.field("nmi_cpus").u64(nmis as u64)
        })?;
        o.field("virt").object(|o| {
            o.field("backend").str(if virt.error.is_none() {
                Vmx::NAME
            } else {
                "none"
            })?;
            o.field("reason")
                .option(virt.error, |value, error| value.display(error))?;
            o.field("cpus_in_vmx")
                .u64(virt::vmx::CPUS_IN_VMX.load(Ordering::Relaxed))?;
            o.field("vcpus").u64(virt.run.vcpus as u64)?;
            o.field("vm_exits").u64(virt.run.exits)?;
            o.field("migrations").u64(virt.run.migrations)?;
            o.field("stopped").u64(virt.run.stopped as u64)?;
            o.field("platform_guests")
                .u64(virt.run.platform_guests as u64)?;
            o.field("kicks")
                .u64(virt::sched::KICKS.load(Ordering::Relaxed))?;
            o.field("exits_per_cpu").u64_array(
                (0..smp::cpus().len())
                    .map(|index| virt::cpu(index).vm_exits.load(Ordering::Relaxed)),
            )
        })
    });
    if crash::inject::configured() {
        crash::inject::fire_after_boot();
    }
    console::report::line(|o| o.field("done").bool(true));
    log::info!("boot self-report complete");
    console::finish::success_stop()
}

/// What the guest phase did.
struct VirtOutcome {
    error: Option<<Vmx as Backend>::Error>,
    run: virt::sched::RunSummary,
}

/// Enables the backend on every core and runs the guests: the guest
/// modules until they all stopped, or the in-tree guest for a while when
/// there are none. Without VMX (QEMU TCG) this reports why and the
/// hypervisor carries on.
fn run_guests(options: &cmdline::Options, boot: &'static BootInfo) -> VirtOutcome {
    if let Err(error) = Vmx::check() {
        log::warn!("vmx: {error}; no guests will run");
        // The crash path's VMXOFF must survive a #UD; with no VMX, VMXOFF
        // is exactly that case: check that the fix-up catches it.
        let outcome = arch::fixup::vmxoff();
        log::info!("vmx: VMXOFF outside VMX operation: {outcome:?} (tolerated)");
        return VirtOutcome {
            error: Some(error),
            run: virt::sched::RunSummary::default(),
        };
    }
    ipi::call_on_all(virt::enable_here::<Vmx>, 0);
    let in_vmx = virt::enabled_cpus();
    log::info!(
        "vmx: {in_vmx} of {} CPUs in VMX root operation",
        smp::cpus().len()
    );
    if in_vmx == 0 {
        return VirtOutcome {
            error: Some(virt::vmx::VmxError::VmxonFailed),
            run: virt::sched::RunSummary::default(),
        };
    }
    let settings = virt::sched::Settings {
        vcpus: options.vcpus as usize,
        run_ms: options.guest_run_ms,
        slice_us: options.slice_us,
        knobs: virt::vcpu::Knobs {
            misbehaving: options.guest_misbehave,
            crash_caller: options.guest_crash_call,
        },
        crash_hypercall_allowed: options.crash_hypercall,
    };
    let guests = if virt::guest::any_guest_module(boot.modules()) {
        let created = virt::guest::create_all::<Vmx>(boot.modules(), options);
        log::info!(
            "guests: {} of {} guest modules created, {} vCPUs",
            created.guests,
            created.modules,
            created.vcpus
        );
        virt::sched::Guests::Platform {
            vcpus: created.vcpus,
        }
    } else {
        virt::sched::Guests::TestGuest
    };
    let run = virt::sched::run_at_boot::<Vmx>(&settings, guests);
    log::info!(
        "vmx: {} vCPUs, {} VM exits, {} migrations, {} stopped",
        run.vcpus,
        run.exits,
        run.migrations,
        run.stopped
    );
    VirtOutcome { error: None, run }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crash::on_panic(info)
}
