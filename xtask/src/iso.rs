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

/// The GRUB configuration: boot hv at once, talking on COM1 at 115200 baud
/// so that GRUB's own messages land in the same serial log as hv's.
pub fn grub_cfg(cmdline: &str) -> String {
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
         \x20   boot\n\
         }}\n"
    )
}

/// Builds `<run_dir>/hv.iso` holding `elf` and a config that passes
/// `cmdline`, and returns its path.
pub fn make_iso(elf: &Path, cmdline: &str, run_dir: &Path) -> Result<PathBuf> {
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
    fs::write(grub_dir.join("grub.cfg"), grub_cfg(cmdline)).context("writing grub.cfg")?;

    let iso = run_dir.join("hv.iso");
    let output = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&tree)
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
    fn serial_is_set_up_before_the_menu() {
        let cfg = grub_cfg("finish=exit");
        assert!(cfg.find("terminal_output serial") < cfg.find("menuentry"));
    }
}
