//! The crash report's VMX accounting, where hv reports it (issue 9): what
//! the old `vmxoff_cpus == checked_in` cannot tell, since it counts CPUs
//! out of VMX however they got there and so holds without any VMX.
//!
//! - `vmxoff_executed == vmx_was_on_cpus`: every CPU that had VMX on at the
//!   crash executed VMXOFF (without VMX both are 0);
//! - `vmcs_cleared_elsewhere == 0` and `vmcs_lost == 0`: no VMCS was
//!   cleared by a CPU other than the one its record says held it, none
//!   stayed uncleared on a CPU that checked in;
//! - per CPU index, for the coordinator and every CPU seen checked in
//!   (`checkin_us` not null):
//!   `vmclear_credits[i] == vmcs_loaded_per_cpu[i] + vmclear_repeats[i]`,
//!   the crash VMCLEARs that CPU executed itself
//!   match the VMCSes its records say it held, plus those its own unload
//!   had cleared already but not yet unlinked (VMCLEAR comes before the
//!   unlink, and the walk skips nothing); `vmclear_repeats` absent (older
//!   hv) counts as zeros.
//!
//! Reports without these fields (older hv) are judged as before.

use serde_json::Value;

use crate::report::model::{Crash, Field};

/// Everything wrong with the VMX accounting of `crash`, on a machine of
/// `cpus` CPUs coordinated by `coordinator`.
pub(crate) fn problems(crash: &Crash, cpus: u32, coordinator: Option<u64>) -> Vec<String> {
    let mut problems = Vec::new();
    if let (Some(executed), Some(was_on)) =
        (crash.vmxoff_executed.value(), crash.vmx_was_on_cpus.value())
        && executed != was_on
    {
        problems.push(format!(
            "crash.vmxoff_executed is {executed}, but vmx_was_on_cpus is {was_on}: a CPU with \
             VMX on did not execute VMXOFF"
        ));
    }
    for (key, count) in [
        ("vmcs_cleared_elsewhere", &crash.vmcs_cleared_elsewhere),
        ("vmcs_lost", &crash.vmcs_lost),
    ] {
        if let Some(count) = count.value().filter(|&n| n > 0) {
            problems.push(format!("crash.{key} is {count}, expected 0"));
        }
    }
    let list = |field: &Field<Vec<Value>>| -> Option<Vec<Option<u64>>> {
        Some(field.get()?.iter().map(Value::as_u64).collect())
    };
    let (Some(loaded), Some(credits)) = (
        list(&crash.vmcs_loaded_per_cpu),
        list(&crash.vmclear_credits),
    ) else {
        return problems;
    };
    for (key, values) in [
        ("vmcs_loaded_per_cpu", &loaded),
        ("vmclear_credits", &credits),
    ] {
        if values.len() != cpus as usize || values.iter().any(Option::is_none) {
            problems.push(format!(
                "crash.{key} has {} entries, expected {cpus} numbers (one per CPU started)",
                values.len()
            ));
            return problems;
        }
    }
    let repeats = list(&crash.vmclear_repeats).unwrap_or_else(|| vec![Some(0); cpus as usize]);
    if repeats.len() != cpus as usize || repeats.iter().any(Option::is_none) {
        problems.push(format!(
            "crash.vmclear_repeats has {} entries, expected {cpus} numbers (one per CPU started)",
            repeats.len()
        ));
        return problems;
    }
    let seen = list(&crash.checkin_us);
    let checked_in = |index: usize| {
        coordinator == Some(index as u64)
            || seen
                .as_ref()
                .is_some_and(|seen| seen.get(index).copied().flatten().is_some())
    };
    for index in (0..cpus as usize).filter(|&index| checked_in(index)) {
        let (held, cleared, repeated) = (
            loaded[index].unwrap_or(0),
            credits[index].unwrap_or(0),
            repeats[index].unwrap_or(0),
        );
        if held + repeated != cleared {
            problems.push(format!(
                "CPU {index} held {held} VMCS by its records, and executed {cleared} crash \
                 VMCLEARs of which {repeated} repeated an unload's (crash.vmcs_loaded_per_cpu, \
                 vmclear_credits, vmclear_repeats)"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// [`super::problems`] of a crash line as JSON.
    fn problems(crash: &Value, cpus: u32, coordinator: Option<u64>) -> Vec<String> {
        let crash: Crash = serde::Deserialize::deserialize(crash).unwrap();
        super::problems(&crash, cpus, coordinator)
    }

    fn bochs_crash() -> Value {
        json!({
            "vmxoff_executed": 8, "vmx_was_on_cpus": 8, "vmcs_cleared_elsewhere": 0,
            "vmcs_lost": 0, "vmcs_loaded_per_cpu": [2, 2, 2, 2, 2, 2, 2, 2],
            "vmclear_credits": [2, 2, 2, 2, 2, 2, 2, 2],
            "checkin_us": [10, 11, null, 13, 14, 15, 16, 17],
        })
    }

    #[test]
    fn clean_accounting_passes_and_old_reports_are_not_judged() {
        assert!(problems(&bochs_crash(), 8, Some(2)).is_empty());
        assert!(problems(&json!({"vmxoff_cpus": 7}), 8, Some(2)).is_empty());
        // No VMX: nothing on, nothing executed.
        let tcg = json!({"vmxoff_executed": 0, "vmx_was_on_cpus": 0,
                         "vmcs_loaded_per_cpu": [0, 0], "vmclear_credits": [0, 0]});
        assert!(problems(&tcg, 2, Some(0)).is_empty());
    }

    #[test]
    fn each_broken_count_is_named() {
        let mut crash = bochs_crash();
        crash["vmxoff_executed"] = json!(7);
        crash["vmcs_lost"] = json!(1);
        crash["vmclear_credits"][5] = json!(1);
        assert_eq!(
            problems(&crash, 8, Some(2)),
            [
                "crash.vmxoff_executed is 7, but vmx_was_on_cpus is 8: a CPU with VMX on did \
                 not execute VMXOFF",
                "crash.vmcs_lost is 1, expected 0",
                "CPU 5 held 2 VMCS by its records, and executed 1 crash VMCLEARs of which 0 \
                 repeated an unload's (crash.vmcs_loaded_per_cpu, vmclear_credits, \
                 vmclear_repeats)",
            ]
        );
        // The coordinator's own credits count; a straggler's do not.
        let mut crash = bochs_crash();
        crash["vmclear_credits"][2] = json!(0);
        assert_eq!(problems(&crash, 8, Some(2)).len(), 1);
        assert!(
            problems(&crash, 8, Some(3)).is_empty(),
            "CPU 2 never checked in"
        );
        // A crash between an unload's VMCLEAR and its unlink: the walk
        // clears that VMCS again, and says so.
        let mut between = bochs_crash();
        between["vmclear_credits"][7] = json!(3);
        assert_eq!(problems(&between, 8, Some(7)).len(), 1);
        between["vmclear_repeats"] = json!([0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(problems(&between, 8, Some(7)).is_empty());
        let mut short = bochs_crash();
        short["vmclear_credits"] = json!([2, 2]);
        assert_eq!(
            problems(&short, 8, Some(2)),
            ["crash.vmclear_credits has 2 entries, expected 8 numbers (one per CPU started)"]
        );
    }
}
