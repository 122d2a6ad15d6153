//! The MSR policy: for each MSR, who answers a guest's RDMSR and WRMSR.
//!
//! - [`MsrClass::Platform`]: emulated here ([`crate::platform::Platform::rdmsr`]
//!   and `wrmsr`): the local APIC's (IA32_APIC_BASE, the x2APIC range,
//!   IA32_TSC_DEADLINE), the TSC's (IA32_TSC, IA32_TSC_ADJUST), and a few
//!   constant ones firmware and kernels read.
//! - [`MsrClass::GuestState`]: state of the vCPU the backend keeps in its
//!   VMCS or VMCB or switches on entry and exit; these never need the
//!   platform. The backend may let the guest access them directly.
//! - [`MsrClass::Unsupported`]: #GP, as on a CPU without the feature, which
//!   the CPUID policy hides to match (MTRRs, machine check, PMU, debug
//!   store, speculation control, XSS, ...).

use crate::cpuid::GuestFeatures;

/// IA32_TSC.
pub const IA32_TSC: u32 = 0x10;
/// IA32_APIC_BASE.
pub const IA32_APIC_BASE: u32 = 0x1B;
/// IA32_FEATURE_CONTROL.
pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
/// IA32_TSC_ADJUST.
pub const IA32_TSC_ADJUST: u32 = 0x3B;
/// IA32_BIOS_SIGN_ID (microcode revision).
pub const IA32_BIOS_SIGN_ID: u32 = 0x8B;
/// IA32_MISC_ENABLE.
pub const IA32_MISC_ENABLE: u32 = 0x1A0;
/// IA32_TSC_DEADLINE.
pub const IA32_TSC_DEADLINE: u32 = 0x6E0;
/// IA32_PKRS.
pub const IA32_PKRS: u32 = 0x6E1;
/// IA32_EFER.
pub const IA32_EFER: u32 = 0xC000_0080;
/// IA32_TSC_AUX.
pub const IA32_TSC_AUX: u32 = 0xC000_0103;

/// Guest-state MSRs the backend keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStateMsr {
    /// IA32_EFER (VMCS/VMCB field).
    Efer,
    /// IA32_FS_BASE (segment base field).
    FsBase,
    /// IA32_GS_BASE (segment base field).
    GsBase,
    /// IA32_KERNEL_GS_BASE (switched).
    KernelGsBase,
    /// IA32_STAR (switched).
    Star,
    /// IA32_LSTAR (switched).
    Lstar,
    /// IA32_CSTAR (switched).
    Cstar,
    /// IA32_FMASK (switched).
    Fmask,
    /// IA32_SYSENTER_CS (field).
    SysenterCs,
    /// IA32_SYSENTER_ESP (field).
    SysenterEsp,
    /// IA32_SYSENTER_EIP (field).
    SysenterEip,
    /// IA32_PAT (field).
    Pat,
    /// IA32_DEBUGCTL (field).
    DebugCtl,
    /// IA32_TSC_AUX (switched; RDTSCP and RDPID read it).
    TscAux,
    /// IA32_PKRS (field).
    Pkrs,
}

/// Who handles an MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrClass {
    /// The platform emulates it.
    Platform,
    /// The backend's guest state.
    GuestState(GuestStateMsr),
    /// Not offered: #GP.
    Unsupported,
}

