//! What `hv_devices` asks of the kernel: a clock, a console for the
//! guest's UART, guest memory, the host's CPUID.

use hv_devices::cpuid::{CpuidResult, HostCpuid};
use hv_devices::memory::{GuestMemory, MemoryError};
use hv_devices::time::Clock;
use hv_devices::uart::ConsoleSink;

use crate::arch::cpu::rdtsc;
use crate::mm::phys;

/// Host TSC ticks: the same timeline on every core.
#[derive(Debug, Clone, Copy, Default)]
pub struct TscClock;

impl Clock for TscClock {
    fn now(&self) -> u64 {
        rdtsc()
    }
}

/// The host's own CPUID.
#[derive(Debug, Clone, Copy, Default)]
pub struct NativeCpuid;

impl HostCpuid for NativeCpuid {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        let r = raw_cpuid::native_cpuid::cpuid_count(leaf, subleaf);
        CpuidResult {
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
        }
    }
}

/// Longest line kept for the report (the summary, the first failure).
pub const KEPT_LINE: usize = 160;

/// A line kept for the report.
#[derive(Debug, Clone, Copy)]
pub struct KeptLine {
    bytes: [u8; KEPT_LINE],
    len: usize,
}

impl KeptLine {
    const fn empty() -> Self {
        Self {
            bytes: [0; KEPT_LINE],
            len: 0,
        }
    }

    fn set(&mut self, line: &[u8]) {
        let len = line.len().min(KEPT_LINE);
        self.bytes[..len].copy_from_slice(&line[..len]);
        self.len = len;
    }

    /// The line, if one was kept (lossy UTF-8 is cut at the first bad byte).
    pub fn text(&self) -> Option<&str> {
        (self.len > 0).then(|| match core::str::from_utf8(&self.bytes[..self.len]) {
            Ok(text) => text,
            Err(error) => {
                core::str::from_utf8(&self.bytes[..error.valid_up_to()]).unwrap_or_default()
            }
        })
    }
}

/// Where a guest's UART lines go: hv's console, prefixed by the guest's
/// name, and, for the report, the count, the kvm-unit-tests summary line
/// and the first failure.
#[derive(Debug, Clone, Copy)]
pub struct GuestConsole {
    name: [u8; 32],
    name_len: usize,
    /// Lines printed.
    pub lines: u64,
    /// The last line starting with `SUMMARY:`.
    pub summary: KeptLine,
    /// The first line starting with `FAIL`.
    pub first_failure: KeptLine,
}

impl GuestConsole {
    /// A console for the guest called `name`.
    pub fn new(name: &str) -> Self {
        let mut console = Self {
            name: [0; 32],
            name_len: name.len().min(32),
            lines: 0,
            summary: KeptLine::empty(),
            first_failure: KeptLine::empty(),
        };
        console.name[..console.name_len].copy_from_slice(&name.as_bytes()[..console.name_len]);
        console
    }

    fn name(&self) -> &str {
        core::str::from_utf8(&self.name[..self.name_len]).unwrap_or("guest")
    }
}

impl ConsoleSink for GuestConsole {
    fn line(&mut self, line: &[u8]) {
        self.lines += 1;
        if line.starts_with(b"SUMMARY:") {
            self.summary.set(line);
        }
        if line.starts_with(b"FAIL") && self.first_failure.len == 0 {
            self.first_failure.set(line);
        }
        let text = core::str::from_utf8(line).unwrap_or("<not UTF-8>");
        log::info!("[{}] {text}", self.name());
    }
}

/// A guest's RAM: guest-physical `[0, bytes)` at host `base`, which the
/// kernel allocated for it alone. Every access is bounds-checked; the
/// guest's vCPUs may be running (see `mm::phys`'s guest RAM rule).
#[derive(Debug, Clone, Copy)]
pub struct GuestRam {
    /// Host-physical base.
    pub base: u64,
    /// Size in bytes.
    pub bytes: u64,
}

impl GuestRam {
    fn check(&self, gpa: u64, len: usize) -> Result<u64, MemoryError> {
        let error = MemoryError {
            gpa,
            len: len as u64,
        };
        let end = gpa.checked_add(len as u64).ok_or(error)?;
        if end > self.bytes {
            return Err(error);
        }
        Ok(self.base + gpa)
    }
}

impl GuestMemory for GuestRam {
    fn size(&self) -> u64 {
        self.bytes
    }

    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        let at = self.check(gpa, bytes.len())?;
        phys::write_guest(at, bytes);
        Ok(())
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let at = self.check(gpa, buf.len())?;
        phys::read_guest(at, buf);
        Ok(())
    }
}
