//! Booting hv in Bochs, from the GRUB ISO.
//!
//! Bochs runs non-interactively with the `term` display (its screen goes to a
//! log file, not the user's terminal), `c` as its debugger script so that the
//! built-in debugger does not stop at a prompt, and COM1 written to a file
//! that is followed like QEMU's. hv ends Bochs by writing `Shutdown` to port
//! 0x8900; Bochs then exits with status 1 however the guest ended, so the
//! run is judged from the serial report alone.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::watch::{StopWhen, WatchRules, watch};
use super::{Boot, Finished, RunOutcome, check_elf, finish, prepare_run_dir};
use crate::iso::BootModule;
use crate::process;
use crate::report::{Backend, ExitConvention, Expectations};
use crate::tools::{self, BOCHS_BIOS, Need, VGA_BIOS};
use crate::{cmdline, iso};

const SERIAL_LOG: &str = "serial.log";
const BOCHS_LOG: &str = "bochs.log";
const EMULATOR_LOG: &str = "bochs.out";
const BOCHSRC: &str = "bochsrc";
const DEBUGGER_SCRIPT: &str = "cont.rc";

/// Bochs 2.7 fails to start with 16 or more CPUs ("register_timer: too many
/// registered timers").
pub const BOCHS_MAX_CPUS: u32 = 15;

/// With a hard disk on `ata0-slave` (hv's capture mode writes its dump
/// there), one CPU fewer: the disk's timer is one too many for 15 CPUs
/// (the same `>>PANIC<< register_timer: too many registered timers`, and
/// the guest never runs). Measured with Bochs 2.7: 14 CPUs and the disk
/// run, 15 do not.
pub const BOCHS_MAX_CPUS_WITH_DISK: u32 = 14;

/// The `>>PANIC<<` Bochs logs when hv ends the run on purpose (`Shutdown`
/// to port 0x8900): the expected end, not a problem.
const SHUTDOWN_PANIC: &str = "Shutdown port: shutdown requested";

/// The CPU Bochs emulates: the oldest model with VMX, EPT, unrestricted
/// guests and x2APIC.
pub const CPU_MODEL: &str = "corei7_haswell_4770";

/// Emulated instructions per second of guest time. Lower values make guest
/// delays (timer waits during AP start-up) cost fewer host instructions, so
/// runs end sooner.
const IPS: u64 = 10_000_000;

/// What a Bochs run looks like.
#[derive(Debug, Clone)]
pub struct BochsOptions {
    /// The hv ELF to boot.
    pub elf: PathBuf,
    /// Number of CPUs, 1 to [`BOCHS_MAX_CPUS`]; hv must report them all.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Extra command-line words after `finish=exit`.
    pub append: Vec<String>,
    /// Time after which Bochs is killed and the run fails.
    pub timeout: Duration,
    /// Name of the run directory under `build/`; derived from the options
    /// when `None`.
    pub run_name: Option<String>,
    /// Whether to copy the serial console to stdout while it runs.
    pub echo: bool,
    /// Boot modules: `module2` lines in the GRUB config.
    pub modules: Vec<BootModule>,
    /// More bochsrc lines (a disk on `ata0-slave`, ...).
    pub extra_config: Vec<String>,
    /// Where Bochs' stdout goes, which with `port_e9_hack` carries what
    /// the guest writes to port 0xE9; `None`: with its stderr into
    /// `bochs.out`.
    pub stdout_log: Option<PathBuf>,
    /// Called with every serial line as it arrives.
    pub on_line: Option<super::LineHook>,
    /// The CPU model [default: [`CPU_MODEL`]].
    pub cpu_model: Option<String>,
    /// End Bochs at a point of the run (see [`StopWhen`]), before it
    /// exits by itself.
    pub stop: StopWhen,
}

impl BochsOptions {
    /// The default run: 4 CPUs, 256 MiB, 120 s, quiet.
    pub fn new(elf: impl Into<PathBuf>) -> Self {
        Self {
            elf: elf.into(),
            cpus: 4,
            memory_mib: 256,
            append: Vec::new(),
            timeout: Duration::from_secs(120),
            run_name: None,
            echo: false,
            modules: Vec::new(),
            extra_config: Vec::new(),
            stdout_log: None,
            on_line: None,
            cpu_model: None,
            stop: StopWhen::Exit,
        }
    }

    fn default_run_name(&self) -> String {
        format!("bochs-cpus{}", self.cpus)
    }
}

/// What the host must have for a Bochs run.
pub const BOCHS_NEEDS: [Need; 2] = [Need::GrubIso, Need::Bochs];

/// Checks a CPU count for Bochs, with the reason when it cannot work.
pub fn check_cpus(cpus: u32) -> Result<u32> {
    match cpus {
        0 => bail!("Bochs needs at least 1 CPU"),
        n if n > BOCHS_MAX_CPUS => bail!(
            "Bochs 2.7 runs at most {BOCHS_MAX_CPUS} CPUs (with {n} it stops at start-up: \
             \"register_timer: too many registered timers\"); use QEMU for more"
        ),
        n => Ok(n),
    }
}

