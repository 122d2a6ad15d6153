//! Bad guests (issue 11): each is refused or stopped with its reason, and
//! hv and the other guests run on. One Bochs boot carries them all, between
//! two well-behaved guests that must finish. And under SVM (QEMU TCG) a
//! good guest passes while a triple-faulting one and one reading outside
//! its memory are stopped with their reasons.

use std::sync::OnceLock;

use serde_json::Value;
use tests::guests::{self, LOAD_ADDRESS};
use tests::{RunOutcome, assert_ok, explain, hv_elf};
use xtask::iso::BootModule;
use xtask::run::{self, BochsOptions};

const DIR: &str = "test-guests-bad-input";

/// The boot: `good`, then the bad ones, then `good_after`.
fn run() -> &'static RunOutcome {
    static RUN: OnceLock<RunOutcome> = OnceLock::new();
    RUN.get_or_init(|| {
        let ok = guests::multiboot_elf(guests::PRINTS_OK_AND_EXITS, LOAD_ADDRESS);
        let images = [
            ("good", ok.clone(), "mem=8M"),
            ("not_multiboot", vec![0xAB; 8192], "mem=8M"),
            // Loaded at 16 MiB into 8 MiB of RAM.
            (
                "too_large",
                guests::multiboot_elf(guests::PRINTS_OK_AND_EXITS, 16 << 20),
                "mem=8M",
            ),
            // Over the BIOS area where hv puts the guest's ACPI tables.
            (
                "overlaps_hv",
                guests::multiboot_elf(guests::PRINTS_OK_AND_EXITS, 0xE_0000),
                "mem=8M",
            ),
            (
                "triple_fault",
                guests::multiboot_elf(guests::TRIPLE_FAULTS, LOAD_ADDRESS),
                "mem=8M",
            ),
            (
                "flood",
                guests::multiboot_elf(guests::FLOODS_EXITS, LOAD_ADDRESS),
                "mem=8M max_exits=20000",
            ),
            (
                "outside_ept",
                guests::multiboot_elf(guests::READS_OUTSIDE_ITS_MEMORY, LOAD_ADDRESS),
                "mem=8M",
            ),
            ("good_after", ok, "mem=8M"),
        ];
        let modules = images
            .iter()
            .map(|(name, bytes, words)| BootModule {
                file: guests::write_image(DIR, name, bytes),
                cmdline: format!("guest name={name} {words}"),
            })
            .collect();
        let options = BochsOptions {
            cpus: 2,
            run_name: Some(DIR.to_owned()),
            modules,
            ..BochsOptions::new(hv_elf())
        };
        run::bochs(&options)
            .unwrap_or_else(|error| panic!("Bochs run {DIR} could not run: {error:#}"))
    })
}

/// The report object of guest `name`.
#[track_caller]
fn guest<'a>(run: &'a RunOutcome, name: &str) -> &'a Value {
    run.report["guests"]
        .as_object()
        .and_then(|guests| guests.values().find(|g| g["name"] == name))
        .unwrap_or_else(|| panic!("no guest {name} in the report\n{}", explain(run)))
}

/// hv finished its run, and both well-behaved guests passed.
#[track_caller]
fn assert_others_finished(run: &RunOutcome) {
    assert_ok(run);
    for name in ["good", "good_after"] {
        let good = guest(run, name);
        assert_eq!(good["state"], "stopped", "{name}\n{}", explain(run));
        assert_eq!(good["reason"], "exit", "{name}\n{}", explain(run));
        assert_eq!(good["verdict"], "pass", "{name}\n{}", explain(run));
        assert_eq!(
            good["output_lines"],
            1,
            "{name} printed its line\n{}",
            explain(run)
        );
    }
}

#[track_caller]
fn assert_refused(name: &str, because: &str) {
    let run = run();
    let refused = guest(run, name);
    assert_eq!(refused["state"], "refused", "{}", explain(run));
    assert_eq!(refused["reason"], "load_error", "{}", explain(run));
    let detail = refused["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains(because),
        "{name}: {detail}\n{}",
        explain(run)
    );
    assert_others_finished(run);
}

#[track_caller]
fn assert_stopped(name: &str, reason: &str) -> &'static Value {
    let run = run();
    let stopped = guest(run, name);
    assert_eq!(stopped["state"], "stopped", "{}", explain(run));
    assert_eq!(stopped["reason"], reason, "{}", explain(run));
    assert!(stopped["verdict"].is_null(), "{}", explain(run));
    assert_others_finished(run);
    stopped
}

