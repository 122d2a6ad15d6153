//! Links the bare-metal image with `linker.ld`. `HV_LINK_BASE` (hex) moves
//! the image: the capture-mode build runs inside the crash reservation, so
//! it must not overlap the crashed hypervisor it is dumping.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=HV_LINK_BASE");
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
