//! Virtualization: guests on every core, behind one [`Backend`] trait.
//!
//! - [`vmx`]: the VMX backend (VMCS, EPT).
//! - [`svm`]: the SVM backend (VMCB, nested paging, ASIDs), chosen at run
//!   time where the CPU has SVM and no VMX ([`select`]).
//! - [`vcpu`]: the vCPUs and their contexts.
//! - [`sched`]: the run queue that moves vCPUs between cores every slice,
//!   with the loaded-VMCS list protocol (`crash::records`) on every move.
//! - [`test_guest`]: the in-tree guest.
//! - [`guest`]: guests that are real kernels (multiboot1 modules, such as
//!   kvm-unit-tests) on a virtual platform of their own (`hv_devices`),
//!   through [`PlatformBackend`].
//!
//! What an exit means is decided by `hv_core::exits`, the same for every
//! backend and host-tested; this layer carries the decision out.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hv_core::exits::{Exit, GuestRegisters};
use hv_devices::cpu_state::{MultibootEntryState, SegmentState, SipiStartState};
use hv_devices::cpuid::GuestFeatures;
use hv_devices::msr::GuestStateMsr;
use hv_devices::platform::InterruptState;
use smp_boot::madt::MAX_CPUS;

use crate::boot::info::BootInfo;

pub mod guest;
pub mod sched;
pub mod svm;
pub mod test_guest;
pub mod vcpu;
pub mod vmx;

/// A vCPU's hardware context: the one page the hardware keeps its state in
/// (a VMCS, a VMCB) and the root of its nested page tables.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// Physical address of the VMCS or VMCB.
    pub page: u64,
    /// The EPT pointer or nested CR3.
    pub nested_root: u64,
}

/// What the scheduler needs of a virtualization backend. All of it runs
/// on the CPU it concerns, with interrupts off, on the context that is
/// current there.
pub trait Backend {
    /// The name in reports (`virt.backend`): "vmx", "svm".
    const NAME: &'static str;
    /// Whether a host NMI that made a guest exit is still pending after
    /// the exit and reaches the host's handler by itself once the backend
    /// unblocks it (SVM: at STGI, inside [`enter`](Self::enter)); else
    /// the exit swallowed it and the scheduler runs the handler (VMX).
    const NMI_DELIVERED_AFTER_EXIT: bool = false;
    /// The report's word for a guest stopped by a nested page fault.
    const NESTED_PAGE_FAULT: &'static str = "ept_violation";
    /// The backend's platform-guest entry points, if it has the glue to
    /// run real guest kernels ([`PlatformBackend`]); `None`: only the
    /// in-tree guest runs on it.
    const PLATFORM: Option<PlatformOps> = None;
    /// Why guests cannot run.
    type Error: core::fmt::Display + core::fmt::Debug + Copy;
    /// The instructions that make a context current on a CPU and clear it
    /// again, for the loaded-context list protocol.
    type Instructions: crash::loaded_vmcs::Vmx + Default;
    /// Whether this machine can run guests with this backend.
    fn check() -> Result<(), Self::Error>;
    /// Enables the backend on this CPU; returns its per-CPU region.
    fn enable_on_this_cpu() -> Result<u64, Self::Error>;
    /// A new context for a guest whose memory is `memory_bytes` at host
    /// physical `memory`.
    fn new_context(memory: u64, memory_bytes: u64) -> Result<Context, Self::Error>;
    /// Fills in the current context's controls and guest state: the guest
    /// starts at `rip` with stack `rsp`.
    fn init_guest(context: &Context, rip: u64, rsp: u64);
    /// Writes this CPU's host state into the current context (after it
    /// became current on this CPU).
    fn refresh_host_state();
    /// Runs the guest of the current context until its next exit, for at
    /// most about `slice_us`.
    fn enter(registers: &mut GuestRegisters, launched: bool, slice_us: u64) -> Exit;
    /// Moves the guest past the instruction that exited.
    fn skip_instruction();
    /// The guest's instruction pointer.
    fn guest_rip() -> u64;
}

/// An event to deliver to a guest at its next entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// A non-maskable interrupt.
    Nmi,
    /// An external interrupt with this vector.
    Interrupt(u8),
    /// A hardware exception (#GP, #UD, ...), with its error code if it has one.
    Exception {
        /// The vector (0 to 31).
        vector: u8,
        /// The error code pushed with it.
        error_code: Option<u32>,
    },
}

/// #UD.
pub const INVALID_OPCODE: u8 = 6;
/// #GP.
pub const GENERAL_PROTECTION: u8 = 13;

/// A guest instruction faults: the backend injects the exception and does
/// not move the guest on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault(pub Injection);

impl Fault {
    /// #GP(0).
    pub const GP: Self = Self(Injection::Exception {
        vector: GENERAL_PROTECTION,
        error_code: Some(0),
    });
    /// #UD.
    pub const UD: Self = Self(Injection::Exception {
        vector: INVALID_OPCODE,
        error_code: None,
    });
}

