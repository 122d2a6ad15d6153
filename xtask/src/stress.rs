//! `cargo xtask stress`: boot hv many times in a row and count how often
//! every CPU came up, and how fast.
//!
//! Each run is an ordinary QEMU run, judged as usual (see
//! [`crate::report::judge`]), in its own directory
//! `build/<name>/run-NNN/`. The directory of a run that passed is removed
//! once the run is counted; a failed run keeps its serial log and report
//! there, and the final table prints their paths.
//!
//! What varies between runs goes through a [`RunPlan`]: it may add
//! command-line words to each run and check each finished run beyond the
//! usual verdict. [`Plain`] does neither; [`CrashPlan`] gives every run a
//! `crash=` word (a random one for `--crash random`), which makes the usual
//! verdict judge the run by its crash report (see `report::crash`), and
//! checks that hv took the word. The table then also counts the crash runs,
//! the stragglers named and the shootdown times.
//!
//! A loop may capture each crash ([`StressOptions::capture`]): every run
//! then goes through `capture::qemu`, usually ending at the capture
//! kernel's entry (`until_entry`), and the capture's checks join the
//! verdict; the table adds the captures entered and the time from the
//! crash to the capture kernel. That is what lets a random plan draw the
//! points inside the hand-over (`nmi_in_header`, `nmi_in_digest`,
//! `nmi_in_purgatory`, `handover_panic`), which without a capture kernel
//! hv never reaches.

use crate::crash::CrashSpecExt;
use crate::report::model::Report;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use crate::capture::{self, CaptureOptions};
use crate::crash::{CrashArg, CrashSpec, Point, Rng};
use crate::paths;
use crate::run::{QemuOptions, RunOutcome};
use crate::stats::{self, Spread};

/// What varies from one run of a stress loop to the next.
pub trait RunPlan {
    /// Extra hv command-line words for run `index` (0-based), after the
    /// words every run gets.
    fn words(&mut self, index: u32) -> Vec<String> {
        let _ = index;
        Vec::new()
    }

    /// Problems with finished run `index` beyond xtask's usual verdict
    /// (which has already judged it); empty when it is fine.
    fn check(&mut self, index: u32, outcome: &RunOutcome) -> Vec<String> {
        let _ = (index, outcome);
        Vec::new()
    }

    /// What the plan does, for the table's title; `None` for nothing
    /// worth saying.
    fn describe(&self) -> Option<String> {
        None
    }
}

/// Every run the same, judged as usual.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl RunPlan for Plain {}

/// A crash in every run: the given spec, or a fresh random one per run
/// drawn from a seeded generator (the seed is in the table's title, so a
/// loop can be replayed).
#[derive(Debug, Clone)]
pub struct CrashPlan {
    arg: CrashArg,
    seed: u64,
    rng: Rng,
    cpus: u32,
    guests: bool,
    capture: bool,
    guest_run_ms: u64,
}

impl CrashPlan {
    /// Crashes on a machine of `cpus` CPUs, with or without guests (VMX or
    /// SVM)
    /// (which decides the points a random spec may use), whose guests run
    /// `guest_run_ms` (random crashes come within that time); no capture
    /// kernel (see [`with_capture`](Self::with_capture)).
    pub fn new(arg: CrashArg, seed: u64, cpus: u32, guests: bool, guest_run_ms: u64) -> Self {
        Self {
            arg,
            seed,
            rng: Rng::new(seed),
            cpus,
            guests,
            capture: false,
            guest_run_ms,
        }
    }

    /// The same plan for runs with a capture kernel loaded (random specs
    /// may then strike inside the hand-over).
    pub fn with_capture(mut self, capture: bool) -> Self {
        self.capture = capture;
        self
    }

    /// The spec of the next run.
    pub fn next_spec(&mut self) -> CrashSpec {
        self.arg.pick(
            &mut self.rng,
            self.cpus,
            self.guests,
            self.capture,
            self.guest_run_ms,
        )
    }
}

impl RunPlan for CrashPlan {
    fn words(&mut self, _index: u32) -> Vec<String> {
        vec![self.next_spec().word()]
    }

