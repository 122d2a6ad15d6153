//! The Linux capture kernel's initramfs: busybox, the virtio-blk modules
//! and a `/init` that copies `/proc/vmcore` to the raw virtio disk, or,
//! with makedumpfile ([`crate::makedumpfile`]), filters it at dump level 1
//! into an ELF dump on `/dev/vda` and a compressed kdump on `/dev/vdb`
//! (both in makedumpfile's flattened format, which xtask rearranges).
//!
//! `/init` mounts proc, sysfs and devtmpfs, `insmod`s the modules in
//! dependency order, checks that `/proc/vmcore` exists (the kernel was
//! started with `elfcorehdr=`) and that `/dev/vda` can hold it, copies it
//! with `dd` on one CPU, then again with one `dd` per CPU, each pinned
//! to its CPU and copying its share, onto `/dev/vdb` (when it runs on more
//! than one: the two times compare one CPU with all, and xtask compares
//! the two copies), and ends the emulator: it writes to QEMU's `isa-debug-exit`
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
use crate::{makedumpfile, paths};

/// The first line `/init` prints.
pub const INIT_MARKER: &str = "capture: init started";
/// Starts the line `/init` prints after a complete copy:
/// `capture: vmcore N bytes copied in M ms`.
pub const COPIED_MARKER: &str = "capture: vmcore ";
/// Starts the line `/init` prints with the CPUs it runs on:
/// `capture: CPUs online: N (0-7)`.
pub const CPUS_MARKER: &str = "capture: CPUs online: ";
/// Starts the line `/init` prints after the copy with one reader per CPU:
/// `capture: parallel copy: N bytes copied by C readers in M ms`.
pub const PARALLEL_MARKER: &str = "capture: parallel copy: ";
/// Starts each line `/init` prints after a makedumpfile pass:
/// `capture: makedumpfile -E -d 1: N bytes (flattened) in M ms`.
pub const FILTERED_MARKER: &str = "capture: makedumpfile ";
/// Starts the line `/init` prints when it gives up, with the reason.
pub const FAILED_MARKER: &str = "capture: FAILED: ";

/// The capture kernel's command-line arguments besides what hv appends
/// (`nr_cpus=`, `disable_cpu_apicid=`, `elfcorehdr=`, `memmap=`): the
/// console on COM1 (the serial log), devices reset by their drivers, a
/// reboot (QEMU exits, `-no-reboot`) on panic. No `nr_cpus=1`, unlike
/// kdump: hv's crash path parks every CPU out of VMX, so hv gives the
/// capture kernel all of them (`nr_cpus=1` here keeps it on one).
pub const LINUX_CAPTURE_ARGS: &str = "console=ttyS0,115200 reset_devices panic=-1 printk.time=1";

/// Where the module files go inside the initramfs.
const MODULE_DIR: &str = "lib/modules";

/// What `/init` does with `/proc/vmcore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpWriter {
    /// `dd` copies it whole to `/dev/vda`.
    Copy,
    /// makedumpfile filters it (`-d 1`) twice: `-E` (ELF) to `/dev/vda`
    /// and `-c` (compressed kdump) to `/dev/vdb`, flattened (`-F`).
    Makedumpfile,
}

