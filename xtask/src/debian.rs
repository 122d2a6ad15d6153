//! Debian packages that the Linux capture kernel is made of, fetched with
//! the ordinary apt client into `build/` and unpacked with `dpkg-deb -x`:
//!
//! - the kernel package behind `linux-image-amd64` (the same one `cargo
//!   xtask bench bringup` boots): its `vmlinuz`, and the modules a
//!   virtio-blk disk needs, with every module they depend on (Debian's 6.1
//!   builds virtio, virtio_pci and virtio_blk as modules; the package ships
//!   no `modules.dep`, `depmod` writes it at install time, so the
//!   dependencies are read from each module's `.modinfo` section);
//! - `busybox-static`, the initramfs' whole userspace.
//!
//! What is kept lives in `build/linux/<package>/` and
//! `build/busybox-static/`; the `.deb` files and the unpacked trees are
//! deleted once the few files needed are out.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection};

use crate::bench::versioned_kernel_package;
use crate::paths;

/// The Debian metapackage that depends on the current kernel package.
pub(crate) const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// The statically linked busybox package.
const BUSYBOX_PACKAGE: &str = "busybox-static";

/// The modules the capture kernel needs for a virtio-blk disk on QEMU's
/// q35 (virtio over PCI); their dependencies are added.
pub const DISK_MODULES: [&str; 2] = ["virtio_pci", "virtio_blk"];

/// The file listing the kept modules in load order, one name a line.
const LOAD_ORDER: &str = "load-order";

/// The Linux kernel and its disk modules, ready for the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxKit {
    /// The versioned package, e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// The modules to `insmod`, in load order (dependencies first), each
    /// an uncompressed `.ko`.
    pub modules: Vec<(String, PathBuf)>,
}

/// Debian's current kernel with the modules of [`DISK_MODULES`], fetched
/// the first time and reused afterwards.
pub fn linux_kit() -> Result<LinuxKit> {
    let package = kernel_package()?;
    let dir = paths::build_dir().join("linux").join(&package);
    let vmlinuz = dir.join("vmlinuz");
    let modules_dir = dir.join("modules");
    let kept = || {
        let modules = kept_modules(&modules_dir).ok()?;
        vmlinuz.is_file().then(|| LinuxKit {
            package: package.clone(),
            vmlinuz: vmlinuz.clone(),
            modules,
        })
    };
    if let Some(kit) = kept() {
        return Ok(kit);
    }
    // Parallel tests may all find it missing: one fetches, the others wait
    // and then find it there.
    let _turn = paths::lock_dir(&dir)?;
    if let Some(kit) = kept() {
        return Ok(kit);
    }
    eprintln!("capture: fetching {package} (the Linux capture kernel and its disk modules)");
    let root = unpack(&package, &dir)?;
    let result = (|| {
        if !vmlinuz.is_file() {
            let image = find_in(&root.join("boot"), |name| name.starts_with("vmlinuz-"))
                .with_context(|| format!("{package} holds no boot/vmlinuz-*"))?;
            fs::copy(&image, &vmlinuz).with_context(|| format!("copying {}", image.display()))?;
        }
        let tree = module_tree(&root)?;
        keep_modules(&tree, &DISK_MODULES, &modules_dir)
    })();
    // The rest of the package is hundreds of MB that nothing needs.
    let _ = fs::remove_dir_all(&root);
    let modules = result?;
    Ok(LinuxKit {
        package,
        vmlinuz,
        modules,
    })
}

/// Debian's statically linked busybox, fetched the first time.
pub fn busybox() -> Result<PathBuf> {
    let dir = paths::build_dir().join(BUSYBOX_PACKAGE);
    let binary = dir.join("busybox");
    if binary.is_file() {
        return Ok(binary);
    }
    let _turn = paths::lock_dir(&dir)?;
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!("capture: fetching {BUSYBOX_PACKAGE} (the capture initramfs' userspace)");
    let root = unpack(BUSYBOX_PACKAGE, &dir)?;
    let result = fs::copy(root.join("bin/busybox"), &binary)
        .with_context(|| format!("{BUSYBOX_PACKAGE} holds no bin/busybox"));
    let _ = fs::remove_dir_all(&root);
    result?;
    Ok(binary)
}