    /// hv must have taken every word: a `crash=` it rejected would leave
    /// the run uncrashed (the verdict then fails it for want of a crash,
    /// but this says why).
    fn check(&mut self, _index: u32, outcome: &RunOutcome) -> Vec<String> {
        let report = Report::of(&outcome.report);
        match report.cmdline.or_empty().errors.get() {
            Some(errors) if !errors.is_empty() => vec![format!(
                "hv rejected command-line words: {}",
                errors
                    .iter()
                    .map(|error| error
                        .as_str()
                        .map_or_else(|| error.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join("; ")
            )],
            Some(_) => Vec::new(),
            None if report.crash.get().is_some() => Vec::new(),
            None => vec!["hv reported no cmdline (did it boot?)".to_owned()],
        }
    }

    fn describe(&self) -> Option<String> {
        Some(match self.arg {
            CrashArg::Random => format!("a random crash per run (seed {})", self.seed),
            CrashArg::Spec(spec) => format!("crash={spec} every run"),
        })
    }
}

/// What a run that asked for a crash reported about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashRecord {
    /// The `crash=` value the run was given (the last one, as hv reads it).
    pub spec: Option<CrashSpec>,
    /// `crash.cpu_index`, the coordinator.
    pub coordinator: Option<u64>,
    /// `crash.expected`.
    pub expected: Option<u64>,
    /// `crash.checked_in`.
    pub checked_in: Option<u64>,
    /// `crash.stragglers` (APIC IDs).
    pub stragglers: Vec<u64>,
    /// `crash.shootdown_us`.
    pub shootdown_us: Option<u64>,
    /// `crash.timed_out`.
    pub timed_out: bool,
    /// `capture.entered`, for a run with a capture kernel loaded.
    pub capture_entered: Option<bool>,
    /// `capture.crash_to_capture_us`.
    pub crash_to_capture_us: Option<u64>,
    /// `capture.attempt`: the hand-over attempt that jumped.
    pub handover_attempt: Option<u64>,
}

impl CrashRecord {
    /// The crash of a run whose command line asked for one; `None` for a
    /// run without a `crash=` word.
    pub fn from_report(report: &Value) -> Option<Self> {
        let report = Report::of(report);
        let spec = report
            .xtask
            .or_empty()
            .cmdline
            .as_str()?
            .split_whitespace()
            .filter_map(|word| word.strip_prefix("crash="))
            .filter_map(|value| CrashSpec::parse(value).ok())
            .next_back()?;
        let crash = report.crash.or_empty();
        let capture = report.capture.or_empty();
        Some(Self {
            spec: Some(spec),
            coordinator: crash.cpu_index.value(),
            expected: crash.expected.value(),
            checked_in: crash.checked_in.value(),
            stragglers: crash
                .stragglers
                .get()
                .map(|list| list.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default(),
            shootdown_us: crash.shootdown_us.value(),
            timed_out: crash.timed_out.value() == Some(true),
            capture_entered: (capture.loaded.value() == Some(true))
                .then(|| capture.entered.value() == Some(true)),
            crash_to_capture_us: capture.crash_to_capture_us.value(),
            handover_attempt: capture.attempt.value(),
        })
    }

    /// The point's name, `time` for a time-based crash.
    pub fn point_name(&self) -> String {
        match self.spec.and_then(|spec| spec.point) {
            Some(point) => point.to_string(),
            None => "time".to_owned(),
        }
    }

    /// Whether stragglers were asked for (a CPU spinning with NMIs blocked).
    pub fn straggler_expected(&self) -> bool {
        self.spec
            .is_some_and(|spec| spec.point == Some(Point::NmiBlocked))
    }

    fn to_json(&self) -> Value {
        json!({
            "spec": self.spec.map(|spec| spec.to_string()),
            "coordinator": self.coordinator,
            "expected": self.expected,
            "checked_in": self.checked_in,
            "stragglers": self.stragglers,
            "shootdown_us": self.shootdown_us,
            "timed_out": self.timed_out,
            "capture_entered": self.capture_entered,
            "crash_to_capture_us": self.crash_to_capture_us,
            "handover_attempt": self.handover_attempt,
        })
    }
}

/// A stress loop.
#[derive(Debug, Clone)]
pub struct StressOptions {
    /// The run every iteration starts from (ELF, CPUs, boot, memory, the
    /// words every run gets, time limit). Its `run_name` is replaced per run.
    pub base: QemuOptions,
    /// How many runs.
    pub runs: u32,
    /// Go on after a failed run instead of stopping there.
    pub keep_going: bool,
    /// The directory under `build/` that holds the runs.
    pub name: String,
    /// Whether to draw a progress bar (on stderr, when it is a terminal).
    pub progress: bool,
    /// Capture every crash with this capture kernel (its `default_crash`
    /// is ignored: the plan gives each run its crash); `None`: plain
    /// crashes, ended by hv's crash path.
    pub capture: Option<CaptureOptions>,
}

impl StressOptions {
    /// `runs` runs of `base`, stopping at the first failure, with a
    /// progress bar, in `build/stress-<boot>-smp<N>/`.
    pub fn new(base: QemuOptions, runs: u32) -> Self {
        let name = format!("stress-{}-smp{}", base.boot.as_str(), base.smp);
        Self {
            base,
            runs,
            keep_going: false,
            name,
            progress: true,
            capture: None,
        }
    }
}

/// What one run of the loop gave.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// 0-based run number.
    pub index: u32,
    /// Whether the run passed the usual verdict and the plan's checks.
    pub ok: bool,
    /// Everything that was wrong (`; `-separated), `None` when ok.
    pub reason: Option<String>,
    /// Whether every CPU given came online, none failed.
    pub all_online: bool,
    /// hv's `cpus.online`.
    pub online: Option<u64>,
    /// hv's `bringup_us`.
    pub bringup_us: Option<u64>,
    /// The run's hv command line.
    pub cmdline: String,
    /// The crash, for a run that asked for one.
    pub crash: Option<CrashRecord>,
    /// The serial log (kept only for failed runs).
    pub serial_log: PathBuf,
    /// The run's directory (kept only for failed runs).
    pub run_dir: PathBuf,
}

impl RunRecord {
    /// Reads a finished run, adding the plan's `extra` problems.
    pub fn from_outcome(index: u32, cpus: u32, outcome: &RunOutcome, extra: Vec<String>) -> Self {
        let report = Report::of(&outcome.report);
        let reported = report.cpus.or_empty();
        let online = reported.online.value();
        let failed_none = reported.failed.get().is_some_and(Vec::is_empty);
        let mut problems: Vec<String> = outcome.reason.iter().cloned().collect();
        problems.extend(extra);
        Self {
            index,
            ok: problems.is_empty(),
            reason: (!problems.is_empty()).then(|| problems.join("; ")),
            all_online: online == Some(u64::from(cpus)) && failed_none,
            online,
            bringup_us: report.bringup_us.value(),
            cmdline: report
                .xtask
                .or_empty()
                .cmdline
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            crash: CrashRecord::from_report(&outcome.report),
            serial_log: report
                .serial_log
                .as_str()
                .map(PathBuf::from)
                .unwrap_or_else(|| outcome.run_dir.join("serial.log")),
            run_dir: outcome.run_dir.clone(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "index": self.index,
            "ok": self.ok,
            "reason": self.reason,
            "all_online": self.all_online,
            "online": self.online,
            "bringup_us": self.bringup_us,
            "cmdline": self.cmdline,
            "crash": self.crash.as_ref().map(CrashRecord::to_json),
            // Only a failed run's log is kept.
            "serial_log": if self.ok { Value::Null } else { json!(self.serial_log) },
        })
    }
}

/// The result of a stress loop.
#[derive(Debug, Clone, PartialEq)]
pub struct StressResult {
    /// What the loop was asked for, for the table's title.
    pub title: String,
    /// How many runs were asked for.
    pub requested: u32,
    /// The runs made, in order (fewer than requested when the loop stopped
    /// at a failure).
    pub records: Vec<RunRecord>,
}

impl StressResult {
    /// Runs with every CPU online.
    pub fn all_online(&self) -> usize {
        self.records.iter().filter(|r| r.all_online).count()
    }

