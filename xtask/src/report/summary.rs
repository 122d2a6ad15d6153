//! The few lines a person reads after a run.
//!
//! One block, one line per stage of the run, each only when the run got
//! there: the boot path and loader, the CPUs and their bring-up, the
//! backend (VMX or SVM) and the guests (or why there are none), the crash,
//! the shootdown and the VMCSes (VMCBs on SVM), the capture and the dump,
//! notes, the verdict, and then the commands that open the dump. For
//! example (a default `qemu-smp` run; QEMU TCG's `-cpu max` has SVM):
//!
//! ```text
//! hv on qemu-tcg
//!   boot      direct, pvh from PVH (QEMU -kernel); 437.6 MiB usable in 12 regions
//!   cpus      4 of 4 online, none failed; bring-up 929 us (xapic)
//!   svm       svm: 8 vCPUs on 4 CPUs, 1756 VM exits, 42 migrations, 0 stopped
//!   crash     CPU 1 (APIC ID 1) coordinated: panic: injected crash on CPU 1 (after_ms elapsed)
//!   shootdown 3 of 3 CPUs checked in in 1394 us, stragglers: none
//!   VMCB      8 loaded, 8 cleared, 0 on stragglers; SVM off on 3 CPUs, coordinator off; NMI in guest mode on 2 CPUs
//!   capture   hv capture mode: digests ok, entered 56.0 ms after the crash (tsc)
//!   dump      build/qemu-direct-smp4-capture-hv/vmcore: 447.5 MiB, 4 CPU notes
//!   verdict   ok
//!   inspect   cargo xtask dump build/qemu-direct-smp4-capture-hv/vmcore --elf target/...
//!   gdb       gdb target/x86_64-unknown-none/release/hv build/qemu-direct-smp4-capture-hv/vmcore
//!   serial    build/qemu-direct-smp4-capture-hv/serial.log
//! ```

use std::fmt::Write;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::model::{Capture, Crash, Field, Report};

/// [`summary_in`] with every path as the report has it (absolute).
pub fn summary(report: &Value) -> String {
    summary_in(report, None)
}

/// A short human summary of a finished run report; paths inside `cwd`
/// are shown relative to it, so the commands it prints can be pasted
/// there.
pub fn summary_in(report: &Value, cwd: Option<&Path>) -> String {
    let json = report;
    let report = Report::of(json);
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "  {label:<10}{text}");
    };
    let path = |field: &Field<String>| field.as_str().map(|p| shown(p, cwd));
    let virt = report.virt.or_empty();
    let crash = report.crash.get();
    let capture = report.capture.or_empty();
    let xtask = report.xtask.or_empty();

    line("boot", boot(&report));
    line("cpus", cpus(&report));
    let svm = virt.backend.as_str() == Some("svm")
        || crash.is_some_and(|crash| crash.backend.as_str() == Some("svm"));
    if let Some(text) = vmx(&report) {
        line(if svm { "svm" } else { "vmx" }, text);
    }
    if let Some(crash) = crash {
        line(
            "crash",
            format!(
                "CPU {} (APIC ID {}) coordinated: {}",
                text(&crash.cpu_index),
                text(&crash.cpu),
                text(&crash.reason)
            ),
        );
        line("shootdown", shootdown(crash));
        if crash.backend.as_str() == Some("svm") {
            line("VMCB", vmcb(crash));
        } else {
            line("VMCS", vmcs(crash));
        }
    } else if report.crash_injection.or_empty().fired.value() == Some(false) {
        line(
            "crash",
            "asked for, but its point was never reached".to_owned(),
        );
    }
    if report.capture.get().is_some() {
        line("capture", capture_line(&report, &capture));
        if let Some(text) = crate::capture::wake::summary_line(json) {
            line("wake", text);
        }
        let dump = path(&capture.dump_path);
        match (&dump, capture.dump_error.as_str()) {
            (Some(dump), _) => line(
                "dump",
                format!(
                    "{dump}: {}, {} CPU notes",
                    mib(&capture.dump_bytes),
                    text(&capture.cpu_notes)
                ),
            ),
            (None, Some(error)) if crash.is_some() => line("dump", format!("none: {error}")),
            _ => {}
        }
    } else if crash.is_some() {
        line(
            "capture",
            "none: a plain crash, ended by hv's crash path".to_owned(),
        );
    }
    for note in xtask.notes.get().into_iter().flatten() {
        line("note", show(note));
    }
    if let Some(errors) = report
        .cmdline
        .or_empty()
        .errors
        .get()
        .filter(|e| !e.is_empty())
    {
        let list: Vec<String> = errors.iter().map(show).collect();
        line(
            "cmdline",
            format!("{} errors: {}", errors.len(), list.join("; ")),
        );
    }
    if let Some(malformed) = xtask.malformed_lines.get().filter(|m| !m.is_empty()) {
        line(
            "garbled",
            format!("{} report line(s) did not parse", malformed.len()),
        );
    }
    line(
        "verdict",
        if report.ok.value() == Some(true) {
            "ok".to_owned()
        } else {
            format!("FAILED: {}", text(&report.reason))
        },
    );
    if let Some(dump) = path(&capture.dump_path) {
        let elf = path(&xtask.elf);
        let dump = shell_word(&dump);
        match elf.as_deref().map(shell_word) {
            Some(elf) => {
                line("inspect", format!("cargo xtask dump {dump} --elf {elf}"));
                line("gdb", format!("gdb {elf} {dump}"));
            }
            None => line("inspect", format!("cargo xtask dump {dump}")),
        }
    }
    if let Some(serial) = path(&report.serial_log) {
        line("serial", serial);
    }
    format!("hv on {}\n{out}", text(&report.emulator))
}

