//! Judging a run: every rule a run is held to, in one place, with one
//! entry per kind of run.
//!
//! | run | entry | rules |
//! |---|---|---|
//! | a boot (`qemu-smp`, `bochs`, the tests' runs) | [`judge`] | `done`, no panic or exception, the CPUs, the backend, the guests stopped, the exit status (`judge/run.rs`) |
//! | a crash run (`crash=`, the crash hypercall, `hang=`, the NMI button, `stray_write=`) | [`judge`], which hands over to `crash` | the shootdown (`judge/crash.rs`), the VMX accounting (`judge/accounting.rs`), the special triggers and disturbing points (`judge/trigger.rs`) |
//! | a capture run (`--capture hv\|linux`) | [`capture::conclude`] | the run's own verdict again, then the capture: digests, entry, the dump, its notes and ledger, the wake ([`crate::capture::wake`]) |
//! | a kvm-unit-tests guest | [`guest()`] | its stop reason and the test's verdict |
//!
//! Every judge reads the typed report ([`crate::report::model`]) and names
//! every problem it finds; a run is ok only when there is none.

mod accounting;
pub mod capture;
mod crash;
pub mod guest;
mod run;
mod trigger;

pub use guest::guest;
pub use run::{
    End, ExitConvention, QEMU_EXIT_CRASH, QEMU_EXIT_FAILURE, QEMU_EXIT_SUCCESS, Verdict, judge,
    judge_report,
};
pub use trigger::EXTERNAL_NMI;
