//! What the machine and its loader hand over: the boot information
//! (multiboot2 from GRUB, PVH from QEMU's `-kernel`) and the ACPI tables.

pub mod acpi;
pub mod info;
