//! Crash capture (issue 6): hv crashes on purpose, jumps into the capture
//! kernel loaded and digested at boot, and that kernel gets the dump out
//! of the machine; gdb then reads the dump with hv's ELF.
//!
//! - Linux (Debian's kernel with xtask's initramfs, filtering with
//!   makedumpfile) in QEMU at 8 CPUs; gdb and drgn read the dump;
//! - hv's own capture mode in QEMU at 64 CPUs and in Bochs at 8 (with VMX
//!   guests running, so the VMCLEAR ledger has VMCSes to account for);
//! - a capture kernel damaged after its digest was taken: the jump is
//!   refused;
//! - malformed capture kernels: a clear error at boot, capture disabled,
//!   and hv runs on to `done`.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tests::capture::{
    assert_captured, assert_drgn_reads, assert_gdb_reads, capture_bochs, capture_qemu,
    gdb_hv_commands, hv_capture_elf, listed_vmcs, vmcs_lines,
};
use tests::{Boot, RunOutcome, assert_ok, explain, number};
use xtask::capture::{CaptureKernel, CaptureOptions, LINUX_MEMORY_MIB};

/// The Linux capture kernel and xtask's initramfs alone, with a fake core
/// header in RAM: what comes back is exactly the "old memory".
#[test]
fn the_linux_capture_kernel_copies_a_fake_vmcore_on_its_own() {
    use xtask::capture::selftest;
    let result = selftest::linux_selftest("test-capture-linux-selftest", Duration::from_secs(300))
        .unwrap_or_else(|error| panic!("{error:#}"));
    let dump = &result.dump;
    assert!(dump.problems().is_empty(), "{:?}", dump.problems());
    let threads: Vec<_> = dump.cpus.iter().map(|cpu| cpu.cpu_index).collect();
    assert_eq!(threads, [Some(1), Some(0)]);
    let crash = dump
        .crash
        .as_ref()
        .expect("the HVCRASH note survives /proc/vmcore");
    assert_eq!(crash.reason, "xtask capture self-test");
    assert_eq!(crash.coordinator, 1);
    assert_eq!(dump.segments.len(), 1);
    let bytes = selftest::segment_bytes(&dump.path).unwrap();
    assert!(
        bytes == selftest::old_memory(),
        "the dumped memory differs from what was in RAM ({})",
        result.run_dir.display()
    );
}

/// Linux with makedumpfile (the raw copy of `/proc/vmcore` is the
/// self-test's, above, byte for byte): an ELF dump gdb and drgn read, and a
/// compressed kdump, with their sizes in the report.
#[test]
fn linux_with_makedumpfile_dumps_eight_cpus_for_gdb_and_drgn() {
    let run = capture_qemu(
        "test-capture-linux-smp8",
        Boot::GrubBios,
        8,
        LINUX_MEMORY_MIB,
        &[],
        CaptureOptions {
            makedumpfile: true,
            ..CaptureOptions::new(CaptureKernel::Linux, 8)
        },
    );
    let info = assert_captured(&run, 8);
    let capture = &run.report["capture"];
    assert_eq!(capture["kernel"], "linux", "{}", explain(&run));
    assert_eq!(capture["linux"]["copied"], true, "{}", explain(&run));
    // Filtered: zero pages left out of both files.
    assert_eq!(
        capture["dump_format"],
        "elf-makedumpfile",
        "{}",
        explain(&run)
    );
    assert_eq!(
        capture["kdump_format"],
        "kdump-compressed",
        "{}",
        explain(&run)
    );
    let vmcore = number(&run, "/capture/linux/vmcore_bytes");
    let kdump = number(&run, "/capture/kdump_bytes");
    assert!(
        info.file_bytes < vmcore / 4 && kdump > 0 && kdump < vmcore / 4,
        "vmcore {vmcore}, ELF {}, kdump {kdump}\n{}",
        info.file_bytes,
        explain(&run)
    );
    assert!(
        xtask::makedumpfile::is_kdump_compressed(std::path::Path::new(
            capture["kdump_path"].as_str().unwrap()
        ))
        .unwrap(),
        "{}",
        explain(&run)
    );
    for name in ["elf", "kdump"] {
        assert_eq!(
            capture["makedumpfile"][name]["stream_bytes"],
            capture["linux"]["makedumpfile"][format!("{name}_stream_bytes")],
            "{}",
            explain(&run)
        );
    }
    assert_eq!(
        number(&run, "/capture/linux/makedumpfile/dump_level"),
        1,
        "{}",
        explain(&run)
    );
    // Linux's /proc/vmcore keeps the hypervisor's notes as they were.
    let crash = info.crash.as_ref().expect("an HVCRASH note");
    assert_eq!(
        u64::from(crash.coordinator),
        number(&run, "/crash/cpu_index"),
        "{}",
        explain(&run)
    );
    assert!(
        capture["crash_to_capture_us"].as_u64().is_some(),
        "{}",
        explain(&run)
    );
    assert_gdb_reads(&run, 8);
    // drgn attaches hv by its build ID and unwinds every CPU; no VMX under
    // TCG, so every list is empty.
    for (cpu, line) in assert_drgn_reads(&run, 8) {
        assert!(line.ends_with(": 0 loaded"), "CPU {cpu}: {line}");
    }
}

