//! `cargo xtask bench shootdown`: how fast hv's crash path collects every
//! CPU.
//!
//! Each run boots hv in QEMU (direct boot) with a time-based crash on one
//! CPU (`crash=cpu:N,after_ms:T`; by default a random CPU and a random T
//! from 1 to 20 ms after the guest run, from a printed seed: the guests
//! keep running, and the crash comes once the boot report is out, where no
//! guests run too) and reads its crash report:
//!
//! - `shootdown_us`: from the first NMI sent to the last CPU checked in;
//! - `nmi_latency_us`: per CPU index, from the first NMI sent to that CPU
//!   taking it (null for the coordinator);
//! - `nmi_in_guest`: per CPU index, whether the NMI found it in guest mode
//!   (it came as a VM exit), so the latency is also given apart for CPUs
//!   that were running a guest and for those that were not.
//!
//! Every run is judged like any crash run (the shootdown must be correct,
//! see `report::crash`): a run that fails cannot be measured and ends the
//! benchmark. Otherwise it never fails because of the numbers.

use crate::crash::CrashSpecExt;
use std::fs;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::crash::CrashSpec;
use crate::report::model::Report;
use crate::run::{self, Boot, QemuOptions};
use crate::stats::{self, Spread};
use crate::stress::{progress_bar, say};

/// The directory of the benchmark's runs under `build/`.
const BENCH_DIR: &str = "bench-shootdown";

/// A shootdown benchmark: its crash runs, nothing more.
pub type ShootdownOptions = super::CrashRuns;

/// What one crash run measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShootdownSample {
    /// The crash it was given.
    pub spec: CrashSpec,
    /// `crash.shootdown_us`.
    pub shootdown_us: u64,
    /// `crash.nmi_latency_us`, per CPU index.
    pub nmi_latency_us: Vec<Option<u64>>,
    /// `crash.nmi_in_guest`, per CPU index (empty when hv did not report
    /// it).
    pub nmi_in_guest: Vec<Option<bool>>,
    /// `crash.checkin_us`, per CPU index (empty when hv does not report
    /// it).
    pub checkin_us: Vec<Option<u64>>,
}

impl ShootdownSample {
    /// Reads a crash report; the reason when it lacks the numbers.
    pub fn from_report(spec: CrashSpec, report: &Value) -> Result<Self, String> {
        let crash = Report::of(report).crash.or_empty();
        let shootdown_us = crash.shootdown_us.value().ok_or("no crash.shootdown_us")?;
        let nmi_latency_us = crash
            .nmi_latency_us
            .get()
            .ok_or("no crash.nmi_latency_us")?
            .iter()
            .map(Value::as_u64)
            .collect();
        let nmi_in_guest = crash
            .nmi_in_guest
            .get()
            .map(|entries| entries.iter().map(Value::as_bool).collect())
            .unwrap_or_default();
        let checkin_us = crash
            .checkin_us
            .get()
            .map(|cpus| cpus.iter().map(Value::as_u64).collect())
            .unwrap_or_default();
        Ok(Self {
            spec,
            shootdown_us,
            nmi_latency_us,
            nmi_in_guest,
            checkin_us,
        })
    }

    /// The NMI latencies of the CPUs whose NMI came as a VM exit (`true`)
    /// or found them in the host (`false`).
    pub fn nmi_latency_where(&self, in_guest: bool) -> impl Iterator<Item = u64> + '_ {
        self.nmi_latency_us
            .iter()
            .zip(&self.nmi_in_guest)
            .filter_map(move |(latency, guest)| {
                (*guest == Some(in_guest)).then_some(*latency).flatten()
            })
    }
}

/// The samples of a benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct ShootdownResult {
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
    pub samples: Vec<ShootdownSample>,
}

impl ShootdownResult {
    /// Spread of `shootdown_us` over the runs.
    pub fn shootdown(&self) -> Option<Spread> {
        let samples: Vec<u64> = self.samples.iter().map(|s| s.shootdown_us).collect();
        Spread::of_u64(&samples)
    }