#[test]
fn a_guest_that_is_not_multiboot_is_refused() {
    assert_refused("not_multiboot", "not a multiboot1 image");
}

#[test]
fn a_guest_larger_than_its_memory_is_refused() {
    assert_refused("too_large", "does not fit in guest RAM");
}

#[test]
fn a_guest_over_the_memory_hv_fills_is_refused() {
    assert_refused("overlaps_hv", "overlaps reserved guest memory");
}

#[test]
fn a_guest_that_triple_faults_is_stopped() {
    let stopped = assert_stopped("triple_fault", "triple_fault");
    assert_eq!(stopped["detail"], "vCPU 0");
}

#[test]
fn a_guest_that_floods_exits_is_stopped() {
    let stopped = assert_stopped("flood", "exit_flood");
    let exits = stopped["exits"].as_u64().unwrap_or(0);
    assert!(exits > 20_000, "{exits} exits\n{}", explain(run()));
}

#[test]
fn a_guest_that_reads_outside_its_memory_is_stopped() {
    let stopped = assert_stopped("outside_ept", "outside_ram");
    let detail = stopped["detail"].as_str().unwrap_or("");
    assert!(
        detail.starts_with("gpa 0x40000000 at rip 0x100000"),
        "{detail}\n{}",
        explain(run())
    );
}

/// Under QEMU TCG hv runs guests with SVM, through its platform glue
/// (`hv/src/virt/svm/platform.rs`): a good guest passes beside a guest
/// that triple-faults and one that reads outside its memory, each stopped
/// with its reason, and no guest module is refused.
#[test]
fn under_svm_guest_modules_run_on_their_platforms() {
    let name = "test-guests-svm";
    let ok = guests::multiboot_elf(guests::PRINTS_OK_AND_EXITS, LOAD_ADDRESS);
    let images = [
        ("good", ok),
        (
            "triple_fault",
            guests::multiboot_elf(guests::TRIPLE_FAULTS, LOAD_ADDRESS),
        ),
        (
            "outside_npt",
            guests::multiboot_elf(guests::READS_OUTSIDE_ITS_MEMORY, LOAD_ADDRESS),
        ),
    ];
    let options = xtask::run::QemuOptions {
        smp: 2,
        boot: xtask::run::Boot::GrubBios,
        timeout: std::time::Duration::from_secs(120),
        run_name: Some(name.to_owned()),
        modules: images
            .iter()
            .map(|(guest, bytes)| BootModule {
                file: guests::write_image(name, guest, bytes),
                cmdline: format!("guest name={guest} mem=8M"),
            })
            .collect(),
        force_tcg: true,
        ..xtask::run::QemuOptions::new(hv_elf())
    };
    let run = run::qemu(&options)
        .unwrap_or_else(|error| panic!("QEMU run {name} could not run: {error:#}"));
    assert_ok(&run);
    let virt = &run.report["virt"];
    assert_eq!(virt["backend"], "svm", "{}", explain(&run));
    assert_eq!(virt["guest_modules_not_run"], 0, "{}", explain(&run));
    assert_eq!(virt["platform_guests"], 3, "{}", explain(&run));
    let good = guest(&run, "good");
    assert_eq!(good["state"], "stopped", "{}", explain(&run));
    assert_eq!(good["reason"], "exit", "{}", explain(&run));
    assert_eq!(good["verdict"], "pass", "{}", explain(&run));
    assert_eq!(good["output_lines"], 1, "{}", explain(&run));
    for (guest_name, reason) in [
        ("triple_fault", "triple_fault"),
        ("outside_npt", "outside_ram"),
    ] {
        let stopped = guest(&run, guest_name);
        assert_eq!(stopped["state"], "stopped", "{}", explain(&run));
        assert_eq!(stopped["reason"], reason, "{}", explain(&run));
        assert!(stopped["verdict"].is_null(), "{}", explain(&run));
    }
    let detail = guest(&run, "outside_npt")["detail"].as_str().unwrap_or("");
    assert!(
        detail.starts_with("gpa 0x40000000 at rip 0x100000"),
        "{detail}\n{}",
        explain(&run)
    );
}
