//! Building the `hv` image.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The bare-metal target hv is built for.
pub const TARGET: &str = "x86_64-unknown-none";

/// The package (and binary) name of the hypervisor image.
pub const PACKAGE: &str = "hv";

/// Environment variable through which `cargo xtask test` hands the already
/// built ELF to the integration tests, so that they neither rebuild it nor
/// run `cargo build` while `cargo test` holds the build lock.
pub const ELF_ENV: &str = "HV_ELF";

/// Builds hv (release profile, bare-metal target) and returns the ELF path.
///
/// `target_dir` overrides cargo's target directory; the integration tests use
/// a directory of their own when they must build the image themselves.
pub fn build(target_dir: Option<&Path>) -> Result<PathBuf> {
    build_with_env(target_dir, &[])
}

/// Environment variable through which `cargo xtask test` hands the
/// capture-mode image (built by [`build_capture`] for the default
/// reservation) to the integration tests.
pub const CAPTURE_ELF_ENV: &str = "HV_CAPTURE_ELF";

/// Environment variable through which `hv/build.rs` links the image at
/// another address: the capture-mode image runs inside the crash
/// reservation.
pub const LINK_BASE_ENV: &str = "HV_LINK_BASE";

/// Builds the capture-mode image: hv linked at `link_base` (the crash
/// reservation's base, 2 MiB aligned), in a target directory of its own
/// (`target/hv-capture`) so that it never replaces the ordinary build.
pub fn build_capture(link_base: u64) -> Result<PathBuf> {
    if link_base == 0 || !link_base.is_multiple_of(0x20_0000) {
        bail!("the capture image's link base {link_base:#x} must be a non-zero multiple of 2 MiB");
    }
    let dir = crate::paths::workspace_root().join("target/hv-capture");
    build_with_env(Some(&dir), &[(LINK_BASE_ENV, format!("{link_base:#x}"))])
}

/// [`build`] with extra environment variables for cargo (and so for
/// `hv/build.rs`).
pub fn build_with_env(target_dir: Option<&Path>, env: &[(&str, String)]) -> Result<PathBuf> {
    crate::toolchain::ensure()?;
    let mut command = Command::new(cargo());
    command.envs(env.iter().map(|(key, value)| (key, value)));
    command
        .current_dir(crate::paths::workspace_root())
        .args([
            "build",
            "--package",
            PACKAGE,
            "--release",
            "--target",
            TARGET,
        ])
        // Machine-readable artefact messages on stdout (to find the ELF
        // wherever the target directory is), human diagnostics on stderr.
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(dir) = target_dir {
        command.env("CARGO_TARGET_DIR", dir);
    }
    let output = command
        .output()
        .context("could not run cargo to build hv")?;
    if !output.status.success() {
        bail!("building hv failed ({})", output.status);
    }
    let messages = String::from_utf8_lossy(&output.stdout);
    executable_from_messages(&messages, PACKAGE)
        .with_context(|| format!("cargo built {PACKAGE} but named no executable for it"))
}

/// The cargo that runs xtask (so the pinned toolchain builds hv), or `cargo`.
fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Finds the executable of binary `name` in cargo's JSON messages.
pub fn executable_from_messages(messages: &str, name: &str) -> Option<PathBuf> {
    // The last artefact wins, as cargo reports a binary after what it links.
    messages
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == name)
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_among_other_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"hv_core"},"executable":null}
not json at all
{"reason":"compiler-artifact","target":{"name":"hv"},"executable":"/t/x86_64-unknown-none/release/hv"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_from_messages(messages, "hv"),
            Some(PathBuf::from("/t/x86_64-unknown-none/release/hv"))
        );
    }

    #[test]
    fn no_executable_gives_none() {
        let messages = r#"{"reason":"build-finished","success":true}"#;
        assert_eq!(executable_from_messages(messages, "hv"), None);
    }
}
