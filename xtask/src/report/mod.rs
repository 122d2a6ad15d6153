//! Reading the hypervisor's serial report (see `xtask/REPORT.md`).
//!
//! hv prints *report lines*: the marker `@hv ` and one JSON object, anywhere
//! on a line (GRUB's ANSI escapes may stand before it). The objects are
//! deep-merged in order into one report. A line with the marker whose JSON
//! does not parse is skipped but remembered, so that a garbled report shows
//! up in the run report instead of vanishing.

mod expect;
pub mod model;
mod summary;

pub use expect::{
    Backend, CrashKnobs, CrashRules, Expectations, ExpectedCrash, ExpectedSection, hung_cpus,
};
pub use summary::{summary, summary_in};
// The judge's entry for a run and its terms, where they were before the
// judging moved to [`crate::judge`].
pub use crate::judge::{
    EXTERNAL_NMI, End, ExitConvention, QEMU_EXIT_CRASH, QEMU_EXIT_FAILURE, QEMU_EXIT_SUCCESS,
    Verdict, judge,
};

use serde_json::{Map, Value};

/// What starts a report line: the marker and the opening brace of the object.
pub const MARKER: &str = "@hv {";

/// Keys of the run report that xtask fills in; hv never prints them.
pub const XTASK_KEYS: [&str; 6] = ["emulator", "boot", "ok", "reason", "serial_log", "xtask"];

/// The JSON object on a report line; `None` if the line has no marker.
pub fn parse_line(line: &str) -> Option<Result<Map<String, Value>, String>> {
    let start = line.find(MARKER)? + MARKER.len() - 1;
    // Parse one value and ignore whatever follows it (a stray escape
    // sequence or carriage return must not lose the report).
    let mut values = serde_json::Deserializer::from_str(&line[start..]).into_iter::<Value>();
    Some(match values.next() {
        Some(Ok(Value::Object(object))) => Ok(object),
        Some(Ok(other)) => Err(format!("expected a JSON object, found {other}")),
        Some(Err(error)) => Err(error.to_string()),
        None => Err("no JSON after the marker".to_owned()),
    })
}

/// Merges `update` into `base`: objects key by key, recursively; any other
/// value (number, string, array, null) replaces what was there.
pub fn deep_merge(base: &mut Value, update: Value) {
    match (base, update) {
        (Value::Object(base), Value::Object(update)) => {
            for (key, value) in update {
                match base.get_mut(&key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, update) => *base = update,
    }
}

/// A report line with the marker whose JSON could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedLine {
    /// 1-based line number in the serial log.
    pub line_number: usize,
    /// The line as received.
    pub text: String,
    /// Why it was rejected.
    pub error: String,
}

/// Collects the report from serial lines as they arrive.
#[derive(Debug)]
pub struct ReportCollector {
    report: Value,
    malformed: Vec<MalformedLine>,
    lines_seen: usize,
    report_lines: usize,
}

impl Default for ReportCollector {
    fn default() -> Self {
        Self {
            report: Value::Object(Map::new()),
            malformed: Vec::new(),
            lines_seen: 0,
            report_lines: 0,
        }
    }
}

impl ReportCollector {
    /// Takes the next serial line.
    pub fn feed_line(&mut self, line: &str) {
        self.lines_seen += 1;
        match parse_line(line) {
            None => {}
            Some(Ok(object)) => {
                self.report_lines += 1;
                deep_merge(&mut self.report, Value::Object(object));
            }
            Some(Err(error)) => self.malformed.push(MalformedLine {
                line_number: self.lines_seen,
                text: line.to_owned(),
                error,
            }),
        }
    }

    /// The report merged so far.
    pub fn report(&self) -> &Value {
        &self.report
    }

    /// The merged report, consuming the collector.
    pub fn into_report(self) -> Value {
        self.report
    }

    /// Report lines that were skipped.
    pub fn malformed(&self) -> &[MalformedLine] {
        &self.malformed
    }

    /// How many serial lines were read.
    pub fn lines_seen(&self) -> usize {
        self.lines_seen
    }

    /// How many report lines were merged.
    pub fn report_lines(&self) -> usize {
        self.report_lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn marker_is_found_after_ansi_escapes() {
        let line = "\x1b[0m\x1b[30m\x1b[47m\x1b[2J@hv {\"loader\":{\"protocol\":\"multiboot2\"}}";
        let object = parse_line(line).unwrap().unwrap();
        assert_eq!(
            Value::Object(object),
            json!({"loader":{"protocol":"multiboot2"}})
        );
    }

    #[test]
    fn trailing_bytes_after_the_object_are_ignored() {
        let object = parse_line("@hv {\"done\":true}\x1b[0m  ").unwrap().unwrap();
        assert_eq!(Value::Object(object), json!({"done": true}));
    }

    #[test]
    fn lines_without_the_marker_are_not_report_lines() {
        assert!(parse_line("hv: booting").is_none());
        assert!(parse_line("@hv done").is_none());
        assert!(parse_line("").is_none());
    }

    #[test]
    fn broken_json_is_an_error() {
        assert!(parse_line("@hv {broken").unwrap().is_err());
        assert!(parse_line("@hv {\"a\":").unwrap().is_err());
    }

    #[test]
    fn deep_merge_merges_objects_and_replaces_everything_else() {
        let mut base = json!({
            "cpus": {"possible": 4, "online": 1, "failed": [1, 2], "apic_ids": [0, 1, 2, 3]},
            "loader": {"protocol": "pvh"},
            "memory": 5,
        });
        deep_merge(
            &mut base,
            json!({
                "cpus": {"online": 4, "failed": []},
                "memory": {"regions": 3},
                "done": true,
            }),
        );
        assert_eq!(
            base,
            json!({
                "cpus": {"possible": 4, "online": 4, "failed": [], "apic_ids": [0, 1, 2, 3]},
                "loader": {"protocol": "pvh"},
                "memory": {"regions": 3},
                "done": true,
            })
        );
    }

    #[test]
    fn deep_merge_lets_null_and_scalars_replace_objects() {
        let mut base = json!({"acpi": {"error": "x", "madt": true}});
        deep_merge(&mut base, json!({"acpi": {"error": null}}));
        assert_eq!(base, json!({"acpi": {"error": null, "madt": true}}));
        deep_merge(&mut base, json!({"acpi": false}));
        assert_eq!(base, json!({"acpi": false}));
    }

    #[test]
    fn collector_merges_in_order_and_notes_malformed_lines() {
        let mut collector = ReportCollector::default();
        for line in [
            "GRUB loading...",
            "@hv {\"cpus\":{\"possible\":4,\"online\":1}}",
            "@hv {broken json",
            "\x1b[1m@hv {\"cpus\":{\"online\":4}}",
            "@hv [1,2]",
            "@hv {\"done\":true}",
        ] {
            collector.feed_line(line);
        }
        assert_eq!(
            collector.report(),
            &json!({"cpus": {"possible": 4, "online": 4}, "done": true})
        );
        assert_eq!(collector.report_lines(), 3);
        assert_eq!(collector.lines_seen(), 6);
        let malformed = collector.malformed();
        assert_eq!(malformed.len(), 1);
        assert_eq!(malformed[0].line_number, 3);
        assert_eq!(malformed[0].text, "@hv {broken json");
    }
}
