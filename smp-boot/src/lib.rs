//! ACPI MADT discovery, the AP trampoline and the SMP bring-up state machine.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod bringup;
pub mod madt;
pub mod trampoline;
