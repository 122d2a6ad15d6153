//! Helpers for the integration tests in `tests/tests/`: boot the real hv
//! image in QEMU or Bochs through the xtask library and explain failures
//! with what the hypervisor reported.
//!
//! The tests need emulators and run through `cargo xtask test`, which builds
//! hv once and hands the ELF over in `HV_ELF`. Run on their own
//! (`cargo test -p tests`), they build hv into a target directory of their
//! own: a `cargo build` on the target directory of the `cargo test` that is
//! running them could wait for its build lock.

pub mod capture;
pub mod guests;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use xtask::crash::CrashArg;
use xtask::run::{self, BochsOptions, QemuOptions};
use xtask::stress::{self, CrashPlan, Plain, StressOptions};

pub use xtask::run::{Boot, RunOutcome};
pub use xtask::stress::StressResult;

/// Whether hv's purgatory survives an NMI (it has an IDT of its own, since
/// the purgatory rework merged from `hpurg`): before that,
/// `point:nmi_in_purgatory` killed the machine (a triple fault). Tests
/// that would fail for that alone look here.
pub const PURGATORY_SURVIVES_NMIS: bool = true;

/// Time allowed for one QEMU run; generous because tests share two cores.
const QEMU_TIMEOUT: Duration = Duration::from_secs(180);

/// Time allowed for one Bochs run.
const BOCHS_TIMEOUT: Duration = Duration::from_secs(300);

/// The hv ELF under test, built at most once per test binary.
pub fn hv_elf() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| match std::env::var_os(xtask::kernel::ELF_ENV) {
        // Relative to the workspace root, not to this crate's directory
        // where cargo runs the tests.
        Some(path) => xtask::paths::workspace_root().join(path),
        None => {
            let own_target = xtask::paths::workspace_root().join("target/integration-hv");
            xtask::kernel::build(Some(&own_target)).expect("building hv for the tests")
        }
    })
}

/// Boots hv in QEMU with `cpus` CPUs; `name` names the run directory under
/// `build/` and must differ between tests that may run at the same time.
#[track_caller]
pub fn qemu(name: &str, boot: Boot, cpus: u32, append: &[&str]) -> RunOutcome {
    let options = QemuOptions {
        smp: cpus,
        boot,
        append: append.iter().map(|word| word.to_string()).collect(),
        timeout: QEMU_TIMEOUT,
        run_name: Some(name.to_owned()),
        ..QemuOptions::new(hv_elf())
    };
    run::qemu(&options).unwrap_or_else(|error| panic!("QEMU run {name} could not run: {error:#}"))
}

/// Boots hv in QEMU under TCG with the CPU model `cpu_model` instead of
/// `max` (e.g. `qemu64,-svm`: neither VMX nor SVM); see [`qemu`].
#[track_caller]
pub fn qemu_with_cpu(name: &str, cpus: u32, cpu_model: &str, append: &[&str]) -> RunOutcome {
    let options = QemuOptions {
        smp: cpus,
        boot: Boot::Direct,
        append: append.iter().map(|word| word.to_string()).collect(),
        timeout: QEMU_TIMEOUT,
        run_name: Some(name.to_owned()),
        tcg_cpu: Some(cpu_model.to_owned()),
        ..QemuOptions::new(hv_elf())
    };
    run::qemu(&options).unwrap_or_else(|error| panic!("QEMU run {name} could not run: {error:#}"))
}

/// Boots hv in Bochs with `cpus` CPUs (see [`qemu`] for `name`).
#[track_caller]
pub fn bochs(name: &str, cpus: u32, append: &[&str]) -> RunOutcome {
    let options = BochsOptions {
        cpus,
        append: append.iter().map(|word| word.to_string()).collect(),
        timeout: BOCHS_TIMEOUT,
        run_name: Some(name.to_owned()),
        ..BochsOptions::new(hv_elf())
    };
    run::bochs(&options).unwrap_or_else(|error| panic!("Bochs run {name} could not run: {error:#}"))
}

