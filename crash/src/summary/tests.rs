use super::*;
use crate::svm::SvmStep;
use serde_json::{Value, json};

fn to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|word| word.to_le_bytes()).collect()
}

/// A 4-CPU VMX crash: CPU 1 coordinates, CPU 3 is a straggler, CPU 2 took
/// its NMI in guest mode; four VMCS records (one on the straggler, one
/// cleared by another CPU, one repeat).
fn vmx_block() -> Vec<u64> {
    let mut words = vec![0u64; MAX_WORDS];
    let mut writer = FactsWriter::new(&mut words[..], 4, 4);
    writer.scalars(
        &Scalars {
            coordinator: 1,
            coordinator_apic_id: 2,
            own_vmx: VmxExit::Left,
            backend: Backend::Vmx,
            shootdown_us: 1500,
            started_us: 10_000,
            started_tsc: 777,
            waiting_from_us: 20,
            entered_tsc: 700,
            nmis_sending_tsc: 780,
            nmis_out_tsc: 790,
            panic_to_nmis_us: 3,
            expected: 3,
            nmi_broadcast: true,
            words_in_mailbox: true,
            deferred: true,
            text_at: 42,
            ..Scalars::default()
        },
        b"panic: \"boom\" at x.rs:1",
    );
    let record = |vmx, observed| {
        Some(CpuRecord {
            vmx,
            visited: 2,
            observed_after_us: observed,
        })
    };
    writer.cpu(
        0,
        &CpuFacts {
            apic_id: 0,
            checked_in: true,
            record: record(VmxExit::Left, Some(100)),
            nmi_in_guest: Some(false),
            nmi_at_us: Some(10_050),
            ..CpuFacts::default()
        },
    );
    writer.cpu(
        1,
        &CpuFacts {
            apic_id: 2,
            record: record(VmxExit::Left, None),
            ..CpuFacts::default()
        },
    );
    writer.cpu(
        2,
        &CpuFacts {
            apic_id: 4,
            checked_in: true,
            record: record(VmxExit::StillOn(Fault::GeneralProtection), Some(300)),
            nmi_in_guest: Some(true),
            nmi_at_us: Some(10_070),
            ..CpuFacts::default()
        },
    );
    writer.cpu(
        3,
        &CpuFacts {
            apic_id: 6,
            straggler: true,
            not_online: Some((NotOnline::Init, true)),
            ..CpuFacts::default()
        },
    );
    let records = [
        (0x1000, Some(0), Some(0), None),
        (0x2000, Some(2), Some(0), None),
        (0x3000, Some(3), None, None),
        (0x4000, None, Some(2), Some(2)),
    ];
    for (index, (vmcs, loaded_on, cleared_by, repeated_by)) in records.into_iter().enumerate() {
        writer.record(
            index,
            &RecordFacts {
                vmcs,
                loaded_on,
                cleared_by,
                repeated_by,
            },
        );
    }
    let used = writer.finish();
    words.truncate(used);
    words
}

fn summary_of(bytes: &[u8]) -> (Vec<String>, Value) {
    let facts = Facts::parse(bytes).unwrap();
    let mut text = String::new();
    render(&facts, &mut text).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let report = lines
        .iter()
        .find_map(|line| line.strip_prefix("@hv "))
        .expect("a report line");
    let report: Value = serde_json::from_str(report).unwrap();
    (lines, report["crash"].clone())
}

#[test]
fn every_fact_reads_back_as_written() {
    let bytes = to_bytes(&vmx_block());
    let facts = Facts::parse(&bytes).unwrap();
    assert_eq!(facts.cpus(), 4);
    let scalars = facts.scalars();
    assert_eq!(scalars.coordinator, 1);
    assert_eq!(scalars.own_vmx, VmxExit::Left);
    assert!(scalars.nmi_broadcast && scalars.words_in_mailbox && scalars.deferred);
    assert_eq!(scalars.backend, Backend::Vmx);
    assert!(!scalars.lockup && !scalars.timed_out);
    assert_eq!(scalars.text_at, 42);
    assert_eq!(facts.reason(), (&b"panic: \"boom\" at x.rs:1"[..], false));
    let cpu2 = facts.cpu(2);
    assert_eq!(
        cpu2.record,
        Some(CpuRecord {
            vmx: VmxExit::StillOn(Fault::GeneralProtection),
            visited: 2,
            observed_after_us: Some(300),
        })
    );
    assert_eq!(cpu2.nmi_in_guest, Some(true));
    assert_eq!(facts.cpu(1).nmi_in_guest, None);
    assert_eq!(facts.cpu(3).not_online, Some((NotOnline::Init, true)));
    assert_eq!(facts.cpu(99), CpuFacts::default());
    assert_eq!(facts.record(3).repeated_by, Some(2));
    assert_eq!(facts.record(2).cleared_by, None);
}

