//! Loaded-VMCS lists, crash coordination and crash records.
//!
//! The pure logic of the crash path, with the hardware behind small traits
//! ([`loaded_vmcs::Vmx`], [`shootdown::CrashHardware`], [`shootdown::Clock`])
//! so that it runs in `cargo test` with fakes and in the kernel with real
//! VMX instructions. No `unsafe`, no allocation, no locks: everything here
//! may run in NMI context on a CPU that was interrupted anywhere.
//!
//! - [`loaded_vmcs`]: each CPU's list of the VMCSes it has loaded (Linux
//!   `loaded_vmcss_on_cpu`), kept correct for an NMI walker between any two
//!   stores, and the crash walk that VMCLEARs them.
//! - [`shootdown`]: the coordinator election, each CPU's crash handler, and
//!   the timed rendezvous that names the CPUs that did not answer.
//! - [`svm`]: the same crash path on SVM: the VMCBs on the same lists, and
//!   how a CPU leaves SVM (STGI, EFER.SVME off, VM_HSAVE_PA 0).
//! - [`cpuset`]: the fixed-size CPU bitmap both use.
//!
//! # How the kernel uses it
//!
//! Two statics, valid from the first instruction (before any AP starts and
//! before VMX is ever on), sized for every possible CPU:
//!
//! ```text
//! static VMCS_LISTS: VmcsArena<MAX_VMCS, MAX_CPUS> = VmcsArena::new();
//! static CRASH: CrashCoordinator<MAX_CPUS> = CrashCoordinator::new();
//! ```
//!
//! **vCPU load on CPU `c`** (pinned to `c`):
//! 1. interrupts enabled: `VMCS_LISTS.evict_from_other_cpu(c, id, |owner, id| ...)`,
//!    where the closure sends `owner` a call-function IPI that runs
//!    `VMCS_LISTS.unload(owner, id, &mut hw, &mut hook)` and waits for its
//!    result;
//! 2. interrupts disabled: `VMCS_LISTS.load_here(c, id, &mut hw, &mut hook)`;
//!    if `newly_on_this_cpu`, rewrite the VMCS host-state fields for `c`
//!    (host GS base, TR, GDTR/IDTR bases, ...);
//! 3. VMLAUNCH if `!is_launched(id)` (then `mark_launched(id)`), else
//!    VMRESUME.
//!
//! **vCPU unload on `c`** (vCPU destroyed, or descheduled eagerly), interrupts
//! disabled: `VMCS_LISTS.unload(c, id, ...)` (VMCLEAR, then unlink), then
//! `free(id)` if destroyed. If it is loaded on another CPU, unload it there
//! through the IPI instead.
//!
//! **Migration** is a load on the new CPU: step 1 makes the old CPU VMCLEAR
//! and unlink it; no separate call.
//!
//! **Crash, first CPU in** (panic, fatal exception, crash hypercall):
//! `match CRASH.enter(c)`:
//! - `Coordinator`: send NMI to all but self; `CRASH.wait_for_rendezvous(&online_but_self,
//!   &mut clock, timeout_us)`; `CRASH.crash_this_cpu(c, &regs, &VMCS_LISTS, &mut hw)`;
//!   summary from the [`shootdown::Rendezvous`] and each CPU's
//!   `CRASH.record(cpu)`; hand over to kexec or halt.
//! - `Responder` or `ReEntered`: `CRASH.crash_this_cpu(...)`, then park
//!   (`cli; hlt` in a loop).
//!
//! **NMI handler**: if `CRASH.coordinator().is_some()`, it is the shootdown:
//! `CRASH.enter(c)`, `CRASH.crash_this_cpu(c, &interrupted_regs, &VMCS_LISTS, &mut hw)`,
//! park. Otherwise, an ordinary NMI.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod accounting;
pub mod cpuset;
pub mod loaded_vmcs;
pub mod shootdown;
pub mod summary;
pub mod svm;

#[cfg(test)]
mod fake;

pub use cpuset::{CpuSet, MAX_CPUS};
