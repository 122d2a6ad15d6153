//! The command line of `cargo xtask`: one module per command holds its
//! arguments (clap) and what it runs; [`run()`] dispatches. `main.rs` only
//! parses and calls it.

mod bench;
mod bochs;
mod dump;
mod kvm_unit_tests;
mod qemu_smp;
mod stress;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::accel;
use crate::bench::BenchOptions;
use crate::capture::{self, BochsSink, CaptureKernel, CaptureOptions};
use crate::crash::{self, CrashArg, CrashSpec, CrashSpecExt, Rng};
use crate::dump::{DumpInfo, Symbols};
use crate::plan::{self, CaptureFlag, CrashSource, Plan};
use crate::report::{self, Expectations};
use crate::run::{self, BochsOptions, Boot, QemuOptions, RunOutcome};
use crate::stress::{CrashPlan, Plain, StressOptions};
use crate::{ci, cmdline, kernel, tools};

use bench::Bench;
use bochs::BochsArgs;
use dump::DumpArgs;
use kvm_unit_tests::KvmUnitTestsArgs;
use qemu_smp::QemuArgs;
use stress::StressArgs;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build the hypervisor, boot it in an emulator, run the tests"
)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Task,
}

#[derive(Debug, Subcommand)]
pub enum Task {
    /// Build hv (release, x86_64-unknown-none) and print the ELF path.
    Build,
    /// Boot hv in QEMU and show the whole path: bring-up, guests where the
    /// CPU has VMX, a crash on an AP, the shootdown, the capture and the
    /// dump (`--no-crash`: boot and self-report only); judge its report.
    QemuSmp(QemuArgs),
    /// Boot hv in Bochs from the GRUB ISO and judge its report.
    Bochs(BochsArgs),
    /// Boot hv in QEMU many times in a row; table of CPUs online and
    /// bring-up times.
    Stress(StressArgs),
    /// Benchmarks (not tests: they fail only when they cannot measure).
    #[command(subcommand)]
    Bench(Bench),
    /// Run everything CI runs: lints, host unit tests, then the emulator
    /// tests.
    Test(TestArgs),
    /// The lints CI runs: rustfmt, clippy (host crates and hv) and
    /// rustdoc, warnings denied.
    Lint,
    /// Show what a crash dump holds: CPUs and their registers, crash
    /// reason, coordinator, stragglers, VMCLEAR ledger, memory ranges.
    Dump(DumpArgs),
    /// Run kvm-unit-tests' cfg entries as hv guests in Bochs (VMX) or
    /// QEMU TCG (SVM); table of QEMU TCG's result, hv's, the time
    /// (default: the backend's CI subset).
    KvmUnitTests(KvmUnitTestsArgs),
    /// Find or fetch the QEMU that runs x2APIC under TCG (more than 255
    /// CPUs, --x2apic): HV_QEMU_X2APIC, the distribution's if it has
    /// x2APIC, else QEMU 10 from bookworm-backports unpacked into
    /// build/qemu-x2apic (no root, nothing installed system-wide); print
    /// its version and what its -cpu max offers.
    QemuX2apic,
}

/// Options every emulator run has.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Write the run report (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// Extra hv command-line words, after `finish=exit`.
    #[arg(long, value_name = "WORDS", allow_hyphen_values = true)]
    pub(crate) append: Option<String>,
    /// Kill the emulator and fail after this many seconds [default: 60 for
    /// QEMU, 300 for QEMU with a capture, 120 for Bochs, 600 for Bochs with
    /// a capture].
    #[arg(long, value_name = "SECS")]
    pub(crate) timeout: Option<u64>,
    /// Boot this ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    pub(crate) elf: Option<PathBuf>,
}

