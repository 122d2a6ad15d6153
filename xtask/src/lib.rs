//! Host-side tooling for the hypervisor: builds the `hv` image, boots it in
//! QEMU or Bochs, reads the report it prints on its serial console and judges
//! the run.
//!
//! The binary (`cargo xtask ...`) is a thin command-line shell over this
//! library; the integration tests in `tests/` call [`run::qemu`] and
//! [`run::bochs`] directly and assert on the report the hypervisor printed.

pub mod accel;
pub mod bench;
pub mod capture;
pub mod ci;
pub mod cli;
pub mod cmdline;
pub mod cpio;
pub mod crash;
pub mod debian;
pub mod dump;
#[cfg(test)]
mod golden;
pub mod initramfs;
pub mod iso;
pub mod judge;
pub mod kernel;
pub mod kvm_unit_tests;
pub mod layers;
pub mod makedumpfile;
pub mod paths;
pub mod plan;
pub mod process;
pub mod qemu_program;
pub mod readme;
pub mod report;
pub mod run;
pub mod serial;
pub mod stats;
pub mod stress;
pub mod toolchain;
pub mod tools;