/// Checks a CPU count for Bochs with a hard disk on `ata0-slave`.
pub fn check_cpus_with_disk(cpus: u32) -> Result<u32> {
    let cpus = check_cpus(cpus)?;
    if cpus > BOCHS_MAX_CPUS_WITH_DISK {
        bail!(
            "Bochs 2.7 cannot run {cpus} CPUs and the ATA dump disk at once (it stops at \
             start-up: \">>PANIC<< register_timer: too many registered timers\", before the \
             guest runs): use --cpus {BOCHS_MAX_CPUS_WITH_DISK} or fewer, or \
             --capture-sink debugcon (the dump on port 0xE9, no disk), which runs up to \
             {BOCHS_MAX_CPUS} CPUs (about 4 minutes at 15)"
        );
    }
    Ok(cpus)
}

/// The `>>PANIC<<` and `>>ERROR<<` lines of a Bochs log (but the panic of
/// hv's own shutdown request), without their timestamps, each once, at
/// most `limit` of them.
pub fn log_problems(log: &str, limit: usize) -> Vec<String> {
    let mut problems: Vec<String> = Vec::new();
    for line in log.lines() {
        if !(line.contains(">>PANIC<<") || line.contains(">>ERROR<<"))
            || line.contains(SHUTDOWN_PANIC)
        {
            continue;
        }
        // "02946808585p[UNMAP ] >>PANIC<< ...": drop the time and level.
        let text = line.find('[').map_or(line, |at| &line[at..]).trim();
        if !problems.iter().any(|p| p == text) {
            problems.push(text.to_owned());
        }
        if problems.len() == limit {
            break;
        }
    }
    problems
}

/// The Bochs configuration of a run; every path is absolute, so Bochs may
/// start from any directory.
///
/// Sound is off and on dummy drivers: on a host without a sound card the
/// ALSA driver fails to open and Bochs 2.7's mixer thread then aborts
/// ("buffer overflow detected") at random, before the guest runs.
pub fn bochsrc(cpus: u32, memory_mib: u32, iso: &Path, run_dir: &Path) -> String {
    bochsrc_with_model(CPU_MODEL, cpus, memory_mib, iso, run_dir)
}

/// [`bochsrc`] with another CPU model.
pub fn bochsrc_with_model(
    model: &str,
    cpus: u32,
    memory_mib: u32,
    iso: &Path,
    run_dir: &Path,
) -> String {
    let path = |name: &str| run_dir.join(name).display().to_string();
    format!(
        "# Written by cargo xtask for one run of hv.\n\
         cpu: model={model}, count={cpus}, ips={IPS}, reset_on_triple_fault=0\n\
         memory: guest={memory_mib}, host={memory_mib}\n\
         romimage: file=\"{BOCHS_BIOS}\", options=fastboot\n\
         vgaromimage: file=\"{VGA_BIOS}\"\n\
         display_library: term\n\
         ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14\n\
         ata0-master: type=cdrom, path=\"{iso}\", status=inserted\n\
         boot: cdrom\n\
         com1: enabled=1, mode=file, dev=\"{serial}\"\n\
         port_e9_hack: enabled=1\n\
         clock: sync=none, time0=local\n\
         mouse: enabled=0\n\
         speaker: enabled=0\n\
         sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n\
         log: \"{log}\"\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=report\n\
         debug: action=ignore\n",
        iso = iso.display(),
        serial = path(SERIAL_LOG),
        log = path(BOCHS_LOG),
    )
}

