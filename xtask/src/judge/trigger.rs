//! The crashes that do not come from `crash=` or the crash hypercall, and
//! the points that disturb a crash already under way (issue 9):
//!
//! - the platform's NMI button (`nmi=dump`): reason `external NMI`, any
//!   CPU may coordinate (every CPU takes the NMI, the first one in wins);
//! - the lockup detector (`hang=` with `watchdog=` on): reason `lockup: CPU
//!   N (APIC ID A) has not ticked for M ms`, N one of the hung CPUs, M at
//!   least the threshold, a coordinator that is not hung, and
//!   `crash.lockup_cpus` naming hung CPUs only, N among them;
//! - a stray write into the capture reservation (`stray_write=reservation`):
//!   a page fault (`fatal exception #PF ... (vector 14)`) on the boot CPU,
//!   which ran the write, at an address inside the reservation;
//! - a stray NMI on the coordinator (`point:nmi_after_cleanup`,
//!   `nmi_in_header`, `nmi_in_digest`, `nmi_in_purgatory`), a storm of
//!   them from the purgatory through the capture image's entry
//!   (`nmi_storm`), a panic inside the hand-over (`handover_panic`), an NMI
//!   on every CPU during the crash (`external_nmi`): the crash is the
//!   time-based one, and the report must show the disturbance landed (the
//!   coordinator counted its stray NMI, the purgatory counted its own, hv's
//!   capture image counted the storm's on its own IDT, the second
//!   hand-over attempt jumped) and was survived. The points of
//!   the hand-over need a capture kernel: without one hv never gets there.

use serde_json::Value;

use crate::crash::{CoordinatorStep, Point, needs_capture};
use crate::report::CrashRules;
use crate::report::model::{Crash, Exception, Field, Report};

/// hv's reason for a crash the NMI button started.
pub const EXTERNAL_NMI: &str = "external NMI";
/// How hv's lockup reasons start.
const LOCKUP: &str = "lockup: CPU ";
/// How hv's page-fault reasons start.
const PAGE_FAULT: &str = "fatal exception #PF";

/// A crash that is neither injected nor the crash hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Special {
    /// The NMI button.
    ExternalNmi,
    /// The lockup detector.
    Lockup,
    /// The stray write into the reservation.
    StrayWrite,
}

/// Which special crash the reported `reason` is, among those the run
/// asked for.
pub(crate) fn special(reason: &str, rules: &CrashRules) -> Option<Special> {
    if rules.external_nmi && reason == EXTERNAL_NMI {
        Some(Special::ExternalNmi)
    } else if rules.lockup_after_ms.is_some() && reason.starts_with(LOCKUP) {
        Some(Special::Lockup)
    } else if rules.stray_write && reason.starts_with(PAGE_FAULT) {
        Some(Special::StrayWrite)
    } else {
        None
    }
}

/// Whether a reported `exception` is the one `stray_write=reservation`
/// causes: a page fault on the boot CPU.
pub(crate) fn expected_exception(exception: &Exception, rules: &CrashRules) -> bool {
    rules.stray_write && exception.vector.value() == Some(14) && exception.cpu.value() == Some(0)
}

/// The reasons a run with only special triggers may end with, for a
/// message.
fn wanted_reasons(rules: &CrashRules) -> Vec<String> {
    let mut wanted = Vec::new();
    if rules.external_nmi {
        wanted.push(format!("\"{EXTERNAL_NMI}\" (the NMI button)"));
    }
    if let Some(ms) = rules.lockup_after_ms {
        wanted.push(format!(
            "\"{LOCKUP}N (APIC ID A) has not ticked for M ms\" with N in {:?} and M >= {ms} \
             (the lockup detector)",
            rules.hung
        ));
    }
    if rules.stray_write {
        wanted.push(format!(
            "\"{PAGE_FAULT} page fault (vector 14)\" (stray_write)"
        ));
    }
    wanted
}

/// Everything wrong with the crash's trigger when it is special (or must
/// be: the run asked for nothing else), given the coordinator's index.
pub(crate) fn problems(
    report: &Report,
    rules: &CrashRules,
    special: Option<Special>,
    coordinator: Option<u64>,
) -> Vec<String> {
    let crash = report.crash.or_empty();
    let reason = crash.reason.as_str().unwrap_or_default();
    let mut problems = Vec::new();
    let Some(special) = special else {
        if rules.injected.is_none() && rules.hypercall_vcpu.is_none() {
            problems.push(format!(
                "crash.reason is {}, expected {}",
                crash.reason.raw(),
                wanted_reasons(rules).join(" or ")
            ));
        }
        return problems;
    };
    let apic_ids = report.cpus.or_empty().apic_ids();
    let apic_of = |index: u32| apic_ids.as_ref()?.get(index as usize).copied();
    match special {
        Special::ExternalNmi => {}
        Special::Lockup => problems.extend(lockup_problems(
            &crash,
            rules,
            reason,
            coordinator,
            &apic_of,
        )),
        Special::StrayWrite => {
            if coordinator.is_some_and(|index| index != 0) {
                problems.push(format!(
                    "crash.cpu_index is {}, expected 0 (the boot CPU made the stray write)",
                    coordinator.unwrap_or_default()
                ));
            }
            if !reason.ends_with("(vector 14)") {
                problems.push(format!(
                    "crash.reason is {}, expected a page fault (vector 14)",
                    crash.reason.raw()
                ));
            }
            problems.extend(stray_write_problems(report));
        }
    }
    problems
}