    /// The runs that failed.
    pub fn failures(&self) -> Vec<&RunRecord> {
        self.records.iter().filter(|r| !r.ok).collect()
    }

    /// Whether every requested run was made and passed.
    pub fn ok(&self) -> bool {
        self.records.len() == self.requested as usize && self.failures().is_empty()
    }

    /// Min / median / max of `bringup_us` over the runs that reported it.
    pub fn bringup(&self) -> Option<Spread> {
        let samples: Vec<u64> = self.records.iter().filter_map(|r| r.bringup_us).collect();
        Spread::of_u64(&samples)
    }

    /// The "all CPUs online" cell: a count, and for crash loops out of how
    /// many runs reported their CPUs at all (a crash before the boot
    /// report leaves none).
    fn all_online_text(&self) -> String {
        if self.crash_runs().is_empty() {
            return self.all_online().to_string();
        }
        let reporting = self.records.iter().filter(|r| r.online.is_some()).count();
        format!(
            "{} of {reporting} runs that reported their CPUs before the crash",
            self.all_online()
        )
    }

    /// The runs that asked for a crash.
    pub fn crash_runs(&self) -> Vec<&RunRecord> {
        self.records.iter().filter(|r| r.crash.is_some()).collect()
    }

    /// Crash runs that passed (the crash report showed a correct shootdown).
    pub fn crash_runs_ok(&self) -> usize {
        self.crash_runs().iter().filter(|r| r.ok).count()
    }

    fn crashes(&self) -> impl Iterator<Item = &CrashRecord> {
        self.records.iter().filter_map(|r| r.crash.as_ref())
    }

    /// Stragglers named over all crash runs: (CPUs, runs with any, runs
    /// with any where none was asked for).
    pub fn stragglers_seen(&self) -> (usize, usize, usize) {
        let with: Vec<&CrashRecord> = self
            .crashes()
            .filter(|crash| !crash.stragglers.is_empty())
            .collect();
        let cpus = with.iter().map(|crash| crash.stragglers.len()).sum();
        let unasked = with.iter().filter(|c| !c.straggler_expected()).count();
        (cpus, with.len(), unasked)
    }

    /// Min / median / max of `shootdown_us` over the crash runs where
    /// every CPU checked in (`timed_out` false).
    pub fn shootdown(&self) -> Option<Spread> {
        let samples: Vec<u64> = self
            .crashes()
            .filter(|crash| !crash.timed_out)
            .filter_map(|crash| crash.shootdown_us)
            .collect();
        Spread::of_u64(&samples)
    }

    /// The same over the crash runs that waited for a straggler.
    pub fn shootdown_timed_out(&self) -> Option<Spread> {
        let samples: Vec<u64> = self
            .crashes()
            .filter(|crash| crash.timed_out)
            .filter_map(|crash| crash.shootdown_us)
            .collect();
        Spread::of_u64(&samples)
    }

    /// How many crash runs used each point (`time` for none), by name.
    pub fn points(&self) -> Vec<(String, usize)> {
        self.points_with_failures()
            .into_iter()
            .map(|(name, count, _)| (name, count))
            .collect()
    }

    /// How many crash runs used each point, and how many of those failed.
    pub fn points_with_failures(&self) -> Vec<(String, usize, usize)> {
        let mut counts: Vec<(String, usize, usize)> = Vec::new();
        for record in &self.records {
            let Some(crash) = &record.crash else { continue };
            let name = crash.point_name();
            let failed = usize::from(!record.ok);
            match counts.iter_mut().find(|(known, _, _)| *known == name) {
                Some((_, count, failures)) => {
                    *count += 1;
                    *failures += failed;
                }
                None => counts.push((name, 1, failed)),
            }
        }
        counts.sort();
        counts
    }

    /// Crash runs with a capture kernel loaded, and how many of them
    /// entered it.
    pub fn captures(&self) -> (usize, usize) {
        let loaded: Vec<bool> = self.crashes().filter_map(|c| c.capture_entered).collect();
        (
            loaded.len(),
            loaded.iter().filter(|&&entered| entered).count(),
        )
    }

