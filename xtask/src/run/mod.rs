//! Booting hv in an emulator and judging the run: the API the command line
//! and the integration tests share.
//!
//! A run builds its boot media into its own directory under `build/`, starts
//! the emulator with a kill-on-drop guard, follows the serial log until the
//! emulator ends (or the time limit kills it), merges hv's report lines and
//! adds what xtask knows: `emulator`, `boot`, `ok`, `reason`, `serial_log`
//! and an `xtask` object with the details of the run.

mod bochs;
mod qemu;
mod qmp;
mod watch;

pub use bochs::{
    BOCHS_MAX_CPUS, BOCHS_MAX_CPUS_WITH_DISK, BOCHS_NEEDS, BochsOptions, CPU_MODEL, bochs, bochsrc,
    bochsrc_with_model, check_cpus, check_cpus_with_disk,
};
pub use qemu::{
    Firmware, GrubSetup, QemuOptions, SCALED_WATCHDOG_FROM_CPUS, find_ovmf, qemu, qemu_needs,
};
pub(crate) use qemu::{Media, drive_path, qemu_args};
pub use watch::{CAPTURE_HEADER_MARKER, StopWhen};

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::report::{self, End, ExitConvention, Expectations, ExpectedSection, MalformedLine};
pub(crate) use watch::Watched;

/// Called with every serial line as it arrives (progress, timing).
#[derive(Clone)]
pub struct LineHook(pub std::sync::Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for LineHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineHook")
    }
}

/// How the emulator boots hv.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Boot {
    /// QEMU loads the ELF itself (`-kernel`, PVH entry).
    Direct,
    /// GRUB from the ISO on legacy BIOS (SeaBIOS, or Bochs' BIOS), multiboot2.
    GrubBios,
    /// GRUB from the ISO on UEFI firmware (OVMF), multiboot2.
    GrubUefi,
}

impl Boot {
    /// The `boot` value of the run report.
    pub fn as_str(self) -> &'static str {
        match self {
            Boot::Direct => "direct",
            Boot::GrubBios => "grub-bios",
            Boot::GrubUefi => "grub-uefi",
        }
    }
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The run report: hv's merged report plus xtask's keys (the JSON that
    /// `--report` writes).
    pub report: Value,
    /// The whole serial log as text.
    pub serial: String,
    /// Whether the run passed (same as `report["ok"]`).
    pub ok: bool,
    /// What was wrong, when not ok (same as `report["reason"]`).
    pub reason: Option<String>,
    /// The directory holding this run's ISO, logs and `report.json`.
    pub run_dir: PathBuf,
}

impl RunOutcome {
    /// A short human summary of the run.
    pub fn summary(&self) -> String {
        report::summary(&self.report)
    }

    /// Writes the report as pretty JSON to `path`.
    pub fn write_report(&self, path: &Path) -> Result<()> {
        write_json(path, &self.report)
    }

    /// Adds `notes` to the report's `xtask.notes` (what the command line
    /// changed about the run, e.g. a fallback) and saves `report.json` in
    /// the run directory again.
    pub fn add_notes(&mut self, notes: &[String]) -> Result<()> {
        if notes.is_empty() {
            return Ok(());
        }
        if !self.report["xtask"]["notes"].is_array() {
            self.report["xtask"]["notes"] = json!([]);
        }
        if let Some(list) = self.report["xtask"]["notes"].as_array_mut() {
            list.extend(notes.iter().map(|note| json!(note)));
        }
        self.write_report(&self.run_dir.join("report.json"))
    }
}

/// Everything about a finished run that goes into its report besides hv's
/// own lines.
#[derive(Debug)]
pub(crate) struct Finished<'a> {
    pub(crate) emulator: &'a str,
    pub(crate) boot: Boot,
    /// The hv ELF that was booted.
    pub(crate) elf: &'a Path,
    pub(crate) expect: Expectations,
    pub(crate) convention: ExitConvention,
    pub(crate) cmdline: &'a str,
    pub(crate) run_dir: &'a Path,
    pub(crate) serial_log: &'a Path,
    /// The emulator's own log file (Bochs' `log:`), or its console output.
    pub(crate) emulator_log: &'a Path,
    /// What the emulator printed on stdout and stderr.
    pub(crate) console_log: &'a Path,
    pub(crate) notes: Vec<String>,
    /// What the emulator's log says went wrong (Bochs' `>>PANIC<<` and
    /// `>>ERROR<<` lines): each one fails the run and is named in its
    /// verdict.
    pub(crate) emulator_problems: Vec<String>,
    pub(crate) watched: Watched,
    /// The QEMU program (`xtask.qemu`), on QEMU runs.
    pub(crate) qemu: Option<Value>,
    /// The NMI button (`xtask.nmi_button`), when the run pressed it.
    pub(crate) nmi_button: Option<NmiButtonSection>,
}

