//! What a run expects hv to report, derived from how it was started.
//!
//! By default a run expects every CPU it gave the emulator to be found and
//! brought online. hv's test knobs change that on purpose, and the command
//! line says so: `max_cpus=N` brings up only N CPUs, `ap_hang=ID` makes that
//! AP fail, `guest_misbehave=N` gets vCPU N stopped, `crash=...` (or
//! `crash_hypercall=allow` with `guest_crash_call=N`) makes hv crash and
//! report its shootdown instead of `done`. xtask reads those words (with
//! hv's number syntax: decimal or `0x` hex, the last word wins) so a run
//! with a knob is judged against what the knob must cause, not against a
//! full boot.

use crate::crash::CrashSpecExt;
use serde::Serialize;
use serde_json::Value;

use crate::crash::{self, CrashSpec, Point, parse_number};
use hv_abi::defaults::{MAX_WATCHDOG_SECONDS, WATCHDOG_SECONDS};
use hv_abi::knobs::{ExternalNmi, HangHow, HangSpec};

/// The virtualisation backend hv reports in `virt.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// VMX root operation with guests.
    Vmx,
    /// SVM with guests (AMD, QEMU TCG's `-cpu max`).
    Svm,
    /// No virtualisation (neither VMX nor SVM on the CPU).
    None,
}

impl Backend {
    /// The value of `virt.backend`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Vmx => "vmx",
            Backend::Svm => "svm",
            Backend::None => "none",
        }
    }

    /// The backend named `name` in a report.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "vmx" => Some(Backend::Vmx),
            "svm" => Some(Backend::Svm),
            "none" => Some(Backend::None),
            _ => None,
        }
    }

    /// Whether guests run with it.
    pub fn runs_guests(self) -> bool {
        self != Backend::None
    }

    /// What its guests' hardware contexts are called: "VMCS", "VMCB".
    pub fn context(self) -> &'static str {
        match self {
            Backend::Svm => "VMCB",
            _ => "VMCS",
        }
    }

    /// The report's word for a guest stopped by a nested page fault.
    pub fn nested_page_fault(self) -> &'static str {
        match self {
            Backend::Svm => "nested_page_fault",
            _ => "ept_violation",
        }
    }
}

/// What the run was asked to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectations {
    /// The number of CPUs the emulator was given; hv must find them all
    /// (`cpus.possible`).
    pub cpus: u32,
    /// At most this many CPUs are started, the boot CPU included
    /// (`max_cpus=`); `None` starts them all.
    pub max_cpus: Option<u32>,
    /// APIC IDs that must be reported in `cpus.failed` (`ap_hang=`); every
    /// other CPU that was started must come online.
    pub failed: Vec<u32>,
    /// The backend hv must report, when the platform decides it (Bochs'
    /// CPU model has VMX, QEMU TCG's `-cpu max` SVM); `None` accepts any.
    pub virt: Option<Backend>,
    /// vCPUs that must be stopped for a nested page fault (EPT violation,
    /// NPF) when guests run (`guest_misbehave=`); no other guest may be
    /// stopped.
    pub stopped_vcpus: Vec<u32>,
    /// The crash the command line asks for, if any.
    pub crash: CrashKnobs,
    /// The local APIC mode hv must report (`smp.apic_mode`): `x2apic` on
    /// an emulator whose CPU offers it (issue 14); `None` accepts any.
    pub apic_mode: Option<&'static str>,
}

/// The command-line words about crashing: what must crash hv, and the
/// settings the crash report is judged with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashKnobs {
    /// `crash=`: the injected crash.
    pub injected: Option<CrashSpec>,
    /// `guest_crash_call=N` with `crash_hypercall=allow`: vCPU N's guest
    /// makes the crash hypercall (only where guests run).
    pub hypercall_vcpu: Option<u32>,
    /// `crash_timeout_ms=`: how long the rendezvous waits for stragglers.
    pub timeout_ms: u64,
    /// `guest_run_ms=`: how long the guests run (a time-based crash within
    /// it lands while VMCSes are loaded).
    pub guest_run_ms: u64,
    /// `hang=`: a CPU hangs once the boot report is out (and with
    /// `how:lock` the next one too); hv never says `done`.
    pub hang: Option<HangSpec>,
    /// `watchdog=`: the lockup detector's threshold in seconds (0: off).
    pub watchdog_seconds: u64,
    /// `nmi=`: what an NMI from outside does.
    pub external_nmi: ExternalNmi,
    /// `stray_write=reservation`: a write into the capture reservation
    /// after the boot report, which must fault at once.
    pub stray_write: bool,
    /// The platform's NMI button is pressed during the run (QMP
    /// `inject-nmi`, xtask's `--nmi-button-after-ms`: not a word of hv's).
    pub nmi_button: bool,
}

