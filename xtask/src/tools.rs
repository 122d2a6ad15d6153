//! The host programs and files a run needs, and the Debian packages that
//! bring them.
//!
//! Before an emulator starts, every requirement of the run is probed. What is
//! missing is installed with apt when xtask runs as root (as CI does on a
//! fresh machine); otherwise xtask prints the one apt command to run and
//! fails, rather than letting an emulator fail later with a vaguer message.

use std::env;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// What a run is going to do, each implying a set of requirements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Boot in QEMU.
    Qemu,
    /// Make the hybrid BIOS/UEFI GRUB ISO.
    GrubIso,
    /// Boot QEMU on UEFI firmware.
    Ovmf,
    /// Boot in Bochs.
    Bochs,
}

impl Need {
    /// Everything any run may need: what `cargo xtask test` checks up front.
    pub const ALL: [Need; 4] = [Need::Qemu, Need::GrubIso, Need::Ovmf, Need::Bochs];
}

/// How to tell whether a requirement is met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A program on `PATH`.
    Program(&'static str),
    /// Any one of these files.
    AnyFile(&'static [&'static str]),
    /// A file whose name starts with `prefix` in any of `dirs`.
    FileWithPrefix {
        /// Directories to look in.
        dirs: &'static [&'static str],
        /// The start of the file name.
        prefix: &'static str,
    },
}

/// One thing a run needs from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// What it is, for messages.
    pub what: &'static str,
    /// The Debian package that provides it.
    pub package: &'static str,
    /// How to find it.
    pub probe: Probe,
}

/// UEFI firmware images, in order of preference (see [`crate::run`]).
pub const OVMF_FILES: &[&str] = &[
    "/usr/share/OVMF/OVMF_CODE.fd",
    "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "/usr/share/ovmf/OVMF.fd",
];

/// Where Debian puts Bochs' plugins (the path has moved between releases).
pub const BOCHS_PLUGIN_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/bochs/plugins",
    "/usr/lib/bochs/plugins",
];

/// Bochs' system BIOS.
pub const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";

/// The VGA BIOS Bochs loads.
pub const VGA_BIOS: &str = "/usr/share/vgabios/vgabios.bin";

/// The requirements of one need.
pub fn requirements(need: Need) -> &'static [Requirement] {
    match need {
        Need::Qemu => &[Requirement {
            what: "qemu-system-x86_64",
            package: "qemu-system-x86",
            probe: Probe::Program("qemu-system-x86_64"),
        }],
        Need::GrubIso => &[
            Requirement {
                what: "grub-mkrescue",
                package: "grub-common",
                probe: Probe::Program("grub-mkrescue"),
            },
            Requirement {
                what: "GRUB BIOS modules",
                package: "grub-pc-bin",
                probe: Probe::AnyFile(&["/usr/lib/grub/i386-pc/multiboot2.mod"]),
            },
            Requirement {
                what: "GRUB UEFI modules",
                package: "grub-efi-amd64-bin",
                probe: Probe::AnyFile(&["/usr/lib/grub/x86_64-efi/multiboot2.mod"]),
            },
            Requirement {
                what: "xorriso",
                package: "xorriso",
                probe: Probe::Program("xorriso"),
            },
            Requirement {
                what: "mformat",
                package: "mtools",
                probe: Probe::Program("mformat"),
            },
        ],
        Need::Ovmf => &[Requirement {
            what: "OVMF UEFI firmware",
            package: "ovmf",
            probe: Probe::AnyFile(OVMF_FILES),
        }],
        Need::Bochs => &[
            Requirement {
                what: "bochs",
                package: "bochs",
                probe: Probe::Program("bochs"),
            },
            Requirement {
                what: "Bochs term display plugin",
                package: "bochs-term",
                probe: Probe::FileWithPrefix {
                    dirs: BOCHS_PLUGIN_DIRS,
                    prefix: "libbx_term",
                },
            },
            Requirement {
                what: "Bochs BIOS",
                package: "bochsbios",
                probe: Probe::AnyFile(&[BOCHS_BIOS]),
            },
            Requirement {
                what: "VGA BIOS",
                package: "vgabios",
                probe: Probe::AnyFile(&[VGA_BIOS]),
            },
        ],
    }
}

