//! `cargo xtask bench bringup`: how long hv takes to bring up its APs,
//! next to how long Linux takes on the very same virtual machine.
//!
//! The runs alternate, hv then Linux, so that both see the same host load
//! over time. Both boot directly (`-kernel`) with the same QEMU arguments
//! (machine, accelerator, CPU model, `-smp`, memory, devices); only the
//! kernel and its command line differ.
//!
//! - hv reports `bringup_us`: first INIT sent to last AP checked in (TSC).
//! - Linux is Debian's own kernel (`linux-image-amd64`'s versioned package,
//!   fetched with `apt-get download` into `build/linux/`), booted without an
//!   initramfs: it prints its SMP lines long before it needs a root file
//!   system, so QEMU is killed as soon as `smp: Brought up` appears. Its
//!   time is the difference of the printk timestamps of `x86: Booting SMP
//!   configuration` (or, failing that, `smp: Bringing up secondary CPUs`)
//!   and `smp: Brought up N node(s), M CPUs`; a run with fewer than `-smp`
//!   CPUs up is an error, not a sample.
//!
//! It is a benchmark, not a test: it fails only when a run cannot be
//! measured, never because of the numbers. [`shootdown`] is the crash
//! path's benchmark, [`crash`] the way from a panic to the capture
//! kernel's entry step by step, [`tsc`] the TSC calibration on a busy
//! host.

pub mod crash;
pub mod linux_crash;
pub mod plot;
pub mod shootdown;
pub mod tsc;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::accel::{self, Accel};
use crate::crash::{CrashSpec, DEFAULT_GUEST_RUN_MS, Rng};
use crate::paths;
use crate::process::{self, Followed, KillOnDrop, SerialLog};
use crate::report::model::Report;
use crate::run::{self, Boot, Media, QemuOptions};
use crate::serial::strip_ansi;
use crate::stats::{self, Spread};
use crate::stress::{progress_bar, say};

use crate::debian::KERNEL_METAPACKAGE;

/// The command line Linux gets: the console on COM1 (the serial log),
/// printk timestamps, and a reboot (QEMU exits, `-no-reboot`) at once if it
/// ever gets as far as panicking for want of a root file system.
pub const LINUX_CMDLINE: &str = "console=ttyS0 printk.time=1 panic=-1";

/// The directory of the benchmark's runs under `build/`.
const BENCH_DIR: &str = "bench-bringup";

/// How [`follow_until`]'s timeout starts: Linux did not finish in the
/// bench's time, which the table says rather than failing.
const LINUX_TIMED_OUT: &str = "did not finish in the bench's time";

/// A bring-up benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The hv ELF.
    pub elf: PathBuf,
    /// CPUs of both machines.
    pub smp: u32,
    /// Memory of both machines, in MiB.
    pub memory_mib: u32,
    /// Runs of each kernel.
    pub runs: u32,
    /// The Linux bzImage; `None` fetches Debian's.
    pub linux: Option<PathBuf>,
    /// Extra words for Linux's command line.
    pub linux_append: Vec<String>,
    /// Time allowed for one hv run.
    pub hv_timeout: Duration,
    /// Time allowed for one Linux run to reach `smp: Brought up`.
    pub linux_timeout: Duration,
    /// Whether to show a progress bar.
    pub progress: bool,
    /// Run both kernels on a QEMU whose TCG offers x2APIC (implied above
    /// 255 CPUs; see [`crate::qemu_program`]).
    pub x2apic: bool,
    /// Both kernels' CPU model under TCG instead of `max` (e.g.
    /// `max,-svm`: hv runs no guests, whose boot run does not end at 256
    /// cores and more under TCG on 2 host cores).
    pub tcg_cpu: Option<String>,
}

impl BenchOptions {
    /// `-smp 64`, 512 MiB, 5 runs each, Debian's kernel.
    pub fn new(elf: impl Into<PathBuf>) -> Self {
        Self {
            elf: elf.into(),
            smp: 64,
            memory_mib: 512,
            runs: 5,
            linux: None,
            linux_append: Vec::new(),
            hv_timeout: Duration::from_secs(120),
            linux_timeout: Duration::from_secs(600),
            progress: true,
            x2apic: false,
            tcg_cpu: None,
        }
    }
}

