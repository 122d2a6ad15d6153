//! What a vCPU's exit means, whichever backend (VMX, SVM) took it.
//!
//! A backend decodes its own exit codes into an [`Exit`]; [`dispatch`]
//! decides what to do about it, through the small [`Guest`] and [`Host`]
//! traits, and answers with an [`Action`] the backend carries out. So the
//! decisions are the same on every backend and run in host tests.

use hv_abi::hypercall;

/// The guest registers a VM entry does not switch (the VMCS or VMCB holds
/// the rest). `#[repr(C)]`: the entry stubs address fields by offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
#[allow(missing_docs)]
pub struct GuestRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// A port I/O access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoAccess {
    /// The port.
    pub port: u16,
    /// Bytes: 1, 2 or 4.
    pub size: u8,
    /// IN (true) or OUT.
    pub input: bool,
}

/// A string port I/O access (INS, OUTS), one element per exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StringIoAccess {
    /// The port, size and direction.
    pub io: IoAccess,
    /// With a REP prefix (RCX counts the elements).
    pub rep: bool,
    /// The address size in bytes (2, 4, 8): which part of RSI/RDI/RCX counts.
    pub address_size: u8,
    /// The guest-linear address of the element in memory.
    pub linear: u64,
}

/// How a control register was accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrAccessKind {
    /// MOV to CRn from the general-purpose register `gpr` (0-15, RAX first).
    Write {
        /// The source register.
        gpr: u8,
    },
    /// MOV from CRn to `gpr`.
    Read {
        /// The destination register.
        gpr: u8,
    },
    /// CLTS (CR0.TS cleared).
    Clts,
    /// LMSW with this source operand.
    Lmsw {
        /// The 16-bit operand (only bits 3:0 count).
        value: u16,
    },
}

/// A control-register access that exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrAccess {
    /// Which control register: 0, 3, 4 or 8.
    pub cr: u8,
    /// What was done to it.
    pub kind: CrAccessKind,
}

/// Why a vCPU left guest mode, in the backend's neutral words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A host NMI arrived while the guest ran (the exit swallowed it).
    Nmi,
    /// A host interrupt arrived while the guest ran.
    ExternalInterrupt,
    /// The guest triple-faulted (shutdown).
    TripleFault,
    /// CPUID.
    Cpuid,
    /// HLT.
    Hlt,
    /// VMCALL / VMMCALL.
    Hypercall,
    /// IN or OUT.
    Io(IoAccess),
    /// An access outside the guest's memory map (EPT violation, NPF).
    NestedPageFault {
        /// The guest-physical address.
        gpa: u64,
        /// The backend's qualification bits.
        detail: u64,
    },
    /// The time slice ran out (VMX-preemption timer, or an interrupt the
    /// backend uses as its timer).
    Preempted,
    /// The entry itself failed (VMfail): the guest never ran.
    EntryFailed {
        /// The backend's error number.
        error: u64,
    },
    /// The entry failed on the guest's state.
    InvalidGuestState {
        /// The backend's reason number.
        reason: u64,
    },
    /// An exit nobody handles.
    Unhandled {
        /// The backend's exit code.
        reason: u64,
    },
    /// The guest became interruptible while an interrupt waited (VMX
    /// interrupt-window exiting, SVM VINTR).
    InterruptWindow,
    /// NMI blocking ended while an NMI waited (VMX NMI-window exiting, SVM
    /// IRET interception).
    NmiWindow,
    /// RDMSR (ECX names the MSR).
    Rdmsr,
    /// WRMSR (ECX names it, EDX:EAX is the value).
    Wrmsr,
    /// A control-register access.
    ControlRegister(CrAccess),
    /// XSETBV (ECX names the XCR, EDX:EAX is the value).
    Xsetbv,
    /// INS or OUTS.
    StringIo(StringIoAccess),
    /// An instruction the guest is not offered (VMX and SVM instructions,
    /// MONITOR/MWAIT, GETSEC): the guest gets #UD.
    UndefinedInstruction,
    /// INVD or WBINVD: nothing to do for a guest with coherent memory.
    CacheFlush,
    /// The guest raised #UD, which the backend intercepts (to emulate an
    /// instruction this CPU lacks in the guest's mode: SYSCALL from
    /// compatibility mode on Intel); otherwise it is delivered.
    InvalidOpcode,
}

