//! What guests see of the CPU: the CPUID policy and the XSETBV rules.
//!
//! The policy starts from the host's answer ([`HostCpuid`]) and keeps only
//! what hv's guests can use: long mode, the local APIC (x2APIC and the
//! TSC-deadline timer when the platform offers them), SSE/AVX and their
//! XSAVE state, SMEP/SMAP/UMIP/PKU, and the hypervisor bit. It hides VMX,
//! SVM and SMX (no nesting), the PMU and debug store, MONITOR/MWAIT,
//! thermal and power management, MTRRs and machine-check MSRs, speculation
//! control MSRs, Intel PT, SGX, CET, AMX and XSAVES supervisor state. APIC
//! IDs come from the vCPU (leaves 1, 0xB, 0x1F), and the bits that follow
//! guest state do: OSXSAVE (CR4.OSXSAVE), OSPKE (CR4.PKE), APIC
//! (IA32_APIC_BASE.EN), and leaf 0xD's XSAVE area size (XCR0).

/// One CPUID answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidResult {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// The host's CPUID (the kernel executes the instruction; tests fake it).
pub trait HostCpuid {
    /// CPUID with EAX = `leaf`, ECX = `subleaf`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;
}

/// Features whose availability depends on the platform or on what the
/// backend can virtualize, and which CPUID and the MSR policy must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFeatures {
    /// Number of vCPUs (topology leaves).
    pub vcpus: u32,
    /// x2APIC mode offered.
    pub x2apic: bool,
    /// TSC-deadline timer offered.
    pub tsc_deadline: bool,
    /// RDTSCP and RDPID (the backend enables them and switches
    /// IA32_TSC_AUX).
    pub rdtscp: bool,
    /// INVPCID (the backend lets it run).
    pub invpcid: bool,
    /// PCIDs (CR4.PCIDE; a backend that offers none refuses the bit).
    pub pcid: bool,
    /// Protection keys for supervisor pages (the backend switches
    /// IA32_PKRS).
    pub pks: bool,
    /// AMD's legacy performance counters (MSRs 0xC001_0000 to 7), which
    /// every AMD CPU has without a CPUID bit and kvm-unit-tests' library
    /// resets on an AMD vendor: offered on AMD hosts as counters that
    /// never count (reads 0, writes ignored), as QEMU TCG does.
    pub amd_legacy_pmu: bool,
}

impl GuestFeatures {
    /// Everything the platform can offer, for `vcpus` vCPUs; PKS off (it
    /// needs IA32_PKRS switching that not every backend has).
    pub const fn new(vcpus: u32) -> Self {
        Self {
            vcpus,
            x2apic: true,
            tsc_deadline: true,
            rdtscp: true,
            invpcid: true,
            pcid: true,
            pks: false,
            amd_legacy_pmu: false,
        }
    }
}

/// The guest state some CPUID bits follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuCpuidState {
    /// The vCPU's initial APIC ID.
    pub apic_id: u32,
    /// IA32_APIC_BASE.EN.
    pub apic_enabled: bool,
    /// Guest CR4.
    pub cr4: u64,
    /// Guest XCR0.
    pub xcr0: u64,
}

/// The hypervisor's CPUID signature at 0x4000_0000.
pub const HYPERVISOR_SIGNATURE: [u8; 12] = *b"hvHypervisor";

const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_PKE: u64 = 1 << 22;

// Leaf 1 ECX.
const L1_ECX_KEEP: u32 = 1 << 0 // SSE3
    | 1 << 1 // PCLMULQDQ
    | 1 << 9 // SSSE3
    | 1 << 12 // FMA
    | 1 << 13 // CMPXCHG16B
    | 1 << 17 // PCID
    | 1 << 19 // SSE4.1
    | 1 << 20 // SSE4.2
    | 1 << 22 // MOVBE
    | 1 << 23 // POPCNT
    | 1 << 25 // AES
    | 1 << 26 // XSAVE
    | 1 << 28 // AVX
    | 1 << 29 // F16C
    | 1 << 30; // RDRAND
