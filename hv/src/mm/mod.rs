//! Memory: the usable map, the frame allocator, the kernel's page tables,
//! stacks with guard pages, permanent allocations, and [`phys`], the one
//! module outside `arch` that makes pointers to memory.

use hv_core::cmdline::CrashKernelSpec;
use hv_core::frames::FrameAllocator;
use hv_core::memmap::{MemoryMap, MemoryRegion, RegionKind};
use spin::Mutex;

use crate::arch::gdt::DescriptorTables;

pub mod paging;
pub mod phys;

use paging::{Access, AddressSpace, PagingError, Tables};

const PAGE: u64 = 4096;
/// Real-mode IVT and BIOS data area: never handed out. The rest of low
/// memory serves the AP trampoline (`alloc_below` only; `alloc` starts at
/// 1 MiB).
const LOW_RESERVED_END: u64 = 0x1_0000;
const LOW_MEMORY_END: u64 = 0x10_0000;
const FOUR_GIB: u64 = 4 << 30;

/// Pages of a CPU's main stack.
pub const MAIN_STACK_PAGES: u64 = 16;
/// Pages of each CPU's crash stack.
pub const CRASH_STACK_PAGES: u64 = 8;
/// Pages of each interrupt stack (NMI, #DF, #MC).
pub const INTERRUPT_STACK_PAGES: u64 = 4;

/// Something page tables can be built from.
pub trait FrameSource {
    /// A zeroed 4 KiB frame, or `None` when memory is exhausted.
    fn alloc_zeroed_frame(&mut self) -> Option<u64>;
}

impl FrameSource for FrameAllocator {
    fn alloc_zeroed_frame(&mut self) -> Option<u64> {
        let frame = self.alloc(1, 1)?;
        zero_frames(frame, 1);
        Some(frame)
    }
}

/// Zeroes frames just handed out by the allocator.
fn zero_frames(start: u64, pages: u64) {
    phys::fill(start, pages * PAGE, 0);
}

/// The firmware's memory map as the loader gave it (nothing excluded): the
/// capture kernel's e820 map and the dump's memory ranges come from it.
pub static FIRMWARE_MAP: spin::Once<MemoryMap> = spin::Once::new();
/// The crash-kernel reservation (start, length), out of every allocator.
pub static CRASH_RESERVATION: spin::Once<(u64, u64)> = spin::Once::new();

/// The frame allocator, once the memory map is known.
pub static FRAMES: Mutex<Option<FrameAllocator>> = Mutex::new(None);
/// The page tables every CPU uses.
static KERNEL_SPACE: Mutex<Option<AddressSpace>> = Mutex::new(None);

/// Reads the firmware's memory map (start, length, e820 type), leaves out
/// `keep_out` (the loader's structures and the boot modules), reserves the
/// crash kernel's memory, sets up the frame allocator and switches to the
/// kernel's own page tables. Stops the machine if there is no usable RAM.
pub fn init(
    regions: impl Iterator<Item = (u64, u64, u32)>,
    keep_out: impl Iterator<Item = (u64, u64)>,
    crashkernel: Option<CrashKernelSpec>,
) {
    let regions = regions.map(|(start, len, e820_type)| {
        MemoryRegion::new(start, len, RegionKind::from_e820(e820_type))
    });
    let mut map = match MemoryMap::from_regions(regions) {
        Ok(map) => map,
        Err(error) => {
            log::error!("memory map: {error}");
            crate::console::finish::fail_stop();
        }
    };
    FIRMWARE_MAP.call_once(|| map.clone());
    let (image_start, image_len) = crate::arch::boot::image_range();
    let keep_out = [(0, LOW_RESERVED_END), (image_start, image_len)]
        .into_iter()
        .chain(keep_out)
        .filter(|range| range.1 > 0);
    for (start, len) in keep_out {
        if let Err(error) = map.exclude(start, len) {
            log::error!("memory map: {error}");
            crate::console::finish::fail_stop();
        }
    }
    let reservation = crashkernel
        .map(|spec| hv_core::crashkernel::reserve(&mut map, spec).map_err(|error| error.message()));
    match reservation {
        Some(Ok(range)) => {
            log::info!(
                "crashkernel: {} MiB reserved at {:#x}",
                range.1 >> 20,
                range.0
            );
            CRASH_RESERVATION.call_once(|| range);
        }
        Some(Err(error)) => log::error!("crashkernel: {error}; crash capture disabled"),
        None => {}
    }
    crate::console::report::line(|o| {
        o.field("crashkernel").object(|o| {
            let reserved = reservation.and_then(Result::ok);
            o.field("base")
                .option(reserved, |value, range| value.u64(range.0))?;
            o.field("size")
                .option(reserved, |value, range| value.u64(range.1))?;
            o.field("error")
                .option(reservation.and_then(Result::err), |value, error| {
                    value.str(error)
                })
        })
    });
    for region in map.regions() {
        log::debug!(
            "memory: {:#014x}..{:#014x} {:?}",
            region.start,
            region.end(),
            region.kind
        );
    }
    log::info!(
        "memory: {} MiB usable in {} regions",
        map.usable_bytes() >> 20,
        map.usable().count()
    );
    crate::console::report::line(|o| {
        o.field("memory").object(|o| {
            o.field("regions").u64(map.len() as u64)?;
            o.field("usable_regions").u64(map.usable().count() as u64)?;
            o.field("usable_bytes").u64(map.usable_bytes())?;
            o.field("highest_usable").u64(map.highest_usable_end())
        })
    });
    if map.usable_bytes() == 0 {
        log::error!("memory map: no usable RAM above 1 MiB");
        crate::console::finish::fail_stop();
    }

    let mut frames = FrameAllocator::from_map(&map);
    let mapped_end = map.highest_usable_end().max(FOUR_GIB);
    // RAM (and what firmware keeps in it) is cached; holes, where the APIC
    // and other devices sit, are not.
    let is_ram = |start: u64, end: u64| {
        map.regions().iter().any(|region| {
            region.start < end && start < region.end() && region.kind != RegionKind::Bad
        })
    };
    let no_execute = crate::arch::cpu::enable_no_execute();
    let space = match build_kernel_space(&mut frames, mapped_end, no_execute, is_ram) {
        Ok(space) => space,
        Err(error) => {
            log::error!("page tables: {error}");
            crate::console::finish::fail_stop();
        }
    };
    paging::activate(&space);
    *KERNEL_SPACE.lock() = Some(space);
    *FRAMES.lock() = Some(frames);
}