/// What Linux's log says about its SMP bring-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinuxSmp {
    /// Timestamp (s) of the line that starts the bring-up.
    pub start_secs: f64,
    /// Timestamp (s) of `smp: Brought up`.
    pub end_secs: f64,
    /// The CPU count in `smp: Brought up ..., M CPUs`.
    pub cpus: u32,
}

impl LinuxSmp {
    /// The bring-up time in microseconds.
    pub fn bringup_us(&self) -> u64 {
        ((self.end_secs - self.start_secs) * 1e6).round().max(0.0) as u64
    }
}

/// The printk timestamp at the start of a line, `[    1.166908] ...`,
/// with the rest of the line.
fn timestamped(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (stamp, text) = rest.split_once(']')?;
    Some((stamp.trim().parse().ok()?, text.trim_start()))
}

/// Reads Linux's SMP bring-up from its console log.
pub fn linux_smp(log: &str) -> Result<LinuxSmp, String> {
    let mut booting = None;
    let mut bringing = None;
    for line in log.lines() {
        let line = strip_ansi(line);
        let Some((stamp, text)) = timestamped(&line) else {
            continue;
        };
        if text.starts_with("x86: Booting SMP configuration") {
            booting.get_or_insert(stamp);
        } else if text.starts_with("smp: Bringing up secondary CPUs") {
            bringing.get_or_insert(stamp);
        } else if let Some(brought) = text.strip_prefix("smp: Brought up ") {
            let start = booting.or(bringing).ok_or(
                "`smp: Brought up` without `x86: Booting SMP configuration` or \
                 `smp: Bringing up secondary CPUs` before it",
            )?;
            // "1 node, 64 CPUs" or "2 nodes, 64 CPUs".
            let cpus = brought
                .rsplit_once(',')
                .and_then(|(_, count)| {
                    count
                        .trim()
                        .strip_suffix("CPUs")
                        .or(count.trim().strip_suffix("CPU"))
                })
                .and_then(|count| count.trim().parse().ok())
                .ok_or_else(|| format!("cannot read the CPU count in `{text}`"))?;
            return Ok(LinuxSmp {
                start_secs: start,
                end_secs: stamp,
                cpus,
            });
        }
    }
    Err("no `smp: Brought up` line with a timestamp".to_owned())
}

/// The versioned kernel package that `apt-cache depends linux-image-amd64`
/// names.
pub fn versioned_kernel_package(depends: &str) -> Option<&str> {
    depends.lines().find_map(|line| {
        let package = line.trim().strip_prefix("Depends:")?.trim();
        (package.starts_with("linux-image-") && package != KERNEL_METAPACKAGE).then_some(package)
    })
}

/// Debian's current kernel (a bzImage), fetched and unpacked into
/// `build/linux/<package>/vmlinuz` the first time, reused afterwards.
pub fn debian_kernel() -> Result<PathBuf> {
    let package = crate::debian::kernel_package()?;
    let dir = paths::build_dir().join("linux").join(&package);
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() {
        return Ok(vmlinuz);
    }
    let _turn = paths::lock_dir(&dir)?;
    if vmlinuz.is_file() {
        return Ok(vmlinuz);
    }
    eprintln!("bench: fetching {package} (Linux to compare with)");
    crate::debian::apt_download(&package, &dir)?;
    let deb = fs::read_dir(&dir)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
    let unpacked = dir.join("root");
    crate::debian::dpkg_extract(&deb, &unpacked)?;
    let boot = unpacked.join("boot");
    let image = fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} holds no boot/vmlinuz-*"))?;
    fs::rename(&image, &vmlinuz)
        .with_context(|| format!("moving {} to {}", image.display(), vmlinuz.display()))?;
    // The modules and the package are hundreds of MB we do not need.
    let _ = fs::remove_dir_all(&unpacked);
    let _ = fs::remove_file(&deb);
    Ok(vmlinuz)
}

