//! The hypervisor command line.
//!
//! The line is a sequence of whitespace-separated `key=value` words. A bad
//! word never stops the boot: it is recorded as a [`CmdlineError`] and parsing
//! goes on with the next word, so the hypervisor boots with the defaults for
//! whatever it could not understand and reports the errors.
//!
//! Every option lives in one table, [`OPTIONS`]: adding an option means adding
//! a field to [`Options`] (with its default) and a row with a value parser.

use core::fmt;
use hv_abi::defaults;
use hv_abi::knobs::parse_number;
use log::LevelFilter;

/// How many errors [`Parsed`] keeps; the rest are only counted.
pub const MAX_ERRORS: usize = 8;

/// Size of a page: the crash-kernel reservation is made of whole pages.
const PAGE_SIZE: u64 = 4096;

/// RAM of a guest module that names none: 64 MiB.
pub const DEFAULT_GUEST_MEM: u64 = 64 << 20;
/// Largest `guest_mem=`: 3 GiB, where the 32-bit MMIO hole begins.
pub const MAX_GUEST_MEM: u64 = 3 << 30;
/// How long a guest module may run by default: 10 minutes.
pub const DEFAULT_GUEST_TIMEOUT_MS: u64 = 600_000;

/// What the hypervisor does once the boot self-report is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Finish {
    /// Stay up (halt the boot CPU and wait for interrupts).
    #[default]
    Halt,
    /// End the emulator through its debug-exit port (used by the test runs).
    Exit,
}

pub use hv_abi::knobs::{
    CRASH_POINT_NAMES, CoordinatorStep, CrashPoint, CrashSpec, ExternalNmi, HangHow, HangSpec,
};

/// Where the hv capture image writes the dump stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CaptureSink {
    /// I/O port 0xE9 (QEMU `-debugcon`).
    #[default]
    DebugPort,
    /// The primary ATA channel's slave disk, by PIO from sector 0 (Bochs).
    AtaSlave,
}

impl CaptureSink {
    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::DebugPort => "debugcon",
            Self::AtaSlave => "ata",
        }
    }
}

/// `capture_digest=`: how the loaded capture kernel is summed at boot and
/// checked before the jump (by hv and by the purgatory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CaptureDigest {
    /// XXH64: fast enough to check a whole image inside the crash path's
    /// budget; detects stray writes.
    #[default]
    Xxh64,
    /// SHA-256, as Linux's purgatory: about twenty times slower under
    /// QEMU's TCG.
    Sha256,
}

impl CaptureDigest {
    /// The command-line spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Xxh64 => "xxh64",
            Self::Sha256 => "sha256",
        }
    }
}

/// `capture_corrupt=` (test knob): what to damage after the capture kernel
/// was loaded and digested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CaptureCorrupt {
    /// Nothing (`0`).
    #[default]
    Nothing,
    /// `1` or `image`: flip a byte of the loaded capture kernel; the crash
    /// path must refuse to jump.
    Image,
    /// `table`: flip that byte and zero the hypervisor's own digest table,
    /// as a stray write would; its check must say so and refuse, and so
    /// must the purgatory's (with `capture_hv_check=off`).
    Table,
}

/// `crashkernel=SIZE[@BASE]`: memory reserved for the capture kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashKernelSpec {
    /// Bytes to reserve: non-zero and a multiple of 4 KiB.
    pub size: u64,
    /// Physical base (a multiple of 4 KiB); `None` lets the hypervisor choose.
    pub base: Option<u64>,
}

