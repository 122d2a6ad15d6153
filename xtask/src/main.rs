//! `cargo xtask`: build hv, boot it in QEMU or Bochs, run the test suite.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use xtask::run::{self, BochsOptions, Boot, QemuOptions, RunOutcome};
use xtask::{ci, cmdline, kernel, tools};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build the hypervisor, boot it in an emulator, run the tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build hv (release, x86_64-unknown-none) and print the ELF path.
    Build,
    /// Boot hv in QEMU, show its serial console and judge its report.
    QemuSmp(QemuArgs),
    /// Boot hv in Bochs from the GRUB ISO and judge its report.
    Bochs(BochsArgs),
    /// Run everything CI runs: host unit tests, then the emulator tests.
    Test(TestArgs),
}

/// Options every emulator run has.
#[derive(Debug, Args)]
struct RunArgs {
    /// Write the run report (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Extra hv command-line words, after `finish=exit`.
    #[arg(long, value_name = "WORDS", allow_hyphen_values = true)]
    append: Option<String>,
    /// Kill the emulator and fail after this many seconds [default: 60 for
    /// QEMU, 120 for Bochs].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Boot this ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    elf: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct QemuArgs {
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    smp: u32,
    /// How hv is loaded.
    #[arg(long, value_enum, default_value_t = Boot::Direct)]
    boot: Boot,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 512)]
    memory: u32,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Args)]
struct BochsArgs {
    /// Number of CPUs (1 to 15: Bochs 2.7 fails with more).
    #[arg(long, default_value_t = 4, value_parser = parse_bochs_cpus)]
    cpus: u32,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Args)]
struct TestArgs {
    /// Arguments for the integration tests' harness (a test name filter,
    /// `--nocapture`, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    harness_args: Vec<OsString>,
}

fn parse_bochs_cpus(text: &str) -> Result<u32, String> {
    let cpus: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a CPU count"))?;
    run::check_cpus(cpus).map_err(|error| error.to_string())
}

fn main() -> ExitCode {
    match run_task(Cli::parse().command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<ExitCode> {
    match task {
        Task::Build => {
            println!("{}", kernel::build(None)?.display());
            Ok(ExitCode::SUCCESS)
        }
        Task::QemuSmp(args) => {
            tools::ensure(&run::qemu_needs(args.boot))?;
            let append = extra_words(&args.run)?;
            let mut options = QemuOptions::new(elf(&args.run)?);
            options.smp = args.smp;
            options.boot = args.boot;
            options.memory_mib = args.memory;
            options.append = append;
            options.echo = true;
            if let Some(secs) = args.run.timeout {
                options.timeout = Duration::from_secs(secs);
            }
            conclude(&run::qemu(&options)?, &args.run)
        }
        Task::Bochs(args) => {
            tools::ensure(&run::BOCHS_NEEDS)?;
            let append = extra_words(&args.run)?;
            let mut options = BochsOptions::new(elf(&args.run)?);
            options.cpus = args.cpus;
            options.append = append;
            options.echo = true;
            if let Some(secs) = args.run.timeout {
                options.timeout = Duration::from_secs(secs);
            }
            conclude(&run::bochs(&options)?, &args.run)
        }
        Task::Test(args) => {
            ci::run_all(&args.harness_args)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The ELF to boot: `--elf`, or a fresh build of hv.
fn elf(args: &RunArgs) -> Result<PathBuf> {
    match &args.elf {
        Some(path) => Ok(path.clone()),
        None => kernel::build(None),
    }
}

/// Checks the user's words before anything is built, so a typo fails fast.
fn extra_words(args: &RunArgs) -> Result<Vec<String>> {
    let words = cmdline::split_words(args.append.as_deref().unwrap_or(""));
    cmdline::kernel_cmdline(&words)?;
    Ok(words)
}

/// Prints the summary, writes `--report` and turns the verdict into the
/// exit status.
fn conclude(outcome: &RunOutcome, args: &RunArgs) -> Result<ExitCode> {
    println!("\n{}", outcome.summary());
    if let Some(path) = &args.report {
        outcome.write_report(path)?;
        println!("report written to {}", path.display());
    }
    Ok(if outcome.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn qemu_smp_defaults() {
        let cli = Cli::try_parse_from(["cargo xtask", "qemu-smp"]).unwrap();
        let Task::QemuSmp(args) = cli.command else {
            panic!("not qemu-smp")
        };
        assert_eq!((args.smp, args.boot, args.memory), (4, Boot::Direct, 512));
        assert!(args.run.report.is_none() && args.run.timeout.is_none());
    }

    #[test]
    fn qemu_smp_takes_every_option() {
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "qemu-smp",
            "--smp",
            "2",
            "--boot",
            "grub-uefi",
            "--report",
            "r.json",
            "--append",
            "bogus_option=1 log=loud",
            "--timeout",
            "30",
            "--memory",
            "256",
        ])
        .unwrap();
        let Task::QemuSmp(args) = cli.command else {
            panic!("not qemu-smp")
        };
        assert_eq!((args.smp, args.boot, args.memory), (2, Boot::GrubUefi, 256));
        assert_eq!(args.run.append.as_deref(), Some("bogus_option=1 log=loud"));
        assert_eq!(args.run.timeout, Some(30));
    }

    #[test]
    fn bochs_refuses_sixteen_cpus_clearly() {
        let error = Cli::try_parse_from(["cargo xtask", "bochs", "--cpus", "16"]).unwrap_err();
        assert!(error.to_string().contains("at most 15"), "{error}");
        assert!(Cli::try_parse_from(["cargo xtask", "bochs", "--cpus", "15"]).is_ok());
    }

    #[test]
    fn test_passes_harness_arguments_through() {
        let cli = Cli::try_parse_from(["cargo xtask", "test", "boot", "--nocapture"]).unwrap();
        let Task::Test(args) = cli.command else {
            panic!("not test")
        };
        assert_eq!(args.harness_args, ["boot", "--nocapture"]);
    }
}