/// Samples of both kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    /// `-smp`.
    pub smp: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The emulator (`qemu-tcg` or `qemu-kvm`).
    pub emulator: String,
    /// The Linux kernel image.
    pub linux: PathBuf,
    /// The words added to Linux's command line (`--linux-append`).
    pub linux_append: Vec<String>,
    /// hv's `bringup_us`, one per run.
    pub hv_us: Vec<u64>,
    /// hv's per-AP bring-up, one per run: by CPU index, from the first
    /// INIT to that AP online ([`plot::ap_times`]).
    pub hv_ap_us: Vec<Vec<Option<u64>>>,
    /// Linux's bring-up in µs, one per run.
    pub linux_us: Vec<u64>,
    /// Why Linux has no (or fewer) samples: it did not finish its
    /// bring-up within the bench's time (then it is not run again).
    pub linux_unfinished: Option<String>,
    /// hv's per-CPU memory in bytes (its `memory_per_cpu.per_ap_bytes`,
    /// the last run's), when reported.
    pub hv_per_cpu_bytes: Option<u64>,
}

impl BenchResult {
    /// hv's median over Linux's: below 1, hv is faster.
    pub fn ratio_of_medians(&self) -> Option<f64> {
        let hv = Spread::of_u64(&self.hv_us)?;
        let linux = Spread::of_u64(&self.linux_us)?;
        (linux.median > 0.0).then(|| hv.median / linux.median)
    }

    /// The closing table.
    pub fn table(&self) -> String {
        let mut rows = vec![vec![
            "(us)".to_owned(),
            "runs".to_owned(),
            "min".to_owned(),
            "median".to_owned(),
            "max".to_owned(),
        ]];
        for (name, samples) in [("hv", &self.hv_us), ("Linux", &self.linux_us)] {
            let mut row = vec![name.to_owned(), samples.len().to_string()];
            if let Some(spread) = Spread::of_u64(samples) {
                row.extend(
                    [spread.min, spread.median, spread.max]
                        .into_iter()
                        .map(stats::number),
                );
            }
            rows.push(row);
        }
        let ratio = match self.ratio_of_medians() {
            Some(ratio) if ratio > 0.0 => format!(
                "{} ({})",
                significant(ratio),
                if ratio < 1.0 {
                    format!("Linux takes {:.0} times as long", 1.0 / ratio)
                } else {
                    format!("hv takes {ratio:.1} times as long")
                }
            ),
            Some(ratio) => significant(ratio),
            None => match &self.linux_unfinished {
                Some(why) => format!("none: Linux {why}"),
                None => "none (no samples)".to_owned(),
            },
        };
        format!(
            "bring-up, first INIT to last AP online: -smp {}, {} MiB, {}, runs alternating\n{}  \
             ratio of medians (hv / Linux): {ratio}\n",
            self.smp,
            self.memory_mib,
            self.emulator,
            stats::table(&rows)
        )
    }

    /// The result as JSON (`--report`, and `build/bench-bringup/bench.json`).
    pub fn to_json(&self) -> Value {
        let spread = |samples: &[u64]| {
            Spread::of_u64(samples).map(|s| json!({"min": s.min, "median": s.median, "max": s.max}))
        };
        json!({
            "smp": self.smp,
            "memory_mib": self.memory_mib,
            "emulator": self.emulator,
            "linux_image": self.linux,
            "linux_append": self.linux_append,
            "hv_us": self.hv_us,
            "hv_ap_us": self.hv_ap_us,
            "linux_us": self.linux_us,
            "hv": spread(&self.hv_us),
            "linux": spread(&self.linux_us),
            "ratio_of_medians": self.ratio_of_medians(),
            "linux_unfinished": self.linux_unfinished,
            "hv_per_cpu_bytes": self.hv_per_cpu_bytes,
        })
    }
}

