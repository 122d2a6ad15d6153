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

/// Takes `dir/.lock` exclusively (creating `dir`), blocking until no other
/// thread or process holds it; released when the file is dropped. Fetches
/// into a shared directory take turns through it: parallel integration
/// tests on a fresh clone otherwise unpack the same package over each
/// other and delete each other's trees.
pub fn lock_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}
