//! Booting hv in QEMU.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::watch::{NmiButton, StopWhen, WatchRules, Watched, watch};
use super::{Boot, Finished, NmiButtonSection, RunOutcome, check_elf, finish, prepare_run_dir};
use crate::accel::{self, Accel};
use crate::iso::BootModule;
use crate::process;
use crate::qemu_program::{self, QemuProgram};
use crate::report::{Backend, End, ExitConvention, Expectations};
use crate::report::{QEMU_EXIT_FAILURE, QEMU_EXIT_SUCCESS};
use crate::tools::{self, Need};
use crate::{cmdline, iso};

const SERIAL_LOG: &str = "serial.log";
const DEBUGCON_LOG: &str = "debugcon.log";
const EMULATOR_LOG: &str = "qemu.log";

/// The I/O port of QEMU's `isa-debug-exit` device, where hv writes its exit
/// code.
const DEBUG_EXIT_PORT: &str = "0xf4";

/// From this many CPUs on, xtask lengthens hv's lockup threshold, bring-up
/// limit and crash rendezvous wait ([`QemuOptions::words`]).
pub const SCALED_WATCHDOG_FROM_CPUS: u32 = 129;

/// What a QEMU run looks like.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// The hv ELF to boot.
    pub elf: PathBuf,
    /// Number of virtual CPUs (`-smp`); hv must report them all.
    pub smp: u32,
    /// Guest memory in MiB (`-m`).
    pub memory_mib: u32,
    /// How hv is loaded.
    pub boot: Boot,
    /// Extra command-line words after `finish=exit`.
    pub append: Vec<String>,
    /// Time after which QEMU is killed and the run fails.
    pub timeout: Duration,
    /// Name of the run directory under `build/`; derived from the options
    /// when `None`. Runs that may happen at the same time need distinct
    /// names.
    pub run_name: Option<String>,
    /// Whether to copy the serial console to stdout while it runs.
    pub echo: bool,
    /// Boot modules: `module2` lines in the GRUB config; with direct boot
    /// at most one, given to QEMU as `-initrd` (PVH has no module command
    /// line).
    pub modules: Vec<BootModule>,
    /// More QEMU arguments (disks, ...), after all others.
    pub extra_args: Vec<OsString>,
    /// The CPU model under TCG instead of `max` (which has SVM with
    /// nested paging), e.g. `qemu64,-svm` for a CPU with neither VMX nor
    /// SVM. Then the run expects no particular backend.
    pub tcg_cpu: Option<String>,
    /// GRUB boots: this `grub.cfg` and these files instead of the one
    /// xtask writes (the README's stanza). `append` then holds the hv words
    /// of its `multiboot2` line, for the expectations; xtask adds none.
    pub grub_setup: Option<GrubSetup>,
    /// End QEMU once hv reported `done` (for a command line without
    /// `finish=exit`, where hv halts and QEMU would run on); its exit
    /// status then means nothing.
    pub stop_at_done: bool,
    /// End QEMU at another point of the run (see [`StopWhen`]); its exit
    /// status then means nothing.
    pub stop: StopWhen,
    /// Press the platform's NMI button (QMP `inject-nmi`) this many
    /// milliseconds after hv's boot report. Without a `hang=` word (a hung
    /// hv never says `done`) xtask adds `finish=halt`, so that hv stays up
    /// after `done`, and ends QEMU itself once the crash path and its
    /// capture are over ([`StopWhen::CrashOver`]). The run expects the
    /// crash it starts (`nmi=dump`, hv's default): reason `external NMI`.
    pub nmi_button_after_ms: Option<u64>,
    /// Run under TCG even where KVM offers nested VMX (the SVM backend's
    /// runs: TCG's `-cpu max` has SVM).
    pub force_tcg: bool,
    /// Called with every serial line as it comes.
    pub on_line: Option<super::LineHook>,
    /// Run on a QEMU whose TCG offers x2APIC (issue 14), as every run with
    /// more than 255 CPUs does: see [`crate::qemu_program`]. hv must then
    /// report x2APIC mode.
    pub x2apic: bool,
}

/// A GRUB configuration written elsewhere, and the files it loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubSetup {
    /// The whole `grub.cfg`.
    pub config: String,
    /// Files for the ISO: (source, path inside the ISO).
    pub files: Vec<(PathBuf, String)>,
}

