//! Judging a run from what the hypervisor reported.
//!
//! An exit status alone never makes a run ok: a triple fault under QEMU's
//! `-no-reboot` exits with 0, and Bochs always exits with 1. A run is ok only
//! if hv reported `done`, reported no panic or exception, and reported the
//! values the run expected. A run whose command line asks for a crash is
//! judged the other way round: it must end in the crash path, with a
//! `crash` report that shows a correct shootdown (see [`super::crash`]), no
//! `done`, and, under QEMU, hv's crash exit code.

use std::time::Duration;

use serde_json::Value;

use super::crash::{crash_problems, expected_exception, expected_panic};
use crate::report::model::{Cpus, Report, Virt, numbers};
use crate::report::{Backend, Expectations};

/// QEMU's exit status when hv wrote its success code (0x10) to
/// `isa-debug-exit`: `(0x10 << 1) | 1`.
pub const QEMU_EXIT_SUCCESS: i32 = 0x21;

/// QEMU's exit status when hv wrote its failure code (0x11).
pub const QEMU_EXIT_FAILURE: i32 = 0x23;

/// QEMU's exit status when hv's crash path ran to its end without a capture
/// kernel (0x12).
pub const QEMU_EXIT_CRASH: i32 = 0x25;

/// How the emulator's life ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// It exited by itself; `None` if a signal ended it.
    Exited(Option<i32>),
    /// xtask killed it when the time allowed ran out.
    TimedOut(Duration),
}

/// What an emulator's exit status means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitConvention {
    /// QEMU with `isa-debug-exit`: 0x21 success, 0x23 hv's failure code.
    QemuDebugExit,
    /// Bochs exits with 1 however the guest ended: the status says nothing.
    Meaningless,
}

/// The judgement of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the run passed.
    pub ok: bool,
    /// Everything that was wrong, `None` when ok.
    pub reason: Option<String>,
}

/// Judges a run from the merged report, how the emulator ended and what the
/// run expected. Every problem found is named in the reason.
pub fn judge(
    report: &Value,
    expect: &Expectations,
    end: End,
    convention: ExitConvention,
) -> Verdict {
    judge_report(&Report::of(report), expect, end, convention)
}

