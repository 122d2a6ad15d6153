//! The capture kernel's command line: the user's arguments, then
//! `elfcorehdr=0xADDR memmap=0xSIZE$0xADDR`.
//!
//! - `elfcorehdr=0xADDR` tells the capture kernel where the ELF core header
//!   is; Linux parses it with `memparse` (`setup_elfcorehdr` in
//!   `kernel/crash_dump.c`), which takes `0x` hex, and finds the header's
//!   size from the header itself. This is the form `kexec_file_load` uses.
//! - `memmap=0xSIZE$0xADDR` marks the header's region reserved
//!   (`parse_memmap_one` in `arch/x86/kernel/e820.c`: `$` adds an
//!   `E820_TYPE_RESERVED` range, which wins over the RAM around it). The e820
//!   map in the zero page already marks the same range reserved (see
//!   [`crate::boot_params`]); the command line repeats it as kexec-tools
//!   does, which is the combination PLATFORM.md records as working with the
//!   Debian kernel.
//!
//! Both are appended last, so they win over anything earlier on the line;
//! user arguments that would contradict them (`elfcorehdr=`,
//! `memmap=exactmap`, which would throw the e820 map away) are refused
//! rather than silently overridden.

use core::fmt::{self, Write};

use crate::PhysRange;
use crate::bytes::{self, SliceWriter};

/// Why the command line could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError {
    /// The user's arguments contain a NUL byte, which would cut the line.
    UserArgsContainNul,
    /// The user's arguments set something the loader must set itself.
    ConflictingUserArg(&'static str),
    /// The ELF core header region is empty, overflows, or is not
    /// page-aligned.
    BadElfCoreHeaderRange(PhysRange),
    /// The line is longer than the kernel's `cmdline_size`.
    TooLong {
        /// Its length, without the NUL.
        len: usize,
        /// The kernel's `cmdline_size`.
        max: u32,
    },
    /// The output buffer cannot hold the line and its NUL.
    BufferTooSmall {
        /// Bytes needed, NUL included.
        needed: usize,
        /// Bytes available.
        len: usize,
    },
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UserArgsContainNul => write!(f, "the capture arguments contain a NUL byte"),
            Self::ConflictingUserArg(arg) => write!(
                f,
                "the capture arguments set `{arg}`, which the loader sets itself"
            ),
            Self::BadElfCoreHeaderRange(r) => write!(
                f,
                "the ELF core header region {r} is empty, overflows or is not page-aligned"
            ),
            Self::TooLong { len, max } => write!(
                f,
                "the {len}-byte command line is longer than the kernel's cmdline_size {max}"
            ),
            Self::BufferTooSmall { needed, len } => write!(
                f,
                "the command line needs {needed} bytes, the buffer holds {len}"
            ),
        }
    }
}

/// The CPU words an x86 capture kernel gets, as kexec-tools gives them,
/// where the user's arguments do not set them: `nr_cpus=` the CPUs that
/// may come up (every CPU the crashed hypervisor ran: they all left VMX
/// and parked, so the capture kernel may start them again), and
/// `disable_cpu_apicid=` the old boot CPU's APIC ID, because an INIT to a
/// boot CPU sends it to the firmware's reset vector, which on some
/// platforms resets the machine. Linux ignores the latter when it runs on
/// that very CPU. Written as words, each after a space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuWords {
    /// `nr_cpus=`, unless the user set it (or `maxcpus=`).
    pub nr_cpus: Option<u32>,
    /// `disable_cpu_apicid=`, unless the user set it.
    pub disable_cpu_apicid: Option<u32>,
}

impl CpuWords {
    /// The words to add to `user_args` for a machine of `cpus` CPUs whose
    /// boot CPU has APIC ID `boot_cpu_apic_id`.
    pub fn new(user_args: &str, cpus: u32, boot_cpu_apic_id: u32) -> Self {
        let has = |key: &str| {
            user_args.split_ascii_whitespace().any(|word| {
                word.strip_prefix(key)
                    .is_some_and(|rest| rest.starts_with('='))
            })
        };
        Self {
            nr_cpus: (!has("nr_cpus") && !has("maxcpus")).then_some(cpus.max(1)),
            disable_cpu_apicid: (!has("disable_cpu_apicid")).then_some(boot_cpu_apic_id),
        }
    }
}

impl fmt::Display for CpuWords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(cpus) = self.nr_cpus {
            write!(f, " nr_cpus={cpus}")?;
        }
        if let Some(apic_id) = self.disable_cpu_apicid {
            write!(f, " disable_cpu_apicid={apic_id}")?;
        }
        Ok(())
    }
}

/// Counts what would be written.
struct Counter(usize);

impl Write for Counter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 = self.0.checked_add(s.len()).ok_or(fmt::Error)?;
        Ok(())
    }
}

fn compose(w: &mut impl Write, user_args: &str, elfcorehdr: PhysRange) -> fmt::Result {
    if !user_args.is_empty() {
        write!(w, "{user_args} ")?;
    }
    write!(
        w,
        "elfcorehdr={:#x} memmap={:#x}${:#x}",
        elfcorehdr.start, elfcorehdr.len, elfcorehdr.start
    )
}