impl QemuOptions {
    /// The default run: 4 CPUs, 512 MiB, direct boot, 60 s, quiet.
    pub fn new(elf: impl Into<PathBuf>) -> Self {
        Self {
            elf: elf.into(),
            smp: 4,
            memory_mib: 512,
            boot: Boot::Direct,
            append: Vec::new(),
            timeout: Duration::from_secs(60),
            run_name: None,
            echo: false,
            modules: Vec::new(),
            extra_args: Vec::new(),
            tcg_cpu: None,
            grub_setup: None,
            stop_at_done: false,
            stop: StopWhen::Exit,
            nmi_button_after_ms: None,
            force_tcg: false,
            on_line: None,
            x2apic: false,
        }
    }

    /// hv's words of the run: `append`, and `finish=halt` when the NMI
    /// button is pressed on an hv that would otherwise end QEMU at `done`
    /// (no `hang=`, no `finish=` of the caller's).
    pub fn words(&self) -> Vec<String> {
        let mut words = self.append.clone();
        if self.halts_for_the_button() {
            words.push("finish=halt".to_owned());
        }
        words.extend(self.scaled_timeouts());
        words
    }

    /// hv's time limits for a big machine: QEMU runs one host thread per
    /// vCPU, and on this host's 2 cores a vCPU of 256 can go without
    /// running for more than hv's default 10 s lockup threshold (seen at
    /// `-smp 256`: 51 CPUs "not ticked for 10 s" during the guest run),
    /// its 5 s bring-up limit (one AP of 256 missed it on a busy host) or
    /// the crash rendezvous's 1 s (at `-smp 256` with guests running, 34
    /// CPUs had not taken the NMI after 2 s; with a longer wait the same
    /// crash had all 255 in within 1.6 s and 2.6 s, and 3 of the 34 took
    /// it just after the wait ended: slow, not stuck). From
    /// [`SCALED_WATCHDOG_FROM_CPUS`] on, unless the caller set them, xtask
    /// gives hv half a second per CPU (`watchdog=`), 40 ms per CPU for its
    /// APs to check in (`ap_timeout_ms=`) and 40 ms per CPU for the crash
    /// rendezvous (`crash_timeout_ms=`; a run with a deliberate straggler
    /// waits that long).
    fn scaled_timeouts(&self) -> Vec<String> {
        let set = |key: &str| self.append.iter().any(|word| word.starts_with(key));
        let mut words = Vec::new();
        if self.smp >= SCALED_WATCHDOG_FROM_CPUS {
            if !set("watchdog=") {
                words.push(format!("watchdog={}", self.smp / 2));
            }
            if !set("ap_timeout_ms=") {
                words.push(format!("ap_timeout_ms={}", self.smp * 40));
            }
            if !set("crash_timeout_ms=") {
                words.push(format!("crash_timeout_ms={}", self.smp * 40));
            }
        }
        words
    }

    /// Whether xtask adds `finish=halt` for the NMI button (see
    /// [`nmi_button_after_ms`](Self::nmi_button_after_ms)).
    fn halts_for_the_button(&self) -> bool {
        let has = |key: &str| self.append.iter().any(|word| word.starts_with(key));
        self.nmi_button_after_ms.is_some()
            && self.grub_setup.is_none()
            && !has("hang=")
            && !has("finish=")
    }

    /// When xtask ends QEMU: as asked, or, when it added `finish=halt`
    /// for the button, once the crash path is over.
    fn stop_rule(&self) -> StopWhen {
        match self.stop {
            StopWhen::Exit if self.halts_for_the_button() => StopWhen::CrashOver,
            StopWhen::Exit if self.stop_at_done => StopWhen::Done,
            other => other,
        }
    }

    fn default_run_name(&self) -> String {
        format!("qemu-{}-smp{}", self.boot.as_str(), self.smp)
    }
}

/// UEFI firmware for QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// Split code and variable store on two pflash devices; the variable
    /// store is copied per run because the firmware writes to it.
    Pflash {
        /// Read-only firmware code.
        code: PathBuf,
        /// The pristine variable store to copy.
        vars_template: PathBuf,
    },
    /// One combined image given to `-bios`.
    Bios(PathBuf),
}