/// The lockup's reason, coordinator and `lockup_cpus`.
fn lockup_problems(
    crash: &Crash,
    rules: &CrashRules,
    reason: &str,
    coordinator: Option<u64>,
    apic_of: &dyn Fn(u32) -> Option<u64>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let hung_apic: Vec<u64> = rules.hung.iter().filter_map(|&cpu| apic_of(cpu)).collect();
    match parse_lockup(reason) {
        None => problems.push(format!(
            "crash.reason is {}, expected \"{LOCKUP}N (APIC ID A) has not ticked for M ms\"",
            crash.reason.raw()
        )),
        Some((cpu, apic, silent_ms)) => {
            if !rules.hung.iter().any(|&hung| u64::from(hung) == cpu) {
                problems.push(format!(
                    "the lockup names CPU {cpu}, but hang= hangs CPU {:?}",
                    rules.hung
                ));
            }
            if let Some(wanted) = u32::try_from(cpu).ok().and_then(apic_of)
                && wanted != apic
            {
                problems.push(format!(
                    "the lockup names CPU {cpu} with APIC ID {apic}, but its APIC ID is {wanted}"
                ));
            }
            if let Some(threshold) = rules.lockup_after_ms
                && silent_ms < threshold
            {
                problems.push(format!(
                    "the lockup says CPU {cpu} was silent {silent_ms} ms, less than \
                     watchdog={} s",
                    threshold / 1000
                ));
            }
            match crash.lockup_cpus.get() {
                None => problems.push(format!(
                    "crash.lockup_cpus is {}, expected a list of APIC IDs",
                    crash.lockup_cpus.raw()
                )),
                Some(list) => {
                    let named: Vec<u64> = list.iter().filter_map(Value::as_u64).collect();
                    if !named.contains(&apic) {
                        problems.push(format!(
                            "crash.lockup_cpus is {named:?}, without APIC ID {apic}, the CPU \
                             the reason names"
                        ));
                    }
                    if !hung_apic.is_empty()
                        && let Some(stray) = named.iter().find(|id| !hung_apic.contains(id))
                    {
                        problems.push(format!(
                            "crash.lockup_cpus names APIC ID {stray}, which was not hung \
                             (hung: {hung_apic:?})"
                        ));
                    }
                }
            }
        }
    }
    if let Some(index) = coordinator
        && rules.hung.iter().any(|&hung| u64::from(hung) == index)
    {
        problems.push(format!(
            "crash.cpu_index is {index}, a hung CPU: a CPU that noticed the lockup coordinates"
        ));
    }
    problems
}

/// `lockup: CPU N (APIC ID A) has not ticked for M ms` as (N, A, M).
fn parse_lockup(reason: &str) -> Option<(u64, u64, u64)> {
    let rest = reason.strip_prefix(LOCKUP)?;
    let (cpu, rest) = rest.split_once(" (APIC ID ")?;
    let (apic, rest) = rest.split_once(") has not ticked for ")?;
    let silent = rest.strip_suffix(" ms")?;
    Some((cpu.parse().ok()?, apic.parse().ok()?, silent.parse().ok()?))
}

/// The stray write's fault: CR2 inside the crash reservation.
fn stray_write_problems(report: &Report) -> Vec<String> {
    let exception = report.exception.or_empty();
    let mut problems = Vec::new();
    if exception.vector.value() != Some(14) {
        problems.push(format!(
            "exception.vector is {}, expected 14 (a page fault)",
            exception.vector.raw()
        ));
    }
    let reservation = report.crashkernel.or_empty();
    if let (Some(base), Some(size), Some(cr2)) = (
        reservation.base.value(),
        reservation.size.value(),
        exception.cr2.value(),
    ) && !(base..base.saturating_add(size)).contains(&cr2)
    {
        problems.push(format!(
            "the page fault's address {cr2:#x} is outside the reservation [{base:#x}, {:#x})",
            base.saturating_add(size)
        ));
    }
    problems
}

