//! The kernel's layers, checked: a folder of `hv/src` imports only from
//! folders below it (ARCHITECTURE.md). `cargo test -p xtask layers` runs
//! the check; it reads every `crate::NAME` path in the kernel's code.

use std::fs;
use std::path::{Path, PathBuf};

/// `hv/src`'s top-level folders, lowest first.
pub const LAYERS: [&str; 8] = [
    "arch", "console", "mm", "boot", "cpu", "crash", "virt", "capture",
];

/// One import that points up (or out of the known layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The importing file, relative to `hv/src`.
    pub file: String,
    /// Its line (1-based).
    pub line: usize,
    /// The importing layer.
    pub from: String,
    /// The imported layer.
    pub to: String,
}

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|known| *known == layer)
}

/// The layers `source` (a file of layer `from`) names as `crate::LAYER`,
/// with their line numbers, comments left out.
pub fn imported_layers(source: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `$crate::` in a macro names the crate root's items.
            let dollar = at > 0 && rest.as_bytes()[at - 1] == b'$';
            if !name.is_empty() && !dollar {
                found.push((number + 1, name));
            }
            rest = after;
        }
    }
    found
}

/// Every upward import in the kernel at `src` (`hv/src`).
pub fn violations(src: &Path) -> Vec<Violation> {
    let mut violations = Vec::new();
    for layer in LAYERS {
        for file in rust_files(&src.join(layer)) {
            let source = fs::read_to_string(&file).unwrap_or_default();
            let from = rank(layer).unwrap_or(0);
            for (line, name) in imported_layers(&source) {
                let allowed = match rank(&name) {
                    Some(to) => to <= from,
                    // Items of the crate root (macros, `main`): only the
                    // root may use them.
                    None => false,
                };
                if !allowed {
                    violations.push(Violation {
                        file: file
                            .strip_prefix(src)
                            .unwrap_or(&file)
                            .display()
                            .to_string(),
                        line,
                        from: layer.to_owned(),
                        to: name,
                    });
                }
            }
        }
    }
    violations
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_found_outside_comments_and_macros() {
        let source = "use crate::cpu::percpu; // crate::virt\n\
                      let x = crate::mm::phys::read(0, 1);\n\
                      $crate::console::print_line(x);\n";
        assert_eq!(
            imported_layers(source),
            [(1, "cpu".to_owned()), (2, "mm".to_owned())]
        );
    }

    #[test]
    fn an_upward_import_is_named() {
        let dir = std::env::temp_dir().join(format!("xtask-layers-{}", std::process::id()));
        fs::create_dir_all(dir.join("cpu")).unwrap();
        fs::write(
            dir.join("cpu/smp.rs"),
            "use crate::virt::sched;\nuse crate::mm;\n",
        )
        .unwrap();
        assert_eq!(
            violations(&dir),
            [Violation {
                file: "cpu/smp.rs".into(),
                line: 1,
                from: "cpu".into(),
                to: "virt".into(),
            }]
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hv_layers_import_only_downward() {
        let src = crate::paths::workspace_root().join("hv/src");
        let found = violations(&src);
        assert!(
            found.is_empty(),
            "imports that point up a layer (ARCHITECTURE.md): {found:#?}"
        );
        for layer in LAYERS {
            assert!(src.join(layer).is_dir(), "hv/src/{layer} is gone");
        }
    }
}