/// Writes the NUL-terminated capture command line into `out` and returns
/// its length without the NUL. `cmdline_size` is the kernel's
/// ([`crate::bzimage::BzImage::cmdline_size`]); `elfcorehdr` is the
/// page-aligned core header region ([`crate::layout::CaptureLayout`]).
pub fn write_capture_cmdline(
    out: &mut [u8],
    user_args: &str,
    elfcorehdr: PhysRange,
    cmdline_size: u32,
) -> Result<usize, CmdlineError> {
    use CmdlineError as E;
    let user_args = user_args.trim();
    if user_args.contains('\0') {
        return Err(E::UserArgsContainNul);
    }
    for arg in user_args.split_ascii_whitespace() {
        if arg.starts_with("elfcorehdr=") {
            return Err(E::ConflictingUserArg("elfcorehdr="));
        }
        if arg == "memmap=exactmap" {
            return Err(E::ConflictingUserArg("memmap=exactmap"));
        }
    }
    if elfcorehdr.len == 0 || elfcorehdr.end().is_none() || !elfcorehdr.is_page_aligned() {
        return Err(E::BadElfCoreHeaderRange(elfcorehdr));
    }

    let mut counter = Counter(0);
    // Counting only fails on usize overflow, impossible for a &str's length
    // plus a few dozen bytes; treat it as too long all the same.
    compose(&mut counter, user_args, elfcorehdr).map_err(|_| E::TooLong {
        len: usize::MAX,
        max: cmdline_size,
    })?;
    let len = counter.0;
    if len > cmdline_size as usize {
        return Err(E::TooLong {
            len,
            max: cmdline_size,
        });
    }
    let needed = len.saturating_add(1);
    if out.len() < needed {
        return Err(E::BufferTooSmall {
            needed,
            len: out.len(),
        });
    }
    let mut writer = SliceWriter::new(out);
    compose(&mut writer, user_args, elfcorehdr).map_err(|_| E::BufferTooSmall {
        needed,
        len: out.len(),
    })?;
    bytes::put_u8(out, len, 0).map_err(|_| E::BufferTooSmall {
        needed,
        len: out.len(),
    })?;
    Ok(len)
}

#[cfg(test)]
mod tests {

    #[test]
    fn cpu_words_are_added_unless_the_user_gave_them() {
        let words = |user: &str| std::format!("{}", CpuWords::new(user, 8, 3));
        assert_eq!(words("console=ttyS0"), " nr_cpus=8 disable_cpu_apicid=3");
        assert_eq!(words(""), " nr_cpus=8 disable_cpu_apicid=3");
        assert_eq!(words("a nr_cpus=1 b"), " disable_cpu_apicid=3");
        assert_eq!(words("maxcpus=2"), " disable_cpu_apicid=3");
        assert_eq!(words("disable_cpu_apicid=0 nr_cpus=1"), "");
        // Only whole keys count.
        assert_eq!(
            words("my_nr_cpus=4 nr_cpus_x=2"),
            " nr_cpus=8 disable_cpu_apicid=3"
        );
        assert_eq!(CpuWords::new("", 0, 0).nr_cpus, Some(1));
    }
    use super::*;

    const HDR: PhysRange = PhysRange::new(0x4040_0000, 0x3000);

    fn build(user: &str) -> String {
        let mut out = [0xffu8; 512];
        let len = write_capture_cmdline(&mut out, user, HDR, 2047).unwrap();
        assert_eq!(out[len], 0, "NUL-terminated");
        String::from_utf8(out[..len].to_vec()).unwrap()
    }

    /// Linux's `memparse`: a number in C base-0 notation with an optional
    /// K/M/G/T/P/E suffix. Returns the value and the rest.
    fn memparse(text: &str) -> (u64, &str) {
        let (digits_start, radix) = if let Some(hex) = text.strip_prefix("0x") {
            (hex, 16)
        } else if text.starts_with('0') && text.len() > 1 {
            (&text[1..], 8)
        } else {
            (text, 10)
        };
        let end = digits_start
            .find(|c: char| !c.is_digit(radix))
            .unwrap_or(digits_start.len());
        let mut value = u64::from_str_radix(&digits_start[..end], radix).unwrap();
        let mut rest = &digits_start[end..];
        let shift = match rest.chars().next() {
            Some('K' | 'k') => 10,
            Some('M' | 'm') => 20,
            Some('G' | 'g') => 30,
            _ => 0,
        };
        if shift != 0 {
            value <<= shift;
            rest = &rest[1..];
        }
        (value, rest)
    }