/// Whether the point of the run's `crash=` disturbed the crash as asked,
/// and the crash survived it.
pub(crate) fn disturbance_problems(report: &Report, rules: &CrashRules) -> Vec<String> {
    let Some(point) = rules
        .injected
        .and_then(|spec| spec.point)
        .filter(|point| point.disturbs_the_crash())
    else {
        return Vec::new();
    };
    let crash = report.crash.or_empty();
    let capture = report.capture.or_empty();
    let loaded = capture.loaded.value() == Some(true);
    if needs_capture(point) && !loaded {
        return vec![format!(
            "point:{point} strikes inside the hand-over to a capture kernel, and hv loaded \
             none: it never fired"
        )];
    }
    let mut problems = Vec::new();
    let count = |value: &Field<u64>, key: &str, problems: &mut Vec<String>| -> u64 {
        value.value().unwrap_or_else(|| {
            problems.push(format!("no {key} reported (point:{point} needs it)"));
            0
        })
    };
    // The hand-over's report line (the second attempt's, when there were
    // two) exists once hv got that far with a capture kernel loaded.
    let handed_over = loaded && capture.digest_ok.get().is_some();
    let missing = match point {
        Point::CoordinatorNmi(CoordinatorStep::AfterCleanup) => (count(
            &crash.coordinator_stray_nmis,
            "coordinator_stray_nmis",
            &mut problems,
        ) == 0)
            .then(|| {
                "crash.coordinator_stray_nmis is 0: the stray NMI after the coordinator's \
                 cleanup never reached it"
                    .to_owned()
            }),
        Point::CoordinatorNmi(
            step @ (CoordinatorStep::CoreHeader | CoordinatorStep::DigestCheck),
        ) => (handed_over
            && count(
                &capture.coordinator_stray_nmis,
                "coordinator_stray_nmis",
                &mut problems,
            ) == 0)
            .then(|| {
                format!(
                    "capture.coordinator_stray_nmis is 0: the stray NMI {} never reached the \
                     coordinator",
                    match step {
                        CoordinatorStep::CoreHeader => "during the core header",
                        _ => "during the digest check",
                    }
                )
            }),
        Point::CoordinatorNmi(CoordinatorStep::Storm) => {
            let purgatory = capture.purgatory.or_empty();
            let in_purgatory =
                purgatory.nmis_64.value().unwrap_or(0) + purgatory.nmis_32.value().unwrap_or(0);
            if handed_over && capture.jumped.value() != Some(true) {
                Some(
                    "capture.jumped is not true: the coordinator never reached the purgatory"
                        .to_owned(),
                )
            } else if capture.purgatory.get().is_some() {
                // hv's capture image reported: the storm must have reached
                // both the purgatory and the image's own IDT, so it lasted
                // through the whole way in between.
                let in_image = count(&capture.stray_nmis, "stray_nmis", &mut problems);
                match (in_purgatory, in_image) {
                    (0, _) => Some(
                        "capture.purgatory.nmis_64 + nmis_32 is 0: the storm never reached the \
                         purgatory"
                            .to_owned(),
                    ),
                    (_, 0) => Some(
                        "capture.stray_nmis is 0: the storm never reached the capture image's \
                         own IDT"
                            .to_owned(),
                    ),
                    _ => None,
                }
            } else {
                None
            }
        }
        Point::CoordinatorNmi(_) => {
            let purgatory = capture.purgatory.or_empty();
            let nmis =
                purgatory.nmis_64.value().unwrap_or(0) + purgatory.nmis_32.value().unwrap_or(0);
            if handed_over && capture.jumped.value() != Some(true) {
                Some(
                    "capture.jumped is not true: the coordinator never reached the purgatory"
                        .to_owned(),
                )
            } else {
                // The capture image reads the purgatory's count (when it
                // got that far: else the capture's checks say why).
                (capture.purgatory.get().is_some() && nmis == 0).then(|| {
                    "capture.purgatory.nmis_64 + nmis_32 is 0: the stray NMI never reached \
                     the purgatory"
                        .to_owned()
                })
            }
        }
        Point::HandoverPanic => (handed_over && capture.attempt.value() != Some(2)).then(|| {
            format!(
                "capture.attempt is {}, expected 2 (the first hand-over panicked; the second \
                 must jump)",
                capture.attempt.raw()
            )
        }),
        Point::ExternalNmi => {
            let nested = count(&crash.nested_nmis, "nested_nmis", &mut problems);
            let stray = crash
                .coordinator_stray_nmis
                .value()
                .max(capture.coordinator_stray_nmis.value())
                .unwrap_or(0);
            (nested + stray == 0).then(|| {
                "no NMI of the external_nmi point was seen: crash.nested_nmis and the \
                 coordinator's stray NMIs are 0"
                    .to_owned()
            })
        }
        _ => None,
    };
    problems.extend(missing);
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockup_reasons_parse() {
        assert_eq!(
            parse_lockup("lockup: CPU 3 (APIC ID 3) has not ticked for 1092 ms"),
            Some((3, 3, 1092))
        );
        assert_eq!(parse_lockup("lockup: CPU 3 has not ticked"), None);
        assert_eq!(parse_lockup("panic: lockup"), None);
    }
}