    /// Min / median / max of `crash_to_capture_us` over the runs that
    /// entered their capture kernel.
    pub fn crash_to_capture(&self) -> Option<Spread> {
        let samples: Vec<u64> = self
            .crashes()
            .filter(|crash| crash.capture_entered == Some(true))
            .filter_map(|crash| crash.crash_to_capture_us)
            .collect();
        Spread::of_u64(&samples)
    }

    /// The closing table.
    pub fn table(&self) -> String {
        let made = self.records.len();
        let mut rows = vec![
            vec!["runs".to_owned(), format!("{made} of {}", self.requested)],
            vec!["all CPUs online".to_owned(), self.all_online_text()],
            vec!["failures".to_owned(), self.failures().len().to_string()],
        ];
        match self.bringup() {
            Some(spread) => rows.push(vec![
                "bring-up (us)".to_owned(),
                format!(
                    "min {}  median {}  max {}",
                    stats::number(spread.min),
                    stats::number(spread.median),
                    stats::number(spread.max)
                ),
            ]),
            None => rows.push(vec!["bring-up (us)".to_owned(), "none reported".to_owned()]),
        }
        let crash_runs = self.crash_runs().len();
        if crash_runs > 0 {
            rows.push(vec![
                "crash runs ok".to_owned(),
                format!("{} of {crash_runs}", self.crash_runs_ok()),
            ]);
            let (cpus, runs, unasked) = self.stragglers_seen();
            rows.push(vec![
                "stragglers seen".to_owned(),
                if cpus == 0 {
                    "none".to_owned()
                } else {
                    format!(
                        "{cpus} in {runs} run{} ({})",
                        if runs == 1 { "" } else { "s" },
                        if unasked == 0 {
                            "all deliberate: nmi_blocked".to_owned()
                        } else {
                            format!("{unasked} run(s) where none was asked for")
                        }
                    )
                },
            ]);
            rows.push(vec![
                "shootdown (us)".to_owned(),
                spread_text(self.shootdown(), "no run without stragglers"),
            ]);
            if let Some(spread) = self.shootdown_timed_out() {
                rows.push(vec![
                    "timed out (us)".to_owned(),
                    spread_text(Some(spread), ""),
                ]);
            }
            let (loaded, entered) = self.captures();
            if loaded > 0 {
                rows.push(vec![
                    "captures entered".to_owned(),
                    format!("{entered} of {loaded}"),
                ]);
                rows.push(vec![
                    "crash to capture (us)".to_owned(),
                    spread_text(self.crash_to_capture(), "none measured"),
                ]);
            }
            rows.push(vec![
                "points".to_owned(),
                self.points_with_failures()
                    .iter()
                    .map(|(name, count, failed)| match failed {
                        0 => format!("{name} {count}"),
                        failed => format!("{name} {count} ({failed} failed)"),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ]);
        }
        let mut out = format!("{}\n{}", self.title, left_table(&rows));
        let failures = self.failures();
        if !failures.is_empty() {
            out.push_str("  failed runs (logs kept):\n");
            for record in failures {
                let spec = record
                    .crash
                    .as_ref()
                    .and_then(|crash| crash.spec)
                    .map(|spec| format!(" (crash={spec})"))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "    run {}{spec}: {}\n      serial log: {}\n",
                    record.index + 1,
                    record.reason.as_deref().unwrap_or("?"),
                    record.serial_log.display()
                ));
            }
        }
        if made < self.requested as usize {
            out.push_str(&format!(
                "  stopped after the first failure (--keep-going runs all {})\n",
                self.requested
            ));
        }
        out
    }

    /// The whole result as JSON (`--report`).
    pub fn to_json(&self) -> Value {
        let spread = self.bringup();
        json!({
            "title": self.title,
            "runs_requested": self.requested,
            "runs": self.records.len(),
            "all_online": self.all_online(),
            "failures": self.failures().len(),
            "ok": self.ok(),
            "bringup_us": spread.map(|s| json!({"min": s.min, "median": s.median, "max": s.max})),
            "crash": (!self.crash_runs().is_empty()).then(|| {
                let (cpus, runs, unasked) = self.stragglers_seen();
                json!({
                    "runs": self.crash_runs().len(),
                    "ok": self.crash_runs_ok(),
                    "stragglers": {"cpus": cpus, "runs": runs, "unasked_runs": unasked},
                    "shootdown_us": spread_json(self.shootdown()),
                    "shootdown_timed_out_us": spread_json(self.shootdown_timed_out()),
                    "points": self
                        .points()
                        .into_iter()
                        .map(|(name, count)| (name, json!(count)))
                        .collect::<serde_json::Map<String, Value>>(),
                    "points_failed": self
                        .points_with_failures()
                        .into_iter()
                        .filter(|(_, _, failed)| *failed > 0)
                        .map(|(name, _, failed)| (name, json!(failed)))
                        .collect::<serde_json::Map<String, Value>>(),
                    "captures": {"loaded": self.captures().0, "entered": self.captures().1},
                    "crash_to_capture_us": spread_json(self.crash_to_capture()),
                })
            }),
            "records": self.records.iter().map(RunRecord::to_json).collect::<Vec<_>>(),
        })
    }
}

/// `min A  median B  max C`, or `none` when there are no samples.
fn spread_text(spread: Option<Spread>, none: &str) -> String {
    match spread {
        Some(spread) => format!(
            "min {}  median {}  max {}",
            stats::number(spread.min),
            stats::number(spread.median),
            stats::number(spread.max)
        ),
        None => none.to_owned(),
    }
}

fn spread_json(spread: Option<Spread>) -> Value {
    spread.map_or(
        Value::Null,
        |s| json!({"min": s.min, "median": s.median, "max": s.max}),
    )
}

/// A two-column table whose values are left-aligned.
fn left_table(rows: &[Vec<String>]) -> String {
    let width = rows
        .iter()
        .map(|row| row[0].chars().count())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|row| format!("  {:<width$}  {}\n", row[0], row[1]))
        .collect()
}

