//! The run report's shape, held still: a host test that replays stored
//! serial logs of real runs through the same code a run uses (the report
//! collector, the judge, the run report's assembly and, for a capture run,
//! the capture's conclusion) and checks the report's full set of key paths
//! and value types against the set recorded when the fixture was added.
//!
//! The run report is a public interface (`xtask/REPORT.md`): lab automation
//! reads it. A field renamed, dropped, turned into another type or made
//! present where it used to be absent changes the shape and fails this
//! test. A new field fails it too: add it to `shape.txt` on purpose
//! (`XTASK_GOLDEN_WRITE=1 cargo test -p xtask golden` rewrites the files).
//!
//! Each fixture (`xtask/testdata/golden/<name>/`) is a real run's
//! `serial.log` and `run.json`, the inputs xtask had beside it (emulator,
//! boot, command line, exit, xtask's notes), taken from that run's report.
//! A capture run's dump is not kept (megabytes): the replay gives the
//! capture's conclusion a dump and a stream summary of its own, with the
//! shape real ones have.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::capture::CaptureKernel;
use crate::capture::judge::{self, Collected};
use crate::capture::stream::StreamSummary;
use crate::dump::DumpInfo;
use crate::report::{Backend, End, ExitConvention, Expectations, ReportCollector};
use crate::run::{Boot, Finished, RunOutcome, Watched, finish};

/// Every key path of `value` with the type of the value there, one
/// `path: type` string each; array elements are `path[]`.
pub(crate) fn shape(value: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk(value, "", &mut out);
    out
}

