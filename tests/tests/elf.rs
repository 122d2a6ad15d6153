//! hv's ELF file as debuggers read it (issue 15): frame sections that
//! readelf reads without a warning, a GNU build ID, and the file header and
//! program headers loaded with the image, where a dump's image notes point.

use std::process::Command;

use tests::hv_elf;

/// What `readelf ARGS hv` prints, stdout and stderr together.
fn readelf(args: &[&str]) -> String {
    let output = Command::new("readelf")
        .args(args)
        .arg(hv_elf())
        .output()
        .unwrap_or_else(|error| panic!("could not run readelf (binutils): {error}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "readelf {args:?} failed:\n{text}");
    text
}

#[test]
fn readelf_reads_the_frame_sections_without_a_warning() {
    let text = readelf(&["--debug-dump=frames"]);
    assert!(
        !text.to_lowercase().contains("warning"),
        "readelf warns about hv's frames:\n{}",
        &text[..text.len().min(4000)]
    );
    // .eh_frame starts with its CIE (not with .eh_frame_hdr's bytes), and
    // .debug_frame has the functions' FDEs.
    let eh_frame = text
        .split("Contents of the .eh_frame section")
        .nth(1)
        .expect("an .eh_frame section");
    assert!(
        eh_frame.lines().take(4).any(|line| line.contains(" CIE")),
        "{}",
        &eh_frame[..eh_frame.len().min(1000)]
    );
    assert!(
        text.matches(" FDE ").count() > 100,
        "too few FDEs: {}",
        text.matches(" FDE ").count()
    );
    let sections = readelf(&["-SW"]);
    assert!(sections.contains(" .eh_frame_hdr "), "{sections}");
    let headers = readelf(&["-lW"]);
    assert!(headers.contains("GNU_EH_FRAME"), "{headers}");
}

#[test]
fn hv_has_a_gnu_build_id() {
    let text = readelf(&["-n"]);
    let id = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no GNU build ID:\n{text}"));
    assert_eq!(id.len(), 40, "a SHA-1 build ID: {id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
}

/// The image's first page, as loaded, holds the ELF header and the program
/// headers: what hv's capture loader reads at boot to write the dump's
/// NT_AUXV and NT_FILE notes, and what drgn reads from the dump.
#[test]
fn the_elf_headers_are_loaded_with_the_image() {
    let bytes = std::fs::read(hv_elf()).unwrap();
    let load_addr = 0x20_0000;
    let image =
        kexec_loader::elfcore::LoadedImage::from_loaded_headers("hv", load_addr, &bytes[..4096])
            .unwrap_or_else(|error| panic!("hv's headers are not loaded with it: {error}"));
    assert_eq!(image.phdr_addr(), load_addr + 64);
    let first = image.mappings()[0];
    assert_eq!((first.start, first.file_offset), (load_addr, 0));
    // The build-ID note is in a loaded segment too.
    let headers = readelf(&["-lW"]);
    let note_line = headers
        .lines()
        .filter(|line| line.trim_start().starts_with("NOTE"))
        .count();
    assert!(note_line >= 2, "PVH and build-ID notes:\n{headers}");
    let mapping = readelf(&["-lW"]);
    assert!(
        mapping
            .lines()
            .any(|line| line.contains(".note.gnu.build-id") && line.contains(".rodata")),
        "the build ID note lies in the loaded read-only segment:\n{mapping}"
    );
}

/// The capture loader digests only the file's bytes of each segment
/// (`hv/src/capture/load.rs`): the zero tail of the writable segment must
/// be `.bss` and nothing else, which the image's entry zeroes
/// (`hv/src/arch/boot.rs`, `__bss_start..__bss_end`) before anything reads
/// it. A section after `.bss`, or a `.bss` that stops short of the
/// segment's end, would leave bytes that are neither checked nor zeroed.
#[test]
fn the_writable_segments_zero_tail_is_the_bss_the_entry_zeroes() {
    let headers = readelf(&["-lW"]);
    let hex = |text: &str| u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap();
    let (vaddr, filesz, memsz) = headers
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&"LOAD") && fields.get(6) == Some(&"RW"))
        .map(|fields| (hex(fields[2]), hex(fields[4]), hex(fields[5])))
        .unwrap_or_else(|| panic!("no RW PT_LOAD:\n{headers}"));
    let symbols = readelf(&["-sW"]);
    let symbol = |name: &str| {
        symbols
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|fields| fields.last() == Some(&name))
            .map(|fields| hex(fields[1]))
            .unwrap_or_else(|| panic!("no symbol {name}"))
    };
    let (bss_start, bss_end) = (symbol("__bss_start"), symbol("__bss_end"));
    assert!(
        vaddr + filesz <= bss_start && bss_start - (vaddr + filesz) < 4096,
        "the file's bytes end at {:#x}, .bss starts at {bss_start:#x}",
        vaddr + filesz
    );
    assert_eq!(
        bss_end,
        vaddr + memsz,
        "__bss_end must be the writable segment's end"
    );
    let sections = readelf(&["-SW"]);
    let nobits: Vec<&str> = sections
        .lines()
        .filter(|line| line.contains(" NOBITS "))
        .collect();
    assert_eq!(nobits.len(), 1, "one NOBITS section, .bss:\n{nobits:#?}");
    assert!(nobits[0].contains(" .bss "), "{}", nobits[0]);
}
