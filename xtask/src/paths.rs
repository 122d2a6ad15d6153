//! Where things live: the workspace root and the directory for build
//! artefacts (ISO images, serial logs, run reports).

use std::path::{Path, PathBuf};

/// The workspace root, found from this crate's own location so that xtask
/// works from any current directory (and from the integration tests, which
/// link this crate as a library).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the xtask crate lives one level below the workspace root")
        .to_path_buf()
}

/// The directory for everything a run produces; gitignored.
pub fn build_dir() -> PathBuf {
    workspace_root().join("build")
}

/// The directory of one named run: `build/<name>`.
pub fn run_dir(name: &str) -> PathBuf {
    build_dir().join(name)
}
