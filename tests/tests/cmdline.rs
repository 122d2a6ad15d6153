//! hv's command line: mistakes are reported, and hv boots on regardless.

use tests::{Boot, assert_ok, explain, field, qemu};

#[test]
fn unknown_options_and_bad_values_are_reported_and_boot_goes_on() {
    let run = qemu(
        "test-qemu-cmdline-errors",
        Boot::Direct,
        4,
        &["bogus_option=1", "log=loud"],
    );
    assert_ok(&run);
    let errors: Vec<&str> = field(&run, "/cmdline/errors")
        .as_array()
        .unwrap_or_else(|| panic!("cmdline.errors is not an array\n{}", explain(&run)))
        .iter()
        .filter_map(|error| error.as_str())
        .collect();
    assert_eq!(
        errors.len(),
        2,
        "expected two errors, got {errors:?}\n{}",
        explain(&run)
    );
    // One entry per bad word, in either order; a message may mention other
    // words too, so each word must be named by a different entry.
    let names = |i: usize, word: &str| errors[i].contains(word);
    assert!(
        (names(0, "bogus_option") && names(1, "log"))
            || (names(1, "bogus_option") && names(0, "log")),
        "the errors do not name `bogus_option` and `log` separately: {errors:?}\n{}",
        explain(&run)
    );
}
