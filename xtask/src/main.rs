//! `cargo xtask`: build hv, boot it in QEMU or Bochs, run the test suite.
//! The commands live in the library ([`xtask::cli`]); this parses the
//! command line and dispatches.

use std::process::ExitCode;

use clap::Parser;
use xtask::cli::{self, Cli};

fn main() -> ExitCode {
    match cli::run(Cli::parse().command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
