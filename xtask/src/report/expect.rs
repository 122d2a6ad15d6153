//! What a run expects hv to report, derived from how it was started.
//!
//! By default a run expects every CPU it gave the emulator to be found and
//! brought online. hv's test knobs change that on purpose, and the command
//! line says so: `max_cpus=N` brings up only N CPUs, `ap_hang=ID` makes that
//! AP fail, `guest_misbehave=N` gets vCPU N stopped. xtask reads those words
//! (with hv's number syntax: decimal or `0x` hex, the last word wins) so a
//! run with a knob is judged against what the knob must cause, not against
//! a full boot.

use serde_json::{Value, json};

/// The virtualisation backend hv reports in `virt.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// VMX root operation with guests.
    Vmx,
    /// No virtualisation (no VMX on the CPU).
    None,
}

impl Backend {
    /// The value of `virt.backend`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Vmx => "vmx",
            Backend::None => "none",
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
    /// CPU model has VMX); `None` accepts either.
    pub virt: Option<Backend>,
    /// vCPUs that must be stopped for an EPT violation when guests run
    /// (`guest_misbehave=`); no other guest may be stopped.
    pub stopped_vcpus: Vec<u32>,
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
        }
    }

    /// A run on `cpus` CPUs with hv command-line `words`: what their test
    /// knobs must cause. Words hv would reject change nothing here (hv
    /// reports them in `cmdline.errors` and boots with its defaults).
    pub fn from_cmdline<S: AsRef<str>>(cpus: u32, words: &[S]) -> Self {
        let mut expect = Self::all_cpus(cpus);
        for word in words {
            let Some((key, value)) = word.as_ref().split_once('=') else {
                continue;
            };
            let number = parse_number(value).and_then(|n| u32::try_from(n).ok());
            match (key, number) {
                ("max_cpus", Some(n)) if n >= 1 => expect.max_cpus = Some(n),
                ("ap_hang", Some(id)) => expect.failed = vec![id],
                ("guest_misbehave", Some(vcpu)) if vcpu <= 1023 => {
                    expect.stopped_vcpus = vec![vcpu];
                }
                _ => {}
            }
        }
        expect
    }

    /// The same expectations with a required backend.
    pub fn with_virt(mut self, backend: Backend) -> Self {
        self.virt = Some(backend);
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

    /// The expectations as they go into the run report (`xtask.expected`).
    pub fn to_json(&self) -> Value {
        json!({
            "cpus_possible": self.cpus,
            "cpus_attempted": self.attempted(),
            "cpus_online": self.online(),
            "cpus_failed": self.failed,
            "virt_backend": self.virt.map(Backend::as_str),
            "guests_stopped": self.stopped_vcpus,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
