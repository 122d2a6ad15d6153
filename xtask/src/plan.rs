//! What one `cargo xtask qemu-smp` or `cargo xtask bochs` run does about a
//! crash and its capture, from the command-line flags.
//!
//! `qemu-smp` shows the whole path by default: boot, bring-up, guests where
//! the CPU has VMX, an injected crash on an AP once hv's boot report is out
//! ([`default_crash`]), the shootdown, and a capture by hv's own capture
//! mode (built from this repository: nothing to download), which writes
//! the dump. The flags take parts away or change them:
//!
//! | flags | crash | capture |
//! |---|---|---|
//! | none | the default | hv |
//! | `--crash SPEC\|random` (or `crash=` in `--append`) | that one | hv |
//! | `--capture linux` | the default, or the one asked for | Linux |
//! | `--capture none` | the default, or the one asked for | none |
//! | `--no-crash` | none (boot only) | none |
//!
//! `bochs` keeps its old default, a boot-only run: there a crash comes
//! only with `--crash` or `--capture`, a capture only with `--capture`.
//!
//! A crash that strikes before hv loads its capture kernel (`point:bringup`:
//! an AP panics during bring-up) cannot be captured. When the capture was
//! only the default, or the crash a random draw, the run falls back to a
//! plain crash and says so ([`Plan::settle`]); a capture asked for with a
//! crash that rules it out is refused before anything runs.

use crate::capture::{self, CaptureKernel};
use crate::crash::{CrashSpec, Point};
use crate::report::Expectations;

/// How long after the guest run's end the default crash of a whole-path
/// run comes.
pub const AFTER_GUESTS_MS: u64 = 100;

/// hv's largest `after_ms` (and `guest_run_ms`), `hv/core/src/cmdline.rs`.
const MAX_AFTER_MS: u64 = 3_600_000;

/// The crash injected when none is asked for (a `crash=` value).
///
/// A whole-path run (`qemu-smp`): CPU 1, the first AP (CPU 0 on a one-CPU
/// machine), [`AFTER_GUESTS_MS`] after the guest run ends:
/// `cpu:1,after_ms:200` with hv's default `guest_run_ms=100`, or that
/// setting from `words` plus 100. hv counts `after_ms` from the start of
/// the guest run, and without VMX from the end of its boot report; either
/// way the crash comes after the boot report, which hv prints once the
/// guests are done, so the report keeps its CPUs and guests.
///
/// Otherwise (`bochs --capture hv`): [`capture::default_crash`], 50 ms
/// into the guest run, so that VMCSes are loaded at the crash (and the
/// boot report is never printed).
pub fn default_crash(whole_path_by_default: bool, cpus: u32, words: &[String]) -> String {
    if !whole_path_by_default {
        return capture::default_crash(cpus);
    }
    let guest_run_ms = Expectations::from_cmdline(cpus, words).crash.guest_run_ms;
    let after_ms = guest_run_ms
        .saturating_add(AFTER_GUESTS_MS)
        .min(MAX_AFTER_MS);
    format!("cpu:{},after_ms:{after_ms}", u32::from(cpus > 1))
}

/// `--capture`'s value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureFlag {
    /// Debian's Linux with xtask's initramfs (fetched with apt).
    Linux,
    /// hv's own capture mode (built from this repository).
    Hv,
    /// No capture: a plain crash, ended by hv's crash path.
    None,
}

impl CaptureFlag {
    /// The capture kernel this flag asks for, if any.
    pub fn kernel(self) -> Option<CaptureKernel> {
        match self {
            CaptureFlag::Linux => Some(CaptureKernel::Linux),
            CaptureFlag::Hv => Some(CaptureKernel::Hv),
            CaptureFlag::None => None,
        }
    }
}

/// The flags of one run that decide its crash and capture.
#[derive(Debug, Clone, Copy)]
pub struct Flags<'a> {
    /// Whether the command runs the whole path when no flag says otherwise
    /// (`qemu-smp`: yes; `bochs`: no).
    pub whole_path_by_default: bool,
    /// `--no-crash`.
    pub no_crash: bool,
    /// `--crash SPEC|random` was given.
    pub crash: bool,
    /// `--capture`.
    pub capture: Option<CaptureFlag>,
    /// Which of `--crashkernel`, `--capture-kernel`, `--capture-initrd`,
    /// `--capture-args` were given (their names, for the error).
    pub capture_options: &'a [&'static str],
    /// The user's hv words (`--append`).
    pub words: &'a [String],
    /// `--nmi-button-after-ms`: the NMI button starts the crash.
    pub nmi_button: bool,
}

