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
    capture_qemu_within(name, boot, cpus, memory_mib, append, capture, QEMU_TIMEOUT)
}

/// [`capture_qemu`] with its own time limit (the runs at hundreds of CPUs).
#[track_caller]
pub fn capture_qemu_within(
    name: &str,
    boot: Boot,
    cpus: u32,
    memory_mib: u32,
    append: &[&str],
    capture: CaptureOptions,
    timeout: Duration,
) -> RunOutcome {
    let options = QemuOptions {
        smp: cpus,
        boot,
        memory_mib,
        append: append.iter().map(|word| word.to_string()).collect(),
        timeout,
        run_name: Some(name.to_owned()),
        ..QemuOptions::new(hv_elf())
    };
    capture::qemu(&options, &prepared(capture))
        .unwrap_or_else(|error| panic!("QEMU capture run {name} could not run: {error:#}"))
}

/// Boots hv in QEMU with hv's capture mode and presses the platform's
/// NMI button (QMP `inject-nmi`) `after_ms` after hv's boot report (see
/// `QemuOptions::nmi_button_after_ms`): no crash is injected beside it.
#[track_caller]
pub fn capture_qemu_button(name: &str, cpus: u32, append: &[&str], after_ms: u64) -> RunOutcome {
    let options = QemuOptions {
        smp: cpus,
        memory_mib: capture::HV_MEMORY_MIB,
        append: append.iter().map(|word| word.to_string()).collect(),
        timeout: QEMU_TIMEOUT,
        run_name: Some(name.to_owned()),
        nmi_button_after_ms: Some(after_ms),
        ..QemuOptions::new(hv_elf())
    };
    let capture = CaptureOptions {
        default_crash: None,
        ..CaptureOptions::new(capture::CaptureKernel::Hv, cpus)
    };
    capture::qemu(&options, &prepared(capture))
        .unwrap_or_else(|error| panic!("QEMU capture run {name} could not run: {error:#}"))
}

