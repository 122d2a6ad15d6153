//! The reference of `cargo xtask bench crash`: Linux's way from a crash to
//! its purgatory, on the very same QEMU machine (`-smp`, accelerator, CPU
//! model; 1 GiB for the reservation).
//!
//! Debian's kernel (the one `bench bringup` uses) boots with
//! `crashkernel=256M` and an initramfs xtask writes: busybox, Debian's
//! `kexec` (from `kexec-tools`, with the libraries it loads, fetched as
//! makedumpfile is) and the same kernel as the capture kernel. Its `/init`
//! loads the capture kernel with `kexec -p -c --console-serial` (the old
//! `kexec_load` syscall, so kexec-tools' own purgatory runs, which with
//! `--console-serial` says `I'm in purgatory` on COM1 as its first act,
//! before its SHA-256 check), then crashes the kernel with `echo c >
//! /proc/sysrq-trigger`.
//!
//! The time is measured on the host, from the serial log (QEMU writes each
//! byte to the file as the guest sends it; xtask reads it every
//! millisecond): from the line `sysrq: Trigger a crash` (printed just
//! before `panic()`) to the purgatory's line. Under TCG the guest's TSC
//! follows the host's clock, so this is the time hv's TSC stamps measure,
//! to a millisecond or two. Linux's panic path prints the panic and a
//! backtrace on the way; that is part of its way, as hv's words after its
//! NMIs are part of hv's.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::accel::Accel;
use crate::cpio::Archive;
use crate::process::{self, Followed, KillOnDrop, SerialLog};
use crate::run::{self, Media};
use crate::serial::strip_ansi;
use crate::{debian, initramfs, makedumpfile, paths};

/// The crashing kernel's last words before `panic()`.
pub const CRASH_MARKER: &str = "sysrq: Trigger a crash";
/// kexec-tools' purgatory's first words.
pub const PURGATORY_MARKER: &str = "I'm in purgatory";
/// What `/init` says once the capture kernel is loaded.
const LOADED_MARKER: &str = "bench: capture kernel loaded";
/// What `/init` says when loading failed.
const FAILED_MARKER: &str = "bench: kexec FAILED";

/// Memory of the Linux machine: the reservation and room to boot.
pub const MEMORY_MIB: u32 = 1024;

/// The crashing kernel's command line (`lpj=` is added when known).
const CMDLINE: &str = "console=ttyS0 printk.time=1 crashkernel=256M panic=0 quiet loglevel=7";

/// The capture kernel's command line (it only has to be loaded).
const CAPTURE_CMDLINE: &str = "console=ttyS0 nr_cpus=1 reset_devices irqpoll";

/// The initramfs' `/init`.
fn init_script() -> String {
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         export LD_LIBRARY_PATH=/lib\n\
         if /sbin/kexec -p -c --console-serial --serial=0x3f8 --serial-baud=115200 \\\n\
            /boot/vmlinuz --append=\"{CAPTURE_CMDLINE}\"; then\n\
           echo \"{LOADED_MARKER}\"\n\
         else\n\
           echo \"{FAILED_MARKER}\"; poweroff -f\n\
         fi\n\
         echo 1 > /proc/sys/kernel/sysrq\n\
         echo c > /proc/sysrq-trigger\n\
         sleep 1000\n"
    )
}