/// Judges a finished run, assembles its report and saves it as
/// `report.json` in the run directory.
pub(crate) fn finish(run: Finished<'_>) -> Result<RunOutcome> {
    let malformed = run.watched.collector.malformed().to_vec();
    let lines = run.watched.collector.lines_seen();
    let report_lines = run.watched.collector.report_lines();
    let hv_report = run.watched.collector.into_report();
    let mut verdict = report::judge(&hv_report, &run.expect, run.watched.end, run.convention);
    if !verdict.ok && run.watched.serial_bytes == 0 {
        // The guest never spoke: the emulator's own words are the best clue
        // (a missing file, a bad option, a firmware that did not start).
        let said = last_line(run.console_log).unwrap_or_else(|| "nothing".to_owned());
        verdict.reason = Some(format!(
            "{}; no serial output at all; the emulator's last words: {said}",
            verdict.reason.unwrap_or_default()
        ));
    }
    if !run.emulator_problems.is_empty() {
        // First: the emulator's own failure explains what follows from it.
        let said = format!("{} log: {}", run.emulator, run.emulator_problems.join("; "));
        verdict.ok = false;
        verdict.reason = Some(match verdict.reason {
            Some(reason) => format!("{said}; {reason}"),
            None => said,
        });
    }

    let (exit_status, timed_out) = match run.watched.end {
        End::Exited(status) => (status, false),
        End::TimedOut(_) => (None, true),
    };
    let mut report = hv_report;
    if !report.is_object() {
        report = json!({});
    }
    let xtask = XtaskSection {
        cpus_requested: run.expect.cpus,
        elf: run.elf.to_path_buf(),
        expected: run.expect.section(),
        cmdline: run.cmdline.to_owned(),
        exit_status,
        timed_out,
        elapsed_secs: (run.watched.elapsed.as_secs_f64() * 100.0).round() / 100.0,
        serial_lines: lines,
        report_lines,
        malformed_lines: malformed.iter().map(MalformedLineSection::of).collect(),
        emulator_log: run.emulator_log.to_path_buf(),
        emulator_output: run.console_log.to_path_buf(),
        notes: run.notes,
        emulator_problems: run.emulator_problems,
        qemu: run.qemu,
        nmi_button: run.nmi_button,
        stopped_by_xtask: run.watched.stopped_by_xtask,
    };
    let xtask = serde_json::to_value(&xtask).context("serialising the report's xtask object")?;
    let owned = [
        ("emulator", json!(run.emulator)),
        ("boot", json!(run.boot.as_str())),
        ("ok", json!(verdict.ok)),
        ("reason", json!(verdict.reason)),
        ("serial_log", json!(run.serial_log)),
        ("xtask", xtask),
    ];
    if let Value::Object(map) = &mut report {
        for (key, value) in owned {
            map.insert(key.to_owned(), value);
        }
    }

    write_json(&run.run_dir.join("report.json"), &report)?;
    let serial = fs::read(run.serial_log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    Ok(RunOutcome {
        report,
        serial,
        ok: verdict.ok,
        reason: verdict.reason,
        run_dir: run.run_dir.to_path_buf(),
    })
}

/// The last non-blank line of a text file, if any.
fn last_line(path: &Path) -> Option<String> {
    let text = fs::read(path).ok()?;
    String::from_utf8_lossy(&text)
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(str::to_owned)
}

/// Fails early, with the path, when the ELF to boot is not there (an
/// emulator would only say so in its own log).
fn check_elf(elf: &Path) -> Result<()> {
    if !elf.is_file() {
        anyhow::bail!("no hv ELF at {}", elf.display());
    }
    Ok(())
}

/// The run report's `xtask` object: what xtask saw of the run
/// (`xtask/REPORT.md`, "The run report").
#[derive(Debug, Clone, serde::Serialize)]
pub struct XtaskSection {
    pub cpus_requested: u32,
    /// The hv ELF booted.
    pub elf: PathBuf,
    pub expected: ExpectedSection,
    /// hv's command line as passed.
    pub cmdline: String,
    /// `None` (null) when the emulator was killed.
    pub exit_status: Option<i32>,
    pub timed_out: bool,
    pub elapsed_secs: f64,
    pub serial_lines: usize,
    pub report_lines: usize,
    pub malformed_lines: Vec<MalformedLineSection>,
    pub emulator_log: PathBuf,
    pub emulator_output: PathBuf,
    pub notes: Vec<String>,
    pub emulator_problems: Vec<String>,
    /// Only on QEMU runs: the QEMU program (`qemu_program::report_of`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu: Option<Value>,
    /// Only when the run pressed the NMI button.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nmi_button: Option<NmiButtonSection>,
    /// Only when xtask ended the emulator itself: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_by_xtask: Option<&'static str>,
}

/// `xtask.nmi_button`: the platform's NMI button, pressed over QMP.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NmiButtonSection {
    pub after_ms: u64,
    /// QMP said `return`.
    pub pressed: bool,
    /// From QEMU's start; null when never pressed.
    pub at_secs: Option<f64>,
    pub after_report_ms: Option<u64>,
    /// QMP's error, or null.
    pub error: Option<String>,
}

/// One of `xtask.malformed_lines`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MalformedLineSection {
    /// 1-based line number in the serial log.
    pub line: usize,
    pub text: String,
    pub error: String,
}