impl Default for CrashKnobs {
    fn default() -> Self {
        Self {
            injected: None,
            hypercall_vcpu: None,
            timeout_ms: crash::DEFAULT_TIMEOUT_MS,
            guest_run_ms: crash::DEFAULT_GUEST_RUN_MS,
            hang: None,
            watchdog_seconds: WATCHDOG_SECONDS,
            external_nmi: ExternalNmi::Dump,
            stray_write: false,
            nmi_button: false,
        }
    }
}

impl CrashKnobs {
    /// Whether the command line asks for any crash (the crash hypercall
    /// only where guests run: see [`Expectations::crash_rules`]).
    pub fn any(&self) -> bool {
        self.injected.is_some()
            || self.hypercall_vcpu.is_some()
            || self.stray_write
            || self.lockup_expected()
            || self.button_crashes()
    }

    /// Whether the lockup detector must find a hung CPU: `hang=` with the
    /// detector on.
    pub fn lockup_expected(&self) -> bool {
        self.hang.is_some() && self.watchdog_seconds > 0
    }

    /// Whether the NMI button starts the crash path (`nmi=dump`, the
    /// default).
    pub fn button_crashes(&self) -> bool {
        self.nmi_button && self.external_nmi == ExternalNmi::Dump
    }

    /// Whether nothing will end a `hang=`: the detector is off and no NMI
    /// button is pressed (the run can only time out).
    pub fn hang_unnoticed(&self) -> bool {
        self.hang.is_some() && self.watchdog_seconds == 0 && !self.button_crashes()
    }

    /// Whether an injected crash fires while guests run (given guests run
    /// at all): a point of the loaded-context protocol, or a time-based
    /// crash (due during the guest run, or after it: then hv keeps the
    /// guests running until it comes). Then contexts are loaded when it
    /// happens.
    pub fn injected_during_guest_run(&self) -> bool {
        self.injected.is_some_and(|spec| match spec.point {
            None => true,
            Some(point) => point.needs_vmx(),
        })
    }
}

impl Expectations {
    /// A plain run: all `cpus` CPUs online, nothing failed, no guest
    /// stopped, any backend.
    pub fn all_cpus(cpus: u32) -> Self {
        Self {
            cpus,
            max_cpus: None,
            failed: Vec::new(),
            virt: None,
            stopped_vcpus: Vec::new(),
            crash: CrashKnobs::default(),
            apic_mode: None,
        }
    }

    /// A run on `cpus` CPUs with hv command-line `words`: what their test
    /// knobs must cause. Words hv would reject change nothing here (hv
    /// reports them in `cmdline.errors` and boots with its defaults).
    pub fn from_cmdline<S: AsRef<str>>(cpus: u32, words: &[S]) -> Self {
        let mut expect = Self::all_cpus(cpus);
        let mut hypercall_allowed = false;
        let mut calling_vcpu = None;
        for word in words {
            let Some((key, value)) = word.as_ref().split_once('=') else {
                continue;
            };
            let wide = parse_number(value);
            let number = wide.and_then(|n| u32::try_from(n).ok());
            match (key, number) {
                ("max_cpus", Some(n)) if n >= 1 => expect.max_cpus = Some(n),
                ("ap_hang", Some(id)) => expect.failed = vec![id],
                ("guest_misbehave", Some(vcpu)) if vcpu <= 1023 => {
                    expect.stopped_vcpus = vec![vcpu];
                }
                ("crash", _) => {
                    if let Ok(spec) = CrashSpec::parse(value) {
                        expect.crash.injected = Some(spec);
                    }
                }
                ("guest_crash_call", Some(vcpu)) if vcpu <= 1023 => calling_vcpu = Some(vcpu),
                ("crash_hypercall", _) => match value {
                    "allow" => hypercall_allowed = true,
                    "deny" => hypercall_allowed = false,
                    _ => {}
                },
                ("crash_timeout_ms", _) => {
                    if let Some(ms) = wide.filter(|ms| *ms <= crash::MAX_TIMEOUT_MS) {
                        expect.crash.timeout_ms = ms;
                    }
                }
                ("guest_run_ms", _) => {
                    if let Some(ms) = wide.filter(|ms| *ms <= 3_600_000) {
                        expect.crash.guest_run_ms = ms;
                    }
                }
                ("hang", _) => {
                    if let Ok(spec) = HangSpec::parse(value) {
                        expect.crash.hang = Some(spec);
                    }
                }
                ("watchdog", _) => {
                    if let Some(seconds) = wide.filter(|s| *s <= MAX_WATCHDOG_SECONDS) {
                        expect.crash.watchdog_seconds = seconds;
                    }
                }
                ("nmi", _) => {
                    if let Ok(policy) = ExternalNmi::parse(value) {
                        expect.crash.external_nmi = policy;
                    }
                }
                ("stray_write", _) if value == "reservation" => expect.crash.stray_write = true,
                _ => {}
            }
        }
        if hypercall_allowed {
            expect.crash.hypercall_vcpu = calling_vcpu;
        }
        expect
    }

