//! `cargo xtask bench ...`: the benchmarks' arguments and what they run.

use super::*;

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Bring-up time of hv against Linux's on the same QEMU machine.
    Bringup(BenchBringupArgs),
    /// Crash shootdown latency and per-CPU NMI latency in QEMU.
    Shootdown(BenchShootdownArgs),
    /// The way from a panic to the capture kernel's first instruction,
    /// step by step (TSC stamps), in QEMU with hv's capture mode.
    Crash(BenchCrashArgs),
    /// hv's TSC calibration on a busy host: N boots with spinning threads
    /// beside QEMU, each boot's rate against the host's (within 2%).
    Tsc(BenchTscArgs),
}

/// Runs one benchmark.
pub(super) fn run(bench: Bench) -> Result<ExitCode> {
    match bench {
        Bench::Bringup(args) => bringup(args),
        Bench::Shootdown(args) => shootdown(args),
        Bench::Crash(args) => crash(args),
        Bench::Tsc(args) => tsc(args),
    }
}

#[derive(Debug, Args)]
pub struct BenchBringupArgs {
    /// Number of virtual CPUs of both machines; a comma-separated list
    /// (`64,128,256,512`) benches each size in turn and ends with a table
    /// by size. Above 255 both run on the x2APIC QEMU.
    #[arg(long, default_value = "64", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(2..))]
    pub(crate) smp: Vec<u32>,
    /// Run on a QEMU whose TCG offers x2APIC at every size (see qemu-smp
    /// --x2apic).
    #[arg(long)]
    pub(crate) x2apic: bool,
    /// Both kernels' CPU model under TCG instead of `max`, e.g. `max,-svm`
    /// (hv then runs no guests).
    #[arg(long, value_name = "MODEL")]
    pub(crate) tcg_cpu: Option<String>,
    /// Give Linux this many seconds to bring its CPUs up; past it the
    /// table says it did not finish [default: 600].
    #[arg(long, value_name = "SECS")]
    pub(crate) linux_timeout: Option<u64>,
    /// Runs of each kernel (they alternate).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) runs: u32,
    /// Guest memory in MiB of both machines.
    #[arg(long, value_name = "MiB", default_value_t = 512)]
    pub(crate) memory: u32,
    /// Boot this Linux bzImage instead of fetching Debian's.
    #[arg(long, value_name = "FILE")]
    pub(crate) linux: Option<PathBuf>,
    /// Draw each AP's bring-up time in hv, and both kernels' whole
    /// bring-up, as SVG into this file.
    #[arg(long, value_name = "FILE.svg")]
    pub(crate) plot: Option<PathBuf>,
    /// Extra words for Linux's command line (e.g. `lpj=...`).
    #[arg(long, value_name = "WORDS", allow_hyphen_values = true)]
    pub(crate) linux_append: Option<String>,
    /// Write the samples and the ratio (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// Boot this hv ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    pub(crate) elf: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchShootdownArgs {
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..))]
    pub(crate) smp: u32,
    /// Number of crash runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) runs: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 512)]
    pub(crate) memory: u32,
    /// The CPU index that panics in every run [default: a random one per
    /// run].
    #[arg(long, value_name = "N")]
    pub(crate) cpu: Option<u32>,
    /// Seed for the random CPUs and times [default: a fresh one, printed].
    #[arg(long, value_name = "N")]
    pub(crate) seed: Option<u64>,
    /// Draw each CPU's NMI latency and check-in time, and the whole
    /// shootdown, as SVG into this file.
    #[arg(long, value_name = "FILE.svg")]
    pub(crate) plot: Option<PathBuf>,
    /// Write the samples and their spreads (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// Boot this hv ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    pub(crate) elf: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchCrashArgs {
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) smp: u32,
    /// Number of crash runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) runs: u32,
    /// The CPU index that panics in every run [default: a random one per
    /// run].
    #[arg(long, value_name = "N")]
    pub(crate) cpu: Option<u32>,
    /// Seed for the random CPUs and times [default: a fresh one, printed].
    #[arg(long, value_name = "N")]
    pub(crate) seed: Option<u64>,
    /// Leave out the reference: Linux's crash to purgatory on the same
    /// QEMU machine (Debian's kernel and kexec-tools, fetched with apt).
    #[arg(long)]
    pub(crate) no_linux: bool,
    /// Write the samples and their spreads (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// Boot this hv ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    pub(crate) elf: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchTscArgs {
    /// Number of boots.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) runs: u32,
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) smp: u32,
    /// Spinning threads beside QEMU [default: one per host CPU].
    #[arg(long, value_name = "N")]
    pub(crate) busy: Option<usize>,
    /// Write the boots and the host's rate (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// Boot this hv ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    pub(crate) elf: Option<PathBuf>,
}