/// Runs the stress loop with real QEMU runs (each with the loop's capture
/// kernel, if it has one).
pub fn stress(options: &StressOptions, plan: &mut dyn RunPlan) -> Result<StressResult> {
    match &options.capture {
        Some(capture) => {
            let capture = CaptureOptions {
                default_crash: None,
                ..capture.clone()
            };
            stress_with(options, plan, |run| capture::qemu(run, &capture))
        }
        None => stress_with(options, plan, crate::run::qemu),
    }
}

/// The stress loop over any way of making a run (QEMU, or a fake in tests).
pub fn stress_with(
    options: &StressOptions,
    plan: &mut dyn RunPlan,
    mut run: impl FnMut(&QemuOptions) -> Result<RunOutcome>,
) -> Result<StressResult> {
    let base = &options.base;
    let title = format!(
        "stress: hv on QEMU, -smp {}, {} MiB, boot {}{}{}{}",
        base.smp,
        base.memory_mib,
        base.boot.as_str(),
        if base.append.is_empty() {
            String::new()
        } else {
            format!(", with `{}`", base.append.join(" "))
        },
        plan.describe()
            .map(|text| format!(", {text}"))
            .unwrap_or_default(),
        match &options.capture {
            Some(capture) if capture.until_entry =>
                format!(", captured by {} up to its entry", capture.kernel.as_str()),
            Some(capture) => format!(", captured by {}", capture.kernel.as_str()),
            None => String::new(),
        }
    );
    // Failed runs of an earlier loop must not be mistaken for this one's.
    let root = paths::run_dir(&options.name);
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }

    let bar = progress_bar(u64::from(options.runs), options.progress);
    let mut records = Vec::new();
    for index in 0..options.runs {
        let mut this = base.clone();
        this.run_name = Some(format!("{}/run-{:03}", options.name, index + 1));
        this.append.extend(plan.words(index));
        this.echo = false;
        let outcome = run(&this)?;
        let extra = plan.check(index, &outcome);
        let record = RunRecord::from_outcome(index, base.smp, &outcome, extra);
        bar.inc(1);
        if record.ok {
            // Nothing to look at: keep build/ small over long loops.
            let _ = fs::remove_dir_all(&record.run_dir);
        } else {
            say(
                &bar,
                format!(
                    "run {} failed: {}\n  serial log: {}",
                    index + 1,
                    record.reason.as_deref().unwrap_or("?"),
                    record.serial_log.display()
                ),
            );
        }
        let failed = !record.ok;
        records.push(record);
        let failures = records.iter().filter(|r: &&RunRecord| !r.ok).count();
        let last = records.last();
        bar.set_message(match last.and_then(|r| r.crash.as_ref()) {
            Some(crash) => format!(
                "{failures} failed, last crash {} ({}), shootdown {}",
                crash
                    .spec
                    .map_or_else(|| "?".to_owned(), |spec| spec.to_string()),
                crash.point_name(),
                crash
                    .shootdown_us
                    .map_or_else(|| "?".to_owned(), |us| format!("{us} us"))
            ),
            None => format!(
                "{failures} failed, last bring-up {}",
                last.and_then(|r| r.bringup_us)
                    .map_or_else(|| "?".to_owned(), |us| format!("{us} us"))
            ),
        });
        if failed && !options.keep_going {
            break;
        }
    }
    bar.finish_and_clear();
    let _ = fs::remove_dir(&root);
    Ok(StressResult {
        title,
        requested: options.runs,
        records,
    })
}

/// Prints a line on stderr above the progress bar, also when the bar is
/// hidden (stderr not a terminal), where `ProgressBar::println` would drop it.
pub(crate) fn say(bar: &ProgressBar, line: String) {
    bar.suspend(|| eprintln!("{line}"));
}

