//! The virtual platform of hv's guests.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod cpu_state;
pub mod memory;
pub mod multiboot;