    /// The same expectations with a required backend.
    pub fn with_virt(mut self, backend: Backend) -> Self {
        self.virt = Some(backend);
        self
    }

    /// The same expectations with a required local APIC mode.
    pub fn with_apic_mode(mut self, mode: &'static str) -> Self {
        self.apic_mode = Some(mode);
        self
    }

    /// The same expectations for a run whose NMI button is pressed.
    pub fn with_nmi_button(mut self, pressed: bool) -> Self {
        self.crash.nmi_button = pressed;
        self
    }

    /// How many CPUs hv must try to start: all of them, or `max_cpus`.
    pub fn attempted(&self) -> u32 {
        self.max_cpus
            .map_or(self.cpus, |max| max.clamp(1, self.cpus))
    }

    /// How many CPUs must end up online.
    pub fn online(&self) -> u32 {
        let failed = u32::try_from(self.failed.len()).unwrap_or(u32::MAX);
        self.attempted().saturating_sub(failed)
    }

    /// Whether guests run, as far as the platform tells before the run
    /// (Bochs, nested KVM: VMX; QEMU TCG `-cpu max`: SVM); `None` when
    /// only hv's report can tell.
    pub fn guests_known(&self) -> Option<bool> {
        self.virt.map(Backend::runs_guests)
    }

    /// The crash hv must go through, given the backend it reported
    /// (`virt.backend`, when the platform did not decide it): the injected
    /// crash, or the crash hypercall where guests run. `None`: the run must
    /// end with `done`.
    pub fn crash_rules(&self, reported_backend: Option<&str>) -> Option<CrashRules> {
        let backend = self
            .virt
            .or_else(|| reported_backend.and_then(Backend::parse));
        let guests = backend.is_some_and(Backend::runs_guests);
        let hypercall_vcpu = self.crash.hypercall_vcpu.filter(|_| guests);
        let knobs = &self.crash;
        if knobs.injected.is_none()
            && hypercall_vcpu.is_none()
            && !knobs.stray_write
            && !knobs.lockup_expected()
            && !knobs.button_crashes()
        {
            return None;
        }
        Some(CrashRules {
            injected: knobs.injected,
            hypercall_vcpu,
            cpus: self.attempted(),
            online: self.online(),
            timeout_ms: knobs.timeout_ms,
            backend,
            // Contexts are loaded when the crash comes during the guest
            // run, on a platform known to run guests.
            contexts_loaded: self.guests_known() == Some(true)
                && (hypercall_vcpu.is_some() || knobs.injected_during_guest_run()),
            hung: knobs
                .hang
                .map(|hang| hung_cpus(&hang, self.attempted()))
                .unwrap_or_default(),
            lockup_after_ms: knobs
                .lockup_expected()
                .then(|| knobs.watchdog_seconds.saturating_mul(1000)),
            external_nmi: knobs.button_crashes(),
            stray_write: knobs.stray_write,
            hang: knobs.hang,
        })
    }