#[test]
fn every_vmx_and_svm_exit_round_trips() {
    let vmx = [
        VmxExit::NotAttempted,
        VmxExit::WasOff,
        VmxExit::Left,
        VmxExit::LeftAfterInvalidOpcode,
        VmxExit::StillOn(Fault::InvalidOpcode),
        VmxExit::StillOn(Fault::GeneralProtection),
        VmxExit::StillOn(Fault::VmFail),
    ];
    for exit in vmx {
        assert_eq!(decode_vmx(encode_vmx(exit)), exit);
    }
    let svm = SvmExit::Failed {
        step: SvmStep::ClearSvme,
        fault: Some(Fault::GeneralProtection),
    };
    let mut words = vec![0u64; MAX_WORDS];
    let mut writer = FactsWriter::new(&mut words[..], 1, 0);
    writer.scalars(
        &Scalars {
            backend: Backend::Svm,
            own_svm: SvmExitCode(svm.encode()),
            ..Scalars::default()
        },
        b"",
    );
    writer.finish();
    let bytes = to_bytes(&words);
    assert_eq!(Facts::parse(&bytes).unwrap().scalars().own_svm.exit(), svm);
}

#[test]
fn the_summary_says_what_the_facts_say() {
    let (lines, crash) = summary_of(&to_bytes(&vmx_block()));
    // The VMCS CPU 0 cleared though CPU 2 held it is named.
    assert_eq!(
        lines[0],
        "*** hv: VMCS 0x2000 (record 1) loaded on CPU 2 by its record: ClearedElsewhere { by: 0 }"
    );
    assert_eq!(
        lines[1],
        "*** hv: shootdown: 2 of 3 CPUs checked in in 1500 us; VMCS loaded 3, cleared 2; \
         VMXOFF executed on 2 of 3 CPUs with VMX on; own VMX exit Left; NMI in guest mode on 1"
    );
    assert_eq!(crash["reason"], "panic: \"boom\" at x.rs:1");
    assert_eq!(crash["cpu"], 2);
    assert_eq!(crash["cpu_index"], 1);
    assert_eq!(crash["checked_in"], 2);
    assert_eq!(crash["stragglers"], json!([6]));
    assert_eq!(crash["backend"], "vmx");
    assert_eq!(crash["vmcs_loaded"], 3);
    assert_eq!(crash["vmcs_cleared"], 2);
    assert_eq!(crash["vmcs_on_stragglers"], 1);
    assert_eq!(crash["vmcs_cleared_elsewhere"], 1);
    assert_eq!(crash["vmcs_lost"], 0);
    // Visited: the other checked-in CPUs' walks (2 each), not the
    // coordinator's.
    assert_eq!(crash["vmcs_visited"], 4);
    assert_eq!(crash["vmcb_loaded"], 0);
    assert_eq!(crash["vmxoff_cpus"], 1);
    assert_eq!(crash["vmxoff_executed"], 2);
    assert_eq!(crash["vmx_was_on_cpus"], 3);
    assert_eq!(crash["coordinator_vmx_exit"], "vmxoff");
    assert_eq!(crash["nmi_in_guest"], json!([false, null, true, null]));
    assert_eq!(crash["vmcs_loaded_per_cpu"], json!([1, 0, 1, 1]));
    assert_eq!(crash["vmclear_credits"], json!([2, 0, 1, 0]));
    assert_eq!(crash["vmclear_repeats"], json!([0, 0, 1, 0]));
    assert_eq!(crash["vmcb_clear_credits"], json!([0, 0, 0, 0]));
    assert_eq!(crash["nmi_latency_us"], json!([50, null, 70, null]));
    assert_eq!(crash["checkin_us"], json!([120, null, 320, null]));
    assert_eq!(
        crash["not_online"],
        json!([{"apic_id": 6, "state": "starting", "action": "init"}])
    );
    assert_eq!(crash["words"], "mailbox");
    assert_eq!(crash["nmi_broadcast"], true);
    assert_eq!(crash["lockup_cpus"], json!([]));
    assert_eq!(crash["started_tsc"], 777);
    assert_eq!(crash["nmis_out_tsc"], 790);
}