impl Exit {
    /// A short name, for reports of exits a guest kind does not expect.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Nmi => "nmi",
            Self::ExternalInterrupt => "external_interrupt",
            Self::TripleFault => "triple_fault",
            Self::Cpuid => "cpuid",
            Self::Hlt => "hlt",
            Self::Hypercall => "hypercall",
            Self::Io(_) => "io",
            Self::NestedPageFault { .. } => "nested_page_fault",
            Self::Preempted => "preempted",
            Self::EntryFailed { .. } => "entry_failed",
            Self::InvalidGuestState { .. } => "invalid_guest_state",
            Self::Unhandled { .. } => "unhandled",
            Self::InterruptWindow => "interrupt_window",
            Self::NmiWindow => "nmi_window",
            Self::Rdmsr => "rdmsr",
            Self::Wrmsr => "wrmsr",
            Self::ControlRegister(_) => "control_register",
            Self::Xsetbv => "xsetbv",
            Self::StringIo(_) => "string_io",
            Self::UndefinedInstruction => "undefined_instruction",
            Self::CacheFlush => "cache_flush",
            Self::InvalidOpcode => "invalid_opcode",
        }
    }
}

/// Why a vCPU was stopped for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// It touched memory outside its map.
    NestedPageFault {
        /// The guest-physical address.
        gpa: u64,
        /// The backend's qualification bits.
        detail: u64,
    },
    /// The entry failed (VMfail).
    EntryFailed {
        /// The backend's error number.
        error: u64,
    },
    /// Its state was refused by the entry checks.
    InvalidGuestState {
        /// The backend's reason number.
        reason: u64,
    },
    /// It triple-faulted.
    TripleFault,
    /// An exit nobody handles.
    Unhandled {
        /// The backend's exit code.
        reason: u64,
    },
    /// An exit this kind of guest cannot cause ([`Exit::name`]).
    UnexpectedExit(&'static str),
}

impl Stop {
    /// The report's words for it: kind, guest-physical address (if any),
    /// and the detail number (qualification, error or reason).
    pub fn report(self) -> (&'static str, Option<u64>, u64) {
        match self {
            Self::NestedPageFault { gpa, detail } => ("ept_violation", Some(gpa), detail),
            Self::EntryFailed { error } => ("entry_failed", None, error),
            Self::InvalidGuestState { reason } => ("invalid_guest_state", None, reason),
            Self::TripleFault => ("triple_fault", None, 2),
            Self::Unhandled { reason } => ("unhandled_exit", None, reason),
            Self::UnexpectedExit(_) => ("unexpected_exit", None, 0),
        }
    }
}

/// What the backend does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Re-enter the guest (the slice goes on).
    Resume,
    /// Re-enter later: end this slice (the vCPU yields its core).
    EndSlice,
    /// Run the host's NMI handler now, then resume.
    HostNmi,
    /// Open an interrupt window for pending host interrupts, then resume.
    HostInterrupts,
    /// Stop the vCPU for good.
    Stop(Stop),
    /// The guest asked for a hypervisor crash and the host allows it.
    Crash,
}

/// What a handler may do to the vCPU that exited.
pub trait Guest {
    /// Its registers.
    fn registers(&mut self) -> &mut GuestRegisters;
    /// Moves it past the instruction that exited.
    fn skip_instruction(&mut self);
}

/// What a handler may ask of the hypervisor.
pub trait Host {
    /// The host's CPUID for `leaf`/`subleaf` (EAX, EBX, ECX, EDX).
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// One byte the guest printed.
    fn console(&mut self, byte: u8);
    /// Whether a guest may crash the hypervisor (`crash_hypercall=allow`).
    fn crash_hypercall_allowed(&self) -> bool;
}

/// The debug port the in-tree guest prints on.
pub const DEBUG_PORT: u16 = 0xE9;

/// CPUID leaf 1 ECX: VMX.
const CPUID_1_ECX_VMX: u32 = 1 << 5;
/// CPUID leaf 1 ECX: running under a hypervisor.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID 0x8000_0001 ECX: SVM.
const CPUID_80000001_ECX_SVM: u32 = 1 << 2;

/// What CPUID says to a guest: the host's answer, without VMX or SVM
/// (no nested virtualization), with the hypervisor bit set.
pub fn guest_cpuid(host: [u32; 4], leaf: u32) -> [u32; 4] {
    let [eax, ebx, mut ecx, edx] = host;
    match leaf {
        1 => ecx = (ecx & !CPUID_1_ECX_VMX) | CPUID_1_ECX_HYPERVISOR,
        0x8000_0001 => ecx &= !CPUID_80000001_ECX_SVM,
        _ => {}
    }
    [eax, ebx, ecx, edx]
}

