//! VMX exit reasons by name (SDM Appendix C), and their decoding into the
//! backend-neutral [`Exit`].

use hv_core::exits::{CrAccess, CrAccessKind, Exit, IoAccess, StringIoAccess};
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
    /// The guest can take an interrupt.
    InterruptWindow = 7,
    /// The guest can take an NMI.
    NmiWindow = 8,
    /// CPUID.
    Cpuid = 10,
    /// GETSEC.
    Getsec = 11,
    /// HLT.
    Hlt = 12,
    /// INVD.
    Invd = 13,
    /// VMCALL.
    Vmcall = 18,
    /// A VMX instruction other than VMCALL (VMCLEAR to VMXON).
    VmxInstruction = 19,
    /// A control-register access.
    ControlRegister = 28,
    /// IN, OUT, INS, OUTS.
    IoInstruction = 30,
    /// RDMSR.
    Rdmsr = 31,
    /// WRMSR.
    Wrmsr = 32,
    /// The guest's state failed the entry checks.
    InvalidGuestState = 33,
    /// MWAIT.
    Mwait = 36,
    /// MONITOR.
    Monitor = 39,
    /// An EPT violation.
    EptViolation = 48,
    /// INVEPT or INVVPID.
    Invept = 50,
    /// The VMX-preemption timer expired.
    PreemptionTimer = 52,
    /// WBINVD.
    Wbinvd = 54,
    /// XSETBV.
    Xsetbv = 55,
}

impl ExitReason {
    /// The reason of a basic exit number, if the backend knows it.
    pub fn from_basic(basic: u16) -> Option<Self> {
        Some(match basic {
            0 => Self::ExceptionOrNmi,
            1 => Self::ExternalInterrupt,
            2 => Self::TripleFault,
            7 => Self::InterruptWindow,
            8 => Self::NmiWindow,
            10 => Self::Cpuid,
            11 => Self::Getsec,
            12 => Self::Hlt,
            13 => Self::Invd,
            18 => Self::Vmcall,
            19..=27 => Self::VmxInstruction,
            28 => Self::ControlRegister,
            30 => Self::IoInstruction,
            31 => Self::Rdmsr,
            32 => Self::Wrmsr,
            33 => Self::InvalidGuestState,
            36 => Self::Mwait,
            39 => Self::Monitor,
            48 => Self::EptViolation,
            50 | 53 => Self::Invept,
            52 => Self::PreemptionTimer,
            54 => Self::Wbinvd,
            55 => Self::Xsetbv,
            _ => return None,
        })
    }
}

/// Bit 31 of the exit reason: the VM entry failed.
const ENTRY_FAILURE: u64 = 1 << 31;
/// Interruption type NMI in the exit interruption information.
const INTERRUPTION_TYPE_NMI: u64 = 2;
/// Interruption type hardware exception.
const INTERRUPTION_TYPE_HARDWARE_EXCEPTION: u64 = 3;
/// #UD.
const INVALID_OPCODE: u8 = 6;

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
            } else if (info >> 8) & 7 == INTERRUPTION_TYPE_HARDWARE_EXCEPTION
                && info & 0xFF == u64::from(INVALID_OPCODE)
            {
                Exit::InvalidOpcode
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
            let io = IoAccess {
                port: ((qualification >> 16) & 0xFFFF) as u16,
                size: ((qualification & 7) + 1) as u8,
                input: qualification & (1 << 3) != 0,
            };
            if qualification & (1 << 4) == 0 {
                return Exit::Io(io);
            }
            // INS/OUTS: the instruction information names the address size.
            let info = vmcs::read(ro::VMEXIT_INSTRUCTION_INFO);
            Exit::StringIo(StringIoAccess {
                io,
                rep: qualification & (1 << 5) != 0,
                address_size: match (info >> 7) & 7 {
                    0 => 2,
                    1 => 4,
                    _ => 8,
                },
                linear: vmcs::read(ro::GUEST_LINEAR_ADDR),
            })
        }
        ExitReason::InterruptWindow => Exit::InterruptWindow,
        ExitReason::NmiWindow => Exit::NmiWindow,
        ExitReason::Rdmsr => Exit::Rdmsr,
        ExitReason::Wrmsr => Exit::Wrmsr,
        ExitReason::Xsetbv => Exit::Xsetbv,
        ExitReason::Invd | ExitReason::Wbinvd => Exit::CacheFlush,
        ExitReason::Getsec
        | ExitReason::VmxInstruction
        | ExitReason::Mwait
        | ExitReason::Monitor
        | ExitReason::Invept => Exit::UndefinedInstruction,
        ExitReason::ControlRegister => {
            let qualification = vmcs::read(ro::EXIT_QUALIFICATION);
            let gpr = ((qualification >> 8) & 0xF) as u8;
            Exit::ControlRegister(CrAccess {
                cr: (qualification & 0xF) as u8,
                kind: match (qualification >> 4) & 3 {
                    0 => CrAccessKind::Write { gpr },
                    1 => CrAccessKind::Read { gpr },
                    2 => CrAccessKind::Clts,
                    _ => CrAccessKind::Lmsw {
                        value: (qualification >> 16) as u16,
                    },
                },
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