#[test]
fn an_svm_summary_speaks_of_vmcbs_and_svm() {
    let mut words = vec![0u64; MAX_WORDS];
    let mut writer = FactsWriter::new(&mut words[..], 2, 1);
    writer.scalars(
        &Scalars {
            backend: Backend::Svm,
            own_svm: SvmExitCode(SvmExit::Left.encode()),
            expected: 1,
            lockup: true,
            ..Scalars::default()
        },
        b"lockup",
    );
    writer.cpu(
        1,
        &CpuFacts {
            apic_id: 1,
            checked_in: true,
            svm: SvmExitCode(SvmExit::Left.encode()),
            silent: true,
            record: Some(CpuRecord {
                vmx: VmxExit::WasOff,
                visited: 1,
                observed_after_us: Some(5),
            }),
            ..CpuFacts::default()
        },
    );
    writer.record(
        0,
        &RecordFacts {
            vmcs: 0x5000,
            loaded_on: Some(1),
            cleared_by: Some(1),
            repeated_by: None,
        },
    );
    writer.finish();
    let (lines, crash) = summary_of(&to_bytes(&words));
    assert_eq!(
        lines[0],
        "*** hv: shootdown: 1 of 1 CPUs checked in in 0 us; VMCB loaded 1, cleared 1; \
         SVM off on 1 of 1 others; own: SVM off; NMI in guest mode on 0"
    );
    assert_eq!(crash["backend"], "svm");
    assert_eq!(crash["vmcb_loaded"], 1);
    assert_eq!(crash["vmcb_visited"], 1);
    assert_eq!(crash["vmcs_loaded"], 0);
    assert_eq!(crash["vmcb_loaded_per_cpu"], json!([0, 1]));
    assert_eq!(crash["vmcs_loaded_per_cpu"], json!([0, 0]));
    assert_eq!(crash["svm_off_cpus"], 1);
    assert_eq!(crash["svm_was_on_cpus"], 1);
    assert_eq!(crash["coordinator_svm_off"], true);
    assert_eq!(crash["lockup_cpus"], json!([1]));
    assert_eq!(crash["words"], "console");
}

#[test]
fn a_long_reason_is_cut_and_marked() {
    let reason = vec![b'x'; MAX_REASON + 10];
    let mut words = vec![0u64; MAX_WORDS];
    let mut writer = FactsWriter::new(&mut words[..], 1, 0);
    writer.scalars(&Scalars::default(), &reason);
    writer.finish();
    let (_, crash) = summary_of(&to_bytes(&words));
    let said = crash["reason"].as_str().unwrap();
    assert!(said.ends_with(" [truncated]"), "{said}");
    assert_eq!(said.len(), MAX_REASON + " [truncated]".len());
    assert_eq!(crash["backend"], "none");
}

#[test]
fn damaged_blocks_are_refused_not_read() {
    let good = to_bytes(&vmx_block());
    assert_eq!(Facts::parse(&good[..100]).unwrap_err(), FactsError::Short);
    let mut no_magic = good.clone();
    no_magic[0] ^= 1;
    assert_eq!(Facts::parse(&no_magic).unwrap_err(), FactsError::NoMagic);
    // Cut before its last record.
    assert_eq!(
        Facts::parse(&good[..good.len() - 8]).unwrap_err(),
        FactsError::BadCounts
    );
    for (word, value) in [
        (H_CPUS, MAX_CPUS as u64 + 1),
        (H_RECORDS, 5),
        (H_REASON_LEN, MAX_REASON as u64 + 1),
        (H_WORDS, u64::MAX),
    ] {
        let mut bad = good.clone();
        bad[word * 8..word * 8 + 8].copy_from_slice(&value.to_le_bytes());
        assert_eq!(
            Facts::parse(&bad).unwrap_err(),
            FactsError::BadCounts,
            "word {word} = {value}"
        );
    }
}

