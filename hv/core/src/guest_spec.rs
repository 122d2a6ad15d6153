//! Guest definitions on boot-module command lines.
//!
//! A guest is a multiboot1 kernel given to hv as a boot module (GRUB
//! `module2`) whose command line starts with the word `guest`:
//!
//! ```text
//! module2 /boot/x86/apic.flat guest name=xapic smp=2 mem=64M x2apic=off TEST_DEVICE=0 -- -x2apic args
//! module2 /boot/xapic.env guest-env
//! ```
//!
//! - `name=` names it in hv's console and report (`guestN` by default) and
//!   is the kernel's `argv[0]` (with `.flat` appended, as QEMU makes it the
//!   file name);
//! - `smp=` its vCPU count (1 to [`MAX_VCPUS`], default 1);
//! - `mem=` its RAM (`K`, `M`, `G` suffixes; default: hv's `guest_mem=`);
//! - `x2apic=on|off`, `pcid=on|off`, `invpcid=on|off` whether CPUID
//!   offers x2APIC, PCIDs, INVPCID (default on, where the CPU has them);
//! - `timeout_ms=` how long it may run before hv stops it (default: hv's
//!   `guest_timeout_ms=`);
//! - `max_exits=` how many VM exits it may take before hv stops it as an
//!   exit flood (default: no limit);
//! - words whose key is all capitals (`NR_CPUS=2`) are lines of its
//!   environment file, before those of a following `guest-env` module;
//! - everything after `--` is its command line, after `argv[0]`.
//!
//! A bad word makes the whole guest an error: hv reports it and does not
//! create the guest, whose siblings run on.

use core::fmt;

use hv_abi::knobs::parse_number;

/// Most vCPUs of one guest (the platform's limit).
pub const MAX_VCPUS: u32 = 64;
/// Most inline environment words of one guest.
pub const MAX_ENV_WORDS: usize = 16;
/// Longest guest name.
pub const MAX_NAME: usize = 32;

/// What a boot module is to the guest loader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleRole {
    /// A guest kernel ([`parse`] reads its settings).
    Guest,
    /// The environment file of the guest module before it.
    GuestEnv,
    /// Something else (a capture kernel, its initrd, ...).
    Other,
}

/// One guest's settings from its module command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSpec<'a> {
    /// Its name (`name=`), if given.
    pub name: Option<&'a str>,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in bytes (`mem=`), if given.
    pub mem_bytes: Option<u64>,
    /// Whether CPUID offers x2APIC.
    pub x2apic: bool,
    /// Whether CPUID offers PCIDs.
    pub pcid: bool,
    /// Whether CPUID offers INVPCID.
    pub invpcid: bool,
    /// Time limit in milliseconds (`timeout_ms=`), if given.
    pub timeout_ms: Option<u64>,
    /// VM-exit limit (`max_exits=`), if given.
    pub max_exits: Option<u64>,
    env: [&'a str; MAX_ENV_WORDS],
    env_words: usize,
    /// The kernel's arguments (after `--`), as written.
    pub args: &'a str,
}

impl<'a> GuestSpec<'a> {
    /// The inline environment lines (`KEY=VALUE`), in order.
    pub fn env(&self) -> &[&'a str] {
        &self.env[..self.env_words]
    }
}

/// Why a guest module's command line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSpecError<'a> {
    /// The offending word.
    pub word: &'a str,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for GuestSpecError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest module: '{}': {}", self.word, self.reason)
    }
}

/// What a module command line says the module is.
pub fn module_role(cmdline: &str) -> ModuleRole {
    let mut words = cmdline.split_ascii_whitespace();
    match words.next() {
        Some("guest") => ModuleRole::Guest,
        Some("guest-env") => ModuleRole::GuestEnv,
        _ => ModuleRole::Other,
    }
}

/// A size with an optional `K`, `M` or `G` suffix.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    parse_number(digits)?.checked_mul(1u64 << shift)
}

