//! Defaults and limits of hypervisor options that the harness also needs
//! (to predict what a run will do, and to draw random plans within them).

/// `crash_timeout_ms=`: how long the crash rendezvous waits, by default.
pub const CRASH_TIMEOUT_MS: u64 = 1000;
/// The largest `crash_timeout_ms=` accepted.
pub const MAX_CRASH_TIMEOUT_MS: u64 = 600_000;
/// `guest_run_ms=`: how long guests run at boot, by default.
pub const GUEST_RUN_MS: u64 = 100;
/// The largest `guest_run_ms=` accepted.
pub const MAX_GUEST_RUN_MS: u64 = 3_600_000;
/// `watchdog=`: seconds a CPU may go without a heartbeat before the
/// lockup detector starts the crash path, by default (0 turns it off).
pub const WATCHDOG_SECONDS: u64 = 10;
/// The largest `watchdog=` accepted.
pub const MAX_WATCHDOG_SECONDS: u64 = 3600;
/// `wake_timeout_ms=`: how long hv's capture mode waits for the old CPUs
/// it wakes, by default (as long as bring-up waits at boot: a loaded host
/// can hold an emulated CPU back for hundreds of milliseconds).
pub const WAKE_TIMEOUT_MS: u64 = 5000;
/// The largest `wake_timeout_ms=` accepted.
pub const MAX_WAKE_TIMEOUT_MS: u64 = 60_000;
