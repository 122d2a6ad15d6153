//! `cargo xtask bench crash`: the way from a panic to the capture kernel's
//! first instruction, step by step.
//!
//! Each run boots hv in QEMU (direct boot) with hv's capture mode and a
//! time-based crash on one CPU (`crash=cpu:N,after_ms:T`: by default a
//! random CPU and a random T from 1 to 20 ms past the guest run, so that
//! it comes after the boot report while the guests run on, from a printed
//! seed), and ends once the capture image entered and read the
//! core header (the dump itself is not waited for). The crashing CPU
//! stamps each step of its way with the TSC, which runs on across the
//! jump into the capture image (the same CPU: the coordinator jumps);
//! hv reports the stamps and xtask turns the differences into
//! microseconds over the crashed hv's `smp.tsc_khz`:
//!
//! | step | from | to |
//! |---|---|---|
//! | panic to NMIs out | `crash.entered_tsc` (first CPU into the crash path) | `crash.nmis_out_tsc` |
//! | shootdown | NMIs out | `capture.rendezvous_tsc` (every CPU checked in) |
//! | digest check | `capture.digests_start_tsc` | `capture.digests_tsc` |
//! | own cleanup | rendezvous | `capture.cleanup_tsc` |
//! | summary | cleanup | `capture.summary_tsc` (the crash report printed) |
//! | core header | summary | `capture.header_tsc` |
//! | hand-over line | core header | `capture.handover_tsc` (the capture report printed) |
//! | to the purgatory | hand-over | `capture.purgatory.entry_tsc` (the purgatory's first stamp) |
//! | purgatory's checks | purgatory entry | `capture.purgatory.verified_tsc` (its own SHA-256 of every piece) |
//! | purgatory to its jump | verified | `capture.purgatory.jump_tsc` |
//! | jump to capture entry | jump | the capture image's `capture.entered_tsc` (its first instruction) |
//! | crash to capture entry | `crash.entered_tsc` | `capture.entered_tsc` |
//!
//! hv checks the digests while the other CPUs answer its NMIs: that row
//! lies inside the shootdown's, and the rows add up to more than the whole
//! way. (Before, the check followed the core header: the "digest check"
//! row ran from `capture.header_tsc`, the "hand-over line" from
//! `capture.digests_tsc`.)
//!
//! The reference, in the same run (alternating with hv's runs): Linux's
//! crash to its purgatory on the very same QEMU machine
//! ([`super::linux_crash`]: Debian's kernel crashing with `sysrq c`, a
//! capture kernel loaded with kexec-tools, timed on the host from the
//! crash line to the purgatory's first line). `--no-linux` leaves it out.
//!
//! Every run is judged like any capture run stopped at the entry: one that
//! fails cannot be measured and ends the benchmark. It never fails
//! because of the numbers.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::CrashRuns;
use crate::capture::{self, CaptureKernel, CaptureOptions};
use crate::crash::{CrashSpec, CrashSpecExt};
use crate::paths;
use crate::run::{Boot, QemuOptions};
use crate::stats::{self, Spread};
use crate::stress::{progress_bar, say};

/// The directory of the benchmark's runs under `build/`.
const BENCH_DIR: &str = "bench-crash";

/// The steps of the way, in order: their names, and the report keys of
/// the TSC stamps they run between.
pub const STEPS: [(&str, &str, &str); 11] = [
    (
        "panic to NMIs out",
        "/crash/entered_tsc",
        "/crash/nmis_out_tsc",
    ),
    (
        "shootdown",
        "/crash/nmis_out_tsc",
        "/capture/rendezvous_tsc",
    ),
    (
        "digest check",
        "/capture/digests_start_tsc",
        "/capture/digests_tsc",
    ),
    (
        "own cleanup",
        "/capture/rendezvous_tsc",
        "/capture/cleanup_tsc",
    ),
    ("summary", "/capture/cleanup_tsc", "/capture/summary_tsc"),
    ("core header", "/capture/summary_tsc", "/capture/header_tsc"),
    (
        "hand-over line",
        "/capture/header_tsc",
        "/capture/handover_tsc",
    ),
    (
        "to the purgatory",
        "/capture/handover_tsc",
        "/capture/purgatory/entry_tsc",
    ),
    (
        "purgatory's checks",
        "/capture/purgatory/entry_tsc",
        "/capture/purgatory/verified_tsc",
    ),
    (
        "purgatory to its jump",
        "/capture/purgatory/verified_tsc",
        "/capture/purgatory/jump_tsc",
    ),
    (
        "jump to capture entry",
        "/capture/purgatory/jump_tsc",
        "/capture/entered_tsc",
    ),
];

/// The whole way: the first CPU into the crash path to the capture
/// image's first instruction.
pub const TOTAL: (&str, &str, &str) = (
    "crash to capture entry",
    "/crash/entered_tsc",
    "/capture/entered_tsc",
);