/// Finds OVMF among Debian's file names, preferring the split pflash images.
pub fn find_ovmf(exists: impl Fn(&Path) -> bool) -> Option<Firmware> {
    const PFLASH_PAIRS: [(&str, &str); 2] = [
        (
            "/usr/share/OVMF/OVMF_CODE.fd",
            "/usr/share/OVMF/OVMF_VARS.fd",
        ),
        (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
        ),
    ];
    const COMBINED: &str = "/usr/share/ovmf/OVMF.fd";
    PFLASH_PAIRS
        .iter()
        .map(|(code, vars)| (Path::new(code), Path::new(vars)))
        .find(|(code, vars)| exists(code) && exists(vars))
        .map(|(code, vars)| Firmware::Pflash {
            code: code.to_path_buf(),
            vars_template: vars.to_path_buf(),
        })
        .or_else(|| exists(Path::new(COMBINED)).then(|| Firmware::Bios(COMBINED.into())))
}

/// What QEMU boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Media {
    /// `-kernel` with `-append`.
    Kernel { elf: PathBuf, cmdline: String },
    /// The GRUB ISO on the default firmware (SeaBIOS).
    BiosCdrom { iso: PathBuf },
    /// The GRUB ISO on OVMF; `vars` is this run's copy of the variable
    /// store when the firmware is split.
    UefiCdrom {
        iso: PathBuf,
        firmware: Firmware,
        vars: Option<PathBuf>,
    },
}

/// The QEMU command line, apart from the program name.
pub(crate) fn qemu_args(
    accel: Accel,
    smp: u32,
    memory_mib: u32,
    media: &Media,
    run_dir: &Path,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
    push(&["-machine", "q35"]);
    push(&accel.qemu_args());
    push(&["-m", &format!("{memory_mib}M"), "-smp", &smp.to_string()]);
    push(&["-display", "none", "-no-reboot"]);
    push(&[
        "-serial",
        &format!("file:{}", run_dir.join(SERIAL_LOG).display()),
    ]);
    push(&[
        "-device",
        &format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT},iosize=0x04"),
    ]);
    push(&[
        "-debugcon",
        &format!("file:{}", run_dir.join(DEBUGCON_LOG).display()),
    ]);
    match media {
        Media::Kernel { elf, cmdline } => {
            push(&["-kernel", &elf.display().to_string(), "-append", cmdline]);
        }
        Media::BiosCdrom { iso } => push(&["-cdrom", &iso.display().to_string()]),
        Media::UefiCdrom {
            iso,
            firmware,
            vars,
        } => {
            match (firmware, vars) {
                (Firmware::Pflash { code, .. }, Some(vars)) => push(&[
                    "-drive",
                    &format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        drive_path(code)
                    ),
                    "-drive",
                    &format!("if=pflash,format=raw,unit=1,file={}", drive_path(vars)),
                ]),
                (Firmware::Pflash { code, .. }, None) => {
                    push(&["-bios", &code.display().to_string()]);
                }
                (Firmware::Bios(image), _) => push(&["-bios", &image.display().to_string()]),
            }
            push(&["-cdrom", &iso.display().to_string()]);
        }
    }
    args
}

