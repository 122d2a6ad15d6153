//! Judging one kvm-unit-tests guest from what hv reported of it (its
//! `guests` entry): passed, skipped, or failed and why.

use serde_json::Value;

use crate::kvm_unit_tests::Verdict;
use crate::report::model::{Field, Guest};

/// Turns a guest's report object into a verdict and reason.
pub fn guest(guest: &Value) -> (Verdict, String) {
    let guest: Field<Guest> = serde::Deserialize::deserialize(guest).unwrap_or_default();
    let guest = guest.or_empty();
    let text = |field: &Field<String>| field.as_str().unwrap_or("").to_owned();
    match guest.state.as_str() {
        Some("stopped") => {}
        Some("refused") => return (Verdict::Fail, format!("refused: {}", text(&guest.detail))),
        Some(other) => return (Verdict::Fail, format!("hv left it {other}")),
        None => return (Verdict::Fail, "no report from hv".to_owned()),
    }
    let summary = text(&guest.summary);
    match (guest.reason.as_str(), guest.verdict.as_str()) {
        (Some("exit"), Some("pass")) => (Verdict::Pass, summary),
        (Some("exit"), Some("skip")) => (Verdict::Skip, format!("the guest skipped: {summary}")),
        (Some("exit"), _) => {
            let failure = text(&guest.first_failure);
            let why = if failure.is_empty() { summary } else { failure };
            (
                Verdict::Fail,
                format!("{} ({why})", text(&guest.detail)).trim().to_owned(),
            )
        }
        (Some(reason), _) => (Verdict::Fail, format!("{reason}: {}", text(&guest.detail))),
        (None, _) => (Verdict::Fail, "no stop reason".to_owned()),
    }
}