/// [`judge`], of the typed report.
pub fn judge_report(
    report: &Report,
    expect: &Expectations,
    end: End,
    convention: ExitConvention,
) -> Verdict {
    let mut problems = Vec::new();
    let done = report.done.value() == Some(true);
    let virt = report.virt.or_empty();
    let crash_rules = expect.crash_rules(virt.backend.as_str());
    let crash = report.crash.get();

    if let End::TimedOut(after) = end {
        problems.push(format!(
            "timed out after {} s{}",
            after.as_secs(),
            if done {
                " (hv reported done but did not end the emulator)"
            } else if crash.is_some() {
                " (hv reported its crash but did not end the emulator)"
            } else {
                ""
            }
        ));
    }
    if !report.panic.is_missing() {
        let panic = report.panic.or_empty();
        if !crash_rules
            .as_ref()
            .is_some_and(|rules| expected_panic(&panic, rules))
        {
            problems.push(format!(
                "hv panicked on cpu {}: {}",
                show(&panic.cpu.raw()),
                panic.message.as_str().unwrap_or("(no message)")
            ));
        }
    }
    if !report.exception.is_missing() {
        let exception = report.exception.or_empty();
        if !crash_rules
            .as_ref()
            .is_some_and(|rules| expected_exception(&exception, rules))
        {
            problems.push(format!(
                "fatal exception {} (vector {}) on cpu {} at rip {}",
                exception.name.as_str().unwrap_or("(unnamed)"),
                show(&exception.vector.raw()),
                show(&exception.cpu.raw()),
                hex(&exception.rip.raw()),
            ));
        }
    }
    match &crash_rules {
        Some(rules) => problems.extend(crash_problems(report, rules)),
        None => {
            if !done {
                problems.push(match (end, convention) {
                    (End::Exited(Some(0)), ExitConvention::QemuDebugExit) => {
                        "no `done` report: QEMU exited with status 0 before it \
                         (a triple fault or reset under -no-reboot?)"
                            .to_owned()
                    }
                    _ if expect.crash.hang_unnoticed() => "no `done` report: hang= hangs a CPU \
                         and nothing notices (watchdog=0 and no NMI button)"
                        .to_owned(),
                    _ => "no `done` report".to_owned(),
                });
            }
            // A crash nobody asked for; a panic or exception already says why.
            if let Some(crash) = crash
                && report.panic.is_missing()
                && report.exception.is_missing()
            {
                problems.push(format!(
                    "hv went through its crash path on cpu {}: {}",
                    show(&crash.cpu_index.raw()),
                    crash.reason.as_str().unwrap_or("(no reason)")
                ));
            }
        }
    }
    if let (End::Exited(status), ExitConvention::QemuDebugExit) = (end, convention) {
        let (wanted, what) = match crash_rules {
            Some(_) => (QEMU_EXIT_CRASH, "crash-handled code 0x25"),
            None => (QEMU_EXIT_SUCCESS, "success 0x21"),
        };
        // Status 0 without `done` is already explained above.
        let explained = crash_rules.is_none() && !done && status == Some(0);
        if status != Some(wanted) && !explained {
            problems.push(match status {
                Some(QEMU_EXIT_FAILURE) => {
                    "hv ended QEMU with its failure code (status 0x23)".to_owned()
                }
                Some(QEMU_EXIT_CRASH) => {
                    "hv ended QEMU with its crash-handled code (status 0x25)".to_owned()
                }
                Some(QEMU_EXIT_SUCCESS) => {
                    format!("hv ended QEMU with its success code (status 0x21), not its {what}")
                }
                Some(code) => {
                    format!("QEMU exited with status {code} (0x{code:x}), not hv's {what}")
                }
                None => "QEMU was ended by a signal".to_owned(),
            });
        }
    }
    // A crash before the boot report (before VMX, during bring-up, during
    // the guest run) leaves no `cpus` to judge: the crash report's own
    // counts stand for it.
    if crash_rules.is_none() || !report.cpus.is_missing() {
        problems.extend(cpu_problems(&report.cpus.or_empty(), expect));
    }
    problems.extend(virt_problems(report, &virt, expect, done));
    // A crash before the boot report leaves no `smp` to judge.
    if let Some(mode) = expect.apic_mode
        && (crash_rules.is_none() || !report.smp.is_missing())
    {
        match report.smp.or_empty().apic_mode.as_str() {
            Some(reported) if reported == mode => {}
            Some(reported) => {
                problems.push(format!("smp.apic_mode is {reported}, expected {mode}"))
            }
            None => problems.push("no smp.apic_mode reported".to_owned()),
        }
    }

    Verdict {
        ok: problems.is_empty(),
        reason: (!problems.is_empty()).then(|| problems.join("; ")),
    }
}

/// What is wrong with `cpus`: every CPU given must be found, every CPU
/// started must come online except those expected to fail, and exactly
/// those must be named in `failed`.
fn cpu_problems(cpus: &Cpus, expect: &Expectations) -> Vec<String> {
    let mut problems = Vec::new();
    match cpus.possible.value() {
        Some(possible) if possible == u64::from(expect.cpus) => {}
        Some(possible) => problems.push(format!(
            "cpus.possible is {possible}, expected {}",
            expect.cpus
        )),
        None => problems.push("no cpus.possible reported".to_owned()),
    }
    match cpus.online.value() {
        Some(online) if online == u64::from(expect.online()) => {}
        Some(online) => problems.push(format!(
            "cpus.online is {online}, expected {} ({})",
            expect.online(),
            online_rule(expect)
        )),
        None => problems.push("no cpus.online reported".to_owned()),
    }
    // Older reports may lack `attempted`; when it is there it must agree.
    if let Some(attempted) = cpus.attempted.value()
        && attempted != u64::from(expect.attempted())
    {
        problems.push(format!(
            "cpus.attempted is {attempted}, expected {}",
            expect.attempted()
        ));
    }
    match numbers(&cpus.failed) {
        Some(mut failed) => {
            failed.sort_unstable();
            let mut expected: Vec<u64> = expect.failed.iter().map(|&id| u64::from(id)).collect();
            expected.sort_unstable();
            if failed != expected {
                problems.push(format!(
                    "cpus.failed is {failed:?}, expected {expected:?}{}",
                    if expected.is_empty() {
                        ""
                    } else {
                        " (ap_hang)"
                    }
                ));
            }
        }
        None if cpus.online.value().is_some() => {
            problems.push("no cpus.failed list reported".to_owned());
        }
        None => {}
    }
    problems
}