    /// What Linux makes of our two parameters.
    fn linux_view(cmdline: &str) -> (u64, (u64, u64)) {
        let mut elfcorehdr = None;
        let mut memmap = None;
        for arg in cmdline.split(' ') {
            if let Some(v) = arg.strip_prefix("elfcorehdr=") {
                let (addr, rest) = memparse(v);
                assert_eq!(rest, "", "setup_elfcorehdr stops at the end");
                elfcorehdr = Some(addr);
            }
            if let Some(v) = arg.strip_prefix("memmap=") {
                let (size, rest) = memparse(v);
                let at = rest.strip_prefix('$').expect("a $ range");
                let (start, rest) = memparse(at);
                assert_eq!(rest, "");
                memmap = Some((size, start));
            }
        }
        (elfcorehdr.unwrap(), memmap.unwrap())
    }

    #[test]
    fn the_line_is_user_args_then_elfcorehdr_and_memmap() {
        let line = build("console=ttyS0,115200 nr_cpus=1 reset_devices");
        assert_eq!(
            line,
            "console=ttyS0,115200 nr_cpus=1 reset_devices elfcorehdr=0x40400000 memmap=0x3000$0x40400000"
        );
        assert_eq!(linux_view(&line), (HDR.start, (HDR.len, HDR.start)));
    }

    #[test]
    fn empty_or_padded_user_args_leave_no_stray_spaces() {
        assert_eq!(build(""), "elfcorehdr=0x40400000 memmap=0x3000$0x40400000");
        assert_eq!(
            build("  quiet \t"),
            "quiet elfcorehdr=0x40400000 memmap=0x3000$0x40400000"
        );
    }

    #[test]
    fn addresses_above_4_gib_round_trip_through_linux_parsing() {
        let hdr = PhysRange::new(0x12_3456_7000, 0x10_0000);
        let mut out = [0u8; 128];
        let len = write_capture_cmdline(&mut out, "", hdr, 2047).unwrap();
        let line = core::str::from_utf8(&out[..len]).unwrap();
        assert_eq!(linux_view(line), (hdr.start, (hdr.len, hdr.start)));
    }

    #[test]
    fn the_line_is_bounded_by_cmdline_size() {
        let tail_len = "elfcorehdr=0x40400000 memmap=0x3000$0x40400000".len();
        let user = "x".repeat(100);
        let exact = (100 + 1 + tail_len) as u32;
        let mut out = [0u8; 256];
        assert_eq!(
            write_capture_cmdline(&mut out, &user, HDR, exact).unwrap(),
            exact as usize
        );
        assert_eq!(
            write_capture_cmdline(&mut out, &user, HDR, exact - 1).unwrap_err(),
            CmdlineError::TooLong {
                len: exact as usize,
                max: exact - 1
            }
        );
    }

    #[test]
    fn the_buffer_must_hold_the_nul_too() {
        let tail_len = "elfcorehdr=0x40400000 memmap=0x3000$0x40400000".len();
        let mut out = vec![0u8; tail_len];
        assert_eq!(
            write_capture_cmdline(&mut out, "", HDR, 2047).unwrap_err(),
            CmdlineError::BufferTooSmall {
                needed: tail_len + 1,
                len: tail_len
            }
        );
        out.push(0);
        assert_eq!(write_capture_cmdline(&mut out, "", HDR, 2047), Ok(tail_len));
    }

    #[test]
    fn conflicting_or_broken_user_args_are_refused() {
        let mut out = [0u8; 256];
        let cases = [
            ("a\0b", CmdlineError::UserArgsContainNul),
            (
                "quiet elfcorehdr=0x1000",
                CmdlineError::ConflictingUserArg("elfcorehdr="),
            ),
            (
                "memmap=exactmap memmap=640K@0",
                CmdlineError::ConflictingUserArg("memmap=exactmap"),
            ),
        ];
        for (user, expected) in cases {
            assert_eq!(
                write_capture_cmdline(&mut out, user, HDR, 2047).unwrap_err(),
                expected,
                "{user:?}"
            );
        }
        // Other memmap= arguments are the user's business.
        assert!(write_capture_cmdline(&mut out, "memmap=1M$0x10000000", HDR, 2047).is_ok());
    }

    #[test]
    fn bad_core_header_regions_are_refused() {
        let mut out = [0u8; 256];
        for hdr in [
            PhysRange::new(0x1000, 0),
            PhysRange::new(0x1001, 0x1000),
            PhysRange::new(0x1000, 0x800),
            PhysRange::new(u64::MAX - 0xfff, 0x2000),
        ] {
            assert_eq!(
                write_capture_cmdline(&mut out, "", hdr, 2047).unwrap_err(),
                CmdlineError::BadElfCoreHeaderRange(hdr)
            );
        }
    }

    #[test]
    fn every_cmdline_error_has_a_message() {
        let errors = [
            CmdlineError::UserArgsContainNul,
            CmdlineError::ConflictingUserArg("elfcorehdr="),
            CmdlineError::BadElfCoreHeaderRange(HDR),
            CmdlineError::TooLong { len: 2, max: 1 },
            CmdlineError::BufferTooSmall { needed: 2, len: 1 },
        ];
        for error in errors {
            assert!(error.to_string().len() > 10, "{error:?}");
        }
    }
}