/// A path inside a `-drive` option string, where a comma must be doubled.
pub(crate) fn drive_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// Boots hv in QEMU and judges the run.
pub fn qemu(options: &QemuOptions) -> Result<RunOutcome> {
    if options.smp == 0 {
        bail!("--smp must be at least 1");
    }
    check_elf(&options.elf)?;
    tools::ensure(&qemu_needs(options.boot))?;
    let program = qemu_program::for_run(options.smp, options.x2apic)?;
    let x2apic = program.source != qemu_program::Source::Distribution
        || qemu_program::needs_x2apic(options.smp, options.x2apic);
    let words = options.words();
    let cmdline = match &options.grub_setup {
        // The configuration's own words, which xtask does not touch.
        Some(_) => words.join(" "),
        None => cmdline::kernel_cmdline(&words)?,
    };
    if options.grub_setup.is_some() && options.boot == Boot::Direct {
        bail!("a GRUB configuration needs --boot grub-bios or grub-uefi");
    }
    let name = options
        .run_name
        .clone()
        .unwrap_or_else(|| options.default_run_name());
    let run_dir = prepare_run_dir(&name, &[SERIAL_LOG, DEBUGCON_LOG, EMULATOR_LOG])?;
    let media = media(options, &cmdline, &run_dir)?;
    let rules = WatchRules {
        stop: options.stop_rule(),
        button: options.nmi_button_after_ms.map(|ms| NmiButton {
            socket: super::qmp::socket_path(&run_dir),
            after: Duration::from_millis(ms),
        }),
        on_line: options.on_line.clone(),
    };

    let mut accel = if options.force_tcg {
        Accel::Tcg
    } else {
        accel::detect()
    };
    let mut notes = Vec::new();
    let mut watched = attempt(&program, options, accel, &media, &run_dir, &rules)?;
    if accel == Accel::Kvm && kvm_start_failed(&watched) {
        notes.push(format!(
            "QEMU with KVM ended at once without serial output ({:?}); ran again under TCG",
            watched.end
        ));
        accel = Accel::Tcg;
        watched = attempt(&program, options, accel, &media, &run_dir, &rules)?;
    }
    if let Some(socket) = &rules.button {
        let _ = fs::remove_file(&socket.socket);
    }

    let mut expect = Expectations::from_cmdline(options.smp, &words)
        .with_nmi_button(options.nmi_button_after_ms.is_some());
    match (accel, &options.tcg_cpu) {
        // KVM is chosen only when it offers nested VMX (see `accel`).
        (Accel::Kvm, _) => expect = expect.with_virt(Backend::Vmx),
        // TCG's `-cpu max` emulates SVM with nested paging.
        (Accel::Tcg, None) => expect = expect.with_virt(Backend::Svm),
        (Accel::Tcg, Some(_)) => {}
    }
    if x2apic {
        expect = expect.with_apic_mode("x2apic");
    }
    let mut nmi_button = None;
    if let Some(ms) = options.nmi_button_after_ms {
        let pressed = watched.pressed.as_ref();
        nmi_button = Some(NmiButtonSection {
            after_ms: ms,
            pressed: pressed.is_some_and(|p| p.result.is_ok()),
            at_secs: pressed.map(|p| (p.at.as_secs_f64() * 1000.0).round() / 1000.0),
            after_report_ms: pressed.map(|p| p.after_report.as_millis() as u64),
            error: pressed.and_then(|p| p.result.as_ref().err().cloned()),
        });
        match pressed.map(|p| &p.result) {
            None => notes.push(format!(
                "the NMI button was never pressed: hv's boot report did not come, or QEMU \
                 ended within {ms} ms of it"
            )),
            Some(Err(error)) => notes.push(format!("the NMI button failed: {error}")),
            Some(Ok(())) => {}
        }
    }
    let convention = if let Some(why) = watched.stopped_by_xtask {
        notes.push(format!("QEMU was ended by xtask: {why}"));
        ExitConvention::Meaningless
    } else {
        ExitConvention::QemuDebugExit
    };
    finish(Finished {
        emulator: accel.emulator_name(),
        boot: options.boot,
        elf: &options.elf,
        expect,
        convention,
        cmdline: &cmdline,
        run_dir: &run_dir,
        serial_log: &run_dir.join(SERIAL_LOG),
        emulator_log: &run_dir.join(EMULATOR_LOG),
        console_log: &run_dir.join(EMULATOR_LOG),
        notes,
        emulator_problems: Vec::new(),
        watched,
        qemu: Some(qemu_program::report_of(&program)),
        nmi_button,
    })
}

/// What the host must have for a QEMU run that boots this way.
pub fn qemu_needs(boot: Boot) -> Vec<Need> {
    match boot {
        Boot::Direct => vec![Need::Qemu],
        Boot::GrubBios => vec![Need::Qemu, Need::GrubIso],
        Boot::GrubUefi => vec![Need::Qemu, Need::GrubIso, Need::Ovmf],
    }
}

/// Prepares the boot media of a run in its directory.
fn media(options: &QemuOptions, cmdline: &str, run_dir: &Path) -> Result<Media> {
    if options.boot == Boot::Direct && options.modules.len() > 1 {
        bail!(
            "direct boot carries one module (-initrd), not {}: boot through GRUB",
            options.modules.len()
        );
    }
    let make_iso = || match &options.grub_setup {
        Some(setup) => iso::make_iso_from_config(&setup.files, &setup.config, run_dir),
        None => iso::make_iso_with_modules(&options.elf, cmdline, &options.modules, run_dir),
    };
    Ok(match options.boot {
        Boot::Direct => Media::Kernel {
            elf: options.elf.clone(),
            cmdline: cmdline.to_owned(),
        },
        Boot::GrubBios => Media::BiosCdrom { iso: make_iso()? },
        Boot::GrubUefi => {
            let iso = make_iso()?;
            let firmware = find_ovmf(Path::exists).context("no OVMF firmware found")?;
            let vars = match &firmware {
                Firmware::Pflash { vars_template, .. } => {
                    let copy = run_dir.join("OVMF_VARS.fd");
                    fs::copy(vars_template, &copy).with_context(|| {
                        format!("copying {} for this run", vars_template.display())
                    })?;
                    Some(copy)
                }
                Firmware::Bios(_) => None,
            };
            Media::UefiCdrom {
                iso,
                firmware,
                vars,
            }
        }
    })
}

