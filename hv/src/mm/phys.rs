//! Physical memory, the one place besides `arch` where `unsafe` is
//! allowed: every raw pointer the kernel makes to memory is made here.
//!
//! The kernel runs identity-mapped (virtual == physical) over all RAM and
//! the first 4 GiB, so a physical address is a pointer. What makes each
//! access below sound is a kernel-wide ownership rule, stated once:
//!
//! - **Memory the kernel owns** (frames from the frame allocator, the
//!   crash reservation, the stacks): written only by the code that
//!   allocated it, through [`write`], [`fill`], [`with_bytes_mut`] or the
//!   typed placements [`place`] and [`place_slice_with`].
//! - **Memory nobody writes while the kernel runs** (the loader's
//!   structures and boot modules, kept out of the allocator; firmware
//!   tables; the old kernel's memory in capture mode; the kernel's own
//!   image): read through [`read`] and [`c_string`].
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

/// The NUL-terminated string at `address`, at most `max` bytes, without
/// its NUL (empty for address 0 or when no NUL comes within `max`).
pub fn c_string(address: u64, max: usize) -> &'static [u8] {
    if address == 0 {
        return &[];
    }
    let mut len = 0;
    while len < max {
        // SAFETY: (1) identity-mapped loader memory (module docs); (2)
        // read byte by byte, never past the NUL or `max`.
        let byte = unsafe { core::ptr::read((address + len as u64) as *const u8) };
        if byte == 0 {
            return read(address, len as u64);
        }
        len += 1;
    }
    &[]
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
    // SAFETY: identity-mapped memory the caller owns (module docs).
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
        // SAFETY: as in `read_guest`; the guest owns the contents, so a
        // racing write of its own only decides which value stays.
        unsafe { core::ptr::write_volatile((start + offset as u64) as *mut u8, *byte) };
    }
}

/// Entry `index` of the page table at `table`.
pub(super) fn table_entry(table: u64, index: usize) -> u64 {
    debug_assert!(index < 512);
    // SAFETY: `table` is a page-table frame of the kernel's (module docs),
    // 4 KiB aligned, and `index` < 512.
    unsafe { core::ptr::read_volatile((table as *const u64).add(index)) }
}

/// Sets entry `index` of the page table at `table`.
pub(super) fn set_table_entry(table: u64, index: usize, value: u64) {
    debug_assert!(index < 512);
    // SAFETY: as in `table_entry`; only `mm::paging` writes tables.
    unsafe { core::ptr::write_volatile((table as *mut u64).add(index), value) };
}

/// Makes the page tables at `pml4` the CPU's.
///
/// `mm` calls this only with tables that identity-map everything the
/// kernel uses, with the same translations as before.
pub(super) fn activate_page_tables(pml4: u64) {
    // SAFETY: guaranteed by the caller (above).
    unsafe { crate::arch::cpu::write_cr3(pml4) };
}

/// Continues in `next` on the stack whose top is `top`.
///
/// `mm` calls this only with the top of a fresh guarded stack.
pub(super) fn switch_to_stack(top: u64, next: fn() -> !) -> ! {
    // SAFETY: the top of a fresh, mapped, 16-byte aligned stack nothing
    // else uses; `next` never returns, so the old stack is dead.
    unsafe { crate::arch::cpu::switch_stack(top, next) }
}

/// Calls `function` on the stack whose top is `top`, and returns.
///
/// `mm` calls this only with the top of a fresh guarded stack.
pub(super) fn call_on_stack(top: u64, function: extern "C" fn()) {
    // SAFETY: the top of a fresh, mapped, 16-byte aligned stack nothing
    // else uses (caller), which the call leaves before it returns.
    unsafe { crate::arch::stack::call_on_stack(top, function) }
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
        // SAFETY: as in `place`, with room for `len` elements.
        unsafe { pointer.add(index).write(value) };
    }
    // SAFETY: every element was initialized above; never freed.
    unsafe { core::slice::from_raw_parts_mut(pointer, len) }
}

/// The loader's multiboot2 information structure at `address`.
pub fn multiboot2(
    address: u64,
) -> Result<multiboot2::BootInformation<'static>, multiboot2::LoadError> {
    // SAFETY: `address` is what GRUB passed in EBX; the structure is loader
    // memory nobody writes (module docs), and the crate validates its
    // sizes and tags before handing out views of it.
    unsafe {
        multiboot2::BootInformation::load(address as *const multiboot2::BootInformationHeader)
    }
}

/// The ACPI handler that reads firmware tables through the identity map.
pub fn acpi_handler() -> smp_boot::madt::IdentityMapped {
    // SAFETY: the kernel identity-maps the first 4 GiB and all RAM, and
    // nothing writes the firmware's tables (module docs).
    unsafe { smp_boot::madt::IdentityMapped::new() }
}

/// Reads the MADT through the RSDP at `rsdp` (0: none known).
pub fn read_madt(rsdp: u64) -> Result<smp_boot::madt::Topology, smp_boot::madt::MadtError> {
    // SAFETY: as in `acpi_handler`; `rsdp` is where the loader or the BIOS
    // search found the RSDP, and `discover` validates what it reads.
    unsafe { smp_boot::madt::discover(acpi_handler(), rsdp) }
}

/// Finds the ACPI RSDP in the BIOS areas (EBDA and 0xE0000..0x100000).
pub fn find_rsdp_in_bios() -> Option<u64> {
    // SAFETY: as in `acpi_handler`; the BIOS areas lie in the first MiB.
    unsafe { smp_boot::madt::find_rsdp_bios(acpi_handler()) }
}

/// A permanent allocation handed to exactly one taker, once: crash-time
/// buffers are made at boot and taken by the one CPU that needs them,
/// without a lock.
#[derive(Debug)]
pub struct TakeOnce<T: 'static> {
    value: AtomicPtr<T>,
}

// SAFETY: the value moves to whichever CPU takes it, once; `T: Send` makes
// that move sound.
unsafe impl<T: Send + 'static> Sync for TakeOnce<T> {}

impl<T: 'static> TakeOnce<T> {
    /// Empty.
    pub const fn new() -> Self {
        Self {
            value: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// Stores the allocation (once; a second put replaces nothing taken).
    pub fn put(&self, value: &'static mut T) {
        self.value.store(value, Ordering::Release);
    }

    /// The allocation, to the first caller only.
    pub fn take(&self) -> Option<&'static mut T> {
        let pointer = self.value.swap(core::ptr::null_mut(), Ordering::AcqRel);
        // SAFETY: a non-null pointer came from the `&'static mut` given to
        // `put`, and the swap hands it to exactly one caller.
        (!pointer.is_null()).then(|| unsafe { &mut *pointer })
    }
}

impl<T: 'static> Default for TakeOnce<T> {
    fn default() -> Self {
        Self::new()
    }
}