/// The options the command line can set, with their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// `log=`: the most verbose level that is printed.
    pub log: LevelFilter,
    /// `crashkernel=`: the capture-kernel reservation, if any.
    pub crashkernel: Option<CrashKernelSpec>,
    /// `finish=`: what to do after the boot self-report.
    pub finish: Finish,
    /// `max_cpus=`: at most this many CPUs are brought up (the boot CPU counts).
    pub max_cpus: Option<u32>,
    /// `init_delay_us=`: wait after the INIT IPIs (modern CPUs need none).
    pub init_delay_us: u64,
    /// `sipi_delay_us=`: wait between the two startup IPIs.
    pub sipi_delay_us: u64,
    /// `ap_timeout_ms=`: how long bring-up waits for APs to check in.
    pub ap_timeout_ms: u64,
    /// `ap_hang=APIC_ID` (test knob): that AP hangs before it checks in.
    pub ap_hang: Option<u32>,
    /// `vcpus=N`: vCPUs to run (0: two per core with VMX).
    pub vcpus: u32,
    /// `guest_run_ms=`: how long guests run at boot.
    pub guest_run_ms: u64,
    /// `slice_us=`: time slice after which a vCPU may move to another core.
    pub slice_us: u64,
    /// `guest_misbehave=N` (test knob): vCPU N touches memory outside its EPT.
    pub guest_misbehave: Option<u32>,
    /// `guest_crash_call=N` (test knob): vCPU N makes the crash hypercall.
    pub guest_crash_call: Option<u32>,
    /// `capture_mode=ADDR`: this image is the capture kernel; the crashed
    /// hypervisor's ELF core header is at physical ADDR.
    pub capture_mode: Option<u64>,
    /// `capture_sink=debugcon|ata`: where the hv capture image writes the
    /// dump stream: I/O port 0xE9, or the primary ATA channel's slave disk.
    pub capture_sink: CaptureSink,
    /// `capture_corrupt=0|1|image|table` (test knob): damage the loaded
    /// capture kernel (and with `table` the hypervisor's digest table) after
    /// the digests were taken, so the jump must be refused.
    pub capture_corrupt: CaptureCorrupt,
    /// `capture_hv_check=on|off` (test knob): `off` skips the hypervisor's
    /// own check before the jump, so that the purgatory's check, which runs
    /// from the reservation on its own copy of the digests, stands alone.
    pub capture_hv_check: bool,
    /// `capture_purgatory_nmi=0|1` (test knob): the purgatory sends its CPU
    /// an NMI at each step of its way and waits until each was taken.
    pub capture_purgatory_nmi: bool,
    /// `capture_digest=xxh64|sha256`: the capture kernel's checksum.
    pub capture_digest: CaptureDigest,
    /// `capture_words=ADDR`: the crashed hypervisor's crash words mailbox
    /// (the loader puts it on the capture image's command line; capture
    /// mode prints what it holds before anything else).
    pub capture_words: Option<u64>,
    /// `capture_facts=ADDR`: the crashed hypervisor's crash summary facts
    /// (`crash::summary`; the loader puts it on the capture image's command
    /// line; capture mode formats the summary from them when the crash
    /// path left it there).
    pub capture_facts: Option<u64>,
    /// `capture_purgatory=ADDR`: where the crashed hypervisor's purgatory
    /// area is (the loader puts it on the capture image's command line;
    /// capture mode reports the purgatory's TSC stamps from it).
    pub capture_purgatory: Option<u64>,
    /// `capture_wake=0|1`: the hv capture image wakes every CPU the crash
    /// note lists that checked in (INIT, then startup IPIs): a CPU still in
    /// VMX root operation blocks INIT and stays silent.
    pub capture_wake: bool,
    /// `wake_stragglers=0|1`: the capture wakes the crash's stragglers too
    /// (left alone by default: they may be running anything).
    pub wake_stragglers: bool,
    /// `wake_timeout_ms=`: how long the capture waits for the CPUs it wakes.
    pub wake_timeout_ms: u64,
    /// `capture_share=0|1`: the woken CPUs share the dump's work (0 keeps
    /// them idle, to compare).
    pub capture_share: bool,
    /// `crash=...` (test knob): inject a panic.
    pub crash: Option<CrashSpec>,
    /// `crash_timeout_ms=`: how long the crash rendezvous waits.
    pub crash_timeout_ms: u64,
    /// `crash_hypercall=allow|deny`: may a guest crash the hypervisor.
    pub crash_hypercall: bool,
    /// `guest_mem=SIZE`: RAM of a guest module that gives no `mem=`.
    pub guest_mem: u64,
    /// `guest_timeout_ms=`: how long a guest module that gives no
    /// `timeout_ms=` may run before hv stops it.
    pub guest_timeout_ms: u64,
    /// `nmi=dump|log|ignore`: what an NMI that belongs to nobody does.
    pub nmi: ExternalNmi,
    /// `watchdog=SECONDS`: the lockup detector's threshold (0: off).
    pub watchdog_seconds: u64,
    /// `hang=cpu:N,after_ms:T[,how:spin|lock]` (test knob): a CPU hangs.
    pub hang: Option<HangSpec>,
    /// `stray_write=reservation` (test knob): after the boot report, a
    /// write into the loaded capture kernel, which must fault at once.
    pub stray_write: bool,
}

impl Options {
    /// The defaults, usable in a `static`.
    pub const fn new() -> Self {
        Self {
            log: LevelFilter::Info,
            crashkernel: None,
            finish: Finish::Halt,
            max_cpus: None,
            init_delay_us: 0,
            sipi_delay_us: 200,
            ap_timeout_ms: 5000,
            ap_hang: None,
            vcpus: 0,
            guest_run_ms: defaults::GUEST_RUN_MS,
            slice_us: 2000,
            guest_misbehave: None,
            guest_crash_call: None,
            capture_mode: None,
            capture_sink: CaptureSink::DebugPort,
            capture_corrupt: CaptureCorrupt::Nothing,
            capture_hv_check: true,
            capture_purgatory_nmi: false,
            capture_digest: CaptureDigest::Xxh64,
            capture_words: None,
            capture_facts: None,
            capture_purgatory: None,
            capture_wake: true,
            wake_stragglers: false,
            wake_timeout_ms: defaults::WAKE_TIMEOUT_MS,
            capture_share: true,
            crash: None,
            crash_timeout_ms: defaults::CRASH_TIMEOUT_MS,
            crash_hypercall: false,
            guest_mem: DEFAULT_GUEST_MEM,
            guest_timeout_ms: DEFAULT_GUEST_TIMEOUT_MS,
            nmi: ExternalNmi::Dump,
            watchdog_seconds: defaults::WATCHDOG_SECONDS,
            hang: None,
            stray_write: false,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self::new()
    }
}

/// What was wrong with a word of the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The word has no `=` (or nothing before it).
    ExpectedKeyValue,
    /// The key names no option.
    UnknownOption,
    /// The option exists but its value is not acceptable.
    InvalidValue {
        /// The option's key.
        option: &'static str,
        /// Why, for the message: what was expected or which limit was broken.
        reason: &'static str,
    },
}

/// One rejected word. `text` is the offending part of the line: the whole word
/// for [`ErrorKind::ExpectedKeyValue`], the key for
/// [`ErrorKind::UnknownOption`], the value for [`ErrorKind::InvalidValue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmdlineError<'a> {
    /// The offending text, borrowed from the command line.
    pub text: &'a str,
    /// What was wrong with it.
    pub kind: ErrorKind,
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::ExpectedKeyValue => write!(f, "expected key=value, got '{}'", self.text),
            ErrorKind::UnknownOption => write!(f, "unknown option '{}'", self.text),
            ErrorKind::InvalidValue { option, reason } => {
                write!(f, "{option}: invalid value '{}' ({reason})", self.text)
            }
        }
    }
}