    /// The expectations as they go into the run report (`xtask.expected`).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.section()).unwrap_or(Value::Null)
    }

    /// The expectations as the run report's `xtask.expected` section.
    pub fn section(&self) -> ExpectedSection {
        let crash = self.crash.any().then(|| {
            let injected = self.crash.injected;
            let loaded = self.guests_known() == Some(true)
                && (self.crash.hypercall_vcpu.is_some() || self.crash.injected_during_guest_run());
            let knobs = &self.crash;
            ExpectedCrash {
                spec: injected.map(|spec| spec.to_string()),
                panickers: injected.map(|spec| spec.panickers(self.attempted())),
                stragglers: injected.map(|spec| spec.stragglers()).unwrap_or_default(),
                hypercall_vcpu: knobs.hypercall_vcpu,
                timeout_ms: knobs.timeout_ms,
                vmcs_loaded: loaded && self.virt == Some(Backend::Vmx),
                vmcb_loaded: loaded && self.virt == Some(Backend::Svm),
                hang: knobs.hang.map(|hang| hang.to_string()),
                hung_cpus: knobs.hang.map(|hang| hung_cpus(&hang, self.attempted())),
                watchdog_seconds: (knobs.hang.is_some()
                    || knobs.watchdog_seconds != WATCHDOG_SECONDS)
                    .then_some(knobs.watchdog_seconds),
                nmi_button: knobs.nmi_button.then_some(true),
                external_nmi: knobs.nmi_button.then(|| knobs.button_crashes()),
                stray_write: knobs.stray_write.then_some(true),
            }
        });
        ExpectedSection {
            cpus_possible: self.cpus,
            cpus_attempted: self.attempted(),
            cpus_online: self.online(),
            cpus_failed: self.failed.clone(),
            virt_backend: self.virt.map(Backend::as_str),
            guests_stopped: self.stopped_vcpus.clone(),
            apic_mode: self.apic_mode,
            crash,
        }
    }
}

/// `xtask.expected` in the run report: what the verdict held the report to
/// (`xtask/REPORT.md`, "What a run expects").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpectedSection {
    pub cpus_possible: u32,
    pub cpus_attempted: u32,
    pub cpus_online: u32,
    pub cpus_failed: Vec<u32>,
    pub virt_backend: Option<&'static str>,
    pub guests_stopped: Vec<u32>,
    /// Only on a run that must be in x2APIC mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apic_mode: Option<&'static str>,
    /// Only on a crash run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash: Option<ExpectedCrash>,
}

/// `xtask.expected.crash`: the crash a crash run must show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpectedCrash {
    pub spec: Option<String>,
    pub panickers: Option<Vec<u32>>,
    pub stragglers: Vec<u32>,
    pub hypercall_vcpu: Option<u32>,
    pub timeout_ms: u64,
    pub vmcs_loaded: bool,
    pub vmcb_loaded: bool,
    /// Only with `hang=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hang: Option<String>,
    /// Only with `hang=`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hung_cpus: Option<Vec<u32>>,
    /// Only with `hang=` or a `watchdog=` other than the default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watchdog_seconds: Option<u64>,
    /// Only with the NMI button (then always true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nmi_button: Option<bool>,
    /// Only with the NMI button.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_nmi: Option<bool>,
    /// Only with `stray_write=reservation` (then always true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stray_write: Option<bool>,
}

/// The CPU indexes `hang=` hangs on a machine of `cpus` CPUs: the target,
/// and with `how:lock` the next one, which waits for its lock (none when
/// the target does not exist: hv then hangs nothing).
pub fn hung_cpus(hang: &HangSpec, cpus: u32) -> Vec<u32> {
    if hang.cpu >= cpus {
        return Vec::new();
    }
    match hang.how {
        HangHow::Spin => vec![hang.cpu],
        HangHow::Lock => {
            let waiter = (hang.cpu + 1) % cpus;
            if waiter == hang.cpu {
                vec![hang.cpu]
            } else {
                vec![hang.cpu, waiter]
            }
        }
    }
}

/// What a crash run's `crash` report must show (see
/// [`Expectations::crash_rules`] and `report::crash`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashRules {
    /// The injected crash, if any.
    pub injected: Option<CrashSpec>,
    /// The vCPU making the crash hypercall, if it can.
    pub hypercall_vcpu: Option<u32>,
    /// CPUs hv started (the size of its per-CPU arrays).
    pub cpus: u32,
    /// CPUs that come online.
    pub online: u32,
    /// `crash_timeout_ms`.
    pub timeout_ms: u64,
    /// The backend, as the platform decided or hv reported it.
    pub backend: Option<Backend>,
    /// Whether the loaded contexts (`vmcs_loaded`, or `vmcb_loaded` on
    /// SVM) must be above 0: guests were running.
    pub contexts_loaded: bool,
    /// `hang=`, if given.
    pub hang: Option<HangSpec>,
    /// The CPU indexes `hang=` hangs (see [`hung_cpus`]).
    pub hung: Vec<u32>,
    /// The lockup detector's threshold (ms), when it is on and a CPU
    /// hangs: a `lockup: ...` reason may end the run.
    pub lockup_after_ms: Option<u64>,
    /// The NMI button starts the crash path: an `external NMI` reason may
    /// end the run.
    pub external_nmi: bool,
    /// `stray_write=reservation`: a page fault on the boot CPU may end
    /// the run.
    pub stray_write: bool,
}