/// Boot path, loader and memory.
fn boot(report: &Report) -> String {
    let mut text = self::text(&report.boot);
    if !report.loader.is_missing() {
        let loader = report.loader.or_empty();
        let name = loader
            .name
            .as_str()
            .map(|name| format!(" from {name}"))
            .unwrap_or_default();
        let _ = write!(text, ", {}{name}", self::text(&loader.protocol));
    }
    let memory = report.memory.or_empty();
    if let Some(bytes) = memory.usable_bytes.value() {
        let _ = write!(
            text,
            "; {:.1} MiB usable in {} regions",
            bytes as f64 / (1024.0 * 1024.0),
            self::text(&memory.regions)
        );
    }
    text
}

/// CPUs online of those possible, failed ones, bring-up time.
fn cpus(report: &Report) -> String {
    if report.cpus.is_missing() && report.crash.get().is_some() {
        return "not reported: hv crashed before its boot report".to_owned();
    }
    let cpus = report.cpus.or_empty();
    let failed = match cpus.failed.get() {
        Some(list) if list.is_empty() => "none failed".to_owned(),
        Some(list) => format!(
            "failed: APIC ID {}",
            list.iter().map(show).collect::<Vec<_>>().join(", ")
        ),
        None => "failed: ?".to_owned(),
    };
    let mut line = format!(
        "{} of {} online, {failed}",
        text(&cpus.online),
        text(&cpus.possible)
    );
    if let Some(us) = report.bringup_us.value() {
        let mode = report
            .smp
            .or_empty()
            .apic_mode
            .as_str()
            .map(|mode| format!(" ({mode})"))
            .unwrap_or_default();
        let _ = write!(line, "; bring-up {us} us{mode}");
    }
    line
}

/// The backend and the guests, or why there are none.
fn vmx(report: &Report) -> Option<String> {
    let virt = report.virt.or_empty();
    Some(match virt.backend.as_str()? {
        "none" => format!(
            "none: {}{}",
            text(&virt.reason),
            if report.emulator.as_str() == Some("qemu-tcg") {
                " (QEMU TCG: its `-cpu max` emulates SVM; this CPU model has neither)"
            } else {
                ""
            }
        ),
        backend => format!(
            "{backend}: {} vCPUs on {} CPUs, {} VM exits, {} migrations, {} stopped",
            text(&virt.vcpus),
            text(if backend == "svm" {
                &virt.cpus_in_svm
            } else {
                &virt.cpus_in_vmx
            }),
            text(&virt.vm_exits),
            text(&virt.migrations),
            text(&virt.stopped)
        ),
    })
}

