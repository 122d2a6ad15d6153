//! vCPUs: each has a shared half other CPUs may read (its context, list
//! entry, counters) and a local half only the CPU running it touches.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use crash::loaded_vmcs::VmcsId;
use hv_abi::hypercall;
use hv_core::exits::GuestRegisters;
use spin::Mutex;

use super::{Backend, Context, PlatformBackend, PlatformOps, guest, test_guest};
use crate::crash::records::{self, MAX_VMCS};
use crate::mm;

/// At most this many vCPUs: one list entry each.
pub const MAX_VCPUS: usize = MAX_VMCS;

/// What another CPU may read of a vCPU.
#[derive(Debug)]
pub struct VcpuShared {
    /// Its hardware context.
    pub context: Context,
    /// Its entry in the loaded-context lists.
    pub list_id: Option<VmcsId>,
    /// Set when the vCPU was stopped for good.
    pub stopped: AtomicBool,
    /// VM exits it took.
    pub exits: AtomicU64,
    /// Where the scheduler has it ([`sched_state`]).
    pub sched: AtomicU8,
    /// The CPU running it, while it runs.
    pub on_cpu: AtomicU32,
    /// The CPU its context is loaded on ([`NO_CPU`]: none).
    pub loaded_on: AtomicU32,
    /// The platform guest it belongs to and its number there; `None` for
    /// the in-tree test guest.
    pub platform: Option<PlatformVcpu>,
}

/// A vCPU of a platform guest.
#[derive(Debug, Clone, Copy)]
pub struct PlatformVcpu {
    /// The guest (`virt::guest`'s index).
    pub guest: usize,
    /// Its number in the guest (its APIC ID).
    pub number: usize,
    /// The backend's auxiliary page.
    pub aux: u64,
    /// The page its extended state (x87, SSE, AVX) is saved in while it
    /// is off a core.
    pub xsave_area: u64,
    /// How the scheduler initialises and runs it: its backend's.
    pub ops: PlatformOps,
}

/// No CPU.
pub const NO_CPU: u32 = u32::MAX;

/// Where a vCPU is, for the scheduler.
pub mod sched_state {
    /// In the run queue.
    pub const QUEUED: u8 = 0;
    /// On a core.
    pub const RUNNING: u8 = 1;
    /// Waiting for an event (HLT, SIPI): out of the queue until kicked.
    pub const PARKED: u8 = 2;
    /// Retired for good.
    pub const DONE: u8 = 3;
}

/// What only the CPU running a vCPU touches.
#[derive(Debug)]
pub struct VcpuLocal {
    /// The registers the context does not hold.
    pub registers: GuestRegisters,
    /// Launched on the CPU it is loaded on (VMRESUME next).
    pub launched: bool,
    /// Controls and guest state written.
    pub initialized: bool,
    /// The guest's console line being assembled.
    pub console: [u8; 96],
    /// Bytes in `console`.
    pub console_len: usize,
    /// Platform vCPUs: the guest's XCR0.
    pub xcr0: u64,
    /// Platform vCPUs: the guest's CR2.
    pub cr2: u64,
    /// Platform vCPUs: an NMI was injected and the vCPU has not been seen
    /// unblocked since, so NMI blocking the CPU reports may be its own.
    pub nmi_may_block: bool,
}

/// One virtual CPU.
#[derive(Debug)]
pub struct Vcpu {
    /// Shared half.
    pub shared: VcpuShared,
    /// Local half: held by the CPU running it.
    pub local: Mutex<VcpuLocal>,
}

impl VcpuLocal {
    fn new(registers: GuestRegisters) -> Self {
        Self {
            registers,
            launched: false,
            initialized: false,
            console: [0; 96],
            console_len: 0,
            xcr0: 1,
            cr2: 0,
            nmi_may_block: false,
        }
    }
}

impl Vcpu {
    fn empty() -> Self {
        Self {
            shared: VcpuShared {
                context: Context {
                    page: 0,
                    nested_root: 0,
                },
                list_id: None,
                stopped: AtomicBool::new(true),
                exits: AtomicU64::new(0),
                sched: AtomicU8::new(sched_state::DONE),
                on_cpu: AtomicU32::new(NO_CPU),
                loaded_on: AtomicU32::new(NO_CPU),
                platform: None,
            },
            local: Mutex::new(VcpuLocal::new(GuestRegisters::default())),
        }
    }

    /// Whether the vCPU exists (creation may have run out of memory).
    pub fn exists(&self) -> bool {
        self.shared.context.page != 0
    }

    /// Marks the vCPU stopped for good.
    pub fn mark_stopped(&self) {
        self.shared.stopped.store(true, Ordering::Release);
    }
}

