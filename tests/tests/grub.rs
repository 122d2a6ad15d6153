//! The README's GRUB stanza (issue 15): a GRUB ISO whose `grub.cfg` is
//! exactly the lines a user copies, with hv, Debian's kernel and xtask's
//! initramfs at the paths they name, boots in QEMU on SeaBIOS and on OVMF.
//! hv must come up from multiboot2 with the stanza's command line and load
//! and digest both capture modules.

use std::time::Duration;

use tests::{Boot, RunOutcome, assert_ok, explain, hv_elf, number, string};
use xtask::initramfs::{self, DumpWriter};
use xtask::readme::{self, Stanza};
use xtask::run::{GrubSetup, QemuOptions};

/// GRUB's console on COM1 and no menu wait: the lines the test puts
/// before the stanza (a machine's own `grub.cfg` has its own).
const CONSOLE: &str = "serial --unit=0 --speed=115200\nterminal_input serial\n\
                       terminal_output serial\nset timeout=0\nset default=0\n";

fn stanza() -> Stanza {
    let text = std::fs::read_to_string(xtask::paths::workspace_root().join("README.md"))
        .expect("reading README.md");
    readme::grub_stanza(&text).unwrap_or_else(|error| panic!("README.md: {error:#}"))
}

#[track_caller]
fn boot_the_stanza(name: &str, boot: Boot) -> (RunOutcome, Stanza) {
    let stanza = stanza();
    let capture = initramfs::linux_capture(DumpWriter::Copy).expect("the Linux capture kit");
    let config = format!("{CONSOLE}{}\n", stanza.lines.join("\n"));
    let options = QemuOptions {
        smp: 2,
        boot,
        memory_mib: xtask::capture::LINUX_MEMORY_MIB,
        append: stanza.hv.words.clone(),
        timeout: Duration::from_secs(240),
        run_name: Some(name.to_owned()),
        grub_setup: Some(GrubSetup {
            config,
            files: vec![
                (hv_elf().to_path_buf(), stanza.hv.path.clone()),
                (capture.kit.vmlinuz, stanza.capture_kernel.path.clone()),
                (capture.initramfs, stanza.capture_initrd.path.clone()),
            ],
        }),
        // The stanza has no finish=exit: hv halts after its report.
        stop_at_done: true,
        ..QemuOptions::new(hv_elf())
    };
    let run = xtask::run::qemu(&options)
        .unwrap_or_else(|error| panic!("QEMU run {name} could not run: {error:#}"));
    (run, stanza)
}

#[track_caller]
fn assert_the_stanza_booted(run: &RunOutcome, stanza: &Stanza) {
    assert_ok(run);
    assert_eq!(run.report["done"], true, "{}", explain(run));
    assert_eq!(number(run, "/cpus/online"), 2, "{}", explain(run));
    assert_eq!(
        string(run, "/loader/protocol"),
        "multiboot2",
        "{}",
        explain(run)
    );
    assert_eq!(
        string(run, "/cmdline/raw")
            .split_whitespace()
            .collect::<Vec<_>>(),
        stanza.hv.words,
        "hv got the stanza's words and no others\n{}",
        explain(run)
    );
    let capture = &run.report["capture"];
    assert_eq!(capture["loaded"], true, "{}", explain(run));
    assert_eq!(capture["kernel"], "linux", "{}", explain(run));
    assert!(
        number(run, "/capture/digested_segments") >= 4,
        "kernel, zero page, command line, initrd and purgatory digested\n{}",
        explain(run)
    );
}

#[test]
fn the_readme_grub_stanza_boots_on_bios() {
    let (run, stanza) = boot_the_stanza("test-grub-stanza-bios", Boot::GrubBios);
    assert_the_stanza_booted(&run, &stanza);
}

#[test]
fn the_readme_grub_stanza_boots_on_uefi() {
    let (run, stanza) = boot_the_stanza("test-grub-stanza-uefi", Boot::GrubUefi);
    assert_the_stanza_booted(&run, &stanza);
}