/// One row per machine size of a `bench bringup --smp 64,128,...`: hv's
/// median bring-up, per AP, Linux's, their ratio where Linux finished, and
/// hv's per-CPU memory.
pub fn scale_table(results: &[BenchResult]) -> String {
    let mut rows = vec![vec![
        "-smp".to_owned(),
        "emulator".to_owned(),
        "hv median (us)".to_owned(),
        "hv per AP (us)".to_owned(),
        "Linux median (us)".to_owned(),
        "hv / Linux".to_owned(),
        "hv per-CPU memory".to_owned(),
    ]];
    for result in results {
        let hv = Spread::of_u64(&result.hv_us).map(|s| s.median);
        let linux = Spread::of_u64(&result.linux_us).map(|s| s.median);
        let aps = f64::from(result.smp.saturating_sub(1).max(1));
        rows.push(vec![
            result.smp.to_string(),
            result.emulator.clone(),
            hv.map_or("-".to_owned(), stats::number),
            hv.map_or("-".to_owned(), |us| stats::number(us / aps)),
            match (linux, &result.linux_unfinished) {
                (Some(us), _) => stats::number(us),
                (None, Some(_)) => "did not finish".to_owned(),
                (None, None) => "-".to_owned(),
            },
            result
                .ratio_of_medians()
                .map_or("-".to_owned(), significant),
            result
                .hv_per_cpu_bytes
                .map_or("not reported".to_owned(), |bytes| {
                    format!("{} KiB", bytes.div_ceil(1024))
                }),
        ]);
    }
    format!(
        "bring-up by machine size (medians; per AP: hv's median over the APs)\n{}",
        stats::table(&rows)
    )
}

/// A ratio with three significant digits, however small.
fn significant(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    let digits = (2 - value.abs().log10().floor() as i32).max(0) as usize;
    format!("{value:.digits$}")
}

/// Runs the benchmark: `runs` rounds of one hv boot and one Linux boot.
pub fn bench_bringup(options: &BenchOptions) -> Result<BenchResult> {
    if options.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let linux = match &options.linux {
        Some(path) => path.clone(),
        None => debian_kernel()?,
    };
    if !linux.is_file() {
        bail!("no Linux image at {}", linux.display());
    }
    crate::tools::ensure(&run::qemu_needs(Boot::Direct))?;
    let accel = accel::detect();
    let bar = progress_bar(u64::from(options.runs) * 2, options.progress);
    let mut result = BenchResult {
        smp: options.smp,
        memory_mib: options.memory_mib,
        emulator: accel.emulator_name().to_owned(),
        linux: linux.clone(),
        linux_append: options.linux_append.clone(),
        hv_us: Vec::new(),
        hv_ap_us: Vec::new(),
        linux_us: Vec::new(),
        linux_unfinished: None,
        hv_per_cpu_bytes: None,
    };
    for round in 1..=options.runs {
        bar.set_message(format!("hv, round {round}"));
        let (us, aps, per_cpu) = hv_run(options, round)?;
        say(&bar, format!("round {round}: hv {us} us"));
        result.hv_us.push(us);
        result.hv_ap_us.push(aps);
        result.hv_per_cpu_bytes = per_cpu.or(result.hv_per_cpu_bytes);
        bar.inc(1);

        if result.linux_unfinished.is_some() {
            bar.inc(1);
            continue;
        }
        bar.set_message(format!("Linux, round {round}"));
        let smp = match linux_run(options, accel, &linux, round) {
            Ok(smp) => smp,
            Err(error) if format!("{error:#}").contains(LINUX_TIMED_OUT) => {
                say(&bar, format!("round {round}: Linux {error:#}"));
                result.linux_unfinished = Some(format!("{error:#}"));
                bar.inc(1);
                continue;
            }
            Err(error) => return Err(error),
        };
        say(
            &bar,
            format!(
                "round {round}: Linux {} us ({} CPUs)",
                smp.bringup_us(),
                smp.cpus
            ),
        );
        result.linux_us.push(smp.bringup_us());
        bar.inc(1);
    }
    bar.finish_and_clear();
    save_result(&paths::run_dir(BENCH_DIR), &result.to_json())?;
    Ok(result)
}

