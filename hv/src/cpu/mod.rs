//! The CPUs: per-CPU state, bringing up the APs, IPIs between CPUs, the
//! idle loop, and time (the TSC).

pub mod idle;
pub mod ipi;
pub mod percpu;
pub mod smp;
pub mod time;
pub mod watchdog;
