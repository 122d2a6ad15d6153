//! The `capture` object of the run report, and the capture's part of the
//! verdict.
//!
//! hv prints `capture` report lines itself: at boot `loaded`, `kernel` (or
//! `error`), in the crash path `digest_ok`, `jumped`, `handover_us`,
//! `refused`; hv's capture mode adds `entered`, `entered_us`, `streamed`,
//! `cpu_notes`, `dump_bytes`; the Linux initramfs adds `linux.copied`,
//! `linux.vmcore_bytes`, `linux.copy_ms`. xtask merges them like every
//! report line and then sets what it found itself:
//!
//! | key | meaning |
//! |---|---|
//! | `kernel` | the capture kernel asked for, `linux` or `hv` |
//! | `entered` | the capture kernel printed its marker after the crash: hv's capture mode its `"entered":true` line, Linux its banner (`Linux version`) or `/init`'s first line |
//! | `digest_ok` | hv's: the loaded image matched its boot-time digests |
//! | `dump_path`, `dump_bytes` | the extracted dump and its length (`null` when there is none) |
//! | `cpu_notes` | `NT_PRSTATUS` notes in the dump |
//! | `crash_to_capture_us` | from the crash to the capture kernel's entry, see below |
//! | `crash_to_capture_source` | `tsc` or `serial` |
//! | `dump_error` | why there is no usable dump |
//!
//! `crash_to_capture_us`: when hv reports the crash's and the capture
//! kernel's entry TSC (see `tsc_timing`; the TSC runs on across the
//! jump), their difference (`tsc`). Otherwise the wall-clock time between
//! the crash's first serial line (`*** hv: CRASH`) and the capture
//! kernel's first (hv's `capture: hv capture mode`, Linux's `Linux
//! version` banner) as xtask saw them arrive in the serial log (`serial`:
//! a few milliseconds of resolution; for Linux it includes the kernel's
//! decompression and early boot before its console is up).
//!
//! A capture run whose command line asks for a crash is ok when, on top of
//! the crash run's own checks, hv loaded the capture kernel, verified its
//! digests and jumped, the capture kernel was entered and ended the
//! emulator with the success code (QEMU status 0x21), and the dump exists,
//! parses, is complete, has one `NT_PRSTATUS` per CPU that checked in plus
//! the coordinator, and its `HVCRASH` note names the coordinator of the
//! crash report. With `capture_corrupt=1|image|table` the jump must be
//! refused instead: `digest_ok` false, or (with `capture_hv_check=off`)
//! hv jumps and the purgatory refuses (`purgatory_refused`); nothing
//! entered, no dump.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Value, json};

use crate::capture::stream::{self, StreamSummary};
use crate::capture::wake::{self, ParallelCopy};
use crate::capture::{CaptureKernel, DISK_FILE, DUMP_FILE, KDUMP_DISK_FILE, KDUMP_FILE};
use crate::dump::DumpInfo;
use crate::initramfs::{COPIED_MARKER, FAILED_MARKER, INIT_MARKER};
use crate::judge::judge_report;
use crate::makedumpfile::{self, Rearranged};
use crate::report::model::{Capture, Report};
use crate::report::{self, Backend, End, ExitConvention, Expectations, QEMU_EXIT_SUCCESS};
use crate::run::RunOutcome;
use crate::serial::strip_ansi;

/// The crash path's first line on the console.
pub const CRASH_MARKER: &str = "*** hv: CRASH";
/// hv's capture mode's first line.
pub const HV_ENTRY_MARKER: &str = "capture: hv capture mode";
/// The Linux kernel's banner.
pub const LINUX_ENTRY_MARKER: &str = "Linux version ";

/// The capture kernel's first line.
pub fn entry_marker(kernel: CaptureKernel) -> &'static str {
    match kernel {
        CaptureKernel::Linux => LINUX_ENTRY_MARKER,
        CaptureKernel::Hv => HV_ENTRY_MARKER,
    }
}

/// What xtask took out of the machine after the run.
#[derive(Debug)]
pub struct Collected {
    /// The dump, if one could be extracted.
    pub dump: Result<DumpInfo>,
    /// The stream's summary (hv's capture mode).
    pub stream: Option<StreamSummary>,
    /// Where the raw material is: the disk image or the stream.
    pub source: PathBuf,
    /// makedumpfile's outputs, when it filtered the dump.
    pub filtered: Option<Filtered>,
    /// The Linux capture kernel's copy by one reader per CPU, compared
    /// with the dump (one CPU's copy), when it made one.
    pub parallel: Option<Result<ParallelCopy>>,
}

/// What xtask made of makedumpfile's two flattened streams.
#[derive(Debug)]
pub struct Filtered {
    /// The ELF stream (`-E`), rearranged into the dump.
    pub elf: Result<Rearranged>,
    /// The compressed kdump (`-c`): its stream, rearranged into
    /// `vmcore.kdump`, and that file's path.
    pub kdump: Result<(Rearranged, PathBuf)>,
}

impl Collected {
    /// The Linux capture kernel's disk: the dump is the image cut to the
    /// length its ELF header gives.
    pub fn from_disk(run_dir: &Path) -> Self {
        let image = run_dir.join(DISK_FILE);
        let out = run_dir.join(DUMP_FILE);
        Self {
            dump: extract_disk(&image, &out),
            stream: None,
            source: image,
            filtered: None,
            parallel: None,
        }
    }

