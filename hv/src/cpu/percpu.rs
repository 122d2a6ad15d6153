//! Per-CPU state, in two halves:
//!
//! - [`PerCpu`], the local half: touched only by its own CPU, reached
//!   through GS (`arch::cpu_local`), whose header it starts with.
//! - [`SharedCpu`], the shared half: atomics that other CPUs and NMI
//!   handlers read and write. It is a static array with an entry for every
//!   possible CPU, so it exists from the first instruction, before any AP
//!   starts and before VMX is ever on. The crash path touches only shared
//!   halves (its own and this one's).
//!
//! Other layers keep their own per-CPU data the same way: a static array
//! indexed by the dense CPU index (see `virt` and `crash`).

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64};

use smp_boot::bringup::CpuSlot;
use smp_boot::madt::MAX_CPUS;

use crate::arch::cpu_local::{self, CpuLocalArea};
use crate::arch::gdt::DescriptorTables;

/// A CPU's own data, after the header `arch::cpu_local` keeps (index and
/// APIC ID).
#[derive(Debug)]
pub struct LocalData {
    /// This CPU's GDT and TSS, once it has its own.
    tables: spin::Once<&'static DescriptorTables>,
}

/// A CPU's local half.
pub type PerCpu = CpuLocalArea<LocalData>;

const _: () = assert!(
    core::mem::size_of::<PerCpu>() <= 4096,
    "a CPU's local area is one page"
);

/// The local half of CPU `index`.
pub const fn new_local(index: u32, apic_id: u32) -> PerCpu {
    CpuLocalArea::new(
        index,
        apic_id,
        LocalData {
            tables: spin::Once::new(),
        },
    )
}

/// What a CPU's local half says.
pub trait LocalHalf {
    /// The CPU's APIC ID.
    fn apic_id(&self) -> u32;
    /// This CPU's GDT and TSS (`None` on the boot CPU before it has its own).
    fn tables(&self) -> Option<&'static DescriptorTables>;
    /// Records this CPU's GDT and TSS.
    fn set_tables(&self, tables: &'static DescriptorTables);
}

impl LocalHalf for PerCpu {
    fn apic_id(&self) -> u32 {
        self.header().apic_id()
    }

    fn tables(&self) -> Option<&'static DescriptorTables> {
        self.data.tables.get().copied()
    }

    fn set_tables(&self, tables: &'static DescriptorTables) {
        self.data.tables.call_once(|| tables);
    }
}

/// What other CPUs and NMI handlers may see of a CPU.
#[derive(Debug)]
pub struct SharedCpu {
    /// Bring-up state and APIC ID.
    pub slot: CpuSlot,
    /// Requests of the call-function IPI.
    pub call: smp_boot::call::CallSlot,
    /// NMIs this CPU has taken that were nobody's crash (the boot-time NMI
    /// test counts them).
    pub nmis: AtomicU32,
    /// NMIs other CPUs announced before sending (self-tests): an NMI with
    /// none announced and no crash under way came from outside.
    pub nmis_expected: AtomicU32,
    /// Of those, taken.
    pub nmis_expected_taken: AtomicU32,
    /// Set once this CPU's IDT is loaded: an NMI then finds its handler.
    pub idt_live: AtomicBool,
    /// Top of this CPU's crash stack (0: none): the crash path runs there,
    /// off the NMI stack that a nested NMI would overwrite.
    pub crash_stack: AtomicU64,
    /// Which LINT pins carry the platform's NMI here: bit 0 LINT0, bit 1
    /// LINT1; bits 2 and 3: that pin is active low.
    pub nmi_pins: AtomicU8,
}

impl SharedCpu {
    const fn new() -> Self {
        Self {
            slot: CpuSlot::new(),
            call: smp_boot::call::CallSlot::new(),
            nmis: AtomicU32::new(0),
            nmis_expected: AtomicU32::new(0),
            nmis_expected_taken: AtomicU32::new(0),
            idt_live: AtomicBool::new(false),
            crash_stack: AtomicU64::new(0),
            nmi_pins: AtomicU8::new(0),
        }
    }
}

static SHARED: [SharedCpu; MAX_CPUS] = [const { SharedCpu::new() }; MAX_CPUS];
static LOCAL: [spin::Once<&'static PerCpu>; MAX_CPUS] = [const { spin::Once::new() }; MAX_CPUS];
static BOOT_CPU: PerCpu = new_local(0, 0);

/// The shared half of CPU `index`.
pub fn shared(index: usize) -> &'static SharedCpu {
    &SHARED[index]
}

/// Every CPU's shared half.
pub fn all_shared() -> &'static [SharedCpu] {
    &SHARED
}

/// Points GS at the boot CPU's area. First thing the boot CPU does.
pub fn init_boot_cpu() {
    BOOT_CPU.header().set_apic_id(crate::arch::cpu::apic_id());
    LOCAL[0].call_once(|| &BOOT_CPU);
    cpu_local::install(&BOOT_CPU);
}

/// Registers the local half of CPU `index` (boot CPU, before APs start).
pub fn register(index: usize, area: &'static PerCpu) {
    LOCAL[index].call_once(|| area);
}

/// Points GS at CPU `index`'s registered area; an AP's first step.
pub fn install_for(index: usize) -> Option<&'static PerCpu> {
    let area = *LOCAL.get(index)?.get()?;
    cpu_local::install(area);
    Some(area)
}

/// This CPU's local half.
pub fn current() -> &'static PerCpu {
    cpu_local::current::<LocalData>()
}

/// The dense index of the CPU this runs on.
pub fn current_cpu_index() -> u32 {
    cpu_local::current_index()
}

/// Unmasks the calling CPU's NMI pins as its [`SharedCpu::nmi_pins`] says
/// (the argument is ignored: it fits the call-function IPI).
pub fn unmask_nmi_pins(_: usize) {
    let index = current_cpu_index() as usize;
    let pins = shared(index)
        .nmi_pins
        .load(core::sync::atomic::Ordering::Relaxed);
    for lint in 0..2u8 {
        if pins & (1 << lint) != 0 {
            crate::arch::apic::unmask_nmi_pin(crate::arch::apic::NmiPin {
                lint,
                active_low: pins & (1 << (lint + 2)) != 0,
            });
        }
    }
}