#[test]
fn an_unfinished_block_has_no_magic() {
    let mut words = vec![u64::MAX; MAX_WORDS];
    words[H_MAGIC] = MAGIC;
    // A new writer clears a previous block's magic at once.
    let mut writer = FactsWriter::new(&mut words[..], 2, 0);
    writer.scalars(&Scalars::default(), b"x");
    let bytes = to_bytes(&words);
    assert_eq!(Facts::parse(&bytes).unwrap_err(), FactsError::NoMagic);
}

#[test]
fn an_atomic_sink_takes_the_same_block() {
    use core::sync::atomic::{AtomicU64, Ordering};
    let plain = vmx_block();
    let atomic: Vec<AtomicU64> = (0..MAX_WORDS).map(|_| AtomicU64::new(0)).collect();
    let mut sink: &[AtomicU64] = &atomic;
    // Rewrite the same block through the atomic sink.
    let facts_bytes = to_bytes(&plain);
    let facts = Facts::parse(&facts_bytes).unwrap();
    let mut writer = FactsWriter::new(&mut sink, 4, 4);
    let (reason, _) = facts.reason();
    writer.scalars(&facts.scalars(), reason);
    for cpu in 0..4 {
        writer.cpu(cpu, &facts.cpu(cpu));
    }
    for record in 0..4 {
        writer.record(record, &facts.record(record));
    }
    let used = writer.finish();
    let words: Vec<u64> = sink[..used]
        .iter()
        .map(|word| word.load(Ordering::Relaxed))
        .collect();
    assert_eq!(words, plain);
}

fn handover() -> HandoverFacts {
    HandoverFacts {
        kernel_hv: true,
        cpu_notes: 64,
        memory_ranges: 3,
        digest_ok: Some(true),
        handover_us: 19_000_000,
        handover_tsc: 500,
        steps_tsc: [100, 200, 300, 400, 450, 50],
        attempt: 1,
        coordinator_stray_nmis: 2,
    }
}

#[test]
fn the_hand_over_reads_back_and_says_it_jumps() {
    let mut words = vmx_block();
    words.resize(MAX_WORDS, 0);
    assert_eq!(Facts::parse(&to_bytes(&words)).unwrap().handover(), None);
    store_handover(&mut words[..], &handover());
    let bytes = to_bytes(&words);
    let read = Facts::parse(&bytes).unwrap().handover().unwrap();
    assert_eq!(read, handover());
    let mut text = String::new();
    render_handover(&read, None, &mut text).unwrap();
    let (line, report) = text.split_once('\n').unwrap();
    assert_eq!(
        line,
        "*** hv: capture: 64 CPU notes, 3 memory ranges; digests verified; jumping to the hv capture kernel"
    );
    let report: Value =
        serde_json::from_str(report.trim_end().strip_prefix("@hv ").unwrap()).unwrap();
    assert_eq!(
        report,
        json!({"capture": {
            "kernel": "hv", "digest_ok": true, "jumped": true,
            "handover_us": 19_000_000, "handover_tsc": 500,
            "rendezvous_tsc": 100, "cleanup_tsc": 200, "summary_tsc": 300,
            "header_tsc": 400, "digests_tsc": 450, "digests_start_tsc": 50, "attempt": 1,
            "coordinator_stray_nmis": 2, "refused": null
        }})
    );
    // A new block forgets an old hand-over.
    let mut sink = words.clone();
    FactsWriter::new(&mut sink[..], 1, 0).finish();
    assert_eq!(Facts::parse(&to_bytes(&sink)).unwrap().handover(), None);
}

#[test]
fn a_refused_hand_over_says_why_and_no_jump_line() {
    let facts = HandoverFacts {
        digest_ok: None,
        kernel_hv: false,
        ..handover()
    };
    let mut text = String::new();
    render_handover(&facts, Some(&"segment 0 changed"), &mut text).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let report: Value =
        serde_json::from_str(text.trim_end().strip_prefix("@hv ").unwrap()).unwrap();
    assert_eq!(report["capture"]["kernel"], "linux");
    assert_eq!(report["capture"]["digest_ok"], Value::Null);
    assert_eq!(report["capture"]["hv_check"], "skipped");
    assert_eq!(report["capture"]["jumped"], false);
    assert_eq!(report["capture"]["refused"], "segment 0 changed");
}

#[test]
fn an_invalidated_block_reads_as_never_gathered() {
    let mut words = vmx_block();
    invalidate(&mut words[..]);
    assert_eq!(
        Facts::parse(&to_bytes(&words)).unwrap_err(),
        FactsError::NoMagic
    );
}
