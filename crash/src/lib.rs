//! Loaded-VMCS lists, crash coordination and crash records.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
