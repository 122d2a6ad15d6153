//! Crash capture runs: `cargo xtask qemu-smp --capture linux|hv` and
//! `cargo xtask bochs --capture hv`.
//!
//! hv boots with a `crashkernel=` reservation and a capture kernel as a
//! boot module, a crash is injected (by default `crash=cpu:1,after_ms:50`),
//! and hv's crash path jumps into the capture kernel, which writes the dump
//! out of the machine (`xtask/CAPTURE.md`):
//!
//! - **linux**: Debian's kernel with an initramfs built by xtask
//!   ([`crate::initramfs`]) copies `/proc/vmcore` to a raw virtio disk; the
//!   dump is the disk image cut to the length its ELF header gives. With
//!   `makedumpfile`, Debian's makedumpfile filters it instead, at dump
//!   level one, into an ELF dump and a compressed kdump, each flattened
//!   onto a disk of its own, which xtask rearranges
//!   ([`crate::makedumpfile`]).
//!   GRUB only: two modules (kernel and initramfs) do not fit PVH's
//!   `-initrd`.
//! - **hv**: hv itself, linked inside the reservation (`HV_LINK_BASE`),
//!   streams the dump on port 0xE9 (QEMU `-debugcon`) or, in Bochs, to a
//!   disk on the primary ATA channel's slave; xtask reassembles the stream.
//!
//! The run report gains a `capture` object (hv's own `capture` lines merged
//! with what xtask found, see [`judge`]), and the verdict adds the capture's
//! checks to the crash run's.

/// The capture's judging lives with the other judges ([`crate::judge`]).
pub use crate::judge::capture as judge;
pub mod selftest;
pub mod stream;
mod timing;
pub mod wake;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::dump::DumpInfo;
use crate::initramfs::{self, LINUX_CAPTURE_ARGS};
use crate::iso::BootModule;
use crate::run::{self, BochsOptions, Boot, QemuOptions, RunOutcome};
use crate::{kernel, paths};
use judge::Collected;
use timing::{Marker, SerialClock};

/// The dump file in a run directory.
pub const DUMP_FILE: &str = "vmcore";
/// The raw disk the Linux capture kernel copies `/proc/vmcore` to, and
/// the one hv's capture mode streams to in Bochs.
pub const DISK_FILE: &str = "vmcore.img";
/// The second disk of a makedumpfile capture: the compressed kdump,
/// flattened.
pub const KDUMP_DISK_FILE: &str = "vmcore-kdump.img";
/// The compressed kdump file rearranged from it.
pub const KDUMP_FILE: &str = "vmcore.kdump";
/// The second disk of a Linux copy: `/proc/vmcore` copied again by one
/// reader per CPU, compared with the dump and then deleted (kept when
/// they differ).
pub const PARALLEL_DISK_FILE: &str = "vmcore-parallel.img";
/// The lock Bochs keeps beside [`DISK_FILE`] while it runs.
const DISK_LOCK_FILE: &str = "vmcore.img.lock";
/// What hv's capture mode wrote to the debug port.
pub const STREAM_FILE: &str = "dump.stream";
/// QEMU's debug console log (`run/qemu.rs` names it).
const DEBUGCON_LOG: &str = "debugcon.log";

/// The reservation for a Linux capture kernel: room for the 8 MB bzImage
/// decompressed, its initramfs and a userspace that copies a dump.
pub const LINUX_CRASHKERNEL: &str = "256M";
/// The reservation for hv's capture mode, at a fixed base: the image is
/// linked there.
pub const HV_CRASHKERNEL: &str = "64M@0x10000000";
/// Memory for a Linux capture run when none is given: the reservation
/// and a crashed hypervisor with room to spare.
pub const LINUX_MEMORY_MIB: u32 = 1024;
/// Memory for an hv capture run when none is given: the default
/// reservation (256 MiB to 320 MiB) must lie inside RAM.
pub const HV_MEMORY_MIB: u32 = 512;