/// Where the run's crash comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashSource {
    /// No crash: hv boots, reports and says `done`.
    None,
    /// xtask adds [`default_crash`].
    Default,
    /// The user's: `--crash`, or a `crash=` (or crash hypercall) word.
    Asked,
}

/// How the run got its capture kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureSource {
    /// `--capture` named it (or `none`).
    Asked,
    /// The command's default.
    Default,
}

/// What the run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Where the crash comes from.
    pub crash: CrashSource,
    /// The capture kernel, if the run captures its crash.
    pub capture: Option<CaptureKernel>,
    /// Whether `capture` was asked for or is the default.
    pub capture_source: CaptureSource,
    /// Whether the command runs the whole path by default (`qemu-smp`).
    pub whole_path: bool,
    /// Why the run does less than asked or than the default (a fallback),
    /// for the run report's `xtask.notes` and the summary.
    pub notes: Vec<String>,
}

/// Decides the run's crash and capture from its flags; the error says
/// which flags contradict each other.
pub fn resolve(flags: &Flags<'_>) -> Result<Plan, String> {
    let words_crash = capture::asks_for_crash(flags.words) || flags.nmi_button;
    let capture_asked = flags.capture.and_then(CaptureFlag::kernel);
    if flags.no_crash {
        if let Some(kernel) = capture_asked {
            return Err(format!(
                "--no-crash runs no crash, so there is nothing to capture: drop \
                 --capture {} (or --no-crash)",
                kernel.as_str()
            ));
        }
        if words_crash {
            return Err(
                "--no-crash and a crash word in --append (`crash=`, `hang=`, \
                 `stray_write=reservation`, or `crash_hypercall=allow` with \
                 `guest_crash_call=`) or the NMI button: give only one"
                    .to_owned(),
            );
        }
    }
    let crash = if flags.no_crash {
        CrashSource::None
    } else if flags.crash || words_crash {
        CrashSource::Asked
    } else if flags.whole_path_by_default || capture_asked.is_some() {
        CrashSource::Default
    } else {
        CrashSource::None
    };
    let (capture, capture_source) = match flags.capture {
        Some(flag) => (flag.kernel(), CaptureSource::Asked),
        None if flags.whole_path_by_default && crash != CrashSource::None => {
            (Some(CaptureKernel::Hv), CaptureSource::Default)
        }
        None => (None, CaptureSource::Default),
    };
    if capture.is_none()
        && let Some(first) = flags.capture_options.first()
    {
        return Err(format!(
            "{first} sets up a capture, and this run has none ({}): add --capture hv or \
             --capture linux",
            if flags.no_crash {
                "--no-crash"
            } else if flags.capture == Some(CaptureFlag::None) {
                "--capture none"
            } else {
                "no crash asked for"
            }
        ));
    }
    Ok(Plan {
        crash,
        capture,
        capture_source,
        whole_path: flags.whole_path_by_default,
        notes: Vec::new(),
    })
}

/// Why a crash given by its hv words cannot be captured, if it cannot:
/// hv loads the capture kernel after bring-up, so a crash during
/// bring-up finds none.
pub fn capture_blocker(words: &[String]) -> Option<String> {
    let value = words
        .iter()
        .rev()
        .find_map(|word| word.strip_prefix("crash="))?;
    let spec = CrashSpec::parse(value).ok()?;
    (spec.point == Some(Point::Bringup)).then(|| {
        format!(
            "crash={spec} strikes during bring-up, before hv loads its capture kernel, so \
             nothing can capture it"
        )
    })
}

impl Plan {
    /// Settles the capture once the crash words are final (`words`: every
    /// hv word of the run, a random spec drawn; `random`: whether it was).
    /// A crash that cannot be captured turns a default capture, or one
    /// meant for a random crash, into a plain crash with a note; a capture
    /// asked for with a crash that rules it out is an error.
    pub fn settle(mut self, words: &[String], random: bool) -> Result<Plan, String> {
        let Some(kernel) = self.capture else {
            return Ok(self);
        };
        if self.crash == CrashSource::None {
            return Ok(self);
        }
        if let Some(why) = capture_blocker(words) {
            if self.capture_source == CaptureSource::Asked && !random {
                return Err(format!(
                    "--capture {}: {why}; use --capture none for a plain crash",
                    kernel.as_str()
                ));
            }
            self.capture = None;
            self.notes.push(format!("no capture: {why}"));
        }
        Ok(self)
    }