/// Why that many CPUs must be online, for a message.
fn online_rule(expect: &Expectations) -> String {
    let base = match expect.max_cpus {
        Some(_) if expect.attempted() < expect.cpus => {
            format!(
                "max_cpus: {} of {} started",
                expect.attempted(),
                expect.cpus
            )
        }
        _ => format!("all {} CPUs", expect.cpus),
    };
    if expect.failed.is_empty() {
        base
    } else {
        format!("{base}, minus the {} expected to fail", expect.failed.len())
    }
}

/// What is wrong with `virt` and `guests_stopped`: the backend the platform
/// implies, a reason whenever there is no backend, and exactly the expected
/// guests stopped, each for a nested page fault (`ept_violation` on VMX,
/// `nested_page_fault` on SVM).
fn virt_problems(report: &Report, virt: &Virt, expect: &Expectations, done: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let backend = virt.backend.as_str();
    match (expect.virt, backend) {
        (Some(wanted), Some(backend)) if backend != wanted.as_str() => {
            problems.push(format!(
                "virt.backend is {backend}, expected {}{}",
                wanted.as_str(),
                virt.reason
                    .as_str()
                    .map(|reason| format!(" (hv says: {reason})"))
                    .unwrap_or_default()
            ));
        }
        (Some(wanted), None) if done => {
            problems.push(format!(
                "no virt.backend reported, expected {}",
                wanted.as_str()
            ));
        }
        _ => {}
    }
    if backend == Some(Backend::None.as_str()) && virt.reason.as_str().is_none() {
        problems.push("virt.backend is none but hv gave no virt.reason".to_owned());
    }
    let Some(backend) = backend
        .and_then(Backend::parse)
        .filter(|backend| backend.runs_guests())
    else {
        return problems;
    };
    let fault = backend.nested_page_fault();

    let stopped = report.guests_stopped.get();
    let mut named: Vec<String> = stopped
        .map(|map| map.keys().cloned().collect())
        .unwrap_or_default();
    named.sort_by_key(|key| key.parse::<u64>().unwrap_or(u64::MAX));
    let expected: Vec<String> = expect.stopped_vcpus.iter().map(u32::to_string).collect();
    if named != expected {
        problems.push(format!(
            "guests_stopped names vCPUs [{}], expected [{}]{}",
            named.join(", "),
            expected.join(", "),
            if expected.is_empty() {
                ""
            } else {
                " (guest_misbehave)"
            }
        ));
    }
    for vcpu in &expected {
        let reason = stopped
            .and_then(|map| map.get(vcpu))
            .map(|vcpu| vcpu.or_empty().reason)
            .unwrap_or_default();
        if !reason.is_missing() && reason.as_str() != Some(fault) {
            problems.push(format!(
                "vCPU {vcpu} was stopped for {}, expected {fault}",
                show(&reason.raw())
            ));
        }
    }
    match virt.stopped.value() {
        Some(count) if count == expected.len() as u64 => {}
        Some(count) => problems.push(format!(
            "virt.stopped is {count}, expected {}",
            expected.len()
        )),
        None => problems.push("no virt.stopped reported".to_owned()),
    }
    problems
}

