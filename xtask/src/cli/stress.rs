//! `cargo xtask stress`: its arguments and what it runs.

use super::*;

#[derive(Debug, Args)]
pub struct StressArgs {
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) smp: u32,
    /// Number of runs.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) runs: u32,
    /// How hv is loaded.
    #[arg(long, value_enum, default_value_t = Boot::Direct)]
    pub(crate) boot: Boot,
    /// Guest memory in MiB [default: 512; from 129 CPUs on 512 and 4 a
    /// CPU (1536 at 256), so that hv's test guests still come two per
    /// core].
    #[arg(long, value_name = "MiB")]
    pub(crate) memory: Option<u32>,
    /// Go on after a failed run (default: stop at the first).
    #[arg(long)]
    pub(crate) keep_going: bool,
    /// `--report` writes the loop's result (every run, the table's
    /// numbers) as JSON; `--timeout` applies to each run.
    #[command(flatten)]
    pub(crate) run: RunArgs,
    /// `--crash` applies to every run (`random`: a new spec per run).
    #[command(flatten)]
    pub(crate) crash: CrashArgs,
    /// Capture every crash with hv's capture mode, or not [default: hv
    /// with --crash, none without]. Each run ends once the capture image
    /// entered and read the core header (see --whole-dump).
    #[arg(long, value_enum, value_name = "KERNEL")]
    pub(crate) capture: Option<CaptureFlag>,
    /// With a capture: wait for the whole dump in every run (20 to 50 s a
    /// run at -smp 64 under TCG) and check it, instead of ending at the
    /// capture image's entry.
    #[arg(long)]
    pub(crate) whole_dump: bool,
    /// Run on a QEMU whose TCG offers x2APIC (see qemu-smp --x2apic);
    /// implied above 255 CPUs.
    #[arg(long)]
    pub(crate) x2apic: bool,
}

/// Boots hv many times in a row.
impl StressArgs {
    /// The guest memory: `--memory`, or [`stress_memory_mib`].
    pub(crate) fn memory(&self) -> u32 {
        self.memory.unwrap_or_else(|| stress_memory_mib(self.smp))
    }
}

/// `stress`'s guest memory in MiB when `--memory` is not given: 512, and
/// from [`run::SCALED_WATCHDOG_FROM_CPUS`] on 512 and 4 a CPU. hv makes
/// two test-guest vCPUs per core as memory allows (about 2.1 MiB each):
/// at 256 CPUs 512 MiB held 166, one per core on 166 cores, and a core
/// never gives away its last vCPU, so after the first loads no context
/// was added or removed anywhere and none met another on a core: the list
/// points (`list_add3` and `list_remove1` need a core holding two) never
/// fired. With 1536 MiB, 512 vCPUs on 256 cores, moving.
fn stress_memory_mib(smp: u32) -> u32 {
    if smp >= run::SCALED_WATCHDOG_FROM_CPUS {
        512 + 4 * smp
    } else {
        512
    }
}

pub(super) fn run(args: StressArgs) -> Result<ExitCode> {
    tools::ensure(&run::qemu_needs(args.boot))?;
    let mut append = extra_words(&args.run)?;
    check_crash_conflicts(&args.crash, &append)?;
    append.extend(timeout_word(&args.crash));
    let capture = stress_capture(&args)?;
    let mut plan: Box<dyn crate::stress::RunPlan> = match args.crash.crash {
        Some(arg) => {
            let guests = accel::detect().guest_backend().runs_guests();
            if let CrashArg::Spec(spec) = arg {
                check_spec(&spec, args.smp, guests)?;
                spec.check_capture(capture.is_some())
                    .map_err(|error| anyhow::anyhow!("--crash: {error}"))?;
            }
            let guest_run_ms = Expectations::from_cmdline(args.smp, &append)
                .crash
                .guest_run_ms;
            let seed = args.crash.seed.unwrap_or_else(crash::fresh_seed);
            Box::new(
                CrashPlan::new(arg, seed, args.smp, guests, guest_run_ms)
                    .with_capture(capture.is_some()),
            )
        }
        None => Box::new(Plain),
    };
    let mut base = QemuOptions::new(elf(&args.run)?);
    base.smp = args.smp;
    base.boot = args.boot;
    base.memory_mib = args.memory();
    base.append = append;
    base.x2apic = args.x2apic;
    if let Some(secs) = args.run.timeout {
        base.timeout = Duration::from_secs(secs);
    }
    let mut options = StressOptions::new(base, args.runs);
    options.keep_going = args.keep_going;
    options.capture = capture;
    let result = crate::stress::stress(&options, plan.as_mut())?;
    println!("{}", result.table());
    if let Some(path) = &args.run.report {
        write_json(path, &result.to_json())?;
    }
    Ok(if result.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The capture of a stress loop: hv's capture mode (built once here) for a
/// crash loop unless `--capture none`, ending each run at the capture
/// image's entry unless `--whole-dump`.
fn stress_capture(args: &StressArgs) -> Result<Option<CaptureOptions>> {
    let kernel = match (args.capture, args.crash.crash) {
        (Some(CaptureFlag::Linux), _) => anyhow::bail!(
            "stress captures with hv's capture mode (--capture hv): the Linux capture kernel \
             needs GRUB and takes seconds a run"
        ),
        (Some(CaptureFlag::Hv), _) | (None, Some(_)) => CaptureKernel::Hv,
        (Some(CaptureFlag::None), _) | (None, None) => {
            if args.whole_dump {
                anyhow::bail!("--whole-dump needs a capture (--capture hv)");
            }
            return Ok(None);
        }
    };
    if args.memory() < capture::HV_MEMORY_MIB {
        anyhow::bail!(
            "hv's capture mode needs its reservation ({}) inside RAM: --memory {} or more",
            capture::HV_CRASHKERNEL,
            capture::HV_MEMORY_MIB
        );
    }
    let mut options = CaptureOptions::new(kernel, args.smp);
    options.default_crash = None;
    options.until_entry = !args.whole_dump;
    let (_, base) = capture::parse_crashkernel(capture::HV_CRASHKERNEL)?;
    options.image = Some(kernel::build_capture(
        base.expect("the default hv reservation has a base"),
    )?);
    Ok(Some(options))
}
