//! Judging a crash run: the shootdown hv reports in its `crash` line must
//! be the one the command line asked for, and a correct one.
//!
//! A correct crash (see `xtask/REPORT.md`, "A crash run"):
//! - the coordinator is a CPU that was made to panic (for `nmi_blocked`
//!   CPU 0, or 1 when the spinning CPU is 0; for `double_panic` either of
//!   the two), named by index and by its APIC ID, for the reason asked for;
//! - every online CPU but the coordinator was expected (during bring-up:
//!   those online at that moment, at least the boot CPU);
//! - exactly the deliberate stragglers are named (the CPU spinning with
//!   NMIs blocked, by APIC ID), the rendezvous timed out if and only if
//!   there are any, and then only after `crash_timeout_ms`;
//! - `checked_in == expected - stragglers`, `vmxoff_cpus == checked_in`,
//!   the coordinator left VMX, `vmcs_cleared + vmcs_on_stragglers ==
//!   vmcs_loaded`, and `vmcs_loaded > 0` when guests were running; on SVM
//!   (`backend: "svm"`) the same of the `vmcb_*` counts, and
//!   `svm_off_cpus == checked_in` with the coordinator out of SVM too;
//! - `nmi_in_guest`, when reported, has one entry per CPU started, and
//!   `nmi_in_guest_cpus` counts its `true`s;
//! - `nmi_latency_us` has one entry per CPU started, none for the
//!   coordinator or for a CPU that could not take the NMI;
//! - the VMX accounting, where hv reports it (`super::accounting`);
//! - crashes from the NMI button, the lockup detector and a stray write,
//!   and the points that disturb a crash, by their own rules
//!   (`super::trigger`).

use crate::crash::CrashSpecExt;
use serde_json::Value;

use super::trigger;
use crate::report::model::{Crash, Exception, Field, Panic, Report, numbers};
use crate::report::{Backend, CrashRules};

/// The message prefix of hv's injected panics: `injected crash on CPU N (...)`.
const INJECTED_PANIC: &str = "injected crash on CPU ";

/// What triggered the crash that was reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Injected,
    Hypercall(u32),
    /// The NMI button, the lockup detector, a stray write
    /// ([`trigger::special`]), judged by `super::trigger`.
    Special,
}

/// Whether a reported panic is the injected one: its message names one of
/// the CPUs made to panic (and the CPU it reports, when it does).
pub(crate) fn expected_panic(panic: &Panic, rules: &CrashRules) -> bool {
    let Some(spec) = rules.injected else {
        return false;
    };
    let Some(cpu) = panic
        .message
        .as_str()
        .and_then(|message| message.strip_prefix(INJECTED_PANIC))
        .and_then(leading_number)
    else {
        return false;
    };
    let reported = panic.cpu.value();
    spec.panickers(rules.cpus).contains(&(cpu as u32)) && reported.is_none_or(|n| n == cpu)
}

