//! The hypervisor image: boot, machine discovery, and (in later stages) SMP
//! bring-up, VMX and the crash path.
#![no_std]
#![no_main]

mod acpi;
mod arch;
mod bootinfo;
mod capture;
mod capture_mode;
mod console;
mod crashpath;
mod finish;
mod guest_image;
mod guests;
mod inject;
mod memory;
mod paging;
mod percpu;
mod purgatory;
mod report;
mod smp;
mod time;
mod traps;
mod vmx;

use hv_core::cmdline::{self, CrashPoint, Finish};

/// The boot information, kept for the hypervisor's lifetime.
static BOOT_INFO: spin::Once<bootinfo::BootInfo> = spin::Once::new();
/// The command-line options in force.
static OPTIONS: spin::Once<cmdline::Options> = spin::Once::new();

/// Called by the boot stub in long mode on the boot stack.
pub extern "C" fn hv_main(entered_by: u32, info: u32, magic: u32) -> ! {
    percpu::init_boot_cpu();
    console::init_serial();
    console::init_logging(log::LevelFilter::Info);
    arch::idt::load();
    arch::pic::remap_and_mask();
    println!("hv {}: booting", env!("CARGO_PKG_VERSION"));

    // SAFETY: the entry stub passes exactly what the loader gave it, and
    // nothing has touched loader memory yet.
    let boot = match unsafe { bootinfo::parse(entered_by, info, magic) } {
        Ok(boot) => BOOT_INFO.call_once(|| boot),
        Err(error) => {
            log::error!("cannot read the boot information: {error}");
            report::line(|o| {
                o.field("panic")
                    .object(|o| o.field("message").display(error))
            });
            finish::fail_stop();
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
    report::only_capture_lines(options.capture_mode.is_some());
    report::line(|o| {
        o.field("loader").object(|o| {
            o.field("protocol").str(boot.protocol.name())?;
            o.field("name")
                .option(boot.loader_name, |value, name| value.str(name))
        })
    });
    console::set_level(options.log);
    finish::exit_emulator_when_done(options.finish == Finish::Exit);
    crashpath::set_timeout_ms(options.crash_timeout_ms);
    if let Some(spec) = &options.crash {
        inject::configure(spec);
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
    report::line(|o| {
        o.field("cmdline").object(|o| {
            o.field("raw").str(boot.cmdline)?;
            o.field("errors").array(|a| {
                parsed
                    .errors()
                    .try_for_each(|error| a.item().display(error))
            })
        })
    });

    memory::init(boot, options.crashkernel);
    if options.capture_mode.is_some() {
        memory::switch_to_guarded_stacks(capture_main)
    }
    memory::switch_to_guarded_stacks(boot_cpu_main)
}

/// This image is a capture kernel: stream the crashed hypervisor's dump.
fn capture_main() -> ! {
    let options = OPTIONS
        .get()
        .expect("options are parsed before the stack switch");
    capture_mode::run(
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
    let topology = acpi::discover(boot);

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
    };
    let bringup = smp::bring_up(possible, &settings);
    capture::load_at_boot(boot, &options);
    let called = smp::call_on_all(|_| {}, 0);
    let nmis = smp::nmi_self_test();
    log::info!("IPIs: call-function ran on {called} CPUs; NMI answered by {nmis} others");

    if inject::point() == Some(CrashPoint::BeforeVmx) {
        trigger_crash_now();
    }
    let virt = run_guests(&options);

    let failed = || {
        smp::cpus()
            .iter()
            .filter(|cpu| cpu.slot.state() == smp_boot::bringup::CpuState::Failed)
    };
    report::line(|o| {
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
            o.field("call_function_cpus").u64(called as u64)?;
            o.field("nmi_cpus").u64(nmis as u64)
        })?;
        o.field("virt").object(|o| {
            o.field("backend")
                .str(if virt.error.is_none() { "vmx" } else { "none" })?;
            o.field("reason")
                .option(virt.error, |value, error| value.display(error))?;
            o.field("cpus_in_vmx")
                .u64(vmx::CPUS_IN_VMX.load(core::sync::atomic::Ordering::Relaxed))?;
            o.field("vcpus").u64(virt.run.vcpus as u64)?;
            o.field("vm_exits").u64(virt.run.exits)?;
            o.field("migrations").u64(virt.run.migrations)?;
            o.field("stopped").u64(virt.run.stopped as u64)?;
            o.field("exits_per_cpu").u64_array(
                smp::cpus()
                    .iter()
                    .map(|cpu| cpu.vm_exits.load(core::sync::atomic::Ordering::Relaxed)),
            )
        })
    });
    if inject::configured() {
        inject_crash_after_boot();
    }
    report::line(|o| o.field("done").bool(true));
    log::info!("boot self-report complete");
    finish::success_stop()
}

/// Has the knob's target CPU panic now (through an IPI if it is another).
fn trigger_crash_now() {
    let Some(target) = inject::target_cpu() else {
        return;
    };
    if target == percpu::current_cpu_index() as usize {
        inject::crash_here(0);
    }
    if !smp::call_on(target, inject::crash_here, 0) {
        log::error!("crash knob: CPU {target} is not online; no crash injected");
    }
}

/// The crash knob's cases the guest run did not already fire.
fn inject_crash_after_boot() {
    if inject::fired() {
        return;
    }
    let point = inject::point();
    if let Some(
        point @ (CrashPoint::ListAdd(_)
        | CrashPoint::ListRemove(_)
        | CrashPoint::VmclearUnlink
        | CrashPoint::VcpuLoad),
    ) = point
    {
        // Points of the loaded-VMCS list protocol exist only while guests
        // run; the run is over (or never started: no VMX) and it was not hit.
        log::error!(
            "crash knob: injection point {point:?} was never reached (it needs a VMX guest run)"
        );
        report::line(|o| {
            o.field("crash_injection")
                .object(|o| o.field("fired").bool(false))
        });
        return;
    }
    if !inject::clock_started() {
        inject::start_clock();
    }
    while !inject::due() {
        core::hint::spin_loop();
    }
    let Some(target) = inject::target_cpu() else {
        return;
    };
    let me = percpu::current_cpu_index() as usize;
    let cpus = smp::cpus().len();
    match point {
        Some(CrashPoint::NmiBlocked) => {
            // The target spins inside an NMI handler, so it cannot take the
            // shootdown NMI; another CPU panics and must name it.
            let panicker = if target == 0 { 1 % cpus } else { 0 };
            crashpath::SPIN_IN_NMI.store(target as u32, core::sync::atomic::Ordering::Relaxed);
            if target == me {
                // This CPU is about to block itself: have the panicker wait
                // until it surely has, then panic.
                smp::send_call(panicker, inject::crash_after_delay, 0);
            }
            if let Some(cpu) = smp::cpus().get(target) {
                arch::apic::send_nmi(cpu.slot.apic_id());
            }
            time::delay_us(10_000);
            if panicker == me {
                inject::crash_here(0);
            }
            smp::call_on(panicker, inject::crash_here, 0);
        }
        Some(CrashPoint::DoublePanic) => {
            let other = (target + 1) % cpus;
            for cpu in [target, other] {
                if cpu != me {
                    smp::send_call(cpu, inject::crash_here, 0);
                }
            }
            if [target, other].contains(&me) {
                inject::crash_here(0);
            }
            time::delay_us(1_000_000);
        }
        _ => trigger_crash_now(),
    }
}

/// What the VMX phase did.
struct VirtOutcome {
    error: Option<vmx::VmxError>,
    run: guests::RunSummary,
}

/// Enables VMX on every core and runs the guests for a while. Without VMX
/// (QEMU TCG) this reports why and the hypervisor carries on.
fn run_guests(options: &cmdline::Options) -> VirtOutcome {
    if let Err(error) = vmx::capabilities() {
        log::warn!("vmx: {error}; no guests will run");
        // The crash path's VMXOFF must survive a #UD; with no VMX, VMXOFF
        // is exactly that case: check that the fix-up catches it.
        let outcome = vmx::tolerant::vmxoff();
        log::info!("vmx: VMXOFF outside VMX operation: {outcome:?} (tolerated)");
        return VirtOutcome {
            error: Some(error),
            run: guests::RunSummary::default(),
        };
    }
    smp::call_on_all(guests::enable_vmx_here, 0);
    let in_vmx = vmx::CPUS_IN_VMX.load(core::sync::atomic::Ordering::Relaxed);
    log::info!(
        "vmx: {in_vmx} of {} CPUs in VMX root operation",
        smp::cpus().len()
    );
    if in_vmx == 0 {
        return VirtOutcome {
            error: Some(vmx::VmxError::VmxonFailed),
            run: guests::RunSummary::default(),
        };
    }
    let settings = guests::Settings {
        vcpus: options.vcpus as usize,
        run_ms: options.guest_run_ms,
        slice_us: options.slice_us,
        misbehaving_vcpu: options.guest_misbehave,
        crash_calling_vcpu: options.guest_crash_call,
        crash_hypercall_allowed: options.crash_hypercall,
    };
    let run = guests::run_at_boot(&settings);
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
    use core::fmt::Write;
    let regs = crashpath::current_regs();
    console::enter_emergency();
    let cpu = percpu::current_cpu_index();
    let _ = writeln!(
        console::EmergencyConsole,
        "\n*** hv: panic on cpu {cpu}: {info}"
    );
    report::emergency(|o| {
        o.field("panic").object(|o| {
            o.field("message").display(info.message())?;
            o.field("cpu").u64(u64::from(cpu))
        })
    });
    crashpath::crash(crashpath::Reason::Panic(info), &regs)
}
