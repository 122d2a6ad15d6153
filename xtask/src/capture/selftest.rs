//! The Linux capture kernel on its own, without hv: QEMU boots Debian's
//! kernel with xtask's initramfs as if a crashed kernel had left an ELF
//! core header in RAM (`elfcorehdr=`), and the dump that comes back must
//! be that header's memory, byte for byte.
//!
//! QEMU's `loader` device puts a core header (written by `kexec-loader`,
//! as hv's crash path writes it: old-memory placement, two CPUs, a crash
//! note) and a 16 MiB pattern ("old memory") into RAM before the kernel
//! starts; `memmap=SIZE$ADDR` keeps the kernel off both. This checks the
//! initramfs, the module loading, the copy and the extraction in about
//! ten seconds, whatever state hv is in.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kexec_loader::crash_note::{CpuLedger, CrashRecord, cpu_flags};
use kexec_loader::elfcore::{CpuRegisters, CpuState, MemorySegment, Placement, write_core_header};

use super::judge::{Collected, linux_init_lines};
use super::{DISK_FILE, DUMP_FILE, disk_args, sparse_file};
use crate::dump::DumpInfo;
use crate::initramfs::{self, COPIED_MARKER};
use crate::process::{self, Followed, SerialLog};
use crate::run::{self, Media};
use crate::{accel, paths};

/// Where the fake core header lies.
const HEADER_PHYS: u64 = 0x0700_0000;
/// The fake old memory: 16 MiB at 128 MiB, clear of the kernel (loaded at
/// 16 MiB, `nokaslr`) and of the initramfs (at the top of RAM).
const OLD_MEMORY_PHYS: u64 = 0x0800_0000;
const OLD_MEMORY_LEN: u64 = 16 << 20;
const MEMORY_MIB: u32 = 512;
const _: () = assert!(
    HEADER_PHYS + (64 << 10) <= OLD_MEMORY_PHYS,
    "the header's 64 KiB must end before the old memory"
);

/// What the self-test found.
#[derive(Debug)]
pub struct SelfTest {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The extracted dump.
    pub dump: DumpInfo,
    /// The serial log.
    pub serial: String,
    /// How long QEMU ran.
    pub elapsed: Duration,
}

/// The old memory's bytes: every page numbered, every fourth page zero.
pub fn old_memory() -> Vec<u8> {
    let mut bytes = vec![0u8; OLD_MEMORY_LEN as usize];
    for (page, chunk) in bytes.chunks_mut(4096).enumerate() {
        if page % 4 != 3 {
            for (i, byte) in chunk.iter_mut().enumerate() {
                *byte = (page as u8).wrapping_mul(31).wrapping_add(i as u8) | 1;
            }
        }
    }
    bytes
}

/// The core header in old-memory placement.
fn core_header() -> Result<Vec<u8>> {
    let cpus = [1u32, 0].map(|cpu_index| CpuState {
        cpu_index,
        regs: CpuRegisters {
            rip: 0x20_0000 + u64::from(cpu_index),
            rsp: 0x10_0000,
            ..CpuRegisters::default()
        },
    });
    let ledger = [
        CpuLedger {
            cpu_index: 0,
            apic_id: 0,
            flags: cpu_flags::CHECKED_IN,
            vmcs_loaded: 0,
            vmclears: &[],
        },
        CpuLedger {
            cpu_index: 1,
            apic_id: 1,
            flags: cpu_flags::CHECKED_IN | cpu_flags::COORDINATOR,
            vmcs_loaded: 0,
            vmclears: &[],
        },
    ];
    let crash = CrashRecord {
        reason: "xtask capture self-test",
        coordinator: 1,
        stragglers: &[],
        cpus: &ledger,
    };
    let segments = [MemorySegment {
        phys: OLD_MEMORY_PHYS,
        virt: OLD_MEMORY_PHYS,
        len: OLD_MEMORY_LEN,
    }];
    let mut header = vec![0u8; 16 << 10];
    let layout = write_core_header(
        &mut header,
        &cpus,
        &crash,
        &segments,
        None,
        Placement::OldMemory {
            header_phys: HEADER_PHYS,
        },
    )
    .map_err(|error| anyhow::anyhow!("writing the fake core header: {error}"))?;
    header.truncate(layout.len);
    Ok(header)
}