const L1_ECX_PCID: u32 = 1 << 17;
const L1_ECX_X2APIC: u32 = 1 << 21;
const L1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const L1_ECX_XSAVE: u32 = 1 << 26;
const L1_ECX_OSXSAVE: u32 = 1 << 27;
const L1_ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX: all but MTRR (12), MCA (14), PSN (18), DS (21), ACPI (22),
// TM (29), PBE (31); APIC (9) and HTT (28) are set per vCPU.
const L1_EDX_KEEP: u32 = !(1 << 12
    | 1 << 14
    | 1 << 18
    | 1 << 21
    | 1 << 22
    | 1 << 29
    | 1 << 31
    | 1 << 9
    | 1 << 28
    | 1 << 10
    | 1 << 20
    | 1 << 30);
const L1_EDX_APIC: u32 = 1 << 9;
const L1_EDX_HTT: u32 = 1 << 28;

// Leaf 7 subleaf 0.
const L7_EBX_KEEP: u32 = 1 << 0 // FSGSBASE
    | 1 << 1 // IA32_TSC_ADJUST
    | 1 << 3 // BMI1
    | 1 << 4 // HLE
    | 1 << 5 // AVX2
    | 1 << 6 // FDP_EXCPTN_ONLY
    | 1 << 7 // SMEP
    | 1 << 8 // BMI2
    | 1 << 9 // ERMS
    | 1 << 11 // RTM
    | 1 << 13 // FPU CS/DS deprecated
    | 1 << 16 // AVX512F
    | 1 << 17 // AVX512DQ
    | 1 << 18 // RDSEED
    | 1 << 19 // ADX
    | 1 << 20 // SMAP
    | 1 << 21 // AVX512_IFMA
    | 1 << 23 // CLFLUSHOPT
    | 1 << 24 // CLWB
    | 1 << 26 // AVX512PF
    | 1 << 27 // AVX512ER
    | 1 << 28 // AVX512CD
    | 1 << 29 // SHA
    | 1 << 30 // AVX512BW
    | 1 << 31; // AVX512VL
const L7_EBX_INVPCID: u32 = 1 << 10;
const L7_ECX_KEEP: u32 = 1 << 0 // PREFETCHWT1
    | 1 << 1 // AVX512_VBMI
    | 1 << 2 // UMIP
    | 1 << 3 // PKU
    | 1 << 6 // AVX512_VBMI2
    | 1 << 8 // GFNI
    | 1 << 9 // VAES
    | 1 << 10 // VPCLMULQDQ
    | 1 << 11 // AVX512_VNNI
    | 1 << 12 // AVX512_BITALG
    | 1 << 14 // AVX512_VPOPCNTDQ
    | 1 << 16 // LA57
    | 1 << 25 // CLDEMOTE
    | 1 << 27 // MOVDIRI
    | 1 << 28; // MOVDIR64B
const L7_ECX_PKU: u32 = 1 << 3;
const L7_ECX_OSPKE: u32 = 1 << 4;
const L7_ECX_RDPID: u32 = 1 << 22;
const L7_ECX_PKS: u32 = 1 << 31;
const L7_EDX_KEEP: u32 = 1 << 2 // AVX512_4VNNIW
    | 1 << 3 // AVX512_4FMAPS
    | 1 << 4 // FSRM
    | 1 << 8 // AVX512_VP2INTERSECT
    | 1 << 10 // MD_CLEAR
    | 1 << 14 // SERIALIZE
    | 1 << 16 // TSXLDTRK
    | 1 << 23; // AVX512_FP16

