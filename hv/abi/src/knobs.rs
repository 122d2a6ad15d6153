//! Test knobs that both the hypervisor and the harness (xtask) must read
//! the same way: the crash injection `crash=cpu:N,after_ms:T[,point:NAME]`.

use core::fmt;

/// Where a test crash is injected (`crash=...,point:NAME`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    /// Between two stores of a loaded-VMCS list insertion (store 0, 1, ...).
    ListAdd(u8),
    /// Between two stores of a loaded-VMCS list removal (store 0, 1, ...).
    ListRemove(u8),
    /// After VMCLEAR, before the entry is unlinked.
    VmclearUnlink,
    /// Inside the vCPU load path (between VMPTRLD and the list insertion).
    VcpuLoad,
    /// The crashing CPU's victim spins with NMIs blocked (a straggler).
    NmiBlocked,
    /// Two CPUs panic at the same moment.
    DoublePanic,
    /// Before VMX is enabled anywhere.
    BeforeVmx,
    /// During AP bring-up.
    Bringup,
    /// A stray NMI reaches the coordinator at a step of its own work
    /// (another CPU sends it).
    CoordinatorNmi(CoordinatorStep),
    /// The coordinator panics inside the hand-over (once; the second
    /// attempt must capture).
    HandoverPanic,
    /// An NMI reaches every CPU while the crash is under way, as the NMI
    /// button does.
    ExternalNmi,
}

/// A step of the coordinator's own work, where `CoordinatorNmi` strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoordinatorStep {
    /// Right after its own cleanup (its VMCLEARs and VMXOFF).
    AfterCleanup,
    /// While it writes the ELF core header.
    CoreHeader,
    /// While it checks the digests.
    DigestCheck,
    /// In the purgatory, after the jump.
    Purgatory,
    /// From the purgatory's entry through the capture image's own early
    /// boot: a storm of NMIs, one every 30 µs for 200 ms, so that some
    /// land in every window of the way in.
    Storm,
}

impl CoordinatorStep {
    /// Every step.
    pub const ALL: [CoordinatorStep; 5] = [
        Self::AfterCleanup,
        Self::CoreHeader,
        Self::DigestCheck,
        Self::Purgatory,
        Self::Storm,
    ];

    /// The point name's suffix.
    pub const fn name(self) -> &'static str {
        match self {
            Self::AfterCleanup => "after_cleanup",
            Self::CoreHeader => "in_header",
            Self::DigestCheck => "in_digest",
            Self::Purgatory => "in_purgatory",
            Self::Storm => "storm",
        }
    }
}

/// The injection point names `crash=...,point:NAME` accepts (`N` a store
/// number from 0 to 7).
pub const CRASH_POINT_NAMES: &str = "list_addN, list_removeN, vmclear_unlink, vcpu_load, nmi_blocked, double_panic, before_vmx, bringup, nmi_after_cleanup, nmi_in_header, nmi_in_digest, nmi_in_purgatory, nmi_storm, handover_panic, external_nmi";

/// The message for an unknown point name.
const UNKNOWN_POINT: &str = "point: unknown injection point (known: list_add0..list_add4, list_remove0..list_remove2, vmclear_unlink, vcpu_load, nmi_blocked, double_panic, before_vmx, bringup, nmi_after_cleanup, nmi_in_header, nmi_in_digest, nmi_in_purgatory, nmi_storm, handover_panic, external_nmi)";

/// The form of the `crash=` value.
const CRASH_FORM: &str = "expected cpu:N,after_ms:T[,point:NAME]";

/// Stores of a loaded-VMCS list insertion: `list_add0` .. `list_add4`.
pub const LIST_ADD_STORES: u8 = 5;
/// Stores of a loaded-VMCS list removal: `list_remove0` .. `list_remove2`.
pub const LIST_REMOVE_STORES: u8 = 3;

/// The longest `after_ms` accepted: an hour.
pub const MAX_AFTER_MS: u64 = 3_600_000;