/// The part of a vCPU's architectural state the platform glue reads at an
/// exit (CPUID, MMIO decoding, string I/O).
#[derive(Debug, Clone, Copy, Default)]
pub struct VcpuState {
    /// RIP.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CR0 as the guest sees it.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 as the guest sees it.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// CS base.
    pub cs_base: u64,
    /// CS.L (64-bit code).
    pub cs_long: bool,
    /// CS.D (32-bit default operand size).
    pub cs_default32: bool,
}

/// A CR0 write that turned on PAE paging outside long mode: the glue
/// loads the four PDPTEs from guest memory at CR3 ([`PlatformBackend::set_pdptes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedPdptes;

/// What the platform glue (`guest`) needs of a backend beyond [`Backend`],
/// to run a real guest kernel on its virtual platform. Backend-neutral:
/// VMX implements it over the VMCS, SVM over the VMCB.
///
/// Everything acts on the current context of the calling CPU, with
/// interrupts off, like [`Backend`]; the exit handlers in `guest` call it
/// in the order the crate docs of `hv_devices` describe.
pub trait PlatformBackend: Backend {
    /// Nested page tables that map guest-physical `[0, bytes)` to the host
    /// memory at `memory` (2 MiB aligned) and nothing else; returns their
    /// root (the EPT pointer or nested CR3), shared by the guest's vCPUs.
    fn new_guest_memory(memory: u64, bytes: u64) -> Result<u64, Self::Error>;
    /// A context for one vCPU of a guest whose memory is `nested_root`,
    /// and the vCPU's auxiliary page: backend memory beyond the context
    /// page (VMX: the MSR area switched on entry and exit), 0 if none.
    fn new_platform_vcpu(nested_root: u64) -> Result<(Context, u64), Self::Error>;
    /// Fills in the current context's controls for a platform guest, with
    /// the CPU features its CPUID offers; the guest state is loaded after
    /// ([`Self::load_multiboot_entry`], [`Self::load_sipi_start`]).
    fn init_platform_vcpu(context: &Context, aux: u64, features: &GuestFeatures);
    /// Loads the multiboot1 entry state (the boot vCPU); GPRs are the
    /// glue's.
    fn load_multiboot_entry(state: &MultibootEntryState);
    /// Loads the real-mode state of an AP after INIT and SIPI, and forgets
    /// any event being injected.
    fn load_sipi_start(state: &SipiStartState);
    /// The guest's state.
    fn state() -> VcpuState;
    /// Sets RIP.
    fn set_rip(rip: u64);
    /// Sets RSP (the GPR the glue's register file does not hold).
    fn set_rsp(rsp: u64);
    /// Moves the guest past the instruction that exited, and clears the
    /// interrupt shadow of STI or MOV SS, as executing it would have.
    fn complete_instruction();
    /// Clears the interrupt shadow of STI or MOV SS (after the glue moved
    /// RIP past an instruction it emulated itself).
    fn clear_interrupt_shadow();
    /// Interruptibility for the platform's event decision: RFLAGS.IF, STI
    /// and MOV SS shadows, NMI blocking, and whether an event is already
    /// being (re-)injected at the next entry.
    fn interrupt_state() -> InterruptState;
    /// Injects `event` at the next entry.
    fn inject(event: Injection);
    /// Clears the vCPU's NMI blocking: the glue knows no NMI reached it
    /// since it was last unblocked, whatever the CPU reports (Bochs 2.7
    /// carries virtual-NMI blocking from one VMCS to the next on a CPU).
    fn clear_nmi_blocking();
    /// Asks for an exit as soon as the guest can take an interrupt
    /// (`interrupt`) or an NMI (`nmi`), or stops asking.
    fn set_windows(interrupt: bool, nmi: bool);
    /// Sets the guest's TSC offset (guest TSC = host TSC + offset).
    fn set_tsc_offset(offset: u64);
    /// Reads a guest-state MSR the glue intercepts.
    fn read_msr(aux: u64, msr: GuestStateMsr) -> u64;
    /// Writes a guest-state MSR the glue intercepts; `Err` when the value
    /// is not valid for it (#GP).
    fn write_msr(aux: u64, msr: GuestStateMsr, value: u64) -> Result<(), Fault>;
    /// MOV to CR0 (and LMSW): checks, mode switches (long mode on and off).
    fn write_cr0(value: u64) -> Result<Option<NeedPdptes>, Fault>;
    /// MOV to CR4, when the backend intercepts the write.
    fn write_cr4(value: u64) -> Result<Option<NeedPdptes>, Fault>;
    /// MOV from a control register the backend intercepts (0, 3, 4).
    fn read_cr(cr: u8) -> u64;
    /// MOV to CR3, when the backend intercepts it.
    fn write_cr3(value: u64) -> Result<Option<NeedPdptes>, Fault>;
    /// Loads the PAE page-directory pointers for the next entry.
    fn set_pdptes(pdptes: [u64; 4]);
    /// Sets RFLAGS.
    fn set_rflags(rflags: u64);
    /// Loads CS and SS (selector and hidden state), as a far transfer
    /// the glue emulates does (CPL follows SS.DPL).
    fn set_code_and_stack(cs: &SegmentState, ss: &SegmentState);
}

