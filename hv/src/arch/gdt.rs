//! The GDT and TSS. Every CPU has its own pair (the TSS holds that CPU's
//! interrupt stacks), built by [`DescriptorTables::new`] and loaded once.

use core::cell::UnsafeCell;

/// Code segment selector of the hypervisor.
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
/// Data segment selector of the hypervisor.
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
/// TSS selector; VMX host state needs it non-zero.
pub const TSS_SELECTOR: u16 = 0x18;

/// Interrupt stack table slots (1-based, as the IDT encodes them).
pub const IST_NMI: u8 = 1;
/// IST slot of the double-fault handler, so a stack overflow still reports.
pub const IST_DOUBLE_FAULT: u8 = 2;
/// IST slot of the machine-check handler.
pub const IST_MACHINE_CHECK: u8 = 3;

/// The 64-bit task-state segment.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
pub struct TaskStateSegment {
    reserved0: u32,
    privilege_stacks: [u64; 3],
    reserved1: u64,
    interrupt_stacks: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    io_map_base: u16,
}

const _: () = assert!(core::mem::size_of::<TaskStateSegment>() == 104);

/// A CPU's GDT and TSS, kept together so one allocation serves each CPU.
///
/// The CPU itself writes them (the TSS busy bit), so both sit in
/// `UnsafeCell`s; the kernel writes them only in [`load`](Self::load), on
/// the CPU they belong to.
#[derive(Debug)]
#[repr(C, align(16))]
pub struct DescriptorTables {
    gdt: UnsafeCell<[u64; 5]>,
    tss: UnsafeCell<TaskStateSegment>,
}

// SAFETY: (1) the cells are written only by `load`, on the one CPU that owns the tables, before
// that CPU uses them; (2) other CPUs only read addresses.
unsafe impl Sync for DescriptorTables {}

impl DescriptorTables {
    /// Builds tables whose TSS points the NMI, #DF and #MC handlers at the
    /// given stack tops.
    pub const fn new(nmi_stack: u64, double_fault_stack: u64, machine_check_stack: u64) -> Self {
        let mut interrupt_stacks = [0; 7];
        interrupt_stacks[IST_NMI as usize - 1] = nmi_stack;
        interrupt_stacks[IST_DOUBLE_FAULT as usize - 1] = double_fault_stack;
        interrupt_stacks[IST_MACHINE_CHECK as usize - 1] = machine_check_stack;
        Self {
            gdt: UnsafeCell::new([0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF, 0, 0]),
            tss: UnsafeCell::new(TaskStateSegment {
                reserved0: 0,
                privilege_stacks: [0; 3],
                reserved1: 0,
                interrupt_stacks,
                reserved2: 0,
                reserved3: 0,
                // No I/O permission bitmap: the limit ends before it.
                io_map_base: core::mem::size_of::<TaskStateSegment>() as u16,
            }),
        }
    }

    /// Address of the TSS, for the VMCS host state.
    pub fn tss_base(&self) -> u64 {
        self.tss.get() as u64
    }

    /// Address of the GDT, for the VMCS host state.
    pub fn gdt_base(&self) -> u64 {
        self.gdt.get() as u64
    }

    /// Loads this GDT and TSS on the current CPU and reloads every segment.
    ///
    /// Takes `&'static` because the CPU keeps using the tables (and
    /// writes the TSS busy bit) for as long as it runs. Call it once, on
    /// the CPU the tables were made for.
    pub fn load(&'static self) {
        let base = self.tss_base();
        let limit = (core::mem::size_of::<TaskStateSegment>() - 1) as u64;
        let low = (limit & 0xFFFF)
            | ((base & 0xFF_FFFF) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xF) << 48)
            | (((base >> 24) & 0xFF) << 56);
        // SAFETY: (1) only this CPU touches its tables, and it does not use them yet (the old GDT
        // is still loaded).
        unsafe {
            let gdt = &mut *self.gdt.get();
            gdt[3] = low;
            gdt[4] = base >> 32;
        }

        #[repr(C, packed)]
        struct Pointer {
            limit: u16,
            base: u64,
        }
        let pointer = Pointer {
            limit: (core::mem::size_of::<[u64; 5]>() - 1) as u16,
            base: self.gdt_base(),
        };
        // SAFETY: (1) `pointer` describes a GDT that lives for 'static, whose
        // code and data descriptors match the ones in use since boot, so the
        // far return lands on the same code; (2) the TSS descriptor points at
        // a TSS that lives for 'static; (3) nothing else uses the old GDT.
        unsafe {
            core::arch::asm!(
                "lgdt [{pointer}]",
                "push {code}",
                "lea {scratch}, [rip + 2f]",
                "push {scratch}",
                "retfq",
                "2:",
                "mov {scratch:e}, {data}",
                "mov ds, {scratch:e}",
                "mov es, {scratch:e}",
                "mov ss, {scratch:e}",
                "ltr {tss:x}",
                pointer = in(reg) &raw const pointer,
                code = const KERNEL_CODE_SELECTOR as u64,
                data = const KERNEL_DATA_SELECTOR as u32,
                tss = in(reg) TSS_SELECTOR,
                scratch = out(reg) _,
            );
        }
    }
}

/// The boot CPU's first GDT and TSS, until it has guarded stacks.
static BOOT_TABLES: spin::Once<DescriptorTables> = spin::Once::new();

/// Loads the boot CPU's first GDT and TSS, whose interrupt stacks are the
/// boot image's own. Called before the IDT is loaded: from then on an NMI,
/// #DF or #MC takes its stack from this TSS, not from whatever TSS the
/// loader left in TR. A capture image's TR names the purgatory's 32-bit
/// TSS, whose bytes, read as IST pointers, sent a stray NMI's frame to a
/// non-canonical address (#SS).
pub fn load_boot_tables() {
    let tables = BOOT_TABLES.call_once(|| {
        let (nmi, double_fault, machine_check) = super::boot::boot_interrupt_stacks();
        DescriptorTables::new(nmi, double_fault, machine_check)
    });
    tables.load();
}
