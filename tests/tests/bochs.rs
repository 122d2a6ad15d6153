//! hv booted in Bochs from the GRUB ISO: the emulator with VMX.

use tests::{assert_ok, bochs, explain, number, string};

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