/// A JSON value for a message: numbers and strings bare, absence as `?`.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "?".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// An address for a message, in hex when it is a number.
fn hex(value: &Value) -> String {
    value
        .as_u64()
        .map_or_else(|| show(value), |n| format!("{n:#x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const QEMU_OK: End = End::Exited(Some(QEMU_EXIT_SUCCESS));

    fn four() -> Expectations {
        Expectations::all_cpus(4)
    }

    fn good_report() -> Value {
        json!({"cpus": {"possible": 4, "online": 4, "failed": []}, "done": true})
    }

    fn reason(report: &Value, end: End, convention: ExitConvention) -> String {
        let verdict = judge(report, &four(), end, convention);
        assert!(!verdict.ok);
        verdict.reason.unwrap()
    }

    #[test]
    fn an_x2apic_run_must_report_x2apic_mode() {
        let expect = four().with_apic_mode("x2apic");
        let mut report = good_report();
        report["smp"] = json!({"apic_mode": "xapic"});
        let verdict = judge(&report, &expect, QEMU_OK, ExitConvention::QemuDebugExit);
        assert_eq!(
            verdict.reason.as_deref(),
            Some("smp.apic_mode is xapic, expected x2apic")
        );
        report["smp"]["apic_mode"] = json!("x2apic");
        assert!(judge(&report, &expect, QEMU_OK, ExitConvention::QemuDebugExit).ok);
        let verdict = judge(
            &good_report(),
            &expect,
            QEMU_OK,
            ExitConvention::QemuDebugExit,
        );
        assert_eq!(verdict.reason.as_deref(), Some("no smp.apic_mode reported"));
        // Without the expectation any mode passes.
        assert!(judge(&report, &four(), QEMU_OK, ExitConvention::QemuDebugExit).ok);
    }

    #[test]
    fn a_complete_report_with_the_right_cpus_is_ok() {
        let verdict = judge(
            &good_report(),
            &four(),
            QEMU_OK,
            ExitConvention::QemuDebugExit,
        );
        assert_eq!(
            verdict,
            Verdict {
                ok: true,
                reason: None
            }
        );
    }

    #[test]
    fn bochs_exit_status_does_not_matter() {
        let verdict = judge(
            &good_report(),
            &four(),
            End::Exited(Some(1)),
            ExitConvention::Meaningless,
        );
        assert!(verdict.ok);
    }

    #[test]
    fn triple_fault_exit_zero_without_done_is_not_ok() {
        let report = json!({"cpus": {"possible": 4, "online": 1}});
        let reason = reason(&report, End::Exited(Some(0)), ExitConvention::QemuDebugExit);
        assert!(reason.contains("no `done`"), "{reason}");
        assert!(reason.contains("triple fault"), "{reason}");
    }

    #[test]
    fn timeout_is_not_ok_even_after_done() {
        let reason = reason(
            &good_report(),
            End::TimedOut(Duration::from_secs(60)),
            ExitConvention::QemuDebugExit,
        );
        assert!(reason.contains("timed out after 60 s"), "{reason}");
        assert!(reason.contains("did not end the emulator"), "{reason}");
    }

    #[test]
    fn panic_and_exception_are_named() {
        let mut report = good_report();
        report["panic"] = json!({"message": "oops at smp.rs:10", "cpu": 2});
        report["exception"] =
            json!({"vector": 14, "name": "page fault", "rip": 0x20_1000, "cpu": 1});
        let reason = reason(&report, QEMU_OK, ExitConvention::QemuDebugExit);
        assert!(
            reason.contains("hv panicked on cpu 2: oops at smp.rs:10"),
            "{reason}"
        );
        assert!(
            reason.contains("page fault (vector 14) on cpu 1 at rip 0x201000"),
            "{reason}"
        );
    }

    #[test]
    fn wrong_cpu_count_is_not_ok() {
        let mut report = good_report();
        report["cpus"]["possible"] = json!(2);
        let reason = reason(&report, QEMU_OK, ExitConvention::QemuDebugExit);
        assert_eq!(reason, "cpus.possible is 2, expected 4");
    }

    #[test]
    fn missing_cpus_or_none_online_is_not_ok() {
        let reason_missing = reason(
            &json!({"done": true}),
            QEMU_OK,
            ExitConvention::QemuDebugExit,
        );
        assert!(
            reason_missing.contains("no cpus.possible reported"),
            "{reason_missing}"
        );
        assert!(
            reason_missing.contains("no cpus.online reported"),
            "{reason_missing}"
        );
        let mut report = good_report();
        report["cpus"]["online"] = json!(0);
        let reason_zero = reason(&report, QEMU_OK, ExitConvention::QemuDebugExit);
        assert_eq!(reason_zero, "cpus.online is 0, expected 4 (all 4 CPUs)");
    }

    #[test]
    fn qemu_failure_code_and_odd_statuses_are_not_ok() {
        let failure = reason(
            &good_report(),
            End::Exited(Some(QEMU_EXIT_FAILURE)),
            ExitConvention::QemuDebugExit,
        );
        assert!(failure.contains("failure code"), "{failure}");
        let odd = reason(
            &good_report(),
            End::Exited(Some(1)),
            ExitConvention::QemuDebugExit,
        );
        assert!(odd.contains("status 1"), "{odd}");
        let signal = reason(
            &good_report(),
            End::Exited(None),
            ExitConvention::QemuDebugExit,
        );
        assert!(signal.contains("signal"), "{signal}");
    }

    fn judge_ok(report: &Value, expect: &Expectations) -> Verdict {
        judge(report, expect, QEMU_OK, ExitConvention::QemuDebugExit)
    }

    #[test]
    fn one_cpu_short_of_all_is_not_ok() {
        let report = json!({"cpus": {"possible": 4, "online": 3, "failed": []}, "done": true});
        let reason = reason(&report, QEMU_OK, ExitConvention::QemuDebugExit);
        assert_eq!(reason, "cpus.online is 3, expected 4 (all 4 CPUs)");
    }

    #[test]
    fn an_unexpected_failed_cpu_is_named() {
        let report = json!({"cpus": {"possible": 4, "online": 3, "failed": [2], "attempted": 4},
                            "done": true});
        let reason = reason(&report, QEMU_OK, ExitConvention::QemuDebugExit);
        assert!(
            reason.contains("cpus.failed is [2], expected []"),
            "{reason}"
        );
    }

    #[test]
    fn an_expected_hang_is_ok_only_for_that_apic_id() {
        let expect = Expectations::from_cmdline(8, &["ap_hang=5"]);
        let report = |online: u64, failed: Value| {
            json!({"cpus": {"possible": 8, "online": online, "failed": failed, "attempted": 8},
                   "done": true})
        };
        assert!(judge_ok(&report(7, json!([5])), &expect).ok);
        let other = judge_ok(&report(7, json!([4])), &expect);
        assert_eq!(
            other.reason.as_deref(),
            Some("cpus.failed is [4], expected [5] (ap_hang)")
        );
        let none_failed = judge_ok(&report(8, json!([])), &expect);
        let reason = none_failed.reason.unwrap();
        assert!(
            reason.contains(
                "cpus.online is 8, expected 7 (all 8 CPUs, minus the 1 expected to fail)"
            ),
            "{reason}"
        );
        assert!(
            reason.contains("cpus.failed is [], expected [5]"),
            "{reason}"
        );
    }

    #[test]
    fn max_cpus_expects_that_many_attempted_and_online() {
        let expect = Expectations::from_cmdline(8, &["max_cpus=3"]);
        let good = json!({"cpus": {"possible": 8, "online": 3, "failed": [], "attempted": 3},
                          "done": true});
        assert!(judge_ok(&good, &expect).ok);
        let all = json!({"cpus": {"possible": 8, "online": 8, "failed": [], "attempted": 8},
                         "done": true});
        let reason = judge_ok(&all, &expect).reason.unwrap();
        assert_eq!(
            reason,
            "cpus.online is 8, expected 3 (max_cpus: 3 of 8 started); \
             cpus.attempted is 8, expected 3"
        );
    }

    #[test]
    fn a_missing_failed_list_is_not_ok() {
        let report = json!({"cpus": {"possible": 4, "online": 4}, "done": true});
        let reason = reason(&report, QEMU_OK, ExitConvention::QemuDebugExit);
        assert_eq!(reason, "no cpus.failed list reported");
    }

    fn vmx_report(stopped: u64, guests_stopped: Value) -> Value {
        json!({
            "cpus": {"possible": 4, "online": 4, "failed": []},
            "virt": {"backend": "vmx", "reason": null, "vcpus": 8, "stopped": stopped},
            "guests_stopped": guests_stopped,
            "done": true,
        })
    }

    #[test]
    fn bochs_expects_vmx_and_says_why_it_is_missing() {
        let expect = four().with_virt(Backend::Vmx);
        assert!(judge_ok(&vmx_report(0, Value::Null), &expect).ok);
        let mut report = good_report();
        report["virt"] = json!({"backend": "none", "reason": "the CPU has no VMX"});
        let verdict = judge_ok(&report, &expect);
        assert_eq!(
            verdict.reason.as_deref(),
            Some("virt.backend is none, expected vmx (hv says: the CPU has no VMX)")
        );
        let silent = judge_ok(&good_report(), &expect);
        assert_eq!(
            silent.reason.as_deref(),
            Some("no virt.backend reported, expected vmx")
        );
    }

    #[test]
    fn no_backend_needs_a_reason_but_is_otherwise_fine() {
        let mut report = good_report();
        report["virt"] = json!({"backend": "none", "reason": "the CPU has no VMX"});
        assert!(judge_ok(&report, &four()).ok);
        report["virt"]["reason"] = Value::Null;
        assert_eq!(
            judge_ok(&report, &four()).reason.as_deref(),
            Some("virt.backend is none but hv gave no virt.reason")
        );
    }

    #[test]
    fn an_unexpected_stopped_guest_is_not_ok() {
        let stopped = json!({"2": {"cpu": 1, "reason": "ept_violation", "gpa": 0, "rip": 0}});
        let verdict = judge_ok(&vmx_report(1, stopped), &four());
        assert_eq!(
            verdict.reason.as_deref(),
            Some("guests_stopped names vCPUs [2], expected []; virt.stopped is 1, expected 0")
        );
    }

    #[test]
    fn a_misbehaving_guest_must_be_the_only_one_stopped_for_ept() {
        let expect = Expectations::from_cmdline(4, &["guest_misbehave=3"]);
        let one = |reason: &str| json!({"3": {"cpu": 2, "reason": reason, "gpa": 1, "rip": 2}});
        assert!(judge_ok(&vmx_report(1, one("ept_violation")), &expect).ok);
        let wrong_reason = judge_ok(&vmx_report(1, one("triple_fault")), &expect);
        assert_eq!(
            wrong_reason.reason.as_deref(),
            Some("vCPU 3 was stopped for triple_fault, expected ept_violation")
        );
        let not_stopped = judge_ok(&vmx_report(0, Value::Null), &expect);
        assert_eq!(
            not_stopped.reason.as_deref(),
            Some(
                "guests_stopped names vCPUs [], expected [3] (guest_misbehave); \
                 virt.stopped is 0, expected 1"
            )
        );
        let mut two = one("ept_violation");
        two["10"] = json!({"cpu": 0, "reason": "ept_violation"});
        let extra = judge_ok(&vmx_report(2, two), &expect);
        assert!(
            extra
                .reason
                .unwrap()
                .starts_with("guests_stopped names vCPUs [3, 10], expected [3]")
        );
    }

    #[test]
    fn on_svm_a_misbehaving_guest_is_stopped_for_a_nested_page_fault() {
        let expect = Expectations::from_cmdline(4, &["guest_misbehave=3"]).with_virt(Backend::Svm);
        let one = |reason: &str| json!({"3": {"cpu": 2, "reason": reason, "gpa": 1, "rip": 2}});
        let mut report = vmx_report(1, one("nested_page_fault"));
        report["virt"]["backend"] = json!("svm");
        assert!(judge_ok(&report, &expect).ok);
        report["guests_stopped"] = one("ept_violation");
        assert_eq!(
            judge_ok(&report, &expect).reason.as_deref(),
            Some("vCPU 3 was stopped for ept_violation, expected nested_page_fault")
        );
        // QEMU TCG's `-cpu max` has SVM: a report without it is wrong.
        let mut none = good_report();
        none["virt"] = json!({"backend": "none", "reason": "the CPU has neither VMX nor SVM"});
        assert_eq!(
            judge_ok(&none, &four().with_virt(Backend::Svm))
                .reason
                .as_deref(),
            Some("virt.backend is none, expected svm (hv says: the CPU has neither VMX nor SVM)")
        );
    }

    #[test]
    fn without_guests_a_misbehave_knob_expects_nothing() {
        let expect = Expectations::from_cmdline(4, &["guest_misbehave=3"]);
        let mut report = good_report();
        report["virt"] = json!({"backend": "none", "reason": "the CPU has no VMX", "stopped": 0});
        assert!(judge_ok(&report, &expect).ok);
    }
}