/// Runs `runs` QEMU boots with `cpus` CPUs in a row through xtask's stress
/// loop (no progress bar), into `build/<name>/`.
#[track_caller]
pub fn stress(name: &str, cpus: u32, runs: u32) -> StressResult {
    let base = QemuOptions {
        smp: cpus,
        timeout: QEMU_TIMEOUT,
        ..QemuOptions::new(hv_elf())
    };
    let options = StressOptions {
        name: name.to_owned(),
        progress: false,
        ..StressOptions::new(base, runs)
    };
    stress::stress(&options, &mut Plain)
        .unwrap_or_else(|error| panic!("stress loop {name} could not run: {error:#}"))
}

/// Runs `runs` QEMU boots with `cpus` CPUs through xtask's stress loop,
/// each with a random crash drawn from `seed` (guests run: under KVM with
/// VMX, under TCG with SVM, so every point can fire, those inside the
/// hand-over included) and captured by hv's capture mode up to its entry
/// (as `cargo xtask stress --crash random` does), into `build/<name>/`.
/// The seed is in the result's title.
#[track_caller]
pub fn stress_crash(name: &str, cpus: u32, runs: u32, seed: u64) -> StressResult {
    let base = QemuOptions {
        smp: cpus,
        timeout: QEMU_TIMEOUT,
        ..QemuOptions::new(hv_elf())
    };
    let capture = xtask::capture::CaptureOptions {
        image: Some(capture::hv_capture_elf().to_path_buf()),
        default_crash: None,
        until_entry: true,
        ..xtask::capture::CaptureOptions::new(xtask::capture::CaptureKernel::Hv, cpus)
    };
    let options = StressOptions {
        name: name.to_owned(),
        progress: false,
        capture: Some(capture),
        ..StressOptions::new(base, runs)
    };
    let guests = xtask::accel::detect().guest_backend().runs_guests();
    let mut plan = CrashPlan::new(
        CrashArg::Random,
        seed,
        cpus,
        guests,
        xtask::crash::DEFAULT_GUEST_RUN_MS,
    )
    .with_capture(true);
    stress::stress(&options, &mut plan)
        .unwrap_or_else(|error| panic!("stress loop {name} could not run: {error:#}"))
}

/// hv's crash report (`crash`) of a run, read key by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crash {
    /// APIC ID of the coordinator.
    pub cpu: u64,
    /// CPU index of the coordinator.
    pub cpu_index: u64,
    /// Why the machine crashed.
    pub reason: String,
    /// CPUs expected to check in.
    pub expected: u64,
    /// CPUs that did.
    pub checked_in: u64,
    /// APIC IDs of those that did not.
    pub stragglers: Vec<u64>,
    /// The backend: "vmx", "svm", "none" (older reports: "").
    pub backend: String,
    /// VMCSes loaded when the crash came (counted from the vCPUs).
    pub vmcs_loaded: u64,
    /// VMCSes the crash path cleared.
    pub vmcs_cleared: u64,
    /// Loaded VMCSes held by stragglers.
    pub vmcs_on_stragglers: u64,
    /// CPUs that checked in out of VMX.
    pub vmxoff_cpus: u64,
    /// Whether the coordinator left VMX.
    pub coordinator_vmx_off: bool,
    /// On SVM: VMCBs loaded when the crash came.
    pub vmcb_loaded: u64,
    /// On SVM: VMCBs the crash path cleared.
    pub vmcb_cleared: u64,
    /// On SVM: loaded VMCBs held by stragglers.
    pub vmcb_on_stragglers: u64,
    /// CPUs that checked in out of SVM (EFER.SVME read back clear).
    pub svm_off_cpus: u64,
    /// Whether the coordinator left SVM.
    pub coordinator_svm_off: bool,
    /// Per CPU index: whether its crash NMI came as a guest's exit.
    pub nmi_in_guest: Vec<Option<bool>>,
    /// First NMI sent to last check-in.
    pub shootdown_us: u64,
    /// Whether the rendezvous gave up waiting.
    pub timed_out: bool,
    /// Per CPU index: first NMI sent to that CPU taking it.
    pub nmi_latency_us: Vec<Option<u64>>,
}