/// The versioned kernel package behind [`KERNEL_METAPACKAGE`], updating
/// the package lists once if a fresh machine has none.
pub(crate) fn kernel_package() -> Result<String> {
    let lookup = || -> Result<Option<String>> {
        let output = Command::new("apt-cache")
            .args(["depends", KERNEL_METAPACKAGE])
            .stderr(Stdio::null())
            .output()
            .context("could not run apt-cache (a Debian host is needed to fetch Linux)")?;
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(versioned_kernel_package(&text).map(str::to_owned))
    };
    if let Some(package) = lookup()? {
        return Ok(package);
    }
    apt_update()?;
    lookup()?
        .with_context(|| format!("apt-cache names no kernel package behind {KERNEL_METAPACKAGE}"))
}

fn apt_update() -> Result<()> {
    let status = Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .context("could not run apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed ({status})");
    }
    Ok(())
}

/// `apt-get download PACKAGE` into `dir` (the ordinary apt client; its
/// stderr is shown only when it fails: as root it warns that the download
/// ran unsandboxed).
pub(crate) fn apt_download(package: &str, dir: &Path) -> Result<()> {
    let output = Command::new("apt-get")
        .args(["download", package])
        .current_dir(dir)
        .output()
        .context("could not run apt-get download")?;
    if !output.status.success() {
        bail!(
            "apt-get download {package} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// `dpkg-deb -x DEB INTO`: the package's files, unpacked.
pub(crate) fn dpkg_extract(deb: &Path, into: &Path) -> Result<()> {
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(into)
        .status()
        .context("could not run dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed ({status})", deb.display());
    }
    Ok(())
}

/// Downloads `package` into `dir` and unpacks it into `dir/root`; the
/// `.deb` is removed.
fn unpack(package: &str, dir: &Path) -> Result<PathBuf> {
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    apt_download(package, dir)?;
    let deb = find_in(dir, |name| name.ends_with(".deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
    let extracted = dpkg_extract(&deb, &root);
    let _ = fs::remove_file(&deb);
    extracted?;
    Ok(root)
}

/// Downloads `packages` into `dir` (one `apt-get download`, updating the
/// package lists once if a fresh machine has none) and unpacks each into
/// `root`, which may already hold others; the `.deb` files are removed.
pub(crate) fn download_and_extract(packages: &[&str], dir: &Path, root: &Path) -> Result<()> {
    let download = || {
        Command::new("apt-get")
            .arg("download")
            .args(packages)
            .current_dir(dir)
            .output()
            .context("could not run apt-get download")
    };
    let mut output = download()?;
    if !output.status.success() {
        apt_update()?;
        output = download()?;
    }
    if !output.status.success() {
        bail!(
            "apt-get download {} failed ({}):\n{}",
            packages.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let debs: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "deb"))
        .collect();
    let mut result = Ok(());
    for deb in &debs {
        if result.is_ok() {
            result = dpkg_extract(deb, root);
        }
    }
    for deb in &debs {
        let _ = fs::remove_file(deb);
    }
    result
}

/// The packages `package` depends on (`Depends:` and its alternatives, as
/// `apt-cache depends` lists them; virtual packages left out).
pub(crate) fn depends(package: &str) -> Result<Vec<String>> {
    let output = Command::new("apt-cache")
        .args(["depends", package])
        .stderr(Stdio::null())
        .output()
        .context("could not run apt-cache")?;
    Ok(parse_depends(&String::from_utf8_lossy(&output.stdout)))
}

/// The `Depends:` names of `apt-cache depends` output.
pub(crate) fn parse_depends(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            line.trim_start()
                .trim_start_matches('|')
                .strip_prefix("Depends:")
        })
        .map(str::trim)
        .filter(|name| !name.starts_with('<'))
        .map(|name| name.split(':').next().unwrap_or(name).to_owned())
        .collect()
}

/// The first entry of `dir` whose file name satisfies `wanted`.
fn find_in(dir: &Path, wanted: impl Fn(&str) -> bool) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| wanted(&name.to_string_lossy()))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Every module file under the package's `lib/modules/<version>/`, by
/// module name (`-` read as `_`, as the kernel does).
fn module_tree(root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let base = root.join("lib/modules");
    let version = find_in(&base, |_| true)
        .with_context(|| format!("no kernel version directory in {}", base.display()))?;
    let mut tree = BTreeMap::new();
    let mut pending = vec![version];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(name) = module_name(&path) {
                tree.insert(name, path);
            }
        }
    }
    Ok(tree)
}