/// Classifies `msr` for a guest with `features`.
pub fn classify(msr: u32, features: &GuestFeatures) -> MsrClass {
    use GuestStateMsr as G;
    let state = MsrClass::GuestState;
    match msr {
        IA32_TSC | IA32_APIC_BASE | IA32_FEATURE_CONTROL | IA32_TSC_ADJUST | IA32_BIOS_SIGN_ID
        | IA32_MISC_ENABLE => MsrClass::Platform,
        IA32_TSC_DEADLINE if features.tsc_deadline => MsrClass::Platform,
        AMD_PERF_FIRST..=AMD_PERF_LAST if features.amd_legacy_pmu => MsrClass::Platform,
        0x800..=0x8FF if features.x2apic => MsrClass::Platform,
        0x174 => state(G::SysenterCs),
        0x175 => state(G::SysenterEsp),
        0x176 => state(G::SysenterEip),
        0x1D9 => state(G::DebugCtl),
        0x277 => state(G::Pat),
        IA32_PKRS if features.pks => state(G::Pkrs),
        IA32_EFER => state(G::Efer),
        0xC000_0081 => state(G::Star),
        0xC000_0082 => state(G::Lstar),
        0xC000_0083 => state(G::Cstar),
        0xC000_0084 => state(G::Fmask),
        0xC000_0100 => state(G::FsBase),
        0xC000_0101 => state(G::GsBase),
        0xC000_0102 => state(G::KernelGsBase),
        IA32_TSC_AUX if features.rdtscp => state(G::TscAux),
        _ => MsrClass::Unsupported,
    }
}

/// AMD's legacy performance event selects (0xC001_0000 to 3) and
/// counters (4 to 7).
pub const AMD_PERF_FIRST: u32 = 0xC001_0000;
/// The last of them.
pub const AMD_PERF_LAST: u32 = 0xC001_0007;

/// IA32_FEATURE_CONTROL as firmware leaves it: locked, VMX off (no nested
/// virtualization).
pub const FEATURE_CONTROL_VALUE: u64 = 1;
/// IA32_MISC_ENABLE at reset: fast strings on, BTS and PEBS unavailable.
pub const MISC_ENABLE_DEFAULT: u64 = 1 | 1 << 11 | 1 << 12;
/// The IA32_MISC_ENABLE bits a guest may change (fast strings).
pub const MISC_ENABLE_WRITABLE: u64 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amd_legacy_counters_exist_only_where_offered() {
        let mut f = GuestFeatures::new(1);
        assert_eq!(classify(0xC001_0000, &f), MsrClass::Unsupported);
        f.amd_legacy_pmu = true;
        assert_eq!(classify(0xC001_0000, &f), MsrClass::Platform);
        assert_eq!(classify(0xC001_0007, &f), MsrClass::Platform);
        assert_eq!(classify(0xC001_0008, &f), MsrClass::Unsupported);
    }

    #[test]
    fn classes_follow_the_features() {
        let mut f = GuestFeatures::new(2);
        assert_eq!(classify(IA32_APIC_BASE, &f), MsrClass::Platform);
        assert_eq!(classify(0x830, &f), MsrClass::Platform);
        assert_eq!(classify(IA32_TSC_DEADLINE, &f), MsrClass::Platform);
        assert_eq!(
            classify(IA32_EFER, &f),
            MsrClass::GuestState(GuestStateMsr::Efer)
        );
        assert_eq!(
            classify(IA32_TSC_AUX, &f),
            MsrClass::GuestState(GuestStateMsr::TscAux)
        );
        assert_eq!(classify(IA32_PKRS, &f), MsrClass::Unsupported);
        assert_eq!(classify(0xFE, &f), MsrClass::Unsupported, "MTRRcap");
        assert_eq!(classify(0x179, &f), MsrClass::Unsupported, "MCG_CAP");
        assert_eq!(classify(0xC1, &f), MsrClass::Unsupported, "PMC0");
        assert_eq!(classify(0x48, &f), MsrClass::Unsupported, "SPEC_CTRL");
        assert_eq!(classify(0x3A, &f), MsrClass::Platform);
        f.x2apic = false;
        f.tsc_deadline = false;
        f.rdtscp = false;
        f.pks = true;
        assert_eq!(classify(0x830, &f), MsrClass::Unsupported);
        assert_eq!(classify(IA32_TSC_DEADLINE, &f), MsrClass::Unsupported);
        assert_eq!(classify(IA32_TSC_AUX, &f), MsrClass::Unsupported);
        assert_eq!(
            classify(IA32_PKRS, &f),
            MsrClass::GuestState(GuestStateMsr::Pkrs)
        );
    }
}