/// The result of [`parse`]: the options (defaults where a word was missing or
/// bad) and the errors met on the way.
#[derive(Clone, Debug)]
pub struct Parsed<'a> {
    /// The options in force.
    pub options: Options,
    errors: [Option<CmdlineError<'a>>; MAX_ERRORS],
    stored: usize,
    dropped: usize,
}

impl<'a> Parsed<'a> {
    /// The first [`MAX_ERRORS`] errors, in command-line order.
    pub fn errors(&self) -> impl Iterator<Item = &CmdlineError<'a>> + '_ {
        self.errors[..self.stored].iter().flatten()
    }

    /// Errors that did not fit in the fixed-size list.
    pub fn dropped_errors(&self) -> usize {
        self.dropped
    }

    /// All errors, kept or dropped.
    pub fn error_count(&self) -> usize {
        self.stored + self.dropped
    }

    /// Whether every word was accepted.
    pub fn is_clean(&self) -> bool {
        self.error_count() == 0
    }

    fn push_error(&mut self, error: CmdlineError<'a>) {
        match self.errors.get_mut(self.stored) {
            Some(slot) => {
                *slot = Some(error);
                self.stored += 1;
            }
            None => self.dropped += 1,
        }
    }
}

/// Parses a value into the options, or says why it cannot.
type Setter = fn(&mut Options, &str) -> Result<(), &'static str>;

/// The options the hypervisor understands: key and value parser.
pub const OPTIONS: &[(&str, Setter)] = &[
    ("log", set_log),
    ("crashkernel", set_crashkernel),
    ("finish", set_finish),
    ("max_cpus", set_max_cpus),
    ("init_delay_us", |options, value| {
        set_bounded(&mut options.init_delay_us, value, 1_000_000)
    }),
    ("sipi_delay_us", |options, value| {
        set_bounded(&mut options.sipi_delay_us, value, 1_000_000)
    }),
    ("ap_timeout_ms", |options, value| {
        set_bounded(&mut options.ap_timeout_ms, value, 600_000)
    }),
    ("ap_hang", set_ap_hang),
    ("vcpus", |options, value| {
        let mut n = 0;
        set_bounded(&mut n, value, 1024)?;
        options.vcpus = n as u32;
        Ok(())
    }),
    ("guest_run_ms", |options, value| {
        set_bounded(&mut options.guest_run_ms, value, defaults::MAX_GUEST_RUN_MS)
    }),
    ("slice_us", |options, value| {
        let mut n = 0;
        set_bounded(&mut n, value, 10_000_000)?;
        if n == 0 {
            return Err("expected a whole number of at least 1");
        }
        options.slice_us = n;
        Ok(())
    }),
    ("crash", set_crash),
    ("nmi", |options, value| {
        options.nmi = ExternalNmi::parse(value)?;
        Ok(())
    }),
    ("watchdog", |options, value| {
        set_bounded(
            &mut options.watchdog_seconds,
            value,
            defaults::MAX_WATCHDOG_SECONDS,
        )
    }),
    ("hang", |options, value| {
        options.hang = Some(HangSpec::parse(value)?);
        Ok(())
    }),
    ("stray_write", |options, value| {
        options.stray_write = match value {
            "reservation" => true,
            _ => return Err("expected reservation"),
        };
        Ok(())
    }),
    ("capture_mode", |options, value| {
        let address = parse_number(value)
            .filter(|a| *a != 0 && a % 8 == 0)
            .ok_or("expected the ELF core header's address")?;
        options.capture_mode = Some(address);
        Ok(())
    }),
    ("capture_sink", |options, value| {
        options.capture_sink = match value {
            "debugcon" => CaptureSink::DebugPort,
            "ata" => CaptureSink::AtaSlave,
            _ => return Err("expected one of debugcon, ata"),
        };
        Ok(())
    }),
    ("capture_corrupt", |options, value| {
        options.capture_corrupt = match value {
            "1" | "image" => CaptureCorrupt::Image,
            "table" => CaptureCorrupt::Table,
            "0" => CaptureCorrupt::Nothing,
            _ => return Err("expected 0, 1, image or table"),
        };
        Ok(())
    }),
    ("capture_hv_check", |options, value| {
        options.capture_hv_check = match value {
            "on" => true,
            "off" => false,
            _ => return Err("expected on or off"),
        };
        Ok(())
    }),
    ("capture_digest", |options, value| {
        options.capture_digest = match value {
            "xxh64" => CaptureDigest::Xxh64,
            "sha256" => CaptureDigest::Sha256,
            _ => return Err("expected xxh64 or sha256"),
        };
        Ok(())
    }),
    ("capture_purgatory_nmi", |options, value| {
        options.capture_purgatory_nmi = match value {
            "1" => true,
            "0" => false,
            _ => return Err("expected 0 or 1"),
        };
        Ok(())
    }),
    ("capture_words", |options, value| {
        let address = parse_number(value)
            .filter(|a| *a != 0 && a % 8 == 0)
            .ok_or("expected the crash words mailbox's 8-byte-aligned address")?;
        options.capture_words = Some(address);
        Ok(())
    }),
    ("capture_facts", |options, value| {
        let address = parse_number(value)
            .filter(|a| *a != 0 && a % 8 == 0)
            .ok_or("expected the crash summary facts' 8-byte-aligned address")?;
        options.capture_facts = Some(address);
        Ok(())
    }),
    ("capture_purgatory", |options, value| {
        let address = parse_number(value)
            .filter(|a| *a != 0 && a % 4096 == 0)
            .ok_or("expected the purgatory area's page-aligned address")?;
        options.capture_purgatory = Some(address);
        Ok(())
    }),
    ("capture_wake", |options, value| {
        set_flag(&mut options.capture_wake, value)
    }),
    ("wake_stragglers", |options, value| {
        set_flag(&mut options.wake_stragglers, value)
    }),
    ("wake_timeout_ms", |options, value| {
        set_bounded(
            &mut options.wake_timeout_ms,
            value,
            defaults::MAX_WAKE_TIMEOUT_MS,
        )
    }),
    ("capture_share", |options, value| {
        set_flag(&mut options.capture_share, value)
    }),
    ("guest_crash_call", |options, value| {
        let mut n = 0;
        set_bounded(&mut n, value, 1023)?;
        options.guest_crash_call = Some(n as u32);
        Ok(())
    }),
    ("crash_timeout_ms", |options, value| {
        set_bounded(
            &mut options.crash_timeout_ms,
            value,
            defaults::MAX_CRASH_TIMEOUT_MS,
        )
    }),
    ("crash_hypercall", |options, value| {
        options.crash_hypercall = match value {
            "allow" => true,
            "deny" => false,
            _ => return Err("expected one of allow, deny"),
        };
        Ok(())
    }),
    ("guest_mem", |options, value| {
        let bytes = parse_size(value)?;
        if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) || bytes > MAX_GUEST_MEM {
            return Err("expected a whole number of 4 KiB pages up to 3G");
        }
        options.guest_mem = bytes;
        Ok(())
    }),
    ("guest_timeout_ms", |options, value| {
        let mut n = 0;
        set_bounded(&mut n, value, 24 * 3_600_000)?;
        if n == 0 {
            return Err("expected a whole number of at least 1");
        }
        options.guest_timeout_ms = n;
        Ok(())
    }),
    ("guest_misbehave", |options, value| {
        let mut n = 0;
        set_bounded(&mut n, value, 1023)?;
        options.guest_misbehave = Some(n as u32);
        Ok(())
    }),
];