/// Starts QEMU once and watches it to its end.
fn attempt(
    program: &QemuProgram,
    options: &QemuOptions,
    accel: Accel,
    media: &Media,
    run_dir: &Path,
    rules: &WatchRules,
) -> Result<Watched> {
    let mut args = qemu_args(accel, options.smp, options.memory_mib, media, run_dir);
    if let (Accel::Tcg, Some(model)) = (accel, &options.tcg_cpu) {
        with_cpu_model(&mut args, model);
    }
    if let (Media::Kernel { .. }, Some(module)) = (media, options.modules.first()) {
        args.extend(["-initrd".into(), module.file.clone().into_os_string()]);
    }
    if let Some(button) = &rules.button {
        let _ = fs::remove_file(&button.socket);
        args.extend(super::qmp::qemu_args(&button.socket));
    }
    args.extend(qemu_program::extra_args_for(options.smp));
    args.extend(options.extra_args.iter().cloned());
    if options.echo {
        let shown: Vec<String> = program
            .leading_args()
            .iter()
            .chain(&args)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        eprintln!("$ {} {}", program.program.display(), shown.join(" "));
    }
    let mut child = process::spawn_logged(
        program.command().args(&args),
        &run_dir.join(EMULATOR_LOG),
        "qemu-system-x86_64",
    )?;
    watch(
        &mut child,
        &run_dir.join(SERIAL_LOG),
        options.timeout,
        options.echo,
        rules,
    )
}

/// Replaces the value of `-cpu` in `args` with `model`.
fn with_cpu_model(args: &mut [OsString], model: &str) {
    if let Some(position) = args.iter().position(|arg| arg == "-cpu")
        && let Some(value) = args.get_mut(position + 1)
    {
        *value = model.into();
    }
}

