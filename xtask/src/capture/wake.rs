//! The wake check (`--wake`, issue 13): how many of the CPUs that checked
//! in with the crash's coordinator the capture kernel took back.
//!
//! hv's crash path leaves every CPU it collects out of VMX and parked; a
//! CPU still in VMX root operation blocks INIT. So a capture kernel that
//! wakes a CPU has proof, from the other side of the jump, that the CPU
//! left VMX. hv's capture mode wakes them itself and reports `woken` and
//! `silent` (APIC IDs); the Linux capture kernel gets `nr_cpus=` and
//! `disable_cpu_apicid=` from hv and says in its dmesg how many CPUs it
//! brought up (`smp: Brought up 1 node, N CPUs`).
//!
//! xtask sets `capture.wake_check`:
//!
//! | key | meaning |
//! |---|---|
//! | `checked_in` | CPUs that checked in with the coordinator (`crash.checked_in`) |
//! | `expected` | of them, those the capture kernel is to wake: all but an old boot CPU it must leave alone (Linux: `disable_cpu_apicid=` when it does not run on it; hv: `boot_cpu_left_alone`, no legacy BIOS) |
//! | `woken` | CPUs that checked in and came up in the capture kernel (hv: `woken` less `woken_stragglers`; Linux: CPUs brought up less its own) |
//! | `silent` | APIC IDs sent INIT-SIPI-SIPI that never came up (hv only; `null` for Linux) |
//! | `source` | `hv` (its own report) or `dmesg` (Linux's, in the serial log) |
//! | `ok` | `woken == expected`, and (hv) the old RAM below 1 MiB read the same after the wake |
//!
//! With `--wake` a run whose `ok` is false fails. Without it the check is
//! shown and kept in the report, but judges nothing, except that a wake
//! which changed old memory (hv's `low_memory_unchanged` false) always
//! fails the run: the dump would not be what the crash left.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::CaptureKernel;
use super::judge::CRASH_MARKER;
use crate::report::model::{Field, Report};
use crate::serial::strip_ansi;

/// How many CPUs Linux brought up, from its `smp: Brought up 1 node, N
/// CPUs` line after the crash (the capture kernel's, not a first kernel's).
pub fn linux_cpus_brought_up(serial: &str) -> Option<u64> {
    serial
        .lines()
        .map(strip_ansi)
        .skip_while(|line| !line.contains(CRASH_MARKER))
        .find_map(|line| {
            let rest = line.split("smp: Brought up ").nth(1)?;
            let (_, cpus) = rest.split_once(", ")?;
            cpus.split_whitespace().next()?.parse().ok()
        })
}

/// `capture.wake_check`: of the CPUs that checked in, how many the capture
/// kernel was to wake and how many it did (`xtask/REPORT.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WakeCheck {
    pub checked_in: u64,
    pub expected: u64,
    pub woken: u64,
    /// hv's `silent` APIC IDs; null for Linux, which does not say.
    pub silent: Option<Vec<u64>>,
    /// `hv` or `dmesg`.
    pub source: &'static str,
    pub ok: bool,
}