// Leaf 0x8000_0001.
const E1_ECX_KEEP: u32 = 1 << 0 // LAHF/SAHF
    | 1 << 5 // ABM/LZCNT
    | 1 << 6 // SSE4A
    | 1 << 7 // misaligned SSE
    | 1 << 8 // PREFETCHW
    | 1 << 11 // XOP
    | 1 << 16 // FMA4
    | 1 << 21; // TBM
const E1_EDX_RDTSCP: u32 = 1 << 27;

/// XCR0 components the guest may enable: x87, SSE, AVX, the three AVX-512
/// components, PKRU. (MPX, AMX and the XSS-managed ones are not offered.)
pub const XCR0_OFFERED: u64 = 0b10_1110_0111;

/// The CPUID policy of one guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidPolicy {
    features: GuestFeatures,
}

impl CpuidPolicy {
    /// The policy for `features`.
    pub const fn new(features: GuestFeatures) -> Self {
        Self { features }
    }

    /// The features it offers.
    pub fn features(&self) -> &GuestFeatures {
        &self.features
    }

    /// XCR0 bits the guest may set: what the host supports of
    /// [`XCR0_OFFERED`].
    pub fn supported_xcr0(&self, host: &dyn HostCpuid) -> u64 {
        if host.cpuid(1, 0).ecx & L1_ECX_XSAVE == 0 || host.cpuid(0, 0).eax < 0xD {
            return 0;
        }
        let leaf = host.cpuid(0xD, 0);
        let mut supported = (u64::from(leaf.edx) << 32 | u64::from(leaf.eax)) & XCR0_OFFERED;
        // AVX-512 state is all three components or none.
        if supported & 0xE0 != 0xE0 {
            supported &= !0xE0;
        }
        if supported & 0x4 == 0 {
            supported &= !0xE0;
        }
        supported
    }

    fn xsave_size(&self, host: &dyn HostCpuid, components: u64) -> u32 {
        // Legacy area and header; each extended component at its offset.
        let mut size = 512 + 64;
        for i in 2..63 {
            if components & (1 << i) != 0 {
                let c = host.cpuid(0xD, i);
                size = size.max(c.ebx.saturating_add(c.eax));
            }
        }
        size
    }