/// The shell of `/init` that gets the dump out, after the checks, for
/// `writer`: it ends the run.
fn dump_commands(writer: DumpWriter) -> String {
    match writer {
        DumpWriter::Copy => format!(
            r#"wait_disk vda
disk=$(( $(cat /sys/class/block/vda/size) * 512 ))
[ "$disk" -ge "$size" ] || fail "/dev/vda holds $disk bytes, the dump needs $size"

# One reader on one CPU: the dump xtask keeps.
start=$(uptime_ms)
taskset -c 0 dd if=/proc/vmcore of=/dev/vda bs=1M oflag=direct conv=fsync 2>/tmp/dd.log || fail "dd: $(cat /tmp/dd.log)"
ms=$(( $(uptime_ms) - start ))
echo "{COPIED_MARKER}$size bytes copied in $ms ms"

# Then one reader per CPU, each pinned to its CPU and copying its share,
# onto /dev/vdb: xtask compares the two copies byte for byte.
parallel=""
if [ "$cpus" -gt 1 ]; then
    wait_disk vdb
    blocks=$(( (size + 1048575) / 1048576 ))
    share=$(( (blocks + cpus - 1) / cpus ))
    start=$(uptime_ms)
    pids=""
    for cpu in $(seq 0 $((cpus - 1))); do
        taskset -c $cpu dd if=/proc/vmcore of=/dev/vdb bs=1M skip=$((cpu * share)) \
            seek=$((cpu * share)) count=$share oflag=direct conv=notrunc,fsync 2>/tmp/dd$cpu.log &
        pids="$pids $!"
    done
    for pid in $pids; do
        wait $pid || fail "a parallel dd failed: $(cat /tmp/dd*.log | tr '\n' ' ')"
    done
    sync
    pms=$(( $(uptime_ms) - start ))
    echo "{PARALLEL_MARKER}$size bytes copied by $cpus readers in $pms ms"
    parallel=",\"parallel_readers\":$cpus,\"parallel_copy_ms\":$pms"
fi
echo "@hv {{\"capture\":{{\"linux\":{{\"copied\":true,\"vmcore_bytes\":$size,\"copy_ms\":$ms,\"cpus_online\":$cpus$parallel}}}}}}"
end_run '\020'
"#
        ),
        DumpWriter::Makedumpfile => format!(
            r#"wait_disk vda
wait_disk vdb

# filter NAME FLAG DISK: filters /proc/vmcore at dump level {level} (zero
# pages left out) in format FLAG, flattened (-F) onto DISK; sets
# NAME_bytes (makedumpfile's own count, its report's "Write bytes") and
# NAME_ms. dd writes whole 1 MiB blocks: small writes to a block device
# each read their page back first, and more processes in the pipe (tee,
# wc) made it three times slower under TCG.
filter() {{
    start=$(uptime_ms)
    {{ LD_LIBRARY_PATH=/{libs} /{binary} -F $2 -d {level} --message-level 22 /proc/vmcore \
        2>/tmp/$1.log; echo $? >/tmp/$1.status; }} \
        | dd of=/dev/$3 bs=1M iflag=fullblock conv=fsync 2>/tmp/$1.dd \
        || fail "dd onto /dev/$3: $(cat /tmp/$1.dd)"
    status=$(cat /tmp/$1.status)
    [ "$status" = 0 ] || fail "makedumpfile $2 exited with status $status: $(tail -n 3 /tmp/$1.log | tr '\n' ' ')"
    bytes=$(sed -n 's/^Write bytes *: *\([0-9][0-9]*\).*/\1/p' /tmp/$1.log)
    [ -n "$bytes" ] || fail "makedumpfile $2 reported no Write bytes: $(tail -n 3 /tmp/$1.log | tr '\n' ' ')"
    sync
    ms=$(( $(uptime_ms) - start ))
    echo "{FILTERED_MARKER}$2 -d {level}: $bytes bytes (flattened) in $ms ms"
    eval "$1_bytes=$bytes $1_ms=$ms"
}}

filter elf -E vda
filter kdump -c vdb
echo "@hv {{\"capture\":{{\"linux\":{{\"copied\":true,\"vmcore_bytes\":$size,\"makedumpfile\":{{\"dump_level\":{level},\"elf_stream_bytes\":$elf_bytes,\"elf_ms\":$elf_ms,\"kdump_stream_bytes\":$kdump_bytes,\"kdump_ms\":$kdump_ms}}}}}}}}"
end_run '\020'
"#,
            level = makedumpfile::DUMP_LEVEL,
            libs = makedumpfile::INITRAMFS_LIBRARIES,
            binary = makedumpfile::INITRAMFS_BINARY,
        ),
    }
}

/// The `/init` script for `modules` (names, in load order), getting the
/// dump out with `writer`.
pub fn init_script(modules: &[String], writer: DumpWriter) -> String {
    let modules = modules.join(" ");
    let dump = dump_commands(writer);
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

# Waits up to 20 s for the block device /dev/$1.
wait_disk() {{
    tries=0
    while [ ! -b /dev/$1 ]; do
        tries=$((tries + 1))
        [ $tries -gt 200 ] && fail "no /dev/$1 after 20 s"
        usleep 100000
    done
}}

# The CPUs this kernel brought up (the crashed hypervisor's, woken).
cpus=$(nproc)
echo "{CPUS_MARKER}$cpus ($(cat /sys/devices/system/cpu/online))"

{dump}"#
    )
}

/// The initramfs (uncompressed cpio) for `busybox` and `modules` (names
/// and ELF files, in load order); with `makedumpfile`, its binary, loader
/// and libraries too, and an `/init` that runs it.
pub fn archive(
    busybox: &[u8],
    modules: &[(String, Vec<u8>)],
    makedumpfile: Option<&makedumpfile::Kit>,
) -> Result<Vec<u8>> {
    let mut cpio = Archive::new();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "lib", MODULE_DIR] {
        cpio.dir(dir, 0o755)?;
    }
    let writer = match makedumpfile {
        Some(kit) => {
            add_makedumpfile(&mut cpio, kit)?;
            DumpWriter::Makedumpfile
        }
        None => DumpWriter::Copy,
    };
    // The kernel opens /dev/console for /init before devtmpfs is mounted.
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("bin/busybox", 0o755, busybox)?;
    for (name, elf) in modules {
        cpio.file(&format!("{MODULE_DIR}/{name}.ko"), 0o644, elf)?;
    }
    let names: Vec<String> = modules.iter().map(|(name, _)| name.clone()).collect();
    cpio.file("init", 0o755, init_script(&names, writer).as_bytes())?;
    Ok(cpio.finish())
}

