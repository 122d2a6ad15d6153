//! Per-CPU state, in two halves:
//!
//! - [`PerCpu`], the local half: touched only by its own CPU, reached
//!   through GS. Its first field points at itself, so `mov reg, gs:[0]`
//!   yields the area without reading an MSR. Offsets come from
//!   `offset_of!`, never by hand.
//! - [`SharedCpu`], the shared half: atomics that other CPUs and NMI
//!   handlers read and write. It is a static array with an entry for every
//!   possible CPU, so it exists from the first instruction, before any AP
//!   starts and before VMX is ever on. The crash path touches only this half.

use core::mem::offset_of;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use smp_boot::bringup::CpuSlot;
use smp_boot::madt::MAX_CPUS;

use crate::arch::gdt::DescriptorTables;

/// IA32_GS_BASE.
const GS_BASE_MSR: u32 = 0xC000_0101;

/// A CPU's own data.
#[derive(Debug)]
#[repr(C)]
pub struct PerCpu {
    this: *const PerCpu,
    /// Dense CPU number (0 is the boot CPU), used for logs and dump threads.
    pub index: u32,
    /// The CPU's APIC ID, as CPUID reports it.
    pub apic_id: u32,
    /// This CPU's GDT and TSS.
    pub tables: *mut DescriptorTables,
}

const _: () = assert!(
    core::mem::size_of::<PerCpu>() <= 4096,
    "a CPU's local area is one page"
);

/// What other CPUs and NMI handlers may see of a CPU.
#[derive(Debug)]
pub struct SharedCpu {
    /// Bring-up state and APIC ID.
    pub slot: CpuSlot,
    /// Requests of the call-function IPI.
    pub call: crate::smp::CallSlot,
    /// NMIs this CPU has taken (a test of the NMI path).
    pub nmis: AtomicU32,
    /// Whether this CPU is in VMX root operation.
    pub vmx_on: AtomicBool,
    /// Its VMXON region.
    pub vmxon_region: AtomicU64,
    /// VM exits this CPU handled.
    pub vm_exits: AtomicU64,
    /// Set when this CPU joined the boot-time guest run.
    pub joined_guests: AtomicBool,
    /// Where a tolerated #UD/#GP resumes (0: none armed); see `vmx::tolerant`.
    pub fault_fixup: AtomicU64,
    /// Set by the trap handler when it used `fault_fixup`.
    pub fault_hit: AtomicBool,
    /// When this CPU took the crash NMI (TSC microseconds; 0: never).
    pub crash_nmi_at_us: AtomicU64,
}

impl SharedCpu {
    const fn new() -> Self {
        Self {
            slot: CpuSlot::new(),
            call: crate::smp::CallSlot::new(),
            nmis: AtomicU32::new(0),
            vmx_on: AtomicBool::new(false),
            vmxon_region: AtomicU64::new(0),
            vm_exits: AtomicU64::new(0),
            joined_guests: AtomicBool::new(false),
            fault_fixup: AtomicU64::new(0),
            fault_hit: AtomicBool::new(false),
            crash_nmi_at_us: AtomicU64::new(0),
        }
    }
}

static SHARED: [SharedCpu; MAX_CPUS] = [const { SharedCpu::new() }; MAX_CPUS];
static LOCAL: [AtomicPtr<PerCpu>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];

/// The shared half of CPU `index`.
pub fn shared(index: usize) -> &'static SharedCpu {
    &SHARED[index]
}

/// Every CPU's shared half.
pub fn all_shared() -> &'static [SharedCpu] {
    &SHARED
}

static mut BOOT_CPU: PerCpu = PerCpu {
    this: core::ptr::null(),
    index: 0,
    apic_id: 0,
    tables: core::ptr::null_mut(),
};

fn install(area: *mut PerCpu) {
    // SAFETY: (1) `area` is this CPU's local half, which only this CPU
    // touches; (2) GS_BASE exists on every x86_64 CPU and the kernel uses no
    // other GS base.
    unsafe {
        (*area).this = area;
        crate::arch::cpu::wrmsr(GS_BASE_MSR, area as u64);
    }
}

/// Points GS at the boot CPU's area. First thing the boot CPU does.
pub fn init_boot_cpu() {
    let area = &raw mut BOOT_CPU;
    // SAFETY: nothing else runs yet, so this is the only access to BOOT_CPU.
    unsafe { (*area).apic_id = crate::arch::cpu::apic_id() };
    install(area);
    LOCAL[0].store(area, Ordering::Release);
}

/// Registers the local half of CPU `index` (boot CPU, before APs start).
pub fn register(index: usize, area: &'static mut PerCpu) {
    area.index = index as u32;
    LOCAL[index].store(area, Ordering::Release);
}

/// A fresh local half for CPU `index`, to be registered.
pub fn new_local(apic_id: u32, tables: *mut DescriptorTables) -> PerCpu {
    PerCpu {
        this: core::ptr::null(),
        index: 0,
        apic_id,
        tables,
    }
}

/// Points GS at CPU `index`'s registered area; an AP's first step.
pub fn install_for(index: usize) -> Option<&'static PerCpu> {
    let area = LOCAL.get(index)?.load(Ordering::Acquire);
    if area.is_null() {
        return None;
    }
    install(area);
    // SAFETY: registered areas live for good and only their CPU uses them.
    Some(unsafe { &*area })
}

/// Records the boot CPU's GDT and TSS.
pub fn set_boot_cpu_tables(tables: *mut DescriptorTables) {
    let area = &raw mut BOOT_CPU;
    // SAFETY: only the boot CPU touches its own area.
    unsafe { (*area).tables = tables };
}

/// This CPU's local half.
pub fn current() -> &'static PerCpu {
    let area: *const PerCpu;
    // SAFETY: GS points at this CPU's registered PerCpu, whose first field
    // points at itself; areas live for good.
    unsafe {
        core::arch::asm!("mov {}, gs:[{}]", out(reg) area, const offset_of!(PerCpu, this), options(nostack, readonly, preserves_flags));
        &*area
    }
}

/// The dense index of the CPU this runs on.
pub fn current_cpu_index() -> u32 {
    let index: u32;
    // SAFETY: GS points at this CPU's PerCpu from its first instruction in
    // Rust on (before that GS base is 0 and this reads low memory, which the
    // boot page tables map).
    unsafe {
        core::arch::asm!("mov {:e}, gs:[{}]", out(reg) index, const offset_of!(PerCpu, index), options(nostack, readonly, preserves_flags))
    };
    index
}
