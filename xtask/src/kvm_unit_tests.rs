//! Real guests: kernels given to hv as `guest` boot modules, and the
//! `kvm-unit-tests` command that runs the suite's cfg entries as such
//! guests in Bochs.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::iso::BootModule;

/// A guest boot module from `FILE [WORDS]`: the file, and the words of
/// its `guest` module line.
pub fn guest_module(spec: &str) -> Result<BootModule> {
    let spec = spec.trim();
    let (file, words) = spec.split_once(char::is_whitespace).unwrap_or((spec, ""));
    if file.is_empty() {
        bail!("--guest needs a file");
    }
    let file = PathBuf::from(file);
    if !file.is_file() {
        bail!("no guest kernel at {}", file.display());
    }
    let words = words.trim();
    Ok(BootModule {
        file,
        cmdline: if words.is_empty() {
            "guest".to_owned()
        } else {
            format!("guest {words}")
        },
    })
}