    /// The guest's CPUID(`leaf`, `subleaf`).
    pub fn query(
        &self,
        host: &dyn HostCpuid,
        leaf: u32,
        subleaf: u32,
        vcpu: VcpuCpuidState,
    ) -> CpuidResult {
        let f = &self.features;
        let max_basic = host.cpuid(0, 0).eax.min(0x1F);
        let max_extended = host
            .cpuid(0x8000_0000, 0)
            .eax
            .clamp(0x8000_0000, 0x8000_0008);
        let zero = CpuidResult::default();
        let apic_id = vcpu.apic_id;
        let vcpus = f.vcpus.max(1);
        match leaf {
            0 => CpuidResult {
                eax: max_basic,
                ..host.cpuid(0, 0)
            },
            1 => {
                let h = host.cpuid(1, 0);
                let mut ecx = h.ecx & L1_ECX_KEEP | L1_ECX_HYPERVISOR;
                if !f.pcid {
                    ecx &= !L1_ECX_PCID;
                }
                if f.x2apic {
                    ecx |= L1_ECX_X2APIC;
                }
                if f.tsc_deadline {
                    ecx |= L1_ECX_TSC_DEADLINE;
                }
                if ecx & L1_ECX_XSAVE != 0 && vcpu.cr4 & CR4_OSXSAVE != 0 {
                    ecx |= L1_ECX_OSXSAVE;
                }
                let mut edx = h.edx & L1_EDX_KEEP;
                if vcpu.apic_enabled {
                    edx |= L1_EDX_APIC;
                }
                let logical = vcpus.next_power_of_two().min(128);
                if vcpus > 1 {
                    edx |= L1_EDX_HTT;
                }
                CpuidResult {
                    eax: h.eax,
                    ebx: (h.ebx & 0xFFFF) | logical << 16 | (apic_id & 0xFF) << 24,
                    ecx,
                    edx,
                }
            }
            2 if leaf <= max_basic => host.cpuid(2, 0),
            4 if leaf <= max_basic => {
                let h = host.cpuid(4, subleaf);
                if h.eax & 0x1F == 0 {
                    return zero;
                }
                let level = (h.eax >> 5) & 7;
                let sharing = if level >= 3 { vcpus.min(4096) - 1 } else { 0 };
                CpuidResult {
                    eax: (h.eax & 0x3FFF) | sharing << 14 | (vcpus.min(64) - 1) << 26,
                    ..h
                }
            }
            // Always-running APIC timer (ARAT); no thermal or power MSRs.
            6 if leaf <= max_basic => CpuidResult {
                eax: 1 << 2,
                ..zero
            },
            7 if leaf <= max_basic && subleaf == 0 => {
                let h = host.cpuid(7, 0);
                let mut ebx = h.ebx & L7_EBX_KEEP;
                if f.invpcid {
                    ebx |= h.ebx & L7_EBX_INVPCID;
                }
                let mut ecx = h.ecx & L7_ECX_KEEP;
                if f.rdtscp {
                    ecx |= h.ecx & L7_ECX_RDPID;
                }
                if f.pks {
                    ecx |= h.ecx & L7_ECX_PKS;
                }
                if ecx & L7_ECX_PKU != 0 && vcpu.cr4 & CR4_PKE != 0 {
                    ecx |= L7_ECX_OSPKE;
                }
                if self.supported_xcr0(host) & 0xE0 == 0 {
                    // No AVX-512 state, no AVX-512 instructions.
                    ebx &= !(0xFFFF_0000
                        & !(1 << 18 | 1 << 19 | 1 << 20 | 1 << 23 | 1 << 24 | 1 << 29));
                    ecx &= !(1 << 1 | 1 << 6 | 1 << 11 | 1 << 12 | 1 << 14);
                }
                CpuidResult {
                    eax: 0,
                    ebx,
                    ecx,
                    edx: h.edx & L7_EDX_KEEP,
                }
            }
            0xB | 0x1F if leaf <= max_basic => {
                let core_shift = 32 - (vcpus - 1).leading_zeros();
                match subleaf {
                    0 => CpuidResult {
                        eax: 0,
                        ebx: 1,
                        ecx: 1 << 8,
                        edx: apic_id,
                    },
                    1 => CpuidResult {
                        eax: core_shift,
                        ebx: vcpus,
                        ecx: 1 | 2 << 8,
                        edx: apic_id,
                    },
                    _ => CpuidResult {
                        ecx: subleaf & 0xFF,
                        edx: apic_id,
                        ..zero
                    },
                }
            }
            0xD if leaf <= max_basic => {
                let supported = self.supported_xcr0(host);
                match subleaf {
                    0 if supported != 0 => CpuidResult {
                        eax: supported as u32,
                        ebx: self.xsave_size(host, vcpu.xcr0 & supported),
                        ecx: self.xsave_size(host, supported),
                        edx: (supported >> 32) as u32,
                    },
                    // XSAVEOPT, XSAVEC, XGETBV(1); no XSAVES, no XFD.
                    1 if supported != 0 => CpuidResult {
                        eax: host.cpuid(0xD, 1).eax & 0b111,
                        ..zero
                    },
                    2..=62 if supported & (1 << subleaf) != 0 => host.cpuid(0xD, subleaf),
                    _ => zero,
                }
            }
            0x15 | 0x16 if leaf <= max_basic => host.cpuid(leaf, 0),
            0x4000_0000 => {
                let sig = HYPERVISOR_SIGNATURE;
                let word =
                    |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
                CpuidResult {
                    eax: 0x4000_0000,
                    ebx: word(0),
                    ecx: word(4),
                    edx: word(8),
                }
            }
            0x8000_0000 => CpuidResult {
                eax: max_extended,
                ..host.cpuid(0x8000_0000, 0)
            },
            0x8000_0001 if leaf <= max_extended => {
                let h = host.cpuid(leaf, 0);
                // All of EDX (SYSCALL, NX, 1 GiB pages, LM, ...) but RDTSCP
                // when the backend does not run it.
                let edx = if f.rdtscp {
                    h.edx
                } else {
                    h.edx & !E1_EDX_RDTSCP
                };
                CpuidResult {
                    ecx: h.ecx & E1_ECX_KEEP,
                    edx,
                    ..h
                }
            }
            0x8000_0002..=0x8000_0006 if leaf <= max_extended => host.cpuid(leaf, 0),
            // Invariant TSC only.
            0x8000_0007 if leaf <= max_extended => CpuidResult {
                edx: host.cpuid(leaf, 0).edx & 1 << 8,
                ..zero
            },
            0x8000_0008 if leaf <= max_extended => {
                let h = host.cpuid(leaf, 0);
                CpuidResult {
                    eax: h.eax & 0xFFFF,
                    ecx: (vcpus.min(256) - 1) | (32 - (vcpus - 1).leading_zeros()) << 12,
                    ..zero
                }
            }
            _ => zero,
        }
    }