/// Boots hv in Bochs from the GRUB ISO and judges the run.
pub fn bochs(options: &BochsOptions) -> Result<RunOutcome> {
    let cpus = check_cpus(options.cpus)?;
    check_elf(&options.elf)?;
    tools::ensure(&BOCHS_NEEDS)?;
    let cmdline = cmdline::kernel_cmdline(&options.append)?;
    let name = options
        .run_name
        .clone()
        .unwrap_or_else(|| options.default_run_name());
    let run_dir = prepare_run_dir(&name, &[SERIAL_LOG, BOCHS_LOG, EMULATOR_LOG])?;
    let iso = iso::make_iso_with_modules(&options.elf, &cmdline, &options.modules, &run_dir)?;

    let config = run_dir.join(BOCHSRC);
    let model = options.cpu_model.as_deref().unwrap_or(CPU_MODEL);
    let mut rc = bochsrc_with_model(model, cpus, options.memory_mib, &iso, &run_dir);
    for line in &options.extra_config {
        rc.push_str(line);
        rc.push('\n');
    }
    fs::write(&config, rc).with_context(|| format!("writing {}", config.display()))?;
    let script = run_dir.join(DEBUGGER_SCRIPT);
    // `c`ontinue: the Debian build has the debugger compiled in and would
    // otherwise wait at its prompt before the first instruction.
    fs::write(&script, "c\n").with_context(|| format!("writing {}", script.display()))?;

    if options.echo {
        eprintln!(
            "$ bochs -q -f {} -rc {}",
            config.display(),
            script.display()
        );
    }
    let (mut stdout, stderr) = process::log_files(&run_dir.join(EMULATOR_LOG))?;
    if let Some(path) = &options.stdout_log {
        stdout = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    }
    let mut child = process::spawn(
        Command::new("bochs")
            .arg("-q")
            .arg("-f")
            .arg(&config)
            .arg("-rc")
            .arg(&script)
            .current_dir(&run_dir)
            // The term display needs a terminal type; a dumb one keeps its
            // output (into bochs.out) free of escape sequences.
            .env("TERM", "dumb"),
        stdout,
        stderr,
        "bochs",
    )?;
    let rules = WatchRules {
        stop: options.stop,
        button: None,
        on_line: options.on_line.clone(),
    };
    let watched = watch(
        &mut child,
        &run_dir.join(SERIAL_LOG),
        options.timeout,
        options.echo,
        &rules,
    )?;
    let mut notes = Vec::new();
    if let Some(why) = watched.stopped_by_xtask {
        notes.push(format!("Bochs was ended by xtask: {why}"));
    }
    drop(child);
    let log = fs::read(run_dir.join(BOCHS_LOG))
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();

    finish(Finished {
        emulator: "bochs",
        boot: Boot::GrubBios,
        elf: &options.elf,
        // The CPU model has VMX: a run without guests is a failed run.
        expect: Expectations::from_cmdline(cpus, &options.append).with_virt(Backend::Vmx),
        convention: ExitConvention::Meaningless,
        cmdline: &cmdline,
        run_dir: &run_dir,
        serial_log: &run_dir.join(SERIAL_LOG),
        emulator_log: &run_dir.join(BOCHS_LOG),
        console_log: &run_dir.join(EMULATOR_LOG),
        notes,
        emulator_problems: log_problems(&log, 5),
        watched,
        qemu: None,
        nmi_button: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_fifteen_cpus_is_refused_with_the_reason() {
        assert_eq!(check_cpus(15).unwrap(), 15);
        let error = check_cpus(16).unwrap_err().to_string();
        assert!(error.contains("at most 15"), "{error}");
        assert!(error.contains("too many registered timers"), "{error}");
        assert!(check_cpus(0).is_err());
    }

    #[test]
    fn fifteen_cpus_and_the_dump_disk_are_refused_with_what_works() {
        assert_eq!(check_cpus_with_disk(14).unwrap(), 14);
        let error = check_cpus_with_disk(15).unwrap_err().to_string();
        assert!(error.contains("too many registered timers"), "{error}");
        assert!(error.contains("--cpus 14"), "{error}");
        assert!(error.contains("--capture-sink debugcon"), "{error}");
        assert!(
            check_cpus_with_disk(16)
                .unwrap_err()
                .to_string()
                .contains("at most 15")
        );
    }

    #[test]
    fn panics_and_errors_of_the_log_are_found_but_the_shutdown() {
        let log = "00000000000i[      ] Bochs x86 Emulator 2.7\n\
                   00000000000p[APIC0 ] >>PANIC<< register_timer: too many registered timers\n\
                   00000000000p[APIC0 ] >>PANIC<< register_timer: too many registered timers\n\
                   01234567890e[CPU3  ] >>ERROR<< VMFAIL: VMCLEAR with invalid physical address\n\
                   02946808585p[UNMAP ] >>PANIC<< Shutdown port: shutdown requested\n";
        assert_eq!(
            log_problems(log, 5),
            [
                "[APIC0 ] >>PANIC<< register_timer: too many registered timers",
                "[CPU3  ] >>ERROR<< VMFAIL: VMCLEAR with invalid physical address"
            ]
        );
        assert_eq!(log_problems(log, 1).len(), 1);
        assert!(
            log_problems(
                "02946808585p[UNMAP ] >>PANIC<< Shutdown port: shutdown requested",
                5
            )
            .is_empty()
        );
    }

    #[test]
    fn config_runs_unattended_with_vmx_cpus_and_serial_to_a_file() {
        let rc = bochsrc(4, 256, Path::new("/b/run/hv.iso"), Path::new("/b/run"));
        for line in [
            "cpu: model=corei7_haswell_4770, count=4, ips=10000000, reset_on_triple_fault=0",
            "memory: guest=256, host=256",
            "romimage: file=\"/usr/share/bochs/BIOS-bochs-latest\", options=fastboot",
            "display_library: term",
            "ata0-master: type=cdrom, path=\"/b/run/hv.iso\", status=inserted",
            "boot: cdrom",
            "com1: enabled=1, mode=file, dev=\"/b/run/serial.log\"",
            "panic: action=fatal",
            "sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy",
        ] {
            assert!(rc.lines().any(|l| l == line), "missing {line:?} in\n{rc}");
        }
    }

    #[test]
    fn default_run_name_counts_cpus() {
        let mut options = BochsOptions::new("/t/hv");
        options.cpus = 8;
        assert_eq!(options.default_run_name(), "bochs-cpus8");
    }
}
