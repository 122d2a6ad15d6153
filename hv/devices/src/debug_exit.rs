//! QEMU's `isa-debug-exit` device at port 0xF4 (iosize 4): a write of any
//! width ends the guest with the written value as its status.
//!
//! QEMU exits with `(value << 1) | 1`, so kvm-unit-tests' `exit(0)` (a pass)
//! becomes status 1, `exit(1)` (a failure) 3, and the all-skipped summary's
//! `exit(77 >> 1)` 77. [`GuestExit::qemu_status`] gives that number, and
//! [`GuestExit::kvm_unit_tests_verdict`] the verdict the suite's runner
//! draws from it.

/// First port of the device.
pub const PORT: u16 = 0xF4;
/// Ports it answers: `PORT..PORT + PORTS`.
pub const PORTS: u16 = 4;

/// A guest's write to the debug-exit port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestExit {
    /// The value written, zero-extended from the access width.
    pub value: u32,
}

/// What kvm-unit-tests' runner concludes from an exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Status 1: `exit(0)`.
    Pass,
    /// Status 77: every check skipped.
    Skip,
    /// Anything else.
    Fail,
}

impl GuestExit {
    /// The exit status QEMU's process would have: `(value << 1) | 1`,
    /// truncated to 8 bits as the host OS truncates it.
    pub fn qemu_status(&self) -> u8 {
        ((self.value << 1) | 1) as u8
    }

    /// The verdict of `scripts/runtime.bash` for that status.
    pub fn kvm_unit_tests_verdict(&self) -> Verdict {
        match self.qemu_status() {
            1 => Verdict::Pass,
            77 => Verdict::Skip,
            _ => Verdict::Fail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_as_under_qemu() {
        assert_eq!(GuestExit { value: 0 }.qemu_status(), 1);
        assert_eq!(
            GuestExit { value: 0 }.kvm_unit_tests_verdict(),
            Verdict::Pass
        );
        assert_eq!(GuestExit { value: 1 }.qemu_status(), 3);
        assert_eq!(
            GuestExit { value: 1 }.kvm_unit_tests_verdict(),
            Verdict::Fail
        );
        assert_eq!(GuestExit { value: 77 >> 1 }.qemu_status(), 77);
        assert_eq!(
            GuestExit { value: 77 >> 1 }.kvm_unit_tests_verdict(),
            Verdict::Skip
        );
        // 0x80 << 1 | 1 = 0x101, truncated to 1: QEMU's process reports a
        // pass for it too.
        assert_eq!(GuestExit { value: 0x80 }.qemu_status(), 1);
    }
}
