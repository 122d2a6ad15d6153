//! The processor and the linker, touched directly: every instruction that
//! needs `unsafe`, every line of assembly and every linker symbol lives
//! here (physical memory has its own module, `mm::phys`). The rest of the
//! kernel calls the safe functions these modules export, and each function
//! says what it relies on.
//!
//! Nothing here imports another layer of the kernel: handlers above are
//! *registered* with the IDT ([`idt::register`]), the boot stub calls the
//! function named by [`entry_point!`](crate::entry_point), and per-CPU data is reached
//! through a header whose layout this layer owns ([`cpu_local`]).

pub mod apic;
pub mod apic_timer;
pub mod atomic_fn;
pub mod blobs;
pub mod boot;
pub mod cpu;
pub mod cpu_local;
pub mod fixup;
pub mod gdt;
pub mod guest_switch;
pub mod idt;
pub mod pic;
pub mod port;
pub mod stack;
pub mod svm;
pub mod vmx;
pub mod xsave;