/// One hv boot; its `bringup_us`, each AP's time (empty when hv does
/// not report `cpus.online_at_us`) and its per-CPU memory (when reported).
fn hv_run(options: &BenchOptions, round: u32) -> Result<(u64, Vec<Option<u64>>, Option<u64>)> {
    let run_options = QemuOptions {
        smp: options.smp,
        memory_mib: options.memory_mib,
        boot: Boot::Direct,
        timeout: options.hv_timeout,
        run_name: Some(format!("{BENCH_DIR}/hv-{round:03}")),
        x2apic: options.x2apic,
        tcg_cpu: options.tcg_cpu.clone(),
        ..QemuOptions::new(&options.elf)
    };
    let outcome = run::qemu(&run_options)?;
    if !outcome.ok {
        bail!(
            "hv run {round} failed, nothing to measure: {} (see {})",
            outcome.reason.as_deref().unwrap_or("?"),
            outcome.run_dir.display()
        );
    }
    let report = Report::of(&outcome.report);
    let bringup_us = report
        .bringup_us
        .value()
        .with_context(|| format!("hv run {round} reported no bringup_us"))?;
    let online_at: Vec<Option<u64>> = report
        .cpus
        .or_empty()
        .online_at_us
        .get()
        .map(|cpus| cpus.iter().map(Value::as_u64).collect())
        .unwrap_or_default();
    let per_cpu = report.memory_per_cpu.or_empty().per_ap_bytes.value();
    Ok((bringup_us, plot::ap_times(&online_at, bringup_us), per_cpu))
}

/// One Linux boot, followed until its SMP bring-up is over.
fn linux_run(options: &BenchOptions, accel: Accel, linux: &Path, round: u32) -> Result<LinuxSmp> {
    let run_dir = run::prepare_run_dir(
        &format!("{BENCH_DIR}/linux-{round:03}"),
        &["serial.log", "debugcon.log", "qemu.log"],
    )?;
    let mut cmdline = LINUX_CMDLINE.to_owned();
    for word in &options.linux_append {
        cmdline.push(' ');
        cmdline.push_str(word);
    }
    let media = Media::Kernel {
        elf: linux.to_path_buf(),
        cmdline,
    };
    let mut args = run::qemu_args(accel, options.smp, options.memory_mib, &media, &run_dir);
    args.extend(crate::qemu_program::extra_args_for(options.smp));
    if let (Accel::Tcg, Some(model)) = (accel, &options.tcg_cpu)
        && let Some(position) = args.iter().position(|arg| arg == "-cpu")
        && let Some(value) = args.get_mut(position + 1)
    {
        *value = model.into();
    }
    let program = crate::qemu_program::for_run(options.smp, options.x2apic)?;
    let mut child = process::spawn_logged(
        program.command().args(&args),
        &run_dir.join("qemu.log"),
        "qemu-system-x86_64",
    )?;
    let serial_log = run_dir.join("serial.log");
    let text = follow_until(
        &mut child,
        &serial_log,
        options.linux_timeout,
        "smp: Brought up",
    )
    .with_context(|| format!("Linux run {round} (see {})", serial_log.display()))?;
    child.kill();
    let smp = linux_smp(&text).map_err(|error| {
        anyhow::anyhow!("Linux run {round}: {error} (see {})", serial_log.display())
    })?;
    if smp.cpus != options.smp {
        bail!(
            "Linux run {round} brought up {} of {} CPUs (see {})",
            smp.cpus,
            options.smp,
            serial_log.display()
        );
    }
    Ok(smp)
}

/// Follows `serial_log` until a line contains `marker`; returns the log up
/// to that line. Fails if the emulator ends first or time runs out.
fn follow_until(
    child: &mut KillOnDrop,
    serial_log: &Path,
    timeout: Duration,
    marker: &str,
) -> Result<String> {
    let mut text = String::new();
    let followed = process::follow(
        child,
        &mut SerialLog::new(serial_log),
        timeout,
        Duration::from_millis(50),
        |look| {
            for line in look.lines {
                text.push_str(line);
                text.push('\n');
                if line.contains(marker) {
                    return Ok(Some(()));
                }
            }
            Ok(None)
        },
    )?;
    match followed {
        Followed::Found(()) => Ok(text),
        Followed::Exited(status) => bail!("QEMU ended ({status}) before `{marker}`"),
        Followed::TimedOut => bail!(
            "{LINUX_TIMED_OUT}: no `{marker}` after {} s",
            timeout.as_secs()
        ),
    }
}

