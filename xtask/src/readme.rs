//! The README's GRUB stanza, read back so that a test boots exactly what a
//! user copies: the fenced block between [`STANZA_BEGIN`] and
//! [`STANZA_END`] in `README.md`.

use anyhow::{Context, Result, bail};

/// The marker before the stanza's code block.
pub const STANZA_BEGIN: &str = "<!-- grub-stanza:begin -->";
/// The marker after it.
pub const STANZA_END: &str = "<!-- grub-stanza:end -->";

/// One `multiboot2` or `module2` line: the file and its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// The path GRUB loads, as written.
    pub path: String,
    /// The words after it.
    pub words: Vec<String>,
}

/// The stanza as written, and what it loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza {
    /// Its lines, verbatim.
    pub lines: Vec<String>,
    /// The `multiboot2` line: hv and its options.
    pub hv: Load,
    /// The `module2` line whose first word is `capture`.
    pub capture_kernel: Load,
    /// The `module2` line whose first word is `capture-initrd`.
    pub capture_initrd: Load,
}

/// The stanza of `readme`: the lines of the fenced code block between the
/// markers, which must hold one `multiboot2` line and the two `module2`
/// lines hv's capture needs.
pub fn grub_stanza(readme: &str) -> Result<Stanza> {
    let (_, rest) = readme
        .split_once(STANZA_BEGIN)
        .with_context(|| format!("the README has no {STANZA_BEGIN} marker"))?;
    let (block, _) = rest
        .split_once(STANZA_END)
        .with_context(|| format!("the README has no {STANZA_END} marker after the first"))?;
    let mut fences = block.lines().filter(|l| l.trim_start().starts_with("```"));
    if fences.next().is_none() || fences.next().is_none() || fences.next().is_some() {
        bail!("between the stanza's markers there must be exactly one ``` code block");
    }
    let lines: Vec<String> = block
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("```"))
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("```"))
        .map(str::to_owned)
        .collect();
    let loads = |command: &str| -> Vec<Load> {
        lines
            .iter()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some(command)).then(|| Load {
                    path: words.next().unwrap_or_default().to_owned(),
                    words: words.map(str::to_owned).collect(),
                })
            })
            .collect()
    };
    let mut kernels = loads("multiboot2");
    if kernels.len() != 1 || kernels[0].path.is_empty() {
        bail!("the stanza must have one `multiboot2 PATH ...` line");
    }
    let modules = loads("module2");
    let module = |role: &str| -> Result<Load> {
        let mut found = modules
            .iter()
            .filter(|m| m.words.first().map(String::as_str) == Some(role));
        match (found.next(), found.next()) {
            (Some(load), None) if !load.path.is_empty() => Ok(load.clone()),
            _ => bail!("the stanza must have one `module2 PATH {role} ...` line"),
        }
    };
    Ok(Stanza {
        capture_kernel: module("capture")?,
        capture_initrd: module("capture-initrd")?,
        hv: kernels.remove(0),
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = "# hv\n\ntext\n\n<!-- grub-stanza:begin -->\n```\nmenuentry \"hv\" {\n    \
        multiboot2 /boot/hv crashkernel=256M\n    module2 /boot/vmlinuz capture console=ttyS0\n    \
        module2 /boot/initrd.img capture-initrd\n}\n```\n<!-- grub-stanza:end -->\nmore\n";

    #[test]
    fn the_block_between_the_markers_is_read_verbatim() {
        let stanza = grub_stanza(README).unwrap();
        assert_eq!(stanza.lines.len(), 5);
        assert_eq!(stanza.lines[1], "    multiboot2 /boot/hv crashkernel=256M");
        assert_eq!(stanza.hv.path, "/boot/hv");
        assert_eq!(stanza.hv.words, ["crashkernel=256M"]);
        assert_eq!(stanza.capture_kernel.path, "/boot/vmlinuz");
        assert_eq!(stanza.capture_kernel.words, ["capture", "console=ttyS0"]);
        assert_eq!(stanza.capture_initrd.path, "/boot/initrd.img");
    }

    #[test]
    fn a_stanza_missing_a_piece_is_refused() {
        assert!(grub_stanza("no markers").is_err());
        assert!(grub_stanza(&README.replace(STANZA_END, "")).is_err());
        let no_initrd = README.replace("capture-initrd", "other");
        let error = grub_stanza(&no_initrd).unwrap_err().to_string();
        assert!(error.contains("capture-initrd"), "{error}");
        let two_kernels = README.replace("module2 /boot/vmlinuz", "multiboot2 /boot/vmlinuz");
        assert!(grub_stanza(&two_kernels).is_err());
        assert!(grub_stanza(&README.replace("```\n<!--", "<!--")).is_err());
    }

    /// The repository's own README has a stanza that reads.
    #[test]
    fn the_readme_has_a_stanza() {
        let readme = std::fs::read_to_string(crate::paths::workspace_root().join("README.md"))
            .expect("README.md");
        let stanza = grub_stanza(&readme).unwrap();
        assert!(
            stanza
                .hv
                .words
                .iter()
                .any(|w| w.starts_with("crashkernel="))
        );
    }
}