    /// The line printed before the run: what it will do (`nmi_button`:
    /// the NMI button's delay after the boot report, if it is pressed).
    pub fn describe(&self, words: &[String], cpus: u32, nmi_button: Option<u64>) -> String {
        let crash = match self.crash {
            CrashSource::None => "no crash (boot and self-report only)".to_owned(),
            CrashSource::Default | CrashSource::Asked => {
                let last = |key: &str| words.iter().rev().find(|word| word.starts_with(key));
                let mut triggers: Vec<String> = ["crash=", "hang=", "stray_write="]
                    .iter()
                    .filter_map(|key| last(key).cloned())
                    .collect();
                if let Some(ms) = nmi_button {
                    triggers.push(format!(
                        "the NMI button (QMP inject-nmi) {ms} ms after the boot report"
                    ));
                }
                let word = if triggers.is_empty() {
                    "a guest's crash hypercall".to_owned()
                } else {
                    triggers.join(", ")
                };
                match self.crash {
                    CrashSource::Default if !self.whole_path => {
                        format!("{word} (a capture run's default)")
                    }
                    CrashSource::Default if cpus > 1 => {
                        format!(
                            "{word} (the default: an AP panics after the boot report; \
                             --no-crash for boot only)"
                        )
                    }
                    CrashSource::Default => format!(
                        "{word} (the default, after the boot report; one CPU, so the boot CPU \
                         panics; --no-crash for boot only)"
                    ),
                    _ => word,
                }
            }
        };
        let capture = match (self.crash, self.capture) {
            (CrashSource::None, _) => String::new(),
            (_, Some(CaptureKernel::Hv)) => {
                "; captured by hv's capture mode (built from this repository)".to_owned()
            }
            (_, Some(CaptureKernel::Linux)) => {
                "; captured by Debian's Linux with xtask's initramfs".to_owned()
            }
            (_, None) => "; no capture (a plain crash)".to_owned(),
        };
        format!("run: {crash}{capture}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    fn qemu<'a>(words: &'a [String]) -> Flags<'a> {
        Flags {
            whole_path_by_default: true,
            no_crash: false,
            crash: false,
            capture: None,
            capture_options: &[],
            words,
            nmi_button: false,
        }
    }

    fn bochs<'a>(words: &'a [String]) -> Flags<'a> {
        Flags {
            whole_path_by_default: false,
            ..qemu(words)
        }
    }

    #[test]
    fn the_default_runs_the_whole_path_with_hv_capture() {
        let plan = resolve(&qemu(&[])).unwrap();
        assert_eq!(
            plan,
            Plan {
                crash: CrashSource::Default,
                capture: Some(CaptureKernel::Hv),
                capture_source: CaptureSource::Default,
                whole_path: true,
                notes: Vec::new(),
            }
        );
    }

    #[test]
    fn the_default_crash_comes_after_the_boot_report() {
        assert_eq!(default_crash(true, 4, &[]), "cpu:1,after_ms:200");
        assert_eq!(default_crash(true, 64, &[]), "cpu:1,after_ms:200");
        assert_eq!(default_crash(true, 1, &[]), "cpu:0,after_ms:200");
        let longer = words("guest_run_ms=500");
        assert_eq!(default_crash(true, 8, &longer), "cpu:1,after_ms:600");
        let huge = words("guest_run_ms=3600000");
        assert_eq!(default_crash(true, 8, &huge), "cpu:1,after_ms:3600000");
        // A time-based crash at or after guest_run_ms is not expected to
        // find guests running (so nor loaded VMCSes).
        let spec = CrashSpec::parse(&default_crash(true, 8, &longer)[..]).unwrap();
        assert!(spec.after_ms >= 500 + AFTER_GUESTS_MS);
        // Bochs' capture runs keep theirs: inside the guest run.
        assert_eq!(default_crash(false, 8, &[]), "cpu:1,after_ms:50");
        assert_eq!(default_crash(false, 1, &[]), "cpu:0,after_ms:50");
    }

    #[test]
    fn no_crash_is_the_old_boot_only_run() {
        let plan = resolve(&Flags {
            no_crash: true,
            ..qemu(&[])
        })
        .unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::None, None));
        // `--capture none` says the same, and is allowed with it.
        let plan = resolve(&Flags {
            no_crash: true,
            capture: Some(CaptureFlag::None),
            ..qemu(&[])
        })
        .unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::None, None));
    }

    #[test]
    fn no_crash_refuses_what_needs_a_crash() {
        let error = resolve(&Flags {
            no_crash: true,
            capture: Some(CaptureFlag::Hv),
            ..qemu(&[])
        })
        .unwrap_err();
        assert!(error.contains("drop --capture hv"), "{error}");
        let crash = words("crash=cpu:2,after_ms:1");
        let error = resolve(&Flags {
            no_crash: true,
            ..qemu(&crash)
        })
        .unwrap_err();
        assert!(error.contains("give only one"), "{error}");
        let error = resolve(&Flags {
            no_crash: true,
            capture_options: &["--crashkernel"],
            ..qemu(&[])
        })
        .unwrap_err();
        assert!(
            error.starts_with("--crashkernel sets up a capture"),
            "{error}"
        );
        assert!(error.contains("(--no-crash)"), "{error}");
    }

    #[test]
    fn a_crash_asked_for_is_captured_by_hv_unless_told_otherwise() {
        let plan = resolve(&Flags {
            crash: true,
            ..qemu(&[])
        })
        .unwrap();
        assert_eq!(
            (plan.crash, plan.capture, plan.capture_source),
            (
                CrashSource::Asked,
                Some(CaptureKernel::Hv),
                CaptureSource::Default
            )
        );
        let hypercall = words("crash_hypercall=allow guest_crash_call=1");
        let plan = resolve(&qemu(&hypercall)).unwrap();
        assert_eq!(plan.crash, CrashSource::Asked);
        let plan = resolve(&Flags {
            crash: true,
            capture: Some(CaptureFlag::None),
            ..qemu(&[])
        })
        .unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::Asked, None));
    }

    #[test]
    fn capture_none_alone_is_the_default_crash_without_capture() {
        let plan = resolve(&Flags {
            capture: Some(CaptureFlag::None),
            ..qemu(&[])
        })
        .unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::Default, None));
        let error = resolve(&Flags {
            capture: Some(CaptureFlag::None),
            capture_options: &["--capture-kernel", "--crashkernel"],
            ..qemu(&[])
        })
        .unwrap_err();
        assert!(error.starts_with("--capture-kernel sets up"), "{error}");
        assert!(error.contains("(--capture none)"), "{error}");
    }

    #[test]
    fn capture_linux_keeps_the_default_crash() {
        let plan = resolve(&Flags {
            capture: Some(CaptureFlag::Linux),
            capture_options: &["--capture-args"],
            ..qemu(&[])
        })
        .unwrap();
        assert_eq!(
            (plan.crash, plan.capture, plan.capture_source),
            (
                CrashSource::Default,
                Some(CaptureKernel::Linux),
                CaptureSource::Asked
            )
        );
    }

    #[test]
    fn capture_options_apply_to_the_default_capture() {
        let plan = resolve(&Flags {
            capture_options: &["--crashkernel"],
            ..qemu(&[])
        })
        .unwrap();
        assert_eq!(plan.capture, Some(CaptureKernel::Hv));
    }

    #[test]
    fn bochs_keeps_a_boot_only_default() {
        let plan = resolve(&bochs(&[])).unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::None, None));
        let plan = resolve(&Flags {
            crash: true,
            ..bochs(&[])
        })
        .unwrap();
        assert_eq!((plan.crash, plan.capture), (CrashSource::Asked, None));
        let plan = resolve(&Flags {
            capture: Some(CaptureFlag::Hv),
            ..bochs(&[])
        })
        .unwrap();
        assert_eq!(
            (plan.crash, plan.capture),
            (CrashSource::Default, Some(CaptureKernel::Hv))
        );
        let error = resolve(&Flags {
            capture_options: &["--crashkernel"],
            ..bochs(&[])
        })
        .unwrap_err();
        assert!(error.contains("(no crash asked for)"), "{error}");
    }

    #[test]
    fn only_a_bringup_crash_blocks_the_capture() {
        assert!(capture_blocker(&words("crash=cpu:3,after_ms:0,point:bringup")).is_some());
        for ok in [
            "",
            "log=info",
            "crash=cpu:1,after_ms:50",
            "crash=cpu:1,after_ms:0,point:before_vmx",
            "crash=cpu:3,point:nmi_blocked",
            "crash=cpu:1,point:bringup crash=cpu:1,after_ms:5",
            "crash=nonsense",
        ] {
            assert_eq!(capture_blocker(&words(ok)), None, "{ok}");
        }
    }

    #[test]
    fn settle_falls_back_to_a_plain_crash_or_refuses() {
        let bringup = words("crash=cpu:2,after_ms:0,point:bringup");
        // The default capture: a plain crash, with a note.
        let plan = resolve(&Flags {
            crash: true,
            ..qemu(&[])
        })
        .unwrap()
        .settle(&bringup, false)
        .unwrap();
        assert_eq!(plan.capture, None);
        assert_eq!(plan.notes.len(), 1);
        assert!(
            plan.notes[0].starts_with(
                "no capture: crash=cpu:2,after_ms:0,point:bringup strikes during bring-up"
            ),
            "{:?}",
            plan.notes
        );
        // Asked for, with a random crash that drew bringup: the same.
        let asked = Flags {
            crash: true,
            capture: Some(CaptureFlag::Hv),
            ..qemu(&[])
        };
        let plan = resolve(&asked).unwrap().settle(&bringup, true).unwrap();
        assert_eq!(plan.capture, None);
        // Asked for, with a crash the user chose: refused.
        let error = resolve(&asked)
            .unwrap()
            .settle(&bringup, false)
            .unwrap_err();
        assert!(error.starts_with("--capture hv: crash="), "{error}");
        assert!(
            error.ends_with("use --capture none for a plain crash"),
            "{error}"
        );
        // A crash that can be captured changes nothing.
        let fine = words("crash=cpu:1,after_ms:50");
        let plan = resolve(&qemu(&[])).unwrap();
        assert_eq!(plan.clone().settle(&fine, false).unwrap(), plan);
    }

    #[test]
    fn describe_says_what_the_run_does() {
        let default = words("crash=cpu:1,after_ms:200");
        let plan = resolve(&qemu(&[])).unwrap();
        assert_eq!(
            plan.describe(&default, 4, None),
            "run: crash=cpu:1,after_ms:200 (the default: an AP panics after the boot report; \
             --no-crash for boot only); captured by hv's capture mode (built from this repository)"
        );
        let single = words("crash=cpu:0,after_ms:200");
        assert!(
            plan.describe(&single, 1, None)
                .contains("(the default, after the boot report; one CPU, so the boot CPU panics;")
        );
        let plan = resolve(&Flags {
            no_crash: true,
            ..qemu(&[])
        })
        .unwrap();
        assert_eq!(
            plan.describe(&[], 4, None),
            "run: no crash (boot and self-report only)"
        );
        let plan = resolve(&Flags {
            crash: true,
            capture: Some(CaptureFlag::None),
            ..qemu(&[])
        })
        .unwrap();
        assert_eq!(
            plan.describe(&words("crash=cpu:5,after_ms:3"), 8, None),
            "run: crash=cpu:5,after_ms:3; no capture (a plain crash)"
        );
        let plan = resolve(&Flags {
            capture: Some(CaptureFlag::Hv),
            ..bochs(&[])
        })
        .unwrap();
        assert_eq!(
            plan.describe(&words("crash=cpu:1,after_ms:50"), 8, None),
            "run: crash=cpu:1,after_ms:50 (a capture run's default); captured by hv's capture \
             mode (built from this repository)"
        );
        let hypercall = words("crash_hypercall=allow guest_crash_call=1");
        let plan = resolve(&Flags {
            capture: Some(CaptureFlag::Linux),
            ..qemu(&hypercall)
        })
        .unwrap();
        assert_eq!(
            plan.describe(&hypercall, 8, None),
            "run: a guest's crash hypercall; captured by Debian's Linux with xtask's initramfs"
        );
    }

    #[test]
    fn a_hang_a_stray_write_or_the_nmi_button_replace_the_default_crash() {
        for text in ["hang=cpu:3,after_ms:100", "stray_write=reservation"] {
            let hang = words(text);
            let plan = resolve(&qemu(&hang)).unwrap();
            assert_eq!(plan.crash, CrashSource::Asked, "{text}");
            assert_eq!(plan.capture, Some(CaptureKernel::Hv), "{text}");
            assert!(
                plan.describe(&hang, 8, None)
                    .starts_with(&format!("run: {text};"))
            );
        }
        let plan = resolve(&Flags {
            nmi_button: true,
            ..qemu(&[])
        })
        .unwrap();
        assert_eq!(
            (plan.crash, plan.capture),
            (CrashSource::Asked, Some(CaptureKernel::Hv))
        );
        let hang = words("hang=cpu:3,after_ms:100 watchdog=0");
        assert_eq!(
            plan.describe(&hang, 8, Some(1000)),
            "run: hang=cpu:3,after_ms:100, the NMI button (QMP inject-nmi) 1000 ms after the boot \
             report; captured by hv's capture mode (built from this repository)"
        );
        assert!(
            resolve(&Flags {
                nmi_button: true,
                no_crash: true,
                ..qemu(&[])
            })
            .is_err()
        );
    }
}