/// Who checked in, how fast, who did not.
fn shootdown(crash: &Crash) -> String {
    let stragglers = match crash.stragglers.get() {
        Some(list) if list.is_empty() => "none".to_owned(),
        Some(list) => format!(
            "APIC ID {}",
            list.iter().map(show).collect::<Vec<_>>().join(", ")
        ),
        None => "?".to_owned(),
    };
    format!(
        "{} of {} CPUs checked in in {} us{}, stragglers: {stragglers}",
        text(&crash.checked_in),
        text(&crash.expected),
        text(&crash.shootdown_us),
        if crash.timed_out.value() == Some(true) {
            " (timed out)"
        } else {
            ""
        }
    )
}

/// The VMCSes loaded and cleared, and who left VMX: where hv says how
/// many CPUs had VMX on (`vmx_was_on_cpus`) and how many executed VMXOFF
/// (`vmxoff_executed`), those; "no VMX" when none had it on. Older reports
/// only have `vmxoff_cpus`, which counts CPUs out of VMX however they got
/// there.
fn vmcs(crash: &Crash) -> String {
    let counts = format!(
        "{} loaded, {} cleared, {} on stragglers",
        text(&crash.vmcs_loaded),
        text(&crash.vmcs_cleared),
        text(&crash.vmcs_on_stragglers),
    );
    let coordinator_off = crash.coordinator_vmx_off.value();
    match (crash.vmxoff_executed.value(), crash.vmx_was_on_cpus.value()) {
        (Some(0), Some(0)) => format!(
            "{counts}; no VMX ran{}",
            match coordinator_off {
                Some(false) => ", yet the coordinator is STILL IN VMX",
                _ => "",
            }
        ),
        (Some(executed), Some(was_on)) => format!(
            "{counts}; VMXOFF executed on {executed} of {was_on} CPUs with VMX on, coordinator {}",
            match (crash.coordinator_vmx_exit.as_str(), coordinator_off) {
                (_, Some(false)) => "STILL IN VMX",
                (Some("vmxoff" | "vmxoff_after_ud"), _) => "left VMX",
                (Some("was_off"), _) => "had no VMX on",
                (_, Some(true)) => "off",
                _ => "?",
            }
        ),
        _ => format!(
            "{counts}; VMXOFF on {} CPUs, coordinator {}",
            text(&crash.vmxoff_cpus),
            match coordinator_off {
                Some(true) => "off",
                Some(false) => "STILL IN VMX",
                None => "?",
            }
        ),
    }
}

/// On SVM: the VMCBs loaded and cleared, who left SVM (EFER.SVME read
/// back clear), and whom the NMI found in guest mode.
fn vmcb(crash: &Crash) -> String {
    format!(
        "{} loaded, {} cleared, {} on stragglers; SVM off on {} CPUs, coordinator {}; \
         NMI in guest mode on {} CPUs",
        text(&crash.vmcb_loaded),
        text(&crash.vmcb_cleared),
        text(&crash.vmcb_on_stragglers),
        text(&crash.svm_off_cpus),
        match crash.coordinator_svm_off.value() {
            Some(true) => "off",
            Some(false) => "STILL IN SVM",
            None => "?",
        },
        text(&crash.nmi_in_guest_cpus),
    )
}