/// Decides what to do about `exit`; handles what it can on the spot.
pub fn dispatch(exit: Exit, guest: &mut impl Guest, host: &mut impl Host) -> Action {
    match exit {
        Exit::Nmi => Action::HostNmi,
        Exit::ExternalInterrupt => Action::HostInterrupts,
        Exit::TripleFault => Action::Stop(Stop::TripleFault),
        Exit::Cpuid => {
            let registers = guest.registers();
            let (leaf, subleaf) = (registers.rax as u32, registers.rcx as u32);
            let [eax, ebx, ecx, edx] = guest_cpuid(host.cpuid(leaf, subleaf), leaf);
            registers.rax = u64::from(eax);
            registers.rbx = u64::from(ebx);
            registers.rcx = u64::from(ecx);
            registers.rdx = u64::from(edx);
            guest.skip_instruction();
            Action::Resume
        }
        Exit::Hlt => {
            guest.skip_instruction();
            Action::EndSlice
        }
        Exit::Hypercall => {
            let action = hypercall(guest.registers(), host);
            if action == Action::Resume {
                guest.skip_instruction();
            }
            action
        }
        Exit::Io(access) => {
            port_io(access, guest.registers(), host);
            guest.skip_instruction();
            Action::Resume
        }
        Exit::NestedPageFault { gpa, detail } => {
            Action::Stop(Stop::NestedPageFault { gpa, detail })
        }
        Exit::Preempted => Action::EndSlice,
        Exit::EntryFailed { error } => Action::Stop(Stop::EntryFailed { error }),
        Exit::InvalidGuestState { reason } => Action::Stop(Stop::InvalidGuestState { reason }),
        Exit::Unhandled { reason } => Action::Stop(Stop::Unhandled { reason }),
        // The in-tree guest reads no MSR, touches no control register and
        // is never offered an event: these exits mean it went astray.
        Exit::InterruptWindow
        | Exit::NmiWindow
        | Exit::Rdmsr
        | Exit::Wrmsr
        | Exit::ControlRegister(_)
        | Exit::Xsetbv
        | Exit::StringIo(_)
        | Exit::UndefinedInstruction
        | Exit::CacheFlush
        | Exit::InvalidOpcode => Action::Stop(Stop::UnexpectedExit(exit.name())),
    }
}

/// Hypercalls: EAX selects, EBX carries the argument; EAX returns 0, or
/// [`hypercall::UNKNOWN`] for an unknown call or a bad argument.
fn hypercall(registers: &mut GuestRegisters, host: &mut impl Host) -> Action {
    let argument = registers.rbx;
    registers.rax = match registers.rax & 0xFFFF_FFFF {
        hypercall::YIELD => 0,
        hypercall::CRASH if host.crash_hypercall_allowed() => return Action::Crash,
        hypercall::PRINT if argument <= 0xFF => {
            host.console(argument as u8);
            0
        }
        _ => hypercall::UNKNOWN,
    };
    Action::Resume
}

