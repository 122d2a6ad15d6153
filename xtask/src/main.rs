//! `cargo xtask`: build hv, boot it in QEMU or Bochs, run the test suite.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use xtask::accel;
use xtask::bench::{self, BenchOptions};
use xtask::capture::{self, BochsSink, CaptureKernel, CaptureOptions};
use xtask::crash::{self, CrashArg, CrashSpec, CrashSpecExt, Rng};
use xtask::dump::{DumpInfo, Symbols};
use xtask::plan::{self, CaptureFlag, CrashSource, Plan};
use xtask::report::{self, Expectations};
use xtask::run::{self, BochsOptions, Boot, QemuOptions, RunOutcome};
use xtask::stress::{self, CrashPlan, Plain, StressOptions};
use xtask::{ci, cmdline, kernel, kvm_unit_tests, tools};

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

#[derive(Debug, Args)]
struct KvmUnitTestsArgs {
    /// Only the entries whose name matches this regular expression.
    #[arg(long, value_name = "RE")]
    filter: Option<String>,
    /// Every entry of unittests.cfg (default: the CI subset).
    #[arg(long, conflicts_with = "filter")]
    all: bool,
    /// Emulated CPUs (1 to 15).
    #[arg(long, default_value_t = 4, value_parser = parse_bochs_cpus)]
    cpus: u32,
    /// hv's backend: vmx boots it in Bochs, svm in QEMU TCG (`-cpu max`).
    #[arg(long, value_enum, default_value_t = KvmBackend::Vmx)]
    backend: KvmBackend,
    /// Most entries per boot.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=16))]
    per_boot: u64,
    /// The suite's directory (unittests.cfg, qemu-tcg-results.txt, x86/)
    /// [default: ../shared/guests/kvm-unit-tests, or $KVM_UNIT_TESTS_DIR].
    #[arg(long, value_name = "DIR")]
    suite: Option<PathBuf>,
    /// The Bochs CPU model [default: tigerlake].
    #[arg(long, value_name = "MODEL")]
    cpu_model: Option<String>,
    /// Write the JSON report (`kvm_unit_tests`: one object per entry).
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Kill a boot after this many seconds [default: 14400].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Boot this ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    elf: Option<PathBuf>,
    /// Only print what would run: each entry's plan and the boots.
    #[arg(long)]
    list: bool,
}

/// The backend `kvm-unit-tests` runs hv's guests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KvmBackend {
    /// VMX, in Bochs.
    Vmx,
    /// SVM, in QEMU TCG.
    Svm,
}

#[derive(Debug, Subcommand)]
enum Bench {
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
    /// QEMU, 300 for QEMU with a capture, 120 for Bochs, 600 for Bochs with
    /// a capture].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Boot this ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    elf: Option<PathBuf>,
}

/// Making hv crash (its `crash=` and `crash_timeout_ms=` knobs).
#[derive(Debug, Args)]
struct CrashArgs {
    /// Make hv crash: a `crash=` value, `cpu:N,after_ms:T[,point:NAME]`
    /// (passed to hv as it is), or `random` (a random CPU, time and
    /// injection point this machine can fire; the choice is printed). The
    /// run is then judged by hv's crash report instead of `done`.
    /// [qemu-smp's default: cpu:1,after_ms:200, an AP after the boot
    /// report; see --no-crash]
    #[arg(long, value_name = "SPEC|random", value_parser = parse_crash)]
    crash: Option<CrashArg>,
    /// How long hv's crash rendezvous waits for every CPU
    /// (`crash_timeout_ms=`) [hv's default: 1000].
    #[arg(long, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(0..=crash::MAX_TIMEOUT_MS))]
    crash_timeout_ms: Option<u64>,
    /// Seed for `--crash random` [default: a fresh one, printed].
    #[arg(long, value_name = "N", requires = "crash")]
    seed: Option<u64>,
}

