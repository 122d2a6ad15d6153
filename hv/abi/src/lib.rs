//! What crosses crate and machine boundaries, defined once.
//!
//! The crashed hypervisor writes these and another program reads them: the
//! capture kernel, the harness (`xtask`), gdb and drgn. So each format is
//! here, with its encoder and its decoder side by side, and every crate
//! that speaks it depends on this one:
//!
//! - [`regs`]: a CPU's registers in `user_regs_struct` order (the crash
//!   records and the dump's `NT_PRSTATUS` notes);
//! - [`crash_note`]: the hypervisor's private `HVCRASH` note (reason,
//!   coordinator, stragglers, the per-CPU VMCLEAR ledger);
//! - [`e820`]: the memory types every map uses;
//! - [`dump_stream`]: the `HVDUMP1` stream hv's capture mode writes;
//! - [`pvh`]: the PVH boot ABI (`hvm_start_info`, module list, memory map);
//! - [`knobs`] and [`defaults`]: the crash-injection knob and the option
//!   defaults the harness must read exactly as the hypervisor does;
//! - [`hypercall`]: the in-tree test guest's hypercalls;
//! - [`bytes`]: little-endian field access that never panics.
//!
//! No `unsafe`, no allocation, no dependencies.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod bytes;
pub mod crash_note;
pub mod defaults;
pub mod dump_stream;
pub mod e820;
pub mod hypercall;
pub mod knobs;
pub mod pvh;
pub mod regs;