/// The crash report of a run, failing the test with the whole story when
/// a key is missing or of the wrong type.
#[track_caller]
pub fn crash(outcome: &RunOutcome) -> Crash {
    let flag = |pointer: &str| {
        field(outcome, pointer)
            .as_bool()
            .unwrap_or_else(|| panic!("{pointer} is not true or false\n{}", explain(outcome)))
    };
    let latency = field(outcome, "/crash/nmi_latency_us")
        .as_array()
        .unwrap_or_else(|| panic!("crash.nmi_latency_us is not a list\n{}", explain(outcome)))
        .iter()
        .map(Value::as_u64)
        .collect();
    let optional = |pointer: &str| outcome.report.pointer(pointer).and_then(Value::as_u64);
    let nmi_in_guest = outcome
        .report
        .pointer("/crash/nmi_in_guest")
        .and_then(Value::as_array)
        .map(|entries| entries.iter().map(Value::as_bool).collect())
        .unwrap_or_default();
    Crash {
        cpu: number(outcome, "/crash/cpu"),
        cpu_index: number(outcome, "/crash/cpu_index"),
        reason: string(outcome, "/crash/reason").to_owned(),
        expected: number(outcome, "/crash/expected"),
        checked_in: number(outcome, "/crash/checked_in"),
        stragglers: numbers(outcome, "/crash/stragglers"),
        backend: outcome
            .report
            .pointer("/crash/backend")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        vmcs_loaded: number(outcome, "/crash/vmcs_loaded"),
        vmcs_cleared: number(outcome, "/crash/vmcs_cleared"),
        vmcs_on_stragglers: number(outcome, "/crash/vmcs_on_stragglers"),
        vmxoff_cpus: number(outcome, "/crash/vmxoff_cpus"),
        coordinator_vmx_off: flag("/crash/coordinator_vmx_off"),
        vmcb_loaded: optional("/crash/vmcb_loaded").unwrap_or(0),
        vmcb_cleared: optional("/crash/vmcb_cleared").unwrap_or(0),
        vmcb_on_stragglers: optional("/crash/vmcb_on_stragglers").unwrap_or(0),
        svm_off_cpus: optional("/crash/svm_off_cpus").unwrap_or(0),
        coordinator_svm_off: outcome
            .report
            .pointer("/crash/coordinator_svm_off")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        nmi_in_guest,
        shootdown_us: number(outcome, "/crash/shootdown_us"),
        timed_out: flag("/crash/timed_out"),
        nmi_latency_us: latency,
    }
}

impl Crash {
    /// Whether the guests ran with SVM (the lists held VMCBs).
    pub fn svm(&self) -> bool {
        self.backend == "svm"
    }

    /// Contexts (VMCSes, or VMCBs on SVM) loaded when the crash came.
    pub fn loaded(&self) -> u64 {
        if self.svm() {
            self.vmcb_loaded
        } else {
            self.vmcs_loaded
        }
    }

    /// Contexts the crash path cleared.
    pub fn cleared(&self) -> u64 {
        if self.svm() {
            self.vmcb_cleared
        } else {
            self.vmcs_cleared
        }
    }

    /// Loaded contexts held by stragglers.
    pub fn on_stragglers(&self) -> u64 {
        if self.svm() {
            self.vmcb_on_stragglers
        } else {
            self.vmcs_on_stragglers
        }
    }

    /// CPUs whose crash NMI came as a guest's exit.
    pub fn nmi_in_guest_cpus(&self) -> usize {
        self.nmi_in_guest
            .iter()
            .filter(|entry| **entry == Some(true))
            .count()
    }
}

