//! The virtual platform of hv's guests.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod acpi_pm;
pub mod acpi_tables;
pub mod cpu_state;
pub mod cpuid;
pub mod debug_exit;
pub mod decode;
pub mod fw_cfg;
pub mod ioapic;
pub mod lapic;
pub mod memory;
pub mod msr;
pub mod multiboot;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod platform;
pub mod testdev;
pub mod time;
pub mod uart;

#[cfg(test)]
mod robustness;