/// The module name of a `.ko` or `.ko.xz` file.
pub fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))?;
    Some(stem.replace('-', "_"))
}

/// A module file's ELF bytes: `.ko.xz` is decompressed here, so that the
/// initramfs needs no decompressor and busybox's `insmod` takes it as is.
pub fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.to_string_lossy();
    if name.ends_with(".ko.xz") {
        let mut elf = Vec::new();
        lzma_rs::xz_decompress(&mut raw.as_slice(), &mut elf)
            .map_err(|error| anyhow::anyhow!("decompressing {name}: {error}"))?;
        Ok(elf)
    } else if name.ends_with(".ko.zst") || name.ends_with(".ko.gz") {
        bail!("{name}: only plain and xz-compressed modules are supported")
    } else {
        Ok(raw)
    }
}

/// The `depends=` list of a module's `.modinfo` section (empty when it
/// depends on nothing).
pub fn modinfo_depends(elf: &[u8]) -> Result<Vec<String>> {
    let file = object::File::parse(elf).context("not an ELF module")?;
    let section = file
        .section_by_name(".modinfo")
        .context("the module has no .modinfo section")?;
    let data = section.data().context("reading .modinfo")?;
    let depends = data
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(b"depends="))
        .unwrap_or_default();
    Ok(std::str::from_utf8(depends)
        .context(".modinfo depends= is not UTF-8")?
        .split(',')
        .filter(|name| !name.is_empty())
        .map(|name| name.replace('-', "_"))
        .collect())
}

/// The load order of `targets` and everything they depend on:
/// dependencies before their users, each module once. `depends` gives a
/// module's direct dependencies.
pub fn load_order(
    targets: &[&str],
    mut depends: impl FnMut(&str) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        depends: &mut dyn FnMut(&str) -> Result<Vec<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
        }
        path.push(name.to_owned());
        for dependency in depends(name)? {
            visit(&dependency, depends, path, done, order)?;
        }
        path.pop();
        done.insert(name.to_owned());
        order.push(name.to_owned());
        Ok(())
    }
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for target in targets {
        visit(target, &mut depends, &mut Vec::new(), &mut done, &mut order)?;
    }
    Ok(order)
}