/// Everything wrong with a crash run's report, given what it must show.
pub(crate) fn crash_problems(report: &Report, rules: &CrashRules) -> Vec<String> {
    let mut problems = Vec::new();
    let asked = rules.describe();
    if report.done.value() == Some(true) && !rules.done_before_crash() {
        let mut text = format!("hv reported `done`: the crash asked for ({asked}) did not happen");
        if report.crash_injection.or_empty().fired.value() == Some(false) {
            let point = rules
                .injected
                .and_then(|spec| spec.point)
                .map_or_else(|| "the injection".to_owned(), |p| format!("point {p}"));
            text.push_str(&format!(
                " ({point} never fired: crash_injection.fired is false)"
            ));
        }
        if let Some(spec) = rules.injected.filter(|spec| spec.cpu >= rules.cpus) {
            text.push_str(&format!(
                " (CPU index {} is not among the {} CPUs started)",
                spec.cpu, rules.cpus
            ));
        }
        problems.push(text);
    }
    let Some(crash) = report.crash.get() else {
        problems.push(format!("no `crash` report (asked for: {asked})"));
        return problems;
    };
    let mut field = |key: &str, value: &Field<u64>| -> Option<u64> {
        let number = value.value();
        if number.is_none() {
            problems.push(format!(
                "crash.{key} is {}, expected a number",
                show(&value.raw())
            ));
        }
        number
    };
    // Which contexts the lists held: VMCBs on SVM (hv says so in the crash
    // line; older reports have no `backend` there and only VMCSes).
    let svm = crash.backend.as_str() == Some("svm")
        || (crash.backend.is_missing() && rules.backend == Some(Backend::Svm));
    let (kind, prefix) = if svm {
        ("VMCB", "vmcb")
    } else {
        ("VMCS", "vmcs")
    };
    let [loaded, cleared, on_stragglers] = crash.contexts(svm);
    let cpu = field("cpu", &crash.cpu);
    let cpu_index = field("cpu_index", &crash.cpu_index);
    let expected = field("expected", &crash.expected);
    let checked_in = field("checked_in", &crash.checked_in);
    let loaded = field(&format!("{prefix}_loaded"), loaded);
    let cleared = field(&format!("{prefix}_cleared"), cleared);
    let on_stragglers = field(&format!("{prefix}_on_stragglers"), on_stragglers);
    let vmxoff = field("vmxoff_cpus", &crash.vmxoff_cpus);
    let svm_off = if svm {
        field("svm_off_cpus", &crash.svm_off_cpus)
    } else {
        None
    };
    let shootdown_us = field("shootdown_us", &crash.shootdown_us);
    let reason = crash.reason.as_str().unwrap_or_default();
    let apic_ids = report.cpus.or_empty().apic_ids();
    let apic_id_of = |index: u64| apic_ids.as_ref()?.get(index as usize).copied();

    // Which trigger this is, and who may coordinate.
    let special = trigger::special(reason, rules);
    let trigger = match rules.hypercall_vcpu {
        _ if special.is_some() => Trigger::Special,
        Some(vcpu) if rules.injected.is_none() || reason.starts_with("crash hypercall") => {
            Trigger::Hypercall(vcpu)
        }
        _ => Trigger::Injected,
    };
    let (coordinators, wanted_reason) = match (trigger, rules.injected) {
        (Trigger::Special, _) => (None, String::new()),
        (Trigger::Hypercall(vcpu), _) => (None, format!("crash hypercall from vCPU {vcpu}")),
        (Trigger::Injected, Some(spec)) => (
            Some(spec.panickers(rules.cpus)),
            format!("panic: {INJECTED_PANIC}{}", show_opt(cpu_index)),
        ),
        (Trigger::Injected, None) => (None, String::new()),
    };
    if let Some(index) = cpu_index {
        match &coordinators {
            Some(allowed) if !allowed.iter().any(|&c| u64::from(c) == index) => {
                problems.push(format!(
                    "crash.cpu_index is {index}, expected {} (the CPU{} made to panic)",
                    join_or(allowed),
                    if allowed.len() == 1 { "" } else { "s" }
                ));
            }
            None if index >= u64::from(rules.cpus) => problems.push(format!(
                "crash.cpu_index is {index}, but only {} CPUs were started",
                rules.cpus
            )),
            _ => {}
        }
        if let (Some(apic), Some(wanted)) = (cpu, apic_id_of(index))
            && apic != wanted
        {
            problems.push(format!(
                "crash.cpu is APIC ID {apic}, but CPU index {index} has APIC ID {wanted}"
            ));
        }
    }
    let reason_ok = match trigger {
        Trigger::Hypercall(_) => reason == wanted_reason,
        // Judged by its own rules below; so is a run that asked for
        // nothing but special triggers.
        Trigger::Special => true,
        Trigger::Injected if rules.injected.is_none() => true,
        // `panic: injected crash on CPU N (...)`: the number must end there.
        Trigger::Injected => reason
            .strip_prefix(&wanted_reason)
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit())),
    };
    if !reason_ok {
        problems.push(format!(
            "crash.reason is {}, expected {}",
            show(&crash.reason.raw()),
            match trigger {
                Trigger::Hypercall(_) | Trigger::Special => format!("\"{wanted_reason}\""),
                Trigger::Injected => format!("\"{wanted_reason} (...)\""),
            }
        ));
    }

    // Who was expected to check in.
    let others = u64::from(rules.online.saturating_sub(1));
    if let Some(expected) = expected {
        if rules.during_bringup() {
            // The panicking AP never came online; the others may or may not
            // be online yet, the boot CPU is.
            let least = others.min(1);
            if !(least..=others).contains(&expected) {
                problems.push(format!(
                    "crash.expected is {expected}, expected {least} to {others} \
                     (the CPUs online during bring-up, but the panicking AP)"
                ));
            }
        } else if expected != others {
            problems.push(format!(
                "crash.expected is {expected}, expected {others} (every online CPU but the coordinator)"
            ));
        }
    }

    // Stragglers: exactly the deliberate ones, by APIC ID.
    let straggler_indexes = rules
        .injected
        .filter(|_| trigger == Trigger::Injected)
        .map(|spec| spec.stragglers())
        .unwrap_or_default();
    let mut wanted_stragglers = Vec::new();
    for &index in &straggler_indexes {
        match apic_id_of(u64::from(index)) {
            Some(apic) => wanted_stragglers.push(apic),
            None => problems.push(format!(
                "cannot tell the APIC ID of CPU index {index} (the straggler): no cpus.apic_ids \
                 reported before the crash"
            )),
        }
    }
    wanted_stragglers.sort_unstable();
    let stragglers = match numbers(&crash.stragglers) {
        Some(mut list) => {
            list.sort_unstable();
            if list != wanted_stragglers && straggler_indexes.len() == wanted_stragglers.len() {
                problems.push(format!(
                    "crash.stragglers is {list:?}, expected {wanted_stragglers:?}{}",
                    if wanted_stragglers.is_empty() {
                        " (every CPU must check in)".to_owned()
                    } else {
                        format!(
                            " (CPU index {} spins with NMIs blocked)",
                            join_or(&straggler_indexes)
                        )
                    }
                ));
            }
            Some(list)
        }
        None => {
            problems.push(format!(
                "crash.stragglers is {}, expected a list of APIC IDs",
                show(&crash.stragglers.raw())
            ));
            None
        }
    };
    match (crash.timed_out.value(), &stragglers) {
        (Some(timed_out), Some(list)) if timed_out == list.is_empty() => {
            problems.push(format!(
                "crash.timed_out is {timed_out} with {} straggler(s): the rendezvous times out \
                 exactly when a CPU does not check in",
                list.len()
            ));
        }
        (None, _) => problems.push(format!(
            "crash.timed_out is {}, expected true or false",
            show(&crash.timed_out.raw())
        )),
        _ => {}
    }
    if crash.timed_out.value() == Some(true)
        && let Some(us) = shootdown_us
        && us < rules.timeout_ms * 1000
    {
        problems.push(format!(
            "crash.shootdown_us is {us}, but the rendezvous timed out: it waits \
             crash_timeout_ms={} first",
            rules.timeout_ms
        ));
    }

    // The invariants of a correct shootdown.
    if let (Some(expected), Some(checked_in), Some(list)) = (expected, checked_in, &stragglers) {
        let wanted = expected.saturating_sub(list.len() as u64);
        if checked_in != wanted {
            problems.push(format!(
                "crash.checked_in is {checked_in}, expected {wanted} \
                 (expected {expected} minus {} straggler(s))",
                list.len()
            ));
        }
    }
    if let (Some(loaded), Some(cleared), Some(on_stragglers)) = (loaded, cleared, on_stragglers)
        && cleared + on_stragglers != loaded
    {
        problems.push(format!(
            "crash.{prefix}_cleared ({cleared}) + {prefix}_on_stragglers ({on_stragglers}) is {}, \
             but {prefix}_loaded is {loaded}: a loaded {kind} was not cleared",
            cleared + on_stragglers
        ));
    }
    if rules.contexts_loaded && loaded == Some(0) {
        problems.push(format!(
            "crash.{prefix}_loaded is 0, but guests were running when the crash came"
        ));
    }
    if rules.before_vmx()
        && let Some(loaded) = loaded.filter(|&n| n > 0)
    {
        problems.push(format!(
            "crash.{prefix}_loaded is {loaded}, but the crash came before {} was enabled",
            if svm { "SVM" } else { "VMX" }
        ));
    }
    if svm {
        // No VMCS on SVM: a VMCS count there is a mistake.
        for (key, count) in [
            ("vmcs_loaded", &crash.vmcs_loaded),
            ("vmcs_cleared", &crash.vmcs_cleared),
        ] {
            if let Some(n) = count.value().filter(|&n| n > 0) {
                problems.push(format!("crash.{key} is {n} on SVM, where there is no VMCS"));
            }
        }
        if let (Some(off), Some(checked_in)) = (svm_off, checked_in)
            && off != checked_in
        {
            problems.push(format!(
                "crash.svm_off_cpus is {off}, expected {checked_in} (every CPU that checked in, \
                 EFER.SVME read back clear)"
            ));
        }
        if crash.coordinator_svm_off.value() != Some(true) {
            problems.push(format!(
                "crash.coordinator_svm_off is {}, expected true",
                show(&crash.coordinator_svm_off.raw())
            ));
        }
    }
    problems.extend(nmi_in_guest_problems(crash, rules, cpu_index));
    if let (Some(vmxoff), Some(checked_in)) = (vmxoff, checked_in)
        && vmxoff != checked_in
    {
        problems.push(format!(
            "crash.vmxoff_cpus is {vmxoff}, expected {checked_in} (every CPU that checked in)"
        ));
    }
    if crash.coordinator_vmx_off.value() != Some(true) {
        problems.push(format!(
            "crash.coordinator_vmx_off is {}, expected true",
            show(&crash.coordinator_vmx_off.raw())
        ));
    }

    // Per-CPU NMI latency: one entry per CPU started.
    match crash.nmi_latency_us.get() {
        Some(latency) => {
            problems.extend(per_cpu_problems(
                "nmi_latency_us",
                latency,
                rules.cpus,
                Value::is_u64,
                "numbers and nulls",
            ));
            let mut silent: Vec<(u64, &str)> = straggler_indexes
                .iter()
                .map(|&index| (u64::from(index), "spins with NMIs blocked"))
                .collect();
            silent.extend(cpu_index.map(|index| (index, "is the coordinator")));
            for (index, why) in silent {
                if let Some(entry) = latency.get(index as usize)
                    && !entry.is_null()
                {
                    problems.push(format!(
                        "crash.nmi_latency_us[{index}] is {entry}, but that CPU {why}: expected null"
                    ));
                }
            }
        }
        None => problems.push(format!(
            "crash.nmi_latency_us is {}, expected a list",
            show(&crash.nmi_latency_us.raw())
        )),
    }
    problems.extend(super::accounting::problems(crash, rules.cpus, cpu_index));
    problems.extend(trigger::problems(report, rules, special, cpu_index));
    problems.extend(trigger::disturbance_problems(report, rules));
    problems
}