/// Port I/O of the in-tree guest: the debug port prints; every input reads
/// all ones, like an empty bus.
fn port_io(access: IoAccess, registers: &mut GuestRegisters, host: &mut impl Host) {
    if access.input {
        let mask = (1u64 << (u64::from(access.size) * 8)) - 1;
        registers.rax = (registers.rax & !mask) | mask;
    } else if access.port == DEBUG_PORT && access.size == 1 {
        host.console(registers.rax as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeGuest {
        registers: GuestRegisters,
        skipped: u32,
    }

    impl Guest for FakeGuest {
        fn registers(&mut self) -> &mut GuestRegisters {
            &mut self.registers
        }
        fn skip_instruction(&mut self) {
            self.skipped += 1;
        }
    }

    #[derive(Default)]
    struct FakeHost {
        printed: Vec<u8>,
        allow_crash: bool,
    }

    impl Host for FakeHost {
        fn cpuid(&mut self, leaf: u32, _: u32) -> [u32; 4] {
            [leaf, 0, u32::MAX, 0]
        }
        fn console(&mut self, byte: u8) {
            self.printed.push(byte);
        }
        fn crash_hypercall_allowed(&self) -> bool {
            self.allow_crash
        }
    }

    #[test]
    fn cpuid_hides_vmx_and_svm_and_says_hypervisor() {
        let mut guest = FakeGuest::default();
        let mut host = FakeHost::default();
        guest.registers.rax = 1;
        assert_eq!(dispatch(Exit::Cpuid, &mut guest, &mut host), Action::Resume);
        assert_eq!(guest.registers.rcx as u32 & CPUID_1_ECX_VMX, 0);
        assert_ne!(guest.registers.rcx as u32 & CPUID_1_ECX_HYPERVISOR, 0);
        assert_eq!(guest.skipped, 1);
        guest.registers.rax = 0x8000_0001;
        dispatch(Exit::Cpuid, &mut guest, &mut host);
        assert_eq!(guest.registers.rcx as u32 & CPUID_80000001_ECX_SVM, 0);
    }

    #[test]
    fn hypercalls_print_yield_and_refuse_unknown_calls() {
        let mut guest = FakeGuest::default();
        let mut host = FakeHost::default();
        guest.registers.rax = hypercall::PRINT;
        guest.registers.rbx = u64::from(b'x');
        assert_eq!(
            dispatch(Exit::Hypercall, &mut guest, &mut host),
            Action::Resume
        );
        assert_eq!(host.printed, b"x");
        assert_eq!(guest.registers.rax, 0);
        guest.registers.rax = hypercall::PRINT;
        guest.registers.rbx = 0x100;
        dispatch(Exit::Hypercall, &mut guest, &mut host);
        assert_eq!(guest.registers.rax, hypercall::UNKNOWN, "not one byte");
        guest.registers.rax = 0x77;
        dispatch(Exit::Hypercall, &mut guest, &mut host);
        assert_eq!(guest.registers.rax, hypercall::UNKNOWN);
        assert_eq!(guest.skipped, 3);
    }

    #[test]
    fn the_crash_hypercall_needs_permission() {
        let mut guest = FakeGuest::default();
        let mut host = FakeHost::default();
        guest.registers.rax = hypercall::CRASH;
        assert_eq!(
            dispatch(Exit::Hypercall, &mut guest, &mut host),
            Action::Resume
        );
        assert_eq!(guest.registers.rax, hypercall::UNKNOWN);
        host.allow_crash = true;
        guest.registers.rax = hypercall::CRASH;
        assert_eq!(
            dispatch(Exit::Hypercall, &mut guest, &mut host),
            Action::Crash
        );
        assert_eq!(guest.skipped, 1, "a crash does not move the guest on");
    }

    #[test]
    fn port_input_reads_all_ones_of_its_size_and_output_prints() {
        let mut guest = FakeGuest::default();
        let mut host = FakeHost::default();
        guest.registers.rax = 0x1234_5678_0000_0000;
        let input = IoAccess {
            port: 0x60,
            size: 2,
            input: true,
        };
        dispatch(Exit::Io(input), &mut guest, &mut host);
        assert_eq!(guest.registers.rax, 0x1234_5678_0000_FFFF);
        guest.registers.rax = u64::from(b'!');
        let out = IoAccess {
            port: DEBUG_PORT,
            size: 1,
            input: false,
        };
        dispatch(Exit::Io(out), &mut guest, &mut host);
        assert_eq!(host.printed, b"!");
    }

    #[test]
    fn faults_and_failures_stop_the_vcpu() {
        let mut guest = FakeGuest::default();
        let mut host = FakeHost::default();
        assert_eq!(
            dispatch(
                Exit::NestedPageFault {
                    gpa: 0x4000_0000,
                    detail: 0x181
                },
                &mut guest,
                &mut host
            ),
            Action::Stop(Stop::NestedPageFault {
                gpa: 0x4000_0000,
                detail: 0x181
            })
        );
        assert_eq!(
            dispatch(Exit::TripleFault, &mut guest, &mut host),
            Action::Stop(Stop::TripleFault)
        );
        assert_eq!(Stop::TripleFault.report().0, "triple_fault");
        assert_eq!(dispatch(Exit::Hlt, &mut guest, &mut host), Action::EndSlice);
        assert_eq!(dispatch(Exit::Nmi, &mut guest, &mut host), Action::HostNmi);
        assert_eq!(guest.skipped, 1, "only HLT moved on");
        assert_eq!(
            dispatch(Exit::Rdmsr, &mut guest, &mut host),
            Action::Stop(Stop::UnexpectedExit("rdmsr"))
        );
        assert_eq!(Stop::UnexpectedExit("rdmsr").report().0, "unexpected_exit");
    }
}