/// makedumpfile at `/bin`, its libraries in `/lib` (`LD_LIBRARY_PATH`),
/// its loader where its `PT_INTERP` looks.
fn add_makedumpfile(cpio: &mut Archive, kit: &makedumpfile::Kit) -> Result<()> {
    let read = |path: &Path| fs::read(path).with_context(|| format!("reading {}", path.display()));
    cpio.file(makedumpfile::INITRAMFS_BINARY, 0o755, &read(&kit.binary)?)?;
    for (soname, path) in &kit.libraries {
        let at = format!("{}/{soname}", makedumpfile::INITRAMFS_LIBRARIES);
        cpio.file(&at, 0o755, &read(path)?)?;
    }
    let (interpreter, loader) = &kit.interpreter;
    let inside = interpreter.trim_start_matches('/');
    if let Some((dir, _)) = inside.rsplit_once('/')
        && dir != makedumpfile::INITRAMFS_LIBRARIES
    {
        cpio.dir(dir, 0o755)?;
    }
    if !kit
        .libraries
        .iter()
        .any(|(soname, _)| format!("{}/{soname}", makedumpfile::INITRAMFS_LIBRARIES) == inside)
    {
        cpio.file(inside, 0o755, &read(loader)?)?;
    }
    Ok(())
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
/// of a second, so it is written afresh for every run); with
/// `makedumpfile`, the one that filters with it.
pub fn linux_capture(writer: DumpWriter) -> Result<LinuxCapture> {
    let kit = debian::linux_kit()?;
    let busybox = debian::busybox()?;
    let busybox = fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let mut modules = Vec::new();
    for (name, path) in &kit.modules {
        modules.push((name.clone(), debian::module_bytes(path)?));
    }
    let filter = match writer {
        DumpWriter::Makedumpfile => Some(makedumpfile::kit()?),
        DumpWriter::Copy => None,
    };
    let cpio = archive(&busybox, &modules, filter.as_ref())?;
    let dir = paths::build_dir().join("capture-linux");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let initramfs = dir.join(match writer {
        DumpWriter::Copy => "initramfs.cpio.gz",
        DumpWriter::Makedumpfile => "initramfs-makedumpfile.cpio.gz",
    });
    write_atomically(&initramfs, &gzip(&cpio)?)?;
    Ok(LinuxCapture { kit, initramfs })
}

/// Writes through a temporary file and a rename, so that a run starting
/// at the same time never reads half an initramfs.
/// The temporary name carries the process and a per-process count: two
/// threads of one test binary build the same initramfs at once.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    static WRITES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let count = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = path.with_extension(format!("tmp{}-{count}", std::process::id()));
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
        let bytes = archive(b"busybox elf", &modules, None).unwrap();
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
        let script = init_script(&["virtio".to_owned()], DumpWriter::Copy);
        for needed in [
            "mount -t proc proc /proc",
            "mount -t devtmpfs devtmpfs /dev",
            "insmod /lib/modules/$module.ko",
            "[ -e /proc/vmcore ]",
            "taskset -c 0 dd if=/proc/vmcore of=/dev/vda bs=1M oflag=direct conv=fsync",
            "echo \"capture: init started\"",
            "echo \"capture: CPUs online: $cpus ($(cat /sys/devices/system/cpu/online))\"",
            "echo \"capture: vmcore $size bytes copied in $ms ms\"",
            "if [ \"$cpus\" -gt 1 ]; then",
            "wait_disk vdb",
            "taskset -c $cpu dd if=/proc/vmcore of=/dev/vdb bs=1M skip=$((cpu * share)) \\\n            seek=$((cpu * share)) count=$share oflag=direct conv=notrunc,fsync",
            "echo \"capture: parallel copy: $size bytes copied by $cpus readers in $pms ms\"",
            r#"echo "@hv {\"capture\":{\"linux\":{\"copied\":true,\"vmcore_bytes\":$size,\"copy_ms\":$ms,\"cpus_online\":$cpus$parallel}}}""#,
            r#"echo '@hv {"capture":{"linux":{"copied":false}}}'"#,
            "end_run '\\020'",
            "end_run '\\021'",
            "poweroff -f",
        ] {
            assert!(script.contains(needed), "missing {needed:?} in\n{script}");
        }
        // The report lines are JSON once the shell has expanded them.
        let line = r#"@hv {"capture":{"linux":{"copied":true,"vmcore_bytes":4096,"copy_ms":7,"cpus_online":1}}}"#;
        let object = crate::report::parse_line(line).unwrap().unwrap();
        assert_eq!(object["capture"]["linux"]["vmcore_bytes"], 4096);
        let line = r#"@hv {"capture":{"linux":{"copied":true,"vmcore_bytes":4096,"copy_ms":7,"cpus_online":8,"parallel_readers":8,"parallel_copy_ms":3}}}"#;
        let object = crate::report::parse_line(line).unwrap().unwrap();
        assert_eq!(object["capture"]["linux"]["parallel_copy_ms"], 3);
    }

    #[test]
    fn init_filters_with_makedumpfile_onto_two_disks_and_reports_sizes() {
        let script = init_script(&["virtio".to_owned()], DumpWriter::Makedumpfile);
        for needed in [
            "wait_disk vda",
            "wait_disk vdb",
            "LD_LIBRARY_PATH=/lib /bin/makedumpfile -F $2 -d 1 --message-level 22 /proc/vmcore",
            "| dd of=/dev/$3 bs=1M iflag=fullblock conv=fsync 2>/tmp/$1.dd",
            "sed -n 's/^Write bytes *: *\\([0-9][0-9]*\\).*/\\1/p' /tmp/$1.log",
            "filter elf -E vda",
            "filter kdump -c vdb",
            "echo \"capture: makedumpfile $2 -d 1: $bytes bytes (flattened) in $ms ms\"",
        ] {
            assert!(script.contains(needed), "missing {needed:?} in\n{script}");
        }
        assert!(!script.contains("dd if=/proc/vmcore"), "no whole copy");
        // The report line is JSON once the shell has expanded it.
        let line = script
            .lines()
            .find(|l| l.starts_with("echo \"@hv "))
            .unwrap()
            .trim_start_matches("echo \"")
            .trim_end_matches('"')
            .replace("\\\"", "\"")
            .replace("$size", "805306368")
            .replace("$elf_bytes", "11000000")
            .replace("$elf_ms", "900")
            .replace("$kdump_bytes", "5800000")
            .replace("$kdump_ms", "1100");
        let object = crate::report::parse_line(&line).unwrap().unwrap();
        let filtered = &object["capture"]["linux"]["makedumpfile"];
        assert_eq!(filtered["dump_level"], 1);
        assert_eq!(filtered["elf_stream_bytes"], 11_000_000);
        assert_eq!(filtered["kdump_stream_bytes"], 5_800_000);
        assert_eq!(object["capture"]["linux"]["copied"], true);
    }

    #[test]
    fn the_archive_carries_makedumpfile_its_libraries_and_loader() {
        let dir = std::env::temp_dir().join(format!("xtask-mdf-kit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = |name: &str| {
            let path = dir.join(name);
            fs::write(&path, name.as_bytes()).unwrap();
            path
        };
        let kit = makedumpfile::Kit {
            binary: file("makedumpfile"),
            interpreter: ("/lib64/ld-linux-x86-64.so.2".into(), file("ld.so")),
            libraries: vec![
                ("libz.so.1".into(), file("libz")),
                ("libc.so.6".into(), file("libc")),
            ],
        };
        let bytes = archive(b"busybox", &[], Some(&kit)).unwrap();
        let entries = cpio::read(&bytes).unwrap();
        let data = |name: &str| {
            entries
                .iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("no {name}"))
                .data
                .clone()
        };
        assert_eq!(data("bin/makedumpfile"), b"makedumpfile");
        assert_eq!(data("lib/libz.so.1"), b"libz");
        assert_eq!(data("lib/libc.so.6"), b"libc");
        assert_eq!(data("lib64/ld-linux-x86-64.so.2"), b"ld.so");
        assert!(
            String::from_utf8(data("init"))
                .unwrap()
                .contains("filter kdump -c vdb")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gzip_round_trips() {
        let data = archive(b"x", &[], None).unwrap();
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
        for writer in [DumpWriter::Copy, DumpWriter::Makedumpfile] {
            fs::write(
                &path,
                init_script(&["virtio".to_owned(), "virtio_blk".to_owned()], writer),
            )
            .unwrap();
            let status = std::process::Command::new("sh")
                .arg("-n")
                .arg(&path)
                .status()
                .unwrap();
            assert!(status.success(), "{writer:?}");
        }
        fs::remove_file(&path).unwrap();
    }
}
