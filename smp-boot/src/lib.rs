//! ACPI MADT discovery, the AP trampoline, the SMP bring-up state machine
//! and the call-function slot protocol.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod bringup;
pub mod call;
pub mod madt;
pub mod trampoline;