/// Saves a benchmark's result as `bench.json` in its directory `root`
/// (beside `--report`, which the caller writes where asked).
pub(crate) fn save_result(root: &Path, result: &Value) -> Result<()> {
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let saved = root.join("bench.json");
    let text = serde_json::to_string_pretty(result)? + "\n";
    fs::write(&saved, text).with_context(|| format!("writing {}", saved.display()))
}

/// A benchmark's crash run must have been judged ok, else it measured
/// nothing; returns the emulator it ran on.
pub(crate) fn measured_crash_run(
    round: usize,
    spec: &crate::crash::CrashSpec,
    outcome: &run::RunOutcome,
) -> Result<String> {
    use crate::crash::CrashSpecExt;
    if !outcome.ok {
        bail!(
            "crash run {round} ({}) failed, nothing to measure: {} (see {})",
            spec.word(),
            outcome.reason.as_deref().unwrap_or("?"),
            outcome.run_dir.display()
        );
    }
    Ok(Report::of(&outcome.report)
        .emulator
        .get()
        .cloned()
        .unwrap_or_default())
}

/// What a QEMU benchmark does before its first run: QEMU must be there,
/// and its directory under `build/` starts empty (no sample of an earlier
/// benchmark is read as this one's). Returns the directory.
pub(crate) fn fresh_qemu_bench(dir: &str) -> Result<PathBuf> {
    crate::tools::ensure(&run::qemu_needs(Boot::Direct))?;
    let root = paths::run_dir(dir);
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    Ok(root)
}

/// Largest random `after_ms` past the guest run in the crash benchmarks:
/// the crash comes soon after the boot report.
pub const MAX_AFTER_MS: u64 = 20;

/// The crash runs of a crash benchmark (`bench shootdown`, `bench crash`):
/// the machine, how many runs, and the crash of each.
#[derive(Debug, Clone)]
pub struct CrashRuns {
    /// The hv ELF.
    pub elf: PathBuf,
    /// CPUs of the machine.
    pub smp: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Crash runs.
    pub runs: u32,
    /// The CPU that panics; `None` draws one per run.
    pub cpu: Option<u32>,
    /// Seed of the random CPUs and times.
    pub seed: u64,
    /// Time allowed for one run.
    pub timeout: Duration,
    /// Whether to show a progress bar.
    pub progress: bool,
}

impl CrashRuns {
    /// `-smp 64`, 512 MiB, 10 runs, a random CPU per run.
    pub fn new(elf: impl Into<PathBuf>) -> Self {
        Self {
            elf: elf.into(),
            smp: 64,
            memory_mib: 512,
            runs: 10,
            cpu: None,
            seed: 0,
            timeout: Duration::from_secs(120),
            progress: true,
        }
    }