/// gdb's backtrace of CPU `cpu`'s thread in the run's dump (`thread
/// apply all bt`, the thread whose LWP is the CPU index plus one).
#[track_caller]
pub fn gdb_backtrace_of_cpu(run: &RunOutcome, cpu: u64) -> String {
    let dump = dump_path(run);
    let text = gdb(hv_elf(), &dump, &["thread apply all bt"]);
    let wanted = format!("(LWP {})", cpu + 1);
    text.split("\nThread ")
        .find(|block| {
            block
                .lines()
                .next()
                .is_some_and(|line| line.contains(&wanted))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no thread for CPU {cpu} (LWP {}) in:\n{text}", cpu + 1))
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

/// `xtask/debug/`: the gdb commands and the drgn module.
pub fn debug_dir() -> PathBuf {
    xtask::paths::workspace_root().join("xtask/debug")
}

/// The dump of a capture run.
#[track_caller]
pub fn dump_path(run: &RunOutcome) -> PathBuf {
    PathBuf::from(
        run.report["capture"]["dump_path"]
            .as_str()
            .unwrap_or_else(|| panic!("no dump_path\n{}", explain(run))),
    )
}

/// What `gdb hv DUMP` prints for `commands` after sourcing hv's gdb
/// commands (`xtask/debug/gdb/hv.py`).
#[track_caller]
pub fn gdb_hv_commands(run: &RunOutcome, commands: &[&str]) -> String {
    let source = format!("source {}", debug_dir().join("gdb/hv.py").display());
    let mut all = vec![source.as_str()];
    all.extend_from_slice(commands);
    let text = gdb(hv_elf(), &dump_path(run), &all);
    assert!(
        !text.contains("Python Exception") && !text.contains("Error occurred in Python"),
        "hv's gdb commands failed:\n{text}"
    );
    text
}

/// What `drgn -c DUMP -s hv xtask/debug/drgn/hv_drgn.py COMMANDS...`
/// prints (drgn attaches hv's symbols by the build ID the dump's image
/// notes lead it to). drgn must be installed (`pip install drgn`).
#[track_caller]
pub fn drgn_hv(run: &RunOutcome, commands: &[&str]) -> String {
    let output = Command::new("drgn")
        .arg("-q")
        .arg("-c")
        .arg(dump_path(run))
        .arg("-s")
        .arg(hv_elf())
        .arg(debug_dir().join("drgn/hv_drgn.py"))
        .args(commands)
        .output()
        .unwrap_or_else(|error| panic!("could not run drgn (pip install drgn): {error}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "drgn failed:\n{text}");
    assert!(
        !text.contains("no build ID") && !text.contains("could not get debugging information"),
        "drgn did not attach hv's symbols:\n{text}"
    );
    text
}

/// The loaded-VMCS list lines (`  CPU   n: k loaded...`) of `hv vmcs`
/// (gdb) or `hv_drgn.py vmcs`, by CPU.
pub fn vmcs_lines(text: &str) -> Vec<(u32, String)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("  CPU ")?;
            let (cpu, list) = rest.split_once(':')?;
            let cpu = cpu.trim().parse().ok()?;
            list.split_whitespace()
                .nth(1)
                .filter(|word| word.trim_end_matches(':') == "loaded")?;
            Some((cpu, line.to_owned()))
        })
        .collect()
}

/// The physical addresses on one `vmcs_lines` line.
pub fn listed_vmcs(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .filter_map(|word| word.strip_prefix("0x"))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .collect()
}

/// Asserts that drgn symbolizes every CPU's stack and that the crashing
/// CPU's reaches the panic site (the injected crash's `...::inject::fire`,
/// found by its last path components as hv's modules move, through
/// `core::panicking::panic_fmt`), and that the drgn module lists every
/// CPU's loaded VMCSes. Returns the `vmcs` lines.
#[track_caller]
pub fn assert_drgn_reads(run: &RunOutcome, cpus: u32) -> Vec<(u32, String)> {
    let text = drgn_hv(run, &["bt", "vmcs"]);
    let blocks: Vec<&str> = text.split("\nCPU ").collect();
    let stacks: Vec<&str> = blocks
        .into_iter()
        .map(|block| block.strip_prefix("CPU ").unwrap_or(block))
        .filter(|block| block.contains("(thread "))
        .collect();
    assert_eq!(stacks.len(), cpus as usize, "one stack per CPU:\n{text}");
    let coordinator = crate::number(run, "/crash/cpu_index");
    assert!(
        stacks[0].starts_with(&format!("{coordinator} (thread {})", coordinator + 1)),
        "the crashed thread comes first, the coordinator's:\n{text}"
    );
    for stack in &stacks {
        let first = stack
            .lines()
            .find(|line| line.trim_start().starts_with("#0"))
            .unwrap_or_else(|| panic!("no frame #0:\n{stack}"));
        let symbol = first.split(" in ").nth(1).unwrap_or("");
        assert!(
            !symbol.is_empty() && !symbol.starts_with("0x") && !symbol.starts_with("??"),
            "frame #0 is not symbolized: {first}\n{text}"
        );
        // Rust code has line tables; hv's assembly stubs (`trap_common`,
        // where an NMI may catch a CPU entering an interrupt) have a
        // symbol only.
        assert!(
            first.contains(" at ") || !symbol.contains("::"),
            "no source line: {first}\n{text}"
        );
    }
    let panic_fmt = stacks[0].find("in core::panicking::panic_fmt");
    let fire = stacks[0].find("::inject::fire at ");
    assert!(
        matches!((panic_fmt, fire), (Some(p), Some(f)) if p < f),
        "the crashed thread's stack does not reach inject::fire through panic_fmt:\n{}",
        stacks[0]
    );
    let lines = vmcs_lines(&text);
    let listed: Vec<u32> = lines.iter().map(|(cpu, _)| *cpu).collect();
    assert_eq!(
        listed,
        (0..cpus).collect::<Vec<_>>(),
        "a loaded-VMCS list per CPU:\n{text}"
    );
    lines
}

/// Asserts that hv's capture mode woke every CPU that checked in (issue
/// 13), each named by its APIC ID, none silent, the old boot CPU too when
/// `old_boot_cpu` is `warm_reset` (it is not the coordinator), with the
/// old RAM below 1 MiB unchanged by the wake, and that the woken CPUs
/// shared the dump's work. Returns the APIC IDs woken.
#[track_caller]
pub fn assert_hv_woke_every_cpu(run: &RunOutcome, checked_in: u64, old_boot_cpu: &str) -> Vec<u64> {
    let capture = &run.report["capture"];
    assert_eq!(
        crate::number(run, "/crash/checked_in"),
        checked_in,
        "{}",
        explain(run)
    );
    let woken = crate::numbers(run, "/capture/woken");
    assert_eq!(woken.len() as u64, checked_in, "{}", explain(run));
    assert_eq!(capture["silent"], serde_json::json!([]), "{}", explain(run));
    assert_eq!(
        capture["wake_error"],
        serde_json::Value::Null,
        "{}",
        explain(run)
    );
    assert_eq!(capture["old_boot_cpu"], old_boot_cpu, "{}", explain(run));
    assert_eq!(capture["low_memory_unchanged"], true, "{}", explain(run));
    // Every woken CPU is one that checked in: the crash report's APIC IDs
    // but the coordinator's.
    // (when hv printed its CPUs before the crash).
    let coordinator = crate::number(run, "/crash/cpu");
    if let Some(ids) = run
        .report
        .pointer("/cpus/apic_ids")
        .and_then(|v| v.as_array())
    {
        let mut expected: Vec<u64> = ids
            .iter()
            .filter_map(|id| id.as_u64())
            .filter(|&id| id != coordinator)
            .collect();
        let mut sorted = woken.clone();
        sorted.sort_unstable();
        expected.sort_unstable();
        assert_eq!(sorted, expected, "{}", explain(run));
    }
    assert!(!woken.contains(&coordinator), "{}", explain(run));
    let check = &capture["wake_check"];
    assert_eq!(check["woken"], checked_in, "{}", explain(run));
    assert_eq!(check["ok"], true, "{}", explain(run));
    // The woken CPUs judged the zero pages (those that came up before the
    // chunks ran out); the streaming CPU took their verdicts.
    let workers = crate::number(run, "/capture/workers");
    assert!(
        (2..=checked_in + 1).contains(&workers),
        "{workers} workers\n{}",
        explain(run)
    );
    assert!(
        crate::number(run, "/capture/helper_pages") > 0,
        "{}",
        explain(run)
    );
    assert!(
        crate::number(run, "/capture/taken_pages") > 0,
        "{}",
        explain(run)
    );
    woken
}