/// The crashing kernel's initramfs (gzip), written once into
/// `build/bench-crash-linux/`.
fn initramfs(vmlinuz: &Path) -> Result<PathBuf> {
    let dir = paths::build_dir().join("bench-crash-linux");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join("initramfs.cpio.gz");
    let busybox = debian::busybox()?;
    let kexec = makedumpfile::package_kit("kexec-tools", "kexec")?;
    let read = |path: &Path| fs::read(path).with_context(|| format!("reading {}", path.display()));
    let mut cpio = Archive::new();
    for name in ["bin", "sbin", "dev", "proc", "sys", "tmp", "lib", "boot"] {
        cpio.dir(name, 0o755)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("bin/busybox", 0o755, &read(&busybox)?)?;
    cpio.file("sbin/kexec", 0o755, &read(&kexec.binary)?)?;
    for (soname, path) in &kexec.libraries {
        cpio.file(&format!("lib/{soname}"), 0o755, &read(path)?)?;
    }
    let (interpreter, loader) = &kexec.interpreter;
    let inside = interpreter.trim_start_matches('/');
    if let Some((parent, _)) = inside.rsplit_once('/')
        && parent != "lib"
    {
        cpio.dir(parent, 0o755)?;
    }
    if !kexec
        .libraries
        .iter()
        .any(|(soname, _)| format!("lib/{soname}") == inside)
    {
        cpio.file(inside, 0o755, &read(loader)?)?;
    }
    cpio.file("boot/vmlinuz", 0o644, &read(vmlinuz)?)?;
    cpio.file("init", 0o755, init_script().as_bytes())?;
    fs::write(&out, initramfs::gzip(&cpio.finish())?)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// What the reference needs, prepared once.
#[derive(Debug, Clone)]
pub struct LinuxReference {
    /// Debian's kernel.
    pub vmlinuz: PathBuf,
    /// The crashing kernel's initramfs.
    pub initramfs: PathBuf,
    /// `lpj=` for the crashing kernel (skips the delay-loop calibration
    /// on every AP, minutes at `-smp 64` under TCG), when known.
    pub lpj: Option<u64>,
}

impl LinuxReference {
    /// Fetches and writes what the runs need; `host_tsc_khz` gives `lpj=`
    /// (Debian's kernels tick at 250 Hz, and calibrate their delay loop on
    /// the TSC: a jiffy's worth of TSC ticks).
    pub fn prepare(host_tsc_khz: Option<f64>) -> Result<Self> {
        let vmlinuz = super::debian_kernel()?;
        let initramfs = initramfs(&vmlinuz)?;
        Ok(Self {
            vmlinuz,
            initramfs,
            lpj: host_tsc_khz.map(|khz| (khz * 1000.0 / 250.0) as u64),
        })
    }
}

/// One Linux crash: from the crash line to the purgatory's line, in
/// microseconds of host time.
pub fn run(
    reference: &LinuxReference,
    accel: Accel,
    smp: u32,
    run_name: &str,
    timeout: Duration,
) -> Result<f64> {
    let run_dir = run::prepare_run_dir(run_name, &["serial.log", "debugcon.log", "qemu.log"])?;
    let mut cmdline = CMDLINE.to_owned();
    if let Some(lpj) = reference.lpj {
        cmdline.push_str(&format!(" lpj={lpj}"));
    }
    let media = Media::Kernel {
        elf: reference.vmlinuz.clone(),
        cmdline,
    };
    let mut args = run::qemu_args(accel, smp, MEMORY_MIB, &media, &run_dir);
    args.extend([
        "-initrd".into(),
        reference.initramfs.clone().into_os_string(),
    ]);
    let mut child = process::spawn_logged(
        Command::new("qemu-system-x86_64").args(&args),
        &run_dir.join("qemu.log"),
        "qemu-system-x86_64",
    )?;
    let serial_log = run_dir.join("serial.log");
    let times = watch_markers(&mut child, &serial_log, timeout)
        .with_context(|| format!("the Linux crash run (see {})", serial_log.display()))?;
    child.kill();
    Ok(times.as_secs_f64() * 1e6)
}

/// Follows the serial log every millisecond until the purgatory speaks;
/// the time from the crash line to it.
fn watch_markers(child: &mut KillOnDrop, serial_log: &Path, timeout: Duration) -> Result<Duration> {
    let mut crashed: Option<Instant> = None;
    let mut partial = String::new();
    let followed = process::follow(
        child,
        &mut SerialLog::new(serial_log),
        timeout,
        Duration::from_millis(1),
        |look| {
            let now = Instant::now();
            // A marker counts when its bytes arrive, not when its line ends.
            partial.push_str(&String::from_utf8_lossy(look.bytes));
            if crashed.is_none() && partial.contains(CRASH_MARKER) {
                crashed = Some(now);
            }
            if let Some(at) = crashed
                && partial.contains(PURGATORY_MARKER)
            {
                return Ok(Some(now.duration_since(at)));
            }
            for line in look.lines {
                let line = strip_ansi(line);
                if line.contains(FAILED_MARKER) {
                    bail!("kexec could not load the capture kernel");
                }
            }
            if let Some(cut) = partial.rfind('\n') {
                partial.drain(..=cut);
            }
            Ok(None)
        },
    )?;
    match followed {
        Followed::Found(time) => Ok(time),
        Followed::Exited(status) => bail!("QEMU ended ({status}) before `{PURGATORY_MARKER}`"),
        Followed::TimedOut => bail!(
            "no `{}` after {} s",
            if crashed.is_some() {
                PURGATORY_MARKER
            } else {
                CRASH_MARKER
            },
            timeout.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_loads_the_capture_kernel_with_the_old_syscall_and_a_serial_purgatory_then_crashes() {
        let script = init_script();
        assert!(script.starts_with("#!/bin/busybox sh\n"));
        let kexec = script
            .lines()
            .position(|l| l.contains("/sbin/kexec -p -c --console-serial"))
            .unwrap();
        let crash = script
            .lines()
            .position(|l| l == "echo c > /proc/sysrq-trigger")
            .unwrap();
        assert!(kexec < crash, "{script}");
        assert!(script.contains(LOADED_MARKER) && script.contains(FAILED_MARKER));
    }
}