/// The invariants of a correct shootdown, whatever the trigger: every CPU
/// expected checked in but the stragglers, each left VMX (and SVM, on SVM),
/// the coordinator too, and every loaded VMCS (VMCB) was cleared or is held
/// by a straggler. Also that xtask judged the run ok and that hv never said
/// `done`.
#[track_caller]
pub fn assert_clean_shootdown(run: &RunOutcome) -> Crash {
    assert_ok(run);
    assert!(
        run.report.get("done").is_none(),
        "a crash run reported done\n{}",
        explain(run)
    );
    let crash = crash(run);
    let why = || format!("{crash:#?}\n{}", explain(run));
    assert_eq!(
        crash.checked_in,
        crash.expected - crash.stragglers.len() as u64,
        "checked_in != expected - stragglers\n{}",
        why()
    );
    assert_eq!(
        crash.cleared() + crash.on_stragglers(),
        crash.loaded(),
        "a loaded VMCS or VMCB was not cleared\n{}",
        why()
    );
    if crash.svm() {
        assert_eq!(crash.vmcs_loaded, 0, "a VMCS on SVM\n{}", why());
        assert_eq!(
            crash.svm_off_cpus,
            crash.checked_in,
            "svm_off_cpus != checked_in\n{}",
            why()
        );
        assert!(
            crash.coordinator_svm_off,
            "coordinator still in SVM\n{}",
            why()
        );
    }
    assert_eq!(
        crash.vmxoff_cpus,
        crash.checked_in,
        "vmxoff_cpus != checked_in\n{}",
        why()
    );
    assert!(
        crash.coordinator_vmx_off,
        "coordinator still in VMX\n{}",
        why()
    );
    assert_eq!(
        crash.timed_out,
        !crash.stragglers.is_empty(),
        "timed_out without stragglers or stragglers without timeout\n{}",
        why()
    );
    assert_eq!(
        crash.nmi_latency_us.get(crash.cpu_index as usize),
        Some(&None),
        "the coordinator has an NMI latency\n{}",
        why()
    );
    if run.report["crash"].get("vmxoff_executed").is_some() {
        assert_vmx_accounting(run);
    }
    crash
}

/// The crash report's VMX accounting (issue 9), read key by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmxAccounting {
    /// CPUs that executed VMXOFF (a real one, not a #UD outside VMX).
    pub vmxoff_executed: u64,
    /// CPUs that had VMX on at the crash.
    pub vmx_was_on_cpus: u64,
    /// Per CPU index: the VMCSes its records say it held.
    pub vmcs_loaded_per_cpu: Vec<u64>,
    /// Per CPU index: the crash VMCLEARs it executed itself.
    pub vmclear_credits: Vec<u64>,
    /// Per CPU index: of those, the VMCLEARs that repeated one its own
    /// unload had executed (the crash came before the unlink).
    pub vmclear_repeats: Vec<u64>,
}