/// Parses the command line. Unknown keys and bad values are collected as
/// errors and skipped; when a key repeats, the last valid value wins.
pub fn parse(line: &str) -> Parsed<'_> {
    let mut parsed = Parsed {
        options: Options::new(),
        errors: [None; MAX_ERRORS],
        stored: 0,
        dropped: 0,
    };
    for word in line.split_ascii_whitespace() {
        let Some((key, value)) = word.split_once('=').filter(|(key, _)| !key.is_empty()) else {
            parsed.push_error(CmdlineError {
                text: word,
                kind: ErrorKind::ExpectedKeyValue,
            });
            continue;
        };
        let Some(&(option, setter)) = OPTIONS.iter().find(|(name, _)| *name == key) else {
            parsed.push_error(CmdlineError {
                text: key,
                kind: ErrorKind::UnknownOption,
            });
            continue;
        };
        if let Err(reason) = setter(&mut parsed.options, value) {
            parsed.push_error(CmdlineError {
                text: value,
                kind: ErrorKind::InvalidValue { option, reason },
            });
        }
    }
    parsed
}

fn set_log(options: &mut Options, value: &str) -> Result<(), &'static str> {
    const LEVELS: [(&str, LevelFilter); 6] = [
        ("off", LevelFilter::Off),
        ("error", LevelFilter::Error),
        ("warn", LevelFilter::Warn),
        ("info", LevelFilter::Info),
        ("debug", LevelFilter::Debug),
        ("trace", LevelFilter::Trace),
    ];
    let (_, level) = LEVELS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .ok_or("expected one of off, error, warn, info, debug, trace")?;
    options.log = *level;
    Ok(())
}

fn set_finish(options: &mut Options, value: &str) -> Result<(), &'static str> {
    options.finish = match value {
        "halt" => Finish::Halt,
        "exit" => Finish::Exit,
        _ => return Err("expected one of halt, exit"),
    };
    Ok(())
}

fn set_max_cpus(options: &mut Options, value: &str) -> Result<(), &'static str> {
    const EXPECTED: &str = "expected a whole number of at least 1";
    let n = parse_number(value).ok_or(EXPECTED)?;
    let n = u32::try_from(n).map_err(|_| "number too large")?;
    if n == 0 {
        return Err(EXPECTED);
    }
    options.max_cpus = Some(n);
    Ok(())
}

/// `0` or `1`.
fn set_flag(target: &mut bool, value: &str) -> Result<(), &'static str> {
    *target = match value {
        "1" => true,
        "0" => false,
        _ => return Err("expected 0 or 1"),
    };
    Ok(())
}

/// A whole number from 0 to `max`.
fn set_bounded(target: &mut u64, value: &str, max: u64) -> Result<(), &'static str> {
    let n = parse_number(value).ok_or("expected a whole number")?;
    if n > max {
        return Err("number too large");
    }
    *target = n;
    Ok(())
}

fn set_crash(options: &mut Options, value: &str) -> Result<(), &'static str> {
    options.crash = Some(CrashSpec::parse(value)?);
    Ok(())
}

