//! Links the bare-metal image with `linker.ld`. `HV_LINK_BASE` (hex) moves
//! the image: the capture-mode build runs inside the crash reservation, so
//! it must not overlap the crashed hypervisor it is dumping.
//!
//! Also builds the purgatory blob (`kexec-loader/purgatory/`) with `rustc`
//! alone, for `x86_64-unknown-none` as a static position-independent
//! executable linked at 0, and cuts it into `$OUT_DIR/purgatory.bin`. The
//! build fails when the blob would need a relocation (it runs wherever it
//! is copied), holds writable data, or outgrows its room.

use std::path::Path;
use std::process::Command;

use object::read::elf::ElfFile64;
use object::{Endianness, Object, ObjectSection, ObjectSymbol, SectionKind};

#[path = "../kexec-loader/purgatory/abi.rs"]
mod purgatory_abi;

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=HV_LINK_BASE");
    // `HV_LINK_BASE` makes the capture image: `cfg(hv_capture_build)`.
    println!("cargo::rustc-check-cfg=cfg(hv_capture_build)");
    if std::env::var_os("HV_LINK_BASE").is_some() {
        println!("cargo::rustc-cfg=hv_capture_build");
    }
    // The kernel includes the blob whatever the target, so a host `cargo
    // check` of the workspace builds it too.
    build_purgatory(Path::new(&dir), Path::new(&out));
    // Only the bare-metal build gets the linker script: a host `cargo check`
    // of the workspace must not try to link a kernel.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("none") {
        return;
    }
    let script =
        std::fs::read_to_string(format!("{dir}/linker.ld")).expect("hv/linker.ld is readable");
    let script = match std::env::var("HV_LINK_BASE") {
        Ok(base) => {
            let digits = base.trim_start_matches("0x");
            let value = u64::from_str_radix(digits, 16)
                .unwrap_or_else(|_| panic!("HV_LINK_BASE={base} is not hexadecimal"));
            assert!(
                value % 0x20_0000 == 0 && value < 0xF000_0000,
                "HV_LINK_BASE must be 2 MiB aligned and below 3.75 GiB"
            );
            script.replace(". = 0x200000;", &format!(". = {value:#x};"))
        }
        Err(_) => script,
    };
    let path = format!("{out}/linker.ld");
    std::fs::write(&path, script).expect("OUT_DIR is writable");
    println!("cargo:rustc-link-arg-bins=-T{path}");
    println!("cargo:rustc-link-arg-bins=-znoexecstack");
    // A GNU build ID note (kept and loaded by linker.ld): drgn matches the
    // ELF given with `-s` to a dump by it, debuginfod finds files by it.
    println!("cargo:rustc-link-arg-bins=--build-id=sha1");
}

/// Compiles, links, checks and cuts the purgatory blob.
fn build_purgatory(manifest_dir: &Path, out: &Path) {
    let source = manifest_dir.join("../kexec-loader/purgatory");
    for file in [
        "main.rs",
        "abi.rs",
        "check.rs",
        "sha256.rs",
        "xxh64.rs",
        "link.ld",
    ] {
        println!("cargo:rerun-if-changed={}", source.join(file).display());
    }
    let elf = out.join("purgatory.elf");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let result = Command::new(rustc)
        .args(["--edition", "2024", "--crate-type", "bin"])
        .args(["--crate-name", "hv_purgatory"])
        .args(["--target", "x86_64-unknown-none"])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "codegen-units=1",
        ])
        // Position-independent, and calls into compiler-builtins (memcpy)
        // through PC-relative PLT relocations the static link resolves,
        // not through GOT slots that would need relocating at run time.
        .args(["-C", "relocation-model=pie", "-C", "code-model=small"])
        .args(["-C", "relro-level=off", "-C", "debuginfo=0"])
        .args(["-D", "warnings"])
        .arg("-C")
        .arg(format!("link-arg=-T{}", source.join("link.ld").display()))
        .arg("-o")
        .arg(&elf)
        .arg(source.join("main.rs"))
        .output()
        .expect("running rustc for the purgatory");
    if !result.status.success() {
        panic!(
            "building the purgatory failed:\n{}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let bytes = std::fs::read(&elf).expect("the purgatory ELF was just written");
    let blob = match flat_blob(&bytes) {
        Ok(blob) => blob,
        Err(why) => panic!("the purgatory blob {}: {why}", elf.display()),
    };
    std::fs::write(out.join("purgatory.bin"), blob).expect("OUT_DIR is writable");
}

/// The `.blob` section of the linked purgatory, after checking that it can
/// run wherever it is copied.
fn flat_blob(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let file = ElfFile64::<Endianness>::parse(bytes).map_err(|e| format!("not ELF64: {e}"))?;
    if file
        .dynamic_relocations()
        .is_some_and(|mut r| r.next().is_some())
    {
        return Err("needs dynamic relocations (an absolute address in code or data)".into());
    }
    let mut blob = None;
    for section in file.sections() {
        let name = section.name().unwrap_or("?");
        let relocations = matches!(
            section.kind(),
            SectionKind::Elf(object::elf::SHT_RELA | object::elf::SHT_REL)
        ) || name.starts_with(".rela")
            || name.starts_with(".rel.");
        if relocations && section.size() > 0 {
            return Err(format!("has relocations in {name}"));
        }
        if name == ".writable" && section.size() > 0 {
            return Err("holds writable data (.data or .bss)".into());
        }
        if name == ".blob" {
            if section.address() != 0 {
                return Err(format!("starts at {:#x}, not 0", section.address()));
            }
            let data = section.data().map_err(|e| format!(".blob: {e}"))?;
            blob = Some(data.to_vec());
        }
    }
    let blob = blob.ok_or("has no .blob section")?;
    let head = file
        .symbols()
        .find(|symbol| symbol.name() == Ok("purgatory_head"))
        .ok_or("has no purgatory_head")?;
    if head.address() != 0 {
        return Err(format!("enters at {:#x}, not 0", head.address()));
    }
    if blob.len() > purgatory_abi::BLOB_MAX {
        return Err(format!(
            "takes {} bytes, more than its {} in the area",
            blob.len(),
            purgatory_abi::BLOB_MAX
        ));
    }
    let magic = purgatory_abi::blob_header::MAGIC;
    if blob.get(magic..magic + 8) != Some(&purgatory_abi::blob_header::MAGIC_VALUE[..]) {
        return Err("has no header magic".into());
    }
    Ok(blob)
}
