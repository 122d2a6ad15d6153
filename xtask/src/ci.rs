//! `cargo xtask test`: everything CI runs, in order.
//!
//! 0. Lints: `cargo fmt --check`, clippy with `-D warnings` for the host
//!    crates and for hv on `x86_64-unknown-none`, rustdoc with warnings
//!    denied. A warning fails the run.
//! 1. `cargo test` at the workspace root: the host unit tests of the default
//!    members (the logic crates and xtask itself).
//! 2. The emulators and image tools, installed if missing (as root).
//! 3. hv, built once.
//! 4. `cargo test -p tests`: the integration tests, which boot hv in QEMU and
//!    Bochs. They get the ELF through [`crate::kernel::ELF_ENV`] because a
//!    `cargo build` started from inside a running `cargo test` on the same
//!    target directory could wait forever for the build lock.

use std::ffi::OsString;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::paths::workspace_root;
use crate::tools::{self, Need};
use crate::{capture, kernel};

/// Runs the whole test suite; `harness_args` go to the integration tests'
/// harness (e.g. a test name filter or `--nocapture`).
pub fn run_all(harness_args: &[OsString]) -> Result<()> {
    step("lints: rustfmt, clippy, rustdoc");
    lints()?;

    step("host unit tests");
    cargo(&["test", "--no-fail-fast"], &[], &[])?;

    step("host tools");
    tools::ensure(&Need::ALL)?;

    step("building hv");
    let elf = kernel::build(None)?;
    eprintln!("hv: {}", elf.display());
    // The capture-mode image, linked at the default reservation's base.
    let (_, base) = capture::parse_crashkernel(capture::HV_CRASHKERNEL)?;
    let capture_elf = kernel::build_capture(base.context("the default reservation has a base")?)?;
    eprintln!("hv capture mode: {}", capture_elf.display());

    step("integration tests (QEMU, Bochs)");
    let env = [
        (kernel::ELF_ENV, elf.into_os_string()),
        (kernel::CAPTURE_ELF_ENV, capture_elf.into_os_string()),
    ];
    cargo(
        &["test", "--no-fail-fast", "--package", "tests"],
        &env,
        harness_args,
    )
}

/// Every lint CI holds the tree to: a difference or a warning fails.
pub fn lints() -> Result<()> {
    crate::toolchain::ensure()?;
    cargo(&["fmt", "--all", "--check"], &[], &[])?;
    cargo(
        &[
            "clippy",
            "--workspace",
            "--exclude",
            kernel::PACKAGE,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
        &[],
    )?;
    cargo(
        &[
            "clippy",
            "--package",
            kernel::PACKAGE,
            "--release",
            "--target",
            kernel::TARGET,
            "--",
            "-D",
            "warnings",
        ],
        &[],
        &[],
    )?;
    let deny = [("RUSTDOCFLAGS", OsString::from("-D warnings"))];
    cargo(
        &[
            "doc",
            "--workspace",
            "--exclude",
            kernel::PACKAGE,
            "--no-deps",
        ],
        &deny,
        &[],
    )?;
    cargo(
        &[
            "doc",
            "--package",
            kernel::PACKAGE,
            "--target",
            kernel::TARGET,
            "--no-deps",
        ],
        &deny,
        &[],
    )
}

fn step(name: &str) {
    eprintln!("\n==> {name}");
}

/// Runs `cargo <args> [-- <harness_args>]` at the workspace root.
fn cargo(args: &[&str], env: &[(&str, OsString)], harness_args: &[OsString]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace_root()).args(args);
    if !harness_args.is_empty() {
        command.arg("--").args(harness_args);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let status = command
        .status()
        .with_context(|| format!("could not run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
