//! Physical memory, the one place besides `arch` where `unsafe` is
//! allowed: every raw pointer the kernel makes to memory is made here.
//!
//! The kernel runs identity-mapped (virtual == physical) over all RAM and
//! the first 4 GiB, so a physical address is a pointer. What makes each
//! access below sound is a kernel-wide ownership rule, stated once:
//!
//! - **Memory the kernel owns** (frames from the frame allocator, the
//!   crash reservation, the stacks): written only by the code that
//!   allocated it, through [`write()`], [`fill`], [`with_bytes_mut`] or the
//!   typed placements [`place`] and [`place_slice_with`].
//! - **Memory nobody writes while the kernel runs** (the loader's
//!   structures and boot modules, kept out of the allocator; firmware
//!   tables; the old kernel's memory in capture mode; the kernel's own
//!   image): read through [`read`].
//! - **Page tables** of the kernel's address space: read and written only
//!   by `mm::paging`, through [`table_entry`] and [`set_table_entry`].
//! - **Guest RAM** (frames the kernel gave a running guest, whose vCPUs
//!   may write them at any moment): copied byte by byte with volatile
//!   accesses through [`read_guest`] and [`write_guest`], never borrowed
//!   as a slice.
//!
//! Nothing here checks ownership at run time: the callers are few, and
//! each names which kind of memory it touches.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicPtr, Ordering};

/// `len` bytes at `start`, in memory nobody writes while the kernel runs
/// (module docs). An empty slice for `len == 0`.
pub fn read(start: u64, len: u64) -> &'static [u8] {
    if len == 0 {
        return &[];
    }
    // SAFETY: (1) identity-mapped; (2) by the module's rule the range is
    // not written while the returned reference lives.
    unsafe { core::slice::from_raw_parts(start as *const u8, len as usize) }
}

/// Copies `bytes` to `start`, in memory the kernel owns.
pub fn write(start: u64, bytes: &[u8]) {
    // SAFETY: (1) identity-mapped memory the caller owns (module docs);
    // (2) `bytes` is a Rust slice, so it does not overlap memory handed
    // out as owned elsewhere.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), start as *mut u8, bytes.len()) };
}

/// Sets `len` bytes at `start` to `byte`, in memory the kernel owns.
pub fn fill(start: u64, len: u64, byte: u8) {
    // SAFETY: (1) identity-mapped memory the caller owns (module docs).
    unsafe { core::ptr::write_bytes(start as *mut u8, byte, len as usize) };
}

/// Runs `f` on `len` bytes at `start` as a mutable slice, in memory the
/// kernel owns and that nothing else touches during the call.
pub fn with_bytes_mut<R>(start: u64, len: u64, f: impl FnOnce(&mut [u8]) -> R) -> R {
    // SAFETY: (1) identity-mapped memory the caller owns (module docs);
    // (2) the slice lives only for the call, so it cannot outlive the
    // caller's ownership.
    f(unsafe { core::slice::from_raw_parts_mut(start as *mut u8, len as usize) })
}

/// Copies guest RAM at `start` into `buffer` (module docs: guest RAM).
pub fn read_guest(start: u64, buffer: &mut [u8]) {
    for (offset, byte) in buffer.iter_mut().enumerate() {
        // SAFETY: (1) identity-mapped RAM the kernel allocated to a guest
        // (caller); (2) a volatile byte read cannot tear, and a guest's
        // concurrent write only changes which value is read.
        *byte = unsafe { core::ptr::read_volatile((start + offset as u64) as *const u8) };
    }
}

/// Copies `bytes` into guest RAM at `start` (module docs: guest RAM).
pub fn write_guest(start: u64, bytes: &[u8]) {
    for (offset, byte) in bytes.iter().enumerate() {
        // SAFETY: (1) identity-mapped RAM the kernel allocated to a guest
        // (caller); (2) the guest owns the contents, so a racing write of
        // its own only decides which value stays.
        unsafe { core::ptr::write_volatile((start + offset as u64) as *mut u8, *byte) };
    }
}

/// Reads a 64-bit device register (memory-mapped I/O below 4 GiB, which
/// the kernel maps uncached where it is not RAM).
pub fn mmio_read_u64(address: u64) -> u64 {
    // SAFETY: (1) mapped and uncached (above); (2) the caller names a
    // device register, 8-byte aligned, whose read changes no memory Rust
    // knows about; (3) volatile, so it happens each time, in order.
    unsafe { core::ptr::read_volatile(address as *const u64) }
}

/// Writes a 64-bit device register (as [`mmio_read_u64`]), for a device
/// the kernel alone programs.
pub fn mmio_write_u64(address: u64, value: u64) {
    // SAFETY: (1) mapped and uncached below 4 GiB; (2) the caller names a
    // device register, 8-byte aligned, of a device the kernel alone
    // programs; (3) volatile, so the write happens once, in order.
    unsafe { core::ptr::write_volatile(address as *mut u64, value) };
}

