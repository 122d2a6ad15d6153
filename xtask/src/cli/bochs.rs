//! `cargo xtask bochs`: its arguments and what it runs.

use super::*;

/// How long a Bochs run with a capture may take by default: the stream of
/// a 448 MiB dump takes 75 to 100 s on an ATA disk at 8 CPUs, and about
/// 4 minutes on port 0xE9 at 15 CPUs, on 2 shared cores.
const BOCHS_CAPTURE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Args)]
pub struct BochsArgs {
    /// Number of CPUs (1 to 15: Bochs 2.7 fails with more).
    #[arg(long, default_value_t = 4, value_parser = parse_bochs_cpus)]
    pub(crate) cpus: u32,
    #[command(flatten)]
    pub(crate) run: RunArgs,
    #[command(flatten)]
    pub(crate) crash: CrashArgs,
    #[command(flatten)]
    pub(crate) capture: CaptureArgs,
    /// Where hv's capture mode writes the dump stream: a disk on
    /// ata0-slave, or port 0xE9 (Bochs' stdout).
    #[arg(long, value_enum, default_value_t = BochsSink::Ata, requires = "capture")]
    pub(crate) capture_sink: BochsSink,
    /// A guest kernel (multiboot1) and its settings, as one string: the
    /// file, then the words of its `guest` module line (`smp=2 mem=64M
    /// name=N NR_CPUS=2 -- args`, see hv_core::guest_spec). Repeatable.
    #[arg(long, value_name = "'FILE [WORDS]'")]
    pub(crate) guest: Vec<String>,
    /// Machine memory in MiB [default: 256].
    #[arg(long, value_name = "MiB")]
    pub(crate) memory: Option<u32>,
}

/// The crash and capture of a run with `cpus` CPUs
/// ([`crash_and_capture`]); Bochs' CPU model always has VMX, so guests run.
pub(super) fn plan(args: &BochsArgs, cpus: u32) -> Result<(Plan, Vec<String>)> {
    crash_and_capture(
        false,
        false,
        &args.crash,
        &args.capture,
        &args.run,
        cpus,
        true,
        None,
    )
}

/// Boots hv in Bochs as the arguments say, and judges the run.
pub(super) fn run(args: BochsArgs) -> Result<ExitCode> {
    let (plan, append) = plan(&args, args.cpus)?;
    tools::ensure(&run::BOCHS_NEEDS)?;
    let mut options = BochsOptions::new(elf(&args.run)?);
    options.cpus = args.cpus;
    options.append = append;
    options.echo = true;
    if let Some(memory) = args.memory {
        options.memory_mib = memory;
    }
    for guest in &args.guest {
        options
            .modules
            .push(crate::kvm_unit_tests::guest_module(guest)?);
    }
    if let Some(secs) = args.run.timeout {
        options.timeout = Duration::from_secs(secs);
    }
    let mut outcome = match plan.capture {
        Some(kernel) => {
            if args.run.timeout.is_none() {
                options.timeout = BOCHS_CAPTURE_TIMEOUT;
            }
            let mut capture = args.capture.options(kernel, args.cpus);
            capture.bochs_sink = args.capture_sink;
            // The default reservation (256 to 320 MiB) must lie in RAM.
            options.memory_mib = options.memory_mib.max(capture::HV_MEMORY_MIB);
            capture::bochs(&options, &capture)?
        }
        None => run::bochs(&options)?,
    };
    outcome.add_notes(&plan.notes)?;
    conclude(&outcome, &args.run)
}