fn set_ap_hang(options: &mut Options, value: &str) -> Result<(), &'static str> {
    let n = parse_number(value).ok_or("expected an APIC ID")?;
    options.ap_hang = Some(u32::try_from(n).map_err(|_| "APIC IDs have 32 bits")?);
    Ok(())
}

fn set_crashkernel(options: &mut Options, value: &str) -> Result<(), &'static str> {
    let (size, base) = match value.split_once('@') {
        Some((size, base)) => (size, Some(base)),
        None => (value, None),
    };
    let size = parse_size(size)?;
    if size == 0 {
        return Err("size must be greater than zero");
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err("size must be a multiple of 4 KiB");
    }
    let base = base.map(parse_size).transpose()?;
    if let Some(base) = base {
        if !base.is_multiple_of(PAGE_SIZE) {
            return Err("base must be a multiple of 4 KiB");
        }
        if base.checked_add(size).is_none() {
            return Err("base + size is beyond the address space");
        }
    }
    options.crashkernel = Some(CrashKernelSpec { size, base });
    Ok(())
}

/// `NUMBER[K|M|G]`, the number decimal or `0x` hexadecimal.
fn parse_size(text: &str) -> Result<u64, &'static str> {
    const EXPECTED: &str = "expected SIZE[@BASE], each a number with an optional K, M or G suffix";
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let number = parse_number(digits).ok_or(EXPECTED)?;
    number.checked_mul(1u64 << shift).ok_or("number too large")
}

/// A decimal or `0x`-prefixed hexadecimal `u64`; `None` if malformed or too large.
#[cfg(test)]
mod tests {
    use super::*;
    use std::string::{String, ToString};
    use std::vec::Vec;

    fn messages(parsed: &Parsed<'_>) -> Vec<String> {
        parsed.errors().map(ToString::to_string).collect()
    }

    #[test]
    fn empty_line_gives_defaults() {
        for line in ["", "   ", "\t\n "] {
            let parsed = parse(line);
            assert_eq!(parsed.options, Options::default());
            assert!(parsed.is_clean());
            assert_eq!(parsed.errors().count(), 0);
        }
        let defaults = Options::default();
        assert_eq!(defaults.log, LevelFilter::Info);
        assert_eq!(defaults.finish, Finish::Halt);
        assert_eq!(defaults.crashkernel, None);
        assert_eq!(defaults.max_cpus, None);
    }

    #[test]
    fn bring_up_timing_and_hang_knob() {
        let parsed = parse("init_delay_us=10000 sipi_delay_us=0 ap_timeout_ms=0x10 ap_hang=3");
        assert!(parsed.is_clean(), "{:?}", messages(&parsed));
        assert_eq!(parsed.options.init_delay_us, 10_000);
        assert_eq!(parsed.options.sipi_delay_us, 0);
        assert_eq!(parsed.options.ap_timeout_ms, 16);
        assert_eq!(parsed.options.ap_hang, Some(3));
        let defaults = Options::default();
        assert_eq!(
            (
                defaults.init_delay_us,
                defaults.sipi_delay_us,
                defaults.ap_timeout_ms,
                defaults.ap_hang
            ),
            (0, 200, 5000, None)
        );
    }

    #[test]
    fn guest_options_and_their_bounds() {
        let parsed = parse("vcpus=16 guest_run_ms=50 slice_us=500 guest_misbehave=2");
        assert!(parsed.is_clean(), "{:?}", messages(&parsed));
        let o = parsed.options;
        assert_eq!(
            (o.vcpus, o.guest_run_ms, o.slice_us, o.guest_misbehave),
            (16, 50, 500, Some(2))
        );
        let parsed = parse("vcpus=1025 slice_us=0 guest_misbehave=x");
        assert_eq!(messages(&parsed).len(), 3, "{:?}", messages(&parsed));
        assert_eq!(parsed.options.slice_us, Options::default().slice_us);
    }

    #[test]
    fn capture_wake_options_and_their_defaults() {
        let defaults = Options::default();
        assert!(defaults.capture_wake && defaults.capture_share);
        assert!(!defaults.wake_stragglers);
        assert_eq!(defaults.wake_timeout_ms, defaults::WAKE_TIMEOUT_MS);
        let parsed = parse("capture_wake=0 wake_stragglers=1 wake_timeout_ms=250 capture_share=0");
        assert!(parsed.is_clean(), "{:?}", messages(&parsed));
        let o = parsed.options;
        assert_eq!(
            (
                o.capture_wake,
                o.wake_stragglers,
                o.wake_timeout_ms,
                o.capture_share
            ),
            (false, true, 250, false)
        );
        let parsed = parse("capture_wake=yes wake_stragglers=2 wake_timeout_ms=60001");
        assert_eq!(
            messages(&parsed),
            [
                "capture_wake: invalid value 'yes' (expected 0 or 1)",
                "wake_stragglers: invalid value '2' (expected 0 or 1)",
                "wake_timeout_ms: invalid value '60001' (number too large)",
            ]
        );
        assert_eq!(parsed.options, Options::default());
    }

