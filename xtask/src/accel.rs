//! Choosing QEMU's accelerator.
//!
//! hv runs guests with VMX or SVM. Under KVM the guest gets VMX only
//! through nested virtualisation, so KVM is used only when the host really
//! offers it: a `vmx` flag in `/proc/cpuinfo` and `kvm_intel` loaded with
//! `nested` enabled. A bare `/dev/kvm` proves nothing (some hosts expose a
//! paravirtual KVM that runs no ordinary guest). Everything else runs under
//! TCG, whose `-cpu max` emulates SVM with nested paging, and a KVM start
//! that fails falls back to TCG (see [`crate::run`]).

use std::fs;
use std::path::Path;

/// A QEMU accelerator together with the CPU model that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation with nested VMX, the host's own CPU model.
    Kvm,
    /// QEMU's emulator, the richest CPU model it has.
    Tcg,
}

impl Accel {
    /// The QEMU arguments selecting this accelerator and its CPU model.
    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }

    /// The backend hv picks under this accelerator's CPU model: nested
    /// KVM gives VMX; TCG's `-cpu max` emulates SVM.
    pub fn guest_backend(self) -> crate::report::Backend {
        match self {
            Accel::Kvm => crate::report::Backend::Vmx,
            Accel::Tcg => crate::report::Backend::Svm,
        }
    }

    /// The `emulator` value of the run report.
    pub fn emulator_name(self) -> &'static str {
        match self {
            Accel::Kvm => "qemu-kvm",
            Accel::Tcg => "qemu-tcg",
        }
    }
}

/// Looks at this host and picks the accelerator.
pub fn detect() -> Accel {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let nested = fs::read_to_string("/sys/module/kvm_intel/parameters/nested").ok();
    if nested_vmx_available(&cpuinfo, nested.as_deref(), Path::new("/dev/kvm").exists()) {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Whether KVM can give a guest VMX: the device, the host CPU's `vmx` flag and
/// `kvm_intel`'s `nested` parameter (`Y` or `1`; `None` when the module is
/// not loaded).
pub fn nested_vmx_available(cpuinfo: &str, kvm_intel_nested: Option<&str>, dev_kvm: bool) -> bool {
    let nested = matches!(kvm_intel_nested.map(str::trim), Some("Y" | "y" | "1"));
    dev_kvm && nested && cpu_has_flag(cpuinfo, "vmx")
}

/// Whether the first `flags` line of `/proc/cpuinfo` lists `flag`.
fn cpu_has_flag(cpuinfo: &str, flag: &str) -> bool {
    cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .is_some_and(|flags| flags.split_whitespace().any(|f| f == flag))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_VMX: &str = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n";
    const PVM_GUEST: &str = "processor\t: 0\nflags\t\t: fpu vme hypervisor sse2\n";

    #[test]
    fn kvm_needs_vmx_nested_and_the_device() {
        assert!(nested_vmx_available(WITH_VMX, Some("Y\n"), true));
        assert!(nested_vmx_available(WITH_VMX, Some("1"), true));
    }

    #[test]
    fn a_paravirtual_kvm_without_vmx_is_not_used() {
        assert!(!nested_vmx_available(PVM_GUEST, None, true));
        assert!(!nested_vmx_available(PVM_GUEST, Some("Y"), true));
    }

    #[test]
    fn nesting_off_or_no_device_means_tcg() {
        assert!(!nested_vmx_available(WITH_VMX, Some("N"), true));
        assert!(!nested_vmx_available(WITH_VMX, Some("0"), true));
        assert!(!nested_vmx_available(WITH_VMX, None, true));
        assert!(!nested_vmx_available(WITH_VMX, Some("Y"), false));
    }

    #[test]
    fn flag_must_be_a_whole_word() {
        let cpuinfo = "flags\t: vmxfoo svm\n";
        assert!(!cpu_has_flag(cpuinfo, "vmx"));
        assert!(cpu_has_flag(cpuinfo, "svm"));
    }

    #[test]
    fn accelerator_names_and_cpu_models() {
        assert_eq!(Accel::Kvm.emulator_name(), "qemu-kvm");
        assert_eq!(Accel::Tcg.emulator_name(), "qemu-tcg");
        assert_eq!(Accel::Kvm.qemu_args(), ["-accel", "kvm", "-cpu", "host"]);
        assert_eq!(Accel::Tcg.qemu_args(), ["-accel", "tcg", "-cpu", "max"]);
    }
}