    /// makedumpfile's two disks: the flattened ELF dump (the dump) and the
    /// flattened compressed kdump (`vmcore.kdump`).
    pub fn from_makedumpfile(run_dir: &Path) -> Self {
        let image = run_dir.join(DISK_FILE);
        let out = run_dir.join(DUMP_FILE);
        let elf = makedumpfile::rearrange(&image, &out)
            .with_context(|| format!("the makedumpfile -E stream on {}", image.display()));
        let dump = match &elf {
            Ok(_) => DumpInfo::read(&out),
            Err(error) => Err(anyhow::anyhow!("{error:#}")),
        };
        let kdump_image = run_dir.join(KDUMP_DISK_FILE);
        let kdump_out = run_dir.join(KDUMP_FILE);
        let kdump = makedumpfile::rearrange(&kdump_image, &kdump_out)
            .with_context(|| format!("the makedumpfile -c stream on {}", kdump_image.display()))
            .and_then(|done| {
                if makedumpfile::is_kdump_compressed(&kdump_out)? {
                    Ok((done, kdump_out))
                } else {
                    anyhow::bail!(
                        "{} does not start with KDUMP's signature",
                        kdump_out.display()
                    )
                }
            });
        Self {
            dump,
            stream: None,
            source: image,
            filtered: Some(Filtered { elf, kdump }),
            parallel: None,
        }
    }

    /// hv's stream, from a port log or a disk that holds it.
    pub fn from_stream(run_dir: &Path, stream_file: &Path) -> Self {
        let out = run_dir.join(DUMP_FILE);
        let (dump, stream) = match stream::reassemble(stream_file, &out) {
            Ok(summary) => (DumpInfo::read(&out), Some(summary)),
            Err(error) => (Err(error), None),
        };
        Self {
            dump,
            stream,
            source: stream_file.to_path_buf(),
            filtered: None,
            parallel: None,
        }
    }
}