    #[test]
    fn crash_knob_with_and_without_a_point() {
        let parsed = parse("crash=cpu:3,after_ms:20 crash_timeout_ms=250 crash_hypercall=allow");
        assert!(parsed.is_clean(), "{:?}", messages(&parsed));
        assert_eq!(
            parsed.options.crash,
            Some(CrashSpec {
                cpu: 3,
                after_ms: 20,
                point: None
            })
        );
        assert_eq!(parsed.options.crash_timeout_ms, 250);
        assert!(parsed.options.crash_hypercall);
        for (text, point) in [
            ("list_add0", CrashPoint::ListAdd(0)),
            ("list_remove2", CrashPoint::ListRemove(2)),
            ("vmclear_unlink", CrashPoint::VmclearUnlink),
            ("vcpu_load", CrashPoint::VcpuLoad),
            ("nmi_blocked", CrashPoint::NmiBlocked),
            ("double_panic", CrashPoint::DoublePanic),
            ("before_vmx", CrashPoint::BeforeVmx),
            ("bringup", CrashPoint::Bringup),
        ] {
            let line = format!("crash=point:{text},cpu:0x1");
            let parsed = parse(&line);
            assert!(parsed.is_clean(), "{line}: {:?}", messages(&parsed));
            assert_eq!(
                parsed.options.crash,
                Some(CrashSpec {
                    cpu: 1,
                    after_ms: 0,
                    point: Some(point)
                })
            );
        }
        let defaults = Options::default();
        assert_eq!(
            (
                defaults.crash,
                defaults.crash_timeout_ms,
                defaults.crash_hypercall
            ),
            (None, 1000, false)
        );
    }

    #[test]
    fn capture_options() {
        let parsed = parse("capture_mode=0x1f000000 capture_corrupt=1 capture_sink=ata");
        assert!(parsed.is_clean(), "{:?}", messages(&parsed));
        assert_eq!(parsed.options.capture_sink, CaptureSink::AtaSlave);
        assert_eq!(Options::default().capture_sink.name(), "debugcon");
        assert_eq!(parsed.options.capture_mode, Some(0x1f00_0000));
        assert_eq!(parsed.options.capture_corrupt, CaptureCorrupt::Image);
        let parsed =
            parse("capture_mode=0 capture_mode=0x1001 capture_corrupt=yes capture_sink=tape");
        assert_eq!(parsed.error_count(), 4, "{:?}", messages(&parsed));
        assert_eq!(parsed.options, Options::default());
    }

    #[test]
    fn capture_test_knobs() {
        let defaults = Options::default();
        assert_eq!(defaults.capture_corrupt, CaptureCorrupt::Nothing);
        assert!(defaults.capture_hv_check);
        assert!(!defaults.capture_purgatory_nmi);
        assert_eq!(defaults.capture_purgatory, None);
        assert_eq!(defaults.capture_digest, CaptureDigest::Xxh64);
        assert_eq!(defaults.capture_words, None);
        let parsed = parse("capture_words=0x1f003000");
        assert_eq!(parsed.options.capture_words, Some(0x1f00_3000));
        let parsed = parse("capture_words=0x1f003004 capture_words=0");
        assert_eq!(parsed.error_count(), 2, "{:?}", messages(&parsed));
        assert_eq!(defaults.capture_facts, None);
        let parsed = parse("capture_facts=0x20a000");
        assert_eq!(parsed.options.capture_facts, Some(0x20_a000));
        let parsed = parse("capture_facts=0x20a004 capture_facts=0");
        assert_eq!(parsed.error_count(), 2, "{:?}", messages(&parsed));
        assert_eq!(defaults.capture_digest.name(), "xxh64");
        let parsed = parse("capture_digest=sha256");
        assert!(parsed.is_clean(), "{:?}", messages(&parsed));
        assert_eq!(parsed.options.capture_digest, CaptureDigest::Sha256);
        assert_eq!(parsed.options.capture_digest.name(), "sha256");
        let parsed = parse("capture_digest=md5");
        assert_eq!(parsed.error_count(), 1);
        assert!(messages(&parsed)[0].contains("expected xxh64 or sha256"));
        assert_eq!(parsed.options, Options::default());
        for (word, corrupt) in [
            ("0", CaptureCorrupt::Nothing),
            ("1", CaptureCorrupt::Image),
            ("image", CaptureCorrupt::Image),
            ("table", CaptureCorrupt::Table),
        ] {
            let line = format!("capture_corrupt={word}");
            let parsed = parse(&line);
            assert!(parsed.is_clean(), "{:?}", messages(&parsed));
            assert_eq!(parsed.options.capture_corrupt, corrupt, "{word}");
        }
        let parsed = parse(
            "capture_corrupt=table capture_hv_check=off capture_purgatory_nmi=1 capture_purgatory=0x1fff0000",
        );
        assert!(parsed.is_clean(), "{:?}", messages(&parsed));
        assert_eq!(parsed.options.capture_corrupt, CaptureCorrupt::Table);
        assert!(!parsed.options.capture_hv_check);
        assert!(parsed.options.capture_purgatory_nmi);
        assert_eq!(parsed.options.capture_purgatory, Some(0x1fff_0000));
        let parsed = parse(
            "capture_corrupt=tables capture_hv_check=0 capture_purgatory_nmi=yes capture_purgatory=0x1fff0001 capture_purgatory=0",
        );
        assert_eq!(parsed.error_count(), 5, "{:?}", messages(&parsed));
        assert_eq!(parsed.options, Options::default());
        assert!(
            messages(&parsed)[0].contains("expected 0, 1, image or table"),
            "{:?}",
            messages(&parsed)
        );
    }

    #[test]
    fn crash_knob_rejects_what_it_cannot_do() {
        for bad in [
            "crash=after_ms:5",
            "crash=cpu:x",
            "crash=cpu:1,point:list_add8",
            "crash=cpu:1,point:somewhere",
            "crash=cpu:1,point:list_add+1",
            "crash=cpu:1,when:now",
            "crash=cpu1",
            "crash_hypercall=yes",
        ] {
            let parsed = parse(bad);
            assert_eq!(parsed.error_count(), 1, "{bad}");
            assert_eq!(parsed.options, Options::default(), "{bad}");
        }
    }

