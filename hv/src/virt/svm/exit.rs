//! SVM exit codes by name (AMD APM volume 2, appendix C), and their
//! decoding into the backend-neutral [`Exit`].

use hv_core::exits::{Exit, IoAccess};

use super::vmcb;

/// The exit codes the SVM backend meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum ExitCode {
    /// A host interrupt (INTR intercept).
    Intr = 0x60,
    /// A host NMI (NMI intercept); it is still pending, and is delivered
    /// to the host's handler at STGI.
    Nmi = 0x61,
    /// CPUID.
    Cpuid = 0x72,
    /// HLT.
    Hlt = 0x78,
    /// IN, OUT, INS, OUTS (IOIO intercept).
    Ioio = 0x7B,
    /// RDMSR or WRMSR (MSR intercept).
    Msr = 0x7C,
    /// Shutdown: the guest triple-faulted.
    Shutdown = 0x7F,
    /// VMRUN (always intercepted).
    Vmrun = 0x80,
    /// VMMCALL: the hypercall.
    Vmmcall = 0x81,
    /// A nested page fault.
    NestedPageFault = 0x400,
    /// VMRUN refused the guest's state (VMEXIT_INVALID, -1).
    Invalid = u64::MAX,
}

impl ExitCode {
    /// The code's name, if the backend knows it.
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            0x60 => Self::Intr,
            0x61 => Self::Nmi,
            0x72 => Self::Cpuid,
            0x78 => Self::Hlt,
            0x7B => Self::Ioio,
            0x7C => Self::Msr,
            0x7F => Self::Shutdown,
            0x80 => Self::Vmrun,
            0x81 => Self::Vmmcall,
            0x400 => Self::NestedPageFault,
            u64::MAX => Self::Invalid,
            _ => return None,
        })
    }
}

/// IOIO exit information 1: IN (else OUT).
const IOIO_IN: u64 = 1 << 0;
/// IOIO exit information 1: a string instruction (INS, OUTS).
const IOIO_STRING: u64 = 1 << 2;

/// Decodes the exit that just happened on `vmcb`. `slice_over`: the slice
/// timer has expired, so a host-interrupt exit is the end of the slice.
pub fn decode(vmcb: u64, slice_over: bool) -> Exit {
    let raw = vmcb::read_u64(vmcb, vmcb::EXIT_CODE);
    let Some(code) = ExitCode::from_raw(raw) else {
        return Exit::Unhandled { reason: raw };
    };
    match code {
        ExitCode::Intr if slice_over => Exit::Preempted,
        ExitCode::Intr => Exit::ExternalInterrupt,
        ExitCode::Nmi => Exit::Nmi,
        ExitCode::Cpuid => Exit::Cpuid,
        ExitCode::Hlt => Exit::Hlt,
        ExitCode::Vmmcall => Exit::Hypercall,
        ExitCode::Ioio => {
            let info = vmcb::read_u64(vmcb, vmcb::EXIT_INFO1);
            if info & IOIO_STRING != 0 {
                return Exit::Unhandled { reason: raw };
            }
            // SZ8, SZ16, SZ32 in bits 4 to 6.
            let size = match (info >> 4) & 0b111 {
                0b001 => 1,
                0b010 => 2,
                _ => 4,
            };
            Exit::Io(IoAccess {
                port: ((info >> 16) & 0xFFFF) as u16,
                size,
                input: info & IOIO_IN != 0,
            })
        }
        ExitCode::Shutdown => Exit::TripleFault,
        ExitCode::NestedPageFault => Exit::NestedPageFault {
            gpa: vmcb::read_u64(vmcb, vmcb::EXIT_INFO2),
            detail: vmcb::read_u64(vmcb, vmcb::EXIT_INFO1),
        },
        ExitCode::Invalid => Exit::InvalidGuestState { reason: raw },
        ExitCode::Msr | ExitCode::Vmrun => Exit::Unhandled { reason: raw },
    }
}

/// Length of the instruction that exited, for a CPU without NRIP save:
/// the instruction intercepts the backend resumes after.
pub fn instruction_length(code: Option<ExitCode>) -> u64 {
    match code {
        Some(ExitCode::Cpuid) => 2,
        Some(ExitCode::Hlt) => 1,
        Some(ExitCode::Vmmcall) => 3,
        _ => 0,
    }
}