fn is_env_key(key: &str) -> bool {
    !key.is_empty()
        && key.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
        && key
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// Parses a `guest ...` module command line (its first word, `guest`, is
/// skipped).
pub fn parse(cmdline: &str) -> Result<GuestSpec<'_>, GuestSpecError<'_>> {
    let (settings, args) = match cmdline.split_once(" -- ") {
        Some((settings, args)) => (settings, args.trim()),
        None => match cmdline.strip_suffix(" --") {
            Some(settings) => (settings, ""),
            None => (cmdline, ""),
        },
    };
    let mut spec = GuestSpec {
        name: None,
        vcpus: 1,
        mem_bytes: None,
        x2apic: true,
        pcid: true,
        invpcid: true,
        timeout_ms: None,
        max_exits: None,
        env: [""; MAX_ENV_WORDS],
        env_words: 0,
        args,
    };
    for word in settings.split_ascii_whitespace().skip(1) {
        let error = |reason| GuestSpecError { word, reason };
        let (key, value) = word.split_once('=').ok_or(error("expected key=value"))?;
        if is_env_key(key) {
            let slot = spec
                .env
                .get_mut(spec.env_words)
                .ok_or(error("too many environment words"))?;
            *slot = word;
            spec.env_words += 1;
            continue;
        }
        match key {
            "name" => {
                let valid = !value.is_empty()
                    && value.len() <= MAX_NAME
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
                if !valid {
                    return Err(error("a name is 1 to 32 letters, digits, '_', '-' or '.'"));
                }
                spec.name = Some(value);
            }
            "smp" => {
                let n = parse_number(value)
                    .filter(|n| (1..=u64::from(MAX_VCPUS)).contains(n))
                    .ok_or(error("smp is 1 to 64"))?;
                spec.vcpus = n as u32;
            }
            "mem" => {
                let bytes = parse_size(value)
                    .filter(|&b| b > 0 && b.is_multiple_of(4096))
                    .ok_or(error("mem is a whole number of 4 KiB pages (K, M, G)"))?;
                spec.mem_bytes = Some(bytes);
            }
            "x2apic" | "pcid" | "invpcid" => {
                let on = match value {
                    "on" | "1" => true,
                    "off" | "0" => false,
                    _ => return Err(error("expected on or off")),
                };
                match key {
                    "x2apic" => spec.x2apic = on,
                    "pcid" => spec.pcid = on,
                    _ => spec.invpcid = on,
                }
            }
            "timeout_ms" => {
                spec.timeout_ms = Some(
                    parse_number(value)
                        .filter(|&n| n > 0)
                        .ok_or(error("expected a whole number of milliseconds"))?,
                );
            }
            "max_exits" => {
                spec.max_exits = Some(
                    parse_number(value)
                        .filter(|&n| n > 0)
                        .ok_or(error("expected a whole number of exits"))?,
                );
            }
            _ => return Err(error("unknown guest setting")),
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(line: &str) -> GuestSpec<'_> {
        assert_eq!(module_role(line), ModuleRole::Guest);
        parse(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn error(line: &str) -> GuestSpecError<'_> {
        parse(line).expect_err(line)
    }

    #[test]
    fn roles_come_from_the_first_word() {
        assert_eq!(module_role("guest"), ModuleRole::Guest);
        assert_eq!(module_role("guest-env"), ModuleRole::GuestEnv);
        assert_eq!(module_role("capture console=ttyS0"), ModuleRole::Other);
        assert_eq!(module_role(""), ModuleRole::Other);
        assert_eq!(module_role("guests"), ModuleRole::Other);
    }

    #[test]
    fn a_full_line_gives_every_setting() {
        let s = spec(
            "guest name=xapic smp=2 mem=64M x2apic=off timeout_ms=9000 max_exits=1000 \
             pcid=off invpcid=on TEST_DEVICE=0 NR_CPUS=2 -- -x2apic  more args",
        );
        assert_eq!(s.name, Some("xapic"));
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.mem_bytes, Some(64 << 20));
        assert!(!s.x2apic);
        assert!(!s.pcid && s.invpcid);
        assert_eq!(s.timeout_ms, Some(9000));
        assert_eq!(s.max_exits, Some(1000));
        assert_eq!(s.env(), ["TEST_DEVICE=0", "NR_CPUS=2"]);
        assert_eq!(s.args, "-x2apic  more args");
    }

    #[test]
    fn defaults_are_one_vcpu_x2apic_and_no_limits() {
        let s = spec("guest");
        assert_eq!(
            (s.name, s.vcpus, s.mem_bytes, s.x2apic),
            (None, 1, None, true)
        );
        assert_eq!((s.timeout_ms, s.max_exits, s.args), (None, None, ""));
        assert!(s.env().is_empty());
        assert_eq!(spec("guest smp=3 --").args, "");
        assert_eq!(spec("guest -- a -- b").args, "a -- b");
    }

    #[test]
    fn bad_words_are_named_with_the_reason() {
        for (line, word) in [
            ("guest smp=0", "smp=0"),
            ("guest smp=65", "smp=65"),
            ("guest mem=1000", "mem=1000"),
            ("guest mem=0", "mem=0"),
            ("guest mem=99999999999G", "mem=99999999999G"),
            ("guest x2apic=maybe", "x2apic=maybe"),
            ("guest name=a/b", "name=a/b"),
            ("guest name=", "name="),
            ("guest bogus=1", "bogus=1"),
            ("guest smp", "smp"),
            ("guest timeout_ms=0", "timeout_ms=0"),
        ] {
            assert_eq!(error(line).word, word, "{line}");
        }
        let many: std::string::String = (0..=MAX_ENV_WORDS)
            .map(|i| std::format!(" K{i}=1"))
            .collect();
        let line = std::format!("guest{many}");
        assert_eq!(error(&line).reason, "too many environment words");
        assert!(
            std::format!("{}", error("guest smp=0")).contains("smp is 1 to 64"),
            "the message names the rule"
        );
    }

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1"), None);
    }
}