/// Cuts the disk image to the dump it holds and renames it to `out`.
pub fn extract_disk(image: &Path, out: &Path) -> Result<DumpInfo> {
    let info = DumpInfo::read(image)
        .with_context(|| format!("no dump on the capture disk {}", image.display()))?;
    if info.data_end > info.file_bytes {
        anyhow::bail!(
            "the capture disk {} holds {} bytes, the dump's segments reach {}",
            image.display(),
            info.file_bytes,
            info.data_end
        );
    }
    fs::rename(image, out).with_context(|| format!("renaming {}", image.display()))?;
    let file = fs::OpenOptions::new()
        .write(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    file.set_len(info.data_end)?;
    drop(file);
    DumpInfo::read(out)
}

/// Sets the `capture` object of `outcome`'s report, judges the capture,
/// and saves the report again. `qemu`: whether the exit status is QEMU's;
/// `wake_required`: `--wake`, the capture kernel must wake every CPU that
/// checked in ([`wake`]).
pub fn conclude(
    outcome: &mut RunOutcome,
    kernel: CaptureKernel,
    words: &[String],
    collected: &Collected,
    times: &[Option<Duration>],
    qemu: bool,
    wake_required: bool,
) -> Result<()> {
    let serial = outcome.serial.clone();
    let capture = capture_object(&outcome.report, kernel, &serial, collected, times);
    if let Value::Object(map) = &mut outcome.report {
        let mut merged = map.remove("capture").unwrap_or_else(|| json!({}));
        report::deep_merge(&mut merged, capture);
        map.insert("capture".to_owned(), merged);
    }
    let check = wake::check(&outcome.report, kernel, &serial);
    outcome.report["capture"]["wake_check"] = check;

    let mut problems = base_problems(outcome, words, qemu);
    problems.extend(capture_problems(&outcome.report, words, collected));
    if crate::capture::asks_for_crash(words) {
        problems.extend(wake::problems(&outcome.report, wake_required));
    }
    outcome.ok = problems.is_empty();
    outcome.reason = (!problems.is_empty()).then(|| problems.join("; "));
    outcome.report["ok"] = json!(outcome.ok);
    outcome.report["reason"] = json!(outcome.reason);
    outcome.write_report(&outcome.run_dir.join("report.json"))
}

/// The run's own verdict. When the capture kernel took over, the exit
/// status is its own (QEMU 0x21 after a good capture, like hv's success),
/// not hv's crash-handled code: the run is judged again with the status
/// left aside and the capture kernel's checked here.
fn base_problems(outcome: &RunOutcome, words: &[String], qemu: bool) -> Vec<String> {
    let report = Report::of(&outcome.report);
    let capture = report.capture.or_empty();
    let xtask = report.xtask.or_empty();
    // A purgatory that refused ended the run the way hv's refusing crash
    // path does (0x25): judged as if hv had not jumped.
    let jumped =
        capture.jumped.value() == Some(true) && capture.purgatory_refused.as_str().is_none();
    if !jumped || !qemu {
        return outcome.reason.iter().cloned().collect();
    }
    let cpus = xtask
        .cpus_requested
        .value()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    let mut expect = Expectations::from_cmdline(cpus, words).with_nmi_button(xtask.nmi_button());
    // The backend the first judgement expected (KVM: VMX; TCG's `-cpu
    // max`: SVM).
    if let Some(backend) = xtask
        .expected
        .or_empty()
        .virt_backend
        .as_str()
        .and_then(Backend::parse)
    {
        expect = expect.with_virt(backend);
    } else if report.emulator.as_str() == Some("qemu-kvm") {
        expect = expect.with_virt(Backend::Vmx);
    }
    let timed_out = xtask.timed_out.value() == Some(true);
    let status = xtask
        .exit_status
        .value()
        .and_then(|s| i32::try_from(s).ok());
    let end = if timed_out {
        End::TimedOut(Duration::from_secs_f64(
            xtask.elapsed_secs.value().unwrap_or(0.0),
        ))
    } else {
        End::Exited(status)
    };
    let verdict = judge_report(&report, &expect, end, ExitConvention::Meaningless);
    let mut problems: Vec<String> = verdict.reason.into_iter().collect();
    // xtask ended QEMU on purpose (at the capture's entry, or once an hv
    // without finish=exit was done): no exit status to judge.
    let stopped = xtask.stopped_by_xtask.as_str().is_some();
    if !timed_out && !stopped && status != Some(QEMU_EXIT_SUCCESS) {
        problems.push(match status {
            Some(code) => {
                format!("the capture kernel ended QEMU with status {code:#x}, not its success 0x21")
            }
            None => "QEMU was ended by a signal during the capture".to_owned(),
        });
    }
    problems
}

/// The keys xtask sets in `capture` (`xtask/REPORT.md`, "A capture run"),
/// merged into hv's own `capture` lines.
#[derive(Debug, Clone, Serialize)]
struct CaptureSection {
    kernel: &'static str,
    header_cpu_notes: Option<u64>,
    entered: bool,
    crash_to_capture_us: Option<u64>,
    crash_to_capture_source: Option<&'static str>,
    source: PathBuf,
    dump_format: &'static str,
    kdump_path: Option<PathBuf>,
    kdump_bytes: Option<u64>,
    kdump_format: Option<&'static str>,
    /// Only when makedumpfile filtered the dump.
    #[serde(skip_serializing_if = "Option::is_none")]
    makedumpfile: Option<MakedumpfileSection>,
    dump_path: Option<PathBuf>,
    dump_bytes: Option<u64>,
    cpu_notes: Option<usize>,
    dump_error: Option<String>,
    /// Only when hv's capture mode streamed (its own word for the length;
    /// null when it gave none).
    #[serde(skip_serializing_if = "Option::is_none")]
    streamed_bytes: Option<Value>,
    /// Only when the Linux capture made a copy per CPU; null when it could
    /// not be compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_copy_identical: Option<Option<bool>>,
    /// Only when the copies were compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_copy_first_difference: Option<Option<u64>>,
    /// Only when they could not be.
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_copy_error: Option<String>,
    /// Only for hv's stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<StreamSection>,
}

/// `capture.makedumpfile`: what xtask read of makedumpfile's streams.
#[derive(Debug, Clone, Serialize)]
struct MakedumpfileSection {
    elf: StreamBytes,
    kdump: StreamBytes,
    kdump_error: Option<String>,
}

/// One of makedumpfile's flattened streams, read whole (null when not).
#[derive(Debug, Clone, Serialize)]
struct StreamBytes {
    stream_bytes: Option<u64>,
    blocks: Option<u64>,
}

/// `capture.stream`: hv's stream as reassembled.
#[derive(Debug, Clone, Serialize)]
struct StreamSection {
    offset: u64,
    records: u64,
    data_bytes: u64,
    zero_bytes: u64,
    uncovered_bytes: u64,
}

/// The keys xtask sets in `capture`.
fn capture_object(
    report: &Value,
    kernel: CaptureKernel,
    serial: &str,
    collected: &Collected,
    times: &[Option<Duration>],
) -> Value {
    let hv_said = Report::of(report).capture.or_empty();
    let entered = match kernel {
        CaptureKernel::Hv => hv_said.entered.value() == Some(true),
        CaptureKernel::Linux => {
            seen_after_crash(serial, LINUX_ENTRY_MARKER) || seen_after_crash(serial, INIT_MARKER)
        }
    };
    let (timing, source) = match tsc_timing(report) {
        Some(us) => (Some(us), "tsc"),
        None => match (
            times.first().copied().flatten(),
            times.get(1).copied().flatten(),
        ) {
            (Some(crash), Some(entry)) => (
                Some(u64::try_from(entry.saturating_sub(crash).as_micros()).unwrap_or(u64::MAX)),
                "serial",
            ),
            _ => (None, "serial"),
        },
    };
    let kdump = collected
        .filtered
        .as_ref()
        .and_then(|filtered| filtered.kdump.as_ref().ok())
        .map(|(_, path)| path);
    let stream_bytes = |done: Option<&Rearranged>| StreamBytes {
        stream_bytes: done.map(|d| d.stream_bytes),
        blocks: done.map(|d| d.blocks),
    };
    let dump = collected.dump.as_ref().ok();
    let section = CaptureSection {
        kernel: kernel.as_str(),
        header_cpu_notes: header_cpu_notes(serial),
        entered,
        crash_to_capture_us: timing,
        crash_to_capture_source: timing.map(|_| source),
        source: collected.source.clone(),
        dump_format: if collected.filtered.is_some() {
            "elf-makedumpfile"
        } else {
            "elf"
        },
        kdump_path: kdump.cloned(),
        kdump_bytes: kdump.and_then(|path| fs::metadata(path).map(|m| m.len()).ok()),
        kdump_format: kdump.map(|_| "kdump-compressed"),
        makedumpfile: collected
            .filtered
            .as_ref()
            .map(|filtered| MakedumpfileSection {
                elf: stream_bytes(filtered.elf.as_ref().ok()),
                kdump: stream_bytes(filtered.kdump.as_ref().ok().map(|(done, _)| done)),
                kdump_error: filtered.kdump.as_ref().err().map(|e| format!("{e:#}")),
            }),
        dump_path: dump.map(|info| info.path.clone()),
        dump_bytes: dump.map(|info| info.file_bytes),
        cpu_notes: dump.map(|info| info.cpus.len()),
        dump_error: collected.dump.as_ref().err().map(|e| format!("{e:#}")),
        // hv's capture mode says how long a file it streamed: as
        // `streamed_bytes`, or (older images) under `dump_bytes`, the key
        // xtask now fills from the file. Keep its word next to it.
        streamed_bytes: (hv_said.streamed.value() == Some(true)).then(|| {
            match hv_said.streamed_bytes.raw() {
                Value::Null => hv_said.dump_bytes.raw(),
                bytes => bytes,
            }
        }),
        parallel_copy_identical: collected.parallel.as_ref().map(|copy| match copy {
            Ok(copy) => Some(copy.first_difference.is_none()),
            Err(_) => None,
        }),
        parallel_copy_first_difference: match &collected.parallel {
            Some(Ok(copy)) => Some(copy.first_difference),
            _ => None,
        },
        parallel_copy_error: match &collected.parallel {
            Some(Err(error)) => Some(format!("{error:#}")),
            _ => None,
        },
        stream: collected.stream.as_ref().map(|summary| StreamSection {
            offset: summary.stream_offset,
            records: summary.records,
            data_bytes: summary.data_bytes,
            zero_bytes: summary.zero_bytes,
            uncovered_bytes: summary.uncovered_bytes,
        }),
    };
    serde_json::to_value(section).unwrap_or(Value::Null)
}

/// Crash to capture entry on the TSC, which runs on across the jump: raw
/// counts (`crash.started_tsc`, `capture.entered_tsc`) over the crashed
/// hv's `smp.tsc_khz`, or microseconds both kernels computed with that
/// same rate (`crash.started_us`, `capture.entered_us` with
/// `capture.tsc_khz` equal to `smp.tsc_khz`). `None` when hv does not
/// report them, or they go backwards.
fn tsc_timing(report: &Value) -> Option<u64> {
    let report = Report::of(report);
    let crash = report.crash.or_empty();
    let capture = report.capture.or_empty();
    let khz = report.smp.or_empty().tsc_khz.value().filter(|&k| k > 0);
    if let (Some(start), Some(entry), Some(khz)) =
        (crash.started_tsc.value(), capture.entered_tsc.value(), khz)
    {
        let ticks = entry.checked_sub(start)?;
        return u64::try_from(u128::from(ticks) * 1000 / u128::from(khz)).ok();
    }
    let same_rate = capture.tsc_khz.value().is_some() && capture.tsc_khz.value() == khz;
    match (crash.started_us.value(), capture.entered_us.value()) {
        (Some(start), Some(entry)) if same_rate => entry.checked_sub(start),
        _ => None,
    }
}

/// The CPU notes hv's capture mode found in the crashed hypervisor's core
/// header (its `capture: N CPU notes; streaming ...` line), if it said.
fn header_cpu_notes(serial: &str) -> Option<u64> {
    serial.lines().find_map(|line| {
        let line = strip_ansi(line);
        let (before, _) = line.split_once(crate::run::CAPTURE_HEADER_MARKER)?;
        before.rsplit(' ').next()?.parse().ok()
    })
}

/// Whether a line containing `marker` comes after the crash's first line.
fn seen_after_crash(serial: &str, marker: &str) -> bool {
    serial
        .lines()
        .map(strip_ansi)
        .skip_while(|line| !line.contains(CRASH_MARKER))
        .any(|line| line.contains(marker))
}

/// The last value of `key=` in the words, as hv takes it.
fn word<'a>(words: &'a [String], key: &str) -> Option<&'a str> {
    words
        .iter()
        .rev()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// What is wrong with the capture, given the merged report (with xtask's