/// Whether a probe finds its program or file on this host.
pub fn is_present(probe: Probe) -> bool {
    match probe {
        Probe::Program(name) => env::var_os("PATH")
            .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(name).is_file())),
        Probe::AnyFile(files) => files.iter().any(|file| Path::new(file).is_file()),
        Probe::FileWithPrefix { dirs, prefix } => dirs.iter().any(|dir| {
            fs::read_dir(dir).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|entry| entry.file_name().to_string_lossy().starts_with(prefix))
            })
        }),
    }
}

/// The requirements of `needs` that `present` does not find.
pub fn missing(needs: &[Need], present: impl Fn(Probe) -> bool) -> Vec<Requirement> {
    let mut missing: Vec<Requirement> = Vec::new();
    for need in needs {
        for requirement in requirements(*need) {
            if !present(requirement.probe) && !missing.contains(requirement) {
                missing.push(*requirement);
            }
        }
    }
    missing
}

/// The distinct packages that provide `requirements`, in order.
pub fn packages(requirements: &[Requirement]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = Vec::new();
    for requirement in requirements {
        if !packages.contains(&requirement.package) {
            packages.push(requirement.package);
        }
    }
    packages
}

/// The one shell command that installs `packages`.
pub fn apt_command(packages: &[&str]) -> String {
    format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
        packages.join(" ")
    )
}

/// The effective user id from the text of `/proc/self/status`.
pub fn effective_uid(status: &str) -> Option<u32> {
    let ids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    ids.split_whitespace().nth(1)?.parse().ok()
}

/// Serialises installs: parallel integration tests must not race for the
/// dpkg lock.
static INSTALL: Mutex<()> = Mutex::new(());

/// Makes sure everything `needs` requires is on the host: installs what is
/// missing when running as root, otherwise fails with the apt command.
pub fn ensure(needs: &[Need]) -> Result<()> {
    let _serialised = INSTALL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let absent = missing(needs, is_present);
    if absent.is_empty() {
        return Ok(());
    }
    let packages = packages(&absent);
    let names: Vec<&str> = absent.iter().map(|r| r.what).collect();
    let is_root = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_uid(&status))
        == Some(0);
    if !is_root {
        bail!(
            "missing on this host: {}\ninstall them with:\n  sudo sh -c '{}'",
            names.join(", "),
            apt_command(&packages)
        );
    }
    eprintln!(
        "xtask: installing {} (for {})",
        packages.join(" "),
        names.join(", ")
    );
    run_apt(&["update"])?;
    let mut install = vec!["install", "-y"];
    install.extend(&packages);
    run_apt(&install)?;

    let still_absent = missing(needs, is_present);
    if !still_absent.is_empty() {
        let names: Vec<&str> = still_absent.iter().map(|r| r.what).collect();
        bail!("still missing after installing: {}", names.join(", "));
    }
    Ok(())
}

fn run_apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("could not run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_missing_when_everything_is_present() {
        assert!(missing(&Need::ALL, |_| true).is_empty());
    }

    #[test]
    fn missing_bochs_pieces_map_to_their_packages() {
        let absent = missing(&[Need::Qemu, Need::Bochs], |probe| {
            !matches!(
                probe,
                Probe::FileWithPrefix { .. } | Probe::Program("bochs")
            )
        });
        assert_eq!(packages(&absent), ["bochs", "bochs-term"]);
    }

    #[test]
    fn the_apt_command_installs_every_package_once() {
        let absent = missing(&[Need::GrubIso, Need::GrubIso, Need::Ovmf], |_| false);
        let command = apt_command(&packages(&absent));
        assert_eq!(
            command,
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
             grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools ovmf"
        );
    }

    #[test]
    fn every_package_ci_installs_is_covered() {
        let all = packages(&missing(&Need::ALL, |_| false));
        for package in [
            "qemu-system-x86",
            "grub-pc-bin",
            "grub-efi-amd64-bin",
            "grub-common",
            "xorriso",
            "mtools",
            "ovmf",
            "bochs",
            "bochs-term",
            "bochsbios",
            "vgabios",
        ] {
            assert!(all.contains(&package), "{package} not required by any need");
        }
    }

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\txtask\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name: x\n"), None);
    }
}
