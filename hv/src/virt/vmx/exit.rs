//! VMX exit reasons by name (SDM Appendix C), and their decoding into the
//! backend-neutral [`Exit`].

use hv_core::exits::{Exit, IoAccess};
use x86::vmx::vmcs::ro;

use super::vmcs;

/// The basic exit reasons the VMX backend meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ExitReason {
    /// An exception or NMI (the interruption information says which).
    ExceptionOrNmi = 0,
    /// An external interrupt.
    ExternalInterrupt = 1,
    /// A triple fault.
    TripleFault = 2,
    /// CPUID.
    Cpuid = 10,
    /// HLT.
    Hlt = 12,
    /// VMCALL.
    Vmcall = 18,
    /// IN, OUT, INS, OUTS.
    IoInstruction = 30,
    /// The guest's state failed the entry checks.
    InvalidGuestState = 33,
    /// An EPT violation.
    EptViolation = 48,
    /// The VMX-preemption timer expired.
    PreemptionTimer = 52,
}

impl ExitReason {
    /// The reason of a basic exit number, if the backend knows it.
    pub fn from_basic(basic: u16) -> Option<Self> {
        Some(match basic {
            0 => Self::ExceptionOrNmi,
            1 => Self::ExternalInterrupt,
            2 => Self::TripleFault,
            10 => Self::Cpuid,
            12 => Self::Hlt,
            18 => Self::Vmcall,
            30 => Self::IoInstruction,
            33 => Self::InvalidGuestState,
            48 => Self::EptViolation,
            52 => Self::PreemptionTimer,
            _ => return None,
        })
    }
}

/// Bit 31 of the exit reason: the VM entry failed.
const ENTRY_FAILURE: u64 = 1 << 31;
/// Interruption type NMI in the exit interruption information.
const INTERRUPTION_TYPE_NMI: u64 = 2;

/// Decodes the exit that just happened on the current VMCS.
pub fn decode() -> Exit {
    let raw = vmcs::read(ro::EXIT_REASON);
    let basic = (raw & 0xFFFF) as u16;
    if raw & ENTRY_FAILURE != 0 {
        return Exit::InvalidGuestState {
            reason: u64::from(basic),
        };
    }
    let Some(reason) = ExitReason::from_basic(basic) else {
        return Exit::Unhandled {
            reason: u64::from(basic),
        };
    };
    match reason {
        ExitReason::ExceptionOrNmi => {
            let info = vmcs::read(ro::VMEXIT_INTERRUPTION_INFO);
            if (info >> 8) & 7 == INTERRUPTION_TYPE_NMI {
                Exit::Nmi
            } else {
                Exit::Unhandled {
                    reason: u64::from(basic),
                }
            }
        }
        ExitReason::ExternalInterrupt => Exit::ExternalInterrupt,
        ExitReason::TripleFault => Exit::TripleFault,
        ExitReason::Cpuid => Exit::Cpuid,
        ExitReason::Hlt => Exit::Hlt,
        ExitReason::Vmcall => Exit::Hypercall,
        ExitReason::IoInstruction => {
            let qualification = vmcs::read(ro::EXIT_QUALIFICATION);
            Exit::Io(IoAccess {
                port: ((qualification >> 16) & 0xFFFF) as u16,
                size: ((qualification & 7) + 1) as u8,
                input: qualification & (1 << 3) != 0,
            })
        }
        ExitReason::InvalidGuestState => Exit::InvalidGuestState {
            reason: u64::from(basic),
        },
        ExitReason::EptViolation => Exit::NestedPageFault {
            gpa: vmcs::read(ro::GUEST_PHYSICAL_ADDR_FULL),
            detail: vmcs::read(ro::EXIT_QUALIFICATION),
        },
        ExitReason::PreemptionTimer => Exit::Preempted,
    }
}