/// The capture kernel: loaded, digests, entered, how soon after the crash.
fn capture_line(report: &Report, capture: &Capture) -> String {
    let kernel = match capture.kernel.as_str() {
        Some("hv") => "hv capture mode".to_owned(),
        Some("linux") => "Linux".to_owned(),
        other => other.unwrap_or("?").to_owned(),
    };
    if capture.loaded.value() == Some(false) {
        return format!(
            "{kernel}: not loaded at boot: {}",
            capture.error.as_str().unwrap_or("no reason given")
        );
    }
    if report.crash.get().is_none() {
        return format!("{kernel}: loaded at boot; no crash to capture");
    }
    let checked = match capture.digest_ok.value() {
        Some(true) => "digests ok",
        Some(false) => {
            return format!(
                "{kernel}: digests MISMATCH, jump refused ({})",
                capture.refused.as_str().unwrap_or("no reason given")
            );
        }
        None if capture.hv_check.as_str() == Some("skipped") => "hv's check skipped",
        None => return format!("{kernel}: no digest check reported at the crash"),
    };
    if let Some(reason) = capture.purgatory_refused.as_str() {
        return format!("{kernel}: {checked}, the purgatory REFUSED it ({reason})");
    }
    let mut line = format!("{kernel}: {checked}, ");
    if capture.entered.value() == Some(true) {
        line.push_str("entered");
        if capture.attempt.value() == Some(2) {
            line.push_str(" (by the second hand-over: the first crashed)");
        }
        if let Some(us) = capture.crash_to_capture_us.value() {
            let _ = write!(
                line,
                " {:.1} ms after the crash ({})",
                us as f64 / 1000.0,
                text(&capture.crash_to_capture_source)
            );
        }
    } else {
        line.push_str("NOT entered");
    }
    if let Some(ms) = capture.linux.or_empty().copy_ms.value() {
        let _ = write!(line, "; /proc/vmcore copied in {ms} ms");
    }
    line
}

/// A byte count as MiB.
fn mib(bytes: &Field<u64>) -> String {
    match bytes.value() {
        Some(bytes) => format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0)),
        None => "? bytes".to_owned(),
    }
}

/// `path` relative to `cwd` when it lies inside it.
fn shown(path: &str, cwd: Option<&Path>) -> String {
    cwd.and_then(|cwd| Path::new(path).strip_prefix(cwd).ok())
        .filter(|rest| !rest.as_os_str().is_empty())
        .map(|rest| rest.display().to_string())
        .unwrap_or_else(|| path.to_owned())
}