/// The numbers of a list of IDs (what is not a number left out).
fn ids(list: &Field<Vec<Value>>) -> Vec<u64> {
    list.get()
        .map(|items| items.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// The `wake_check` object for a capture run's report (`null` when the
/// run has no crash, or the capture kernel said nothing about CPUs).
pub fn check(report: &Value, kernel: CaptureKernel, serial: &str) -> Value {
    serde_json::to_value(wake_check(&Report::of(report), kernel, serial)).unwrap_or(Value::Null)
}

fn wake_check(report: &Report, kernel: CaptureKernel, serial: &str) -> Option<WakeCheck> {
    let crash = report.crash.or_empty();
    let capture = report.capture.or_empty();
    let checked_in = crash.checked_in.value()?;
    let (woken, expected, silent, source) = match kernel {
        CaptureKernel::Hv => {
            if capture.woken.get().is_none() || capture.wake.value() == Some(false) {
                return None;
            }
            let stragglers = ids(&capture.woken_stragglers);
            let woken = ids(&capture.woken)
                .iter()
                .filter(|id| !stragglers.contains(id))
                .count() as u64;
            let left_alone = ids(&capture.boot_cpu_left_alone).len() as u64;
            (
                woken,
                checked_in.saturating_sub(left_alone),
                Some(ids(&capture.silent)),
                "hv",
            )
        }
        CaptureKernel::Linux => {
            let up = linux_cpus_brought_up(serial)?;
            // The capture kernel runs on the coordinator; the old boot CPU
            // is `disable_cpu_apicid=` unless it is the coordinator.
            let boot_cpu_excluded = crash.cpu_index.value().is_some_and(|index| index != 0);
            (
                up.saturating_sub(1),
                checked_in.saturating_sub(u64::from(boot_cpu_excluded)),
                None,
                "dmesg",
            )
        }
    };
    let memory_ok = capture.low_memory_unchanged.value() != Some(false);
    Some(WakeCheck {
        checked_in,
        expected,
        woken,
        silent,
        source,
        ok: woken == expected && memory_ok,
    })
}

/// What is wrong with the wake; with `required` (`--wake`), also that the
/// capture kernel did not wake every CPU it was to.
pub fn problems(report: &Value, required: bool) -> Vec<String> {
    let report = Report::of(report);
    let capture = report.capture.or_empty();
    let mut problems = Vec::new();
    if capture.low_memory_unchanged.value() == Some(false) {
        problems.push(
            "hv's capture mode found old RAM below 1 MiB changed by its wake: the dump may \
             differ from what the crash left"
                .to_owned(),
        );
    }
    if !required || report.crash.is_missing() {
        return problems;
    }
    if capture.wake_check.is_missing() {
        problems.push(
            "--wake: the capture kernel reported no wake (hv: no `woken`, or \
             `capture_wake=0`; Linux: no `smp: Brought up` line after the crash)"
                .to_owned(),
        );
        return problems;
    }
    let check = capture.wake_check.or_empty();
    if let Some(error) = capture.wake_error.as_str() {
        problems.push(format!("--wake: hv's capture mode could not wake: {error}"));
    }
    if check.woken.raw() != check.expected.raw() {
        problems.push(format!(
            "--wake: the capture kernel woke {} of the {} CPUs that checked in, expected {}{}",
            check.woken.raw(),
            check.checked_in.raw(),
            check.expected.raw(),
            match check.silent.get() {
                Some(silent) if !silent.is_empty() => format!(
                    " (silent: APIC IDs {})",
                    silent
                        .iter()
                        .map(|id| id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => String::new(),
            }
        ));
    }
    problems
}

/// The summary's `wake` line.
pub fn summary_line(report: &Value) -> Option<String> {
    let capture = Report::of(report).capture.or_empty();
    if capture.wake_check.is_missing() {
        if capture.wake.value() == Some(false) {
            return Some("not asked (capture_wake=0)".to_owned());
        }
        return None;
    }
    let check = capture.wake_check.or_empty();
    let mut line = format!(
        "{} of {} CPUs that checked in woken by the capture kernel",
        check.woken.raw(),
        check.checked_in.raw()
    );
    if check.expected.raw() != check.checked_in.raw() {
        line.push_str(&format!(
            " ({} expected: old boot CPU left alone)",
            check.expected.raw()
        ));
    }
    if capture.old_boot_cpu.as_str() == Some("warm_reset") {
        line.push_str("; old boot CPU through the BIOS warm-reset vector");
    }
    let list = |field: &Field<Vec<Value>>| -> Option<String> {
        let items = field.get().filter(|items| !items.is_empty())?;
        Some(
            items
                .iter()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )
    };
    if let Some(silent) = list(&capture.silent) {
        line.push_str(&format!("; silent: APIC {silent}"));
    }
    if let Some(stragglers) = list(&capture.silent_stragglers) {
        line.push_str(&format!(" (stragglers: {stragglers})"));
    }
    if let Some(stragglers) = list(&capture.woken_stragglers) {
        line.push_str(&format!("; stragglers woken: APIC {stragglers}"));
    }
    if let Some(alone) = list(&capture.stragglers_left_alone) {
        line.push_str(&format!("; stragglers left alone: APIC {alone}"));
    }
    if let Some(mb) = capture.stream_mb_per_s.value() {
        line.push_str(&format!(
            "; dump streamed at {mb:.1} MB/s by {} CPUs",
            capture.workers.raw()
        ));
    }
    let linux = capture.linux.or_empty();
    if let (Some(one), Some(all)) = (linux.copy_ms.value(), linux.parallel_copy_ms.value()) {
        line.push_str(&format!(
            "; /proc/vmcore copied in {one} ms by 1 CPU, {all} ms by {}{}",
            linux.parallel_readers.raw(),
            match capture.parallel_copy_identical.value() {
                Some(true) => " (identical)",
                Some(false) => " (DIFFERENT)",
                None => "",
            }
        ));
    }
    Some(line)
}

/// The Linux capture kernel's second copy, made by one reader per CPU,
/// against the dump (the copy one CPU made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelCopy {
    /// Bytes compared: the dump's length.
    pub compared: u64,
    /// The first offset where they differ.
    pub first_difference: Option<u64>,
}

/// Compares the dump at `dump` with the first bytes of `image`.
pub fn compare_copies(dump: &Path, image: &Path) -> Result<ParallelCopy> {
    let open =
        |path: &Path| File::open(path).with_context(|| format!("opening {}", path.display()));
    let (mut a, mut b) = (open(dump)?, open(image)?);
    let len = a.metadata()?.len();
    let mut left = vec![0u8; 1 << 20];
    let mut right = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = usize::try_from((len - at).min(left.len() as u64))?;
        a.read_exact(&mut left[..n])
            .with_context(|| format!("reading {}", dump.display()))?;
        b.read_exact(&mut right[..n])
            .with_context(|| format!("reading {} (shorter than the dump)", image.display()))?;
        if let Some(i) = left[..n].iter().zip(&right[..n]).position(|(x, y)| x != y) {
            return Ok(ParallelCopy {
                compared: len,
                first_difference: Some(at + i as u64),
            });
        }
        at += n as u64;
    }
    Ok(ParallelCopy {
        compared: len,
        first_difference: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::fs;

    #[test]
    fn linux_brought_up_lines_are_read_after_the_crash_only() {
        let serial = "[    0.3] smp: Brought up 1 node, 8 CPUs\n*** hv: CRASH on CPU 0\n\
                      [    1.2] smp: Bringing up secondary CPUs ...\n\
                      \x1b[0m[    2.9] smp: Brought up 1 node, 7 CPUs\n";
        assert_eq!(linux_cpus_brought_up(serial), Some(7));
        assert_eq!(
            linux_cpus_brought_up("*** hv: CRASH\n[ 1.0] smp: Brought up 1 node, 1 CPU\n"),
            Some(1)
        );
        assert_eq!(
            linux_cpus_brought_up("[ 0.3] smp: Brought up 1 node, 8 CPUs\n"),
            None
        );
    }

    fn hv_report(woken: &[u64], silent: &[u64], stragglers: &[u64]) -> Value {
        json!({
            "crash": {"cpu_index": 1, "checked_in": 7},
            "capture": {"wake": true, "woken": woken, "silent": silent,
                        "woken_stragglers": stragglers, "silent_stragglers": [],
                        "boot_cpu_left_alone": [], "low_memory_unchanged": true,
                        "old_boot_cpu": "warm_reset"},
        })
    }

    #[test]
    fn hv_counts_woken_cpus_that_checked_in() {
        let mut report = hv_report(&[0, 2, 3, 4, 5, 6, 7], &[], &[]);
        let check = super::check(&report, CaptureKernel::Hv, "");
        assert_eq!(check["woken"], 7);
        assert_eq!(check["expected"], 7);
        assert_eq!(check["ok"], true);
        report["capture"]["wake_check"] = check;
        assert!(problems(&report, true).is_empty());
        let line = summary_line(&report).unwrap();
        assert!(
            line.starts_with(
                "7 of 7 CPUs that checked in woken by the capture kernel; old boot CPU"
            ),
            "{line}"
        );

        // A straggler woken (QEMU: no VMX to block INIT) does not count.
        let mut report = hv_report(&[0, 2, 3, 4, 6, 7, 5], &[], &[5]);
        report["crash"]["checked_in"] = json!(6);
        let check = super::check(&report, CaptureKernel::Hv, "");
        assert_eq!(
            (check["woken"].as_u64(), check["ok"].as_bool()),
            (Some(6), Some(true))
        );

        // A silent CPU that checked in fails `--wake`, and only then.
        let mut report = hv_report(&[0, 2, 3, 4, 6, 7], &[5], &[]);
        report["capture"]["wake_check"] = check_of(&report);
        assert_eq!(report["capture"]["wake_check"]["ok"], false);
        assert!(problems(&report, false).is_empty());
        let problems = super::problems(&report, true);
        assert_eq!(
            problems,
            [
                "--wake: the capture kernel woke 6 of the 7 CPUs that checked in, expected 7 \
              (silent: APIC IDs 5)"
            ]
        );
        assert!(summary_line(&report).unwrap().contains("; silent: APIC 5"));
    }

    fn check_of(report: &Value) -> Value {
        check(report, CaptureKernel::Hv, "")
    }

    #[test]
    fn a_wake_not_asked_for_is_no_check() {
        let mut report = hv_report(&[], &[], &[]);
        report["capture"]["wake"] = json!(false);
        assert!(check_of(&report).is_null());
        assert_eq!(
            summary_line(&report).as_deref(),
            Some("not asked (capture_wake=0)")
        );
        assert!(problems(&report, true)[0].contains("capture_wake=0"));
    }

    #[test]
    fn a_boot_cpu_left_alone_is_not_expected_and_changed_memory_always_fails() {
        let mut report = hv_report(&[2, 3, 4, 5, 6, 7], &[], &[]);
        report["capture"]["boot_cpu_left_alone"] = json!([0]);
        report["capture"]["old_boot_cpu"] = json!("left_alone");
        let check = check_of(&report);
        assert_eq!(
            (check["expected"].as_u64(), check["ok"].as_bool()),
            (Some(6), Some(true))
        );
        report["capture"]["low_memory_unchanged"] = json!(false);
        report["capture"]["wake_check"] = check_of(&report);
        assert_eq!(report["capture"]["wake_check"]["ok"], false);
        assert_eq!(problems(&report, false).len(), 1);
    }

    #[test]
    fn linux_expects_the_old_boot_cpu_only_when_it_runs_there() {
        let serial = "*** hv: CRASH\n[ 3.1] smp: Brought up 1 node, 8 CPUs\n";
        let on_boot_cpu = json!({"crash": {"cpu_index": 0, "checked_in": 7}, "capture": {}});
        let check = super::check(&on_boot_cpu, CaptureKernel::Linux, serial);
        assert_eq!(
            (
                check["woken"].as_u64(),
                check["expected"].as_u64(),
                check["ok"].as_bool()
            ),
            (Some(7), Some(7), Some(true))
        );
        assert_eq!(check["source"], "dmesg");
        let on_an_ap = json!({"crash": {"cpu_index": 1, "checked_in": 7}, "capture": {}});
        let serial = "*** hv: CRASH\n[ 3.1] smp: Brought up 1 node, 7 CPUs\n";
        let check = super::check(&on_an_ap, CaptureKernel::Linux, serial);
        assert_eq!(
            (check["expected"].as_u64(), check["ok"].as_bool()),
            (Some(6), Some(true))
        );
        // nr_cpus=1: nothing woken.
        let serial = "*** hv: CRASH\n[ 3.1] smp: Brought up 1 node, 1 CPU\n";
        let check = super::check(&on_an_ap, CaptureKernel::Linux, serial);
        assert_eq!(check["ok"], false);
        // No dmesg line: no check, and --wake says so.
        let mut report = on_an_ap.clone();
        report["capture"]["wake_check"] = super::check(&report, CaptureKernel::Linux, "");
        assert!(report["capture"]["wake_check"].is_null());
        assert!(problems(&report, true)[0].contains("reported no wake"));
    }

    #[test]
    fn copies_compare_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("xtask-wake-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let dump: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        fs::write(dir.join("a"), &dump).unwrap();
        let mut image = dump.clone();
        image.extend_from_slice(&[9; 4096]);
        fs::write(dir.join("b"), &image).unwrap();
        let same = compare_copies(&dir.join("a"), &dir.join("b")).unwrap();
        assert_eq!(same.first_difference, None);
        assert_eq!(same.compared, 3 << 20);
        image[(2 << 20) + 5] ^= 1;
        fs::write(dir.join("b"), &image).unwrap();
        let different = compare_copies(&dir.join("a"), &dir.join("b")).unwrap();
        assert_eq!(different.first_difference, Some((2 << 20) + 5));
        fs::write(dir.join("b"), &image[..100]).unwrap();
        assert!(compare_copies(&dir.join("a"), &dir.join("b")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