/// The capture kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureKernel {
    /// Debian's Linux with xtask's initramfs.
    Linux,
    /// hv's own capture mode.
    Hv,
}

impl CaptureKernel {
    /// The name hv and the run report use.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureKernel::Linux => "linux",
            CaptureKernel::Hv => "hv",
        }
    }
}

/// Where hv's capture mode writes the stream in Bochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BochsSink {
    /// A raw disk on `ata0-slave` (`capture_sink=ata`).
    Ata,
    /// Port 0xE9 (`port_e9_hack`, Bochs' stdout).
    Debugcon,
}

/// How a run captures its crash.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Which capture kernel.
    pub kernel: CaptureKernel,
    /// `crashkernel=` value; `None`: [`LINUX_CRASHKERNEL`] or
    /// [`HV_CRASHKERNEL`].
    pub crashkernel: Option<String>,
    /// The capture module's file instead of the built one (the tests hand
    /// hv broken ones).
    pub image: Option<PathBuf>,
    /// The Linux initramfs instead of the built one.
    pub initrd: Option<PathBuf>,
    /// The Linux capture kernel's arguments (hv adds `elfcorehdr=` and
    /// `memmap=`).
    pub linux_args: String,
    /// The crash to inject when the command line asks for none
    /// (`crash=` value); `None`: no crash unless the words ask for one.
    pub default_crash: Option<String>,
    /// Where the stream goes in Bochs.
    pub bochs_sink: BochsSink,
    /// Linux only: filter with makedumpfile (an ELF dump and a compressed
    /// kdump, zero pages left out) instead of copying `/proc/vmcore`.
    pub makedumpfile: bool,
    /// `--wake`: the capture kernel must wake every CPU that checked in
    /// ([`wake`]).
    pub wake_check: bool,
    /// hv's capture mode only: end the run once the capture image entered
    /// and read the crashed hypervisor's core header (its `N CPU notes;
    /// streaming` line), without waiting for the dump (a stress loop's
    /// cheap capture: the stream of a 448 MiB machine takes 20 to 50 s
    /// under TCG, the way to the capture image well under one).
    pub until_entry: bool,
}

impl CaptureOptions {
    /// Defaults for `kernel`, with the default crash for `cpus` CPUs.
    pub fn new(kernel: CaptureKernel, cpus: u32) -> Self {
        Self {
            kernel,
            crashkernel: hv_crashkernel_for(kernel, cpus),
            image: None,
            initrd: None,
            linux_args: LINUX_CAPTURE_ARGS.to_owned(),
            default_crash: Some(default_crash(cpus)),
            bochs_sink: BochsSink::Ata,
            makedumpfile: false,
            wake_check: false,
            until_entry: false,
        }
    }

    /// The `crashkernel=` value of the run.
    pub fn crashkernel(&self) -> &str {
        self.crashkernel.as_deref().unwrap_or(match self.kernel {
            CaptureKernel::Linux => LINUX_CRASHKERNEL,
            CaptureKernel::Hv => HV_CRASHKERNEL,
        })
    }
}

/// The reservation hv's capture mode needs with `cpus` CPUs, when the
/// default [`HV_CRASHKERNEL`] is too small: the capture image wakes every
/// CPU that checked in and gives each a stack set and tables from its
/// reservation (about 172 KiB a CPU, `memory_per_cpu.per_ap_bytes`), and
/// its core header has one NT_PRSTATUS note a CPU. At 512 CPUs 64 MiB
/// left it no memory for the woken CPUs (issue 14: "0 of 511 woken").
/// Above 128 CPUs: 64 MiB and 192 KiB a CPU, in whole 16 MiB, at the
/// same base (160 MiB at 512 CPUs, inside the 512 MiB machine).
pub fn hv_crashkernel_for(kernel: CaptureKernel, cpus: u32) -> Option<String> {
    const BASE_MIB: u64 = 64;
    const PER_CPU_KIB: u64 = 192;
    if kernel != CaptureKernel::Hv || cpus <= 128 {
        return None;
    }
    let mib = BASE_MIB + (u64::from(cpus) * PER_CPU_KIB).div_ceil(1024);
    let mib = mib.div_ceil(16) * 16;
    let base = HV_CRASHKERNEL
        .split_once('@')
        .map_or("0x10000000", |(_, base)| base);
    Some(format!("{mib}M@{base}"))
}