/// The ACPI tables' timers: the PM timer's block from the FADT and the
/// HPET's register base from the HPET table, read through the `acpi`
/// crate (which checks each table's signature and checksum) from the
/// checked bytes by `hv_core::tsc`'s host-tested readers. `rsdp` is an
/// RSDP the MADT reader accepted.
pub fn acpi_timers(rsdp: u64) -> (Option<hv_core::tsc::PmTimerBlock>, Option<u64>) {
    let Ok(rsdp) = usize::try_from(rsdp) else {
        return (None, None);
    };
    // SAFETY: (1) the handler maps what the crate asks for through the
    // identity map, and nothing writes the tables (module docs); (2) the
    // RSDP and its root table were checked by the MADT reader, whose
    // lengths the crate trusts.
    let Ok(tables) = (unsafe { ::acpi::AcpiTables::from_rsdp(acpi_handler(), rsdp) }) else {
        return (None, None);
    };
    let pm_timer = tables
        .find_table::<::acpi::fadt::Fadt>()
        .ok()
        .and_then(|fadt| hv_core::tsc::pm_timer_from_fadt(mapped_table(&fadt)));
    let hpet = tables
        .find_table::<::acpi::hpet::HpetTable>()
        .ok()
        .and_then(|hpet| hv_core::tsc::hpet_base_from_table(mapped_table(&hpet)));
    (pm_timer, hpet)
}

/// The bytes of a table the `acpi` crate found and checksummed.
fn mapped_table<T>(mapping: &::acpi::PhysicalMapping<smp_boot::madt::IdentityMapped, T>) -> &[u8] {
    read(
        mapping.virtual_start().as_ptr() as u64,
        mapping.region_length() as u64,
    )
}

/// Entry `index` of the page table at `table`.
pub(super) fn table_entry(table: u64, index: usize) -> u64 {
    debug_assert!(index < 512);
    // SAFETY: (1) `table` is a page-table frame of the kernel's (module docs), 4 KiB aligned, and
    // `index` < 512.
    unsafe { core::ptr::read_volatile((table as *const u64).add(index)) }
}

/// Sets entry `index` of the page table at `table`.
pub(super) fn set_table_entry(table: u64, index: usize, value: u64) {
    debug_assert!(index < 512);
    // SAFETY: (1) `table` is a page-table frame of the kernel's (module
    // docs), 4 KiB aligned, and `index` < 512; (2) only `mm::paging` writes
    // tables, one aligned store at a time, so a walker sees the old or the
    // new entry.
    unsafe { core::ptr::write_volatile((table as *mut u64).add(index), value) };
}

/// Makes the page tables at `pml4` the CPU's.
///
/// `mm` calls this only with tables that identity-map everything the
/// kernel uses, with the same translations as before.
pub(super) fn activate_page_tables(pml4: u64) {
    // SAFETY: (1) guaranteed by the caller (above).
    unsafe { crate::arch::cpu::write_cr3(pml4) };
}

/// Continues in `next` on the stack whose top is `top`.
///
/// `mm` calls this only with the top of a fresh guarded stack.
pub(super) fn switch_to_stack(top: u64, next: fn() -> !) -> ! {
    // SAFETY: (1) the top of a fresh, mapped, 16-byte aligned stack nothing else uses; (2) `next`
    // never returns, so the old stack is dead.
    unsafe { crate::arch::cpu::switch_stack(top, next) }
}

/// Calls `function` on the stack whose top is `top`, and returns.
///
/// `mm` calls this only with the top of a fresh guarded stack.
pub(super) fn call_on_stack(top: u64, function: extern "C" fn()) {
    // SAFETY: (1) the top of a fresh, mapped, 16-byte aligned stack nothing
    // else uses (caller); (2) the call leaves it before it returns.
    unsafe { crate::arch::stack::call_on_stack(top, function) }
}

/// Continues in `next` on the crash stack whose top is `top`, with a copy
/// of `value` on it. Only the crash path calls this, once per CPU, with
/// that CPU's own crash stack (fresh and guarded at bring-up, used by
/// nothing else).
pub fn run_on_crash_stack<T: Copy>(top: u64, value: &T, next: fn(&T) -> !) -> ! {
    // SAFETY: (1) the top of this CPU's crash stack (above), 16-byte aligned, mapped, nothing else
    // on it; (2) `next` never returns.
    unsafe { crate::arch::cpu::switch_stack_with(top, value, next) }
}

/// Moves `value` into fresh frames at `frame` (owned, zeroed, page-aligned
/// and large enough), for good.
pub(super) fn place<T>(frame: u64, value: T) -> &'static mut T {
    let pointer = frame as *mut T;
    // SAFETY: (1) the frames are fresh from the allocator, identity-mapped,
    // page-aligned (enough for any T of the kernel) and large enough; (2)
    // never freed, so the reference may live for 'static; (3) nobody else
    // has the frames.
    unsafe {
        pointer.write(value);
        &mut *pointer
    }
}

