//! Loaded-VMCS lists, crash coordination and crash records.
//!
//! The pure logic of the crash path, with the hardware behind small traits
//! ([`loaded_vmcs::Vmx`]) so that it runs in `cargo test` with fakes and in
//! the kernel with real VMX instructions. No `unsafe`, no allocation, no locks: everything here
//! may run in NMI context on a CPU that was interrupted anywhere.
//!
//! - [`loaded_vmcs`]: each CPU's list of the VMCSes it has loaded (Linux
//!   `loaded_vmcss_on_cpu`), kept correct for an NMI walker between any two
//!   stores, and the crash walk that VMCLEARs them.
//! - [`cpuset`]: a fixed-size CPU bitmap.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod cpuset;
pub mod loaded_vmcs;

#[cfg(test)]
mod fake;

pub use cpuset::{CpuSet, MAX_CPUS};