    #[test]
    fn bring_up_options_reject_bad_values() {
        let parsed =
            parse("init_delay_us=2000000 ap_timeout_ms=soon ap_hang=0x100000000 sipi_delay_us=-1");
        assert_eq!(messages(&parsed).len(), 4, "{:?}", messages(&parsed));
        assert_eq!(parsed.options, Options::default());
        assert!(messages(&parsed)[2].contains("ap_hang"));
    }

    #[test]
    fn log_levels() {
        for (text, level) in [
            ("off", LevelFilter::Off),
            ("error", LevelFilter::Error),
            ("warn", LevelFilter::Warn),
            ("info", LevelFilter::Info),
            ("debug", LevelFilter::Debug),
            ("trace", LevelFilter::Trace),
            ("DEBUG", LevelFilter::Debug),
        ] {
            let line = format!("log={text}");
            let parsed = parse(&line);
            assert!(parsed.is_clean(), "{line}");
            assert_eq!(parsed.options.log, level, "{line}");
        }
    }

    #[test]
    fn log_invalid() {
        let parsed = parse("log=loud");
        assert_eq!(parsed.options.log, LevelFilter::Info);
        assert_eq!(
            messages(&parsed),
            ["log: invalid value 'loud' (expected one of off, error, warn, info, debug, trace)"]
        );
        let parsed = parse("log=");
        assert_eq!(parsed.error_count(), 1);
        assert_eq!(
            parsed.errors().next().unwrap().kind,
            ErrorKind::InvalidValue {
                option: "log",
                reason: "expected one of off, error, warn, info, debug, trace"
            }
        );
    }

    #[test]
    fn finish_values() {
        assert_eq!(parse("finish=exit").options.finish, Finish::Exit);
        assert_eq!(parse("finish=halt").options.finish, Finish::Halt);
        let parsed = parse("finish=reboot");
        assert_eq!(parsed.options.finish, Finish::Halt);
        assert_eq!(
            messages(&parsed),
            ["finish: invalid value 'reboot' (expected one of halt, exit)"]
        );
    }

    #[test]
    fn max_cpus_values() {
        assert_eq!(parse("max_cpus=1").options.max_cpus, Some(1));
        assert_eq!(parse("max_cpus=512").options.max_cpus, Some(512));
        assert_eq!(parse("max_cpus=0x10").options.max_cpus, Some(16));
        for bad in ["0", "", "-1", "+4", "four", "4096x", "4294967296", "0x"] {
            let line = format!("max_cpus={bad}");
            let parsed = parse(&line);
            assert_eq!(parsed.options.max_cpus, None, "{line}");
            assert_eq!(parsed.error_count(), 1, "{line}");
            let error = parsed.errors().next().unwrap();
            assert_eq!(error.text, bad);
            assert!(
                error.to_string().starts_with("max_cpus: invalid value"),
                "{error}"
            );
        }
    }

    #[test]
    fn crashkernel_sizes_and_suffixes() {
        let cases = [
            ("4096", 4096, None),
            ("64K", 64 << 10, None),
            ("64k", 64 << 10, None),
            ("256M", 256 << 20, None),
            ("256m", 256 << 20, None),
            ("1G", 1 << 30, None),
            ("0x100000", 0x10_0000, None),
            ("0x10M", 16 << 20, None),
            ("128M@16M", 128 << 20, Some(16 << 20)),
            ("128M@0x1000000", 128 << 20, Some(0x100_0000)),
            ("4K@0", 4096, Some(0)),
        ];
        for (text, size, base) in cases {
            let line = format!("crashkernel={text}");
            let parsed = parse(&line);
            assert!(parsed.is_clean(), "{line}: {:?}", messages(&parsed));
            assert_eq!(
                parsed.options.crashkernel,
                Some(CrashKernelSpec { size, base }),
                "{line}"
            );
        }
    }

    #[test]
    fn crashkernel_invalid() {
        let cases = [
            ("0", "size must be greater than zero"),
            ("0M", "size must be greater than zero"),
            ("1000", "size must be a multiple of 4 KiB"),
            ("1M@100", "base must be a multiple of 4 KiB"),
            ("99999999999G", "number too large"),
            (
                "18446744073709551616",
                "expected SIZE[@BASE], each a number with an optional K, M or G suffix",
            ),
            ("17179869184G", "number too large"),
            (
                "1M@0xfffffffffffff000",
                "base + size is beyond the address space",
            ),
            (
                "",
                "expected SIZE[@BASE], each a number with an optional K, M or G suffix",
            ),
            (
                "M",
                "expected SIZE[@BASE], each a number with an optional K, M or G suffix",
            ),
            (
                "64T",
                "expected SIZE[@BASE], each a number with an optional K, M or G suffix",
            ),
            (
                "64M@",
                "expected SIZE[@BASE], each a number with an optional K, M or G suffix",
            ),
            (
                "64M@1M@2M",
                "expected SIZE[@BASE], each a number with an optional K, M or G suffix",
            ),
            (
                "0xG",
                "expected SIZE[@BASE], each a number with an optional K, M or G suffix",
            ),
        ];
        for (text, reason) in cases {
            let line = format!("crashkernel={text}");
            let parsed = parse(&line);
            assert_eq!(parsed.options.crashkernel, None, "{line}");
            let errors: Vec<_> = parsed.errors().collect();
            assert_eq!(errors.len(), 1, "{line}");
            assert_eq!(errors[0].text, text);
            assert_eq!(
                errors[0].kind,
                ErrorKind::InvalidValue {
                    option: "crashkernel",
                    reason
                },
                "{line}"
            );
        }
    }