/// Capturing the crash with a capture kernel (`xtask/CAPTURE.md`).
#[derive(Debug, Args)]
struct CaptureArgs {
    /// Capture the crash into a dump file with a capture kernel: hv's own
    /// capture mode (built from this repository), Debian's Linux with
    /// xtask's initramfs (fetched with apt), or none (a plain crash). A
    /// crash is injected unless one is asked for (qemu-smp:
    /// `crash=cpu:1,after_ms:200`; bochs: `crash=cpu:1,after_ms:50`)
    /// [qemu-smp's default: hv; bochs: none].
    #[arg(long, value_enum, value_name = "KERNEL")]
    capture: Option<CaptureFlag>,
    /// The reservation (`crashkernel=SIZE[@BASE]`) [default: 256M for
    /// linux, 64M@0x10000000 for hv, whose image is linked at the base].
    #[arg(long, value_name = "SIZE[@BASE]")]
    crashkernel: Option<String>,
    /// Use this file as the capture kernel instead of Debian's bzImage or
    /// the hv-capture build.
    #[arg(long, value_name = "FILE")]
    capture_kernel: Option<PathBuf>,
    /// Use this initramfs for the Linux capture kernel instead of xtask's.
    #[arg(long, value_name = "FILE")]
    capture_initrd: Option<PathBuf>,
    /// The Linux capture kernel's arguments (hv adds `nr_cpus=` its CPU
    /// count and `disable_cpu_apicid=` its boot CPU's unless given, then
    /// `elfcorehdr=` and `memmap=`) [default: console=ttyS0,115200
    /// reset_devices panic=-1 printk.time=1].
    #[arg(long, value_name = "WORDS", allow_hyphen_values = true)]
    capture_args: Option<String>,
    /// With --capture linux: filter /proc/vmcore with Debian's makedumpfile
    /// (dump level 1, zero pages left out) into an ELF dump (`vmcore`, for
    /// gdb and drgn) and a compressed kdump (`vmcore.kdump`) instead of
    /// copying it whole.
    #[arg(long)]
    makedumpfile: bool,
    /// Fail the run unless the capture kernel wakes every CPU that checked
    /// in with the crash's coordinator (hv's capture mode: INIT-SIPI-SIPI
    /// to each, which a CPU still in VMX root blocks; Linux: its dmesg).
    /// The summary's `wake` line shows the count either way.
    #[arg(long)]
    wake: bool,
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
struct QemuArgs {
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    smp: u32,
    /// How hv is loaded [default: direct; grub-bios with --capture linux].
    #[arg(long, value_enum)]
    boot: Option<Boot>,
    /// Guest memory in MiB [default: 512; 1024 with --capture linux].
    #[arg(long, value_name = "MiB")]
    memory: Option<u32>,
    /// Boot and self-report only, as before the whole path was the default:
    /// no crash, and so no capture.
    #[arg(long, conflicts_with_all = ["crash", "crash_timeout_ms", "seed", "nmi_button_after_ms"])]
    no_crash: bool,
    /// Press the platform's NMI button (QMP `inject-nmi`) this many ms
    /// after hv's boot report: hv (`nmi=dump`, its default) starts its
    /// crash path with reason `external NMI`, and the run is judged by that
    /// crash. Without a `hang=` word xtask adds `finish=halt`, so that hv
    /// stays up after `done`, and ends QEMU itself once the crash path and
    /// its capture are over.
    #[arg(long, value_name = "MS", conflicts_with = "crash")]
    nmi_button_after_ms: Option<u64>,
    /// Run on a QEMU whose TCG offers x2APIC (QEMU 8.1 or later; fetched
    /// from bookworm-backports into build/qemu-x2apic when the
    /// distribution's has none), as every run with more than 255 CPUs
    /// does; hv must then report x2APIC mode.
    #[arg(long)]
    x2apic: bool,
    /// QEMU's CPU model under TCG instead of `max`, e.g. `max,-svm` for a
    /// CPU without SVM: hv then runs no guests, and the run expects no
    /// particular backend.
    #[arg(long, value_name = "MODEL")]
    tcg_cpu: Option<String>,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    crash: CrashArgs,
    #[command(flatten)]
    capture: CaptureArgs,
}

/// How long a Bochs run with a capture may take by default: the stream of
/// a 448 MiB dump takes 75 to 100 s on an ATA disk at 8 CPUs, and about
/// 4 minutes on port 0xE9 at 15 CPUs, on 2 shared cores.
const BOCHS_CAPTURE_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a QEMU run with a capture may take by default: the capture
/// kernel boots and the dump crosses the debug port or a virtio disk
/// (about 30 s direct, 90 s through GRUB on UEFI, whose firmware leaves
/// more memory to send, under TCG on 2 cores).
const QEMU_CAPTURE_TIMEOUT: Duration = Duration::from_secs(300);

impl QemuArgs {
    fn boot(&self) -> Boot {
        self.boot.unwrap_or(match self.capture.capture {
            Some(CaptureFlag::Linux) => Boot::GrubBios,
            _ => Boot::Direct,
        })
    }