impl MalformedLineSection {
    fn of(line: &MalformedLine) -> Self {
        Self {
            line: line.line_number,
            text: line.text.clone(),
            error: line.error.clone(),
        }
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("serialising the report")?;
    text.push('\n');
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Creates (or reuses) the directory of run `name` and removes the logs of
/// an earlier run there, so nothing stale is read as this run's output.
pub(crate) fn prepare_run_dir(name: &str, logs: &[&str]) -> Result<PathBuf> {
    let dir = crate::paths::run_dir(name);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for log in logs {
        let path = dir.join(log);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("removing {}", path.display()));
            }
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::ReportCollector;
    use std::time::Duration;

    #[test]
    fn the_run_report_adds_xtask_keys_to_what_hv_said() {
        let dir = std::env::temp_dir().join(format!("xtask-finish-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let serial_log = dir.join("serial.log");
        fs::write(&serial_log, "boot\n@hv {\"done\":true}\n").unwrap();
        let mut collector = ReportCollector::default();
        for line in [
            "@hv {\"cpus\":{\"possible\":2,\"online\":2,\"failed\":[]}}",
            "@hv {oops",
            "@hv {\"done\":true}",
        ] {
            collector.feed_line(line);
        }
        let outcome = finish(Finished {
            emulator: "qemu-tcg",
            boot: Boot::GrubUefi,
            elf: Path::new("/t/hv"),
            expect: Expectations::all_cpus(4),
            convention: ExitConvention::QemuDebugExit,
            cmdline: "finish=exit",
            run_dir: &dir,
            serial_log: &serial_log,
            emulator_log: &dir.join("qemu.log"),
            console_log: &dir.join("qemu.log"),
            notes: vec!["a note".to_owned()],
            emulator_problems: Vec::new(),
            watched: Watched {
                end: End::Exited(Some(0x21)),
                elapsed: Duration::from_millis(1234),
                collector,
                serial_bytes: 10,
                stopped_by_xtask: None,
                pressed: None,
            },
            qemu: None,
            nmi_button: None,
        })
        .unwrap();

        let report = &outcome.report;
        for key in report::XTASK_KEYS {
            assert!(report.get(key).is_some(), "{key} missing");
        }
        assert_eq!(report["emulator"], "qemu-tcg");
        assert_eq!(report["boot"], "grub-uefi");
        assert_eq!(report["ok"], false);
        assert_eq!(
            report["reason"],
            "cpus.possible is 2, expected 4; cpus.online is 2, expected 4 (all 4 CPUs)"
        );
        assert_eq!(report["xtask"]["expected"]["cpus_online"], 4);
        assert_eq!(report["serial_log"], json!(serial_log));
        assert_eq!(report["cpus"]["online"], 2);
        assert_eq!(report["xtask"]["exit_status"], 0x21);
        assert_eq!(report["xtask"]["timed_out"], false);
        assert_eq!(report["xtask"]["elapsed_secs"], 1.23);
        assert_eq!(report["xtask"]["malformed_lines"][0]["line"], 2);
        assert_eq!(report["xtask"]["notes"][0], "a note");
        assert_eq!(report["xtask"]["elf"], "/t/hv");
        assert!(!outcome.ok);
        assert_eq!(outcome.serial, "boot\n@hv {\"done\":true}\n");
        let saved: Value =
            serde_json::from_str(&fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
        assert_eq!(&saved, report);

        let mut outcome = outcome;
        outcome.add_notes(&["a fallback".to_owned()]).unwrap();
        assert_eq!(
            outcome.report["xtask"]["notes"],
            json!(["a note", "a fallback"])
        );
        let saved: Value =
            serde_json::from_str(&fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
        assert_eq!(saved["xtask"]["notes"][1], "a fallback");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_silent_failure_quotes_the_emulator() {
        let dir = std::env::temp_dir().join(format!("xtask-silent-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let console = dir.join("qemu.log");
        fs::write(&console, "qemu: could not open kernel file 'hv'\n\n").unwrap();
        let outcome = finish(Finished {
            emulator: "qemu-tcg",
            boot: Boot::Direct,
            elf: Path::new("/t/hv"),
            expect: Expectations::all_cpus(1),
            convention: ExitConvention::QemuDebugExit,
            cmdline: "finish=exit",
            run_dir: &dir,
            serial_log: &dir.join("serial.log"),
            emulator_log: &console,
            console_log: &console,
            notes: Vec::new(),
            emulator_problems: Vec::new(),
            watched: Watched {
                end: End::Exited(Some(1)),
                elapsed: Duration::ZERO,
                collector: ReportCollector::default(),
                serial_bytes: 0,
                stopped_by_xtask: None,
                pressed: None,
            },
            qemu: None,
            nmi_button: None,
        })
        .unwrap();
        let reason = outcome.reason.unwrap();
        assert!(
            reason.ends_with("no serial output at all; the emulator's last words: qemu: could not open kernel file 'hv'"),
            "{reason}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_elf_is_named() {
        let error = check_elf(Path::new("/nonexistent/hv")).unwrap_err();
        assert_eq!(error.to_string(), "no hv ELF at /nonexistent/hv");
    }
}
