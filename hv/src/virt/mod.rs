//! Virtualization: guests on every core, behind one [`Backend`] trait.
//!
//! - [`vmx`]: the VMX backend (VMCS, EPT).
//! - [`svm`]: the SVM backend (VMCB, nested paging, ASIDs), chosen at run
//!   time where the CPU has SVM and no VMX ([`select`]).
//! - [`vcpu`]: the vCPUs and their contexts.
//! - [`sched`]: the run queue that moves vCPUs between cores every slice,
//!   with the loaded-VMCS list protocol (`crash::records`) on every move.
//! - [`test_guest`]: the in-tree guest.
//!
//! What an exit means is decided by `hv_core::exits`, the same for every
//! backend and host-tested; this layer carries the decision out.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hv_core::exits::{Exit, GuestRegisters};
use smp_boot::madt::MAX_CPUS;

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
