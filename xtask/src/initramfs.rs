//! The Linux capture kernel's initramfs: busybox, the virtio-blk modules
//! and a `/init` that copies `/proc/vmcore` to the raw virtio disk.
//!
//! `/init` mounts proc, sysfs and devtmpfs, `insmod`s the modules in
//! dependency order, checks that `/proc/vmcore` exists (the kernel was
//! started with `elfcorehdr=`) and that `/dev/vda` can hold it, copies it
//! with `dd`, and ends the emulator: it writes to QEMU's `isa-debug-exit`
//! port through `/dev/port` (0x10 after a copy, QEMU exits with 0x21; 0x11
//! after a failure, status 0x23) and powers off should that port be
//! absent. Every step prints a `capture:` line on the console, and the
//! result is also a report line (`@hv {"capture":{"linux":{...}}}`) that
//! xtask merges like the hypervisor's own.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use flate2::Compression;
use flate2::write::GzEncoder;

use crate::cpio::Archive;
use crate::debian::{self, LinuxKit};
use crate::paths;

/// The first line `/init` prints.
pub const INIT_MARKER: &str = "capture: init started";
/// Starts the line `/init` prints after a complete copy:
/// `capture: vmcore N bytes copied in M ms`.
pub const COPIED_MARKER: &str = "capture: vmcore ";
/// Starts the line `/init` prints when it gives up, with the reason.
pub const FAILED_MARKER: &str = "capture: FAILED: ";

/// The capture kernel's command-line arguments besides what hv appends
/// (`elfcorehdr=`, `memmap=`): the console on COM1 (the serial log), one
/// CPU as kdump does (the others are parked by the crash path), devices
/// reset by their drivers, a reboot (QEMU exits, `-no-reboot`) on panic.
pub const LINUX_CAPTURE_ARGS: &str =
    "console=ttyS0,115200 nr_cpus=1 reset_devices panic=-1 printk.time=1";

/// Where the module files go inside the initramfs.
const MODULE_DIR: &str = "lib/modules";