/// A bar counting `steps` on stderr (drawn only when stderr is a
/// terminal), or a hidden one.
pub(crate) fn progress_bar(steps: u64, visible: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(steps),
        if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} [{bar:30}] {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn outcome(dir: &str, online: u64, bringup: Option<u64>, reason: Option<&str>) -> RunOutcome {
        let run_dir = std::env::temp_dir().join(dir);
        RunOutcome {
            report: json!({
                "cpus": {"possible": 64, "online": online, "failed": if online == 64 { json!([]) } else { json!([7]) }},
                "bringup_us": bringup,
                "serial_log": run_dir.join("serial.log"),
                "xtask": {"cmdline": "finish=exit"},
            }),
            serial: String::new(),
            ok: reason.is_none(),
            reason: reason.map(str::to_owned),
            run_dir,
        }
    }

    fn record(index: u32, ok: bool, all_online: bool, bringup_us: Option<u64>) -> RunRecord {
        RunRecord {
            index,
            ok,
            reason: (!ok).then(|| "cpus.online is 63, expected 64 (all 64 CPUs)".to_owned()),
            all_online,
            online: Some(if all_online { 64 } else { 63 }),
            bringup_us,
            cmdline: "finish=exit".to_owned(),
            crash: None,
            serial_log: format!("/b/stress/run-{:03}/serial.log", index + 1).into(),
            run_dir: format!("/b/stress/run-{:03}", index + 1).into(),
        }
    }

    #[test]
    fn a_record_reads_cpus_and_bringup_from_the_report() {
        let good = RunRecord::from_outcome(0, 64, &outcome("a", 64, Some(4861), None), vec![]);
        assert!(good.ok && good.all_online);
        assert_eq!((good.online, good.bringup_us), (Some(64), Some(4861)));
        assert_eq!(good.cmdline, "finish=exit");
        let short = RunRecord::from_outcome(
            1,
            64,
            &outcome("b", 63, Some(9000), Some("cpus.online is 63")),
            vec![],
        );
        assert!(!short.ok && !short.all_online);
        assert_eq!(short.reason.as_deref(), Some("cpus.online is 63"));
        assert!(short.serial_log.ends_with("b/serial.log"));
    }

    #[test]
    fn a_plan_check_fails_an_otherwise_good_run() {
        let record = RunRecord::from_outcome(
            0,
            64,
            &outcome("c", 64, Some(1), None),
            vec!["no crash dump".to_owned()],
        );
        assert!(!record.ok && record.all_online);
        assert_eq!(record.reason.as_deref(), Some("no crash dump"));
    }

    #[test]
    fn the_table_counts_runs_online_failures_and_the_bringup_spread() {
        let result = StressResult {
            title: "stress: t".to_owned(),
            requested: 4,
            records: vec![
                record(0, true, true, Some(4000)),
                record(1, false, false, Some(9000)),
                record(2, true, true, Some(3000)),
                record(3, true, true, None),
            ],
        };
        assert_eq!(result.all_online(), 3);
        assert_eq!(result.failures().len(), 1);
        assert!(!result.ok());
        let text = result.table();
        assert_eq!(
            text,
            "stress: t\n\
             \x20 runs             4 of 4\n\
             \x20 all CPUs online  3\n\
             \x20 failures         1\n\
             \x20 bring-up (us)    min 3000  median 4000  max 9000\n\
             \x20 failed runs (logs kept):\n\
             \x20   run 2: cpus.online is 63, expected 64 (all 64 CPUs)\n\
             \x20     serial log: /b/stress/run-002/serial.log\n"
        );
        let json = result.to_json();
        assert_eq!(
            json["bringup_us"],
            json!({"min": 3000.0, "median": 4000.0, "max": 9000.0})
        );
        assert_eq!(
            json["records"][1]["serial_log"],
            "/b/stress/run-002/serial.log"
        );
        assert_eq!(json["records"][0]["serial_log"], Value::Null);
    }

    #[test]
    fn a_loop_cut_short_says_so_and_is_not_ok() {
        let result = StressResult {
            title: "stress: t".to_owned(),
            requested: 20,
            records: vec![
                record(0, true, true, Some(10)),
                record(1, false, false, None),
            ],
        };
        let text = result.table();
        assert!(text.contains("runs             2 of 20\n"), "{text}");
        assert!(text.contains("stopped after the first failure"), "{text}");
        assert!(!result.ok());
    }

    #[test]
    fn no_bringup_reported_is_shown_as_such() {
        let result = StressResult {
            title: "t".to_owned(),
            requested: 1,
            records: vec![record(0, false, false, None)],
        };
        assert!(result.table().contains("bring-up (us)    none reported"));
        assert_eq!(result.to_json()["bringup_us"], Value::Null);
    }

    /// Counts the words it hands out and fails every run it is asked to.
    struct Scripted {
        fail: Vec<u32>,
        checked: Vec<u32>,
    }

    impl RunPlan for Scripted {
        fn words(&mut self, index: u32) -> Vec<String> {
            vec![format!("run_index={index}")]
        }
        fn check(&mut self, index: u32, _: &RunOutcome) -> Vec<String> {
            self.checked.push(index);
            if self.fail.contains(&index) {
                vec![format!("planned failure of run {index}")]
            } else {
                Vec::new()
            }
        }
    }

    fn options(runs: u32, keep_going: bool) -> StressOptions {
        let mut base = QemuOptions::new("/t/hv");
        base.smp = 64;
        base.append = vec!["log=info".to_owned()];
        StressOptions {
            keep_going,
            progress: false,
            name: format!("stress-unit-test-{}-{keep_going}", std::process::id()),
            ..StressOptions::new(base, runs)
        }
    }

    /// A fake run: records the options it got, reports all CPUs online.
    fn fake(seen: &RefCell<Vec<QemuOptions>>) -> impl FnMut(&QemuOptions) -> Result<RunOutcome> {
        move |options: &QemuOptions| {
            seen.borrow_mut().push(options.clone());
            let name = options.run_name.clone().unwrap();
            Ok(outcome(&name, 64, Some(100), None))
        }
    }

    #[test]
    fn each_run_gets_its_own_directory_and_the_plan_words() {
        let seen = RefCell::new(Vec::new());
        let mut plan = Scripted {
            fail: vec![],
            checked: vec![],
        };
        let options = options(3, false);
        let result = stress_with(&options, &mut plan, fake(&seen)).unwrap();
        assert!(result.ok());
        assert_eq!(result.records.len(), 3);
        assert_eq!(plan.checked, [0, 1, 2]);
        let seen = seen.borrow();
        assert_eq!(
            seen[2].run_name.as_deref(),
            Some(format!("{}/run-003", options.name).as_str())
        );
        assert_eq!(seen[1].append, ["log=info", "run_index=1"]);
        assert!(seen.iter().all(|o| o.smp == 64 && !o.echo));
    }

    #[test]
    fn the_loop_stops_at_the_first_failure_unless_told_to_keep_going() {
        for (keep_going, made) in [(false, 2), (true, 5)] {
            let seen = RefCell::new(Vec::new());
            let mut plan = Scripted {
                fail: vec![1, 3],
                checked: vec![],
            };
            let result = stress_with(&options(5, keep_going), &mut plan, fake(&seen)).unwrap();
            assert_eq!(result.records.len(), made, "keep_going {keep_going}");
            assert!(!result.ok());
            let failed: Vec<u32> = result.failures().iter().map(|r| r.index).collect();
            assert_eq!(failed, if keep_going { vec![1, 3] } else { vec![1] });
        }
    }

    #[test]
    fn an_error_starting_a_run_ends_the_loop_with_that_error() {
        let mut calls = 0;
        let error = stress_with(&options(3, true), &mut Plain, |_| {
            calls += 1;
            anyhow::bail!("no qemu")
        })
        .unwrap_err();
        assert_eq!(error.to_string(), "no qemu");
        assert_eq!(calls, 1);
    }

    /// A finished crash run as the loop sees it.
    fn crash_outcome(spec: &str, crash: Value, reason: Option<&str>) -> RunOutcome {
        let run_dir = std::env::temp_dir().join("xtask-crash-record");
        RunOutcome {
            report: json!({
                "cmdline": {"raw": format!("finish=exit {spec}"), "errors": []},
                "crash": crash,
                "serial_log": run_dir.join("serial.log"),
                "xtask": {"cmdline": format!("finish=exit crash=cpu:1,after_ms:1 {spec}")},
            }),
            serial: String::new(),
            ok: reason.is_none(),
            reason: reason.map(str::to_owned),
            run_dir,
        }
    }

    fn crash_line(
        coordinator: u64,
        stragglers: Value,
        shootdown_us: u64,
        timed_out: bool,
    ) -> Value {
        json!({"cpu_index": coordinator, "expected": 63, "checked_in": 63,
               "stragglers": stragglers, "shootdown_us": shootdown_us, "timed_out": timed_out})
    }

    #[test]
    fn a_crash_record_reads_the_last_crash_word_and_the_report() {
        let blocked = crash_outcome(
            "crash=cpu:5,after_ms:3,point:nmi_blocked",
            crash_line(0, json!([5]), 500_100, true),
            None,
        );
        let record = RunRecord::from_outcome(0, 64, &blocked, vec![]);
        let crash = record.crash.unwrap();
        assert_eq!(
            crash.spec.unwrap().to_string(),
            "cpu:5,after_ms:3,point:nmi_blocked"
        );
        assert_eq!(crash.point_name(), "nmi_blocked");
        assert!(crash.straggler_expected());
        assert_eq!(
            (
                crash.coordinator,
                crash.stragglers,
                crash.shootdown_us,
                crash.timed_out
            ),
            (Some(0), vec![5], Some(500_100), true)
        );
        // A run without a crash word has no crash record.
        let plain = RunRecord::from_outcome(0, 64, &outcome("p", 64, Some(1), None), vec![]);
        assert!(plain.crash.is_none());
        // Asked for, but no crash report: the record is there, empty.
        let silent = crash_outcome(
            "crash=cpu:2,after_ms:1",
            Value::Null,
            Some("no `crash` report"),
        );
        let crash = RunRecord::from_outcome(0, 64, &silent, vec![])
            .crash
            .unwrap();
        assert_eq!((crash.coordinator, crash.shootdown_us), (None, None));
        assert_eq!(crash.point_name(), "time");
    }

    #[test]
    fn the_table_counts_crash_runs_stragglers_shootdowns_and_points() {
        let runs = [
            (
                "crash=cpu:3,after_ms:5",
                crash_line(3, json!([]), 2000, false),
                None,
            ),
            (
                "crash=cpu:9,after_ms:0,point:bringup",
                crash_line(9, json!([]), 9000, false),
                None,
            ),
            (
                "crash=cpu:4,after_ms:5,point:nmi_blocked",
                crash_line(0, json!([4]), 500_200, true),
                None,
            ),
            (
                "crash=cpu:6,after_ms:5",
                crash_line(6, json!([7]), 500_100, true),
                Some("crash.stragglers is [7], expected []"),
            ),
            (
                "crash=cpu:7,after_ms:5",
                crash_line(7, json!([]), 5000, false),
                None,
            ),
        ];
        let records = runs
            .iter()
            .enumerate()
            .map(|(index, (spec, crash, reason))| {
                RunRecord::from_outcome(
                    index as u32,
                    64,
                    &crash_outcome(spec, crash.clone(), *reason),
                    vec![],
                )
            })
            .collect();
        let result = StressResult {
            title: "stress: c".to_owned(),
            requested: 5,
            records,
        };
        assert_eq!(result.crash_runs().len(), 5);
        assert_eq!(result.crash_runs_ok(), 4);
        assert_eq!(result.stragglers_seen(), (2, 2, 1));
        let text = result.table();
        for row in [
            "  all CPUs online  0 of 0 runs that reported their CPUs before the crash\n",
            "  crash runs ok    4 of 5\n",
            "  stragglers seen  2 in 2 runs (1 run(s) where none was asked for)\n",
            "  shootdown (us)   min 2000  median 5000  max 9000\n",
            "  timed out (us)   min 500100  median 500150  max 500200\n",
            "  points           bringup 1, nmi_blocked 1, time 3 (1 failed)\n",
            "    run 4 (crash=cpu:6,after_ms:5): crash.stragglers is [7], expected []\n",
        ] {
            assert!(text.contains(row), "missing {row:?} in\n{text}");
        }
        let json = result.to_json();
        assert_eq!(json["crash"]["ok"], 4);
        assert_eq!(json["crash"]["points"]["time"], 3);
        assert_eq!(json["crash"]["shootdown_us"]["median"], 5000.0);
        assert_eq!(json["records"][2]["crash"]["stragglers"], json!([4]));
        // A loop without crashes keeps its table as it was.
        let plain = StressResult {
            title: "t".to_owned(),
            requested: 1,
            records: vec![record(0, true, true, Some(5))],
        };
        assert!(!plain.table().contains("crash runs"));
        assert_eq!(plain.to_json()["crash"], Value::Null);
    }

    #[test]
    fn a_crash_plan_gives_each_run_a_valid_crash_and_names_its_seed() {
        let seen = RefCell::new(Vec::new());
        let mut plan = CrashPlan::new(CrashArg::Random, 1234, 64, false, 100);
        let options = options(20, true);
        let result = stress_with(&options, &mut plan, fake(&seen)).unwrap();
        assert!(
            result
                .title
                .ends_with(", a random crash per run (seed 1234)"),
            "{}",
            result.title
        );
        let specs: Vec<CrashSpec> = seen
            .borrow()
            .iter()
            .map(|o| {
                assert_eq!(o.append.len(), 2, "{:?}", o.append);
                let word = o.append[1].strip_prefix("crash=").unwrap();
                CrashSpec::parse(word).unwrap()
            })
            .collect();
        assert!(specs.iter().all(|spec| spec.check(64, false).is_ok()));
        assert!(specs.windows(2).any(|pair| pair[0] != pair[1]), "{specs:?}");
        // The same seed replays the same loop.
        let mut again = CrashPlan::new(CrashArg::Random, 1234, 64, false, 100);
        let replay: Vec<CrashSpec> = (0..20).map(|_| again.next_spec()).collect();
        assert_eq!(replay, specs);
        // A fixed spec is the same every run.
        let fixed = CrashSpec::parse("cpu:2,after_ms:4").unwrap();
        let mut plan = CrashPlan::new(CrashArg::Spec(fixed), 0, 64, false, 100);
        assert_eq!(plan.words(0), ["crash=cpu:2,after_ms:4"]);
        assert_eq!(plan.words(1), ["crash=cpu:2,after_ms:4"]);
        assert_eq!(plan.describe().unwrap(), "crash=cpu:2,after_ms:4 every run");
    }

    #[test]
    fn a_crash_plan_fails_a_run_whose_words_hv_rejected() {
        let mut plan = CrashPlan::new(CrashArg::Random, 1, 8, false, 100);
        let mut outcome = crash_outcome(
            "crash=cpu:1,after_ms:1",
            crash_line(1, json!([]), 1, false),
            None,
        );
        assert!(plan.check(0, &outcome).is_empty());
        outcome.report["cmdline"]["errors"] = json!(["crash: cpu:N is required"]);
        assert_eq!(
            plan.check(0, &outcome),
            ["hv rejected command-line words: crash: cpu:N is required"]
        );
    }

    #[test]
    fn captured_crashes_are_counted_with_their_entries_and_failures_per_point() {
        let captured = |spec: &str, entered: bool, reason: Option<&str>| {
            let mut outcome = crash_outcome(spec, crash_line(3, json!([]), 2000, false), reason);
            outcome.report["capture"] = json!({"loaded": true, "entered": entered,
                "crash_to_capture_us": 50_000, "attempt": 2});
            outcome
        };
        let runs = [
            captured("crash=cpu:3,after_ms:5,point:handover_panic", true, None),
            captured(
                "crash=cpu:3,after_ms:5,point:nmi_in_purgatory",
                false,
                Some("the hv capture kernel was not entered"),
            ),
            captured("crash=cpu:3,after_ms:5,point:nmi_in_purgatory", true, None),
        ];
        let records = runs
            .iter()
            .enumerate()
            .map(|(index, outcome)| RunRecord::from_outcome(index as u32, 64, outcome, vec![]))
            .collect();
        let result = StressResult {
            title: "stress: c".to_owned(),
            requested: 3,
            records,
        };
        assert_eq!(result.captures(), (3, 2));
        let text = result.table();
        for row in [
            "captures entered       2 of 3\n",
            "crash to capture (us)  min 50000  median 50000  max 50000\n",
            "points                 handover_panic 1, nmi_in_purgatory 2 (1 failed)\n",
        ] {
            assert!(text.contains(row), "missing {row:?} in\n{text}");
        }
        let json = result.to_json();
        assert_eq!(json["crash"]["points_failed"]["nmi_in_purgatory"], 1);
        assert_eq!(json["crash"]["captures"]["entered"], 2);
        assert_eq!(json["records"][0]["crash"]["handover_attempt"], 2);
    }
}