/// Whether a reported exception is the one the run asked for.
pub(crate) fn expected_exception(exception: &Exception, rules: &CrashRules) -> bool {
    trigger::expected_exception(exception, rules)
}

/// What is wrong with `nmi_in_guest` (per CPU: its crash NMI came as a
/// guest's exit; null when it took none) and its count, when reported.
fn nmi_in_guest_problems(
    crash: &Crash,
    rules: &CrashRules,
    coordinator: Option<u64>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(entries) = crash.nmi_in_guest.get() else {
        if !crash.nmi_in_guest.is_missing() {
            problems.push(format!(
                "crash.nmi_in_guest is {}, expected a list",
                show(&crash.nmi_in_guest.raw())
            ));
        }
        return problems;
    };
    problems.extend(per_cpu_problems(
        "nmi_in_guest",
        entries,
        rules.cpus,
        Value::is_boolean,
        "true, false and null",
    ));
    if let Some(index) = coordinator
        && entries
            .get(index as usize)
            .is_some_and(|entry| !entry.is_null())
    {
        problems.push(format!(
            "crash.nmi_in_guest[{index}] is {}, but that CPU is the coordinator: expected null",
            entries[index as usize]
        ));
    }
    let counted = entries
        .iter()
        .filter(|entry| entry.as_bool() == Some(true))
        .count() as u64;
    match crash.nmi_in_guest_cpus.value() {
        Some(n) if n != counted => problems.push(format!(
            "crash.nmi_in_guest_cpus is {n}, but nmi_in_guest has {counted} true entries"
        )),
        None => problems.push(format!(
            "crash.nmi_in_guest_cpus is {}, expected a number",
            show(&crash.nmi_in_guest_cpus.raw())
        )),
        _ => {}
    }
    problems
}

/// What is wrong with the per-CPU list `crash.KEY`: one entry per CPU
/// started, each null or of the kind `fits` accepts (`kinds` names them).
fn per_cpu_problems(
    key: &str,
    entries: &[Value],
    cpus: u32,
    fits: fn(&Value) -> bool,
    kinds: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    if entries.len() != cpus as usize {
        problems.push(format!(
            "crash.{key} has {} entries, expected {cpus} (one per CPU started)",
            entries.len(),
        ));
    }
    if entries.iter().any(|entry| !entry.is_null() && !fits(entry)) {
        problems.push(format!("crash.{key} holds something other than {kinds}"));
    }
    problems
}