    #[test]
    fn unknown_and_bare_words() {
        let parsed = parse("bogus=1 quiet =x log=debug");
        assert_eq!(parsed.options.log, LevelFilter::Debug);
        assert_eq!(
            messages(&parsed),
            [
                "unknown option 'bogus'",
                "expected key=value, got 'quiet'",
                "expected key=value, got '=x'",
            ]
        );
    }

    #[test]
    fn multiple_errors_keep_the_good_words() {
        let parsed =
            parse("log=loud crashkernel=256M finish=never max_cpus=4 serial=on crashkernel=1");
        assert_eq!(parsed.options.log, LevelFilter::Info);
        assert_eq!(
            parsed.options.crashkernel,
            Some(CrashKernelSpec {
                size: 256 << 20,
                base: None
            })
        );
        assert_eq!(parsed.options.max_cpus, Some(4));
        assert_eq!(parsed.options.finish, Finish::Halt);
        assert_eq!(parsed.error_count(), 4);
        assert_eq!(parsed.dropped_errors(), 0);
        let keys: Vec<_> = parsed.errors().map(|e| e.text).collect();
        assert_eq!(keys, ["loud", "never", "serial", "1"]);
    }

    #[test]
    fn error_overflow_is_counted() {
        let line: String = (0..MAX_ERRORS + 5).map(|i| format!("bad{i}=x ")).collect();
        let line = line + "log=trace";
        let parsed = parse(&line);
        assert_eq!(parsed.options.log, LevelFilter::Trace);
        assert_eq!(parsed.errors().count(), MAX_ERRORS);
        assert_eq!(parsed.dropped_errors(), 5);
        assert_eq!(parsed.error_count(), MAX_ERRORS + 5);
        // The kept ones are the first ones, in order.
        let kept: Vec<_> = parsed.errors().map(|e| e.text).collect();
        let expected: Vec<_> = (0..MAX_ERRORS).map(|i| format!("bad{i}")).collect();
        assert_eq!(kept, expected);
    }

    #[test]
    fn repeated_keys_last_valid_wins() {
        let parsed = parse("log=debug log=warn finish=exit finish=halt max_cpus=2 max_cpus=8");
        assert!(parsed.is_clean());
        assert_eq!(parsed.options.log, LevelFilter::Warn);
        assert_eq!(parsed.options.finish, Finish::Halt);
        assert_eq!(parsed.options.max_cpus, Some(8));
        // An invalid repeat is reported and leaves the earlier value in force.
        let parsed = parse("log=debug log=loud");
        assert_eq!(parsed.options.log, LevelFilter::Debug);
        assert_eq!(parsed.error_count(), 1);
    }

    #[test]
    fn guest_defaults_are_bounded() {
        let parsed = parse("guest_mem=128M guest_timeout_ms=5000");
        assert!(parsed.is_clean());
        assert_eq!(parsed.options.guest_mem, 128 << 20);
        assert_eq!(parsed.options.guest_timeout_ms, 5000);
        for bad in [
            "guest_mem=4G",
            "guest_mem=100",
            "guest_mem=0",
            "guest_timeout_ms=0",
        ] {
            assert_eq!(parse(bad).error_count(), 1, "{bad}");
        }
        assert_eq!(Options::new().guest_mem, DEFAULT_GUEST_MEM);
    }

    #[test]
    fn value_may_contain_equals() {
        let parsed = parse("log=debug=1");
        assert_eq!(
            messages(&parsed),
            ["log: invalid value 'debug=1' (expected one of off, error, warn, info, debug, trace)"]
        );
    }

    #[test]
    fn every_table_option_parses_its_documented_example() {
        let examples = [
            ("log", "warn"),
            ("crashkernel", "64M"),
            ("finish", "exit"),
            ("max_cpus", "2"),
            ("init_delay_us", "10000"),
            ("sipi_delay_us", "200"),
            ("ap_timeout_ms", "1000"),
            ("ap_hang", "3"),
            ("vcpus", "16"),
            ("guest_run_ms", "50"),
            ("slice_us", "500"),
            ("guest_misbehave", "2"),
            ("crash", "cpu:1,after_ms:20"),
            ("guest_crash_call", "0"),
            ("capture_mode", "0x1f000000"),
            ("capture_corrupt", "1"),
            ("capture_hv_check", "off"),
            ("capture_purgatory_nmi", "1"),
            ("capture_digest", "sha256"),
            ("capture_words", "0x1f003000"),
            ("capture_facts", "0x20a000"),
            ("capture_purgatory", "0x1fff0000"),
            ("capture_sink", "ata"),
            ("crash_timeout_ms", "500"),
            ("crash_hypercall", "allow"),
            ("guest_mem", "32M"),
            ("guest_timeout_ms", "90000"),
            ("nmi", "log"),
            ("watchdog", "2"),
            ("hang", "cpu:3,after_ms:100,how:lock"),
            ("stray_write", "reservation"),
            ("capture_wake", "0"),
            ("wake_stragglers", "1"),
            ("wake_timeout_ms", "300"),
            ("capture_share", "0"),
        ];
        assert_eq!(OPTIONS.len(), examples.len());
        for (key, value) in examples {
            assert!(OPTIONS.iter().any(|(name, _)| *name == key));
            let line = format!("{key}={value}");
            assert!(parse(&line).is_clean(), "{line}");
        }
    }
}