/// `word` as one shell word: as it is when it holds only safe characters,
/// else in single quotes.
fn shell_word(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+,:=@%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A field as plain text: strings without quotes, absence as `?`.
fn text<T: Serialize>(field: &Field<T>) -> String {
    show(&field.raw())
}

/// A JSON value as plain text: strings without quotes, absence as `?`.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "?".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A default `qemu-smp` run's report, as xtask leaves it.
    fn whole_path() -> Value {
        json!({
            "emulator": "qemu-tcg", "boot": "direct",
            "loader": {"protocol": "pvh", "name": "PVH (QEMU -kernel)"},
            "memory": {"regions": 12, "usable_bytes": 460_017_664u64},
            "cpus": {"possible": 4, "online": 4, "failed": []},
            "bringup_us": 4974, "smp": {"apic_mode": "xapic"},
            "virt": {"backend": "svm", "reason": null, "cpus_in_vmx": 0, "cpus_in_svm": 4,
                     "vcpus": 8, "vm_exits": 1756, "migrations": 42, "stopped": 0},
            "crash": {"cpu": 1, "cpu_index": 1,
                      "reason": "panic: injected crash on CPU 1 (after_ms elapsed)",
                      "expected": 3, "checked_in": 3, "stragglers": [], "backend": "svm",
                      "vmcs_loaded": 0, "vmcs_cleared": 0, "vmcs_on_stragglers": 0,
                      "vmcb_loaded": 8, "vmcb_cleared": 8, "vmcb_on_stragglers": 0,
                      "vmxoff_cpus": 3, "coordinator_vmx_off": true, "svm_off_cpus": 3,
                      "coordinator_svm_off": true, "nmi_in_guest_cpus": 2,
                      "shootdown_us": 5827, "timed_out": false},
            "capture": {"kernel": "hv", "loaded": true, "digest_ok": true, "jumped": true,
                        "entered": true, "crash_to_capture_us": 55980,
                        "crash_to_capture_source": "tsc",
                        "dump_path": "/w/build/run/vmcore", "dump_bytes": 469_236_736u64,
                        "cpu_notes": 4, "dump_error": null},
            "ok": true, "reason": null,
            "serial_log": "/w/build/run/serial.log",
            "xtask": {"elf": "/w/target/x86_64-unknown-none/release/hv", "notes": []},
        })
    }

    #[test]
    fn the_whole_path_reads_at_a_glance() {
        let text = summary_in(&whole_path(), Some(Path::new("/w")));
        assert_eq!(
            text,
            "hv on qemu-tcg
  boot      direct, pvh from PVH (QEMU -kernel); 438.7 MiB usable in 12 regions
  cpus      4 of 4 online, none failed; bring-up 4974 us (xapic)
  svm       svm: 8 vCPUs on 4 CPUs, 1756 VM exits, 42 migrations, 0 stopped
  crash     CPU 1 (APIC ID 1) coordinated: panic: injected crash on CPU 1 (after_ms elapsed)
  shootdown 3 of 3 CPUs checked in in 5827 us, stragglers: none
  VMCB      8 loaded, 8 cleared, 0 on stragglers; SVM off on 3 CPUs, coordinator off; NMI in guest mode on 2 CPUs
  capture   hv capture mode: digests ok, entered 56.0 ms after the crash (tsc)
  dump      build/run/vmcore: 447.5 MiB, 4 CPU notes
  verdict   ok
  inspect   cargo xtask dump build/run/vmcore --elf target/x86_64-unknown-none/release/hv
  gdb       gdb target/x86_64-unknown-none/release/hv build/run/vmcore
  serial    build/run/serial.log
"
        );
        // Outside the workspace the paths stay whole.
        let text = summary(&whole_path());
        assert!(
            text.contains(
                "  gdb       gdb /w/target/x86_64-unknown-none/release/hv /w/build/run/vmcore\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_vmcs_line_says_no_vmx_where_none_ran_and_counts_real_vmxoffs() {
        let vmcs_line = |crash: Value| {
            let mut report = whole_path();
            report["crash"] = crash;
            summary(&report)
                .lines()
                .find(|line| line.starts_with("  VMCS"))
                .unwrap()
                .to_owned()
        };
        let base = json!({"cpu": 1, "cpu_index": 1, "reason": "x", "expected": 3,
            "checked_in": 3, "stragglers": [], "vmcs_loaded": 0, "vmcs_cleared": 0,
            "vmcs_on_stragglers": 0, "vmxoff_cpus": 3, "coordinator_vmx_off": true,
            "shootdown_us": 5827, "timed_out": false});
        let mut tcg = base.clone();
        tcg["vmxoff_executed"] = json!(0);
        tcg["vmx_was_on_cpus"] = json!(0);
        tcg["coordinator_vmx_exit"] = json!("was_off");
        assert_eq!(
            vmcs_line(tcg),
            "  VMCS      0 loaded, 0 cleared, 0 on stragglers; no VMX ran"
        );
        let mut bochs = base.clone();
        bochs["vmcs_loaded"] = json!(16);
        bochs["vmcs_cleared"] = json!(16);
        bochs["vmxoff_executed"] = json!(8);
        bochs["vmx_was_on_cpus"] = json!(8);
        bochs["coordinator_vmx_exit"] = json!("vmxoff");
        assert_eq!(
            vmcs_line(bochs.clone()),
            "  VMCS      16 loaded, 16 cleared, 0 on stragglers; VMXOFF executed on 8 of 8 CPUs \
             with VMX on, coordinator left VMX"
        );
        bochs["coordinator_vmx_off"] = json!(false);
        bochs["coordinator_vmx_exit"] = json!("still_on");
        assert!(vmcs_line(bochs).ends_with("coordinator STILL IN VMX"));
        // An older report keeps its old words.
        assert_eq!(
            vmcs_line(base),
            "  VMCS      0 loaded, 0 cleared, 0 on stragglers; VMXOFF on 3 CPUs, coordinator off"
        );
    }

    #[test]
    fn on_svm_no_word_of_vmcs_or_vmxoff_and_without_a_backend_the_reason() {
        let text = summary(&whole_path());
        for vmx_word in ["VMCS", "VMXOFF", "vmx "] {
            assert!(!text.contains(vmx_word), "{vmx_word}: {text}");
        }
        let mut none = whole_path();
        none["virt"] = json!({"backend": "none", "reason": "the CPU has neither VMX nor SVM"});
        none["crash"] = json!({"cpu": 1, "cpu_index": 1, "reason": "x", "expected": 3,
            "checked_in": 3, "stragglers": [], "backend": "none", "vmcs_loaded": 0,
            "vmcs_cleared": 0, "vmcs_on_stragglers": 0, "vmxoff_cpus": 3,
            "coordinator_vmx_off": true, "shootdown_us": 5827, "timed_out": false});
        let text = summary(&none);
        assert!(
            text.contains(
                "  vmx       none: the CPU has neither VMX nor SVM (QEMU TCG: its `-cpu max` \
                 emulates SVM; this CPU model has neither)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  VMCS      0 loaded, 0 cleared, 0 on stragglers; VMXOFF on 3 CPUs"),
            "{text}"
        );
    }

    #[test]
    fn a_boot_only_run_has_no_crash_or_capture_lines() {
        let mut report = whole_path();
        let map = report.as_object_mut().unwrap();
        map.remove("crash");
        map.remove("capture");
        let text = summary(&report);
        for absent in [
            "crash",
            "shootdown",
            "VMCS",
            "capture",
            "dump",
            "inspect",
            "gdb",
        ] {
            assert!(!text.contains(&format!("  {absent} ")), "{absent}: {text}");
        }
        assert!(text.contains("  verdict   ok\n"), "{text}");
    }

    #[test]
    fn guests_stragglers_and_failures_are_named() {
        let report = json!({
            "emulator": "bochs", "boot": "grub-bios",
            "cpus": {"possible": 8, "online": 7, "failed": [5]},
            "virt": {"backend": "vmx", "vcpus": 16, "cpus_in_vmx": 8, "vm_exits": 27904,
                     "migrations": 353, "stopped": 0},
            "crash": {"cpu": 0, "cpu_index": 0, "reason": "panic: injected crash on CPU 0 (x)",
                      "expected": 7, "checked_in": 6, "stragglers": [5], "vmcs_loaded": 16,
                      "vmcs_cleared": 14, "vmcs_on_stragglers": 2, "vmxoff_cpus": 6,
                      "coordinator_vmx_off": false, "shootdown_us": 1000073, "timed_out": true},
            "cmdline": {"errors": ["unknown option `bogus_option`"]},
            "xtask": {"malformed_lines": [{"line": 3}], "notes": ["a fallback"]},
            "ok": false, "reason": "cpus.online is 7, expected 8",
        });
        let text = summary(&report);
        for expected in [
            "hv on bochs\n",
            "  boot      grub-bios\n",
            "  cpus      7 of 8 online, failed: APIC ID 5\n",
            "  vmx       vmx: 16 vCPUs on 8 CPUs, 27904 VM exits, 353 migrations, 0 stopped\n",
            "  shootdown 6 of 7 CPUs checked in in 1000073 us (timed out), stragglers: APIC ID 5\n",
            "  VMCS      16 loaded, 14 cleared, 2 on stragglers; VMXOFF on 6 CPUs, coordinator STILL IN VMX\n",
            "  capture   none: a plain crash, ended by hv's crash path\n",
            "  note      a fallback\n",
            "  cmdline   1 errors: unknown option `bogus_option`\n",
            "  garbled   1 report line(s) did not parse\n",
            "  verdict   FAILED: cpus.online is 7, expected 8\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(!text.contains("serial"), "{text}");
    }

    #[test]
    fn a_crash_before_the_boot_report_says_so() {
        let report = json!({"crash": {"cpu_index": 2}, "ok": true});
        let text = summary(&report);
        assert!(
            text.contains("  cpus      not reported: hv crashed before its boot report\n"),
            "{text}"
        );
        let text = summary(&json!({"crash_injection": {"fired": false}, "ok": false}));
        assert!(
            text.contains("  crash     asked for, but its point was never reached\n"),
            "{text}"
        );
    }

    #[test]
    fn capture_failures_say_what_went_wrong() {
        let capture_line_with = |capture: Value| {
            let mut report = whole_path();
            report["capture"] = capture;
            summary(&report)
                .lines()
                .find(|line| line.starts_with("  capture"))
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            capture_line_with(json!({"kernel": "hv", "loaded": false,
                                     "error": "capture ELF rejected"})),
            "  capture   hv capture mode: not loaded at boot: capture ELF rejected"
        );
        assert_eq!(
            capture_line_with(json!({"kernel": "hv", "loaded": true, "digest_ok": false,
                                     "refused": "segment 2 digest mismatch"})),
            "  capture   hv capture mode: digests MISMATCH, jump refused (segment 2 digest mismatch)"
        );
        assert_eq!(
            capture_line_with(json!({"kernel": "linux", "loaded": true, "digest_ok": true,
                                     "entered": true, "crash_to_capture_us": 3_418_321,
                                     "crash_to_capture_source": "serial",
                                     "linux": {"copy_ms": 12000}})),
            "  capture   Linux: digests ok, entered 3418.3 ms after the crash (serial); \
             /proc/vmcore copied in 12000 ms"
        );
        assert_eq!(
            capture_line_with(json!({"kernel": "hv", "loaded": true, "digest_ok": true,
                                     "entered": false})),
            "  capture   hv capture mode: digests ok, NOT entered"
        );
        let mut report = whole_path();
        report["capture"] = json!({"kernel": "hv", "loaded": true, "digest_ok": true,
                                   "entered": true, "dump_path": null,
                                   "dump_error": "no dump stream"});
        let text = summary(&report);
        assert!(
            text.contains("  dump      none: no dump stream\n"),
            "{text}"
        );
        assert!(!text.contains("inspect"), "{text}");
        // A capture kernel loaded for a run without a crash.
        let mut report = whole_path();
        report.as_object_mut().unwrap().remove("crash");
        report["capture"] = json!({"kernel": "hv", "loaded": true});
        let text = summary(&report);
        assert!(
            text.contains("  capture   hv capture mode: loaded at boot; no crash to capture\n"),
            "{text}"
        );
    }

    #[test]
    fn without_the_elf_only_xtask_dump_is_offered() {
        let mut report = whole_path();
        report["xtask"] = json!({});
        let text = summary(&report);
        assert!(
            text.contains("  inspect   cargo xtask dump /w/build/run/vmcore\n"),
            "{text}"
        );
        assert!(!text.contains("  gdb"), "{text}");
    }

    #[test]
    fn paths_are_relative_only_inside_the_directory_and_quoted_when_needed() {
        let cwd = Some(Path::new("/w/main"));
        assert_eq!(shown("/w/main/build/x", cwd), "build/x");
        assert_eq!(shown("/w/mainly/x", cwd), "/w/mainly/x");
        assert_eq!(shown("/w/main", cwd), "/w/main");
        assert_eq!(shown("/w/main/x", None), "/w/main/x");
        assert_eq!(shell_word("build/a-b_c.d/vmcore"), "build/a-b_c.d/vmcore");
        assert_eq!(shell_word("/my dir/vmcore"), "'/my dir/vmcore'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn an_empty_report_still_summarises() {
        let text = summary(&json!({"ok": false, "reason": "no `done` report"}));
        assert!(text.contains("? of ? online, failed: ?"), "{text}");
        assert!(text.contains("FAILED: no `done` report"), "{text}");
    }
}