/// Making hv crash (its `crash=` and `crash_timeout_ms=` knobs).
#[derive(Debug, Args)]
pub struct CrashArgs {
    /// Make hv crash: a `crash=` value, `cpu:N,after_ms:T[,point:NAME]`
    /// (passed to hv as it is), or `random` (a random CPU, time and
    /// injection point this machine can fire; the choice is printed). The
    /// run is then judged by hv's crash report instead of `done`.
    /// [qemu-smp's default: cpu:1,after_ms:200, an AP after the boot
    /// report; see --no-crash]
    #[arg(long, value_name = "SPEC|random", value_parser = parse_crash)]
    pub(crate) crash: Option<CrashArg>,
    /// How long hv's crash rendezvous waits for every CPU
    /// (`crash_timeout_ms=`) [hv's default: 1000].
    #[arg(long, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(0..=crash::MAX_TIMEOUT_MS))]
    pub(crate) crash_timeout_ms: Option<u64>,
    /// Seed for `--crash random` [default: a fresh one, printed].
    #[arg(long, value_name = "N", requires = "crash")]
    pub(crate) seed: Option<u64>,
}

/// Capturing the crash with a capture kernel (`xtask/CAPTURE.md`).
#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Capture the crash into a dump file with a capture kernel: hv's own
    /// capture mode (built from this repository), Debian's Linux with
    /// xtask's initramfs (fetched with apt), or none (a plain crash). A
    /// crash is injected unless one is asked for (qemu-smp:
    /// `crash=cpu:1,after_ms:200`; bochs: `crash=cpu:1,after_ms:50`)
    /// [qemu-smp's default: hv; bochs: none].
    #[arg(long, value_enum, value_name = "KERNEL")]
    pub(crate) capture: Option<CaptureFlag>,
    /// The reservation (`crashkernel=SIZE[@BASE]`) [default: 256M for
    /// linux, 64M@0x10000000 for hv, whose image is linked at the base].
    #[arg(long, value_name = "SIZE[@BASE]")]
    pub(crate) crashkernel: Option<String>,
    /// Use this file as the capture kernel instead of Debian's bzImage or
    /// the hv-capture build.
    #[arg(long, value_name = "FILE")]
    pub(crate) capture_kernel: Option<PathBuf>,
    /// Use this initramfs for the Linux capture kernel instead of xtask's.
    #[arg(long, value_name = "FILE")]
    pub(crate) capture_initrd: Option<PathBuf>,
    /// The Linux capture kernel's arguments (hv adds `nr_cpus=` its CPU
    /// count and `disable_cpu_apicid=` its boot CPU's unless given, then
    /// `elfcorehdr=` and `memmap=`) [default: console=ttyS0,115200
    /// reset_devices panic=-1 printk.time=1].
    #[arg(long, value_name = "WORDS", allow_hyphen_values = true)]
    pub(crate) capture_args: Option<String>,
    /// With --capture linux: filter /proc/vmcore with Debian's makedumpfile
    /// (dump level 1, zero pages left out) into an ELF dump (`vmcore`, for
    /// gdb and drgn) and a compressed kdump (`vmcore.kdump`) instead of
    /// copying it whole.
    #[arg(long)]
    pub(crate) makedumpfile: bool,
    /// Fail the run unless the capture kernel wakes every CPU that checked
    /// in with the crash's coordinator (hv's capture mode: INIT-SIPI-SIPI
    /// to each, which a CPU still in VMX root blocks; Linux: its dmesg).
    /// The summary's `wake` line shows the count either way.
    #[arg(long)]
    pub(crate) wake: bool,
}

impl CaptureArgs {
    /// The capture options given (which need a capture to mean anything).
    fn given(&self) -> Vec<&'static str> {
        [
            ("--crashkernel", self.crashkernel.is_some()),
            ("--capture-kernel", self.capture_kernel.is_some()),
            ("--capture-initrd", self.capture_initrd.is_some()),
            ("--capture-args", self.capture_args.is_some()),
            ("--makedumpfile", self.makedumpfile),
            ("--wake", self.wake),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }

    /// The capture of a run with `cpus` CPUs by `kernel`.
    fn options(&self, kernel: CaptureKernel, cpus: u32) -> CaptureOptions {
        let mut options = CaptureOptions::new(kernel, cpus);
        if let Some(crashkernel) = &self.crashkernel {
            options.crashkernel = Some(crashkernel.clone());
        }
        options.image = self.capture_kernel.clone();
        options.initrd = self.capture_initrd.clone();
        if let Some(args) = &self.capture_args {
            options.linux_args = args.clone();
        }
        options.makedumpfile = self.makedumpfile;
        options.wake_check = self.wake;
        options
    }
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Arguments for the integration tests' harness (a test name filter,
    /// `--nocapture`, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) harness_args: Vec<OsString>,
}