    /// Spread of every CPU's NMI latency in every run.
    pub fn nmi_latency(&self) -> Option<Spread> {
        let samples: Vec<u64> = self
            .samples
            .iter()
            .flat_map(|s| s.nmi_latency_us.iter().flatten().copied())
            .collect();
        Spread::of_u64(&samples)
    }

    /// Spread of the NMI latency of the CPUs the NMI found in guest mode
    /// (`in_guest`) or in the host, over every run.
    pub fn nmi_latency_where(&self, in_guest: bool) -> Option<Spread> {
        let samples: Vec<u64> = self
            .samples
            .iter()
            .flat_map(|s| s.nmi_latency_where(in_guest))
            .collect();
        Spread::of_u64(&samples)
    }

    /// Spread of each CPU's NMI latency over the runs (by CPU index;
    /// `None` for a CPU that coordinated every run).
    pub fn nmi_latency_per_cpu(&self) -> Vec<Option<Spread>> {
        let cpus = self
            .samples
            .iter()
            .map(|s| s.nmi_latency_us.len())
            .max()
            .unwrap_or(0);
        (0..cpus)
            .map(|cpu| {
                let samples: Vec<u64> = self
                    .samples
                    .iter()
                    .filter_map(|s| s.nmi_latency_us.get(cpu).copied().flatten())
                    .collect();
                Spread::of_u64(&samples)
            })
            .collect()
    }

    /// The closing table.
    pub fn table(&self) -> String {
        let row = |name: &str, spread: Option<Spread>| {
            let mut row = vec![name.to_owned()];
            match spread {
                Some(spread) => row.extend([
                    spread.count.to_string(),
                    stats::number(spread.min),
                    stats::number(spread.median),
                    stats::number(spread.max),
                ]),
                None => row.push("0".to_owned()),
            }
            row
        };
        let header = |first: &str| {
            [first, "samples", "min", "median", "max"]
                .map(str::to_owned)
                .to_vec()
        };
        let overall = vec![
            header("(us)"),
            row("shootdown", self.shootdown()),
            row("NMI latency, every CPU", self.nmi_latency()),
            row("  of CPUs in guest mode", self.nmi_latency_where(true)),
            row("  of CPUs in the host", self.nmi_latency_where(false)),
        ];
        let mut per_cpu = vec![header("NMI latency of CPU")];
        per_cpu.extend(
            self.nmi_latency_per_cpu()
                .into_iter()
                .enumerate()
                .map(|(cpu, spread)| row(&cpu.to_string(), spread)),
        );
        format!(
            "crash shootdown, first NMI sent to last check-in: -smp {}, {} MiB, {}, {} runs, \
             crashing CPU {}\n{}\n{}",
            self.smp,
            self.memory_mib,
            self.emulator,
            self.samples.len(),
            match self.cpu {
                Some(cpu) => cpu.to_string(),
                None => format!("random (seed {})", self.seed),
            },
            stats::table(&overall),
            stats::table(&per_cpu),
        )
    }