    /// The crash of each run, in order: the same seed gives the same runs.
    pub fn specs(&self) -> Vec<CrashSpec> {
        let mut rng = Rng::new(self.seed);
        (0..self.runs)
            .map(|_| {
                let cpu = self
                    .cpu
                    .unwrap_or_else(|| rng.below(u64::from(self.smp)) as u32);
                CrashSpec {
                    cpu,
                    after_ms: DEFAULT_GUEST_RUN_MS + 1 + rng.below(MAX_AFTER_MS),
                    point: None,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's 6.1 kernel printed at -smp 64 under QEMU TCG, trimmed;
    /// the APs' calibration lines carry timestamps from another clock.
    const LINUX_LOG: &str = "\
[    1.146312] NMI watchdog: Perf NMI watchdog permanently disabled\r
[    1.160693] smp: Bringing up secondary CPUs ...\r
[    1.166908] x86: Booting SMP configuration:\r
[    1.167132] .... node  #0, CPUs:        #1\r
[    0.043451] calibrate_delay_direct() dropping max bogoMips estimate 1 = 15608488\r
[    1.262212]   #2\r
[    7.265394]  #62 #63\r
[    7.455660] smp: Brought up 1 node, 64 CPUs\r
[    7.455700] smpboot: Max logical packages: 1\r
";

    #[test]
    fn linux_bringup_runs_from_booting_smp_to_brought_up() {
        let smp = linux_smp(LINUX_LOG).unwrap();
        assert_eq!(smp.cpus, 64);
        assert_eq!(smp.start_secs, 1.166908);
        assert_eq!(smp.end_secs, 7.455660);
        assert_eq!(smp.bringup_us(), 6_288_752);
    }

    #[test]
    fn bringing_up_secondary_cpus_is_the_fallback_start() {
        let log = "[    2.000000] smp: Bringing up secondary CPUs ...\n\
                   [    2.500000] smp: Brought up 2 nodes, 8 CPUs\n";
        let smp = linux_smp(log).unwrap();
        assert_eq!((smp.bringup_us(), smp.cpus), (500_000, 8));
    }

    #[test]
    fn a_log_without_the_lines_is_an_error() {
        assert!(linux_smp("[    0.000000] Linux version 6.1.0\n").is_err());
        let no_start = linux_smp("[    7.0] smp: Brought up 1 node, 64 CPUs\n").unwrap_err();
        assert!(no_start.contains("without"), "{no_start}");
        let garbled = linux_smp(
            "[ 1.0] x86: Booting SMP configuration:\n[ 2.0] smp: Brought up 1 node, many CPUs\n",
        )
        .unwrap_err();
        assert!(garbled.contains("CPU count"), "{garbled}");
    }

    #[test]
    fn a_single_cpu_is_counted_too() {
        let log =
            "[ 1.0] smp: Bringing up secondary CPUs ...\n[ 1.0] smp: Brought up 1 node, 1 CPU\n";
        assert_eq!(linux_smp(log).unwrap().cpus, 1);
    }

    #[test]
    fn ratios_keep_three_significant_digits() {
        assert_eq!(significant(0.000714285), "0.000714");
        assert_eq!(significant(0.5), "0.500");
        assert_eq!(significant(2.345), "2.35");
        assert_eq!(significant(1234.5), "1234");
    }

    #[test]
    fn the_versioned_kernel_package_is_found() {
        let depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            versioned_kernel_package(depends),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(versioned_kernel_package("linux-image-amd64\n"), None);
    }

    #[test]
    fn the_scale_table_has_a_row_per_size() {
        let row = |smp: u32, linux_us: Vec<u64>, unfinished: Option<&str>| BenchResult {
            smp,
            memory_mib: 512,
            emulator: "qemu-tcg".to_owned(),
            linux: "/b/vmlinuz".into(),
            linux_append: Vec::new(),
            hv_us: vec![64_000],
            hv_ap_us: Vec::new(),
            linux_us,
            linux_unfinished: unfinished.map(str::to_owned),
            hv_per_cpu_bytes: Some(90_112),
        };
        let text = scale_table(&[
            row(65, vec![128_000], None),
            row(257, Vec::new(), Some("timed out")),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[2].contains("65") && lines[2].contains("0.500"),
            "{text}"
        );
        assert!(lines[2].contains("88 KiB"), "{text}");
        assert!(lines[3].contains("did not finish"), "{text}");
    }

    #[test]
    fn the_table_compares_medians() {
        let result = BenchResult {
            smp: 64,
            memory_mib: 512,
            emulator: "qemu-tcg".to_owned(),
            linux: "/b/vmlinuz".into(),
            linux_append: Vec::new(),
            hv_us: vec![5000, 4000, 6000],
            hv_ap_us: Vec::new(),
            linux_us: vec![6_000_000, 8_000_000, 7_000_000],
            linux_unfinished: None,
            hv_per_cpu_bytes: Some(100_000),
        };
        let ratio = result.ratio_of_medians().unwrap();
        assert!((ratio - 5000.0 / 7_000_000.0).abs() < 1e-12);
        let text = result.table();
        assert!(
            text.starts_with(
                "bring-up, first INIT to last AP online: -smp 64, 512 MiB, qemu-tcg, runs alternating\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  hv        3     4000     5000     6000\n"),
            "{text}"
        );
        assert!(
            text.contains("  Linux     3  6000000  7000000  8000000\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "ratio of medians (hv / Linux): 0.000714 (Linux takes 1400 times as long)"
            ),
            "{text}"
        );
        assert_eq!(result.to_json()["linux"]["median"], 7_000_000.0);
    }
}