/// Copies `targets` and their dependencies out of `tree` into `dest` as
/// plain `.ko` files, writes their load order, and returns them in it.
fn keep_modules(
    tree: &BTreeMap<String, PathBuf>,
    targets: &[&str],
    dest: &Path,
) -> Result<Vec<(String, PathBuf)>> {
    let mut elves = BTreeMap::new();
    let order = load_order(targets, |name| {
        let path = tree
            .get(name)
            .with_context(|| format!("the kernel package has no module `{name}`"))?;
        let elf = module_bytes(path)?;
        let depends = modinfo_depends(&elf).with_context(|| format!("module {name}"))?;
        elves.insert(name.to_owned(), elf);
        Ok(depends)
    })?;
    if dest.exists() {
        fs::remove_dir_all(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut kept = Vec::new();
    for name in &order {
        let path = dest.join(format!("{name}.ko"));
        fs::write(&path, &elves[name]).with_context(|| format!("writing {}", path.display()))?;
        kept.push((name.clone(), path));
    }
    // Written last: its presence says the directory is complete.
    fs::write(dest.join(LOAD_ORDER), order.join("\n") + "\n")?;
    Ok(kept)
}

/// The modules kept by an earlier fetch, in load order; an error if any is
/// missing or the targets changed since.
fn kept_modules(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut text = String::new();
    fs::File::open(dir.join(LOAD_ORDER))?.read_to_string(&mut text)?;
    let modules: Vec<(String, PathBuf)> = text
        .lines()
        .filter(|line| !line.is_empty())
        .map(|name| (name.to_owned(), dir.join(format!("{name}.ko"))))
        .collect();
    let complete = modules.iter().all(|(_, path)| path.is_file())
        && DISK_MODULES
            .iter()
            .all(|target| modules.iter().any(|(name, _)| name == target));
    if !complete {
        bail!("{} is incomplete", dir.display());
    }
    Ok(modules)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal relocatable ELF64 with a `.modinfo` section holding
    /// `modinfo` (NUL-separated `key=value` strings), as a kernel module
    /// carries one.
    pub(crate) fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let modinfo_at = 64u64;
        let shstrtab_at = modinfo_at + modinfo.len() as u64;
        let shoff = (shstrtab_at + shstrtab.len() as u64).next_multiple_of(8);
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x02\x01\x01");
        elf.resize(16, 0);
        elf.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
        elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&0u64.to_le_bytes()); // entry
        elf.extend_from_slice(&0u64.to_le_bytes()); // phoff
        elf.extend_from_slice(&shoff.to_le_bytes());
        elf.extend_from_slice(&0u32.to_le_bytes()); // flags
        elf.extend_from_slice(&64u16.to_le_bytes()); // ehsize
        elf.extend_from_slice(&0u16.to_le_bytes()); // phentsize
        elf.extend_from_slice(&0u16.to_le_bytes()); // phnum
        elf.extend_from_slice(&64u16.to_le_bytes()); // shentsize
        elf.extend_from_slice(&3u16.to_le_bytes()); // shnum
        elf.extend_from_slice(&2u16.to_le_bytes()); // shstrndx
        elf.extend_from_slice(modinfo);
        elf.extend_from_slice(shstrtab);
        elf.resize(shoff as usize, 0);
        let mut section = |name: u32, kind: u32, offset: u64, size: u64| {
            elf.extend_from_slice(&name.to_le_bytes());
            elf.extend_from_slice(&kind.to_le_bytes());
            elf.extend_from_slice(&0u64.to_le_bytes()); // flags
            elf.extend_from_slice(&0u64.to_le_bytes()); // addr
            elf.extend_from_slice(&offset.to_le_bytes());
            elf.extend_from_slice(&size.to_le_bytes());
            elf.extend_from_slice(&0u32.to_le_bytes()); // link
            elf.extend_from_slice(&0u32.to_le_bytes()); // info
            elf.extend_from_slice(&1u64.to_le_bytes()); // addralign
            elf.extend_from_slice(&0u64.to_le_bytes()); // entsize
        };
        section(0, 0, 0, 0);
        section(1, 1, modinfo_at, modinfo.len() as u64); // PROGBITS
        section(10, 3, shstrtab_at, shstrtab.len() as u64); // STRTAB
        elf
    }

    #[test]
    fn apt_cache_depends_lines_give_package_names() {
        let text = "makedumpfile\n  Depends: <perl:any>\n    perl\n  Depends: libc6\n \
                    |Depends: libdw1\n  Depends: liblzo2-2:any\n  Recommends: crash\n";
        assert_eq!(parse_depends(text), ["libc6", "libdw1", "liblzo2-2"]);
    }

    #[test]
    fn depends_are_read_from_modinfo() {
        let module = fake_module(
            b"license=GPL\0depends=virtio_ring,virtio-pci-modern-dev,virtio\0vermagic=6.1.0\0",
        );
        assert_eq!(
            modinfo_depends(&module).unwrap(),
            ["virtio_ring", "virtio_pci_modern_dev", "virtio"]
        );
        let leaf = fake_module(b"license=GPL\0depends=\0");
        assert!(modinfo_depends(&leaf).unwrap().is_empty());
        let none = fake_module(b"license=GPL\0");
        assert!(modinfo_depends(&none).unwrap().is_empty());
        assert!(modinfo_depends(b"not an elf").is_err());
    }

    #[test]
    fn load_order_puts_dependencies_first_once() {
        // The real dependencies of Debian 6.1's virtio modules.
        let graph: BTreeMap<&str, Vec<&str>> = [
            (
                "virtio_pci",
                vec![
                    "virtio_ring",
                    "virtio_pci_modern_dev",
                    "virtio_pci_legacy_dev",
                    "virtio",
                ],
            ),
            ("virtio_blk", vec!["virtio", "virtio_ring"]),
            ("virtio_ring", vec!["virtio"]),
            ("virtio", vec![]),
            ("virtio_pci_modern_dev", vec![]),
            ("virtio_pci_legacy_dev", vec![]),
        ]
        .into_iter()
        .collect();
        let order = load_order(&DISK_MODULES, |name| {
            Ok(graph[name].iter().map(|d| d.to_string()).collect())
        })
        .unwrap();
        assert_eq!(order.len(), 6);
        let at = |name: &str| order.iter().position(|m| m == name).unwrap();
        for (module, deps) in &graph {
            for dep in deps {
                assert!(at(dep) < at(module), "{dep} after {module} in {order:?}");
            }
        }
        assert_eq!(order.last().unwrap(), "virtio_blk");
    }

    #[test]
    fn load_order_names_cycles_and_missing_modules() {
        let cycle = load_order(&["a"], |name| {
            Ok(vec![if name == "a" { "b" } else { "a" }.to_owned()])
        })
        .unwrap_err();
        assert_eq!(cycle.to_string(), "module dependency cycle: a -> b -> a");
        let missing = load_order(&["a"], |_| bail!("no module `a`")).unwrap_err();
        assert_eq!(missing.to_string(), "no module `a`");
    }

    #[test]
    fn module_names_and_xz_modules() {
        assert_eq!(
            module_name(Path::new("/x/virtio-pci-modern-dev.ko")).as_deref(),
            Some("virtio_pci_modern_dev")
        );
        assert_eq!(
            module_name(Path::new("virtio_blk.ko.xz")).as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name(Path::new("modules.order")), None);

        let dir = std::env::temp_dir().join(format!("xtask-ko-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let module = fake_module(b"depends=virtio\0");
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut module.as_slice(), &mut xz).unwrap();
        let path = dir.join("virtio_blk.ko.xz");
        fs::write(&path, &xz).unwrap();
        assert_eq!(module_bytes(&path).unwrap(), module);
        let plain = dir.join("virtio.ko");
        fs::write(&plain, &module).unwrap();
        assert_eq!(module_bytes(&plain).unwrap(), module);
        fs::write(dir.join("bad.ko.xz"), b"not xz").unwrap();
        assert!(module_bytes(&dir.join("bad.ko.xz")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kept_modules_are_found_again_in_order() {
        let dir = std::env::temp_dir().join(format!("xtask-keep-{}", std::process::id()));
        let src = dir.join("src");
        fs::create_dir_all(&src).unwrap();
        let mut tree = BTreeMap::new();
        for (name, modinfo) in [
            ("virtio", &b"depends=\0"[..]),
            ("virtio_ring", b"depends=virtio\0"),
            ("virtio_pci", b"depends=virtio_ring,virtio\0"),
            ("virtio_blk", b"depends=virtio,virtio_ring\0"),
            ("unrelated", b"depends=\0"),
        ] {
            let path = src.join(format!("{name}.ko"));
            fs::write(&path, fake_module(modinfo)).unwrap();
            tree.insert(name.to_owned(), path);
        }
        let dest = dir.join("modules");
        let kept = keep_modules(&tree, &DISK_MODULES, &dest).unwrap();
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["virtio", "virtio_ring", "virtio_pci", "virtio_blk"]);
        assert_eq!(kept_modules(&dest).unwrap(), kept);
        fs::remove_file(dest.join("virtio_pci.ko")).unwrap();
        assert!(kept_modules(&dest).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