    /// MAXPHYADDR the guest sees (CPUID 0x8000_0008 EAX bits 7:0, 36 without).
    pub fn phys_addr_bits(&self, host: &dyn HostCpuid) -> u8 {
        if host.cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
            host.cpuid(0x8000_0008, 0).eax as u8
        } else {
            36
        }
    }
}

/// Why XSETBV faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XsetbvFault {
    /// #GP(0).
    GeneralProtection,
}

/// XSETBV's checks past the ones the CPU makes before the VM exit (CPL 0,
/// CR4.OSXSAVE): ECX selects XCR0 only (RCX bits 63:32 ignored), x87 state
/// stays on, AVX needs SSE, AVX-512 needs AVX and all three of its
/// components, nothing outside `supported` (SDM Vol. 1, 13.3).
pub fn check_xsetbv(ecx: u64, value: u64, supported: u64) -> Result<(), XsetbvFault> {
    let fault = Err(XsetbvFault::GeneralProtection);
    if ecx as u32 != 0 || value & 1 == 0 || value & !supported != 0 {
        return fault;
    }
    if value & 0x4 != 0 && value & 0x2 == 0 {
        return fault;
    }
    let avx512 = value & 0xE0;
    if avx512 != 0 && (avx512 != 0xE0 || value & 0x4 == 0) {
        return fault;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod fake {
    use super::{CpuidResult, HostCpuid};

    /// A Haswell-like host (Bochs' corei7_haswell_4770 answers close to
    /// this): VMX, x2APIC, TSC-deadline, XSAVE with x87/SSE/AVX, 4 logical
    /// CPUs.
    pub struct FakeHost;

    impl HostCpuid for FakeHost {
        fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
            let r = |eax, ebx, ecx, edx| CpuidResult { eax, ebx, ecx, edx };
            match (leaf, subleaf) {
                (0, _) => r(
                    0xD,
                    u32::from_le_bytes(*b"Genu"),
                    u32::from_le_bytes(*b"ntel"),
                    u32::from_le_bytes(*b"ineI"),
                ),
                (1, _) => r(0x306C3, 0x0410_0800, 0x7FFA_FBFF, 0xBFEB_FBFF),
                (4, 0) => r(0x1C00_4121, 0x01C0_003F, 0x3F, 0),
                (4, 3) => r(0x1C03_C163, 0x03C0_003F, 0x1FFF, 6),
                (4, _) => r(0, 0, 0, 0),
                (5, _) => r(0x40, 0x40, 3, 0x1120),
                (6, _) => r(0x77, 2, 9, 0),
                (7, 0) => r(0, 0x27AB, 0, 0x9C00_0400),
                (0xD, 0) => r(7, 0x340, 0x340, 0),
                (0xD, 1) => r(1, 0, 0, 0),
                (0xD, 2) => r(0x100, 0x240, 0, 0),
                (0x8000_0000, _) => r(0x8000_0008, 0, 0, 0),
                (0x8000_0001, _) => r(0, 0, 0x21, 0x2C10_0800),
                (0x8000_0008, _) => r(0x3027, 0, 0, 0),
                _ => r(0, 0, 0, 0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeHost;
    use super::*;

    fn state(apic_id: u32) -> VcpuCpuidState {
        VcpuCpuidState {
            apic_id,
            apic_enabled: true,
            cr4: 0,
            xcr0: 1,
        }
    }

    fn policy() -> CpuidPolicy {
        CpuidPolicy::new(GuestFeatures::new(3))
    }

    #[test]
    fn leaf_1_offers_the_apic_features_and_hides_vmx() {
        let r = policy().query(&FakeHost, 1, 0, state(2));
        assert_eq!(r.ebx >> 24, 2, "initial APIC ID");
        assert_eq!(
            (r.ebx >> 16) & 0xFF,
            4,
            "logical processors, rounded to a power of two"
        );
        assert_ne!(r.ecx & L1_ECX_X2APIC, 0);
        assert_ne!(r.ecx & L1_ECX_TSC_DEADLINE, 0);
        assert_ne!(r.ecx & L1_ECX_HYPERVISOR, 0);
        assert_eq!(r.ecx & (1 << 5), 0, "no VMX");
        assert_eq!(r.ecx & (1 << 3), 0, "no MONITOR");
        assert_eq!(r.ecx & (1 << 15), 0, "no PDCM");
        assert_ne!(r.edx & L1_EDX_APIC, 0);
        assert_eq!(r.edx & (1 << 12), 0, "no MTRR");
        assert_eq!(r.edx & (1 << 14), 0, "no MCA");
        assert_ne!(r.edx & (1 << 28), 0, "HTT with several vCPUs");
        // Without x2APIC and TSC-deadline (kvm-unit-tests' xapic entry).
        let mut features = GuestFeatures::new(1);
        features.x2apic = false;
        features.tsc_deadline = false;
        let r = CpuidPolicy::new(features).query(&FakeHost, 1, 0, state(0));
        assert_eq!(r.ecx & (L1_ECX_X2APIC | L1_ECX_TSC_DEADLINE), 0);
        assert_eq!(r.edx & L1_EDX_HTT, 0);
        // PCIDs as the host has them, or hidden (kvm-unit-tests' -pcid).
        assert_ne!(r.ecx & L1_ECX_PCID, 0);
        features.pcid = false;
        let r = CpuidPolicy::new(features).query(&FakeHost, 1, 0, state(0));
        assert_eq!(r.ecx & L1_ECX_PCID, 0);
    }

    #[test]
    fn dynamic_bits_follow_guest_state() {
        let p = policy();
        let mut s = state(0);
        assert_eq!(p.query(&FakeHost, 1, 0, s).ecx & L1_ECX_OSXSAVE, 0);
        s.cr4 = CR4_OSXSAVE;
        assert_ne!(p.query(&FakeHost, 1, 0, s).ecx & L1_ECX_OSXSAVE, 0);
        s.apic_enabled = false;
        assert_eq!(
            p.query(&FakeHost, 1, 0, s).edx & L1_EDX_APIC,
            0,
            "CPUID.1:EDX.APIC follows IA32_APIC_BASE.EN"
        );
        // XSAVE size follows XCR0.
        s.xcr0 = 0x3;
        assert_eq!(p.query(&FakeHost, 0xD, 0, s).ebx, 576);
        s.xcr0 = 0x7;
        assert_eq!(p.query(&FakeHost, 0xD, 0, s).ebx, 0x340);
        assert_eq!(p.query(&FakeHost, 0xD, 0, s).ecx, 0x340);
    }

    #[test]
    fn topology_leaves_carry_each_vcpu_s_x2apic_id() {
        let p = policy();
        let smt = p.query(&FakeHost, 0xB, 0, state(2));
        assert_eq!((smt.ebx, smt.ecx >> 8 & 0xFF, smt.edx), (1, 1, 2));
        let core = p.query(&FakeHost, 0xB, 1, state(2));
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8 & 0xFF, core.edx),
            (2, 3, 2, 2)
        );
        let end = p.query(&FakeHost, 0xB, 2, state(2));
        assert_eq!((end.ebx, end.ecx >> 8 & 0xFF, end.edx), (0, 0, 2));
    }

    #[test]
    fn hidden_leaves_and_the_hypervisor_leaf() {
        let p = policy();
        assert_eq!(
            p.query(&FakeHost, 5, 0, state(0)),
            CpuidResult::default(),
            "no MONITOR/MWAIT"
        );
        assert_eq!(
            p.query(&FakeHost, 0xA, 0, state(0)),
            CpuidResult::default(),
            "no PMU"
        );
        assert_eq!(p.query(&FakeHost, 6, 0, state(0)).eax, 1 << 2, "ARAT only");
        let hv = p.query(&FakeHost, 0x4000_0000, 0, state(0));
        let mut sig = Vec::new();
        for word in [hv.ebx, hv.ecx, hv.edx] {
            sig.extend_from_slice(&word.to_le_bytes());
        }
        assert_eq!(sig, HYPERVISOR_SIGNATURE);
        assert_eq!(p.query(&FakeHost, 0, 0, state(0)).eax, 0xD);
        let e1 = p.query(&FakeHost, 0x8000_0001, 0, state(0));
        assert_ne!(e1.edx & (1 << 29), 0, "long mode");
        assert_eq!(e1.ecx & (1 << 2), 0, "no SVM");
        let mut features = GuestFeatures::new(1);
        features.rdtscp = false;
        let e1 = CpuidPolicy::new(features).query(&FakeHost, 0x8000_0001, 0, state(0));
        assert_eq!(e1.edx & E1_EDX_RDTSCP, 0);
        let l7 = p.query(&FakeHost, 7, 0, state(0));
        assert_eq!(
            l7.edx & (1 << 26 | 1 << 27 | 1 << 29),
            0,
            "no speculation-control MSRs"
        );
        assert_ne!(l7.ebx & (1 << 7), 0, "SMEP passes");
        assert_eq!(p.query(&FakeHost, 7, 1, state(0)), CpuidResult::default());
        assert_eq!(p.phys_addr_bits(&FakeHost), 0x27);
    }

    #[test]
    fn xsetbv_rules() {
        let supported = policy().supported_xcr0(&FakeHost);
        assert_eq!(supported, 0x7);
        assert!(check_xsetbv(0, 0x3, supported).is_ok());
        assert!(check_xsetbv(0, 0x7, supported).is_ok());
        assert!(
            check_xsetbv(0xABCD_0000_0000, 0x7, supported).is_ok(),
            "RCX[63:32] ignored"
        );
        let gp = Err(XsetbvFault::GeneralProtection);
        assert_eq!(check_xsetbv(1, 0x3, supported), gp, "only XCR0");
        assert_eq!(check_xsetbv(0, 0x2, supported), gp, "x87 must stay on");
        assert_eq!(check_xsetbv(0, 0x5, supported), gp, "AVX needs SSE");
        assert_eq!(
            check_xsetbv(0, 0x27, supported),
            gp,
            "unsupported component"
        );
        assert_eq!(check_xsetbv(0, 0x27, 0xE7), gp, "AVX-512 all or none");
        assert!(check_xsetbv(0, 0xE7, 0xE7).is_ok());
        assert_eq!(check_xsetbv(0, 0xE3, 0xE7), gp, "AVX-512 needs AVX");
    }
}
