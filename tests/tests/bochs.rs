//! hv booted in Bochs from the GRUB ISO: the emulator with VMX, EPT and
//! x2APIC (`corei7_haswell_4770`), up to its limit of 15 CPUs.

use std::sync::OnceLock;

use tests::{RunOutcome, assert_ok, bochs, explain, field, number, numbers, string};

#[test]
fn bochs_finds_four_cpus_through_multiboot2() {
    let run = bochs("test-bochs-cpus4", 4, &[]);
    assert_ok(&run);
    assert_eq!(number(&run, "/cpus/possible"), 4, "{}", explain(&run));
    assert_eq!(
        string(&run, "/loader/protocol"),
        "multiboot2",
        "{}",
        explain(&run)
    );
}

/// The 15-CPU run, shared by the tests that read its report.
fn cpus15() -> &'static RunOutcome {
    static RUN: OnceLock<RunOutcome> = OnceLock::new();
    RUN.get_or_init(|| bochs("test-bochs-cpus15", 15, &[]))
}

#[test]
fn fifteen_cpus_come_up_in_x2apic_mode() {
    let run = cpus15();
    assert_ok(run);
    assert_eq!(number(run, "/cpus/possible"), 15, "{}", explain(run));
    assert_eq!(number(run, "/cpus/online"), 15, "{}", explain(run));
    assert!(numbers(run, "/cpus/failed").is_empty(), "{}", explain(run));
    assert!(number(run, "/bringup_us") > 0, "{}", explain(run));
    assert_eq!(string(run, "/smp/apic_mode"), "x2apic", "{}", explain(run));
    assert_eq!(
        number(run, "/smp/call_function_cpus"),
        15,
        "{}",
        explain(run)
    );
    assert_eq!(number(run, "/smp/nmi_cpus"), 14, "{}", explain(run));
}

/// Guests ran on every one of `cpus` cores, with migrations between them.
#[track_caller]
fn assert_guests_on_every_core(run: &RunOutcome, cpus: u64) {
    assert_eq!(string(run, "/virt/backend"), "vmx", "{}", explain(run));
    assert!(field(run, "/virt/reason").is_null(), "{}", explain(run));
    assert_eq!(number(run, "/virt/cpus_in_vmx"), cpus, "{}", explain(run));
    assert!(number(run, "/virt/vcpus") >= cpus, "{}", explain(run));
    assert!(number(run, "/virt/migrations") > 0, "{}", explain(run));
    let exits = numbers(run, "/virt/exits_per_cpu");
    assert_eq!(exits.len() as u64, cpus, "{}", explain(run));
    assert!(
        exits.iter().all(|&n| n > 0),
        "a core without VM exits: {exits:?}\n{}",
        explain(run)
    );
    assert_eq!(
        number(run, "/virt/vm_exits"),
        exits.iter().sum::<u64>(),
        "vm_exits is not the sum of exits_per_cpu\n{}",
        explain(run)
    );
}

#[test]
fn eight_cores_run_guests_that_migrate() {
    let run = bochs("test-bochs-vmx-cpus8", 8, &[]);
    assert_ok(&run);
    assert_guests_on_every_core(&run, 8);
    assert_eq!(number(&run, "/virt/stopped"), 0, "{}", explain(&run));
}

#[test]
fn fifteen_cores_run_guests_that_migrate() {
    let run = cpus15();
    assert_ok(run);
    assert_guests_on_every_core(run, 15);
    assert_eq!(number(run, "/virt/stopped"), 0, "{}", explain(run));
}

#[test]
fn a_guest_reading_outside_its_ept_is_stopped_and_the_others_run_on() {
    let run = bochs("test-bochs-misbehave", 8, &["guest_misbehave=3"]);
    assert_ok(&run);
    let stopped = field(&run, "/guests_stopped")
        .as_object()
        .unwrap_or_else(|| panic!("guests_stopped is not an object\n{}", explain(&run)));
    let vcpus: Vec<&String> = stopped.keys().collect();
    assert_eq!(vcpus, ["3"], "{}", explain(&run));
    assert_eq!(
        string(&run, "/guests_stopped/3/reason"),
        "ept_violation",
        "{}",
        explain(&run)
    );
    assert!(
        number(&run, "/guests_stopped/3/cpu") < 8,
        "{}",
        explain(&run)
    );
    // The faulting address and instruction are reported.
    number(&run, "/guests_stopped/3/gpa");
    number(&run, "/guests_stopped/3/rip");
    assert_eq!(number(&run, "/virt/stopped"), 1, "{}", explain(&run));
    // The other 15 vCPUs kept running, on every core, for the whole run:
    // the test guest works between its exits, so most exits are the ends
    // of 2 ms slices (VMX-preemption timer), about 50 per core in the
    // 100 ms run; half of that is the floor.
    assert_guests_on_every_core(&run, 8);
    assert!(
        number(&run, "/virt/vm_exits") >= 200,
        "too few VM exits for guests that kept running\n{}",
        explain(&run)
    );
    assert!(
        number(&run, "/virt/preemptions") > 0,
        "no slice ended by the preemption timer\n{}",
        explain(&run)
    );
}

/// A combination Bochs cannot run (15 CPUs and a hard disk: one timer too
/// many) stops it at start-up; the verdict names the panic from its log
/// rather than only "no serial output". `cargo xtask bochs --capture hv`
/// refuses the combination before it starts; this boots it on purpose.
#[test]
fn a_bochs_panic_is_named_in_the_verdict() {
    let dir = xtask::paths::run_dir("test-bochs-panic");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    let file = std::fs::File::create(&disk).unwrap();
    // Ten cylinders of 16 heads and 63 sectors.
    file.set_len(10 * 16 * 63 * 512).unwrap();
    let options = xtask::run::BochsOptions {
        cpus: 15,
        timeout: std::time::Duration::from_secs(120),
        run_name: Some("test-bochs-panic".to_owned()),
        extra_config: vec![format!(
            "ata0-slave: type=disk, path=\"{}\", mode=flat",
            disk.display()
        )],
        ..xtask::run::BochsOptions::new(tests::hv_elf())
    };
    let run = xtask::run::bochs(&options).expect("Bochs could not start");
    assert!(!run.ok, "{}", explain(&run));
    let reason = run.reason.as_deref().unwrap_or("");
    assert!(
        reason.starts_with("bochs log: [") && reason.contains(">>PANIC<< register_timer"),
        "{}",
        explain(&run)
    );
    let problems = field(&run, "/xtask/emulator_problems");
    assert!(
        problems.as_array().is_some_and(|p| p
            .iter()
            .any(|line| line.as_str().unwrap_or("").contains(">>PANIC<<"))),
        "{}",
        explain(&run)
    );
}
