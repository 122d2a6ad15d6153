//! `cargo xtask kvm-unit-tests`: its arguments and what it runs.

use super::*;

#[derive(Debug, Args)]
pub struct KvmUnitTestsArgs {
    /// Only the entries whose name matches this regular expression.
    #[arg(long, value_name = "RE")]
    pub(crate) filter: Option<String>,
    /// Every entry of unittests.cfg (default: the CI subset).
    #[arg(long, conflicts_with = "filter")]
    pub(crate) all: bool,
    /// Emulated CPUs (1 to 15).
    #[arg(long, default_value_t = 4, value_parser = parse_bochs_cpus)]
    pub(crate) cpus: u32,
    /// hv's backend: vmx boots it in Bochs, svm in QEMU TCG (`-cpu max`).
    #[arg(long, value_enum, default_value_t = KvmBackend::Vmx)]
    pub(crate) backend: KvmBackend,
    /// Most entries per boot.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub(crate) per_boot: u64,
    /// The suite's directory (unittests.cfg, qemu-tcg-results.txt, x86/)
    /// [default: ../shared/guests/kvm-unit-tests, or $KVM_UNIT_TESTS_DIR].
    #[arg(long, value_name = "DIR")]
    pub(crate) suite: Option<PathBuf>,
    /// The Bochs CPU model [default: tigerlake].
    #[arg(long, value_name = "MODEL")]
    pub(crate) cpu_model: Option<String>,
    /// Write the JSON report (`kvm_unit_tests`: one object per entry).
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// Kill a boot after this many seconds [default: 14400].
    #[arg(long, value_name = "SECS")]
    pub(crate) timeout: Option<u64>,
    /// Boot this ELF instead of building hv.
    #[arg(long, value_name = "FILE")]
    pub(crate) elf: Option<PathBuf>,
    /// Only print what would run: each entry's plan and the boots.
    #[arg(long)]
    pub(crate) list: bool,
}

/// The backend `kvm-unit-tests` runs hv's guests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvmBackend {
    /// VMX, in Bochs.
    Vmx,
    /// SVM, in QEMU TCG.
    Svm,
}

/// Runs the selected kvm-unit-tests entries as hv guests.
pub(super) fn run(args: KvmUnitTestsArgs) -> Result<ExitCode> {
    let elf = match (&args.elf, args.list) {
        (Some(elf), _) => elf.clone(),
        (None, true) => PathBuf::from("hv"),
        (None, false) => kernel::build(None)?,
    };
    let mut options = crate::kvm_unit_tests::Options::new(elf);
    if let Some(suite) = &args.suite {
        options.suite = suite.clone();
    }
    options.filter = args.filter.clone();
    options.all = args.all;
    options.cpus = args.cpus;
    options.per_boot = args.per_boot as usize;
    options.cpu_model = args.cpu_model.clone();
    options.backend = match args.backend {
        KvmBackend::Vmx => crate::kvm_unit_tests::Backend::Vmx,
        KvmBackend::Svm => crate::kvm_unit_tests::Backend::Svm,
    };
    options.progress = true;
    if let Some(secs) = args.timeout {
        options.boot_timeout = Duration::from_secs(secs);
    }
    if args.list {
        print!("{}", crate::kvm_unit_tests::describe(&options)?);
        return Ok(ExitCode::SUCCESS);
    }
    if options.backend == crate::kvm_unit_tests::Backend::Svm {
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
    let outcome = crate::kvm_unit_tests::run(&options)?;
    print!("{}", crate::kvm_unit_tests::table(&outcome.results));
    if let Some(path) = &args.report {
        let text = serde_json::to_string_pretty(&outcome.report())?;
        std::fs::write(path, text + "\n")?;
        println!("report written to {}", path.display());
    }
    let broken: Vec<_> = outcome
        .boots
        .iter()
        .filter(|b| !b.ok)
        .map(|b| {
            format!(
                "{}: {}",
                serde_json::json!(b.run_dir),
                serde_json::json!(b.reason)
            )
        })
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
