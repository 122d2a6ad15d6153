//! Architectural register states the platform asks the kernel to load into a
//! vCPU: the multiboot entry state of the boot vCPU and the real-mode state
//! an application processor starts in after INIT and SIPI.
//!
//! Segment attributes are kept in the architectural descriptor layout
//! (type, S, DPL, P, AVL, L, D/B, G) and converted to each backend's format
//! by [`SegmentState::vmx_access_rights`] and [`SegmentState::svm_attributes`].

/// A segment register's hidden state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentState {
    /// Visible selector.
    pub selector: u16,
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity bit).
    pub limit: u32,
    /// Descriptor type (bits 3:0: code/data, accessed, ...).
    pub kind: u8,
    /// Code or data segment (descriptor bit S), not a system segment.
    pub code_or_data: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Present.
    pub present: bool,
    /// 64-bit code segment (L).
    pub long: bool,
    /// Default operation size 32-bit (D/B).
    pub default_32: bool,
    /// Limit counted in 4 KiB units (G).
    pub granular: bool,
}

impl SegmentState {
    /// A flat 4 GiB 32-bit code segment, execute/read, accessed.
    pub const fn flat_code32(selector: u16) -> Self {
        Self {
            selector,
            base: 0,
            limit: 0xFFFF_FFFF,
            kind: 0xB,
            code_or_data: true,
            dpl: 0,
            present: true,
            long: false,
            default_32: true,
            granular: true,
        }
    }

    /// A flat 4 GiB 32-bit data segment, read/write, accessed.
    pub const fn flat_data32(selector: u16) -> Self {
        Self {
            kind: 0x3,
            ..Self::flat_code32(selector)
        }
    }

    /// A real-mode segment as INIT leaves it: `base = selector << 4`,
    /// 64 KiB limit, present, accessed; `code` picks execute/read.
    pub const fn real_mode(selector: u16, base: u64, code: bool) -> Self {
        Self {
            selector,
            base,
            limit: 0xFFFF,
            kind: if code { 0xB } else { 0x3 },
            code_or_data: true,
            dpl: 0,
            present: true,
            long: false,
            default_32: false,
            granular: false,
        }
    }

    /// Attributes in the VMCS access-rights layout (SDM Vol. 3, 25.4.1):
    /// type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15.
    pub const fn vmx_access_rights(&self) -> u32 {
        (self.kind as u32 & 0xF)
            | (self.code_or_data as u32) << 4
            | (self.dpl as u32 & 3) << 5
            | (self.present as u32) << 7
            | (self.long as u32) << 13
            | (self.default_32 as u32) << 14
            | (self.granular as u32) << 15
    }

    /// Attributes in the VMCB layout (AMD APM Vol. 2, 15.5.1): the same
    /// bits with 11:8 of the descriptor packed down to 11:8 of the field.
    pub const fn svm_attributes(&self) -> u16 {
        let ar = self.vmx_access_rights();
        ((ar & 0xFF) | ((ar >> 4) & 0xF00)) as u16
    }
}

/// The state multiboot1 hands a kernel: 32-bit protected mode, paging off,
/// EAX = the bootloader magic, EBX = the multiboot information structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootEntryState {
    /// Entry point.
    pub eip: u32,
    /// `0x2BADB002`.
    pub eax: u32,
    /// Guest-physical address of the multiboot information structure.
    pub ebx: u32,
    /// PE and ET; PG clear.
    pub cr0: u32,
    /// Only the reserved bit 1: IF and VM clear.
    pub eflags: u32,
    /// CS: flat 32-bit code.
    pub cs: SegmentState,
    /// DS, ES, FS, GS, SS: flat 32-bit data.
    pub data: SegmentState,
}

/// The state an application processor starts in on a SIPI (SDM Vol. 3,
/// 9.4.4 and table 10-1): real mode at `vector << 12`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SipiStartState {
    /// CS: selector `vector << 8`, base `vector << 12`.
    pub cs: SegmentState,
    /// DS, ES, FS, GS, SS: selector 0, base 0, 64 KiB.
    pub data: SegmentState,
    /// IP 0.
    pub rip: u64,
    /// `0x6000_0010` (CD, NW, ET) as after INIT. A backend that cannot run
    /// with caching disabled may clear CD and NW.
    pub cr0: u64,
    /// Only the reserved bit 1.
    pub rflags: u64,
    /// The processor signature (CPUID.1:EAX), as after INIT.
    pub edx: u64,
}

impl SipiStartState {
    /// The state for start-up vector `vector`.
    pub const fn new(vector: u8, signature: u32) -> Self {
        let selector = (vector as u16) << 8;
        Self {
            cs: SegmentState::real_mode(selector, (vector as u64) << 12, true),
            data: SegmentState::real_mode(0, 0, false),
            rip: 0,
            cr0: 0x6000_0010,
            rflags: 0x2,
            edx: signature as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_segments_have_the_architectural_access_rights() {
        // The values every VMX guest setup uses: 0xC09B and 0xC093.
        assert_eq!(SegmentState::flat_code32(8).vmx_access_rights(), 0xC09B);
        assert_eq!(SegmentState::flat_data32(16).vmx_access_rights(), 0xC093);
        assert_eq!(SegmentState::flat_code32(8).svm_attributes(), 0xC9B);
        assert_eq!(
            SegmentState::real_mode(0, 0, true).vmx_access_rights(),
            0x9B
        );
        assert_eq!(SegmentState::real_mode(0, 0, false).svm_attributes(), 0x93);
    }

    #[test]
    fn sipi_state_starts_at_the_vector_page() {
        let s = SipiStartState::new(0x9A, 0x806F8);
        assert_eq!(s.cs.selector, 0x9A00);
        assert_eq!(s.cs.base, 0x9A000);
        assert_eq!(s.rip, 0);
        assert_eq!(s.edx, 0x806F8);
    }
}