/// A crash-path benchmark.
#[derive(Debug, Clone)]
pub struct CrashBenchOptions {
    /// The crash runs (machine, runs, crashes).
    pub crashes: CrashRuns,
    /// The hv capture image (built for the default reservation).
    pub capture_image: PathBuf,
    /// Measure Linux's crash to purgatory beside each hv run.
    pub linux: bool,
}

impl CrashBenchOptions {
    /// `-smp 64`, hv's capture memory, 10 runs, a random CPU per run.
    pub fn new(elf: impl Into<PathBuf>, capture_image: impl Into<PathBuf>) -> Self {
        Self {
            crashes: CrashRuns {
                memory_mib: capture::HV_MEMORY_MIB,
                ..CrashRuns::new(elf)
            },
            capture_image: capture_image.into(),
            linux: true,
        }
    }

    /// The crash of each run, in order: the same seed gives the same runs.
    pub fn specs(&self) -> Vec<CrashSpec> {
        self.crashes.specs()
    }
}

/// What one crash run measured: each step's microseconds, in
/// [`STEPS`]'s order, and the whole way.
#[derive(Debug, Clone, PartialEq)]
pub struct CrashSample {
    /// The crash it was given.
    pub spec: CrashSpec,
    /// The TSC rate the stamps are divided by (`smp.tsc_khz`).
    pub tsc_khz: u64,
    /// Each step's duration in microseconds.
    pub steps_us: Vec<f64>,
    /// Crash to capture entry, in microseconds.
    pub total_us: f64,
}

impl CrashSample {
    /// Reads a capture run's report; the reason when a stamp is missing
    /// or the stamps go backwards.
    pub fn from_report(spec: CrashSpec, report: &Value) -> Result<Self, String> {
        let tsc_khz = report["smp"]["tsc_khz"]
            .as_u64()
            .filter(|&khz| khz > 0)
            .ok_or("no smp.tsc_khz")?;
        let stamp = |pointer: &str| {
            report
                .pointer(pointer)
                .and_then(Value::as_u64)
                .filter(|&tsc| tsc > 0)
                .ok_or_else(|| format!("no {} stamp", &pointer[1..].replace('/', ".")))
        };
        let span = |(name, from, to): (&str, &str, &str)| -> Result<f64, String> {
            let (from, to) = (stamp(from)?, stamp(to)?);
            let ticks = to
                .checked_sub(from)
                .ok_or_else(|| format!("the TSC went backwards over {name}"))?;
            Ok(ticks as f64 * 1000.0 / tsc_khz as f64)
        };
        Ok(Self {
            spec,
            tsc_khz,
            steps_us: STEPS.into_iter().map(span).collect::<Result<_, _>>()?,
            total_us: span(TOTAL)?,
        })
    }
}

/// The samples of a benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct CrashBenchResult {
    /// `-smp`.
    pub smp: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The emulator (`qemu-tcg` or `qemu-kvm`).
    pub emulator: String,
    /// The seed of the random choices.
    pub seed: u64,
    /// The fixed crashing CPU, if one was given.
    pub cpu: Option<u32>,
    /// One sample per run.
    pub samples: Vec<CrashSample>,
    /// Linux's crash to purgatory on the same machine, per run (us).
    pub linux_us: Vec<f64>,
}

impl CrashBenchResult {
    /// The spread of Linux's crash to purgatory.
    pub fn linux(&self) -> Option<Spread> {
        Spread::of(&self.linux_us)
    }

    /// hv's median crash to capture entry over Linux's median crash to
    /// purgatory.
    pub fn ratio_of_medians(&self) -> Option<f64> {
        Some(self.total()?.median / self.linux()?.median)
    }

