//! Helpers for the crash-capture tests: runs with a capture kernel, the
//! dump they leave, and what gdb makes of it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use xtask::capture::{self, CaptureOptions};
use xtask::dump::DumpInfo;
use xtask::run::{BochsOptions, Boot, QemuOptions, RunOutcome};

use crate::{explain, hv_elf};

/// A capture run takes longer than a plain one: the capture kernel boots
/// and the dump crosses (Linux copies hundreds of MB under TCG).
const QEMU_TIMEOUT: Duration = Duration::from_secs(420);
const BOCHS_TIMEOUT: Duration = Duration::from_secs(600);

/// The hv capture-mode image for the default reservation, built at most
/// once per test binary.
pub fn hv_capture_elf() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| match std::env::var_os(xtask::kernel::CAPTURE_ELF_ENV) {
        Some(path) => xtask::paths::workspace_root().join(path),
        None => {
            let (_, base) = capture::parse_crashkernel(capture::HV_CRASHKERNEL)
                .expect("the default reservation parses");
            xtask::kernel::build_capture(base.expect("the default reservation has a base"))
                .expect("building the hv capture image for the tests")
        }
    })
}

/// The capture options of a test: `capture` with the prebuilt hv capture
/// image when it is hv's capture mode and no other image is given.
fn prepared(mut capture: CaptureOptions) -> CaptureOptions {
    if capture.kernel == capture::CaptureKernel::Hv && capture.image.is_none() {
        capture.image = Some(hv_capture_elf().to_path_buf());
    }
    capture
}

/// Boots hv in QEMU with a capture kernel (see `xtask::capture::qemu`).
#[track_caller]
pub fn capture_qemu(
    name: &str,
    boot: Boot,
    cpus: u32,
    memory_mib: u32,
    append: &[&str],
    capture: CaptureOptions,
) -> RunOutcome {
    let options = QemuOptions {
        smp: cpus,
        boot,
        memory_mib,
        append: append.iter().map(|word| word.to_string()).collect(),
        timeout: QEMU_TIMEOUT,
        run_name: Some(name.to_owned()),
        ..QemuOptions::new(hv_elf())
    };
    capture::qemu(&options, &prepared(capture))
        .unwrap_or_else(|error| panic!("QEMU capture run {name} could not run: {error:#}"))
}

/// Boots hv in Bochs with its capture mode.
#[track_caller]
pub fn capture_bochs(
    name: &str,
    cpus: u32,
    append: &[&str],
    capture: CaptureOptions,
) -> RunOutcome {
    let options = BochsOptions {
        cpus,
        memory_mib: capture::HV_MEMORY_MIB,
        append: append.iter().map(|word| word.to_string()).collect(),
        timeout: BOCHS_TIMEOUT,
        run_name: Some(name.to_owned()),
        ..BochsOptions::new(hv_elf())
    };
    capture::bochs(&options, &prepared(capture))
        .unwrap_or_else(|error| panic!("Bochs capture run {name} could not run: {error:#}"))
}

/// Boots hv in Bochs with its capture mode and these boot modules
/// (guests) beside the capture image.
#[track_caller]
pub fn capture_bochs_with_modules(
    name: &str,
    cpus: u32,
    append: &[&str],
    modules: Vec<xtask::iso::BootModule>,
    capture: CaptureOptions,
) -> RunOutcome {
    let options = BochsOptions {
        cpus,
        memory_mib: capture::HV_MEMORY_MIB,
        append: append.iter().map(|word| word.to_string()).collect(),
        timeout: BOCHS_TIMEOUT,
        run_name: Some(name.to_owned()),
        modules,
        ..BochsOptions::new(hv_elf())
    };
    capture::bochs(&options, &prepared(capture))
        .unwrap_or_else(|error| panic!("Bochs capture run {name} could not run: {error:#}"))
}

/// Asserts that the run captured its crash: xtask judged it ok, the
/// capture kernel was entered, and the dump is there, complete, with one
/// CPU note per CPU of the machine. Returns the dump.
#[track_caller]
pub fn assert_captured(run: &RunOutcome, cpus: usize) -> DumpInfo {
    crate::assert_ok(run);
    let capture = &run.report["capture"];
    assert_eq!(capture["entered"], true, "{}", explain(run));
    assert_eq!(capture["digest_ok"], true, "{}", explain(run));
    let path = capture["dump_path"]
        .as_str()
        .unwrap_or_else(|| panic!("no dump_path\n{}", explain(run)));
    let info = DumpInfo::read(Path::new(path))
        .unwrap_or_else(|error| panic!("the dump does not read: {error:#}\n{}", explain(run)));
    assert!(
        info.problems().is_empty(),
        "{:?}\n{}",
        info.problems(),
        explain(run)
    );
    assert_eq!(info.cpus.len(), cpus, "{}", explain(run));
    assert_eq!(capture["cpu_notes"], cpus, "{}", explain(run));
    assert_eq!(capture["dump_bytes"], info.file_bytes, "{}", explain(run));
    info
}

/// What `gdb -batch ELF DUMP -ex COMMAND...` prints.
#[track_caller]
pub fn gdb(elf: &Path, dump: &Path, commands: &[&str]) -> String {
    let mut command = Command::new("gdb");
    command.arg("-batch").arg("-nx").arg(elf).arg(dump);
    for line in commands {
        command.arg("-ex").arg(line);
    }
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("could not run gdb (apt-get install gdb): {error}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "gdb failed:\n{text}");
    text
}

/// The thread lines of gdb's `info threads`.
pub fn gdb_threads(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|line| {
            let mut words = line.trim_start_matches('*').split_whitespace();
            words.next().is_some_and(|id| id.parse::<u32>().is_ok()) && words.next() == Some("LWP")
        })
        .collect()
}

/// Asserts that gdb, given hv's ELF and the run's dump, lists one thread
/// per CPU and that the crashing CPU's backtrace (gdb's current thread)
/// reaches the panic site, the injected crash's `hv::crash::inject::fire`.
#[track_caller]
pub fn assert_gdb_reads(run: &RunOutcome, cpus: usize) {
    let dump = run.report["capture"]["dump_path"]
        .as_str()
        .unwrap_or_else(|| panic!("no dump_path\n{}", explain(run)));
    let text = gdb(hv_elf(), Path::new(dump), &["info threads", "bt"]);
    assert_eq!(gdb_threads(&text).len(), cpus, "gdb says:\n{text}");
    let backtrace = text
        .rsplit_once("\n#0 ")
        .map(|(_, bt)| bt)
        .unwrap_or_else(|| panic!("no backtrace in:\n{text}"));
    for frame in [
        "hv::panic",
        "core::panicking::panic_fmt",
        "hv::crash::inject::fire",
    ] {
        assert!(
            backtrace.contains(&format!(" in {frame} "))
                || backtrace.contains(&format!(" {frame} (")),
            "no frame {frame} in the crashing CPU's backtrace:\n{text}"
        );
    }
}