/// `bench bringup`.
pub(super) fn bringup(args: BenchBringupArgs) -> Result<ExitCode> {
    let elf = match &args.elf {
        Some(path) => path.clone(),
        None => kernel::build(None)?,
    };
    let mut results = Vec::new();
    for &smp in &args.smp {
        let mut options = BenchOptions::new(elf.clone());
        options.smp = smp;
        options.runs = args.runs;
        options.memory_mib = args.memory;
        options.linux = args.linux.clone();
        options.x2apic = args.x2apic;
        options.tcg_cpu = args.tcg_cpu.clone();
        // Many vCPUs under TCG: hv's run takes longer too.
        options.hv_timeout = options.hv_timeout.max(Duration::from_secs(u64::from(smp)));
        if let Some(secs) = args.linux_timeout {
            options.linux_timeout = Duration::from_secs(secs);
        }
        options.linux_append = cmdline::split_words(args.linux_append.as_deref().unwrap_or(""));
        let result = crate::bench::bench_bringup(&options)?;
        println!("{}", result.table());
        results.push(result);
    }
    if results.len() > 1 {
        println!("{}", crate::bench::scale_table(&results));
    }
    if let Some(path) = &args.report {
        let value = match results.as_slice() {
            [one] => one.to_json(),
            many => serde_json::json!({
                "sizes": many.iter().map(crate::bench::BenchResult::to_json).collect::<Vec<_>>(),
            }),
        };
        write_json(path, &value)?;
    }
    if let Some(path) = &args.plot
        && let Some(result) = results.last()
    {
        crate::bench::plot::write_svg(&crate::bench::plot::bringup_figure(result), path)?;
        println!("plot written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench shootdown`.
pub(super) fn shootdown(args: BenchShootdownArgs) -> Result<ExitCode> {
    check_bench_cpu(args.cpu, args.smp)?;
    let elf = match &args.elf {
        Some(path) => path.clone(),
        None => kernel::build(None)?,
    };
    let mut options = crate::bench::shootdown::ShootdownOptions::new(elf);
    options.smp = args.smp;
    options.runs = args.runs;
    options.memory_mib = args.memory;
    options.cpu = args.cpu;
    options.seed = args.seed.unwrap_or_else(crash::fresh_seed);
    let result = crate::bench::shootdown::bench_shootdown(&options)?;
    println!("{}", result.table());
    if let Some(path) = &args.report {
        write_json(path, &result.to_json())?;
    }
    if let Some(path) = &args.plot {
        crate::bench::plot::write_svg(&crate::bench::plot::shootdown_figure(&result), path)?;
        println!("plot written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench crash`.
pub(super) fn crash(args: BenchCrashArgs) -> Result<ExitCode> {
    check_bench_cpu(args.cpu, args.smp)?;
    let elf = match &args.elf {
        Some(path) => path.clone(),
        None => kernel::build(None)?,
    };
    let (_, base) = capture::parse_crashkernel(capture::HV_CRASHKERNEL)?;
    let image = kernel::build_capture(base.expect("the default hv reservation has a base"))?;
    let mut options = crate::bench::crash::CrashBenchOptions::new(elf, image);
    options.crashes.smp = args.smp;
    options.crashes.runs = args.runs;
    options.crashes.cpu = args.cpu;
    options.crashes.seed = args.seed.unwrap_or_else(crash::fresh_seed);
    options.linux = !args.no_linux;
    let result = crate::bench::crash::bench_crash(&options)?;
    println!("{}", result.table());
    if let Some(path) = &args.report {
        write_json(path, &result.to_json())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench tsc`.
pub(super) fn tsc(args: BenchTscArgs) -> Result<ExitCode> {
    let elf = match &args.elf {
        Some(path) => path.clone(),
        None => kernel::build(None)?,
    };
    let mut options = crate::bench::tsc::TscOptions::new(elf);
    options.runs = args.runs;
    options.smp = args.smp;
    if let Some(busy) = args.busy {
        options.busy_threads = busy;
    }
    let result = crate::bench::tsc::bench_tsc(&options)?;
    print!("{}", result.table());
    if let Some(path) = &args.report {
        write_json(path, &result.to_json())?;
    }
    Ok(if result.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A benchmark's `--cpu` must name a CPU of the machine.
fn check_bench_cpu(cpu: Option<u32>, smp: u32) -> Result<()> {
    if let Some(cpu) = cpu
        && cpu >= smp
    {
        anyhow::bail!("--cpu {cpu}: the machine has {smp} CPUs (0 to {})", smp - 1);
    }
    Ok(())
}