impl CrashPoint {
    /// Every point that can fire: the stores the list protocol really
    /// makes, then the others.
    pub const ALL: [CrashPoint; 21] = [
        Self::ListAdd(0),
        Self::ListAdd(1),
        Self::ListAdd(2),
        Self::ListAdd(3),
        Self::ListAdd(4),
        Self::ListRemove(0),
        Self::ListRemove(1),
        Self::ListRemove(2),
        Self::VmclearUnlink,
        Self::VcpuLoad,
        Self::NmiBlocked,
        Self::DoublePanic,
        Self::BeforeVmx,
        Self::Bringup,
        Self::CoordinatorNmi(CoordinatorStep::AfterCleanup),
        Self::CoordinatorNmi(CoordinatorStep::CoreHeader),
        Self::CoordinatorNmi(CoordinatorStep::DigestCheck),
        Self::CoordinatorNmi(CoordinatorStep::Purgatory),
        Self::CoordinatorNmi(CoordinatorStep::Storm),
        Self::HandoverPanic,
        Self::ExternalNmi,
    ];

    /// Whether the point disturbs a crash already under way (the crash
    /// itself comes from `cpu:N,after_ms:T`), rather than causing one.
    pub const fn disturbs_the_crash(self) -> bool {
        matches!(
            self,
            Self::CoordinatorNmi(_) | Self::HandoverPanic | Self::ExternalNmi
        )
    }

    /// Whether the point sits in the loaded-VMCS protocol, which only runs
    /// while VMX guests run: without VMX it never fires.
    pub const fn needs_vmx(self) -> bool {
        matches!(
            self,
            Self::ListAdd(_) | Self::ListRemove(_) | Self::VmclearUnlink | Self::VcpuLoad
        )
    }

    /// Whether the hypervisor ignores `after_ms` for this point.
    pub const fn ignores_after_ms(self) -> bool {
        matches!(self, Self::BeforeVmx | Self::Bringup)
    }

    /// Parses `list_addN`-style names (see [`CRASH_POINT_NAMES`]).
    pub fn parse(text: &str) -> Option<Self> {
        // Digits only: `u8::from_str` would also take a leading `+`.
        let store = |rest: &str| {
            (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
                .then(|| rest.parse::<u8>().ok())
                .flatten()
                .filter(|n| *n < 8)
        };
        if let Some(rest) = text.strip_prefix("list_add") {
            return store(rest).map(Self::ListAdd);
        }
        if let Some(rest) = text.strip_prefix("list_remove") {
            return store(rest).map(Self::ListRemove);
        }
        Some(match text {
            "vmclear_unlink" => Self::VmclearUnlink,
            "vcpu_load" => Self::VcpuLoad,
            "nmi_blocked" => Self::NmiBlocked,
            "double_panic" => Self::DoublePanic,
            "before_vmx" => Self::BeforeVmx,
            "bringup" => Self::Bringup,
            "handover_panic" => Self::HandoverPanic,
            "external_nmi" => Self::ExternalNmi,
            _ => {
                let step = text.strip_prefix("nmi_")?;
                return CoordinatorStep::ALL
                    .into_iter()
                    .find(|candidate| candidate.name() == step)
                    .map(Self::CoordinatorNmi);
            }
        })
    }
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ListAdd(n) => write!(f, "list_add{n}"),
            Self::ListRemove(n) => write!(f, "list_remove{n}"),
            Self::VmclearUnlink => f.write_str("vmclear_unlink"),
            Self::VcpuLoad => f.write_str("vcpu_load"),
            Self::NmiBlocked => f.write_str("nmi_blocked"),
            Self::DoublePanic => f.write_str("double_panic"),
            Self::BeforeVmx => f.write_str("before_vmx"),
            Self::Bringup => f.write_str("bringup"),
            Self::CoordinatorNmi(step) => write!(f, "nmi_{}", step.name()),
            Self::HandoverPanic => f.write_str("handover_panic"),
            Self::ExternalNmi => f.write_str("external_nmi"),
        }
    }
}

/// `crash=cpu:N,after_ms:T[,point:NAME]` (test knob): CPU N (its index;
/// 0 is the boot CPU) panics T ms after the guests start, or at the point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CrashSpec {
    /// CPU index that panics.
    pub cpu: u32,
    /// Milliseconds after the guest run starts (or after the point is armed).
    pub after_ms: u64,
    /// Where, if not at once after `after_ms`.
    pub point: Option<CrashPoint>,
}