    /// The spread of step `index` of [`STEPS`] over the runs.
    pub fn step(&self, index: usize) -> Option<Spread> {
        let samples: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|s| s.steps_us.get(index).copied())
            .collect();
        Spread::of(&samples)
    }

    /// The spread of the whole way over the runs.
    pub fn total(&self) -> Option<Spread> {
        let samples: Vec<f64> = self.samples.iter().map(|s| s.total_us).collect();
        Spread::of(&samples)
    }

    /// The closing table.
    pub fn table(&self) -> String {
        let cell = |value: f64| stats::number((value * 10.0).round() / 10.0);
        let row = |name: &str, spread: Option<Spread>| {
            let mut row = vec![name.to_owned()];
            if let Some(spread) = spread {
                row.extend([cell(spread.min), cell(spread.median), cell(spread.max)]);
            }
            row
        };
        let mut rows = vec![
            ["step (us)", "min", "median", "max"]
                .map(str::to_owned)
                .to_vec(),
        ];
        rows.extend(
            STEPS
                .iter()
                .enumerate()
                .map(|(index, (name, _, _))| row(name, self.step(index))),
        );
        rows.push(row(TOTAL.0, self.total()));
        if !self.linux_us.is_empty() {
            rows.push(row("Linux: crash to purgatory", self.linux()));
        }
        let ratio = match self.ratio_of_medians() {
            Some(ratio) => format!(
                "  ratio of medians (hv crash to capture entry / Linux crash to purgatory): \
                 {ratio:.2}\n"
            ),
            None => String::new(),
        };
        format!(
            "crash path, first CPU into it to the capture image's first instruction (TSC \
             stamps): -smp {}, {} MiB, {}, {} runs, crashing CPU {}\n{}{ratio}",
            self.smp,
            self.memory_mib,
            self.emulator,
            self.samples.len(),
            match self.cpu {
                Some(cpu) => cpu.to_string(),
                None => format!("random (seed {})", self.seed),
            },
            stats::table(&rows),
        )
    }

    /// The result as JSON (`--report`, and `build/bench-crash/bench.json`).
    pub fn to_json(&self) -> Value {
        let spread = |spread: Option<Spread>| {
            spread.map(|s| json!({"min": s.min, "median": s.median, "max": s.max}))
        };
        json!({
            "smp": self.smp,
            "memory_mib": self.memory_mib,
            "emulator": self.emulator,
            "seed": self.seed,
            "cpu": self.cpu,
            "steps_us": STEPS
                .iter()
                .enumerate()
                .map(|(index, (name, _, _))| (name.to_string(), spread(self.step(index)).unwrap_or(Value::Null)))
                .collect::<serde_json::Map<String, Value>>(),
            "crash_to_capture_entry_us": spread(self.total()),
            "linux_crash_to_purgatory_us": spread(self.linux()),
            "linux_runs_us": self.linux_us,
            "ratio_of_medians": self.ratio_of_medians(),
            "runs": self.samples.iter().map(|s| json!({
                "crash": s.spec.to_string(),
                "tsc_khz": s.tsc_khz,
                "steps_us": s.steps_us,
                "total_us": s.total_us,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Runs the benchmark.
pub fn bench_crash(options: &CrashBenchOptions) -> Result<CrashBenchResult> {
    if options.crashes.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let root = super::fresh_qemu_bench(BENCH_DIR)?;
    let capture = CaptureOptions {
        image: Some(options.capture_image.clone()),
        default_crash: None,
        until_entry: true,
        ..CaptureOptions::new(CaptureKernel::Hv, options.crashes.smp)
    };
    let linux = if options.linux {
        let host = super::tsc::host_tsc(Duration::from_millis(100), 3);
        Some(
            super::linux_crash::LinuxReference::prepare(Some(host.khz))
                .context("preparing the Linux reference (--no-linux measures hv alone)")?,
        )
    } else {
        None
    };
    let accel = crate::accel::detect();
    let bar = progress_bar(u64::from(options.crashes.runs), options.crashes.progress);
    let mut emulator = String::new();
    let mut samples = Vec::new();
    let mut linux_us = Vec::new();
    for (index, spec) in options.specs().into_iter().enumerate() {
        let round = index + 1;
        bar.set_message(format!("run {round}: {}", spec.word()));
        let run_options = QemuOptions {
            smp: options.crashes.smp,
            memory_mib: options.crashes.memory_mib,
            boot: Boot::Direct,
            append: vec![spec.word()],
            timeout: options.crashes.timeout,
            run_name: Some(format!("{BENCH_DIR}/run-{round:03}")),
            ..QemuOptions::new(&options.crashes.elf)
        };
        let outcome = capture::qemu(&run_options, &capture)?;
        emulator = super::measured_crash_run(round, &spec, &outcome)?;
        let sample = CrashSample::from_report(spec, &outcome.report).map_err(|error| {
            anyhow::anyhow!(
                "crash run {round}: {error} (see {})",
                outcome.run_dir.display()
            )
        })?;
        say(
            &bar,
            format!(
                "run {round}: {} crash to capture entry {:.0} us",
                spec.word(),
                sample.total_us
            ),
        );
        samples.push(sample);
        let _ = fs::remove_dir_all(&outcome.run_dir);
        if let Some(linux) = &linux {
            bar.set_message(format!("run {round}: Linux"));
            let name = format!("{BENCH_DIR}/linux-{round:03}");
            let us = super::linux_crash::run(
                linux,
                accel,
                options.crashes.smp,
                &name,
                Duration::from_secs(600),
            )
            .with_context(|| format!("Linux run {round}"))?;
            say(
                &bar,
                format!("run {round}: Linux crash to purgatory {us:.0} us"),
            );
            linux_us.push(us);
            let _ = fs::remove_dir_all(paths::run_dir(&name));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let result = CrashBenchResult {
        smp: options.crashes.smp,
        memory_mib: options.crashes.memory_mib,
        emulator,
        seed: options.crashes.seed,
        cpu: options.crashes.cpu,
        samples,
        linux_us,
    };
    super::save_result(&root, &result.to_json())?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::super::MAX_AFTER_MS;
    use super::*;
    use crate::crash::DEFAULT_GUEST_RUN_MS;

    /// The stamps of one run at 1 GHz (1000 ticks a microsecond).
    fn report(khz: u64) -> Value {
        json!({
            "smp": {"tsc_khz": khz},
            "crash": {"entered_tsc": 1_000_000u64, "nmis_out_tsc": 1_050_000u64},
            "capture": {"rendezvous_tsc": 4_050_000u64, "cleanup_tsc": 4_060_000u64,
                        "summary_tsc": 9_060_000u64, "header_tsc": 10_060_000u64,
                        "digests_start_tsc": 2_060_000u64, "digests_tsc": 3_060_000u64,
                        "handover_tsc": 31_060_000u64,
                        "purgatory": {"entry_tsc": 32_060_000u64, "verified_tsc": 38_060_000u64,
                                      "jump_tsc": 38_560_000u64},
                        "entered_tsc": 40_060_000u64},
        })
    }

    #[test]
    fn a_sample_turns_the_stamps_into_microseconds() {
        let spec = CrashSpec::parse("cpu:3,after_ms:4").unwrap();
        let sample = CrashSample::from_report(spec, &report(1_000_000)).unwrap();
        assert_eq!(
            sample.steps_us,
            [
                50.0, 3000.0, 1000.0, 10.0, 5000.0, 1000.0, 21000.0, 1000.0, 6000.0, 500.0, 1500.0
            ]
        );
        let mut old = report(1_000_000);
        old["capture"]["purgatory"] = Value::Null;
        assert_eq!(
            CrashSample::from_report(spec, &old).unwrap_err(),
            "no capture.purgatory.entry_tsc stamp"
        );
        assert_eq!(sample.total_us, 39060.0);
        // At 2 GHz everything takes half as long.
        let fast = CrashSample::from_report(spec, &report(2_000_000)).unwrap();
        assert_eq!(fast.total_us, 19530.0);
        let mut missing = report(1_000_000);
        missing["capture"]["header_tsc"] = Value::Null;
        assert_eq!(
            CrashSample::from_report(spec, &missing).unwrap_err(),
            "no capture.header_tsc stamp"
        );
        let mut backwards = report(1_000_000);
        backwards["capture"]["digests_tsc"] = json!(5u64);
        assert_eq!(
            CrashSample::from_report(spec, &backwards).unwrap_err(),
            "the TSC went backwards over digest check"
        );
        assert_eq!(
            CrashSample::from_report(spec, &json!({})).unwrap_err(),
            "no smp.tsc_khz"
        );
    }

    #[test]
    fn the_table_has_a_row_per_step_and_the_whole_way() {
        let spec = CrashSpec::parse("cpu:3,after_ms:4").unwrap();
        let sample = CrashSample::from_report(spec, &report(1_000_000)).unwrap();
        let result = CrashBenchResult {
            smp: 64,
            memory_mib: 512,
            emulator: "qemu-tcg".to_owned(),
            seed: 5,
            cpu: None,
            samples: vec![sample.clone(), sample],
            linux_us: vec![20_000.0, 22_000.0],
        };
        let text = result.table();
        for line in [
            "-smp 64, 512 MiB, qemu-tcg, 2 runs, crashing CPU random (seed 5)\n",
            "  panic to NMIs out             50      50     50\n",
            "  digest check                1000    1000   1000\n",
            "  purgatory's checks          6000    6000   6000\n",
            "  crash to capture entry     39060   39060  39060\n",
            "  Linux: crash to purgatory  20000   21000  22000\n",
            "ratio of medians (hv crash to capture entry / Linux crash to purgatory): 1.86\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        let json = result.to_json();
        assert_eq!(json["steps_us"]["shootdown"]["median"], 3000.0);
        assert_eq!(json["crash_to_capture_entry_us"]["median"], 39060.0);
        assert_eq!(json["runs"][1]["crash"], "cpu:3,after_ms:4");
    }

    #[test]
    fn specs_are_time_based_and_replayable() {
        let mut options = CrashBenchOptions::new("/t/hv", "/t/hv-capture");
        options.crashes.seed = 3;
        options.crashes.runs = 50;
        let specs = options.specs();
        assert!(specs.iter().all(|s| {
            s.point.is_none()
                && s.cpu < 64
                && (DEFAULT_GUEST_RUN_MS + 1..=DEFAULT_GUEST_RUN_MS + MAX_AFTER_MS)
                    .contains(&s.after_ms)
        }));
        assert_eq!(options.specs(), specs);
    }
}