/// A KVM start that failed: QEMU ended with neither of hv's exit codes before
/// the guest wrote a single serial byte.
fn kvm_start_failed(watched: &Watched) -> bool {
    matches!(watched.end, End::Exited(status)
        if status != Some(QEMU_EXIT_SUCCESS) && status != Some(QEMU_EXIT_FAILURE))
        && watched.serial_bytes == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_text(accel: Accel, media: &Media) -> String {
        qemu_args(accel, 4, 512, media, Path::new("/b/run"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn direct_boot_passes_kernel_cmdline_and_exit_device() {
        let media = Media::Kernel {
            elf: "/t/hv".into(),
            cmdline: "finish=exit log=debug".into(),
        };
        let args = qemu_args(Accel::Tcg, 4, 512, &media, Path::new("/b/run"));
        let text = args_text(Accel::Tcg, &media);
        assert!(
            text.starts_with(
                "-machine q35 -accel tcg -cpu max -m 512M -smp 4 -display none -no-reboot"
            ),
            "{text}"
        );
        assert!(text.contains("-serial file:/b/run/serial.log"), "{text}");
        assert!(
            text.contains("-device isa-debug-exit,iobase=0xf4,iosize=0x04"),
            "{text}"
        );
        assert!(
            text.contains("-debugcon file:/b/run/debugcon.log"),
            "{text}"
        );
        // The command line stays one argument.
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(args[append + 1], "finish=exit log=debug");
        assert_eq!(args[append - 1], "/t/hv");
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let media = Media::BiosCdrom {
            iso: "/b/hv.iso".into(),
        };
        let text = args_text(Accel::Kvm, &media);
        assert!(text.contains("-accel kvm -cpu host"), "{text}");
        assert!(text.ends_with("-cdrom /b/hv.iso"), "{text}");
    }

    #[test]
    fn uefi_boot_puts_ovmf_on_pflash_with_a_private_vars_copy() {
        let media = Media::UefiCdrom {
            iso: "/b/hv.iso".into(),
            firmware: Firmware::Pflash {
                code: "/o/CODE.fd".into(),
                vars_template: "/o/VARS.fd".into(),
            },
            vars: Some("/b/a,b/VARS.fd".into()),
        };
        let text = args_text(Accel::Tcg, &media);
        assert!(
            text.contains("-drive if=pflash,format=raw,unit=0,readonly=on,file=/o/CODE.fd"),
            "{text}"
        );
        assert!(
            text.contains("-drive if=pflash,format=raw,unit=1,file=/b/a,,b/VARS.fd"),
            "{text}"
        );
        assert!(text.ends_with("-cdrom /b/hv.iso"), "{text}");
    }

    #[test]
    fn combined_ovmf_goes_to_bios() {
        let media = Media::UefiCdrom {
            iso: "/b/hv.iso".into(),
            firmware: Firmware::Bios("/usr/share/ovmf/OVMF.fd".into()),
            vars: None,
        };
        assert!(args_text(Accel::Tcg, &media).contains("-bios /usr/share/ovmf/OVMF.fd -cdrom"));
    }

    #[test]
    fn ovmf_prefers_a_complete_pflash_pair() {
        let all = find_ovmf(|_| true).unwrap();
        assert_eq!(
            all,
            Firmware::Pflash {
                code: "/usr/share/OVMF/OVMF_CODE.fd".into(),
                vars_template: "/usr/share/OVMF/OVMF_VARS.fd".into(),
            }
        );
        let no_vars = find_ovmf(|p| !p.to_string_lossy().contains("VARS")).unwrap();
        assert_eq!(no_vars, Firmware::Bios("/usr/share/ovmf/OVMF.fd".into()));
        assert_eq!(find_ovmf(|_| false), None);
    }

    fn watched(end: End, serial_bytes: usize) -> Watched {
        Watched {
            end,
            elapsed: Duration::ZERO,
            collector: Default::default(),
            serial_bytes,
            stopped_by_xtask: None,
            pressed: None,
        }
    }

    #[test]
    fn the_nmi_button_keeps_an_idle_hv_up_and_ends_the_run_itself() {
        let mut options = QemuOptions::new("/t/hv");
        options.append = vec!["log=debug".to_owned()];
        assert_eq!(options.words(), ["log=debug"]);
        assert_eq!(options.stop_rule(), StopWhen::Exit);
        options.nmi_button_after_ms = Some(500);
        assert_eq!(options.words(), ["log=debug", "finish=halt"]);
        assert_eq!(options.stop_rule(), StopWhen::CrashOver);
        // A hung hv never says done: finish=exit stays.
        options.append.push("hang=cpu:3,after_ms:100".to_owned());
        assert_eq!(options.words(), options.append);
        assert_eq!(options.stop_rule(), StopWhen::Exit);
        // The caller's own finish= wins.
        options.append = vec!["finish=exit".to_owned()];
        assert_eq!(options.words(), ["finish=exit"]);
        options.stop_at_done = true;
        assert_eq!(options.stop_rule(), StopWhen::Done);
    }

    #[test]
    fn big_machines_get_longer_time_limits() {
        let mut options = QemuOptions::new("/t/hv");
        options.smp = 128;
        assert!(options.words().is_empty());
        options.smp = 256;
        assert_eq!(
            options.words(),
            [
                "watchdog=128",
                "ap_timeout_ms=10240",
                "crash_timeout_ms=10240"
            ]
        );
        options.append = vec![
            "watchdog=0".to_owned(),
            "ap_timeout_ms=300".to_owned(),
            "crash_timeout_ms=500".to_owned(),
        ];
        assert_eq!(
            options.words(),
            ["watchdog=0", "ap_timeout_ms=300", "crash_timeout_ms=500"]
        );
        // Each one the caller left out is still scaled.
        options.append = vec!["crash_timeout_ms=500".to_owned()];
        assert_eq!(
            options.words(),
            [
                "crash_timeout_ms=500",
                "watchdog=128",
                "ap_timeout_ms=10240"
            ]
        );
    }

    #[test]
    fn kvm_failure_is_a_silent_early_exit() {
        assert!(kvm_start_failed(&watched(End::Exited(Some(1)), 0)));
        assert!(!kvm_start_failed(&watched(End::Exited(Some(1)), 10)));
        assert!(!kvm_start_failed(&watched(
            End::Exited(Some(QEMU_EXIT_FAILURE)),
            0
        )));
        assert!(!kvm_start_failed(&watched(
            End::TimedOut(Duration::from_secs(1)),
            0
        )));
    }

    #[test]
    fn default_run_names_tell_runs_apart() {
        let mut options = QemuOptions::new("/t/hv");
        assert_eq!(options.default_run_name(), "qemu-direct-smp4");
        options.boot = Boot::GrubUefi;
        options.smp = 2;
        assert_eq!(options.default_run_name(), "qemu-grub-uefi-smp2");
    }
}