/// The `/init` script for `modules` (names, in load order).
pub fn init_script(modules: &[String]) -> String {
    let modules = modules.join(" ");
    format!(
        r#"#!/bin/busybox sh
# The Linux capture kernel's userspace, written by cargo xtask: copy
# /proc/vmcore to the raw virtio disk, then end the emulator.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{INIT_MARKER}"

# Milliseconds since boot, from /proc/uptime (centiseconds).
uptime_ms() {{
    read -r up _ < /proc/uptime
    frac=${{up#*.}}
    echo $(( ${{up%.*}} * 1000 + ${{frac#0}} * 10 ))
}}

# Ends the run: $1 is the byte for QEMU's isa-debug-exit port (0xf4 = 244).
end_run() {{
    sync
    printf "$1" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    poweroff -f
}}

fail() {{
    echo "{FAILED_MARKER}$*"
    echo '@hv {{"capture":{{"linux":{{"copied":false}}}}}}'
    end_run '\021'
}}

for module in {modules}; do
    insmod /{MODULE_DIR}/$module.ko || fail "insmod $module"
done

[ -e /proc/vmcore ] || fail "no /proc/vmcore: the kernel was not started as a capture kernel (elfcorehdr=)"
size=$(stat -c %s /proc/vmcore)
echo "capture: /proc/vmcore holds $size bytes"

tries=0
while [ ! -b /dev/vda ]; do
    tries=$((tries + 1))
    [ $tries -gt 200 ] && fail "no /dev/vda after 20 s"
    usleep 100000
done
disk=$(( $(cat /sys/class/block/vda/size) * 512 ))
[ "$disk" -ge "$size" ] || fail "/dev/vda holds $disk bytes, the dump needs $size"

start=$(uptime_ms)
dd if=/proc/vmcore of=/dev/vda bs=1M conv=fsync 2>/tmp/dd.log || fail "dd: $(cat /tmp/dd.log)"
ms=$(( $(uptime_ms) - start ))
echo "{COPIED_MARKER}$size bytes copied in $ms ms"
echo "@hv {{\"capture\":{{\"linux\":{{\"copied\":true,\"vmcore_bytes\":$size,\"copy_ms\":$ms}}}}}}"
end_run '\020'
"#
    )
}

/// The initramfs (uncompressed cpio) for `busybox` and `modules` (names
/// and ELF files, in load order).
pub fn archive(busybox: &[u8], modules: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut cpio = Archive::new();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "lib", MODULE_DIR] {
        cpio.dir(dir, 0o755)?;
    }
    // The kernel opens /dev/console for /init before devtmpfs is mounted.
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("bin/busybox", 0o755, busybox)?;
    for (name, elf) in modules {
        cpio.file(&format!("{MODULE_DIR}/{name}.ko"), 0o644, elf)?;
    }
    let names: Vec<String> = modules.iter().map(|(name, _)| name.clone()).collect();
    cpio.file("init", 0o755, init_script(&names).as_bytes())?;
    Ok(cpio.finish())
}

/// gzip, which Debian's kernel unpacks (`RD_GZIP`).
pub fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

/// The capture kernel and its initramfs, both in `build/`.
#[derive(Debug, Clone)]
pub struct LinuxCapture {
    /// The kernel package and modules it was built from.
    pub kit: LinuxKit,
    /// `build/capture-linux/initramfs.cpio.gz`.
    pub initramfs: PathBuf,
}

/// Fetches what is missing and writes the initramfs (it takes a fraction
/// of a second, so it is written afresh for every run).
pub fn linux_capture() -> Result<LinuxCapture> {
    let kit = debian::linux_kit()?;
    let busybox = debian::busybox()?;
    let busybox = fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let mut modules = Vec::new();
    for (name, path) in &kit.modules {
        modules.push((name.clone(), debian::module_bytes(path)?));
    }
    let cpio = archive(&busybox, &modules)?;
    let dir = paths::build_dir().join("capture-linux");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let initramfs = dir.join("initramfs.cpio.gz");
    write_atomically(&initramfs, &gzip(&cpio)?)?;
    Ok(LinuxCapture { kit, initramfs })
}

/// Writes through a temporary file and a rename, so that a run starting
/// at the same time never reads half an initramfs.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&temporary, bytes).with_context(|| format!("writing {}", temporary.display()))?;
    fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio;
    use flate2::read::GzDecoder;
    use std::io::Read;

    #[test]
    fn the_archive_holds_busybox_modules_and_init() {
        let modules = vec![
            ("virtio".to_owned(), b"virtio elf".to_vec()),
            ("virtio_blk".to_owned(), b"blk elf".to_vec()),
        ];
        let bytes = archive(b"busybox elf", &modules).unwrap();
        let entries = cpio::read(&bytes).unwrap();
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(find("bin/busybox").data, b"busybox elf");
        assert_eq!(find("bin/busybox").mode, 0o100755);
        assert_eq!(find("lib/modules/virtio_blk.ko").data, b"blk elf");
        assert_eq!(find("dev/console").rdev, (5, 1));
        let init = find("init");
        assert_eq!(init.mode, 0o100755);
        let script = String::from_utf8(init.data.clone()).unwrap();
        assert!(script.starts_with("#!/bin/busybox sh\n"));
        assert!(script.contains("for module in virtio virtio_blk; do"));
    }

    #[test]
    fn init_copies_vmcore_to_the_disk_and_reports() {
        let script = init_script(&["virtio".to_owned()]);
        for needed in [
            "mount -t proc proc /proc",
            "mount -t devtmpfs devtmpfs /dev",
            "insmod /lib/modules/$module.ko",
            "[ -e /proc/vmcore ]",
            "dd if=/proc/vmcore of=/dev/vda bs=1M conv=fsync",
            "echo \"capture: init started\"",
            "echo \"capture: vmcore $size bytes copied in $ms ms\"",
            r#"echo "@hv {\"capture\":{\"linux\":{\"copied\":true,\"vmcore_bytes\":$size,\"copy_ms\":$ms}}}""#,
            r#"echo '@hv {"capture":{"linux":{"copied":false}}}'"#,
            "end_run '\\020'",
            "end_run '\\021'",
            "poweroff -f",
        ] {
            assert!(script.contains(needed), "missing {needed:?} in\n{script}");
        }
        // The report lines are JSON once the shell has expanded them.
        let line = r#"@hv {"capture":{"linux":{"copied":true,"vmcore_bytes":4096,"copy_ms":7}}}"#;
        let object = crate::report::parse_line(line).unwrap().unwrap();
        assert_eq!(object["capture"]["linux"]["vmcore_bytes"], 4096);
    }

    #[test]
    fn gzip_round_trips() {
        let data = archive(b"x", &[]).unwrap();
        let packed = gzip(&data).unwrap();
        assert_eq!(&packed[..2], &[0x1f, 0x8b]);
        let mut unpacked = Vec::new();
        GzDecoder::new(packed.as_slice())
            .read_to_end(&mut unpacked)
            .unwrap();
        assert_eq!(unpacked, data);
    }

    #[test]
    fn the_script_is_valid_shell() {
        // `sh -n` parses without running: catches quoting mistakes in the
        // format string above.
        let path = std::env::temp_dir().join(format!("xtask-init-{}.sh", std::process::id()));
        fs::write(
            &path,
            init_script(&["virtio".to_owned(), "virtio_blk".to_owned()]),
        )
        .unwrap();
        let status = std::process::Command::new("sh")
            .arg("-n")
            .arg(&path)
            .status()
            .unwrap();
        fs::remove_file(&path).unwrap();
        assert!(status.success());
    }
}