    /// The result as JSON (`--report`, and `build/bench-shootdown/bench.json`).
    pub fn to_json(&self) -> Value {
        let spread = |spread: Option<Spread>| {
            spread.map(
                |s| json!({"samples": s.count, "min": s.min, "median": s.median, "max": s.max}),
            )
        };
        json!({
            "smp": self.smp,
            "memory_mib": self.memory_mib,
            "emulator": self.emulator,
            "seed": self.seed,
            "cpu": self.cpu,
            "shootdown_us": spread(self.shootdown()),
            "nmi_latency_us": spread(self.nmi_latency()),
            "nmi_latency_us_in_guest": spread(self.nmi_latency_where(true)),
            "nmi_latency_us_in_host": spread(self.nmi_latency_where(false)),
            "nmi_latency_us_per_cpu": self
                .nmi_latency_per_cpu()
                .into_iter()
                .map(spread)
                .collect::<Vec<_>>(),
            "runs": self.samples.iter().map(|s| json!({
                "crash": s.spec.to_string(),
                "shootdown_us": s.shootdown_us,
                "nmi_latency_us": s.nmi_latency_us,
                "nmi_in_guest": s.nmi_in_guest,
                "checkin_us": s.checkin_us,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Runs the benchmark.
pub fn bench_shootdown(options: &ShootdownOptions) -> Result<ShootdownResult> {
    if options.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if options.smp < 2 {
        bail!("a shootdown needs at least 2 CPUs");
    }
    let root = super::fresh_qemu_bench(BENCH_DIR)?;
    let bar = progress_bar(u64::from(options.runs), options.progress);
    let mut emulator = String::new();
    let mut samples = Vec::new();
    for (index, spec) in options.specs().into_iter().enumerate() {
        let round = index + 1;
        bar.set_message(format!("run {round}: {}", spec.word()));
        let run_options = QemuOptions {
            smp: options.smp,
            memory_mib: options.memory_mib,
            boot: Boot::Direct,
            append: vec![spec.word()],
            timeout: options.timeout,
            run_name: Some(format!("{BENCH_DIR}/run-{round:03}")),
            ..QemuOptions::new(&options.elf)
        };
        let outcome = run::qemu(&run_options)?;
        emulator = super::measured_crash_run(round, &spec, &outcome)?;
        let sample = ShootdownSample::from_report(spec, &outcome.report).map_err(|error| {
            anyhow::anyhow!(
                "crash run {round}: {error} (see {})",
                outcome.run_dir.display()
            )
        })?;
        say(
            &bar,
            format!(
                "run {round}: {} shootdown {} us, {} CPUs in guest mode",
                spec.word(),
                sample.shootdown_us,
                sample
                    .nmi_in_guest
                    .iter()
                    .filter(|g| **g == Some(true))
                    .count()
            ),
        );
        samples.push(sample);
        bar.inc(1);
        let _ = fs::remove_dir_all(&outcome.run_dir);
    }
    bar.finish_and_clear();
    let result = ShootdownResult {
        smp: options.smp,
        memory_mib: options.memory_mib,
        emulator,
        seed: options.seed,
        cpu: options.cpu,
        samples,
    };
    super::save_result(&root, &result.to_json())?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::super::MAX_AFTER_MS;
    use super::*;
    use crate::crash::DEFAULT_GUEST_RUN_MS;

    fn sample(cpu: u32, shootdown_us: u64, latency: &[Option<u64>]) -> ShootdownSample {
        ShootdownSample {
            spec: CrashSpec {
                cpu,
                after_ms: 5,
                point: None,
            },
            shootdown_us,
            nmi_latency_us: latency.to_vec(),
            // Odd CPUs were running a guest.
            nmi_in_guest: latency
                .iter()
                .enumerate()
                .map(|(cpu, latency)| latency.map(|_| cpu % 2 == 1))
                .collect(),
            checkin_us: Vec::new(),
        }
    }

    #[test]
    fn specs_are_time_based_crashes_on_valid_cpus_and_replayable() {
        let mut options = ShootdownOptions::new("/t/hv");
        options.runs = 200;
        options.smp = 8;
        options.seed = 77;
        let specs = options.specs();
        assert_eq!(specs.len(), 200);
        assert!(specs.iter().all(|spec| {
            spec.point.is_none()
                && spec.cpu < 8
                && (DEFAULT_GUEST_RUN_MS + 1..=DEFAULT_GUEST_RUN_MS + MAX_AFTER_MS)
                    .contains(&spec.after_ms)
        }));
        let cpus: std::collections::HashSet<u32> = specs.iter().map(|spec| spec.cpu).collect();
        assert_eq!(cpus.len(), 8, "every CPU gets to crash");
        assert_eq!(options.specs(), specs);
        options.cpu = Some(3);
        assert!(options.specs().iter().all(|spec| spec.cpu == 3));
    }

    #[test]
    fn a_sample_reads_the_crash_report() {
        let spec = CrashSpec::parse("cpu:1,after_ms:3").unwrap();
        let report = serde_json::json!({"crash": {"shootdown_us": 2479,
            "nmi_latency_us": [1871, null, 2295], "checkin_us": [2000, null, 2470],
            "nmi_in_guest": [true, null, false]}});
        let sample = ShootdownSample::from_report(spec, &report).unwrap();
        assert_eq!(
            sample,
            ShootdownSample {
                spec,
                shootdown_us: 2479,
                nmi_latency_us: vec![Some(1871), None, Some(2295)],
                nmi_in_guest: vec![Some(true), None, Some(false)],
                checkin_us: vec![Some(2000), None, Some(2470)],
            }
        );
        assert_eq!(sample.nmi_latency_where(true).collect::<Vec<_>>(), [1871]);
        assert_eq!(sample.nmi_latency_where(false).collect::<Vec<_>>(), [2295]);
        // An older report without `nmi_in_guest` or `checkin_us`: no CPU
        // on either side, no check-in times.
        let old = serde_json::json!({"crash": {"shootdown_us": 1, "nmi_latency_us": [5, null]}});
        let old = ShootdownSample::from_report(spec, &old).unwrap();
        assert_eq!(old.nmi_latency_where(true).count(), 0);
        assert!(old.checkin_us.is_empty());
        assert_eq!(
            ShootdownSample::from_report(spec, &serde_json::json!({})).unwrap_err(),
            "no crash.shootdown_us"
        );
    }

    #[test]
    fn the_table_spreads_shootdowns_and_nmi_latencies_overall_and_per_cpu() {
        let result = ShootdownResult {
            smp: 3,
            memory_mib: 512,
            emulator: "qemu-tcg".to_owned(),
            seed: 9,
            cpu: None,
            samples: vec![
                sample(0, 900, &[None, Some(100), Some(300)]),
                sample(1, 700, &[Some(50), None, Some(200)]),
                sample(1, 800, &[Some(70), None, Some(250)]),
            ],
        };
        let overall = result.nmi_latency().unwrap();
        assert_eq!((overall.count, overall.min, overall.max), (6, 50.0, 300.0));
        let in_guest = result.nmi_latency_where(true).unwrap();
        assert_eq!(
            (in_guest.count, in_guest.min, in_guest.max),
            (1, 100.0, 100.0)
        );
        let in_host = result.nmi_latency_where(false).unwrap();
        assert_eq!((in_host.count, in_host.min, in_host.max), (5, 50.0, 300.0));
        let per_cpu = result.nmi_latency_per_cpu();
        assert_eq!(per_cpu[0].unwrap().median, 60.0);
        assert_eq!(per_cpu[1].unwrap().count, 1);
        assert_eq!(per_cpu[2].unwrap().median, 250.0);
        let text = result.table();
        assert!(
            text.starts_with(
                "crash shootdown, first NMI sent to last check-in: -smp 3, 512 MiB, qemu-tcg, \
                 3 runs, crashing CPU random (seed 9)\n"
            ),
            "{text}"
        );
        for line in [
            "  shootdown                      3  700     800  900\n",
            "  NMI latency, every CPU         6   50     150  300\n",
            "    of CPUs in guest mode        1  100     100  100\n",
            "    of CPUs in the host          5   50     200  300\n",
            "  0                         2   50      60   70\n",
            "  2                         3  200     250  300\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        let json = result.to_json();
        assert_eq!(json["shootdown_us"]["median"], 800.0);
        assert_eq!(json["nmi_latency_us_in_guest"]["samples"], 1);
        assert_eq!(json["nmi_latency_us_in_host"]["samples"], 5);
        assert_eq!(
            json["runs"][0]["nmi_in_guest"],
            serde_json::json!([null, true, false])
        );
        assert_eq!(json["nmi_latency_us_per_cpu"][1]["samples"], 1);
        assert_eq!(json["runs"][2]["crash"], "cpu:1,after_ms:5");
    }
}