/// The `cpu:` item of `crash=` and `hang=`.
fn parse_cpu(item: &str) -> Result<u32, &'static str> {
    u32::try_from(parse_number(item).ok_or("cpu: expected a CPU index")?)
        .map_err(|_| "cpu: too large")
}

/// The `after_ms:` item of `crash=` and `hang=`.
fn parse_after_ms(item: &str) -> Result<u64, &'static str> {
    parse_number(item)
        .filter(|ms| *ms <= MAX_AFTER_MS)
        .ok_or("after_ms: expected milliseconds")
}

impl CrashSpec {
    /// Parses the value of `crash=`; the error says what was wrong.
    pub fn parse(value: &str) -> Result<Self, &'static str> {
        let mut cpu = None;
        let mut after_ms = 0;
        let mut point = None;
        for part in value.split(',') {
            let (key, item) = part.split_once(':').ok_or(CRASH_FORM)?;
            match key {
                "cpu" => cpu = Some(parse_cpu(item)?),
                "after_ms" => after_ms = parse_after_ms(item)?,
                "point" => point = Some(CrashPoint::parse(item).ok_or(UNKNOWN_POINT)?),
                _ => return Err(CRASH_FORM),
            }
        }
        let cpu = cpu.ok_or("cpu:N is required")?;
        Ok(Self {
            cpu,
            after_ms,
            point,
        })
    }
}

impl fmt::Display for CrashSpec {
    /// The value of `crash=`, as [`CrashSpec::parse`] reads it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu:{},after_ms:{}", self.cpu, self.after_ms)?;
        if let Some(point) = self.point {
            write!(f, ",point:{point}")?;
        }
        Ok(())
    }
}

/// How a CPU hangs (`hang=...,how:`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HangHow {
    /// Spins with interrupts off.
    Spin,
    /// Holds a lock with interrupts off while the next CPU waits for it,
    /// also with interrupts off: two CPUs hang.
    Lock,
}

/// `hang=cpu:N,after_ms:T[,how:spin|lock]` (test knob): CPU N hangs T ms
/// after the boot report, for the lockup detector or the NMI button to
/// find.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HangSpec {
    /// CPU index that hangs.
    pub cpu: u32,
    /// Milliseconds after the boot report.
    pub after_ms: u64,
    /// How.
    pub how: HangHow,
}

const HANG_FORM: &str = "expected cpu:N,after_ms:T[,how:spin|lock]";

impl HangSpec {
    /// Parses the value of `hang=`.
    pub fn parse(value: &str) -> Result<Self, &'static str> {
        let mut cpu = None;
        let mut after_ms = 0;
        let mut how = HangHow::Spin;
        for part in value.split(',') {
            let (key, item) = part.split_once(':').ok_or(HANG_FORM)?;
            match key {
                "cpu" => cpu = Some(parse_cpu(item)?),
                "after_ms" => after_ms = parse_after_ms(item)?,
                "how" => {
                    how = match item {
                        "spin" => HangHow::Spin,
                        "lock" => HangHow::Lock,
                        _ => return Err("how: expected spin or lock"),
                    }
                }
                _ => return Err(HANG_FORM),
            }
        }
        let cpu = cpu.ok_or("cpu:N is required")?;
        Ok(Self { cpu, after_ms, how })
    }
}

impl fmt::Display for HangSpec {
    /// The value of `hang=`, as [`HangSpec::parse`] reads it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.how {
            HangHow::Spin => "spin",
            HangHow::Lock => "lock",
        };
        write!(f, "cpu:{},after_ms:{},how:{how}", self.cpu, self.after_ms)
    }
}

/// What an NMI that belongs to nobody does (`nmi=`): not the shootdown,
/// not a self-test, so an operator's NMI button or a platform's watchdog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ExternalNmi {
    /// Start the crash path: a dump of the machine as it was.
    #[default]
    Dump,
    /// Print it and go on.
    Log,
    /// Go on silently.
    Ignore,
}

