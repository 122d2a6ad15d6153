//! The few lines a person reads after a run.

use std::fmt::Write;

use serde_json::Value;

/// A short human summary of a finished run report: where it ran, what hv
/// found (CPUs, memory, loader, command-line errors) and the verdict.
pub fn summary(report: &Value) -> String {
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "  {label:<9}{text}");
    };
    let header = format!(
        "hv on {} (boot: {})",
        text(&report["emulator"]),
        text(&report["boot"])
    );

    let loader = &report["loader"];
    if !loader.is_null() {
        let name = loader["name"]
            .as_str()
            .map(|name| format!(" from {name}"))
            .unwrap_or_default();
        line("loader", format!("{}{name}", text(&loader["protocol"])));
    }
    let cpus = &report["cpus"];
    let failed = match cpus["failed"].as_array() {
        Some(list) if list.is_empty() => "none".to_owned(),
        Some(list) => list
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        None => "?".to_owned(),
    };
    if cpus.is_null() && report["crash"].is_object() {
        line(
            "cpus",
            "not reported: hv crashed before its boot report".to_owned(),
        );
    } else {
        line(
            "cpus",
            format!(
                "{} possible, {} online, failed: {failed}",
                text(&cpus["possible"]),
                text(&cpus["online"])
            ),
        );
    }
    if let Some(us) = report["bringup_us"].as_u64() {
        let mode = report["smp"]["apic_mode"]
            .as_str()
            .map(|mode| format!(" ({mode})"))
            .unwrap_or_default();
        line("bring-up", format!("{us} us{mode}"));
    }
    let virt = &report["virt"];
    match virt["backend"].as_str() {
        Some("none") => line("virt", format!("none: {}", text(&virt["reason"]))),
        Some(backend) => line(
            "virt",
            format!(
                "{backend}: {} vCPUs, {} VM exits, {} migrations, {} stopped",
                text(&virt["vcpus"]),
                text(&virt["vm_exits"]),
                text(&virt["migrations"]),
                text(&virt["stopped"])
            ),
        ),
        None => {}
    }
    let crash = &report["crash"];
    if crash.is_object() {
        line(
            "crash",
            format!(
                "CPU {} (APIC ID {}) coordinated: {}",
                text(&crash["cpu_index"]),
                text(&crash["cpu"]),
                text(&crash["reason"])
            ),
        );
        let stragglers = match crash["stragglers"].as_array() {
            Some(list) if list.is_empty() => "none".to_owned(),
            Some(list) => format!(
                "APIC ID {}",
                list.iter().map(text).collect::<Vec<_>>().join(", ")
            ),
            None => "?".to_owned(),
        };
        line(
            "check-in",
            format!(
                "{} of {} CPUs in {} us{}, stragglers: {stragglers}",
                text(&crash["checked_in"]),
                text(&crash["expected"]),
                text(&crash["shootdown_us"]),
                if crash["timed_out"] == Value::Bool(true) {
                    " (timed out)"
                } else {
                    ""
                }
            ),
        );
        line(
            "VMCS",
            format!(
                "{} loaded, {} cleared, {} on stragglers; VMXOFF on {} CPUs, coordinator {}",
                text(&crash["vmcs_loaded"]),
                text(&crash["vmcs_cleared"]),
                text(&crash["vmcs_on_stragglers"]),
                text(&crash["vmxoff_cpus"]),
                match crash["coordinator_vmx_off"].as_bool() {
                    Some(true) => "off",
                    Some(false) => "STILL IN VMX",
                    None => "?",
                }
            ),
        );
    }
    let memory = &report["memory"];
    line(
        "memory",
        match memory["usable_bytes"].as_u64() {
            Some(bytes) => format!(
                "{:.1} MiB usable in {} regions",
                bytes as f64 / (1024.0 * 1024.0),
                text(&memory["regions"])
            ),
            None => "?".to_owned(),
        },
    );
    if let Some(errors) = report["cmdline"]["errors"]
        .as_array()
        .filter(|e| !e.is_empty())
    {
        let list: Vec<String> = errors.iter().map(text).collect();
        line(
            "cmdline",
            format!("{} errors: {}", errors.len(), list.join("; ")),
        );
    }
    if let Some(malformed) = report["xtask"]["malformed_lines"]
        .as_array()
        .filter(|m| !m.is_empty())
    {
        line(
            "garbled",
            format!("{} report line(s) did not parse", malformed.len()),
        );
    }
    line(
        "verdict",
        if report["ok"] == Value::Bool(true) {
            "ok".to_owned()
        } else {
            format!("FAILED: {}", text(&report["reason"]))
        },
    );
    line("serial", text(&report["serial_log"]));
    format!("{header}\n{out}")
}