impl CrashRules {
    /// The knob words, for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(spec) = self.injected {
            parts.push(spec.word());
        }
        if let Some(vcpu) = self.hypercall_vcpu {
            parts.push(format!("crash_hypercall=allow guest_crash_call={vcpu}"));
        }
        if let Some(hang) = self.hang {
            parts.push(format!("hang={hang}"));
        }
        if let Some(ms) = self.lockup_after_ms {
            parts.push(format!("watchdog={}", ms / 1000));
        }
        if self.stray_write {
            parts.push("stray_write=reservation".to_owned());
        }
        if self.external_nmi {
            parts.push("the NMI button".to_owned());
        }
        parts.join(" ")
    }

    /// Whether `done` may come before the crash: the NMI button pressed on
    /// an idle hv (no `hang=`), which reported `done` and stayed up.
    pub fn done_before_crash(&self) -> bool {
        self.external_nmi && self.hang.is_none() && self.injected.is_none()
    }

    /// Whether the injected crash comes before the backend is enabled
    /// anywhere (`before_vmx`, `bringup`): then no context can be loaded.
    pub fn before_vmx(&self) -> bool {
        self.hypercall_vcpu.is_none()
            && self
                .injected
                .is_some_and(|spec| matches!(spec.point, Some(Point::BeforeVmx | Point::Bringup)))
    }

    /// Whether the injected crash comes during AP bring-up, when not every
    /// CPU is online yet.
    pub fn during_bringup(&self) -> bool {
        self.injected
            .is_some_and(|spec| spec.point == Some(Point::Bringup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_plain_command_line_expects_every_cpu() {
        let expect = Expectations::from_cmdline(64, &["log=debug", "slice_us=500"]);
        assert_eq!(expect, Expectations::all_cpus(64));
        assert_eq!((expect.attempted(), expect.online()), (64, 64));
    }

    #[test]
    fn ap_hang_expects_that_apic_id_failed_and_the_rest_online() {
        let expect = Expectations::from_cmdline(8, &["ap_hang=5", "ap_timeout_ms=300"]);
        assert_eq!(expect.failed, [5]);
        assert_eq!((expect.attempted(), expect.online()), (8, 7));
    }

    #[test]
    fn max_cpus_limits_attempted_and_online() {
        let expect = Expectations::from_cmdline(8, &["max_cpus=3"]);
        assert_eq!(
            (expect.cpus, expect.attempted(), expect.online()),
            (8, 3, 3)
        );
        let more = Expectations::from_cmdline(8, &["max_cpus=100"]);
        assert_eq!((more.attempted(), more.online()), (8, 8));
    }

    #[test]
    fn hex_values_and_the_last_word_count_like_in_hv() {
        let expect = Expectations::from_cmdline(16, &["ap_hang=3", "ap_hang=0xa"]);
        assert_eq!(expect.failed, [10]);
        let expect = Expectations::from_cmdline(16, &["guest_misbehave=0x3"]);
        assert_eq!(expect.stopped_vcpus, [3]);
    }

    #[test]
    fn words_hv_rejects_change_nothing() {
        for word in [
            "max_cpus=0",
            "max_cpus=x",
            "ap_hang=-1",
            "ap_hang=",
            "guest_misbehave=5000",
        ] {
            assert_eq!(
                Expectations::from_cmdline(4, &[word]),
                Expectations::all_cpus(4),
                "{word}"
            );
        }
    }

    #[test]
    fn the_report_shows_what_was_expected() {
        let expect = Expectations::from_cmdline(8, &["ap_hang=5", "guest_misbehave=3"])
            .with_virt(Backend::Vmx);
        assert_eq!(
            expect.to_json(),
            json!({
                "cpus_possible": 8, "cpus_attempted": 8, "cpus_online": 7,
                "cpus_failed": [5], "virt_backend": "vmx", "guests_stopped": [3],
            })
        );
    }

    #[test]
    fn crash_words_ask_for_a_crash_with_its_settings() {
        let expect = Expectations::from_cmdline(
            8,
            &[
                "crash=cpu:3,after_ms:20,point:list_add0",
                "crash_timeout_ms=0x1f4",
            ],
        );
        assert_eq!(
            expect.crash,
            CrashKnobs {
                injected: Some(CrashSpec {
                    cpu: 3,
                    after_ms: 20,
                    point: Some(Point::ListAdd(0)),
                }),
                hypercall_vcpu: None,
                timeout_ms: 500,
                guest_run_ms: 100,
                ..CrashKnobs::default()
            }
        );
        // The other expectations stay: the crash report judges the CPUs.
        assert_eq!((expect.attempted(), expect.online()), (8, 8));
        let rules = expect.crash_rules(None).unwrap();
        assert_eq!((rules.cpus, rules.online, rules.timeout_ms), (8, 8, 500));
        assert!(!rules.contexts_loaded, "no platform known to run guests");
        let bochs = expect
            .clone()
            .with_virt(Backend::Vmx)
            .crash_rules(None)
            .unwrap();
        assert!(bochs.contexts_loaded);
        let tcg = expect
            .clone()
            .with_virt(Backend::Svm)
            .crash_rules(None)
            .unwrap();
        assert!(tcg.contexts_loaded);
        assert_eq!(tcg.backend, Some(Backend::Svm));
        assert_eq!(bochs.describe(), "crash=cpu:3,after_ms:20,point:list_add0");
    }

    #[test]
    fn bad_crash_words_change_nothing_and_the_last_good_one_wins() {
        for word in [
            "crash=cpu:x",
            "crash=point:bringup",
            "crash_timeout_ms=600001",
            "crash_hypercall=yes",
            "guest_crash_call=1024",
        ] {
            let expect = Expectations::from_cmdline(4, &[word]);
            assert_eq!(expect, Expectations::all_cpus(4), "{word}");
            assert!(expect.crash_rules(Some("vmx")).is_none(), "{word}");
        }
        let expect = Expectations::from_cmdline(
            4,
            &["crash=cpu:1,after_ms:5", "crash=cpu:x", "crash=cpu:2"],
        );
        assert_eq!(expect.crash.injected.map(|spec| spec.cpu), Some(2));
    }

    #[test]
    fn the_hypercall_needs_both_words_and_guests() {
        let words = ["guest_crash_call=5", "crash_hypercall=allow"];
        let expect = Expectations::from_cmdline(8, &words);
        assert_eq!(expect.crash.hypercall_vcpu, Some(5));
        assert!(expect.crash_rules(Some("none")).is_none());
        assert!(expect.crash_rules(None).is_none());
        let rules = expect.crash_rules(Some("vmx")).unwrap();
        assert_eq!(rules.hypercall_vcpu, Some(5));
        assert_eq!(rules.describe(), "crash_hypercall=allow guest_crash_call=5");
        let denied = Expectations::from_cmdline(
            8,
            &[
                "guest_crash_call=5",
                "crash_hypercall=allow",
                "crash_hypercall=deny",
            ],
        );
        assert_eq!(denied.crash.hypercall_vcpu, None);
        assert_eq!(
            expect.crash_rules(Some("svm")).unwrap().hypercall_vcpu,
            Some(5)
        );
        let bochs = expect.with_virt(Backend::Vmx);
        assert!(
            bochs
                .crash_rules(Some("none"))
                .is_some_and(|rules| rules.contexts_loaded)
        );
    }

    #[test]
    fn a_time_based_crash_lands_while_guests_run_before_or_after_the_boot_report() {
        let during = |words: &[&str]| {
            Expectations::from_cmdline(8, words)
                .crash
                .injected_during_guest_run()
        };
        assert!(during(&["crash=cpu:1,after_ms:99"]));
        // After the boot run the guests keep running until the crash.
        assert!(during(&["crash=cpu:1,after_ms:100"]));
        assert!(during(&["crash=cpu:1,after_ms:150", "guest_run_ms=200"]));
        assert!(during(&["crash=cpu:1,after_ms:500,point:vcpu_load"]));
        assert!(!during(&["crash=cpu:1,after_ms:5,point:nmi_blocked"]));
        assert!(!during(&["crash=cpu:1,point:before_vmx"]));
        assert!(!during(&[]));
    }

    #[test]
    fn the_report_shows_the_crash_expected() {
        let expect = Expectations::from_cmdline(8, &["crash=cpu:0,after_ms:3,point:nmi_blocked"])
            .with_virt(Backend::Vmx);
        assert_eq!(
            expect.to_json()["crash"],
            json!({
                "spec": "cpu:0,after_ms:3,point:nmi_blocked", "panickers": [1],
                "stragglers": [0], "hypercall_vcpu": null, "timeout_ms": 1000,
                "vmcs_loaded": false, "vmcb_loaded": false,
            })
        );
        let tcg = Expectations::from_cmdline(8, &["crash=cpu:1,after_ms:200"])
            .with_virt(Backend::Svm)
            .to_json();
        assert_eq!(
            (&tcg["crash"]["vmcs_loaded"], &tcg["crash"]["vmcb_loaded"]),
            (&json!(false), &json!(true))
        );
        assert!(Expectations::all_cpus(2).to_json().get("crash").is_none());
    }

    #[test]
    fn a_hang_expects_the_lockup_detector_unless_it_is_off() {
        let expect = Expectations::from_cmdline(8, &["hang=cpu:3,after_ms:100,how:lock"]);
        assert!(expect.crash.lockup_expected());
        let rules = expect.crash_rules(None).unwrap();
        assert_eq!(rules.hung, [3, 4]);
        assert_eq!(rules.lockup_after_ms, Some(10_000), "the default watchdog");
        assert!(!rules.external_nmi && !rules.stray_write);
        assert_eq!(
            rules.describe(),
            "hang=cpu:3,after_ms:100,how:lock watchdog=10"
        );
        let spin = Expectations::from_cmdline(8, &["hang=cpu:7", "watchdog=0x2"]);
        let rules = spin.crash_rules(None).unwrap();
        assert_eq!(
            (rules.hung.as_slice(), rules.lockup_after_ms),
            (&[7][..], Some(2000))
        );
        // The last CPU's lock waiter is CPU 0.
        let last = Expectations::from_cmdline(8, &["hang=cpu:7,how:lock"]);
        assert_eq!(last.crash_rules(None).unwrap().hung, [7, 0]);
        // Off, and no button: nothing ends the hang.
        let off = Expectations::from_cmdline(8, &["hang=cpu:3", "watchdog=0"]);
        assert!(off.crash.hang_unnoticed());
        assert!(off.crash_rules(None).is_none());
        // The button notices it.
        let button = off.clone().with_nmi_button(true);
        assert!(!button.crash.hang_unnoticed());
        let rules = button.crash_rules(None).unwrap();
        assert!(rules.external_nmi && rules.lockup_after_ms.is_none());
        assert!(!rules.done_before_crash(), "a hang never says done");
        // A CPU that does not exist hangs nothing.
        let missing = Expectations::from_cmdline(8, &["hang=cpu:8"]);
        assert!(missing.crash_rules(None).unwrap().hung.is_empty());
    }

    #[test]
    fn the_nmi_button_crashes_only_with_nmi_dump() {
        let idle = Expectations::all_cpus(8).with_nmi_button(true);
        let rules = idle.crash_rules(None).unwrap();
        assert!(rules.external_nmi && rules.done_before_crash());
        assert_eq!(rules.describe(), "the NMI button");
        for policy in ["nmi=log", "nmi=ignore"] {
            let expect = Expectations::from_cmdline(8, &[policy]).with_nmi_button(true);
            assert!(expect.crash_rules(None).is_none(), "{policy}");
        }
        let bad = Expectations::from_cmdline(8, &["nmi=loud"]).with_nmi_button(true);
        assert!(
            bad.crash_rules(None).is_some(),
            "hv keeps its default, dump"
        );
        assert_eq!(
            idle.to_json()["crash"]["nmi_button"],
            json!(true),
            "{}",
            idle.to_json()
        );
    }

    #[test]
    fn a_stray_write_expects_its_fault() {
        let expect = Expectations::from_cmdline(4, &["stray_write=reservation"]);
        let rules = expect.crash_rules(None).unwrap();
        assert!(rules.stray_write);
        assert_eq!(rules.describe(), "stray_write=reservation");
        assert!(
            Expectations::from_cmdline(4, &["stray_write=kernel"])
                .crash_rules(None)
                .is_none()
        );
    }
}