/// `capture` keys set) and the command line.
pub fn capture_problems(json: &Value, words: &[String], collected: &Collected) -> Vec<String> {
    let report = Report::of(json);
    let xtask = report.xtask.or_empty();
    let crash = report.crash.or_empty();
    let button = xtask.nmi_button();
    if !crate::capture::asks_for_crash(words) && !button {
        // No crash asked for: nothing to capture; the boot-time load is
        // reported and the tests judge it.
        return Vec::new();
    }
    let capture = report.capture.or_empty();
    let mut problems = Vec::new();
    if capture.loaded.value() != Some(true) && crate::plan::capture_blocker(words).is_some() {
        // A crash during bring-up comes before hv loads its capture
        // kernel: nothing to capture, the crash run's checks judge it.
        return problems;
    }
    if capture.loaded.value() != Some(true) {
        problems.push(format!(
            "hv did not load the capture kernel: {}",
            capture
                .error
                .as_str()
                .unwrap_or("(no capture report at boot)")
        ));
        return problems;
    }
    let kernel = capture.kernel.as_str().unwrap_or("?");
    if let Some(knob) = word(words, "capture_corrupt").filter(|value| *value != "0") {
        // Damaged on purpose: hv's own check refuses (digest_ok false, no
        // jump), or, with capture_hv_check=off, the purgatory does.
        let purgatory_refused = capture.purgatory_refused.as_str().is_some();
        let hv_refused =
            capture.digest_ok.value() == Some(false) && capture.jumped.value() != Some(true);
        if !hv_refused && !purgatory_refused {
            problems.push(format!(
                "capture_corrupt={knob}: neither hv (digest_ok {}) nor the purgatory refused the damaged capture kernel",
                capture.digest_ok.raw()
            ));
        }
        if capture.entered.value() == Some(true)
            || (capture.jumped.value() == Some(true) && !purgatory_refused)
        {
            problems.push(format!(
                "capture_corrupt={knob}: the damaged capture kernel was jumped into"
            ));
        }
        if collected.dump.is_ok() {
            problems.push(format!(
                "capture_corrupt={knob}: a dump was written all the same"
            ));
        }
        return problems;
    }
    if let Some(reason) = capture.purgatory_refused.as_str() {
        problems.push(format!(
            "the purgatory refused the capture kernel: {reason}"
        ));
        return problems;
    }
    if report.crash.is_missing() {
        // The crash run's own checks say why there was no crash.
        return problems;
    }
    match capture.digest_ok.value() {
        Some(true) => {}
        Some(false) => problems.push(format!(
            "hv refused to jump into the capture kernel: {}",
            capture.refused.as_str().unwrap_or("digest mismatch")
        )),
        // capture_hv_check=off: the purgatory's check alone.
        None if capture.hv_check.as_str() == Some("skipped") => {}
        None => problems.push("hv reported no capture digest check at the crash".to_owned()),
    }
    if capture.entered.value() != Some(true) {
        problems.push(format!("the {kernel} capture kernel was not entered"));
    }
    if let Some(error) = capture.error.as_str() {
        problems.push(format!("the capture kernel failed: {error}"));
    }
    if capture.linux.or_empty().copied.value() == Some(false) {
        problems.push("the Linux capture kernel failed to copy /proc/vmcore".to_owned());
    }
    if xtask.capture_until_entry.value() == Some(true) {
        // Ended at the entry: the core header the capture image read
        // stands for the dump.
        let wanted = crash.checked_in.value().map(|n| n + 1);
        match (capture.header_cpu_notes.value(), wanted) {
            (Some(notes), Some(wanted)) if notes != wanted => problems.push(format!(
                "the capture image read {notes} CPU notes from the core header, expected \
                 {wanted} (the CPUs that checked in and the coordinator)"
            )),
            (None, _) if capture.entered.value() == Some(true) => problems.push(
                "the capture image never said it read the core header (`N CPU notes; \
                 streaming`)"
                    .to_owned(),
            ),
            _ => {}
        }
        return problems;
    }
    let info = match &collected.dump {
        Ok(info) => info,
        Err(error) => {
            problems.push(format!("no dump: {error:#}"));
            return problems;
        }
    };
    problems.extend(info.problems());
    let checked_in = crash.checked_in.value();
    if let Some(checked_in) = checked_in
        && info.cpus.len() as u64 != checked_in + 1
    {
        problems.push(format!(
            "the dump has {} NT_PRSTATUS notes, expected {} (the {checked_in} CPUs that checked in and the coordinator)",
            info.cpus.len(),
            checked_in + 1
        ));
    }
    let coordinator = crash.cpu_index.value();
    match (&info.crash, coordinator) {
        (Some(crash), Some(index)) if u64::from(crash.coordinator) != index => {
            problems.push(format!(
                "the dump's HVCRASH note names CPU {} as coordinator, the crash report CPU {index}",
                crash.coordinator
            ))
        }
        _ => {}
    }
    if let Some(first) = info.cpus.first()
        && let Some(index) = coordinator
        && first.cpu_index.map(u64::from) != Some(index)
    {
        problems.push(format!(
            "the dump's first NT_PRSTATUS (gdb's thread 1) is CPU {:?}, not the coordinator {index}",
            first.cpu_index
        ));
    }
    problems.extend(ledger_problems(&report, info));
    match &collected.parallel {
        Some(Ok(ParallelCopy {
            first_difference: Some(at),
            ..
        })) => problems.push(format!(
            "the copy of /proc/vmcore by one reader per CPU differs from the one-CPU copy \
             (the dump) at byte {at:#x}"
        )),
        Some(Err(error)) => problems.push(format!(
            "the copy of /proc/vmcore by one reader per CPU could not be compared: {error:#}"
        )),
        _ => {}
    }
    if let Some(filtered) = &collected.filtered {
        problems.extend(filtered_problems(&capture, filtered));
    } else if let Some(bytes) = capture.linux.or_empty().vmcore_bytes.value()
        && bytes != info.file_bytes
    {
        problems.push(format!(
            "/proc/vmcore held {bytes} bytes, the extracted dump {}",
            info.file_bytes
        ));
    }
    if let Some(summary) = &collected.stream {
        if summary.uncovered_bytes > 0 {
            problems.push(format!(
                "the stream left {} bytes of memory uncovered",
                summary.uncovered_bytes
            ));
        }
        if let Some(streamed) = capture.streamed_bytes.value()
            && streamed != summary.total
        {
            problems.push(format!(
                "hv streamed a {streamed}-byte dump, the stream's END says {}",
                summary.total
            ));
        }
    }
    problems
}