fn walk(value: &Value, path: &str, out: &mut BTreeSet<String>) {
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    out.insert(format!(
        "{}: {kind}",
        if path.is_empty() { "." } else { path }
    ));
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                let inner = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                walk(item, &inner, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk(item, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden")
}

/// Replays fixture `name`: its serial log through the collector, the judge
/// and the report's assembly, as the run that wrote it did.
fn replay(name: &str) -> Value {
    let dir = fixtures().join(name);
    let run: Value = serde_json::from_str(&fs::read_to_string(dir.join("run.json")).unwrap())
        .unwrap_or_else(|error| panic!("{name}/run.json: {error}"));
    let serial = fs::read(dir.join("serial.log")).unwrap();
    let serial_text = String::from_utf8_lossy(&serial).into_owned();
    let mut collector = ReportCollector::default();
    for line in serial_text.lines() {
        collector.feed_line(line);
    }

    let out = std::env::temp_dir().join(format!("xtask-golden-{}-{name}", std::process::id()));
    fs::create_dir_all(&out).unwrap();
    let serial_log = out.join("serial.log");
    fs::write(&serial_log, &serial).unwrap();

    let text = |key: &str| run[key].as_str().unwrap_or_default().to_owned();
    let emulator = text("emulator");
    let cmdline = text("cmdline");
    // The words xtask added to `finish=exit` (`cmdline::kernel_cmdline`).
    let words: Vec<String> = cmdline
        .split_whitespace()
        .skip_while(|word| *word == "finish=exit")
        .map(str::to_owned)
        .collect();
    let cpus = run["cpus"].as_u64().unwrap() as u32;
    let mut expect = Expectations::from_cmdline(cpus, &words)
        .with_nmi_button(run["xtask_keys"]["nmi_button"].is_object());
    if let Some(backend) = run["virt_backend"].as_str().and_then(Backend::parse) {
        expect = expect.with_virt(backend);
    }
    if let Some(mode) = run["apic_mode"].as_str() {
        expect = expect.with_apic_mode(if mode == "x2apic" { "x2apic" } else { "xapic" });
    }
    let stopped_by_xtask: Option<&'static str> = run["xtask_keys"]["stopped_by_xtask"]
        .as_str()
        .map(|why| &*Box::leak(why.to_owned().into_boxed_str()));
    let qemu = emulator.starts_with("qemu");
    let convention = if qemu && stopped_by_xtask.is_none() {
        ExitConvention::QemuDebugExit
    } else {
        ExitConvention::Meaningless
    };
    let end = if run["timed_out"] == true {
        End::TimedOut(Duration::from_secs(60))
    } else {
        End::Exited(run["exit_status"].as_i64().map(|s| s as i32))
    };
    let boot = match text("boot").as_str() {
        "direct" => Boot::Direct,
        "grub-bios" => Boot::GrubBios,
        _ => Boot::GrubUefi,
    };
    let strings = |key: &str| -> Vec<String> {
        run[key]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let elf = out.join("hv");
    let emulator_log = out.join("emulator.log");
    let mut outcome: RunOutcome = finish(Finished {
        emulator: &emulator,
        boot,
        elf: &elf,
        expect,
        convention,
        cmdline: &cmdline,
        run_dir: &out,
        serial_log: &serial_log,
        emulator_log: &emulator_log,
        console_log: &emulator_log,
        notes: strings("notes"),
        emulator_problems: strings("emulator_problems"),
        watched: Watched {
            end,
            elapsed: Duration::from_millis(12_340),
            collector,
            serial_bytes: serial.len(),
            stopped_by_xtask,
            pressed: None,
        },
        qemu: Some(run["xtask_keys"]["qemu"].clone()).filter(|qemu| !qemu.is_null()),
        nmi_button: serde_json::from_value(run["xtask_keys"]["nmi_button"].clone()).ok(),
    })
    .unwrap();

    if let Some(kernel) = run["capture"].as_str() {
        let kernel = match kernel {
            "hv" => CaptureKernel::Hv,
            _ => CaptureKernel::Linux,
        };
        let dump = out.join("vmcore");
        let collected = Collected {
            dump: Ok(DumpInfo {
                path: dump.clone(),
                file_bytes: 1 << 20,
                data_end: 1 << 20,
                cpus: Vec::new(),
                crash: None,
                segments: Vec::new(),
                other_notes: Vec::new(),
                image: None,
            }),
            stream: (kernel == CaptureKernel::Hv).then_some(StreamSummary {
                stream_offset: 0,
                total: 1 << 20,
                header_len: 4096,
                data_bytes: 1 << 19,
                zero_bytes: 1 << 19,
                uncovered_bytes: 0,
                records: 3,
            }),
            source: out.join("dump.stream"),
            filtered: None,
            parallel: None,
        };
        let times = [
            Some(Duration::from_millis(100)),
            Some(Duration::from_millis(300)),
        ];
        judge::conclude(
            &mut outcome,
            kernel,
            &words,
            &collected,
            &times,
            qemu,
            false,
        )
        .unwrap();
    }
    fs::remove_dir_all(&out).unwrap();
    outcome.report
}

/// The fixtures, each a real run (see `xtask/testdata/golden/README.md`).
const FIXTURES: [&str; 4] = ["qemu-plain", "qemu-crash", "qemu-capture-hv", "bochs"];

fn check_shape(name: &str, report: &Value) {
    let file = fixtures().join(name).join("shape.txt");
    let got: Vec<String> = shape(report).into_iter().collect();
    if std::env::var_os("XTASK_GOLDEN_WRITE").is_some() {
        fs::write(&file, got.join("\n") + "\n").unwrap();
        return;
    }
    let want: BTreeSet<String> = fs::read_to_string(&file)
        .unwrap_or_else(|error| panic!("{}: {error}", file.display()))
        .lines()
        .map(str::to_owned)
        .collect();
    let got: BTreeSet<String> = got.into_iter().collect();
    let lost: Vec<_> = want.difference(&got).collect();
    let new: Vec<_> = got.difference(&want).collect();
    assert!(
        lost.is_empty() && new.is_empty(),
        "{name}: the run report's shape changed\n  no longer there: {lost:?}\n  new: {new:?}"
    );
}

#[test]
fn replayed_runs_keep_the_report_shape() {
    for name in FIXTURES {
        check_shape(name, &replay(name));
    }
}

#[test]
fn the_kvm_unit_tests_report_keeps_its_shape() {
    use crate::kvm_unit_tests::{BootSection, EntryResult, Outcome, Verdict};
    let outcome = Outcome {
        results: vec![
            EntryResult {
                name: "tsc".to_owned(),
                qemu_tcg: "PASS".to_owned(),
                hv: Verdict::Pass,
                reason: "2 tests".to_owned(),
                seconds: 1.25,
                guest_ms: Some(120),
            },
            EntryResult {
                name: "tsc_adjust".to_owned(),
                qemu_tcg: "?".to_owned(),
                hv: Verdict::Fail,
                reason: "the hv run ended before the guest stopped".to_owned(),
                seconds: 0.0,
                guest_ms: None,
            },
        ],
        boots: vec![BootSection {
            entries: vec!["tsc".to_owned(), "tsc_adjust".to_owned()],
            run_dir: Some("/build/kvm-unit-tests-0".into()),
            ok: false,
            reason: Some("x".to_owned()),
        }],
    };
    check_shape("kvm-unit-tests", &outcome.report());
}

#[test]
fn shape_names_paths_and_types() {
    let value = json!({"a": {"b": [1, 2.5, null]}, "c": "x", "d": false});
    let got: Vec<String> = shape(&value).into_iter().collect();
    assert_eq!(
        got,
        [
            ".: object",
            "a.b: array",
            "a.b[]: float",
            "a.b[]: integer",
            "a.b[]: null",
            "a: object",
            "c: string",
            "d: bool",
        ]
    );
}

/// `xtask.expected` for command lines that reach each of its conditional
/// keys: (CPUs, command line, backend, NMI button, APIC mode).
/// One case of `xtask.expected`.
type ExpectedCase = (
    u32,
    &'static str,
    Option<Backend>,
    bool,
    Option<&'static str>,
);

const EXPECTED_CASES: [ExpectedCase; 7] = [
    (4, "", Some(Backend::Svm), false, None),
    (2, "", None, false, Some("x2apic")),
    (
        8,
        "crash=cpu:3,after_ms:5,point:nmi_blocked crash_timeout_ms=500",
        Some(Backend::Vmx),
        false,
        None,
    ),
    (
        4,
        "hang=cpu:2,after_ms:100,how:lock watchdog=2",
        Some(Backend::Svm),
        true,
        None,
    ),
    (4, "", Some(Backend::Svm), true, None),
    (4, "stray_write=reservation watchdog=0", None, false, None),
    (
        4,
        "crash_hypercall=allow guest_crash_call=1 ap_hang=2 max_cpus=3 guest_misbehave=1",
        Some(Backend::Vmx),
        false,
        None,
    ),
];

#[test]
fn xtask_expected_keeps_its_keys_and_values() {
    let got: Vec<Value> = EXPECTED_CASES
        .iter()
        .map(|&(cpus, cmdline, backend, button, mode)| {
            let words: Vec<&str> = cmdline.split_whitespace().collect();
            let mut expect = Expectations::from_cmdline(cpus, &words).with_nmi_button(button);
            if let Some(backend) = backend {
                expect = expect.with_virt(backend);
            }
            if mode.is_some() {
                expect = expect.with_apic_mode("x2apic");
            }
            json!({"cmdline": cmdline, "expected": expect.to_json()})
        })
        .collect();
    let file = fixtures().join("expected.json");
    if std::env::var_os("XTASK_GOLDEN_WRITE").is_some() {
        fs::write(&file, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        return;
    }
    let want: Vec<Value> = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(got, want);
}