/// The crash injected when none is asked for: CPU 1 (an AP, so the capture
/// kernel starts on a CPU other than the boot CPU, as a real crash would
/// often have it), or CPU 0 alone, 50 ms after hv starts its clock.
pub fn default_crash(cpus: u32) -> String {
    format!("cpu:{},after_ms:50", u32::from(cpus > 1))
}

/// `crashkernel=SIZE[@BASE]` as hv reads it: size and base, each a number
/// (decimal or `0x` hex) with an optional K, M or G suffix.
pub fn parse_crashkernel(text: &str) -> Result<(u64, Option<u64>)> {
    let size_of = |part: &str| -> Result<u64> {
        let (digits, shift) = match part.chars().last() {
            Some('k' | 'K') => (&part[..part.len() - 1], 10),
            Some('m' | 'M') => (&part[..part.len() - 1], 20),
            Some('g' | 'G') => (&part[..part.len() - 1], 30),
            _ => (part, 0),
        };
        let number = parse_number(digits).with_context(|| format!("`{part}` is not a size"))?;
        number
            .checked_mul(1u64 << shift)
            .with_context(|| format!("`{part}` is too large"))
    };
    let (size, base) = match text.split_once('@') {
        Some((size, base)) => (size_of(size)?, Some(size_of(base)?)),
        None => (size_of(text)?, None),
    };
    if size == 0 || !size.is_multiple_of(4096) || base.is_some_and(|b| !b.is_multiple_of(4096)) {
        bail!("crashkernel={text}: size and base must be non-zero multiples of 4 KiB");
    }
    Ok((size, base))
}

/// A number as hv's command line writes it: decimal, or hex after `0x`.
fn parse_number(text: &str) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Whether hv's words ask for a crash: an injected one (`crash=`), a
/// guest's crash hypercall that hv allows (the last word of each wins), a
/// hung CPU (`hang=`: the lockup detector or the NMI button must end it)
/// or a stray write into the reservation (`stray_write=reservation`).
pub fn asks_for_crash(words: &[String]) -> bool {
    let last = |key: &str| {
        words
            .iter()
            .rev()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    };
    last("crash").is_some()
        || (last("guest_crash_call").is_some() && last("crash_hypercall") == Some("allow"))
        || last("hang").is_some()
        || words.iter().any(|w| w == "stray_write=reservation")
}

/// The hv command line of a capture run: the user's words, then
/// `crashkernel=` and the default crash unless the words have their own.
pub fn capture_words(words: &[String], capture: &CaptureOptions) -> Vec<String> {
    let has = |key: &str| words.iter().any(|w| w.starts_with(&format!("{key}=")));
    let mut words = words.to_vec();
    if !has("crashkernel") {
        words.push(format!("crashkernel={}", capture.crashkernel()));
    }
    if let Some(spec) = &capture.default_crash
        && !asks_for_crash(&words)
    {
        words.push(format!("crash={spec}"));
    }
    words
}

/// The `crashkernel=` the words end up with (the last one wins, as in hv).
fn effective_crashkernel(words: &[String]) -> Option<&str> {
    words
        .iter()
        .rev()
        .find_map(|w| w.strip_prefix("crashkernel="))
}