impl ExternalNmi {
    /// Parses the value of `nmi=`.
    pub fn parse(value: &str) -> Result<Self, &'static str> {
        match value {
            "dump" => Ok(Self::Dump),
            "log" => Ok(Self::Log),
            "ignore" => Ok(Self::Ignore),
            _ => Err("expected one of dump, log, ignore"),
        }
    }
}

/// A decimal or `0x` hexadecimal number, without sign or spaces.
pub fn parse_number(text: &str) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    // `from_str_radix` accepts a leading `+`; a command line should not.
    if digits.is_empty() || !digits.bytes().all(|b| (b as char).is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_parse_by_name_and_store_number() {
        assert_eq!(CrashPoint::parse("list_add3"), Some(CrashPoint::ListAdd(3)));
        assert_eq!(
            CrashPoint::parse("list_remove0"),
            Some(CrashPoint::ListRemove(0))
        );
        assert_eq!(CrashPoint::parse("list_add+1"), None);
        assert_eq!(CrashPoint::parse("list_add8"), None);
        assert_eq!(CrashPoint::parse("bringup"), Some(CrashPoint::Bringup));
        assert_eq!(CrashPoint::parse("nowhere"), None);
        assert_eq!(
            CrashPoint::parse("nmi_in_digest"),
            Some(CrashPoint::CoordinatorNmi(CoordinatorStep::DigestCheck))
        );
        assert_eq!(CrashPoint::parse("nmi_nowhere"), None);
    }

    #[test]
    fn hang_specs_parse_and_print() {
        let spec = HangSpec::parse("cpu:3,after_ms:100,how:lock").unwrap();
        assert_eq!(
            spec,
            HangSpec {
                cpu: 3,
                after_ms: 100,
                how: HangHow::Lock
            }
        );
        assert_eq!(HangSpec::parse("cpu:1").unwrap().how, HangHow::Spin);
        assert!(HangSpec::parse("cpu:1,how:sleep").is_err());
        assert!(HangSpec::parse("after_ms:1").is_err());
        let mut text = [0u8; 64];
        let mut writer = crate::bytes::SliceWriter::new(&mut text);
        core::fmt::Write::write_fmt(&mut writer, format_args!("{spec}")).unwrap();
        let len = text.iter().position(|&b| b == 0).unwrap();
        let printed = core::str::from_utf8(&text[..len]).unwrap();
        assert_eq!(HangSpec::parse(printed), Ok(spec));
        assert_eq!(ExternalNmi::parse("log"), Ok(ExternalNmi::Log));
        assert!(ExternalNmi::parse("panic").is_err());
    }

    #[test]
    fn every_point_prints_as_it_parses() {
        for point in CrashPoint::ALL {
            let mut text = [0u8; 32];
            let mut writer = crate::bytes::SliceWriter::new(&mut text);
            core::fmt::Write::write_fmt(&mut writer, format_args!("{point}")).unwrap();
            let len = text.iter().position(|&b| b == 0).unwrap();
            let name = core::str::from_utf8(&text[..len]).unwrap();
            assert_eq!(CrashPoint::parse(name), Some(point), "{name}");
        }
        assert_eq!(
            CrashPoint::ALL
                .iter()
                .filter(|p| matches!(p, CrashPoint::ListAdd(_)))
                .count(),
            usize::from(LIST_ADD_STORES)
        );
        assert_eq!(
            CrashPoint::ALL
                .iter()
                .filter(|p| matches!(p, CrashPoint::ListRemove(_)))
                .count(),
            usize::from(LIST_REMOVE_STORES)
        );
    }

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        assert_eq!(
            CrashSpec::parse("cpu:2,after_ms:50,point:vcpu_load"),
            Ok(CrashSpec {
                cpu: 2,
                after_ms: 50,
                point: Some(CrashPoint::VcpuLoad)
            })
        );
        assert_eq!(CrashSpec::parse("after_ms:5"), Err("cpu:N is required"));
        assert_eq!(CrashSpec::parse("cpu:1,point:x"), Err(UNKNOWN_POINT));
        assert!(CrashSpec::parse("cpu:1,after_ms:3600001").is_err());
        assert_eq!(CrashSpec::parse("cpu"), Err(CRASH_FORM));
    }
}