/// A JSON value as plain text: strings without quotes, absence as `?`.
fn text(value: &Value) -> String {
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

    #[test]
    fn summary_names_cpus_memory_and_verdict() {
        let report = json!({
            "emulator": "qemu-tcg", "boot": "direct",
            "loader": {"protocol": "pvh", "name": null},
            "cpus": {"possible": 4, "online": 3, "failed": [2]},
            "memory": {"regions": 5, "usable_bytes": 512 * 1024 * 1024},
            "bringup_us": 4861, "smp": {"apic_mode": "x2apic"},
            "virt": {"backend": "vmx", "vcpus": 16, "vm_exits": 27904, "migrations": 353,
                     "stopped": 0},
            "cmdline": {"errors": ["unknown option `bogus_option`"]},
            "ok": false, "reason": "cpus.possible is 4, expected 2",
            "serial_log": "/b/serial.log",
        });
        let text = summary(&report);
        assert!(
            text.starts_with("hv on qemu-tcg (boot: direct)\n"),
            "{text}"
        );
        assert!(text.contains("loader   pvh\n"), "{text}");
        assert!(text.contains("4 possible, 3 online, failed: 2"), "{text}");
        assert!(text.contains("512.0 MiB usable in 5 regions"), "{text}");
        assert!(text.contains("bring-up 4861 us (x2apic)\n"), "{text}");
        assert!(
            text.contains("virt     vmx: 16 vCPUs, 27904 VM exits, 353 migrations, 0 stopped"),
            "{text}"
        );
        assert!(
            text.contains("1 errors: unknown option `bogus_option`"),
            "{text}"
        );
        assert!(
            text.contains("FAILED: cpus.possible is 4, expected 2"),
            "{text}"
        );
        assert!(text.contains("serial   /b/serial.log"), "{text}");
    }

    #[test]
    fn a_crash_shows_coordinator_shootdown_and_vmcs() {
        let report = json!({
            "crash": {"cpu": 0, "cpu_index": 0, "reason": "panic: injected crash on CPU 0 (x)",
                      "expected": 7, "checked_in": 6, "stragglers": [5], "vmcs_loaded": 16,
                      "vmcs_cleared": 14, "vmcs_on_stragglers": 2, "vmxoff_cpus": 6,
                      "coordinator_vmx_off": true, "shootdown_us": 1000073, "timed_out": true},
            "ok": true,
        });
        let text = summary(&report);
        assert!(
            text.contains(
                "  crash    CPU 0 (APIC ID 0) coordinated: panic: injected crash on CPU 0 (x)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  check-in 6 of 7 CPUs in 1000073 us (timed out), stragglers: APIC ID 5\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "  VMCS     16 loaded, 14 cleared, 2 on stragglers; VMXOFF on 6 CPUs, coordinator off\n"
            ),
            "{text}"
        );
        assert!(text.contains("  cpus     not reported: hv crashed before its boot report\n"));
        assert!(!summary(&json!({})).contains("check-in"));
    }

    #[test]
    fn no_backend_shows_the_reason() {
        let text = summary(&json!({"virt": {"backend": "none", "reason": "the CPU has no VMX"}}));
        assert!(text.contains("virt     none: the CPU has no VMX"), "{text}");
    }

    #[test]
    fn an_empty_report_still_summarises() {
        let text = summary(&json!({"ok": false, "reason": "no `done` report"}));
        assert!(text.contains("? possible, ? online, failed: ?"), "{text}");
        assert!(text.contains("FAILED: no `done` report"), "{text}");
    }
}
