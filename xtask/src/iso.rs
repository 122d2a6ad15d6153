//! The bootable GRUB ISO: one image for SeaBIOS, OVMF and Bochs.
//!
//! `grub-mkrescue` makes a hybrid image (BIOS El Torito + EFI system
//! partition) when both `grub-pc-bin` and `grub-efi-amd64-bin` are installed;
//! GRUB then loads hv through multiboot2 with the console on COM1.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Where the ELF sits inside the ISO.
const ELF_IN_ISO: &str = "boot/hv";

/// A boot module: a file GRUB loads next to hv (`module2`), with the
/// command line hv tells modules apart by (`capture`, `capture-initrd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootModule {
    /// The file to load.
    pub file: PathBuf,
    /// Its command line (the first word is its role).
    pub cmdline: String,
}

/// The GRUB configuration: boot hv at once, talking on COM1 at 115200 baud
/// so that GRUB's own messages land in the same serial log as hv's.
pub fn grub_cfg(cmdline: &str) -> String {
    grub_cfg_with_modules(cmdline, &[])
}

/// [`grub_cfg`] with `module2` lines, one per entry of `modules`: the
/// path of the module inside the ISO and its command line.
pub fn grub_cfg_with_modules(cmdline: &str, modules: &[(String, String)]) -> String {
    let mut lines = String::new();
    for (path, module_cmdline) in modules {
        lines.push_str(&format!("    module2 /{path} {module_cmdline}\n"));
    }
    format!(
        "# Written by cargo xtask: boot hv at once, console on COM1.\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial\n\
         terminal_output serial\n\
         set timeout=0\n\
         set default=0\n\
         \n\
         menuentry \"hv\" {{\n\
         \x20   multiboot2 /{ELF_IN_ISO} {cmdline}\n\
         {lines}\
         \x20   boot\n\
         }}\n"
    )
}

/// Builds `<run_dir>/hv.iso` holding `elf` and a config that passes
/// `cmdline`, and returns its path.
pub fn make_iso(elf: &Path, cmdline: &str, run_dir: &Path) -> Result<PathBuf> {
    make_iso_with_modules(elf, cmdline, &[], run_dir)
}

/// [`make_iso`] with boot modules, copied into the ISO's `boot/` as
/// `module0`, `module1`, ... Their command lines go through GRUB's parser
/// like hv's and are checked the same way.
pub fn make_iso_with_modules(
    elf: &Path,
    cmdline: &str,
    modules: &[BootModule],
    run_dir: &Path,
) -> Result<PathBuf> {
    for module in modules {
        crate::cmdline::kernel_cmdline(&crate::cmdline::split_words(&module.cmdline))?;
    }
    let tree = run_dir.join("iso");
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    let grub_dir = tree.join("boot/grub");
    fs::create_dir_all(&grub_dir).with_context(|| format!("creating {}", grub_dir.display()))?;
    // A copy, not a link: the ISO must hold this very build even if cargo
    // rebuilds the ELF while an emulator still reads the image.
    fs::copy(elf, tree.join(ELF_IN_ISO))
        .with_context(|| format!("copying {} into the ISO tree", elf.display()))?;
    let mut lines = Vec::new();
    for (i, module) in modules.iter().enumerate() {
        let path = format!("boot/module{i}");
        fs::copy(&module.file, tree.join(&path))
            .with_context(|| format!("copying {} into the ISO tree", module.file.display()))?;
        lines.push((path, module.cmdline.clone()));
    }
    fs::write(
        grub_dir.join("grub.cfg"),
        grub_cfg_with_modules(cmdline, &lines),
    )
    .context("writing grub.cfg")?;
    mkrescue(&tree, run_dir)
}

/// A GRUB ISO with exactly `grub_cfg` as its `boot/grub/grub.cfg` and
/// `files` (source, path inside the ISO) beside it: for a configuration
/// written elsewhere, such as the README's stanza.
pub fn make_iso_from_config(
    files: &[(PathBuf, String)],
    grub_cfg: &str,
    run_dir: &Path,
) -> Result<PathBuf> {
    let tree = run_dir.join("iso");
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    let grub_dir = tree.join("boot/grub");
    fs::create_dir_all(&grub_dir).with_context(|| format!("creating {}", grub_dir.display()))?;
    for (source, inside) in files {
        let inside = inside.trim_start_matches('/');
        if inside.is_empty()
            || inside
                .split('/')
                .any(|part| part == ".." || part.is_empty())
        {
            bail!("`{inside}` is not a plain path inside the ISO");
        }
        let destination = tree.join(inside);
        if let Some(parent) = destination.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::copy(source, &destination)
            .with_context(|| format!("copying {} into the ISO tree", source.display()))?;
    }
    fs::write(grub_dir.join("grub.cfg"), grub_cfg).context("writing grub.cfg")?;
    mkrescue(&tree, run_dir)
}

/// `grub-mkrescue` of `tree` into `<run_dir>/hv.iso`.
fn mkrescue(tree: &Path, run_dir: &Path) -> Result<PathBuf> {
    let iso = run_dir.join("hv.iso");
    let output = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(tree)
        .output()
        .context("could not run grub-mkrescue")?;
    if !output.status.success() {
        bail!(
            "grub-mkrescue failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_boots_at_once_on_the_serial_console() {
        let cfg = grub_cfg("finish=exit log=debug");
        for line in [
            "serial --unit=0 --speed=115200",
            "terminal_input serial",
            "terminal_output serial",
            "set timeout=0",
            "set default=0",
            "    multiboot2 /boot/hv finish=exit log=debug",
            "    boot",
        ] {
            assert!(cfg.lines().any(|l| l == line), "missing {line:?} in\n{cfg}");
        }
    }

    #[test]
    fn modules_follow_the_kernel_with_their_command_lines() {
        let cfg = grub_cfg_with_modules(
            "finish=exit crashkernel=256M",
            &[
                ("boot/module0".into(), "capture console=ttyS0".into()),
                ("boot/module1".into(), "capture-initrd".into()),
            ],
        );
        let kernel = cfg
            .find("    multiboot2 /boot/hv finish=exit crashkernel=256M\n")
            .unwrap();
        let first = cfg
            .find("    module2 /boot/module0 capture console=ttyS0\n")
            .unwrap();
        let second = cfg
            .find("    module2 /boot/module1 capture-initrd\n")
            .unwrap();
        let boot = cfg.find("    boot\n").unwrap();
        assert!(kernel < first && first < second && second < boot, "{cfg}");
        assert_eq!(grub_cfg("x"), grub_cfg_with_modules("x", &[]));
    }

    #[test]
    fn serial_is_set_up_before_the_menu() {
        let cfg = grub_cfg("finish=exit");
        assert!(cfg.find("terminal_output serial") < cfg.find("menuentry"));
    }
}
