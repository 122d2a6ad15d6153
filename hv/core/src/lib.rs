//! Host-testable logic of the hypervisor: command line, boot memory map,
//! frame allocation, crash-kernel placement, page tables, TSC calibration,
//! lock-free log ring, VM-exit dispatch and SVM exit decoding, guest module
//! command lines, per-core run queues.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod cmdline;
pub mod crashkernel;
pub mod exits;
pub mod frames;
pub mod guest_spec;
pub mod json;
pub mod logring;
pub mod memmap;
pub mod paging;
pub mod runqueue;
pub mod svm_exit;
pub mod tsc;