/// The decimal number a text starts with.
fn leading_number(text: &str) -> Option<u64> {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `3`, `3 or 4`, `1, 2 or 3`.
fn join_or(items: &[u32]) -> String {
    let texts: Vec<String> = items.iter().map(u32::to_string).collect();
    match texts.split_last() {
        None => "none".to_owned(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::Null => "missing".to_owned(),
        other => other.to_string(),
    }
}

fn show_opt(value: Option<u64>) -> String {
    value.map_or_else(|| "?".to_owned(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::run::{End, ExitConvention, QEMU_EXIT_CRASH, QEMU_EXIT_SUCCESS, judge};
    use crate::report::{Backend, Expectations};
    use serde_json::{Value, json};

    /// The `crash` line of a clean shootdown on `cpus` CPUs coordinated by
    /// `coordinator`, as hv printed it in Bochs (APIC ID == index).
    fn clean_crash(cpus: u64, coordinator: u64, reason: &str, loaded: u64) -> Value {
        let latency: Vec<Value> = (0..cpus)
            .map(|i| {
                if i == coordinator {
                    Value::Null
                } else {
                    json!(10 + i)
                }
            })
            .collect();
        json!({
            "cpu": coordinator, "cpu_index": coordinator, "reason": reason,
            "expected": cpus - 1, "checked_in": cpus - 1, "stragglers": [],
            "vmcs_loaded": loaded, "vmcs_cleared": loaded, "vmcs_visited": loaded,
            "vmcs_on_stragglers": 0, "vmxoff_cpus": cpus - 1, "coordinator_vmx_off": true,
            "shootdown_us": 154, "timed_out": false, "nmi_latency_us": latency,
        })
    }

    fn cpus_line(cpus: u64) -> Value {
        json!({"possible": cpus, "online": cpus, "failed": [], "attempted": cpus,
               "apic_ids": (0..cpus).collect::<Vec<_>>()})
    }

    fn injected(cpu: u64, what: &str) -> String {
        format!("panic: injected crash on CPU {cpu} ({what})")
    }

    fn bochs(words: &[&str]) -> Expectations {
        Expectations::from_cmdline(8, words).with_virt(Backend::Vmx)
    }

    /// Everything wrong with a Bochs run (exit status meaningless).
    fn bochs_problems(report: &Value, words: &[&str]) -> Option<String> {
        judge(
            report,
            &bochs(words),
            End::Exited(Some(1)),
            ExitConvention::Meaningless,
        )
        .reason
    }

    fn qemu_problems(report: &Value, words: &[&str], status: i32) -> Option<String> {
        judge(
            report,
            &Expectations::from_cmdline(8, words),
            End::Exited(Some(status)),
            ExitConvention::QemuDebugExit,
        )
        .reason
    }

    #[test]
    fn a_clean_crash_during_the_guest_run_is_ok_without_done_or_cpus() {
        // As in Bochs: the crash comes before the boot report, the panic
        // line is there (or lost to interleaving: both are fine).
        let mut report = json!({"crash": clean_crash(8, 3, &injected(3, "after_ms elapsed"), 16)});
        let words = ["crash=cpu:3,after_ms:20"];
        assert_eq!(bochs_problems(&report, &words), None);
        report["panic"] =
            json!({"message": "injected crash on CPU 3 (after_ms elapsed)", "cpu": 3});
        assert_eq!(bochs_problems(&report, &words), None);
        for (word, what) in [
            ("crash=cpu:3,after_ms:20,point:list_add0", "add-claim"),
            (
                "crash=cpu:3,after_ms:20,point:vmclear_unlink",
                "unload-vmclear",
            ),
        ] {
            let report = json!({"crash": clean_crash(8, 3, &injected(3, what), 15)});
            assert_eq!(bochs_problems(&report, &[word]), None, "{word}");
        }
    }

    #[test]
    fn a_qemu_crash_run_must_end_with_the_crash_code() {
        let report = json!({
            "cpus": cpus_line(8),
            "virt": {"backend": "none", "reason": "the CPU has no VMX"},
            "crash": clean_crash(8, 0, &injected(0, "after_ms elapsed"), 0),
        });
        let words = ["crash=cpu:0,after_ms:5"];
        assert_eq!(qemu_problems(&report, &words, QEMU_EXIT_CRASH), None);
        assert_eq!(
            qemu_problems(&report, &words, QEMU_EXIT_SUCCESS).as_deref(),
            Some(
                "hv ended QEMU with its success code (status 0x21), not its crash-handled code 0x25"
            )
        );
        assert_eq!(
            qemu_problems(&report, &words, 0).as_deref(),
            Some("QEMU exited with status 0 (0x0), not hv's crash-handled code 0x25")
        );
    }

    #[test]
    fn a_crash_nobody_asked_for_fails_the_run() {
        let mut report = json!({
            "cpus": cpus_line(8),
            "virt": {"backend": "none", "reason": "the CPU has no VMX"},
            "crash": clean_crash(8, 2, "fatal exception page fault (vector 14)", 0),
        });
        let reason = qemu_problems(&report, &[], QEMU_EXIT_CRASH).unwrap();
        assert_eq!(
            reason,
            "no `done` report; hv went through its crash path on cpu 2: \
             fatal exception page fault (vector 14); \
             hv ended QEMU with its crash-handled code (status 0x25)"
        );
        report["panic"] = json!({"message": "injected crash on CPU 2 (x)", "cpu": 2});
        let reason = qemu_problems(&report, &[], QEMU_EXIT_CRASH).unwrap();
        assert!(
            reason.starts_with(
                "hv panicked on cpu 2: injected crash on CPU 2 (x); no `done` report; hv ended"
            ),
            "{reason}"
        );
    }

    #[test]
    fn done_instead_of_the_crash_says_the_point_never_fired() {
        let report = json!({
            "cpus": cpus_line(8),
            "virt": {"backend": "none", "reason": "the CPU has no VMX"},
            "crash_injection": {"fired": false},
            "done": true,
        });
        let reason = qemu_problems(
            &report,
            &["crash=cpu:1,after_ms:3,point:list_add0"],
            QEMU_EXIT_SUCCESS,
        )
        .unwrap();
        assert_eq!(
            reason,
            "hv reported `done`: the crash asked for (crash=cpu:1,after_ms:3,point:list_add0) \
             did not happen (point list_add0 never fired: crash_injection.fired is false); \
             no `crash` report (asked for: crash=cpu:1,after_ms:3,point:list_add0); \
             hv ended QEMU with its success code (status 0x21), not its crash-handled code 0x25"
        );
        let missing =
            qemu_problems(&report, &["crash=cpu:9,after_ms:3"], QEMU_EXIT_SUCCESS).unwrap();
        assert!(
            missing.contains("(CPU index 9 is not among the 8 CPUs started)"),
            "{missing}"
        );
    }

    #[test]
    fn a_broken_shootdown_is_named_invariant_by_invariant() {
        let words = ["crash=cpu:3,after_ms:20"];
        let good = clean_crash(8, 3, &injected(3, "after_ms elapsed"), 16);
        let cases: [(&str, Value, &str); 6] = [
            (
                "checked_in",
                json!(6),
                "crash.checked_in is 6, expected 7 (expected 7 minus 0 straggler(s)); \
                 crash.vmxoff_cpus is 7, expected 6 (every CPU that checked in)",
            ),
            (
                "vmcs_cleared",
                json!(15),
                "crash.vmcs_cleared (15) + vmcs_on_stragglers (0) is 15, but vmcs_loaded is 16: \
                 a loaded VMCS was not cleared",
            ),
            (
                "vmxoff_cpus",
                json!(5),
                "crash.vmxoff_cpus is 5, expected 7 (every CPU that checked in)",
            ),
            (
                "coordinator_vmx_off",
                json!(false),
                "crash.coordinator_vmx_off is false, expected true",
            ),
            (
                "expected",
                json!(6),
                "crash.expected is 6, expected 7 (every online CPU but the coordinator); \
                 crash.checked_in is 7, expected 6 (expected 6 minus 0 straggler(s))",
            ),
            (
                "stragglers",
                json!([4]),
                "crash.stragglers is [4], expected [] (every CPU must check in); \
                 crash.timed_out is false with 1 straggler(s): the rendezvous times out \
                 exactly when a CPU does not check in; \
                 crash.checked_in is 7, expected 6 (expected 7 minus 1 straggler(s))",
            ),
        ];
        for (key, value, wanted) in cases {
            let mut crash = good.clone();
            crash[key] = value;
            let reason = bochs_problems(&json!({"crash": crash}), &words);
            assert_eq!(reason.as_deref(), Some(wanted), "{key}");
        }
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("vmcs_loaded");
        let reason = bochs_problems(&json!({"crash": missing}), &words).unwrap();
        assert!(
            reason.starts_with("crash.vmcs_loaded is missing, expected a number"),
            "{reason}"
        );
    }

    #[test]
    fn the_coordinator_and_its_reason_must_be_the_cpu_made_to_panic() {
        let words = ["crash=cpu:3,after_ms:20"];
        let wrong = clean_crash(8, 4, &injected(4, "after_ms elapsed"), 16);
        assert_eq!(
            bochs_problems(&json!({"crash": wrong}), &words).as_deref(),
            Some("crash.cpu_index is 4, expected 3 (the CPU made to panic)")
        );
        let mut reason = clean_crash(8, 3, "panic: index out of bounds", 16);
        let text = bochs_problems(&json!({"crash": reason.clone()}), &words).unwrap();
        assert_eq!(
            text,
            "crash.reason is \"panic: index out of bounds\", expected \
             \"panic: injected crash on CPU 3 (...)\""
        );
        reason["reason"] = json!(injected(31, "x"));
        assert!(bochs_problems(&json!({"crash": reason}), &words).is_some());
        // The APIC ID must be the coordinator's, when the report maps them.
        let mut apic = clean_crash(8, 3, &injected(3, "after_ms elapsed"), 16);
        apic["cpu"] = json!(9);
        let report = json!({"cpus": cpus_line(8), "crash": apic});
        assert_eq!(
            bochs_problems(&report, &words).as_deref(),
            Some("crash.cpu is APIC ID 9, but CPU index 3 has APIC ID 3")
        );
        // A panic that is not the injected one fails the run.
        let report = json!({
            "crash": clean_crash(8, 3, &injected(3, "after_ms elapsed"), 16),
            "panic": {"message": "attempt to add with overflow", "cpu": 5},
        });
        assert_eq!(
            bochs_problems(&report, &words).as_deref(),
            Some("hv panicked on cpu 5: attempt to add with overflow")
        );
    }

    #[test]
    fn the_nmi_blocked_cpu_is_the_one_straggler_and_cpu_0_or_1_coordinates() {
        let words = [
            "crash=cpu:5,after_ms:10,point:nmi_blocked",
            "crash_timeout_ms=500",
        ];
        let mut crash = clean_crash(8, 0, &injected(0, "after_ms elapsed"), 16);
        crash["stragglers"] = json!([5]);
        crash["checked_in"] = json!(6);
        crash["vmxoff_cpus"] = json!(6);
        crash["vmcs_cleared"] = json!(14);
        crash["vmcs_on_stragglers"] = json!(2);
        crash["timed_out"] = json!(true);
        crash["shootdown_us"] = json!(500_070);
        crash["nmi_latency_us"][5] = Value::Null;
        let report = |crash: &Value| json!({"cpus": cpus_line(8), "crash": crash});
        assert_eq!(bochs_problems(&report(&crash), &words), None);

        let mut early = crash.clone();
        early["shootdown_us"] = json!(499_000);
        assert_eq!(
            bochs_problems(&report(&early), &words).as_deref(),
            Some(
                "crash.shootdown_us is 499000, but the rendezvous timed out: it waits \
                 crash_timeout_ms=500 first"
            )
        );
        let mut answered = crash.clone();
        answered["nmi_latency_us"][5] = json!(30);
        assert_eq!(
            bochs_problems(&report(&answered), &words).as_deref(),
            Some(
                "crash.nmi_latency_us[5] is 30, but that CPU spins with NMIs blocked: expected null"
            )
        );
        let mut nobody = crash.clone();
        nobody["stragglers"] = json!([]);
        nobody["checked_in"] = json!(7);
        nobody["vmxoff_cpus"] = json!(7);
        nobody["timed_out"] = json!(false);
        let reason = bochs_problems(&report(&nobody), &words).unwrap();
        assert!(
            reason.starts_with(
                "crash.stragglers is [], expected [5] (CPU index 5 spins with NMIs blocked)"
            ),
            "{reason}"
        );
        // Without the CPU list there is no telling the APIC ID.
        let reason = bochs_problems(&json!({"crash": crash.clone()}), &words).unwrap();
        assert!(
            reason.starts_with("cannot tell the APIC ID of CPU index 5"),
            "{reason}"
        );

        // The spinning CPU is 0: CPU 1 coordinates.
        let words = ["crash=cpu:0,after_ms:10,point:nmi_blocked"];
        let mut zero = clean_crash(8, 1, &injected(1, "after_ms elapsed"), 16);
        zero["stragglers"] = json!([0]);
        zero["checked_in"] = json!(6);
        zero["vmxoff_cpus"] = json!(6);
        zero["timed_out"] = json!(true);
        zero["shootdown_us"] = json!(1_000_100);
        zero["nmi_latency_us"][0] = Value::Null;
        assert_eq!(bochs_problems(&report(&zero), &words), None);
        zero["cpu_index"] = json!(0);
        zero["cpu"] = json!(0);
        let reason = bochs_problems(&report(&zero), &words).unwrap();
        assert!(
            reason.starts_with("crash.cpu_index is 0, expected 1 (the CPU made to panic)"),
            "{reason}"
        );
    }

    #[test]
    fn either_cpu_of_a_double_panic_may_coordinate() {
        let words = ["crash=cpu:7,after_ms:10,point:double_panic"];
        for coordinator in [7, 0] {
            let report = json!({"crash": clean_crash(8, coordinator,
                &injected(coordinator, "after_ms elapsed"), 16)});
            assert_eq!(bochs_problems(&report, &words), None, "{coordinator}");
        }
        let report = json!({
            "crash": clean_crash(8, 7, &injected(7, "after_ms elapsed"), 16),
            "panic": {"message": "injected crash on CPU 0 (after_ms elapsed)", "cpu": 0},
        });
        assert_eq!(bochs_problems(&report, &words), None);
        let report = json!({"crash": clean_crash(8, 1, &injected(1, "after_ms elapsed"), 16)});
        assert_eq!(
            bochs_problems(&report, &words).as_deref(),
            Some("crash.cpu_index is 1, expected 7 or 0 (the CPUs made to panic)")
        );
    }

    /// The `crash` line of a clean shootdown on SVM (QEMU TCG `-cpu max`):
    /// VMCBs instead of VMCSes, every CPU out of SVM, `in_guest` CPUs
    /// found in guest mode.
    fn clean_svm_crash(cpus: u64, coordinator: u64, loaded: u64, in_guest: &[u64]) -> Value {
        let mut crash = clean_crash(
            cpus,
            coordinator,
            &injected(coordinator, "after_ms elapsed"),
            0,
        );
        let nmi_in_guest: Vec<Value> = (0..cpus)
            .map(|i| {
                if i == coordinator {
                    Value::Null
                } else {
                    json!(in_guest.contains(&i))
                }
            })
            .collect();
        for (key, value) in [
            ("backend", json!("svm")),
            ("vmcb_loaded", json!(loaded)),
            ("vmcb_cleared", json!(loaded)),
            ("vmcb_visited", json!(loaded)),
            ("vmcb_on_stragglers", json!(0)),
            ("svm_off_cpus", json!(cpus - 1)),
            ("coordinator_svm_off", json!(true)),
            ("nmi_in_guest_cpus", json!(in_guest.len())),
            ("nmi_in_guest", json!(nmi_in_guest)),
        ] {
            crash[key] = value;
        }
        crash
    }

    fn tcg_problems(report: &Value, words: &[&str]) -> Option<String> {
        judge(
            report,
            &Expectations::from_cmdline(8, words).with_virt(Backend::Svm),
            End::Exited(Some(QEMU_EXIT_CRASH)),
            ExitConvention::QemuDebugExit,
        )
        .reason
    }

    #[test]
    fn on_svm_the_vmcbs_are_accounted_and_every_cpu_is_out_of_svm() {
        let words = ["crash=cpu:1,after_ms:200"];
        let report = json!({"crash": clean_svm_crash(8, 1, 16, &[2, 5])});
        assert_eq!(tcg_problems(&report, &words), None);

        let mut lost = report.clone();
        lost["crash"]["vmcb_cleared"] = json!(15);
        assert_eq!(
            tcg_problems(&lost, &words).as_deref(),
            Some(
                "crash.vmcb_cleared (15) + vmcb_on_stragglers (0) is 15, but vmcb_loaded is 16: \
                 a loaded VMCB was not cleared"
            )
        );
        let mut none = report.clone();
        none["crash"]["vmcb_loaded"] = json!(0);
        none["crash"]["vmcb_cleared"] = json!(0);
        assert_eq!(
            tcg_problems(&none, &words).as_deref(),
            Some("crash.vmcb_loaded is 0, but guests were running when the crash came")
        );
        let mut still_on = report.clone();
        still_on["crash"]["svm_off_cpus"] = json!(6);
        still_on["crash"]["coordinator_svm_off"] = json!(false);
        assert_eq!(
            tcg_problems(&still_on, &words).as_deref(),
            Some(
                "crash.svm_off_cpus is 6, expected 7 (every CPU that checked in, EFER.SVME read \
                 back clear); crash.coordinator_svm_off is false, expected true"
            )
        );
        let mut vmcs = report.clone();
        vmcs["crash"]["vmcs_loaded"] = json!(3);
        assert_eq!(
            tcg_problems(&vmcs, &words).as_deref(),
            Some("crash.vmcs_loaded is 3 on SVM, where there is no VMCS")
        );
    }

    #[test]
    fn the_cpus_found_in_guest_mode_are_listed_per_cpu_and_counted() {
        let words = ["crash=cpu:1,after_ms:200"];
        let mut miscounted = json!({"crash": clean_svm_crash(8, 1, 16, &[2, 5])});
        miscounted["crash"]["nmi_in_guest_cpus"] = json!(3);
        assert_eq!(
            tcg_problems(&miscounted, &words).as_deref(),
            Some("crash.nmi_in_guest_cpus is 3, but nmi_in_guest has 2 true entries")
        );
        let mut short = json!({"crash": clean_svm_crash(8, 1, 16, &[])});
        short["crash"]["nmi_in_guest"] = json!([false, null]);
        assert_eq!(
            tcg_problems(&short, &words).as_deref(),
            Some("crash.nmi_in_guest has 2 entries, expected 8 (one per CPU started)")
        );
        let mut coordinator = json!({"crash": clean_svm_crash(8, 1, 16, &[])});
        coordinator["crash"]["nmi_in_guest"][1] = json!(false);
        assert_eq!(
            tcg_problems(&coordinator, &words).as_deref(),
            Some("crash.nmi_in_guest[1] is false, but that CPU is the coordinator: expected null")
        );
    }

    #[test]
    fn vmcs_loaded_must_be_positive_only_when_guests_ran() {
        let during = ["crash=cpu:3,after_ms:20"];
        let report = json!({"crash": clean_crash(8, 3, &injected(3, "after_ms elapsed"), 0)});
        assert_eq!(
            bochs_problems(&report, &during).as_deref(),
            Some("crash.vmcs_loaded is 0, but guests were running when the crash came")
        );
        // After the guest run too: the guests run on until the crash.
        assert_eq!(
            bochs_problems(&report, &["crash=cpu:3,after_ms:150"]).as_deref(),
            Some("crash.vmcs_loaded is 0, but guests were running when the crash came")
        );
        // Before VMX, and where no platform is known to run guests: none
        // required.
        assert_eq!(
            qemu_problems(&report, &["crash=cpu:3,after_ms:20"], QEMU_EXIT_CRASH),
            None
        );
        let before = json!({"crash": clean_crash(8, 3, &injected(3, "after_ms elapsed"), 0)});
        assert_eq!(
            bochs_problems(&before, &["crash=cpu:3,after_ms:0,point:before_vmx"]),
            None
        );
        // Before VMX nothing can be loaded.
        let loaded = json!({"crash": clean_crash(8, 3, &injected(3, "boot stage"), 2)});
        assert_eq!(
            bochs_problems(&loaded, &["crash=cpu:3,point:bringup"]).as_deref(),
            Some("crash.vmcs_loaded is 2, but the crash came before VMX was enabled")
        );
    }

    #[test]
    fn a_crash_during_bringup_expects_only_the_cpus_online_by_then() {
        let words = ["crash=cpu:3,after_ms:0,point:bringup"];
        let mut crash = clean_crash(8, 3, &injected(3, "boot stage"), 0);
        for (expected, ok) in [(7, true), (5, true), (1, true), (0, false), (8, false)] {
            crash["expected"] = json!(expected);
            crash["checked_in"] = json!(expected);
            crash["vmxoff_cpus"] = json!(expected);
            let reason = bochs_problems(&json!({"crash": crash.clone()}), &words);
            assert_eq!(reason.is_none(), ok, "expected {expected}: {reason:?}");
            if !ok {
                assert!(reason.unwrap().starts_with(&format!(
                    "crash.expected is {expected}, expected 1 to 7 (the CPUs online during \
                         bring-up, but the panicking AP)"
                )));
            }
        }
    }

    #[test]
    fn the_crash_hypercall_is_expected_only_where_guests_run() {
        let words = ["crash_hypercall=allow", "guest_crash_call=5"];
        let report = json!({"crash": clean_crash(8, 2, "crash hypercall from vCPU 5", 16)});
        assert_eq!(bochs_problems(&report, &words), None);
        let other = json!({"crash": clean_crash(8, 2, "crash hypercall from vCPU 4", 16)});
        assert_eq!(
            bochs_problems(&other, &words).as_deref(),
            Some(
                "crash.reason is \"crash hypercall from vCPU 4\", expected \
                 \"crash hypercall from vCPU 5\""
            )
        );
        // Denied (the default), or without VMX: a normal run.
        assert!(
            Expectations::from_cmdline(8, &["guest_crash_call=5"])
                .crash_rules(Some("vmx"))
                .is_none()
        );
        let tcg = json!({
            "cpus": cpus_line(8),
            "virt": {"backend": "none", "reason": "the CPU has no VMX"},
            "done": true,
        });
        assert_eq!(qemu_problems(&tcg, &words, QEMU_EXIT_SUCCESS), None);
        // A panic is not the hypercall.
        let report = json!({
            "crash": clean_crash(8, 2, "panic: injected crash on CPU 2 (x)", 16),
            "panic": {"message": "injected crash on CPU 2 (x)", "cpu": 2},
        });
        let reason = bochs_problems(&report, &words).unwrap();
        assert!(reason.starts_with("hv panicked on cpu 2"), "{reason}");
    }

    #[test]
    fn nmi_latency_has_one_entry_per_cpu_and_none_for_the_coordinator() {
        let words = ["crash=cpu:3,after_ms:20"];
        let mut crash = clean_crash(8, 3, &injected(3, "after_ms elapsed"), 16);
        crash["nmi_latency_us"][3] = json!(1);
        assert_eq!(
            bochs_problems(&json!({"crash": crash.clone()}), &words).as_deref(),
            Some("crash.nmi_latency_us[3] is 1, but that CPU is the coordinator: expected null")
        );
        crash["nmi_latency_us"] = json!([null, 1, 2]);
        assert_eq!(
            bochs_problems(&json!({"crash": crash}), &words).as_deref(),
            Some("crash.nmi_latency_us has 3 entries, expected 8 (one per CPU started)")
        );
    }

    #[test]
    fn a_timeout_during_a_crash_run_is_named() {
        let report = json!({"cpus": cpus_line(8), "virt": {"backend": "none", "reason": "no VMX"}});
        let reason = judge(
            &report,
            &Expectations::from_cmdline(8, &["crash=cpu:0,after_ms:3,point:nmi_blocked"]),
            End::TimedOut(std::time::Duration::from_secs(60)),
            ExitConvention::QemuDebugExit,
        )
        .reason
        .unwrap();
        assert_eq!(
            reason,
            "timed out after 60 s; no `crash` report \
             (asked for: crash=cpu:0,after_ms:3,point:nmi_blocked)"
        );
    }

    /// A QEMU crash report on 8 CPUs (APIC ID == index) coordinated by
    /// `coordinator` for `reason`, with the boot report before it.
    fn qemu_crash(coordinator: u64, reason: &str) -> Value {
        json!({
            "cpus": cpus_line(8),
            "virt": {"backend": "none", "reason": "the CPU has no VMX"},
            "crash": clean_crash(8, coordinator, reason, 0),
        })
    }

    #[test]
    fn a_lockup_names_the_hung_cpu_and_is_noticed_by_another() {
        let words = ["hang=cpu:3,after_ms:100,how:lock", "watchdog=1"];
        let mut report = qemu_crash(0, "lockup: CPU 3 (APIC ID 3) has not ticked for 1085 ms");
        report["crash"]["lockup_cpus"] = json!([3, 4]);
        assert_eq!(qemu_problems(&report, &words, QEMU_EXIT_CRASH), None);
        // The waiter may be named instead; only hung CPUs may be.
        report["crash"]["reason"] = json!("lockup: CPU 4 (APIC ID 4) has not ticked for 1001 ms");
        assert_eq!(qemu_problems(&report, &words, QEMU_EXIT_CRASH), None);
        report["crash"]["lockup_cpus"] = json!([4, 6]);
        assert_eq!(
            qemu_problems(&report, &words, QEMU_EXIT_CRASH).as_deref(),
            Some("crash.lockup_cpus names APIC ID 6, which was not hung (hung: [3, 4])")
        );
        let mut wrong = qemu_crash(3, "lockup: CPU 5 (APIC ID 5) has not ticked for 900 ms");
        wrong["crash"]["lockup_cpus"] = json!([5]);
        assert_eq!(
            qemu_problems(&wrong, &words, QEMU_EXIT_CRASH).as_deref(),
            Some(
                "the lockup names CPU 5, but hang= hangs CPU [3, 4]; the lockup says CPU 5 was \
                 silent 900 ms, less than watchdog=1 s; crash.lockup_cpus names APIC ID 5, \
                 which was not hung (hung: [3, 4]); crash.cpu_index is 3, a hung CPU: a CPU \
                 that noticed the lockup coordinates"
            )
        );
        // A panic instead of the lockup.
        let panic = qemu_crash(2, &injected(2, "x"));
        let reason = qemu_problems(&panic, &words, QEMU_EXIT_CRASH).unwrap();
        assert!(
            reason.starts_with(
                "crash.reason is \"panic: injected crash on CPU 2 (x)\", expected \"lockup: CPU N"
            ),
            "{reason}"
        );
        // Nothing to notice the hang: the run can only time out.
        let hung = json!({"cpus": cpus_line(8), "virt": {"backend": "none", "reason": "x"}});
        let reason = judge(
            &hung,
            &Expectations::from_cmdline(8, &["hang=cpu:3", "watchdog=0"]),
            End::TimedOut(std::time::Duration::from_secs(60)),
            ExitConvention::QemuDebugExit,
        )
        .reason
        .unwrap();
        assert_eq!(
            reason,
            "timed out after 60 s; no `done` report: hang= hangs a CPU and nothing notices \
             (watchdog=0 and no NMI button)"
        );
    }

    #[test]
    fn the_nmi_button_crashes_on_any_cpu_even_after_done() {
        let expect = Expectations::from_cmdline(8, &["finish=halt"]).with_nmi_button(true);
        let judge_button = |report: &Value| {
            judge(
                report,
                &expect,
                End::Exited(None),
                ExitConvention::Meaningless,
            )
            .reason
        };
        let mut report = qemu_crash(5, EXTERNAL_NMI_REASON);
        report["done"] = json!(true);
        assert_eq!(judge_button(&report), None);
        report["crash"]["reason"] = json!("panic: oops");
        assert_eq!(
            judge_button(&report).as_deref(),
            Some("crash.reason is \"panic: oops\", expected \"external NMI\" (the NMI button)")
        );
        // With a hang and the watchdog on, either may win.
        let expect =
            Expectations::from_cmdline(8, &["hang=cpu:3,after_ms:100"]).with_nmi_button(true);
        let mut lockup = qemu_crash(0, "lockup: CPU 3 (APIC ID 3) has not ticked for 10021 ms");
        lockup["crash"]["lockup_cpus"] = json!([3]);
        for report in [qemu_crash(3, EXTERNAL_NMI_REASON), lockup] {
            let verdict = judge(
                &report,
                &expect,
                End::Exited(Some(QEMU_EXIT_CRASH)),
                ExitConvention::QemuDebugExit,
            );
            assert_eq!(verdict.reason, None);
        }
        // A hung hv never says done.
        let mut done = qemu_crash(3, EXTERNAL_NMI_REASON);
        done["done"] = json!(true);
        let reason = judge(
            &done,
            &expect,
            End::Exited(Some(QEMU_EXIT_CRASH)),
            ExitConvention::QemuDebugExit,
        )
        .reason
        .unwrap();
        assert!(reason.starts_with("hv reported `done`"), "{reason}");
    }

    const EXTERNAL_NMI_REASON: &str = "external NMI";

    #[test]
    fn a_stray_write_faults_on_the_boot_cpu_inside_the_reservation() {
        let words = ["stray_write=reservation", "crashkernel=64M@0x10000000"];
        let mut report = qemu_crash(0, "fatal exception #PF page fault (vector 14)");
        report["crashkernel"] = json!({"base": 0x1000_0000u64, "size": 0x400_0000u64});
        report["exception"] = json!({"vector": 14, "name": "#PF page fault", "error_code": 3,
                                     "rip": 0x20_1000, "cr2": 0x1100_0000u64, "cpu": 0});
        assert_eq!(qemu_problems(&report, &words, QEMU_EXIT_CRASH), None);
        report["exception"]["cr2"] = json!(0x2000_0000u64);
        assert_eq!(
            qemu_problems(&report, &words, QEMU_EXIT_CRASH).as_deref(),
            Some(
                "the page fault's address 0x20000000 is outside the reservation \
                 [0x10000000, 0x14000000)"
            )
        );
        // Without the knob, the same fault fails the run.
        report["exception"]["cr2"] = json!(0x1100_0000u64);
        let reason = qemu_problems(&report, &[], QEMU_EXIT_CRASH).unwrap();
        assert!(
            reason.starts_with("fatal exception #PF page fault (vector 14) on cpu 0"),
            "{reason}"
        );
    }

    #[test]
    fn a_disturbed_crash_must_show_the_disturbance_and_survive_it() {
        let captured = |crash: Value, capture: Value| {
            json!({"cpus": cpus_line(8), "virt": {"backend": "none", "reason": "x"},
                   "crash": crash, "capture": capture})
        };
        let crash = clean_crash(8, 2, &injected(2, "after_ms elapsed"), 0);
        let jumped = |attempt: u64, stray: u64| {
            json!({"loaded": true, "kernel": "hv", "digest_ok": true, "jumped": true,
                   "attempt": attempt, "coordinator_stray_nmis": stray})
        };
        let problems = |report: &Value, point: &str| {
            qemu_problems(
                report,
                &[&format!("crash=cpu:2,after_ms:5,point:{point}")],
                QEMU_EXIT_CRASH,
            )
        };
        // handover_panic: the second attempt jumps.
        assert_eq!(
            problems(&captured(crash.clone(), jumped(2, 0)), "handover_panic"),
            None
        );
        assert_eq!(
            problems(&captured(crash.clone(), jumped(1, 0)), "handover_panic").as_deref(),
            Some(
                "capture.attempt is 1, expected 2 (the first hand-over panicked; the second \
                 must jump)"
            )
        );
        // Points of the hand-over without a capture kernel never fire.
        let none = json!({"cpus": cpus_line(8), "virt": {"backend": "none", "reason": "x"},
                          "crash": crash.clone()});
        assert_eq!(
            problems(&none, "nmi_in_digest").as_deref(),
            Some(
                "point:nmi_in_digest strikes inside the hand-over to a capture kernel, and hv \
                 loaded none: it never fired"
            )
        );
        // The purgatory counts the NMI it took.
        let mut purgatory = jumped(1, 0);
        purgatory["purgatory"] = json!({"entry_tsc": 1, "nmis_64": 1, "nmis_32": 0});
        assert_eq!(
            problems(
                &captured(crash.clone(), purgatory.clone()),
                "nmi_in_purgatory"
            ),
            None
        );
        purgatory["purgatory"]["nmis_64"] = json!(0);
        assert_eq!(
            problems(&captured(crash.clone(), purgatory), "nmi_in_purgatory").as_deref(),
            Some(
                "capture.purgatory.nmis_64 + nmis_32 is 0: the stray NMI never reached the purgatory"
            )
        );
        // The storm must reach the purgatory and the capture image's own
        // IDT, so that it spanned the way in between.
        let mut storm = jumped(1, 0);
        storm["purgatory"] = json!({"entry_tsc": 1, "nmis_64": 2, "nmis_32": 5});
        storm["stray_nmis"] = json!(40);
        assert_eq!(
            problems(&captured(crash.clone(), storm.clone()), "nmi_storm"),
            None
        );
        let mut short = storm.clone();
        short["stray_nmis"] = json!(0);
        assert_eq!(
            problems(&captured(crash.clone(), short), "nmi_storm").as_deref(),
            Some("capture.stray_nmis is 0: the storm never reached the capture image's own IDT")
        );
        let mut late = storm.clone();
        late["purgatory"]["nmis_64"] = json!(0);
        late["purgatory"]["nmis_32"] = json!(0);
        assert_eq!(
            problems(&captured(crash.clone(), late), "nmi_storm").as_deref(),
            Some("capture.purgatory.nmis_64 + nmis_32 is 0: the storm never reached the purgatory")
        );
        // The stray NMIs must have landed.
        assert_eq!(
            problems(&captured(crash.clone(), jumped(1, 1)), "nmi_in_header"),
            None
        );
        assert_eq!(
            problems(&captured(crash.clone(), jumped(1, 0)), "nmi_in_header").as_deref(),
            Some(
                "capture.coordinator_stray_nmis is 0: the stray NMI during the core header \
                 never reached the coordinator"
            )
        );
        let mut after = crash.clone();
        after["coordinator_stray_nmis"] = json!(0);
        assert_eq!(
            problems(&none_with(&after), "nmi_after_cleanup").as_deref(),
            Some(
                "crash.coordinator_stray_nmis is 0: the stray NMI after the coordinator's \
                 cleanup never reached it"
            )
        );
        after["coordinator_stray_nmis"] = json!(1);
        assert_eq!(problems(&none_with(&after), "nmi_after_cleanup"), None);
        let mut everyone = crash.clone();
        everyone["nested_nmis"] = json!(0);
        everyone["coordinator_stray_nmis"] = json!(0);
        assert!(problems(&none_with(&everyone), "external_nmi").is_some());
        everyone["nested_nmis"] = json!(6);
        assert_eq!(problems(&none_with(&everyone), "external_nmi"), None);
    }

    fn none_with(crash: &Value) -> Value {
        json!({"cpus": cpus_line(8), "virt": {"backend": "none", "reason": "x"}, "crash": crash})
    }

    #[test]
    fn the_vmx_accounting_joins_the_verdict() {
        let words = ["crash=cpu:3,after_ms:20"];
        let mut crash = clean_crash(8, 3, &injected(3, "after_ms elapsed"), 16);
        crash["vmxoff_executed"] = json!(7);
        crash["vmx_was_on_cpus"] = json!(8);
        assert_eq!(
            bochs_problems(&json!({"crash": crash}), &words).as_deref(),
            Some(
                "crash.vmxoff_executed is 7, but vmx_was_on_cpus is 8: a CPU with VMX on did \
                 not execute VMXOFF"
            )
        );
    }
}