/// Whether makedumpfile's streams came out whole: each as long as the
/// initramfs' `dd` counted, the kdump one a kdump-compressed file.
fn filtered_problems(capture: &Capture, filtered: &Filtered) -> Vec<String> {
    let said = &capture.linux.or_empty().makedumpfile;
    if said.is_missing() {
        return vec!["the initramfs reported no makedumpfile run".to_owned()];
    }
    let said = said.or_empty();
    let mut problems = Vec::new();
    let kdump = filtered.kdump.as_ref().map(|(done, _)| done);
    for (name, done, said) in [
        ("elf", filtered.elf.as_ref(), &said.elf_stream_bytes),
        ("kdump", kdump, &said.kdump_stream_bytes),
    ] {
        match (done, said.value()) {
            (Err(error), _) => problems.push(format!("makedumpfile's {name} stream: {error:#}")),
            (Ok(done), Some(bytes)) if bytes != done.stream_bytes => problems.push(format!(
                "makedumpfile's {name} stream: dd wrote {bytes} bytes, xtask read {}",
                done.stream_bytes
            )),
            (Ok(_), Some(_)) => {}
            (Ok(_), None) => {
                problems.push(format!("the initramfs reported no {name}_stream_bytes"))
            }
        }
    }
    problems
}

/// Whether the dump's VMCLEAR ledger accounts for every VMCS (on SVM,
/// VMCB) loaded at the crash: each CPU that checked in cleared,
/// successfully, as many as were loaded on it, and the ledger's total is
/// the crash report's `vmcs_loaded` (`vmcb_loaded`) less those held by
/// stragglers (which nobody could clear).
fn ledger_problems(report: &Report, info: &DumpInfo) -> Vec<String> {
    let Some(crash) = &info.crash else {
        return Vec::new();
    };
    if crash.ledger.is_empty() && report.capture.or_empty().attempt.value() == Some(2) {
        // The second hand-over (after a crash inside the first) leaves
        // the ledger out, the part most likely to have failed.
        return Vec::new();
    }
    let reported = report.crash.or_empty();
    let svm = reported.backend.as_str() == Some("svm");
    let (ledger, kind) = if svm {
        ("VMCB ledger", "VMCB")
    } else {
        ("VMCLEAR ledger", "VMCS")
    };
    let mut problems = Vec::new();
    for cpu in &crash.ledger {
        let checked_in = cpu.flags & kexec_loader::crash_note::cpu_flags::CHECKED_IN != 0
            || cpu.flags & kexec_loader::crash_note::cpu_flags::COORDINATOR != 0;
        if checked_in && cpu.cleared() != cpu.vmcs_loaded as usize {
            problems.push(format!(
                "the dump's {ledger}: CPU {} had {} {kind} loaded and cleared {}",
                cpu.cpu_index,
                cpu.vmcs_loaded,
                cpu.cleared()
            ));
        }
    }
    let ledger_loaded: u64 = crash
        .ledger
        .iter()
        .filter(|cpu| !crash.stragglers.contains(&cpu.apic_id))
        .map(|cpu| u64::from(cpu.vmcs_loaded))
        .sum();
    let [loaded, _, on_stragglers] = reported.contexts(svm);
    if let (Some(loaded), Some(on_stragglers)) = (loaded.value(), on_stragglers.value())
        && ledger_loaded != loaded.saturating_sub(on_stragglers)
    {
        problems.push(format!(
            "the dump's {ledger} counts {ledger_loaded} {kind} loaded on the CPUs that \
             checked in, the crash report {loaded} less {on_stragglers} on stragglers"
        ));
    }
    problems
}

