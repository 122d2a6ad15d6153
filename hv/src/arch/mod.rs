//! Everything that touches the processor directly. The rest of the kernel
//! goes through the safe functions these modules export.

pub mod apic;
pub mod boot;
pub mod cpu;
pub mod gdt;
pub mod idt;
pub mod pic;
pub mod port;