/// The kernel's tables: everything identity-mapped no-execute, RAM
/// cached, holes uncached; the image's text read-only and executable, its
/// read-only data read-only; the first 2 MiB executable (the AP
/// trampoline runs there).
fn build_kernel_space(
    frames: &mut FrameAllocator,
    mapped_end: u64,
    no_execute: bool,
    is_ram: impl Fn(u64, u64) -> bool,
) -> Result<AddressSpace, PagingError> {
    let mut tables = Tables { frames };
    let mut space = AddressSpace::identity(&mut tables, mapped_end, no_execute, |start, end| {
        Some(if is_ram(start, end) {
            Access::DATA
        } else {
            Access::DEVICE
        })
    })?;
    space.protect(&mut tables, 0, LOW_EXECUTABLE_END, Access::RWX)?;
    let image = crate::arch::boot::image_layout();
    space.protect(&mut tables, image.text.0, image.text.1, Access::TEXT)?;
    space.protect(
        &mut tables,
        image.rodata.0,
        image.rodata.1,
        Access::READ_ONLY,
    )?;
    Ok(space)
}

/// Low memory that stays executable: the AP trampoline's page lies in it.
const LOW_EXECUTABLE_END: u64 = 2 << 20;

/// Gives `[start, start + len)` the access `access` in the kernel's tables
/// and drops this CPU's old translations. Other CPUs that may have cached
/// them must drop theirs too ([`crate::arch::cpu::flush_tlb`] on each).
pub fn protect(start: u64, len: u64, access: Access) -> Result<(), PagingError> {
    let mut frames = FRAMES.lock();
    let frames = frames.as_mut().ok_or(PagingError::OutOfFrames)?;
    let mut space = KERNEL_SPACE.lock();
    let space = space.as_mut().ok_or(PagingError::OutOfFrames)?;
    space.protect(&mut Tables { frames }, start, len, access)?;
    crate::arch::cpu::flush_tlb();
    Ok(())
}

/// Bytes the frame allocator has free (0 before it exists): the per-CPU
/// memory report measures what bring-up takes with it.
pub fn free_bytes() -> u64 {
    FRAMES
        .lock()
        .as_ref()
        .map_or(0, |frames| frames.free_bytes())
}

/// Bytes of the image's static data (`.data` and `.bss`): among them every
/// array sized for [`smp_boot::madt::MAX_CPUS`] possible CPUs.
pub fn image_static_bytes() -> u64 {
    let (start, end) = phys::static_data_range();
    end.saturating_sub(start)
}

