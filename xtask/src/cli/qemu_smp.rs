//! `cargo xtask qemu-smp`: its arguments and what it runs.

use super::*;

#[derive(Debug, Args)]
pub struct QemuArgs {
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) smp: u32,
    /// How hv is loaded [default: direct; grub-bios with --capture linux].
    #[arg(long, value_enum)]
    pub(crate) boot: Option<Boot>,
    /// Guest memory in MiB [default: 512; 1024 with --capture linux].
    #[arg(long, value_name = "MiB")]
    pub(crate) memory: Option<u32>,
    /// Boot and self-report only, as before the whole path was the default:
    /// no crash, and so no capture.
    #[arg(long, conflicts_with_all = ["crash", "crash_timeout_ms", "seed", "nmi_button_after_ms"])]
    pub(crate) no_crash: bool,
    /// Press the platform's NMI button (QMP `inject-nmi`) this many ms
    /// after hv's boot report: hv (`nmi=dump`, its default) starts its
    /// crash path with reason `external NMI`, and the run is judged by that
    /// crash. Without a `hang=` word xtask adds `finish=halt`, so that hv
    /// stays up after `done`, and ends QEMU itself once the crash path and
    /// its capture are over.
    #[arg(long, value_name = "MS", conflicts_with = "crash")]
    pub(crate) nmi_button_after_ms: Option<u64>,
    /// Run on a QEMU whose TCG offers x2APIC (QEMU 8.1 or later; fetched
    /// from bookworm-backports into build/qemu-x2apic when the
    /// distribution's has none), as every run with more than 255 CPUs
    /// does; hv must then report x2APIC mode.
    #[arg(long)]
    pub(crate) x2apic: bool,
    /// QEMU's CPU model under TCG instead of `max`, e.g. `max,-svm` for a
    /// CPU without SVM: hv then runs no guests, and the run expects no
    /// particular backend.
    #[arg(long, value_name = "MODEL")]
    pub(crate) tcg_cpu: Option<String>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
    #[command(flatten)]
    pub(crate) crash: CrashArgs,
    #[command(flatten)]
    pub(crate) capture: CaptureArgs,
}

/// How long a QEMU run with a capture may take by default: the capture
/// kernel boots and the dump crosses the debug port or a virtio disk
/// (about 30 s direct, 90 s through GRUB on UEFI, whose firmware leaves
/// more memory to send, under TCG on 2 cores).
pub(super) const QEMU_CAPTURE_TIMEOUT: Duration = Duration::from_secs(300);

/// [`QEMU_CAPTURE_TIMEOUT`] above 255 CPUs (what the 512-CPU test allows).
pub(super) const QEMU_CAPTURE_TIMEOUT_X2APIC: Duration = Duration::from_secs(900);

impl QemuArgs {
    pub(crate) fn boot(&self) -> Boot {
        self.boot.unwrap_or(match self.capture.capture {
            Some(CaptureFlag::Linux) => Boot::GrubBios,
            _ => Boot::Direct,
        })
    }

    /// Guest memory, for the run's capture kernel.
    pub(crate) fn memory(&self, capture: Option<CaptureKernel>) -> u32 {
        self.memory.unwrap_or(match capture {
            Some(CaptureKernel::Linux) => capture::LINUX_MEMORY_MIB,
            Some(CaptureKernel::Hv) => capture::HV_MEMORY_MIB,
            None => 512,
        })
    }

    /// The time limit, for a run that captures or not. Above 255 CPUs
    /// (x2APIC, QEMU 10) a capture run gets [`QEMU_CAPTURE_TIMEOUT_X2APIC`]:
    /// at 512 CPUs on 2 host cores the boot report alone can take 100 s to
    /// go out before the crash, and the capture image wakes 511 CPUs.
    pub(crate) fn timeout(&self, captures: bool) -> Option<Duration> {
        match self.run.timeout {
            Some(secs) => Some(Duration::from_secs(secs)),
            None if self.smp > crate::qemu_program::XAPIC_MAX_CPUS => {
                captures.then_some(QEMU_CAPTURE_TIMEOUT_X2APIC)
            }
            None => captures.then_some(QEMU_CAPTURE_TIMEOUT),
        }
    }
}

/// The crash and capture of the run ([`crash_and_capture`]); `guests`:
/// whether guests run on this host's QEMU.
pub(super) fn plan(args: &QemuArgs, guests: bool) -> Result<(Plan, Vec<String>)> {
    crash_and_capture(
        true,
        args.no_crash,
        &args.crash,
        &args.capture,
        &args.run,
        args.smp,
        guests,
        args.nmi_button_after_ms,
    )
}

/// Boots hv in QEMU as the arguments say, and judges the run.
pub(super) fn run(args: QemuArgs) -> Result<ExitCode> {
    let guests = args.tcg_cpu.is_none() && accel::detect().guest_backend().runs_guests();
    let (plan, append) = plan(&args, guests)?;
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
