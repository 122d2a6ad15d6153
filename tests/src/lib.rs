//! Helpers for the integration tests in `tests/tests/`: boot the real hv
//! image in QEMU or Bochs through the xtask library and explain failures
//! with what the hypervisor reported.
//!
//! The tests need emulators and run through `cargo xtask test`, which builds
//! hv once and hands the ELF over in `HV_ELF`. Run on their own
//! (`cargo test -p tests`), they build hv into a target directory of their
//! own: a `cargo build` on the target directory of the `cargo test` that is
//! running them could wait for its build lock.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use xtask::run::{self, BochsOptions, QemuOptions};
use xtask::stress::{self, Plain, StressOptions};

pub use xtask::run::{Boot, RunOutcome};
pub use xtask::stress::StressResult;

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