    /// Guest memory, for the run's capture kernel.
    fn memory(&self, capture: Option<CaptureKernel>) -> u32 {
        self.memory.unwrap_or(match capture {
            Some(CaptureKernel::Linux) => capture::LINUX_MEMORY_MIB,
            Some(CaptureKernel::Hv) => capture::HV_MEMORY_MIB,
            None => 512,
        })
    }

    /// The time limit, for a run that captures or not.
    fn timeout(&self, captures: bool) -> Option<Duration> {
        match self.run.timeout {
            Some(secs) => Some(Duration::from_secs(secs)),
            None => captures.then_some(QEMU_CAPTURE_TIMEOUT),
        }
    }
}

#[derive(Debug, Args)]
struct BochsArgs {
    /// Number of CPUs (1 to 15: Bochs 2.7 fails with more).
    #[arg(long, default_value_t = 4, value_parser = parse_bochs_cpus)]
    cpus: u32,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    crash: CrashArgs,
    #[command(flatten)]
    capture: CaptureArgs,
    /// Where hv's capture mode writes the dump stream: a disk on
    /// ata0-slave, or port 0xE9 (Bochs' stdout).
    #[arg(long, value_enum, default_value_t = BochsSink::Ata, requires = "capture")]
    capture_sink: BochsSink,
    /// A guest kernel (multiboot1) and its settings, as one string: the
    /// file, then the words of its `guest` module line (`smp=2 mem=64M
    /// name=N NR_CPUS=2 -- args`, see hv_core::guest_spec). Repeatable.
    #[arg(long, value_name = "'FILE [WORDS]'")]
    guest: Vec<String>,
    /// Machine memory in MiB [default: 256].
    #[arg(long, value_name = "MiB")]
    memory: Option<u32>,
}

#[derive(Debug, Args)]
struct StressArgs {
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    smp: u32,
    /// Number of runs.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// How hv is loaded.
    #[arg(long, value_enum, default_value_t = Boot::Direct)]
    boot: Boot,
    /// Guest memory in MiB [default: 512; from 129 CPUs on 512 and 4 a
    /// CPU (1536 at 256), so that hv's test guests still come two per
    /// core].
    #[arg(long, value_name = "MiB")]
    memory: Option<u32>,
    /// Go on after a failed run (default: stop at the first).
    #[arg(long)]
    keep_going: bool,
    /// `--report` writes the loop's result (every run, the table's
    /// numbers) as JSON; `--timeout` applies to each run.
    #[command(flatten)]
    run: RunArgs,
    /// `--crash` applies to every run (`random`: a new spec per run).
    #[command(flatten)]
    crash: CrashArgs,
    /// Capture every crash with hv's capture mode, or not [default: hv
    /// with --crash, none without]. Each run ends once the capture image
    /// entered and read the core header (see --whole-dump).
    #[arg(long, value_enum, value_name = "KERNEL")]
    capture: Option<CaptureFlag>,
    /// With a capture: wait for the whole dump in every run (20 to 50 s a
    /// run at -smp 64 under TCG) and check it, instead of ending at the
    /// capture image's entry.
    #[arg(long)]
    whole_dump: bool,
    /// Run on a QEMU whose TCG offers x2APIC (see qemu-smp --x2apic);
    /// implied above 255 CPUs.
    #[arg(long)]
    x2apic: bool,
}

#[derive(Debug, Args)]
struct BenchBringupArgs {
    /// Number of virtual CPUs of both machines; a comma-separated list
    /// (`64,128,256,512`) benches each size in turn and ends with a table
    /// by size. Above 255 both run on the x2APIC QEMU.
    #[arg(long, default_value = "64", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(2..))]
    smp: Vec<u32>,
    /// Run on a QEMU whose TCG offers x2APIC at every size (see qemu-smp
    /// --x2apic).
    #[arg(long)]
    x2apic: bool,
    /// Both kernels' CPU model under TCG instead of `max`, e.g. `max,-svm`
    /// (hv then runs no guests).
    #[arg(long, value_name = "MODEL")]
    tcg_cpu: Option<String>,
    /// Give Linux this many seconds to bring its CPUs up; past it the
    /// table says it did not finish [default: 600].
    #[arg(long, value_name = "SECS")]
    linux_timeout: Option<u64>,
    /// Runs of each kernel (they alternate).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Guest memory in MiB of both machines.
    #[arg(long, value_name = "MiB", default_value_t = 512)]
    memory: u32,
    /// Boot this Linux bzImage instead of fetching Debian's.
    #[arg(long, value_name = "FILE")]
    linux: Option<PathBuf>,
    /// Draw each AP's bring-up time in hv, and both kernels' whole
    /// bring-up, as SVG into this file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Extra words for Linux's command line (e.g. `lpj=...`).
    #[arg(long, value_name = "WORDS", allow_hyphen_values = true)]
    linux_append: Option<String>,
    /// Write the samples and the ratio (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Boot this hv ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    elf: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BenchShootdownArgs {
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..))]
    smp: u32,
    /// Number of crash runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MiB", default_value_t = 512)]
    memory: u32,
    /// The CPU index that panics in every run [default: a random one per
    /// run].
    #[arg(long, value_name = "N")]
    cpu: Option<u32>,
    /// Seed for the random CPUs and times [default: a fresh one, printed].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Draw each CPU's NMI latency and check-in time, and the whole
    /// shootdown, as SVG into this file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Write the samples and their spreads (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Boot this hv ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    elf: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BenchCrashArgs {
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    smp: u32,
    /// Number of crash runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// The CPU index that panics in every run [default: a random one per
    /// run].
    #[arg(long, value_name = "N")]
    cpu: Option<u32>,
    /// Seed for the random CPUs and times [default: a fresh one, printed].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Leave out the reference: Linux's crash to purgatory on the same
    /// QEMU machine (Debian's kernel and kexec-tools, fetched with apt).
    #[arg(long)]
    no_linux: bool,
    /// Write the samples and their spreads (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Boot this hv ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    elf: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BenchTscArgs {
    /// Number of boots.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    smp: u32,
    /// Spinning threads beside QEMU [default: one per host CPU].
    #[arg(long, value_name = "N")]
    busy: Option<usize>,
    /// Write the boots and the host's rate (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Boot this hv ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    elf: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DumpArgs {
    /// The dump (an ELF core file).
    file: PathBuf,
    /// hv's ELF, to name the function each CPU's RIP is in.
    #[arg(long, value_name = "FILE")]
    elf: Option<PathBuf>,
    /// Show every register of every CPU.
    #[arg(long, short)]
    verbose: bool,
    /// Print JSON instead.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TestArgs {
    /// Arguments for the integration tests' harness (a test name filter,
    /// `--nocapture`, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    harness_args: Vec<OsString>,
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
        Task::QemuX2apic => {
            let qemu = xtask::qemu_program::x2apic_qemu()?;
            println!("{}", serde_json::to_string_pretty(&qemu.report())?);
            Ok(ExitCode::SUCCESS)
        }
        Task::QemuSmp(args) => {
            let guests = args.tcg_cpu.is_none() && accel::detect().guest_backend().runs_guests();
            let (plan, append) = crash_and_capture(
                true,
                args.no_crash,
                &args.crash,
                &args.capture,
                &args.run,
                args.smp,
                guests,
                args.nmi_button_after_ms,
            )?;
            let boot = args.boot();
            tools::ensure(&run::qemu_needs(boot))?;
            let mut options = QemuOptions::new(elf(&args.run)?);
            options.smp = args.smp;
            options.boot = boot;
            options.memory_mib = args.memory(plan.capture);
            options.append = append;
            options.echo = true;
            options.nmi_button_after_ms = args.nmi_button_after_ms;
            options.x2apic = args.x2apic;
            options.tcg_cpu = args.tcg_cpu.clone();
            if let Some(timeout) = args.timeout(plan.capture.is_some()) {
                options.timeout = timeout;
            }
            let mut outcome = match plan.capture {
                Some(kernel) => capture::qemu(&options, &args.capture.options(kernel, args.smp))?,
                None => run::qemu(&options)?,
            };
            outcome.add_notes(&plan.notes)?;
            conclude(&outcome, &args.run)
        }
        Task::Bochs(args) => {
            // Bochs' CPU model always has VMX.
            let (plan, append) = crash_and_capture(
                false,
                false,
                &args.crash,
                &args.capture,
                &args.run,
                args.cpus,
                true,
                None,
            )?;
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
                    .push(xtask::kvm_unit_tests::guest_module(guest)?);
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
        Task::KvmUnitTests(args) => {
            let elf = match (&args.elf, args.list) {
                (Some(elf), _) => elf.clone(),
                (None, true) => PathBuf::from("hv"),
                (None, false) => kernel::build(None)?,
            };
            let mut options = kvm_unit_tests::Options::new(elf);
            if let Some(suite) = &args.suite {
                options.suite = suite.clone();
            }
            options.filter = args.filter.clone();
            options.all = args.all;
            options.cpus = args.cpus;
            options.per_boot = args.per_boot as usize;
            options.cpu_model = args.cpu_model.clone();
            options.backend = match args.backend {
                KvmBackend::Vmx => kvm_unit_tests::Backend::Vmx,
                KvmBackend::Svm => kvm_unit_tests::Backend::Svm,
            };
            options.progress = true;
            if let Some(secs) = args.timeout {
                options.boot_timeout = Duration::from_secs(secs);
            }
            if args.list {
                print!("{}", kvm_unit_tests::describe(&options)?);
                return Ok(ExitCode::SUCCESS);
            }
            if options.backend == kvm_unit_tests::Backend::Svm {
                tools::ensure(&run::qemu_needs(run::Boot::GrubBios))?;
                println!("hv's SVM backend in QEMU TCG (-cpu max)");
            } else {
                tools::ensure(&run::BOCHS_NEEDS)?;
                if accel::detect() == accel::Accel::Kvm {
                    println!(
                        "note: this host offers nested VMX, but the qemu-kvm column is not implemented; Bochs only"
                    );
                } else {
                    println!("qemu-kvm: not run (this host offers no nested VMX); Bochs only");
                }
            }
            let outcome = kvm_unit_tests::run(&options)?;
            print!("{}", kvm_unit_tests::table(&outcome.results));
            if let Some(path) = &args.report {
                let text = serde_json::to_string_pretty(&outcome.report())?;
                std::fs::write(path, text + "\n")?;
                println!("report written to {}", path.display());
            }
            let broken: Vec<_> = outcome
                .boots
                .iter()
                .filter(|b| b["ok"] != true)
                .map(|b| format!("{}: {}", b["run_dir"], b["reason"]))
                .collect();
            for line in &broken {
                println!("hv run not ok: {line}");
            }
            Ok(if broken.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Task::Stress(args) => {
            tools::ensure(&run::qemu_needs(args.boot))?;
            let mut append = extra_words(&args.run)?;
            check_crash_conflicts(&args.crash, &append)?;
            append.extend(timeout_word(&args.crash));
            let capture = stress_capture(&args)?;
            let mut plan: Box<dyn stress::RunPlan> = match args.crash.crash {
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
            let result = stress::stress(&options, plan.as_mut())?;
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
        Task::Bench(Bench::Bringup(args)) => {
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
                options.linux_append =
                    cmdline::split_words(args.linux_append.as_deref().unwrap_or(""));
                let result = bench::bench_bringup(&options)?;
                println!("{}", result.table());
                results.push(result);
            }
            if results.len() > 1 {
                println!("{}", bench::scale_table(&results));
            }
            if let Some(path) = &args.report {
                let value = match results.as_slice() {
                    [one] => one.to_json(),
                    many => serde_json::json!({
                        "sizes": many.iter().map(bench::BenchResult::to_json).collect::<Vec<_>>(),
                    }),
                };
                write_json(path, &value)?;
            }
            if let Some(path) = &args.plot
                && let Some(result) = results.last()
            {
                bench::plot::write_svg(&bench::plot::bringup_figure(result), path)?;
                println!("plot written to {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Task::Bench(Bench::Shootdown(args)) => {
            check_bench_cpu(args.cpu, args.smp)?;
            let elf = match &args.elf {
                Some(path) => path.clone(),
                None => kernel::build(None)?,
            };
            let mut options = bench::shootdown::ShootdownOptions::new(elf);
            options.smp = args.smp;
            options.runs = args.runs;
            options.memory_mib = args.memory;
            options.cpu = args.cpu;
            options.seed = args.seed.unwrap_or_else(crash::fresh_seed);
            let result = bench::shootdown::bench_shootdown(&options)?;
            println!("{}", result.table());
            if let Some(path) = &args.report {
                write_json(path, &result.to_json())?;
            }
            if let Some(path) = &args.plot {
                bench::plot::write_svg(&bench::plot::shootdown_figure(&result), path)?;
                println!("plot written to {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Task::Bench(Bench::Crash(args)) => {
            check_bench_cpu(args.cpu, args.smp)?;
            let elf = match &args.elf {
                Some(path) => path.clone(),
                None => kernel::build(None)?,
            };
            let (_, base) = capture::parse_crashkernel(capture::HV_CRASHKERNEL)?;
            let image =
                kernel::build_capture(base.expect("the default hv reservation has a base"))?;
            let mut options = bench::crash::CrashBenchOptions::new(elf, image);
            options.smp = args.smp;
            options.runs = args.runs;
            options.cpu = args.cpu;
            options.seed = args.seed.unwrap_or_else(crash::fresh_seed);
            options.linux = !args.no_linux;
            let result = bench::crash::bench_crash(&options)?;
            println!("{}", result.table());
            if let Some(path) = &args.report {
                write_json(path, &result.to_json())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Task::Bench(Bench::Tsc(args)) => {
            let elf = match &args.elf {
                Some(path) => path.clone(),
                None => kernel::build(None)?,
            };
            let mut options = bench::tsc::TscOptions::new(elf);
            options.runs = args.runs;
            options.smp = args.smp;
            if let Some(busy) = args.busy {
                options.busy_threads = busy;
            }
            let result = bench::tsc::bench_tsc(&options)?;
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
        Task::Test(args) => {
            ci::run_all(&args.harness_args)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Lint => {
            ci::lints()?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Dump(args) => {
            let info = DumpInfo::read(&args.file)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&info.to_json())?);
            } else {
                let symbols = args.elf.as_deref().map(Symbols::load).transpose()?;
                print!("{}", info.render(args.verbose, symbols.as_ref()));
            }
            Ok(if info.problems().is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
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

impl StressArgs {
    /// The guest memory: `--memory`, or [`stress_memory_mib`].
    fn memory(&self) -> u32 {
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

/// A benchmark's `--cpu` must name a CPU of the machine.
fn check_bench_cpu(cpu: Option<u32>, smp: u32) -> Result<()> {
    if let Some(cpu) = cpu
        && cpu >= smp
    {
        anyhow::bail!("--cpu {cpu}: the machine has {smp} CPUs (0 to {})", smp - 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
        crash_and_capture(
            true,
            args.no_crash,
            &args.crash,
            &args.capture,
            &args.run,
            args.smp,
            false,
            args.nmi_button_after_ms,
        )
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
        let (plan, words) = crash_and_capture(
            false,
            false,
            &args.crash,
            &args.capture,
            &args.run,
            8,
            true,
            None,
        )
        .unwrap();
        assert_eq!(plan.capture, Some(CaptureKernel::Hv));
        assert_eq!(words, ["crash=cpu:1,after_ms:50"]);
    }

    #[test]
    fn bochs_still_boots_only_by_default() {
        let cli = Cli::try_parse_from(["cargo xtask", "bochs", "--cpus", "8"]).unwrap();
        let Task::Bochs(args) = cli.command else {
            panic!("not bochs")
        };
        let (plan, words) = crash_and_capture(
            false,
            false,
            &args.crash,
            &args.capture,
            &args.run,
            8,
            true,
            None,
        )
        .unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::None, None));
        assert!(words.is_empty());
        let cli = Cli::try_parse_from(["cargo xtask", "bochs", "--crashkernel", "64M"]).unwrap();
        let Task::Bochs(args) = cli.command else {
            panic!("not bochs")
        };
        let error = crash_and_capture(
            false,
            false,
            &args.crash,
            &args.capture,
            &args.run,
            8,
            true,
            None,
        )
        .unwrap_err();
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