/// Runs the self-test in `build/<name>/`.
pub fn linux_selftest(name: &str, timeout: Duration) -> Result<SelfTest> {
    let capture = initramfs::linux_capture(initramfs::DumpWriter::Copy)?;
    let run_dir = paths::run_dir(name);
    super::clean(
        &run_dir,
        &[
            DUMP_FILE,
            DISK_FILE,
            "serial.log",
            "debugcon.log",
            "qemu.log",
        ],
    )?;
    let header_file = run_dir.join("elfcorehdr.bin");
    fs::write(&header_file, core_header()?)?;
    let memory_file = run_dir.join("old-memory.bin");
    fs::write(&memory_file, old_memory())?;
    let disk = run_dir.join(DISK_FILE);
    sparse_file(&disk, (u64::from(MEMORY_MIB) + 64) << 20)?;

    let cmdline = format!(
        "{} nokaslr elfcorehdr={HEADER_PHYS:#x} memmap=64K${HEADER_PHYS:#x} memmap={}M${OLD_MEMORY_PHYS:#x}",
        initramfs::LINUX_CAPTURE_ARGS,
        OLD_MEMORY_LEN >> 20
    );
    let media = Media::Kernel {
        elf: capture.kit.vmlinuz.clone(),
        cmdline,
    };
    let mut args = run::qemu_args(accel::Accel::Tcg, 1, MEMORY_MIB, &media, &run_dir);
    args.push("-initrd".into());
    args.push(capture.initramfs.clone().into_os_string());
    for (file, address) in [(&header_file, HEADER_PHYS), (&memory_file, OLD_MEMORY_PHYS)] {
        args.push("-device".into());
        args.push(
            format!(
                "loader,file={},addr={address:#x},force-raw=on",
                run::drive_path(file)
            )
            .into(),
        );
    }
    args.extend(disk_args(&disk));

    let mut child = process::spawn_logged(
        Command::new("qemu-system-x86_64").args(&args),
        &run_dir.join("qemu.log"),
        "qemu-system-x86_64",
    )?;
    let started = Instant::now();
    let followed = process::follow(
        &mut child,
        &mut SerialLog::new(&run_dir.join("serial.log")),
        timeout,
        Duration::from_millis(50),
        |_| Ok(None::<()>),
    )?;
    let status = match followed {
        Followed::Exited(status) => status,
        Followed::Found(()) | Followed::TimedOut => {
            child.kill();
            bail!(
                "the Linux capture kernel did not finish within {} s (see {})",
                timeout.as_secs(),
                run_dir.join("serial.log").display()
            );
        }
    };
    let elapsed = started.elapsed();
    let serial = String::from_utf8_lossy(&fs::read(run_dir.join("serial.log"))?).into_owned();
    if !serial.contains(COPIED_MARKER) {
        bail!(
            "the capture kernel copied no dump (QEMU {status}); /init said: {:?} (see {})",
            linux_init_lines(&serial),
            run_dir.join("serial.log").display()
        );
    }
    let dump = Collected::from_disk(&run_dir).dump?;
    Ok(SelfTest {
        run_dir,
        dump,
        serial,
        elapsed,
    })
}

/// The bytes of the dump's one segment.
pub fn segment_bytes(dump: &Path) -> Result<Vec<u8>> {
    let info = DumpInfo::read(dump)?;
    let segment = info.segments.first().context("no PT_LOAD segment")?;
    let bytes = fs::read(dump)?;
    let start = usize::try_from(segment.p_offset)?;
    let end = start + usize::try_from(segment.p_filesz)?;
    Ok(bytes
        .get(start..end)
        .context("the segment runs past the file")?
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kexec_loader::elfcore::CoreDump;

    #[test]
    fn the_fake_header_is_what_a_capture_kernel_expects() {
        let header = core_header().unwrap();
        let core = CoreDump::parse_elfcorehdr(&header, HEADER_PHYS).unwrap();
        assert_eq!(core.cpus().count(), 2);
        assert_eq!(core.crash_note().unwrap().coordinator(), 1);
        let segment = core.load_segments().next().unwrap();
        assert_eq!(
            (segment.p_paddr, segment.p_memsz),
            (OLD_MEMORY_PHYS, OLD_MEMORY_LEN)
        );
        // The header fits the region memmap= keeps from the kernel.
        assert!(header.len() <= 64 << 10);
    }

    #[test]
    fn old_memory_has_data_and_zero_pages() {
        let memory = old_memory();
        assert_eq!(memory.len() as u64, OLD_MEMORY_LEN);
        assert!(memory[..4096].iter().all(|&b| b != 0));
        assert!(memory[3 * 4096..4 * 4096].iter().all(|&b| b == 0));
    }
}