#[test]
fn hv_capture_mode_dumps_sixty_four_cpus_in_qemu() {
    let run = capture_qemu(
        "test-capture-hv-smp64",
        Boot::Direct,
        64,
        xtask::capture::HV_MEMORY_MIB,
        &[],
        CaptureOptions::new(CaptureKernel::Hv, 64),
    );
    assert_captured(&run, 64);
    let stream = &run.report["capture"]["stream"];
    assert_eq!(stream["uncovered_bytes"], 0, "{}", explain(&run));
    assert_eq!(
        run.report["capture"]["streamed_bytes"],
        run.report["capture"]["dump_bytes"],
        "{}",
        explain(&run)
    );
    assert_gdb_reads(&run, 64);
}

#[test]
fn hv_capture_mode_in_bochs_accounts_for_every_loaded_vmcs() {
    let run = capture_bochs(
        "test-capture-bochs-cpus8",
        8,
        &[],
        CaptureOptions::new(CaptureKernel::Hv, 8),
    );
    let info = assert_captured(&run, 8);
    assert_gdb_reads(&run, 8);
    assert_helpers_read_the_lists(&run, &info);
    // Guests were running: the crash found VMCSes loaded, and the dump's
    // ledger shows each one cleared by the CPU that held it.
    let loaded = number(&run, "/crash/vmcs_loaded");
    assert!(loaded > 0, "no VMCS loaded at the crash\n{}", explain(&run));
    let crash = info.crash.as_ref().expect("an HVCRASH note");
    assert!(crash.stragglers.is_empty(), "{}", explain(&run));
    let ledger_loaded: u64 = crash.ledger.iter().map(|c| u64::from(c.vmcs_loaded)).sum();
    let cleared: usize = crash.ledger.iter().map(|c| c.cleared()).sum();
    assert_eq!(ledger_loaded, loaded, "{}", explain(&run));
    assert_eq!(cleared as u64, loaded, "{}", explain(&run));
    for cpu in &crash.ledger {
        assert_eq!(
            cpu.cleared(),
            cpu.vmcs_loaded as usize,
            "CPU {}\n{}",
            cpu.cpu_index,
            explain(&run)
        );
    }
}

/// hv's gdb commands and drgn module on a dump with VMX guests: every
/// CPU's loaded-VMCS list (the crash walk VMCLEARs, it does not unlink) is
/// the set of VMCSes the dump's ledger says that CPU cleared; the vCPUs
/// each sit on the list of the CPU they are loaded on; drgn's lists are
/// gdb's.
#[track_caller]
fn assert_helpers_read_the_lists(run: &RunOutcome, info: &xtask::dump::DumpInfo) {
    let text = gdb_hv_commands(run, &["hv vmcs", "hv vcpus", "hv cpus", "hv ledger"]);
    let lists = vmcs_lines(&text);
    assert_eq!(lists.len(), 8, "{text}");
    let crash = info.crash.as_ref().expect("an HVCRASH note");
    let mut total = 0;
    for (cpu, line) in &lists {
        let mut listed = listed_vmcs(line);
        listed.sort_unstable();
        let ledger = crash
            .ledger
            .iter()
            .find(|c| c.cpu_index == *cpu)
            .unwrap_or_else(|| panic!("no ledger for CPU {cpu}"));
        let mut cleared: Vec<u64> = ledger.vmclears.iter().map(|v| v.vmcs_phys).collect();
        cleared.sort_unstable();
        assert_eq!(listed, cleared, "CPU {cpu}: {line}\n{text}");
        total += listed.len();
    }
    assert!(total > 0, "no VMCS on any list:\n{text}");
    assert_eq!(total as u64, number(run, "/crash/vmcs_loaded"), "{text}");
    // Each vCPU whose VMCS is on a CPU's list was cleared at the crash by
    // that very CPU, and its own record, when it still names a CPU, names
    // the same one.
    let vcpus: Vec<&str> = text.lines().filter(|l| l.starts_with("  vCPU ")).collect();
    let word_after = |line: &str, key: &str| -> Option<String> {
        let rest = line.split(key).nth(1)?;
        Some(rest.split(|c: char| !c.is_ascii_digit()).next()?.to_owned())
    };
    let mut on_lists = 0;
    for line in &vcpus {
        let Some(listed) = word_after(line, "on CPU ") else {
            continue;
        };
        on_lists += 1;
        assert_eq!(
            word_after(line, "cleared by CPU ").as_deref(),
            Some(listed.as_str()),
            "{line}\n{text}"
        );
        if let Some(loaded) = word_after(line, "loaded CPU ") {
            assert_eq!(loaded, listed, "{line}\n{text}");
        }
    }
    assert_eq!(on_lists, total, "every listed VMCS is a vCPU's:\n{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(" APIC ") && l.contains(" thread "))
            .count(),
        8,
        "hv cpus: a line per CPU with its thread\n{text}"
    );
    assert!(
        text.contains(&format!("coordinator  CPU {}", crash.coordinator)),
        "{text}"
    );
    let drgn = tests::capture::drgn_hv(run, &["vmcs"]);
    assert_eq!(vmcs_lines(&drgn), lists, "drgn's lists are gdb's:\n{drgn}");
}