/// Asserts the VMX accounting of a crash run: every CPU that had VMX on
/// executed VMXOFF, no VMCS was cleared by another CPU or lost, and each
/// CPU that checked in (and the coordinator) executed exactly the crash
/// VMCLEARs of the VMCSes its records say it held, plus the repeats of an
/// unload's VMCLEAR. Without VMX (QEMU
/// TCG) nothing had it on, nothing executed VMXOFF, and the summary
/// makes no VMX claim.
#[track_caller]
pub fn assert_vmx_accounting(run: &RunOutcome) -> VmxAccounting {
    let accounting = VmxAccounting {
        vmxoff_executed: number(run, "/crash/vmxoff_executed"),
        vmx_was_on_cpus: number(run, "/crash/vmx_was_on_cpus"),
        vmcs_loaded_per_cpu: numbers(run, "/crash/vmcs_loaded_per_cpu"),
        vmclear_credits: numbers(run, "/crash/vmclear_credits"),
        vmclear_repeats: numbers(run, "/crash/vmclear_repeats"),
    };
    let why = || format!("{accounting:#?}\n{}", explain(run));
    assert_eq!(
        accounting.vmxoff_executed,
        accounting.vmx_was_on_cpus,
        "a CPU with VMX on did not execute VMXOFF\n{}",
        why()
    );
    assert_eq!(number(run, "/crash/vmcs_cleared_elsewhere"), 0, "{}", why());
    assert_eq!(number(run, "/crash/vmcs_lost"), 0, "{}", why());
    let coordinator = number(run, "/crash/cpu_index") as usize;
    let seen: Vec<Option<u64>> = field(run, "/crash/checkin_us")
        .as_array()
        .map(|list| list.iter().map(Value::as_u64).collect())
        .unwrap_or_default();
    for (cpu, ((held, cleared), repeated)) in accounting
        .vmcs_loaded_per_cpu
        .iter()
        .zip(&accounting.vmclear_credits)
        .zip(&accounting.vmclear_repeats)
        .enumerate()
    {
        if cpu == coordinator || seen.get(cpu).copied().flatten().is_some() {
            // A VMCS whose unload VMCLEARed it, still listed when the
            // crash came (VMCLEAR before unlink), is cleared again.
            assert_eq!(
                held + repeated,
                *cleared,
                "CPU {cpu}: VMCSes held by its records (plus repeats) and its own crash \
                 VMCLEARs differ\n{}",
                why()
            );
        }
    }
    if run.report["emulator"] == "qemu-tcg" {
        assert_eq!(
            (accounting.vmxoff_executed, accounting.vmx_was_on_cpus),
            (0, 0),
            "QEMU TCG has no VMX\n{}",
            why()
        );
        // With SVM the summary's line speaks of VMCBs and SVM instead.
        let svm = run.report["crash"]["backend"] == "svm";
        let summary = run.summary();
        let heading = if svm { "  VMCB" } else { "  VMCS" };
        let line = summary
            .lines()
            .find(|line| line.starts_with(heading))
            .unwrap_or_else(|| panic!("no {} line in the summary:\n{summary}", heading.trim()));
        assert!(
            (svm || line.ends_with("; no VMX ran")) && !line.contains("VMXOFF"),
            "the summary claims VMX where none ran: {line}"
        );
    }
    accounting
}

/// Fails the test unless xtask judged the run ok, showing why.
#[track_caller]
pub fn assert_ok(outcome: &RunOutcome) {
    assert!(outcome.ok, "run was not ok\n{}", explain(outcome));
}

/// The value at a JSON pointer (`/cpus/possible`) of the report, failing the
/// test with the whole story when it is absent.
#[track_caller]
pub fn field<'a>(outcome: &'a RunOutcome, pointer: &str) -> &'a Value {
    outcome
        .report
        .pointer(pointer)
        .unwrap_or_else(|| panic!("the report has no {pointer}\n{}", explain(outcome)))
}

/// A number in the report (see [`field`]).
#[track_caller]
pub fn number(outcome: &RunOutcome, pointer: &str) -> u64 {
    field(outcome, pointer)
        .as_u64()
        .unwrap_or_else(|| panic!("{pointer} is not a number\n{}", explain(outcome)))
}

/// An array of numbers in the report (see [`field`]), such as APIC IDs.
#[track_caller]
pub fn numbers(outcome: &RunOutcome, pointer: &str) -> Vec<u64> {
    field(outcome, pointer)
        .as_array()
        .and_then(|items| items.iter().map(Value::as_u64).collect())
        .unwrap_or_else(|| panic!("{pointer} is not an array of numbers\n{}", explain(outcome)))
}

/// A string in the report (see [`field`]).
#[track_caller]
pub fn string<'a>(outcome: &'a RunOutcome, pointer: &str) -> &'a str {
    field(outcome, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string\n{}", explain(outcome)))
}

/// Everything needed to understand a failed assertion: the verdict, the
/// report and the end of the serial log.
pub fn explain(outcome: &RunOutcome) -> String {
    const TAIL_LINES: usize = 40;
    let lines: Vec<&str> = outcome.serial.lines().collect();
    let tail: Vec<String> = lines[lines.len().saturating_sub(TAIL_LINES)..]
        .iter()
        .map(|line| xtask::serial::strip_ansi(line))
        .collect();
    format!(
        "reason: {}\nrun directory: {}\nreport:\n{}\nlast {} serial lines:\n{}",
        outcome.reason.as_deref().unwrap_or("none"),
        outcome.run_dir.display(),
        serde_json::to_string_pretty(&outcome.report).unwrap_or_default(),
        tail.len(),
        tail.join("\n")
    )
}