/// The capture modules of a run, built or fetched as needed.
fn modules(capture: &CaptureOptions, words: &[String]) -> Result<Vec<BootModule>> {
    Ok(match capture.kernel {
        CaptureKernel::Linux => {
            let (vmlinuz, initrd) = match (&capture.image, &capture.initrd) {
                (Some(image), Some(initrd)) => (image.clone(), initrd.clone()),
                (image, initrd) => {
                    let writer = if capture.makedumpfile {
                        initramfs::DumpWriter::Makedumpfile
                    } else {
                        initramfs::DumpWriter::Copy
                    };
                    let built = initramfs::linux_capture(writer)?;
                    (
                        image.clone().unwrap_or(built.kit.vmlinuz),
                        initrd.clone().unwrap_or(built.initramfs),
                    )
                }
            };
            vec![
                BootModule {
                    file: vmlinuz,
                    cmdline: format!("capture {}", capture.linux_args)
                        .trim_end()
                        .to_owned(),
                },
                BootModule {
                    file: initrd,
                    cmdline: "capture-initrd".to_owned(),
                },
            ]
        }
        CaptureKernel::Hv => {
            let file = match &capture.image {
                Some(image) => image.clone(),
                None => {
                    let text = effective_crashkernel(words).unwrap_or(HV_CRASHKERNEL);
                    let (_, base) = parse_crashkernel(text)?;
                    let base = base.with_context(|| {
                        format!(
                            "crashkernel={text}: hv's capture mode is linked at the \
                             reservation's base, so it needs one (SIZE@BASE)"
                        )
                    })?;
                    kernel::build_capture(base)?
                }
            };
            vec![BootModule {
                file,
                cmdline: "capture".to_owned(),
            }]
        }
    })
}

/// Creates an empty sparse file of `bytes`.
fn sparse_file(path: &Path, bytes: u64) -> Result<()> {
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(bytes)
        .with_context(|| format!("sizing {}", path.display()))
}