/// Builds an array of `len` elements made by `make(index)` in fresh frames
/// at `frame` (owned, page-aligned, large enough), for good.
pub(super) fn place_slice_with<T>(
    frame: u64,
    len: usize,
    mut make: impl FnMut(usize) -> T,
) -> &'static mut [T] {
    let pointer = frame as *mut T;
    for index in 0..len {
        let value = make(index);
        // SAFETY: (1) the frames are fresh from the allocator, identity-
        // mapped, page-aligned and nobody else's; (2) there is room for
        // `len` elements, so element `index` is inside them.
        unsafe { pointer.add(index).write(value) };
    }
    // SAFETY: (1) every element was initialized above; (2) never freed.
    unsafe { core::slice::from_raw_parts_mut(pointer, len) }
}

/// The loader's multiboot2 information structure at `address`.
pub fn multiboot2(
    address: u64,
) -> Result<multiboot2::BootInformation<'static>, multiboot2::LoadError> {
    // SAFETY: (1) `address` is what GRUB passed in EBX; (2) the structure is loader memory nobody
    // writes (module docs), and the crate validates its sizes and tags before handing out views of
    // it.
    unsafe {
        multiboot2::BootInformation::load(address as *const multiboot2::BootInformationHeader)
    }
}

/// The ACPI handler that reads firmware tables through the identity map.
pub fn acpi_handler() -> smp_boot::madt::IdentityMapped {
    // SAFETY: (1) the kernel identity-maps the first 4 GiB and all RAM, and nothing writes the
    // firmware's tables (module docs).
    unsafe { smp_boot::madt::IdentityMapped::new() }
}

/// Reads the MADT through the RSDP at `rsdp` (0: none known).
pub fn read_madt(rsdp: u64) -> Result<smp_boot::madt::Topology, smp_boot::madt::MadtError> {
    // SAFETY: (1) the handler maps tables through the identity map of the
    // first 4 GiB and all RAM, and nothing writes them; (2) `rsdp` is where
    // the loader or the BIOS search found the RSDP, and `discover`
    // validates what it reads.
    unsafe { smp_boot::madt::discover(acpi_handler(), rsdp) }
}

/// Finds the ACPI RSDP in the BIOS areas (EBDA and 0xE0000..0x100000).
pub fn find_rsdp_in_bios() -> Option<u64> {
    // SAFETY: (1) the handler maps through the identity map, and nothing
    // writes the BIOS areas; (2) they lie in the first MiB, always mapped.
    unsafe { smp_boot::madt::find_rsdp_bios(acpi_handler()) }
}

/// A permanent allocation that one CPU claims for good: crash-time
/// buffers are made at boot and claimed by the CPU that coordinates the
/// crash, without a lock. That CPU may claim it again: the crash path
/// re-enters the hand-over after a panic inside it, and never returns into
/// the interrupted attempt, whose borrow is dead from then on.
#[derive(Debug)]
pub struct ClaimOnce<T: 'static> {
    value: AtomicPtr<T>,
    owner: core::sync::atomic::AtomicU32,
}

const NO_OWNER: u32 = u32::MAX;

// SAFETY: (1) the value moves to the one CPU that claims it; (2) `T: Send` makes that move sound.
unsafe impl<T: Send + 'static> Sync for ClaimOnce<T> {}

impl<T: 'static> ClaimOnce<T> {
    /// Empty.
    pub const fn new() -> Self {
        Self {
            value: AtomicPtr::new(core::ptr::null_mut()),
            owner: core::sync::atomic::AtomicU32::new(NO_OWNER),
        }
    }

    /// Stores the allocation (at boot, before anyone claims it).
    pub fn put(&self, value: &'static mut T) {
        self.value.store(value, Ordering::Release);
    }

    /// The allocation, to the first CPU that asks and to it alone after.
    pub fn claim(&self, cpu: u32) -> Option<&'static mut T> {
        let owner =
            match self
                .owner
                .compare_exchange(NO_OWNER, cpu, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => cpu,
                Err(owner) => owner,
            };
        let pointer = self.value.load(Ordering::Acquire);
        // SAFETY: (1) a non-null pointer came from the `&'static mut` given
        // to `put`; (2) only its owner gets it, and an owner that claims it
        // again has abandoned its earlier borrow (type docs).
        (owner == cpu && !pointer.is_null()).then(|| unsafe { &mut *pointer })
    }
}

impl<T: 'static> Default for ClaimOnce<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The image's static data, from the end of `.rodata` to the end of
/// `.bss` (the linker script's symbols).
pub fn static_data_range() -> (u64, u64) {
    // SAFETY: (1) the linker script defines both symbols; (2) only their
    // addresses are taken, their bytes are never read.
    unsafe extern "C" {
        static __rodata_end: u8;
        static __bss_end: u8;
    }
    (&raw const __rodata_end as u64, &raw const __bss_end as u64)
}