/// Allocates `pages` of stack with an unmapped guard page below them and
/// returns the stack's top (16-byte aligned).
pub fn alloc_guarded_stack(pages: u64) -> Option<u64> {
    let mut frames = FRAMES.lock();
    let frames = frames.as_mut()?;
    let base = frames.alloc(pages + 1, 1)?;
    zero_frames(base + PAGE, pages);
    let mut space = KERNEL_SPACE.lock();
    space
        .as_mut()?
        .unmap(&mut Tables { frames }, base, PAGE)
        .ok()?;
    crate::arch::cpu::flush_page(base);
    Some(base + (pages + 1) * PAGE)
}

/// Calls `function` on a fresh guarded stack of `pages` pages (never
/// freed), for boot work with frames too big for a CPU's main stack.
/// `false` when there is no memory for the stack.
pub fn call_on_new_stack(pages: u64, function: extern "C" fn()) -> bool {
    let Some(top) = alloc_guarded_stack(pages) else {
        return false;
    };
    phys::call_on_stack(top, function);
    true
}

/// A free page below 1 MiB (for the AP trampoline), never freed.
pub fn alloc_low_page() -> Option<u64> {
    FRAMES.lock().as_mut()?.alloc_below(LOW_MEMORY_END, 1)
}

/// A zeroed page, never freed (VMCS, VMXON region, EPT tables).
pub fn alloc_zeroed_page() -> Option<u64> {
    FRAMES.lock().as_mut()?.alloc_zeroed_frame()
}

/// `pages` zeroed frames aligned to `align_pages`, never freed.
pub fn alloc_aligned(pages: u64, align_pages: u64) -> Option<u64> {
    let start = FRAMES.lock().as_mut()?.alloc(pages, align_pages)?;
    zero_frames(start, pages);
    Some(start)
}

/// An array of `len` elements made by `make(index)`, never freed.
pub fn alloc_permanent_slice_with<T>(
    len: usize,
    make: impl FnMut(usize) -> T,
) -> Option<&'static mut [T]> {
    let bytes = (core::mem::size_of::<T>() as u64).checked_mul(len as u64)?;
    let pages = bytes.div_ceil(PAGE).max(1);
    let frame = FRAMES.lock().as_mut()?.alloc(pages, 1)?;
    // `make` may allocate frames itself: the lock is not held here.
    Some(phys::place_slice_with(frame, len, make))
}

/// A zeroed array of `len` elements that is never freed.
pub fn alloc_permanent_slice<T: Copy + Default>(len: usize) -> Option<&'static mut [T]> {
    alloc_permanent_slice_with(len, |_| T::default())
}

/// Allocates a page-aligned block holding `value`, never freed.
pub fn alloc_permanent<T>(value: T) -> Option<&'static mut T> {
    let pages = (core::mem::size_of::<T>() as u64).div_ceil(PAGE).max(1);
    let frame = FRAMES.lock().as_mut()?.alloc(pages, 1)?;
    Some(phys::place(frame, value))
}

/// A CPU's stacks: the main one and the three interrupt stacks, each with
/// an unmapped guard page below it.
#[derive(Debug, Clone, Copy)]
pub struct CpuStacks {
    /// Top of the main stack.
    pub main: u64,
    /// Top of the crash stack: the crash path's, off the NMI stack.
    pub crash: u64,
    /// The GDT and TSS whose IST slots point at the interrupt stacks.
    pub tables: &'static DescriptorTables,
}

/// Allocates a CPU's stacks and its GDT/TSS.
pub fn alloc_cpu_stacks() -> Option<CpuStacks> {
    let main = alloc_guarded_stack(MAIN_STACK_PAGES)?;
    let nmi = alloc_guarded_stack(INTERRUPT_STACK_PAGES)?;
    let double_fault = alloc_guarded_stack(INTERRUPT_STACK_PAGES)?;
    let machine_check = alloc_guarded_stack(INTERRUPT_STACK_PAGES)?;
    let crash = alloc_guarded_stack(CRASH_STACK_PAGES)?;
    let tables = alloc_permanent(DescriptorTables::new(nmi, double_fault, machine_check))?;
    Some(CpuStacks {
        main,
        crash,
        tables,
    })
}

/// Gives the boot CPU guarded main and interrupt stacks and its own GDT and
/// TSS (recorded with `record_tables`), then continues in `next` on the new
/// stack.
pub fn switch_to_guarded_stacks(record_tables: impl FnOnce(&CpuStacks), next: fn() -> !) -> ! {
    let Some(stacks) = alloc_cpu_stacks() else {
        log::error!("out of memory for the boot CPU's stacks and GDT");
        crate::console::finish::fail_stop();
    };
    stacks.tables.load();
    record_tables(&stacks);
    log::debug!("boot CPU on its guarded stack at {:#x}", stacks.main);
    phys::switch_to_stack(stacks.main, next)
}
