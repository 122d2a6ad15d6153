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
//! usual verdict. [`Plain`] does neither; a crash-injection plan (a random
//! `crash=` word per run, and checks that the crash was handled) is another
//! implementation, without a change to the loop.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

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
}

/// Every run the same, judged as usual.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl RunPlan for Plain {}

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
    /// The serial log (kept only for failed runs).
    pub serial_log: PathBuf,
    /// The run's directory (kept only for failed runs).
    pub run_dir: PathBuf,
}

impl RunRecord {
    /// Reads a finished run, adding the plan's `extra` problems.
    pub fn from_outcome(index: u32, cpus: u32, outcome: &RunOutcome, extra: Vec<String>) -> Self {
        let report = &outcome.report;
        let online = report["cpus"]["online"].as_u64();
        let failed_none = report["cpus"]["failed"]
            .as_array()
            .is_some_and(Vec::is_empty);
        let mut problems: Vec<String> = outcome.reason.iter().cloned().collect();
        problems.extend(extra);
        Self {
            index,
            ok: problems.is_empty(),
            reason: (!problems.is_empty()).then(|| problems.join("; ")),
            all_online: online == Some(u64::from(cpus)) && failed_none,
            online,
            bringup_us: report["bringup_us"].as_u64(),
            cmdline: report["xtask"]["cmdline"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            serial_log: report["serial_log"]
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

    /// The closing table.
    pub fn table(&self) -> String {
        let made = self.records.len();
        let mut rows = vec![
            vec!["runs".to_owned(), format!("{made} of {}", self.requested)],
            vec!["all CPUs online".to_owned(), self.all_online().to_string()],
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
        let mut out = format!("{}\n{}", self.title, left_table(&rows));
        let failures = self.failures();
        if !failures.is_empty() {
            out.push_str("  failed runs (logs kept):\n");
            for record in failures {
                out.push_str(&format!(
                    "    run {}: {}\n      serial log: {}\n",
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
            "records": self.records.iter().map(RunRecord::to_json).collect::<Vec<_>>(),
        })
    }
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

/// Runs the stress loop with real QEMU runs.
pub fn stress(options: &StressOptions, plan: &mut dyn RunPlan) -> Result<StressResult> {
    stress_with(options, plan, crate::run::qemu)
}

/// The stress loop over any way of making a run (QEMU, or a fake in tests).
pub fn stress_with(
    options: &StressOptions,
    plan: &mut dyn RunPlan,
    mut run: impl FnMut(&QemuOptions) -> Result<RunOutcome>,
) -> Result<StressResult> {
    let base = &options.base;
    let title = format!(
        "stress: hv on QEMU, -smp {}, {} MiB, boot {}{}",
        base.smp,
        base.memory_mib,
        base.boot.as_str(),
        if base.append.is_empty() {
            String::new()
        } else {
            format!(", with `{}`", base.append.join(" "))
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
        bar.set_message(format!(
            "{failures} failed, last bring-up {}",
            records
                .last()
                .and_then(|r| r.bringup_us)
                .map_or_else(|| "?".to_owned(), |us| format!("{us} us"))
        ));
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
}