fn parse_crash(text: &str) -> Result<CrashArg, String> {
    CrashArg::parse(text)
}

fn parse_bochs_cpus(text: &str) -> Result<u32, String> {
    let cpus: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a CPU count"))?;
    run::check_cpus(cpus).map_err(|error| error.to_string())
}

/// Runs one command.
pub fn run(task: Task) -> Result<ExitCode> {
    match task {
        Task::Build => {
            println!("{}", kernel::build(None)?.display());
            Ok(ExitCode::SUCCESS)
        }
        Task::QemuX2apic => {
            let qemu = crate::qemu_program::x2apic_qemu()?;
            println!("{}", serde_json::to_string_pretty(&qemu.report())?);
            Ok(ExitCode::SUCCESS)
        }
        Task::QemuSmp(args) => qemu_smp::run(args),
        Task::Bochs(args) => bochs::run(args),
        Task::KvmUnitTests(args) => kvm_unit_tests::run(args),
        Task::Stress(args) => stress::run(args),
        Task::Bench(bench) => bench::run(bench),
        Task::Test(args) => {
            ci::run_all(&args.harness_args)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Lint => {
            ci::lints()?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Dump(args) => dump::run(args),
    }
}

/// The crash and capture of one `qemu-smp` or `bochs` run
/// ([`plan::resolve`]), and its hv words: the user's, the crash's (given,
/// drawn, or the default) and `crash_timeout_ms=`. Prints what the run
/// will do.
#[allow(clippy::too_many_arguments)]
fn crash_and_capture(
    whole_path_by_default: bool,
    no_crash: bool,
    crash: &CrashArgs,
    capture: &CaptureArgs,
    run: &RunArgs,
    cpus: u32,
    guests: bool,
    nmi_button: Option<u64>,
) -> Result<(Plan, Vec<String>)> {
    let mut words = extra_words(run)?;
    check_hang(&words, cpus)?;
    let given = capture.given();
    let plan = plan::resolve(&plan::Flags {
        whole_path_by_default,
        no_crash,
        crash: crash.crash.is_some(),
        capture: capture.capture,
        capture_options: &given,
        words: &words,
        nmi_button: nmi_button.is_some(),
    })
    .map_err(anyhow::Error::msg)?;
    words.extend(single_run_crash(
        crash,
        cpus,
        guests,
        plan.capture.is_some(),
        &words,
    )?);
    if plan.crash == CrashSource::Default {
        let spec = plan::default_crash(whole_path_by_default, cpus, &words);
        words.push(format!("crash={spec}"));
    }
    let plan = plan
        .settle(&words, crash.crash == Some(CrashArg::Random))
        .map_err(anyhow::Error::msg)?;
    println!("{}", plan.describe(&words, cpus, nmi_button));
    Ok((plan, words))
}

/// Refuses a `hang=` that hangs nothing (a CPU the machine does not have:
/// hv would only say so, and the run could never end).
fn check_hang(words: &[String], cpus: u32) -> Result<()> {
    let Some(value) = words.iter().rev().find_map(|w| w.strip_prefix("hang=")) else {
        return Ok(());
    };
    let hang = hv_abi::knobs::HangSpec::parse(value)
        .map_err(|error| anyhow::anyhow!("hang={value}: {error}"))?;
    if hang.cpu >= cpus {
        anyhow::bail!(
            "hang={value} names CPU index {}, but the machine has {cpus} CPUs (0 to {})",
            hang.cpu,
            cpus - 1
        );
    }
    Ok(())
}

/// The crash words of one run (`qemu-smp`, `bochs`): `crash=` with the
/// spec given or drawn (printed), and `crash_timeout_ms=`.
fn single_run_crash(
    args: &CrashArgs,
    cpus: u32,
    guests: bool,
    capture: bool,
    append: &[String],
) -> Result<Vec<String>> {
    check_crash_conflicts(args, append)?;
    let mut words = Vec::new();
    if let Some(arg) = args.crash {
        let spec = match arg {
            CrashArg::Spec(spec) => {
                check_spec(&spec, cpus, guests)?;
                if let Err(note) = spec.check_capture(capture) {
                    println!("note: {note}; the run fails: the point never fires");
                }
                spec
            }
            CrashArg::Random => {
                let seed = args.seed.unwrap_or_else(crash::fresh_seed);
                let guest_run_ms = Expectations::from_cmdline(cpus, append).crash.guest_run_ms;
                let spec =
                    CrashSpec::random(&mut Rng::new(seed), cpus, guests, capture, guest_run_ms);
                println!("crash: {} (random, seed {seed})", spec.word());
                spec
            }
        };
        words.push(spec.word());
    }
    words.extend(timeout_word(args));
    Ok(words)
}

/// `crash_timeout_ms=` when `--crash-timeout-ms` is given.
fn timeout_word(args: &CrashArgs) -> Option<String> {
    args.crash_timeout_ms
        .map(|ms| format!("crash_timeout_ms={ms}"))
}

/// Refuses a spec that cannot crash this machine (a CPU it does not have,
/// a list store that does not exist, ...); a point that needs guests on a
/// machine without it only gets a note: hv then reports that it never
/// fired, and the run fails as it should.
fn check_spec(spec: &CrashSpec, cpus: u32, guests: bool) -> Result<()> {
    spec.check(cpus, true)
        .map_err(|error| anyhow::anyhow!("--crash: {error}"))?;
    if let Err(note) = spec.check(cpus, guests) {
        println!("note: {note}; hv will report that it never fired");
    }
    Ok(())
}

/// `--crash` and a `crash=` word in `--append` (or both timeouts) would
/// contradict each other: one of them must go.
fn check_crash_conflicts(args: &CrashArgs, append: &[String]) -> Result<()> {
    let has = |key: &str| {
        append
            .iter()
            .any(|word| word.starts_with(&format!("{key}=")))
    };
    if args.crash.is_some() && has("crash") {
        anyhow::bail!("--crash and a `crash=` word in --append: give only one");
    }
    if args.crash_timeout_ms.is_some() && has("crash_timeout_ms") {
        anyhow::bail!(
            "--crash-timeout-ms and a `crash_timeout_ms=` word in --append: give only one"
        );
    }
    Ok(())
}

/// Writes `value` as pretty JSON to `path` and says so.
fn write_json(path: &std::path::Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    std::fs::write(path, text)
        .map_err(|error| anyhow::anyhow!("writing {}: {error}", path.display()))?;
    println!("report written to {}", path.display());
    Ok(())
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
    let cwd = std::env::current_dir().ok();
    print!("\n{}", report::summary_in(&outcome.report, cwd.as_deref()));
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
    use super::qemu_smp::QEMU_CAPTURE_TIMEOUT;
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn qemu(argv: &[&str]) -> QemuArgs {
        let mut full = vec!["cargo xtask", "qemu-smp"];
        full.extend(argv);
        match Cli::try_parse_from(full).unwrap().command {
            Task::QemuSmp(args) => args,
            other => panic!("not qemu-smp: {other:?}"),
        }
    }

    /// The crash and capture of a `qemu-smp` run on a machine without VMX.
    fn qemu_plan(args: &QemuArgs) -> Result<(Plan, Vec<String>)> {
        qemu_smp::plan(args, false)
    }

    /// The crash and capture of a `bochs` run with `cpus` CPUs.
    fn bochs_plan(args: &BochsArgs, cpus: u32) -> Result<(Plan, Vec<String>)> {
        bochs::plan(args, cpus)
    }

    #[test]
    fn qemu_smp_defaults_to_the_whole_path() {
        let args = qemu(&[]);
        assert_eq!((args.smp, args.boot()), (4, Boot::Direct));
        assert!(args.run.report.is_none() && args.run.timeout.is_none());
        let (plan, words) = qemu_plan(&args).unwrap();
        assert_eq!(
            (plan.crash, plan.capture),
            (CrashSource::Default, Some(CaptureKernel::Hv))
        );
        assert_eq!(words, ["crash=cpu:1,after_ms:200"]);
        assert!(plan.notes.is_empty());
        assert_eq!(args.memory(plan.capture), 512);
        assert_eq!(args.timeout(true), Some(QEMU_CAPTURE_TIMEOUT));
        let capture = args.capture.options(CaptureKernel::Hv, args.smp);
        assert_eq!(capture.crashkernel(), "64M@0x10000000");
        assert!(capture.image.is_none());

        // One CPU: the boot CPU crashes.
        let (_, words) = qemu_plan(&qemu(&["--smp", "1"])).unwrap();
        assert_eq!(words, ["crash=cpu:0,after_ms:200"]);
    }

    #[test]
    fn no_crash_is_the_old_boot_only_run() {
        let args = qemu(&["--no-crash", "--append", "log=debug"]);
        let (plan, words) = qemu_plan(&args).unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::None, None));
        assert_eq!(words, ["log=debug"]);
        assert_eq!(
            (args.boot(), args.memory(plan.capture), args.timeout(false)),
            (Boot::Direct, 512, None)
        );
        assert!(qemu_plan(&qemu(&["--no-crash", "--capture", "none"])).is_ok());
        for conflict in [
            &["--no-crash", "--crash", "cpu:1,after_ms:5"][..],
            &["--no-crash", "--crash-timeout-ms", "5"],
        ] {
            let mut argv = vec!["cargo xtask", "qemu-smp"];
            argv.extend(conflict);
            assert!(Cli::try_parse_from(&argv).is_err(), "{conflict:?}");
        }
        let error = qemu_plan(&qemu(&["--no-crash", "--capture", "hv"])).unwrap_err();
        assert!(error.to_string().contains("drop --capture hv"), "{error}");
        let error = qemu_plan(&qemu(&["--no-crash", "--append", "crash=cpu:1"])).unwrap_err();
        assert!(error.to_string().contains("give only one"), "{error}");
    }

    #[test]
    fn qemu_smp_takes_every_option() {
        let args = qemu(&[
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
        ]);
        assert_eq!(
            (args.smp, args.boot(), args.memory(Some(CaptureKernel::Hv))),
            (2, Boot::GrubUefi, 256)
        );
        assert_eq!(args.run.append.as_deref(), Some("bogus_option=1 log=loud"));
        assert_eq!(args.timeout(true), Some(Duration::from_secs(30)));
        let (plan, words) = qemu_plan(&args).unwrap();
        assert_eq!(plan.capture, Some(CaptureKernel::Hv));
        assert_eq!(
            words,
            ["bogus_option=1", "log=loud", "crash=cpu:1,after_ms:200"]
        );
    }

    #[test]
    fn a_crash_asked_for_replaces_the_default_and_is_captured() {
        let args = qemu(&[
            "--smp",
            "64",
            "--crash",
            "cpu:42,after_ms:5,point:nmi_blocked",
            "--crash-timeout-ms",
            "500",
        ]);
        let (plan, words) = qemu_plan(&args).unwrap();
        assert_eq!(
            (plan.crash, plan.capture),
            (CrashSource::Asked, Some(CaptureKernel::Hv))
        );
        assert_eq!(
            words,
            [
                "crash=cpu:42,after_ms:5,point:nmi_blocked",
                "crash_timeout_ms=500"
            ]
        );
        let (plan, words) = qemu_plan(&qemu(&["--append", "crash=cpu:3,after_ms:1"])).unwrap();
        assert_eq!(plan.crash, CrashSource::Asked);
        assert_eq!(words, ["crash=cpu:3,after_ms:1"]);
        // --capture none: the crash alone, as `--crash` gave before.
        let (plan, _) =
            qemu_plan(&qemu(&["--crash", "cpu:2,after_ms:1", "--capture", "none"])).unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::Asked, None));
        let (plan, words) = qemu_plan(&qemu(&["--capture", "none"])).unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::Default, None));
        assert_eq!(words, ["crash=cpu:1,after_ms:200"]);
    }

    #[test]
    fn a_bringup_crash_falls_back_to_a_plain_crash_or_is_refused() {
        let (plan, _) = qemu_plan(&qemu(&["--crash", "cpu:2,point:bringup"])).unwrap();
        assert_eq!(plan.capture, None);
        assert_eq!(plan.notes.len(), 1, "{:?}", plan.notes);
        let error = qemu_plan(&qemu(&[
            "--crash",
            "cpu:2,point:bringup",
            "--capture",
            "hv",
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("--capture none"), "{error}");
    }

    #[test]
    fn capture_runs_change_the_defaults_and_take_their_options() {
        let args = qemu(&["--capture", "linux"]);
        let (plan, words) = qemu_plan(&args).unwrap();
        assert_eq!(plan.capture, Some(CaptureKernel::Linux));
        assert_eq!(words, ["crash=cpu:1,after_ms:200"]);
        assert_eq!(
            (args.boot(), args.memory(plan.capture)),
            (Boot::GrubBios, 1024)
        );
        let capture = args.capture.options(CaptureKernel::Linux, 8);
        assert_eq!(capture.kernel, CaptureKernel::Linux);
        assert_eq!(capture.crashkernel(), "256M");

        let args = qemu(&[
            "--smp",
            "64",
            "--capture",
            "hv",
            "--crashkernel",
            "32M@0x8000000",
            "--capture-kernel",
            "/x/garbage",
            "--boot",
            "grub-uefi",
            "--memory",
            "2048",
        ]);
        let (plan, _) = qemu_plan(&args).unwrap();
        assert_eq!(
            (args.boot(), args.memory(plan.capture)),
            (Boot::GrubUefi, 2048)
        );
        let capture = args.capture.options(CaptureKernel::Hv, 64);
        assert_eq!(capture.crashkernel(), "32M@0x8000000");
        assert_eq!(
            capture.image.as_deref(),
            Some(std::path::Path::new("/x/garbage"))
        );

        // Capture options apply to the default capture, and need one.
        let args = qemu(&["--crashkernel", "32M@0x8000000"]);
        assert_eq!(args.capture.given(), ["--crashkernel"]);
        assert_eq!(qemu_plan(&args).unwrap().0.capture, Some(CaptureKernel::Hv));
        let error =
            qemu_plan(&qemu(&["--capture", "none", "--capture-args", "quiet"])).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("--capture-args sets up a capture"),
            "{error}"
        );

        let cli = Cli::try_parse_from([
            "cargo xtask",
            "bochs",
            "--cpus",
            "8",
            "--capture",
            "hv",
            "--capture-sink",
            "debugcon",
        ])
        .unwrap();
        let Task::Bochs(args) = cli.command else {
            panic!("not bochs")
        };
        assert_eq!(args.capture_sink, BochsSink::Debugcon);
        let (plan, words) = bochs_plan(&args, 8).unwrap();
        assert_eq!(plan.capture, Some(CaptureKernel::Hv));
        assert_eq!(words, ["crash=cpu:1,after_ms:50"]);
    }

    #[test]
    fn bochs_still_boots_only_by_default() {
        let cli = Cli::try_parse_from(["cargo xtask", "bochs", "--cpus", "8"]).unwrap();
        let Task::Bochs(args) = cli.command else {
            panic!("not bochs")
        };
        let (plan, words) = bochs_plan(&args, 8).unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::None, None));
        assert!(words.is_empty());
        let cli = Cli::try_parse_from(["cargo xtask", "bochs", "--crashkernel", "64M"]).unwrap();
        let Task::Bochs(args) = cli.command else {
            panic!("not bochs")
        };
        let error = bochs_plan(&args, 8).unwrap_err();
        assert!(error.to_string().contains("add --capture hv"), "{error}");
    }

    #[test]
    fn dump_takes_a_file_and_options() {
        let cli =
            Cli::try_parse_from(["cargo xtask", "dump", "vmcore", "--elf", "hv", "-v"]).unwrap();
        let Task::Dump(args) = cli.command else {
            panic!("not dump")
        };
        assert_eq!(args.file, PathBuf::from("vmcore"));
        assert_eq!(args.elf, Some(PathBuf::from("hv")));
        assert!(args.verbose && !args.json);
        assert!(Cli::try_parse_from(["cargo xtask", "dump"]).is_err());
    }

    #[test]
    fn bochs_refuses_sixteen_cpus_clearly() {
        let error = Cli::try_parse_from(["cargo xtask", "bochs", "--cpus", "16"]).unwrap_err();
        assert!(error.to_string().contains("at most 15"), "{error}");
        assert!(Cli::try_parse_from(["cargo xtask", "bochs", "--cpus", "15"]).is_ok());
    }

    #[test]
    fn stress_defaults_and_options() {
        let cli = Cli::try_parse_from(["cargo xtask", "stress"]).unwrap();
        let Task::Stress(args) = cli.command else {
            panic!("not stress")
        };
        assert_eq!((args.smp, args.runs, args.boot), (64, 20, Boot::Direct));
        assert_eq!(args.memory(), 512);
        assert!(!args.keep_going);
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "stress",
            "--smp",
            "8",
            "--runs",
            "3",
            "--boot",
            "grub-bios",
            "--append",
            "sipi_delay_us=0",
            "--keep-going",
            "--report",
            "s.json",
        ])
        .unwrap();
        let Task::Stress(args) = cli.command else {
            panic!("not stress")
        };
        assert_eq!((args.smp, args.runs, args.boot), (8, 3, Boot::GrubBios));
        assert!(args.keep_going);
        assert_eq!(args.run.append.as_deref(), Some("sipi_delay_us=0"));
        assert!(Cli::try_parse_from(["cargo xtask", "stress", "--runs", "0"]).is_err());
    }

    #[test]
    fn big_stress_machines_get_memory_for_two_vcpus_a_core() {
        let memory = |words: &[&str]| {
            let cli = Cli::try_parse_from(["cargo xtask", "stress"].iter().chain(words)).unwrap();
            let Task::Stress(args) = cli.command else {
                panic!("not stress")
            };
            args.memory()
        };
        assert_eq!(memory(&["--smp", "128"]), 512);
        assert_eq!(memory(&["--smp", "129"]), 1028);
        assert_eq!(memory(&["--smp", "256"]), 1536);
        assert_eq!(memory(&["--smp", "512"]), 2560);
        // --memory wins, at any size.
        assert_eq!(memory(&["--smp", "256", "--memory", "640"]), 640);
        assert_eq!(memory(&["--smp", "8", "--memory", "640"]), 640);
    }

    #[test]
    fn bench_bringup_defaults_and_options() {
        let cli = Cli::try_parse_from(["cargo xtask", "bench", "bringup"]).unwrap();
        let Task::Bench(Bench::Bringup(args)) = cli.command else {
            panic!("not bench bringup")
        };
        assert_eq!((args.smp, args.runs, args.memory), (vec![64], 5, 512));
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "bench",
            "bringup",
            "--smp",
            "16",
            "--runs",
            "2",
            "--linux-append",
            "lpj=1000",
        ])
        .unwrap();
        let Task::Bench(Bench::Bringup(args)) = cli.command else {
            panic!("not bench bringup")
        };
        assert_eq!((args.smp, args.runs), (vec![16], 2));
        assert_eq!(args.linux_append.as_deref(), Some("lpj=1000"));
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "bench",
            "bringup",
            "--smp",
            "64,128,256,512",
            "--tcg-cpu",
            "max,-svm",
        ])
        .unwrap();
        let Task::Bench(Bench::Bringup(args)) = cli.command else {
            panic!("not bench bringup")
        };
        assert_eq!(args.smp, [64, 128, 256, 512]);
        assert_eq!(args.tcg_cpu.as_deref(), Some("max,-svm"));
        assert!(Cli::try_parse_from(["cargo xtask", "bench", "bringup", "--smp", "64,1"]).is_err());
    }

    #[test]
    fn runs_take_a_crash_spec_or_random_with_a_timeout_and_seed() {
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "qemu-smp",
            "--smp",
            "64",
            "--crash",
            "cpu:5,after_ms:3,point:nmi_blocked",
            "--crash-timeout-ms",
            "500",
        ])
        .unwrap();
        let Task::QemuSmp(args) = cli.command else {
            panic!("not qemu-smp")
        };
        assert_eq!(
            args.crash.crash,
            Some(CrashArg::Spec(
                CrashSpec::parse("cpu:5,after_ms:3,point:nmi_blocked").unwrap()
            ))
        );
        assert_eq!(args.crash.crash_timeout_ms, Some(500));
        let words = single_run_crash(&args.crash, 64, false, true, &[]).unwrap();
        assert_eq!(
            words,
            [
                "crash=cpu:5,after_ms:3,point:nmi_blocked",
                "crash_timeout_ms=500"
            ]
        );

        let cli = Cli::try_parse_from([
            "cargo xtask",
            "bochs",
            "--cpus",
            "8",
            "--crash",
            "random",
            "--seed",
            "17",
        ])
        .unwrap();
        let Task::Bochs(args) = cli.command else {
            panic!("not bochs")
        };
        assert_eq!(args.crash.crash, Some(CrashArg::Random));
        let words = single_run_crash(&args.crash, 8, true, false, &[]).unwrap();
        assert_eq!(
            words,
            single_run_crash(&args.crash, 8, true, false, &[]).unwrap()
        );
        let spec = CrashSpec::parse(words[0].strip_prefix("crash=").unwrap()).unwrap();
        assert!(spec.check(8, true).is_ok(), "{spec}");

        let cli = Cli::try_parse_from(["cargo xtask", "stress", "--crash", "random"]).unwrap();
        let Task::Stress(args) = cli.command else {
            panic!("not stress")
        };
        assert_eq!(args.crash.crash, Some(CrashArg::Random));
    }

    #[test]
    fn crash_options_refuse_what_cannot_work() {
        for bad in [
            vec!["qemu-smp", "--crash", "cpu:x"],
            vec!["qemu-smp", "--crash", "cpu:1,point:nowhere"],
            vec!["qemu-smp", "--crash-timeout-ms", "600001"],
            vec!["qemu-smp", "--seed", "3"],
        ] {
            let mut argv = vec!["cargo xtask"];
            argv.extend(&bad);
            assert!(Cli::try_parse_from(&argv).is_err(), "{bad:?}");
        }
        let args = |crash: &str| CrashArgs {
            crash: Some(CrashArg::parse(crash).unwrap()),
            crash_timeout_ms: Some(100),
            seed: None,
        };
        let missing = single_run_crash(&args("cpu:8,after_ms:1"), 8, true, true, &[]).unwrap_err();
        assert!(missing.to_string().contains("0 to 7"), "{missing}");
        let store =
            single_run_crash(&args("cpu:1,point:list_add6"), 8, true, true, &[]).unwrap_err();
        assert!(
            store.to_string().contains("list_add0 to list_add4"),
            "{store}"
        );
        // A point that needs VMX still runs without it: hv says it never fired.
        assert!(single_run_crash(&args("cpu:1,point:list_add0"), 8, false, true, &[]).is_ok());
        // So does a point of the hand-over without a capture kernel.
        assert!(single_run_crash(&args("cpu:1,point:handover_panic"), 8, true, false, &[]).is_ok());
        let both = single_run_crash(
            &args("cpu:1,after_ms:1"),
            8,
            true,
            true,
            &["crash=cpu:2".into()],
        )
        .unwrap_err();
        assert!(both.to_string().contains("give only one"), "{both}");
        let timeouts = single_run_crash(
            &args("cpu:1,after_ms:1"),
            8,
            true,
            true,
            &["crash_timeout_ms=5".into()],
        )
        .unwrap_err();
        assert!(
            timeouts.to_string().contains("--crash-timeout-ms"),
            "{timeouts}"
        );
    }

    #[test]
    fn bench_shootdown_defaults_and_options() {
        let cli = Cli::try_parse_from(["cargo xtask", "bench", "shootdown"]).unwrap();
        let Task::Bench(Bench::Shootdown(args)) = cli.command else {
            panic!("not bench shootdown")
        };
        assert_eq!(
            (args.smp, args.runs, args.memory, args.cpu),
            (64, 10, 512, None)
        );
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "bench",
            "shootdown",
            "--smp",
            "8",
            "--runs",
            "3",
            "--cpu",
            "2",
            "--seed",
            "5",
        ])
        .unwrap();
        let Task::Bench(Bench::Shootdown(args)) = cli.command else {
            panic!("not bench shootdown")
        };
        assert_eq!(
            (args.smp, args.runs, args.cpu, args.seed),
            (8, 3, Some(2), Some(5))
        );
        assert!(Cli::try_parse_from(["cargo xtask", "bench", "shootdown", "--smp", "1"]).is_err());
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
