//! Judging a run from what the hypervisor reported.
//!
//! An exit status alone never makes a run ok: a triple fault under QEMU's
//! `-no-reboot` exits with 0, and Bochs always exits with 1. A run is ok only
//! if hv reported `done`, reported no panic or exception, and reported the
//! values the run expected.

use std::time::Duration;

use serde_json::Value;

/// QEMU's exit status when hv wrote its success code (0x10) to
/// `isa-debug-exit`: `(0x10 << 1) | 1`.
pub const QEMU_EXIT_SUCCESS: i32 = 0x21;

/// QEMU's exit status when hv wrote its failure code (0x11).
pub const QEMU_EXIT_FAILURE: i32 = 0x23;

/// What the run was asked to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectations {
    /// The number of CPUs the emulator was given; hv must find them all.
    pub cpus: u32,
}

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
    let mut problems = Vec::new();
    let done = report["done"] == Value::Bool(true);

    if let End::TimedOut(after) = end {
        problems.push(format!(
            "timed out after {} s{}",
            after.as_secs(),
            if done {
                " (hv reported done but did not end the emulator)"
            } else {
                ""
            }
        ));
    }
    if let Some(panic) = report.get("panic") {
        problems.push(format!(
            "hv panicked on cpu {}: {}",
            show(&panic["cpu"]),
            panic["message"].as_str().unwrap_or("(no message)")
        ));
    }
    if let Some(exception) = report.get("exception") {
        problems.push(format!(
            "fatal exception {} (vector {}) on cpu {} at rip {}",
            exception["name"].as_str().unwrap_or("(unnamed)"),
            show(&exception["vector"]),
            show(&exception["cpu"]),
            hex(&exception["rip"]),
        ));
    }
    if !done {
        problems.push(match (end, convention) {
            (End::Exited(Some(0)), ExitConvention::QemuDebugExit) => {
                "no `done` report: QEMU exited with status 0 before it \
                 (a triple fault or reset under -no-reboot?)"
                    .to_owned()
            }
            _ => "no `done` report".to_owned(),
        });
    }
    if let (End::Exited(status), ExitConvention::QemuDebugExit) = (end, convention) {
        // Status 0 without `done` is already explained above.
        let explained = !done && status == Some(0);
        if status != Some(QEMU_EXIT_SUCCESS) && !explained {
            problems.push(match status {
                Some(QEMU_EXIT_FAILURE) => {
                    "hv ended QEMU with its failure code (status 0x23)".to_owned()
                }
                Some(code) => {
                    format!("QEMU exited with status {code} (0x{code:x}), not hv's success 0x21")
                }
                None => "QEMU was ended by a signal".to_owned(),
            });
        }
    }
    let cpus = &report["cpus"];
    match cpus["possible"].as_u64() {
        Some(possible) if possible == u64::from(expect.cpus) => {}
        Some(possible) => problems.push(format!(
            "cpus.possible is {possible}, expected {}",
            expect.cpus
        )),
        None => problems.push("no cpus.possible reported".to_owned()),
    }
    match cpus["online"].as_u64() {
        Some(online) if online >= 1 => {}
        Some(online) => problems.push(format!("cpus.online is {online}, expected at least 1")),
        None => problems.push("no cpus.online reported".to_owned()),
    }

    Verdict {
        ok: problems.is_empty(),
        reason: (!problems.is_empty()).then(|| problems.join("; ")),
    }
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

    const FOUR: Expectations = Expectations { cpus: 4 };
    const QEMU_OK: End = End::Exited(Some(QEMU_EXIT_SUCCESS));

    fn good_report() -> Value {
        json!({"cpus": {"possible": 4, "online": 4, "failed": []}, "done": true})
    }

    fn reason(report: &Value, end: End, convention: ExitConvention) -> String {
        let verdict = judge(report, &FOUR, end, convention);
        assert!(!verdict.ok);
        verdict.reason.unwrap()
    }

    #[test]
    fn a_complete_report_with_the_right_cpus_is_ok() {
        let verdict = judge(
            &good_report(),
            &FOUR,
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
            &FOUR,
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
        assert_eq!(reason_zero, "cpus.online is 0, expected at least 1");
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
}