/// Lines of the serial log that the Linux initramfs printed, for a person
/// reading a failed run.
pub fn linux_init_lines(serial: &str) -> Vec<String> {
    serial
        .lines()
        .map(strip_ansi)
        .filter(|line| {
            line.contains(INIT_MARKER)
                || line.contains(COPIED_MARKER)
                || line.contains(FAILED_MARKER)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dump::tests::sample_dump;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    /// A temporary directory with the sample dump as its `vmcore`.
    fn collected_sample(name: &str) -> (PathBuf, Collected) {
        let dir = std::env::temp_dir().join(format!("xtask-judge-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(DUMP_FILE);
        fs::write(&path, sample_dump()).unwrap();
        let collected = Collected {
            dump: DumpInfo::read(&path),
            stream: None,
            source: path,
            filtered: None,
            parallel: None,
        };
        (dir, collected)
    }

    /// The report of a good capture of the sample dump: coordinator CPU 2,
    /// two CPUs checked in.
    fn good_report(collected: &Collected) -> Value {
        let hv = json!({
            "crash": {"cpu_index": 2, "checked_in": 2, "reason": "panic: injected crash"},
            "capture": {"loaded": true, "kernel": "hv", "digest_ok": true, "jumped": true,
                        "entered": true, "handover_us": 1000, "entered_us": 1900},
        });
        let mut report = hv.clone();
        let object = capture_object(&hv, CaptureKernel::Hv, "", collected, &[]);
        report::deep_merge(&mut report["capture"], object);
        report
    }

    /// What a capture run collected when it found no dump and no stream.
    fn collected_nothing() -> Collected {
        Collected {
            dump: Err(anyhow::anyhow!("none")),
            stream: None,
            source: PathBuf::new(),
            filtered: None,
            parallel: None,
        }
    }
    #[test]
    fn a_good_capture_has_no_problems_but_the_samples_failed_vmclear() {
        let (dir, collected) = collected_sample("good");
        let report = good_report(&collected);
        let words = words("crashkernel=64M@0x10000000 crash=cpu:2,after_ms:50");
        // The sample's CPU 0 got VMfailValid for one of its two VMCSes.
        assert_eq!(
            capture_problems(&report, &words, &collected),
            ["the dump's VMCLEAR ledger: CPU 0 had 2 VMCS loaded and cleared 1"]
        );
        assert_eq!(report["capture"]["cpu_notes"], 3);
        assert_eq!(report["capture"]["kernel"], "hv");
        assert_eq!(report["capture"]["entered"], true);
        assert!(report["capture"]["dump_bytes"].as_u64().unwrap() > 0);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wrong_counts_and_coordinators_are_named() {
        let (dir, collected) = collected_sample("wrong");
        let mut report = good_report(&collected);
        report["crash"]["checked_in"] = json!(5);
        report["crash"]["cpu_index"] = json!(1);
        let problems =
            capture_problems(&report, &words("crash=cpu:1,after_ms:50"), &collected).join("\n");
        assert!(
            problems.contains("3 NT_PRSTATUS notes, expected 6"),
            "{problems}"
        );
        assert!(
            problems.contains("names CPU 2 as coordinator, the crash report CPU 1"),
            "{problems}"
        );
        assert!(
            problems.contains("gdb's thread 1) is CPU Some(2)"),
            "{problems}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_refused_jump_is_a_problem_unless_asked_for() {
        let (dir, _) = collected_sample("refused");
        let none = Collected {
            dump: Err(anyhow::anyhow!("no dump stream")),
            stream: None,
            source: dir.join("dump.stream"),
            filtered: None,
            parallel: None,
        };
        let hv = json!({
            "crash": {"cpu_index": 1, "checked_in": 3},
            "capture": {"loaded": true, "kernel": "hv", "digest_ok": false, "jumped": false,
                        "refused": "segment 0: digest mismatch"},
        });
        let mut report = hv.clone();
        report::deep_merge(
            &mut report["capture"],
            capture_object(&hv, CaptureKernel::Hv, "", &none, &[]),
        );
        assert_eq!(report["capture"]["entered"], false);
        assert_eq!(report["capture"]["dump_path"], Value::Null);
        let asked = words("crash=cpu:1,after_ms:50 capture_corrupt=1");
        assert_eq!(
            capture_problems(&report, &asked, &none),
            Vec::<String>::new()
        );
        let problems = capture_problems(&report, &words("crash=cpu:1,after_ms:50"), &none);
        assert!(
            problems.contains(
                &"hv refused to jump into the capture kernel: segment 0: digest mismatch"
                    .to_owned()
            ),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("no dump: no dump stream")),
            "{problems:?}"
        );
        // A corrupt image that was jumped into all the same.
        let (_, dump) = collected_sample("refused");
        let good = good_report(&dump);
        let problems = capture_problems(&good, &asked, &dump);
        assert_eq!(problems.len(), 3, "{problems:?}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_purgatory_refusal_counts_only_when_asked_for() {
        let none = Collected {
            dump: Err(anyhow::anyhow!("no dump stream")),
            stream: None,
            source: PathBuf::from("dump.stream"),
            filtered: None,
            parallel: None,
        };
        // hv's own check skipped, hv jumped, the purgatory refused.
        let hv = json!({
            "crash": {"cpu_index": 1, "checked_in": 1},
            "capture": {"loaded": true, "kernel": "hv", "digest_ok": null, "hv_check": "skipped",
                        "jumped": true, "refused": null,
                        "purgatory_refused": "segment 0 at 0x10000000 (0x3abcf bytes) changed since it was loaded"},
        });
        let mut report = hv.clone();
        report::deep_merge(
            &mut report["capture"],
            capture_object(&hv, CaptureKernel::Hv, "", &none, &[]),
        );
        let asked = words("crash=cpu:1,after_ms:50 capture_corrupt=table capture_hv_check=off");
        assert_eq!(
            capture_problems(&report, &asked, &none),
            Vec::<String>::new()
        );
        assert_eq!(
            capture_problems(&report, &words("crash=cpu:1,after_ms:50"), &none),
            [
                "the purgatory refused the capture kernel: segment 0 at 0x10000000 (0x3abcf bytes) changed since it was loaded"
            ]
        );
        // Skipped by hv and not refused by the purgatory: jumped into.
        let mut entered = report.clone();
        entered["capture"]["purgatory_refused"] = Value::Null;
        entered["capture"]["entered"] = json!(true);
        let problems = capture_problems(&entered, &asked, &none);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("neither hv"), "{problems:?}");
        assert!(problems[1].contains("jumped into"), "{problems:?}");
    }

    #[test]
    fn the_ledger_must_account_for_every_loaded_vmcs() {
        let (dir, collected) = collected_sample("ledger");
        let info = collected.dump.as_ref().unwrap();
        // The sample: CPU 0 had 2 loaded and cleared 1 (one VMfailValid).
        let report = json!({"crash": {"vmcs_loaded": 2, "vmcs_on_stragglers": 0}});
        assert_eq!(
            ledger_problems(&Report::of(&report), info),
            ["the dump's VMCLEAR ledger: CPU 0 had 2 VMCS loaded and cleared 1"]
        );
        let report = json!({"crash": {"vmcs_loaded": 5, "vmcs_on_stragglers": 1}});
        let problems = ledger_problems(&Report::of(&report), info);
        assert!(problems[1].contains("counts 2 VMCS loaded"), "{problems:?}");
        assert!(
            problems[1].contains("the crash report 5 less 1"),
            "{problems:?}"
        );
        // On SVM the same ledger holds VMCBs, held to the vmcb_* counts.
        let report = json!({"crash": {"backend": "svm", "vmcs_loaded": 0,
            "vmcb_loaded": 2, "vmcb_on_stragglers": 0}});
        assert_eq!(
            ledger_problems(&Report::of(&report), info),
            ["the dump's VMCB ledger: CPU 0 had 2 VMCB loaded and cleared 1"]
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_capture_kernel_that_did_not_load_is_named() {
        let report = json!({"capture": {"loaded": false, "error": "bzImage rejected: no HdrS"}});
        let none = collected_nothing();
        assert_eq!(
            capture_problems(&report, &words("crash=cpu:1,after_ms:5"), &none),
            ["hv did not load the capture kernel: bzImage rejected: no HdrS"]
        );
        // Without a crash nothing is judged here.
        assert!(capture_problems(&report, &words("log=debug"), &none).is_empty());
    }

    #[test]
    fn linux_entry_is_its_banner_after_the_crash() {
        let before = "Linux version 6.1 (the host)\n*** hv: CRASH on CPU 1\n";
        assert!(!seen_after_crash(before, LINUX_ENTRY_MARKER));
        let after = "boot\n\x1b[0m*** hv: CRASH on CPU 1 (APIC ID 1)\n[ 0.0] Linux version 6.1.0\n";
        assert!(seen_after_crash(after, LINUX_ENTRY_MARKER));
    }

    #[test]
    fn timing_prefers_the_tsc_and_falls_back_to_the_serial_clock() {
        let none = collected_nothing();
        let serial = [
            Some(Duration::from_millis(100)),
            Some(Duration::from_millis(350)),
        ];
        let tsc = json!({"smp": {"tsc_khz": 2_000_000},
            "crash": {"started_tsc": 10_000_000}, "capture": {"entered_tsc": 15_000_000}});
        let object = capture_object(&tsc, CaptureKernel::Hv, "", &none, &serial);
        assert_eq!(object["crash_to_capture_us"], 2500);
        assert_eq!(object["crash_to_capture_source"], "tsc");
        let us = json!({"smp": {"tsc_khz": 2_000_000}, "crash": {"started_us": 5000},
            "capture": {"entered_us": 7500, "tsc_khz": 2_000_000}});
        let object = capture_object(&us, CaptureKernel::Hv, "", &none, &serial);
        assert_eq!(object["crash_to_capture_us"], 2500);
        // Microseconds from a capture kernel that calibrated its own rate
        // (as hv's capture mode does today) are not comparable.
        let own_rate = json!({"smp": {"tsc_khz": 2_000_000}, "crash": {"started_us": 5000},
            "capture": {"entered_us": 7500}});
        let object = capture_object(&own_rate, CaptureKernel::Hv, "", &none, &serial);
        assert_eq!(object["crash_to_capture_source"], "serial");
        let backwards = json!({"smp": {"tsc_khz": 1000},
            "crash": {"started_tsc": 9}, "capture": {"entered_tsc": 5}});
        let object = capture_object(&backwards, CaptureKernel::Hv, "", &none, &serial);
        assert_eq!(object["crash_to_capture_source"], "serial");
        let object = capture_object(&json!({}), CaptureKernel::Linux, "", &none, &serial);
        assert_eq!(object["crash_to_capture_us"], 250_000);
        assert_eq!(object["crash_to_capture_source"], "serial");
        let object = capture_object(&json!({}), CaptureKernel::Linux, "", &none, &[None, None]);
        assert_eq!(object["crash_to_capture_us"], Value::Null);
    }

    #[test]
    fn the_capture_object_keeps_its_conditional_keys() {
        let filtered = Collected {
            dump: Err(anyhow::anyhow!("no dump")),
            stream: None,
            source: PathBuf::from("/r/disk.img"),
            filtered: Some(Filtered {
                elf: Ok(Rearranged {
                    stream_bytes: 100,
                    blocks: 3,
                    file_bytes: 90,
                }),
                kdump: Err(anyhow::anyhow!("no kdump")),
            }),
            parallel: Some(Ok(ParallelCopy {
                compared: 10,
                first_difference: Some(7),
            })),
        };
        let object = capture_object(&json!({}), CaptureKernel::Linux, "", &filtered, &[]);
        assert_eq!(
            object,
            json!({
                "kernel": "linux", "header_cpu_notes": null, "entered": false,
                "crash_to_capture_us": null, "crash_to_capture_source": null,
                "source": "/r/disk.img", "dump_format": "elf-makedumpfile",
                "kdump_path": null, "kdump_bytes": null, "kdump_format": null,
                "makedumpfile": {
                    "elf": {"stream_bytes": 100, "blocks": 3},
                    "kdump": {"stream_bytes": null, "blocks": null},
                    "kdump_error": "no kdump",
                },
                "dump_path": null, "dump_bytes": null, "cpu_notes": null,
                "dump_error": "no dump",
                "parallel_copy_identical": false, "parallel_copy_first_difference": 7,
            })
        );
        let failed = Collected {
            dump: Err(anyhow::anyhow!("no dump")),
            stream: None,
            source: PathBuf::from("/r/disk.img"),
            filtered: None,
            parallel: Some(Err(anyhow::anyhow!("unreadable"))),
        };
        let times = [
            Some(Duration::from_millis(5)),
            Some(Duration::from_millis(8)),
        ];
        let object = capture_object(
            &json!({"capture": {"streamed": true}}),
            CaptureKernel::Hv,
            "",
            &failed,
            &times,
        );
        assert_eq!(
            object,
            json!({
                "kernel": "hv", "header_cpu_notes": null, "entered": false,
                "crash_to_capture_us": 3000, "crash_to_capture_source": "serial",
                "source": "/r/disk.img", "dump_format": "elf",
                "kdump_path": null, "kdump_bytes": null, "kdump_format": null,
                "dump_path": null, "dump_bytes": null, "cpu_notes": null,
                "dump_error": "no dump", "streamed_bytes": null,
                "parallel_copy_identical": null, "parallel_copy_error": "unreadable",
            })
        );
    }

    #[test]
    fn hv_s_streamed_length_is_kept_under_either_key() {
        let none = collected_nothing();
        // Today's capture mode says `streamed_bytes`; the object xtask
        // merges over it must not blank it out.
        let report = json!({"capture": {"streamed": true, "streamed_bytes": 4096}});
        let object = capture_object(&report, CaptureKernel::Hv, "", &none, &[]);
        assert_eq!(object["streamed_bytes"], 4096);
        let older = json!({"capture": {"streamed": true, "dump_bytes": 8192}});
        let object = capture_object(&older, CaptureKernel::Hv, "", &none, &[]);
        assert_eq!(object["streamed_bytes"], 8192);
        let object = capture_object(&json!({}), CaptureKernel::Hv, "", &none, &[]);
        assert!(object.get("streamed_bytes").is_none());
    }

    #[test]
    fn a_disk_image_is_cut_to_its_dump() {
        let dir = std::env::temp_dir().join(format!("xtask-disk-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let dump = sample_dump();
        let image = dir.join(DISK_FILE);
        let mut bytes = dump.clone();
        bytes.resize(dump.len() + (1 << 20), 0);
        fs::write(&image, &bytes).unwrap();
        let info = extract_disk(&image, &dir.join(DUMP_FILE)).unwrap();
        assert_eq!(info.file_bytes, dump.len() as u64);
        assert_eq!(fs::read(dir.join(DUMP_FILE)).unwrap(), dump);
        assert!(!image.exists());
        // A disk the capture kernel never wrote.
        fs::write(&image, vec![0u8; 8192]).unwrap();
        let error = format!(
            "{:#}",
            extract_disk(&image, &dir.join("other")).unwrap_err()
        );
        assert!(error.contains("no dump on the capture disk"), "{error}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
