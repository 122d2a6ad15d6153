//! The CPU-local area through GS, on stable Rust.
//!
//! Each CPU's GS base points at its own area, which starts with a
//! [`CpuLocalHeader`]: a pointer to the area itself (so `mov reg, gs:[0]`
//! yields the area without reading an MSR) and the CPU's dense index, read
//! on every log line. The per-CPU layer above builds the areas and embeds
//! the header as their first field; this module owns the header's layout.
//!
//! Every CPU installs its area first thing in Rust, before it loads an IDT
//! (so before any handler can ask for it): the boot CPU in `hv_main`, an AP
//! in its entry. Before that, its GS base is 0 and these reads would see
//! the real-mode interrupt vector table.

use core::mem::offset_of;
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

/// IA32_GS_BASE.
const GS_BASE_MSR: u32 = 0xC000_0101;

/// The start of every CPU-local area.
#[derive(Debug)]
#[repr(C)]
pub struct CpuLocalHeader {
    this: AtomicPtr<CpuLocalHeader>,
    index: AtomicU32,
    apic_id: AtomicU32,
}

impl CpuLocalHeader {
    /// A header for CPU `index` (dense, 0 is the boot CPU).
    pub const fn new(index: u32, apic_id: u32) -> Self {
        Self {
            this: AtomicPtr::new(core::ptr::null_mut()),
            index: AtomicU32::new(index),
            apic_id: AtomicU32::new(apic_id),
        }
    }

    /// The CPU's APIC ID.
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Relaxed)
    }

    /// Sets the APIC ID (the boot CPU learns its own after its area exists).
    pub fn set_apic_id(&self, apic_id: u32) {
        self.apic_id.store(apic_id, Ordering::Relaxed);
    }
}

/// A CPU-local area: the header, then the per-CPU layer's data. The
/// layout is this module's, so a pointer to the header is a pointer to the
/// area.
#[derive(Debug)]
#[repr(C)]
pub struct CpuLocalArea<T> {
    header: CpuLocalHeader,
    /// The per-CPU layer's data.
    pub data: T,
}

impl<T> CpuLocalArea<T> {
    /// The area of CPU `index`.
    pub const fn new(index: u32, apic_id: u32, data: T) -> Self {
        Self {
            header: CpuLocalHeader::new(index, apic_id),
            data,
        }
    }

    /// The header.
    pub fn header(&self) -> &CpuLocalHeader {
        &self.header
    }
}

/// Points this CPU's GS base at `area`, for good.
pub fn install<T: Sync>(area: &'static CpuLocalArea<T>) {
    let pointer = core::ptr::from_ref(&area.header).cast_mut();
    area.header.this.store(pointer, Ordering::Release);
    // SAFETY: (1) GS_BASE exists on every x86_64 CPU and the kernel uses no other GS base; (2) the
    // area lives for good.
    unsafe { super::cpu::wrmsr(GS_BASE_MSR, pointer as u64) };
}

/// This CPU's area, as installed by [`install`]. The kernel installs one
/// `CpuLocalArea<T>` type on every CPU, and calls this with that `T`.
pub fn current<T: Sync>() -> &'static CpuLocalArea<T> {
    let area: *const CpuLocalHeader;
    // SAFETY: (1) reads GS:[0], the self pointer of the installed header.
    unsafe {
        core::arch::asm!(
            "mov {}, gs:[{}]",
            out(reg) area,
            const offset_of!(CpuLocalHeader, this),
            options(nostack, readonly, preserves_flags)
        )
    };
    // SAFETY: (1) every CPU runs `install` before anything reads its area
    // (module docs), so the self pointer came from a `&'static
    // CpuLocalArea<T>`; (2) the header is its first field (`repr(C)`);
    // (3) the kernel installs one `T` on every CPU (above).
    unsafe { &*area.cast::<CpuLocalArea<T>>() }
}

/// The dense index of the CPU this runs on.
pub fn current_index() -> u32 {
    let index: u32;
    // SAFETY: (1) reads GS:[8], the index field of the installed header.
    unsafe {
        core::arch::asm!(
            "mov {:e}, gs:[{}]",
            out(reg) index,
            const offset_of!(CpuLocalHeader, index),
            options(nostack, readonly, preserves_flags)
        )
    };
    index
}
