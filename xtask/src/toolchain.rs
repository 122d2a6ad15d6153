//! The pinned toolchain's pieces, made sure of before anything is built.
//!
//! `rust-toolchain.toml` names a channel, a bare-metal target and some
//! components. rustup installs all of them when it installs the channel, but
//! rustup 1.29 does not add a toolchain file's targets or components to a
//! channel that is already installed: on such a machine the first build of
//! hv stops with "can't find crate for `core`". So xtask reads the file,
//! looks in the active toolchain's sysroot for each piece, and adds what is
//! missing with rustup (or names the one command to run when it cannot).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// What `rust-toolchain.toml` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pinned {
    /// `channel`, e.g. `1.95.0`.
    pub channel: Option<String>,
    /// `targets`.
    pub targets: Vec<String>,
    /// `components`.
    pub components: Vec<String>,
}

/// Reads the `[toolchain]` keys xtask needs from the file's text. Only the
/// forms rustup documents are understood: `key = "value"` and
/// `key = ["a", "b"]` on one line.
pub fn parse(text: &str) -> Pinned {
    let mut pinned = Pinned::default();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let strings = || -> Vec<String> {
            value
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .map(|item| item.trim().trim_matches('"').to_string())
                .filter(|item| !item.is_empty())
                .collect()
        };
        match key.trim() {
            "channel" => pinned.channel = strings().into_iter().next(),
            "targets" => pinned.targets = strings(),
            "components" => pinned.components = strings(),
            _ => {}
        }
    }
    pinned
}

/// A piece of the toolchain that the sysroot lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// A compilation target (its `core` and `alloc`).
    Target(String),
    /// A component such as clippy or rustfmt.
    Component(String),
}

/// The file in a sysroot that shows a component is installed, for the
/// components xtask knows; `None` for the others (not checked).
fn component_marker(component: &str) -> Option<&'static str> {
    match component {
        "clippy" => Some("bin/cargo-clippy"),
        "rustfmt" => Some("bin/rustfmt"),
        _ => None,
    }
}

/// What of `pinned` the sysroot at `sysroot` lacks.
pub fn missing_in(sysroot: &Path, pinned: &Pinned) -> Vec<Missing> {
    let mut missing = Vec::new();
    for target in &pinned.targets {
        let lib = sysroot.join("lib/rustlib").join(target).join("lib");
        let has_core = std::fs::read_dir(&lib).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|entry| entry.file_name().to_string_lossy().starts_with("libcore-"))
        });
        if !has_core {
            missing.push(Missing::Target(target.clone()));
        }
    }
    for component in &pinned.components {
        if let Some(marker) = component_marker(component)
            && !sysroot.join(marker).exists()
        {
            missing.push(Missing::Component(component.clone()));
        }
    }
    missing
}

/// The rustup command that installs `missing` for `channel`.
pub fn rustup_command(channel: Option<&str>, missing: &[Missing]) -> Vec<Vec<String>> {
    let toolchain: Vec<String> = channel
        .map(|channel| vec!["--toolchain".to_string(), channel.to_string()])
        .unwrap_or_default();
    let targets: Vec<String> = missing
        .iter()
        .filter_map(|piece| match piece {
            Missing::Target(target) => Some(target.clone()),
            Missing::Component(_) => None,
        })
        .collect();
    let components: Vec<String> = missing
        .iter()
        .filter_map(|piece| match piece {
            Missing::Component(component) => Some(component.clone()),
            Missing::Target(_) => None,
        })
        .collect();
    let mut commands = Vec::new();
    if !targets.is_empty() {
        let mut command = vec!["target".to_string(), "add".to_string()];
        command.extend(toolchain.iter().cloned());
        command.extend(targets);
        commands.push(command);
    }
    if !components.is_empty() {
        let mut command = vec!["component".to_string(), "add".to_string()];
        command.extend(toolchain.iter().cloned());
        command.extend(components);
        commands.push(command);
    }
    commands
}

fn sysroot(root: &Path) -> Result<PathBuf> {
    let output = Command::new("rustc")
        .current_dir(root)
        .args(["--print", "sysroot"])
        .output()
        .context("could not run rustc to find the toolchain's sysroot")?;
    if !output.status.success() {
        bail!(
            "rustc --print sysroot failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim().to_string(),
    ))
}

/// Makes sure the active toolchain has every target and component of
/// `rust-toolchain.toml`: adds what is missing with rustup, or fails with
/// the command to run.
pub fn ensure() -> Result<()> {
    let root = crate::paths::workspace_root();
    let file = root.join("rust-toolchain.toml");
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(());
    };
    let pinned = parse(&text);
    let sysroot = sysroot(&root)?;
    let missing = missing_in(&sysroot, &pinned);
    if missing.is_empty() {
        return Ok(());
    }
    for arguments in rustup_command(pinned.channel.as_deref(), &missing) {
        let shown = format!("rustup {}", arguments.join(" "));
        eprintln!("xtask: the toolchain lacks what rust-toolchain.toml pins; running {shown}");
        let status = Command::new("rustup")
            .current_dir(&root)
            .args(&arguments)
            .status();
        match status {
            Ok(status) if status.success() => {}
            Ok(status) => bail!("{shown} failed ({status}); run it by hand, then retry"),
            Err(error) => bail!("could not run rustup ({error}); run `{shown}` by hand"),
        }
    }
    let still = missing_in(&sysroot, &pinned);
    if !still.is_empty() {
        bail!("still missing after rustup: {still:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"[toolchain]
channel = "1.95.0"
targets = ["x86_64-unknown-none"]
components = ["clippy", "rustfmt"] # lints
profile = "minimal"
"#;

    #[test]
    fn reads_the_pinned_pieces() {
        assert_eq!(
            parse(FILE),
            Pinned {
                channel: Some("1.95.0".into()),
                targets: vec!["x86_64-unknown-none".into()],
                components: vec!["clippy".into(), "rustfmt".into()],
            }
        );
    }

    #[test]
    fn an_empty_sysroot_lacks_everything_known() {
        let dir = std::env::temp_dir().join(format!("xtask-sysroot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = missing_in(&dir, &parse(FILE));
        assert_eq!(
            missing,
            [
                Missing::Target("x86_64-unknown-none".into()),
                Missing::Component("clippy".into()),
                Missing::Component("rustfmt".into()),
            ]
        );
        std::fs::create_dir_all(dir.join("lib/rustlib/x86_64-unknown-none/lib")).unwrap();
        std::fs::write(
            dir.join("lib/rustlib/x86_64-unknown-none/lib/libcore-abc.rlib"),
            b"",
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/cargo-clippy"), b"").unwrap();
        std::fs::write(dir.join("bin/rustfmt"), b"").unwrap();
        assert!(missing_in(&dir, &parse(FILE)).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_rustup_command_per_kind() {
        let commands = rustup_command(
            Some("1.95.0"),
            &[
                Missing::Target("x86_64-unknown-none".into()),
                Missing::Component("clippy".into()),
            ],
        );
        assert_eq!(
            commands,
            [
                vec![
                    "target",
                    "add",
                    "--toolchain",
                    "1.95.0",
                    "x86_64-unknown-none"
                ],
                vec!["component", "add", "--toolchain", "1.95.0", "clippy"],
            ]
        );
    }
}