/// Test knobs of the in-tree guest.
#[derive(Debug, Clone, Copy, Default)]
pub struct Knobs {
    /// This vCPU touches memory outside its EPT.
    pub misbehaving: Option<u32>,
    /// This vCPU makes the crash hypercall.
    pub crash_caller: Option<u32>,
}

/// vCPU `index` of the in-tree test guest: its memory with the image, a
/// context, a list entry and record. An empty (non-existent) vCPU when
/// memory or list entries run out.
pub fn make<B: Backend>(index: usize, knobs: Knobs) -> Vcpu {
    let memory_bytes = test_guest::MEMORY_BYTES;
    let Some(memory) = mm::alloc_aligned(memory_bytes / 4096, memory_bytes / 4096) else {
        return Vcpu::empty();
    };
    let context = match B::new_context(memory, memory_bytes) {
        Ok(context) => context,
        Err(error) => {
            log::error!("{}: no context for vCPU {index}: {error}", B::NAME);
            return Vcpu::empty();
        }
    };
    // The guest's memory is a fresh allocation of ours; the image fits.
    mm::phys::write(memory + test_guest::LOAD_ADDRESS, test_guest::bytes());
    let mut registers = GuestRegisters::default();
    if knobs.misbehaving == Some(index as u32) {
        registers.rdi = hypercall::MISBEHAVE;
    }
    if knobs.crash_caller == Some(index as u32) {
        registers.rdi = hypercall::CALL_CRASH;
    }
    let list_id = match records::register(context.page) {
        Ok(id) => id,
        Err(error) => {
            log::error!(
                "{}: no loaded-context list entry for vCPU {index}: {error}",
                B::NAME
            );
            return Vcpu::empty();
        }
    };
    Vcpu {
        shared: VcpuShared {
            context,
            list_id: Some(list_id),
            stopped: AtomicBool::new(false),
            exits: AtomicU64::new(0),
            sched: AtomicU8::new(sched_state::QUEUED),
            on_cpu: AtomicU32::new(NO_CPU),
            loaded_on: AtomicU32::new(NO_CPU),
            platform: None,
        },
        local: Mutex::new(VcpuLocal::new(registers)),
    }
}

/// Fills in platform vCPU `platform`'s current context the first time it
/// is loaded: the controls for its guest's features, and for the boot
/// vCPU the multiboot entry state (APs start at their SIPI).
pub fn init_platform<B: PlatformBackend>(context: &Context, platform: PlatformVcpu) {
    let info = guest::info(platform.guest);
    B::init_platform_vcpu(context, platform.aux, &info.features);
    if platform.number == 0 {
        B::load_multiboot_entry(&info.entry);
    }
}

/// vCPU `number` of platform guest `guest_index`: a context over the
/// guest's nested page tables, its extended-state area, a list entry and
/// record. An empty vCPU when memory or list entries run out.
pub fn make_platform<B: PlatformBackend>(guest_index: usize, number: usize) -> Vcpu {
    let info = guest::info(guest_index);
    let (context, aux) = match B::new_platform_vcpu(info.nested_root) {
        Ok(made) => made,
        Err(error) => {
            log::error!(
                "{}: no context for vCPU {number} of guest {}: {error}",
                B::NAME,
                info.name.as_str()
            );
            return Vcpu::empty();
        }
    };
    let Some(xsave_area) = mm::alloc_zeroed_page() else {
        return Vcpu::empty();
    };
    // A fresh page of ours: the state after RESET.
    mm::phys::with_bytes_mut(
        xsave_area,
        crate::arch::xsave::AREA_BYTES,
        crate::arch::xsave::init_area,
    );
    let list_id = match records::register(context.page) {
        Ok(id) => id,
        Err(error) => {
            log::error!(
                "{}: no loaded-context list entry for vCPU {number} of guest {}: {error}",
                B::NAME,
                info.name.as_str()
            );
            return Vcpu::empty();
        }
    };
    let mut registers = GuestRegisters::default();
    if number == 0 {
        registers.rax = u64::from(info.entry.eax);
        registers.rbx = u64::from(info.entry.ebx);
    }
    Vcpu {
        shared: VcpuShared {
            context,
            list_id: Some(list_id),
            stopped: AtomicBool::new(false),
            exits: AtomicU64::new(0),
            sched: AtomicU8::new(sched_state::QUEUED),
            on_cpu: AtomicU32::new(NO_CPU),
            loaded_on: AtomicU32::new(NO_CPU),
            platform: Some(PlatformVcpu {
                guest: guest_index,
                number,
                aux,
                xsave_area,
                ops: PlatformOps::of::<B>(),
            }),
        },
        local: Mutex::new(VcpuLocal::new(registers)),
    }
}