/// Removes what an earlier run of the same name left.
fn clean(run_dir: &Path, names: &[&str]) -> Result<()> {
    fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    for name in names {
        let path = run_dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}

/// The serial markers timed during a capture run: the crash, then the
/// capture kernel's first words.
fn markers(kernel: CaptureKernel) -> Vec<Marker> {
    vec![
        Marker {
            text: judge::CRASH_MARKER.to_owned(),
            after: None,
        },
        Marker {
            text: judge::entry_marker(kernel).to_owned(),
            after: Some(0),
        },
    ]
}

/// Boots hv in QEMU with a capture kernel, lets it crash, and collects the
/// dump. `options.append` are the user's words; `boot` and memory are
/// taken as given (see [`LINUX_MEMORY_MIB`] for sensible ones).
pub fn qemu(options: &QemuOptions, capture: &CaptureOptions) -> Result<RunOutcome> {
    if capture.makedumpfile && capture.kernel != CaptureKernel::Linux {
        bail!(
            "makedumpfile runs in the Linux capture kernel's initramfs: use it with \
             --capture linux (hv's capture mode writes its own stream)"
        );
    }
    if capture.kernel == CaptureKernel::Linux && options.boot == Boot::Direct {
        bail!(
            "--capture linux needs two boot modules (kernel and initramfs), which direct \
             boot (PVH, one -initrd) cannot carry: use --boot grub-bios or grub-uefi"
        );
    }
    // The NMI button starts the crash itself: no default crash beside it.
    let button = CaptureOptions {
        default_crash: None,
        ..capture.clone()
    };
    let capture = if options.nmi_button_after_ms.is_some() {
        &button
    } else {
        capture
    };
    let words = capture_words(&options.append, capture);
    crate::cmdline::kernel_cmdline(&words)?;
    let name = options.run_name.clone().unwrap_or_else(|| {
        format!(
            "qemu-{}-smp{}-capture-{}",
            options.boot.as_str(),
            options.smp,
            capture.kernel.as_str()
        )
    });
    let run_dir = paths::run_dir(&name);
    clean(
        &run_dir,
        &[
            DUMP_FILE,
            DISK_FILE,
            KDUMP_FILE,
            KDUMP_DISK_FILE,
            PARALLEL_DISK_FILE,
            STREAM_FILE,
            DEBUGCON_LOG,
            "serial.log",
        ],
    )?;

    let mut run = options.clone();
    run.append = words.clone();
    run.run_name = Some(name);
    run.modules = modules(capture, &words)?;
    if capture.until_entry {
        check_until_entry(capture)?;
        run.stop = run::StopWhen::CaptureEntered;
    }
    if capture.kernel == CaptureKernel::Linux {
        let disks = [
            run_dir.join(DISK_FILE),
            run_dir.join(if capture.makedumpfile {
                KDUMP_DISK_FILE
            } else {
                PARALLEL_DISK_FILE
            }),
        ];
        for disk in disks {
            // The dump is at most RAM plus its headers.
            sparse_file(&disk, (u64::from(options.memory_mib) + 64) << 20)?;
            run.extra_args.extend(disk_args(&disk));
        }
    }

    // Judged on the words hv was given, xtask's time limits for a big
    // machine included (`crash_timeout_ms=`).
    let hv_words = run.words();
    let clock = SerialClock::start(run_dir.join("serial.log"), markers(capture.kernel));
    let outcome = run::qemu(&run);
    let times = clock.stop();
    let mut outcome = outcome?;

    let collected = match capture.kernel {
        CaptureKernel::Linux if capture.makedumpfile => Collected::from_makedumpfile(&run_dir),
        CaptureKernel::Linux => {
            let mut collected = Collected::from_disk(&run_dir);
            collected.parallel = parallel_copy(&outcome, &run_dir, &collected);
            collected
        }
        CaptureKernel::Hv => {
            let stream = run_dir.join(STREAM_FILE);
            if run_dir.join(DEBUGCON_LOG).exists() {
                fs::rename(run_dir.join(DEBUGCON_LOG), &stream)?;
            }
            hv_stream(&mut outcome, &run_dir, stream, capture.until_entry)
        }
    };
    judge::conclude(
        &mut outcome,
        capture.kernel,
        &hv_words,
        &collected,
        &times,
        true,
        capture.wake_check,
    )?;
    Ok(outcome)
}

/// The Linux capture kernel's second copy, by one reader per CPU, against
/// the dump, when `/init` says it made one; the disk is deleted when the
/// copies are the same, or when it was not used.
fn parallel_copy(
    outcome: &RunOutcome,
    run_dir: &Path,
    collected: &Collected,
) -> Option<Result<wake::ParallelCopy>> {
    let image = run_dir.join(PARALLEL_DISK_FILE);
    if outcome.report["capture"]["linux"]["parallel_readers"]
        .as_u64()
        .is_none()
    {
        // One CPU: the disk was never written.
        let _ = fs::remove_file(&image);
        return None;
    }
    let dump = collected.dump.as_ref().ok()?;
    let result = wake::compare_copies(&dump.path, &image);
    if matches!(&result, Ok(copy) if copy.first_difference.is_none()) {
        let _ = fs::remove_file(&image);
    }
    Some(result)
}

/// hv's stream, reassembled into the dump; not waited for when the run
/// ended at the capture kernel's entry.
fn hv_stream(
    outcome: &mut RunOutcome,
    run_dir: &Path,
    stream: PathBuf,
    until_entry: bool,
) -> Collected {
    if until_entry {
        not_waited_for(outcome, stream)
    } else {
        Collected::from_stream(run_dir, &stream)
    }
}

/// A capture run stopped at the capture kernel's entry
/// ([`CaptureOptions::until_entry`]) has no dump to collect: the report
/// says so (`xtask.capture_until_entry`), and the judge checks the entry
/// and the core header the capture image read instead.
fn not_waited_for(outcome: &mut RunOutcome, stream: PathBuf) -> Collected {
    outcome.report["xtask"]["capture_until_entry"] = serde_json::json!(true);
    Collected {
        dump: Err(anyhow::anyhow!(
            "not waited for: the run ended at the capture kernel's entry (until_entry)"
        )),
        stream: None,
        source: stream,
        filtered: None,
        parallel: None,
    }
}

/// Only hv's capture mode says when it read the core header.
fn check_until_entry(capture: &CaptureOptions) -> Result<()> {
    if capture.kernel != CaptureKernel::Hv {
        bail!(
            "ending a capture run at the capture kernel's entry needs hv's capture mode, which \
             says when it read the core header"
        );
    }
    Ok(())
}

/// The QEMU arguments of the dump disk: virtio-blk, raw; zero writes punch
/// holes, so the image stays as sparse as the dump.
fn disk_args(disk: &Path) -> Vec<OsString> {
    vec![
        "-drive".into(),
        format!(
            "file={},format=raw,if=virtio,discard=unmap,detect-zeroes=unmap",
            run::drive_path(disk)
        )
        .into(),
    ]
}

/// Boots hv in Bochs with its capture mode (a Linux capture kernel would
/// need a virtio disk Bochs does not have), lets it crash, and collects the
/// dump.
pub fn bochs(options: &BochsOptions, capture: &CaptureOptions) -> Result<RunOutcome> {
    if capture.kernel != CaptureKernel::Hv || capture.makedumpfile {
        bail!(
            "Bochs captures with hv's capture mode only (--capture hv): the Linux \
             capture kernel (and makedumpfile in it) writes to a virtio disk, which \
             Bochs lacks"
        );
    }
    if capture.bochs_sink == BochsSink::Ata {
        // Refused before anything is built: Bochs would stop at start-up.
        run::check_cpus_with_disk(options.cpus)?;
    }
    let mut words = capture_words(&options.append, capture);
    if capture.bochs_sink == BochsSink::Ata && !words.iter().any(|w| w.starts_with("capture_sink="))
    {
        words.push("capture_sink=ata".to_owned());
    }
    crate::cmdline::kernel_cmdline(&words)?;
    let name = options
        .run_name
        .clone()
        .unwrap_or_else(|| format!("bochs-cpus{}-capture-hv", options.cpus));
    let run_dir = paths::run_dir(&name);
    // A Bochs killed mid-run (a time limit) leaves its disk's lock file,
    // and the next run of the same name could not open the disk.
    clean(
        &run_dir,
        &[
            DUMP_FILE,
            DISK_FILE,
            DISK_LOCK_FILE,
            STREAM_FILE,
            "serial.log",
        ],
    )?;

    let mut run = options.clone();
    run.append = words.clone();
    run.run_name = Some(name);
    // The capture kernel's modules, then the run's own (guests).
    run.modules = modules(capture, &words)?;
    run.modules.extend(options.modules.iter().cloned());
    let stream = match capture.bochs_sink {
        BochsSink::Ata => {
            let disk = run_dir.join(DISK_FILE);
            sparse_file(&disk, bochs_disk_bytes(options.memory_mib))?;
            run.extra_config.push(format!(
                "ata0-slave: type=disk, path=\"{}\", mode=flat",
                disk.display()
            ));
            disk
        }
        BochsSink::Debugcon => {
            let stream = run_dir.join(STREAM_FILE);
            run.stdout_log = Some(stream.clone());
            stream
        }
    };

    if capture.until_entry {
        run.stop = run::StopWhen::CaptureEntered;
    }

    let clock = SerialClock::start(run_dir.join("serial.log"), markers(capture.kernel));
    let outcome = run::bochs(&run);
    let times = clock.stop();
    let mut outcome = outcome?;
    let collected = hv_stream(&mut outcome, &run_dir, stream, capture.until_entry);
    judge::conclude(
        &mut outcome,
        capture.kernel,
        &words,
        &collected,
        &times,
        false,
        capture.wake_check,
    )?;
    Ok(outcome)
}

/// A flat Bochs disk large enough for a stream of all of RAM, in whole
/// cylinders of 16 heads and 63 sectors (Bochs derives the geometry).
fn bochs_disk_bytes(memory_mib: u32) -> u64 {
    const CYLINDER: u64 = 16 * 63 * 512;
    ((u64::from(memory_mib) + 16) << 20).div_ceil(CYLINDER) * CYLINDER
}

/// Reads the dump of a finished run for the report and the summary.
pub fn dump_info(outcome: &RunOutcome) -> Option<DumpInfo> {
    let path = outcome.report["capture"]["dump_path"].as_str()?;
    DumpInfo::read(Path::new(path)).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn big_machines_reserve_more_for_hv_capture_mode() {
        assert_eq!(hv_crashkernel_for(CaptureKernel::Hv, 64), None);
        assert_eq!(hv_crashkernel_for(CaptureKernel::Hv, 128), None);
        assert_eq!(
            hv_crashkernel_for(CaptureKernel::Hv, 256).as_deref(),
            Some("112M@0x10000000")
        );
        assert_eq!(
            hv_crashkernel_for(CaptureKernel::Hv, 512).as_deref(),
            Some("160M@0x10000000")
        );
        assert_eq!(hv_crashkernel_for(CaptureKernel::Linux, 512), None);
        let options = CaptureOptions::new(CaptureKernel::Hv, 512);
        assert_eq!(options.crashkernel(), "160M@0x10000000");
        assert_eq!(
            CaptureOptions::new(CaptureKernel::Hv, 4).crashkernel(),
            HV_CRASHKERNEL
        );
    }

    use super::*;

    #[test]
    fn crashkernel_sizes_and_bases_read_as_hv_reads_them() {
        assert_eq!(parse_crashkernel("256M").unwrap(), (256 << 20, None));
        assert_eq!(
            parse_crashkernel("64M@0x10000000").unwrap(),
            (64 << 20, Some(0x1000_0000))
        );
        assert_eq!(
            parse_crashkernel("0x4000000@256M").unwrap(),
            (64 << 20, Some(256 << 20))
        );
        assert_eq!(parse_crashkernel("1G").unwrap(), (1 << 30, None));
        for bad in ["", "0", "12345", "64M@", "64Q", "M", "64M@0x1001", "-1M"] {
            assert!(parse_crashkernel(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn capture_words_add_the_reservation_and_a_crash_unless_given() {
        let linux = CaptureOptions::new(CaptureKernel::Linux, 8);
        assert_eq!(
            capture_words(&["log=debug".into()], &linux),
            ["log=debug", "crashkernel=256M", "crash=cpu:1,after_ms:50"]
        );
        let hv = CaptureOptions::new(CaptureKernel::Hv, 1);
        assert_eq!(
            capture_words(&[], &hv),
            ["crashkernel=64M@0x10000000", "crash=cpu:0,after_ms:50"]
        );
        let own = capture_words(
            &["crashkernel=128M".into(), "crash=cpu:3,after_ms:10".into()],
            &linux,
        );
        assert_eq!(own, ["crashkernel=128M", "crash=cpu:3,after_ms:10"]);
        let hypercall = capture_words(
            &["guest_crash_call=2".into(), "crash_hypercall=allow".into()],
            &linux,
        );
        assert_eq!(
            hypercall,
            [
                "guest_crash_call=2",
                "crash_hypercall=allow",
                "crashkernel=256M"
            ]
        );
        let no_crash = CaptureOptions {
            default_crash: None,
            crashkernel: Some("32M".into()),
            ..CaptureOptions::new(CaptureKernel::Hv, 4)
        };
        assert_eq!(capture_words(&[], &no_crash), ["crashkernel=32M"]);
    }

    #[test]
    fn crash_words_are_recognised() {
        let w =
            |text: &str| -> Vec<String> { text.split_whitespace().map(str::to_owned).collect() };
        assert!(asks_for_crash(&w("crash=cpu:1,after_ms:5")));
        assert!(asks_for_crash(&w(
            "guest_crash_call=1 crash_hypercall=allow"
        )));
        assert!(!asks_for_crash(&w(
            "guest_crash_call=1 crash_hypercall=allow crash_hypercall=deny"
        )));
        assert!(!asks_for_crash(&w("guest_crash_call=1 crash_timeout_ms=5")));
        assert!(!asks_for_crash(&w("crashkernel=64M")));
        assert!(asks_for_crash(&w("hang=cpu:3,after_ms:100 watchdog=1")));
        assert!(asks_for_crash(&w("stray_write=reservation")));
        assert!(!asks_for_crash(&w("watchdog=1 nmi=log")));
    }

    #[test]
    fn the_last_crashkernel_word_wins() {
        let words: Vec<String> = ["crashkernel=1M", "x=1", "crashkernel=64M@256M"]
            .iter()
            .map(|w| w.to_string())
            .collect();
        assert_eq!(effective_crashkernel(&words), Some("64M@256M"));
        assert_eq!(effective_crashkernel(&[]), None);
    }

    #[test]
    fn an_hv_capture_needs_a_fixed_base() {
        let capture = CaptureOptions {
            crashkernel: Some("64M".into()),
            ..CaptureOptions::new(CaptureKernel::Hv, 2)
        };
        let words = capture_words(&[], &capture);
        let error = modules(&capture, &words).unwrap_err().to_string();
        assert!(error.contains("needs one (SIZE@BASE)"), "{error}");
    }

    #[test]
    fn given_images_are_used_as_they_are() {
        let capture = CaptureOptions {
            image: Some("/x/garbage".into()),
            ..CaptureOptions::new(CaptureKernel::Hv, 2)
        };
        let modules = modules(&capture, &[]).unwrap();
        assert_eq!(
            modules,
            [BootModule {
                file: "/x/garbage".into(),
                cmdline: "capture".into()
            }]
        );
        let capture = CaptureOptions {
            image: Some("/x/bzImage".into()),
            initrd: Some("/x/initrd".into()),
            ..CaptureOptions::new(CaptureKernel::Linux, 2)
        };
        let modules = super::modules(&capture, &[]).unwrap();
        assert_eq!(modules[0].cmdline, format!("capture {LINUX_CAPTURE_ARGS}"));
        assert_eq!(modules[1].cmdline, "capture-initrd");
    }

    #[test]
    fn the_dump_disk_is_a_sparse_virtio_drive() {
        let args: Vec<String> = disk_args(Path::new("/b/a,b/vmcore.img"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-drive",
                "file=/b/a,,b/vmcore.img,format=raw,if=virtio,discard=unmap,detect-zeroes=unmap"
            ]
        );
    }

    #[test]
    fn bochs_disks_are_whole_cylinders_above_ram() {
        let bytes = bochs_disk_bytes(512);
        assert_eq!(bytes % (16 * 63 * 512), 0);
        assert!(bytes >= 528 << 20);
    }

    #[test]
    fn bochs_refuses_fifteen_cpus_with_the_dump_disk_at_once() {
        let options = BochsOptions {
            cpus: 15,
            ..BochsOptions::new("/nonexistent/hv")
        };
        let capture = CaptureOptions::new(CaptureKernel::Hv, 15);
        let error = bochs(&options, &capture).unwrap_err().to_string();
        assert!(error.contains("too many registered timers"), "{error}");
        assert!(error.contains("--cpus 14"), "{error}");
    }

    #[test]
    fn linux_capture_refuses_direct_boot_and_bochs() {
        let options = QemuOptions::new("/nonexistent/hv");
        let capture = CaptureOptions::new(CaptureKernel::Linux, 4);
        let error = qemu(&options, &capture).unwrap_err().to_string();
        assert!(error.contains("--boot grub-bios"), "{error}");
        let error = bochs(&BochsOptions::new("/nonexistent/hv"), &capture)
            .unwrap_err()
            .to_string();
        assert!(error.contains("--capture hv"), "{error}");
    }
}