/// The platform-guest entry points of a backend that implements
/// [`PlatformBackend`], as plain functions monomorphized for it
/// ([`PlatformOps::of`]). Code generic over any [`Backend`] (the
/// scheduler, the boot sequence) reaches platform guests through these,
/// so it needs no `PlatformBackend` bound: a backend without platform
/// glue (SVM, for now) has [`Backend::PLATFORM`] `None`.
#[derive(Debug, Clone, Copy)]
pub struct PlatformOps {
    /// Creates the guests the boot modules define (`guest::create_all`).
    pub create_guests:
        fn(boot: &'static BootInfo, options: &hv_core::cmdline::Options) -> guest::Created,
    /// Makes vCPU `number` of guest `guest` (`vcpu::make_platform`).
    pub make_vcpu: fn(guest: usize, number: usize) -> vcpu::Vcpu,
    /// Fills in a platform vCPU's context the first time it is loaded
    /// (`vcpu::init_platform`).
    pub init_vcpu: fn(context: &Context, platform: vcpu::PlatformVcpu),
    /// Runs one slice of platform vCPU `index` (`sched::run_platform_slice`).
    pub run_slice: fn(
        index: usize,
        platform: vcpu::PlatformVcpu,
        local: &mut vcpu::VcpuLocal,
    ) -> sched::SliceEnd,
}

impl PlatformOps {
    /// The entry points of backend `B`.
    pub const fn of<B: PlatformBackend>() -> Self {
        Self {
            create_guests: guest::create_all::<B>,
            make_vcpu: vcpu::make_platform::<B>,
            init_vcpu: vcpu::init_platform::<B>,
            run_slice: sched::run_platform_slice::<B>,
        }
    }
}

/// The backend that runs guests on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selected {
    /// VMX (Intel, Bochs, nested KVM on Intel).
    Vmx,
    /// SVM (AMD, QEMU TCG's `-cpu max`).
    Svm,
}

/// Why no backend runs guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Neither backend can run on this CPU.
    Neither {
        /// Why not VMX.
        vmx: vmx::VmxError,
        /// Why not SVM.
        svm: svm::SvmError,
    },
    /// VMX was chosen but no CPU entered VMX root operation.
    Vmx(vmx::VmxError),
    /// SVM was chosen but no CPU enabled it.
    Svm(svm::SvmError),
}

impl core::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Neither {
                vmx: vmx::VmxError::NotSupported,
                svm: svm::SvmError::NotSupported,
            } => write!(f, "the CPU has neither VMX nor SVM"),
            Self::Neither { vmx, svm } => write!(f, "vmx: {vmx}; svm: {svm}"),
            Self::Vmx(error) => write!(f, "vmx: {error}"),
            Self::Svm(error) => write!(f, "svm: {error}"),
        }
    }
}

/// Chooses the backend from what the CPU offers: VMX wherever it has it,
/// else SVM, else none (then the hypervisor runs without guests).
pub fn select() -> Result<Selected, Unavailable> {
    use vmx::backend::Vmx;
    match <Vmx as Backend>::check() {
        Ok(()) => Ok(Selected::Vmx),
        Err(vmx) => match <svm::backend::Svm as Backend>::check() {
            Ok(()) => Ok(Selected::Svm),
            Err(svm) => Err(Unavailable::Neither { vmx, svm }),
        },
    }
}

/// What the virtualization layer keeps per CPU.
#[derive(Debug)]
pub struct VirtCpu {
    /// Whether the backend is enabled on this CPU (VMX root operation,
    /// EFER.SVME).
    pub enabled: AtomicBool,
    /// The backend's per-CPU region (VMXON region, SVM host save area).
    pub region: AtomicU64,
    /// VM exits this CPU handled.
    pub vm_exits: AtomicU64,
    /// Set when this CPU joined the boot-time guest run.
    pub joined: AtomicBool,
}

static CPUS: [VirtCpu; MAX_CPUS] = [const {
    VirtCpu {
        enabled: AtomicBool::new(false),
        region: AtomicU64::new(0),
        vm_exits: AtomicU64::new(0),
        joined: AtomicBool::new(false),
    }
}; MAX_CPUS];

/// CPU `index`'s virtualization state.
pub fn cpu(index: usize) -> &'static VirtCpu {
    &CPUS[index]
}

/// Enables the backend on the calling CPU (run on every CPU through an
/// IPI).
pub fn enable_here<B: Backend>(_: usize) {
    let index = crate::cpu::percpu::current_cpu_index() as usize;
    // Guests' x87/SSE/AVX state is switched with XSAVE between vCPUs.
    crate::arch::xsave::enable_on_this_cpu();
    match B::enable_on_this_cpu() {
        Ok(region) => {
            CPUS[index].region.store(region, Ordering::Relaxed);
            CPUS[index].enabled.store(true, Ordering::Release);
        }
        Err(error) => log::debug!("{}: CPU {index}: {error}", B::NAME),
    }
}

/// How many CPUs have the backend enabled.
pub fn enabled_cpus() -> usize {
    crate::cpu::smp::cpus()
        .iter()
        .enumerate()
        .filter(|(index, _)| CPUS[*index].enabled.load(Ordering::Acquire))
        .count()
}