#[test]
fn a_capture_kernel_damaged_after_its_digest_is_not_entered() {
    let run = capture_qemu(
        "test-capture-corrupt",
        Boot::Direct,
        2,
        xtask::capture::HV_MEMORY_MIB,
        &["capture_corrupt=1"],
        CaptureOptions::new(CaptureKernel::Hv, 2),
    );
    assert_ok(&run);
    let capture = &run.report["capture"];
    assert_eq!(capture["loaded"], true, "{}", explain(&run));
    assert_eq!(capture["digest_ok"], false, "{}", explain(&run));
    assert_eq!(capture["jumped"], false, "{}", explain(&run));
    assert_eq!(capture["entered"], false, "{}", explain(&run));
    assert!(capture["refused"].is_string(), "{}", explain(&run));
    assert_eq!(capture["dump_path"], Value::Null, "{}", explain(&run));
    // hv's crash path ran to its end instead (QEMU status 0x25).
    assert!(run.report["crash"].is_object(), "{}", explain(&run));
    assert_eq!(
        number(&run, "/xtask/exit_status"),
        0x25,
        "{}",
        explain(&run)
    );
    assert!(
        run.serial.contains("refusing to jump"),
        "no refusal on the console\n{}",
        explain(&run)
    );
}

/// Boots hv with `image` as its capture module and no crash: hv must say
/// why it cannot use it, and boot on to `done`.
#[track_caller]
fn refused_at_boot(name: &str, capture: CaptureOptions, boot: Boot) -> RunOutcome {
    let capture = CaptureOptions {
        default_crash: None,
        ..capture
    };
    let run = capture_qemu(name, boot, 2, xtask::capture::HV_MEMORY_MIB, &[], capture);
    assert_ok(&run);
    assert_eq!(run.report["done"], true, "{}", explain(&run));
    assert!(run.report.get("crash").is_none(), "{}", explain(&run));
    assert_eq!(run.report["capture"]["loaded"], false, "{}", explain(&run));
    run
}

fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = xtask::paths::build_dir().join("test-capture-inputs");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

fn error(run: &RunOutcome) -> &str {
    run.report["capture"]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no capture.error\n{}", explain(run)))
}

#[test]
fn malformed_capture_kernels_are_refused_at_boot_and_hv_runs_on() {
    // Bytes that are neither a bzImage nor an ELF.
    let garbage: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let run = refused_at_boot(
        "test-capture-garbage",
        CaptureOptions {
            image: Some(scratch_file("garbage", &garbage)),
            ..CaptureOptions::new(CaptureKernel::Hv, 2)
        },
        Boot::Direct,
    );
    assert!(
        error(&run).contains("neither a bzImage nor an ELF"),
        "{}",
        explain(&run)
    );

    // The capture-mode ELF cut short: headers that point past its end.
    let elf = fs::read(hv_capture_elf()).unwrap();
    let run = refused_at_boot(
        "test-capture-truncated-elf",
        CaptureOptions {
            image: Some(scratch_file("truncated-hv", &elf[..16384])),
            ..CaptureOptions::new(CaptureKernel::Hv, 2)
        },
        Boot::Direct,
    );
    assert!(
        error(&run).starts_with("capture ELF rejected"),
        "{}",
        explain(&run)
    );

    // Debian's bzImage cut short: its setup header promises more.
    let kit = xtask::debian::linux_kit().expect("fetching Debian's kernel");
    let bzimage = fs::read(&kit.vmlinuz).unwrap();
    let run = refused_at_boot(
        "test-capture-truncated-bzimage",
        CaptureOptions {
            image: Some(scratch_file("truncated-bzimage", &bzimage[..1 << 20])),
            initrd: Some(scratch_file("small-initrd", &[0x5a; 4096])),
            ..CaptureOptions::new(CaptureKernel::Linux, 2)
        },
        Boot::GrubBios,
    );
    assert!(
        error(&run).starts_with("bzImage rejected"),
        "{}",
        explain(&run)
    );
}
