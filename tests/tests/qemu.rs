//! hv booted in QEMU: the direct PVH entry and GRUB on BIOS and UEFI, each
//! judged by what the hypervisor reports.

use tests::{Boot, assert_ok, explain, number, qemu, string};

/// Guest memory of every QEMU run (xtask's default `-m`).
const MEMORY_BYTES: u64 = 512 * 1024 * 1024;

#[test]
fn direct_boot_finds_four_cpus_its_memory_and_the_pvh_loader() {
    let run = qemu("test-qemu-direct-smp4", Boot::Direct, 4, &[]);
    assert_ok(&run);
    assert_eq!(number(&run, "/cpus/possible"), 4, "{}", explain(&run));
    assert_eq!(string(&run, "/loader/protocol"), "pvh", "{}", explain(&run));
    // Firmware, ACPI tables and the low megabyte take their share; what is
    // left must still be most of the guest's memory and never more.
    let usable = number(&run, "/memory/usable_bytes");
    assert!(
        (MEMORY_BYTES / 2..=MEMORY_BYTES).contains(&usable),
        "usable_bytes {usable} is not between 50% and 100% of {MEMORY_BYTES}\n{}",
        explain(&run)
    );
}

#[test]
fn direct_boot_with_two_cpus_finds_two() {
    let run = qemu("test-qemu-direct-smp2", Boot::Direct, 2, &[]);
    assert_ok(&run);
    assert_eq!(number(&run, "/cpus/possible"), 2, "{}", explain(&run));
}

#[test]
fn grub_on_bios_finds_four_cpus_through_multiboot2() {
    let run = qemu("test-qemu-grub-bios-smp4", Boot::GrubBios, 4, &[]);
    assert_ok(&run);
    assert_eq!(number(&run, "/cpus/possible"), 4, "{}", explain(&run));
    assert_eq!(
        string(&run, "/loader/protocol"),
        "multiboot2",
        "{}",
        explain(&run)
    );
}

#[test]
fn grub_on_uefi_finds_four_cpus_through_multiboot2() {
    let run = qemu("test-qemu-grub-uefi-smp4", Boot::GrubUefi, 4, &[]);
    assert_ok(&run);
    assert_eq!(number(&run, "/cpus/possible"), 4, "{}", explain(&run));
    assert_eq!(
        string(&run, "/loader/protocol"),
        "multiboot2",
        "{}",
        explain(&run)
    );
}
