//! Debian's `makedumpfile` in the Linux capture kernel's initramfs, and
//! what xtask does with its output.
//!
//! - [`kit`]: the binary from the `makedumpfile` package, with every shared
//!   library it loads (its `DT_NEEDED`, then theirs) and its `PT_INTERP`
//!   loader, taken from the packages apt names as its dependencies (fetched
//!   with `apt-get download`, unpacked with `dpkg-deb -x`), kept in
//!   `build/makedumpfile/`. No tool runs on the host: the ELF files are
//!   read with the `object` crate.
//! - In the capture kernel, `/init` runs it twice on `/proc/vmcore`, at
//!   dump level 1 (zero pages left out): `-E` (ELF, for gdb and drgn) and
//!   `-c` (the compressed kdump format), each with `-F`, the flattened
//!   format makedumpfile writes to a pipe (as `makedumpfile -F | ssh`
//!   does), onto its own raw virtio disk through `dd`.
//! - [`rearrange`]: on the host, the flattened stream is written out as the
//!   file it describes, as `makedumpfile -R` would.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};

use crate::{debian, paths};

/// The Debian package.
pub const PACKAGE: &str = "makedumpfile";
/// Where the binary goes in the initramfs.
pub const INITRAMFS_BINARY: &str = "bin/makedumpfile";
/// Where its libraries go in the initramfs (`LD_LIBRARY_PATH`).
pub const INITRAMFS_LIBRARIES: &str = "lib";
/// The dump level: 1 leaves out pages full of zeros, and nothing else
/// (levels above it need a Linux kernel's VMCOREINFO).
pub const DUMP_LEVEL: u32 = 1;
/// The file listing the kept libraries, written last (its presence says
/// the directory is complete).
const MANIFEST: &str = "libraries";
/// Packages never fetched for libraries: `perl` runs `makedumpfile-R.pl`,
/// which the capture kernel does not need.
const SKIPPED_PACKAGES: [&str; 1] = ["perl"];
/// Most packages fetched while looking for libraries.
const MAX_PACKAGES: usize = 40;

/// makedumpfile and what it loads, ready for the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kit {
    /// The binary.
    pub binary: PathBuf,
    /// The dynamic loader, and the absolute path the binary asks for it by
    /// (`PT_INTERP`, e.g. `/lib64/ld-linux-x86-64.so.2`).
    pub interpreter: (String, PathBuf),
    /// Every library it loads, by soname.
    pub libraries: Vec<(String, PathBuf)>,
}

/// Fetches makedumpfile and its libraries the first time; reuses them
/// afterwards.
pub fn kit() -> Result<Kit> {
    package_kit(PACKAGE, PACKAGE)
}

/// Fetches the binary `binary` of Debian's package `package` and the
/// libraries it loads the first time (into `build/<package>/`); reuses
/// them afterwards. makedumpfile's way, for any dynamic executable (the
/// Linux reference of `bench crash` takes `kexec` from `kexec-tools`).
pub fn package_kit(package: &str, binary: &str) -> Result<Kit> {
    let dir = paths::build_dir().join(package);
    if let Ok(kit) = kept(&dir, binary) {
        return Ok(kit);
    }
    let _turn = paths::lock_dir(&dir)?;
    if let Ok(kit) = kept(&dir, binary) {
        return Ok(kit);
    }
    eprintln!("xtask: fetching {package} and the libraries its {binary} loads");
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let result = fetch(&dir, &root, package, binary);
    let _ = fs::remove_dir_all(&root);
    result
}

fn fetch(dir: &Path, root: &Path, package: &str, binary_name: &str) -> Result<Kit> {
    debian::download_and_extract(&[package], dir, root)?;
    let binary = ["usr/bin", "usr/sbin", "sbin", "bin"]
        .iter()
        .map(|d| root.join(d).join(binary_name))
        .find(|p| p.is_file())
        .with_context(|| format!("the {package} package holds no {binary_name} binary"))?;
    let interpreter = dynamic_info(&fs::read(&binary)?)?
        .interpreter
        .with_context(|| format!("{binary_name} has no PT_INTERP: not a dynamic executable"))?;

    // Walk apt's dependencies until every library is found.
    let mut fetched: BTreeSet<String> = [package.to_owned()].into();
    let mut queue: VecDeque<String> = debian::depends(package)?.into();
    loop {
        let (found, missing) = resolve(root, &binary)?;
        if missing.is_empty() {
            return keep(dir, root, &binary, binary_name, &interpreter, &found);
        }
        let batch: Vec<String> = std::iter::from_fn(|| queue.pop_front())
            .filter(|p| !fetched.contains(p) && !SKIPPED_PACKAGES.contains(&p.as_str()))
            .collect();
        if batch.is_empty() || fetched.len() + batch.len() > MAX_PACKAGES {
            bail!(
                "{binary_name} needs {} that no package among its dependencies ({}) provides",
                missing.iter().cloned().collect::<Vec<_>>().join(", "),
                fetched.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        let names: Vec<&str> = batch.iter().map(String::as_str).collect();
        debian::download_and_extract(&names, dir, root)?;
        for package in batch {
            queue.extend(debian::depends(&package)?);
            fetched.insert(package);
        }
    }
}

/// The libraries `binary` loads, found under `root`, and the sonames not
/// found there yet.
fn resolve(root: &Path, binary: &Path) -> Result<(BTreeMap<String, PathBuf>, BTreeSet<String>)> {
    let mut found = BTreeMap::new();
    let mut missing = BTreeSet::new();
    let mut pending: Vec<String> = dynamic_info(&fs::read(binary)?)?.needed;
    while let Some(soname) = pending.pop() {
        if found.contains_key(&soname) || missing.contains(&soname) {
            continue;
        }
        match find_library(root, &soname) {
            Some(path) => {
                let elf = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                pending.extend(dynamic_info(&elf)?.needed);
                found.insert(soname, path);
            }
            None => {
                missing.insert(soname);
            }
        }
    }
    Ok((found, missing))
}

/// A library by soname in the multiarch directories of an unpacked tree,
/// symbolic links followed inside the tree.
fn find_library(root: &Path, soname: &str) -> Option<PathBuf> {
    [
        "lib/x86_64-linux-gnu",
        "usr/lib/x86_64-linux-gnu",
        "lib",
        "usr/lib",
    ]
    .iter()
    .map(|d| root.join(d).join(soname))
    .find_map(|p| resolve_in(root, &p))
}

/// Follows symbolic links of `path` inside `root` (an absolute target is
/// taken as relative to `root`), up to a few hops.
fn resolve_in(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut path = path.to_path_buf();
    for _ in 0..8 {
        let meta = fs::symlink_metadata(&path).ok()?;
        if !meta.file_type().is_symlink() {
            return meta.is_file().then_some(path);
        }
        let target = fs::read_link(&path).ok()?;
        path = match target.strip_prefix("/") {
            Ok(inside) => root.join(inside),
            Err(_) => path.parent()?.join(target),
        };
    }
    None
}

fn keep(
    dir: &Path,
    root: &Path,
    binary: &Path,
    binary_name: &str,
    interpreter: &str,
    found: &BTreeMap<String, PathBuf>,
) -> Result<Kit> {
    let loader = resolve_in(root, &root.join(interpreter.trim_start_matches('/')))
        .with_context(|| format!("the loader {interpreter} is in none of the packages"))?;
    let lib_dir = dir.join("lib");
    if lib_dir.exists() {
        fs::remove_dir_all(&lib_dir)?;
    }
    fs::create_dir_all(&lib_dir)?;
    let copy = |from: &Path, to: &Path| {
        fs::copy(from, to).with_context(|| format!("copying {}", from.display()))
    };
    copy(binary, &dir.join(binary_name))?;
    let loader_name = Path::new(interpreter)
        .file_name()
        .context("PT_INTERP names no file")?;
    copy(&loader, &dir.join(loader_name))?;
    for (soname, path) in found {
        copy(path, &lib_dir.join(soname))?;
    }
    let manifest: String = std::iter::once(format!("interpreter {interpreter}\n"))
        .chain(found.keys().map(|s| format!("{s}\n")))
        .collect();
    fs::write(dir.join(MANIFEST), manifest)?;
    kept(dir, binary_name)
}

/// What an earlier fetch kept.
fn kept(dir: &Path, binary_name: &str) -> Result<Kit> {
    let text = fs::read_to_string(dir.join(MANIFEST))?;
    let mut lines = text.lines();
    let interpreter = lines
        .next()
        .and_then(|l| l.strip_prefix("interpreter "))
        .context("no interpreter line")?
        .to_owned();
    let loader = dir.join(
        Path::new(&interpreter)
            .file_name()
            .context("bad interpreter")?,
    );
    let libraries: Vec<(String, PathBuf)> = lines
        .filter(|l| !l.is_empty())
        .map(|soname| (soname.to_owned(), dir.join("lib").join(soname)))
        .collect();
    let binary = dir.join(binary_name);
    if !binary.is_file() || !loader.is_file() || !libraries.iter().all(|(_, p)| p.is_file()) {
        bail!("{} is incomplete", dir.display());
    }
    Ok(Kit {
        binary,
        interpreter: (interpreter, loader),
        libraries,
    })
}

/// What a dynamically linked ELF file asks of the loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicInfo {
    /// `DT_NEEDED` sonames, in order.
    pub needed: Vec<String>,
    /// `PT_INTERP`, if any.
    pub interpreter: Option<String>,
}

/// Reads `DT_NEEDED` and `PT_INTERP` of a little-endian ELF64 file.
pub fn dynamic_info(elf: &[u8]) -> Result<DynamicInfo> {
    let header = object::elf::FileHeader64::<object::LittleEndian>::parse(elf)
        .context("not a little-endian ELF64 file")?;
    let endian = header.endian()?;
    let mut interpreter = None;
    for segment in header.program_headers(endian, elf)? {
        if let Some(path) = segment.interpreter(endian, elf)? {
            interpreter = Some(String::from_utf8_lossy(path).into_owned());
        }
    }
    let sections = header.sections(endian, elf)?;
    let mut needed = Vec::new();
    if let Some((entries, strings_index)) = sections.dynamic(endian, elf)? {
        let strings = sections.strings(endian, elf, strings_index)?;
        for entry in entries {
            if entry.d_tag(endian) == u64::from(object::elf::DT_NEEDED) {
                let offset = u32::try_from(entry.d_val(endian)).context("bad DT_NEEDED")?;
                let name = strings
                    .get(offset)
                    .map_err(|()| anyhow::anyhow!("DT_NEEDED outside .dynstr"))?;
                needed.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Ok(DynamicInfo {
        needed,
        interpreter,
    })
}

/// The flattened format's signature, at offset 0 of its 4096-byte header.
const FLAT_SIGNATURE: &[u8] = b"makedumpfile";
/// Its header's length.
const FLAT_HEADER_LEN: u64 = 4096;
/// Largest block accepted (makedumpfile writes at most a few MiB).
const MAX_FLAT_BLOCK: u64 = 1 << 30;

/// What [`rearrange`] read and wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rearranged {
    /// Bytes of the flattened stream, header and end marker included.
    pub stream_bytes: u64,
    /// Data blocks.
    pub blocks: u64,
    /// Length of the file written.
    pub file_bytes: u64,
}

/// Writes the file a flattened makedumpfile stream describes (what
/// `makedumpfile -R` does): a 4096-byte header (`makedumpfile`, then type
/// and version 1 as big-endian i64), then blocks of big-endian `offset`
/// and `size` (i64 each) followed by `size` bytes for file offset
/// `offset`, then an end marker of offset and size -1. `input` may go on
/// past the end marker (a disk image).
pub fn rearrange(input: &Path, out: &Path) -> Result<Rearranged> {
    let file = fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; FLAT_HEADER_LEN as usize];
    reader
        .read_exact(&mut header)
        .context("no flattened makedumpfile header")?;
    let word = |bytes: &[u8], at: usize| {
        i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
    };
    if !header.starts_with(FLAT_SIGNATURE)
        || header[FLAT_SIGNATURE.len()..16].iter().any(|&b| b != 0)
    {
        bail!("{}: no flattened makedumpfile signature", input.display());
    }
    if word(&header, 16) != 1 || word(&header, 24) != 1 {
        bail!(
            "{}: flattened header type {} version {}, expected 1 and 1",
            input.display(),
            word(&header, 16),
            word(&header, 24)
        );
    }
    let mut output =
        fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut stream_bytes = FLAT_HEADER_LEN;
    let mut blocks = 0u64;
    let mut file_bytes = 0u64;
    let mut buffer = Vec::new();
    loop {
        let mut block = [0u8; 16];
        reader.read_exact(&mut block).with_context(|| {
            format!("the flattened stream ends after {stream_bytes} bytes without its end marker")
        })?;
        stream_bytes += 16;
        let (offset, size) = (word(&block, 0), word(&block, 8));
        if offset == -1 && size == -1 {
            break;
        }
        let (Ok(offset), Ok(size)) = (u64::try_from(offset), u64::try_from(size)) else {
            bail!("block {blocks} at stream byte {stream_bytes}: offset {offset}, size {size}");
        };
        if size > MAX_FLAT_BLOCK {
            bail!("block {blocks}: {size} bytes, more than a block can hold");
        }
        let end = offset
            .checked_add(size)
            .with_context(|| format!("block {blocks}: offset {offset} + {size} overflows"))?;
        buffer.resize(size as usize, 0);
        reader
            .read_exact(&mut buffer)
            .with_context(|| format!("block {blocks}: the stream ends inside its {size} bytes"))?;
        output.seek(SeekFrom::Start(offset))?;
        output.write_all(&buffer)?;
        stream_bytes += size;
        blocks += 1;
        file_bytes = file_bytes.max(end);
    }
    output.set_len(file_bytes)?;
    Ok(Rearranged {
        stream_bytes,
        blocks,
        file_bytes,
    })
}

/// The signature of a kdump-compressed file (`disk_dump_header`).
pub const KDUMP_SIGNATURE: &[u8; 8] = b"KDUMP   ";

/// Whether `path` starts like a kdump-compressed file.
pub fn is_kdump_compressed(path: &Path) -> Result<bool> {
    let mut start = [0u8; 8];
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(file.read_exact(&mut start).is_ok() && &start == KDUMP_SIGNATURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(blocks: &[(i64, &[u8])], end: bool) -> Vec<u8> {
        let mut stream = vec![0u8; FLAT_HEADER_LEN as usize];
        stream[..12].copy_from_slice(FLAT_SIGNATURE);
        stream[16..24].copy_from_slice(&1i64.to_be_bytes());
        stream[24..32].copy_from_slice(&1i64.to_be_bytes());
        for (offset, data) in blocks {
            stream.extend_from_slice(&offset.to_be_bytes());
            stream.extend_from_slice(&(data.len() as i64).to_be_bytes());
            stream.extend_from_slice(data);
        }
        if end {
            stream.extend_from_slice(&(-1i64).to_be_bytes());
            stream.extend_from_slice(&(-1i64).to_be_bytes());
        }
        stream
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-mdf-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn a_flattened_stream_is_written_out_as_its_file() {
        let input = scratch("ok.flat");
        let out = scratch("ok.out");
        // Out of order, a hole, and a disk image's zeros after the end.
        let mut stream = flat(&[(64, b"tail"), (0, b"head"), (8, b"mid")], true);
        let stream_len = stream.len() as u64;
        stream.extend_from_slice(&[0u8; 4096]);
        fs::write(&input, stream).unwrap();
        let done = rearrange(&input, &out).unwrap();
        assert_eq!(
            done,
            Rearranged {
                stream_bytes: stream_len,
                blocks: 3,
                file_bytes: 68
            }
        );
        let bytes = fs::read(&out).unwrap();
        assert_eq!(&bytes[..4], b"head");
        assert_eq!(&bytes[8..11], b"mid");
        assert_eq!(&bytes[4..8], [0; 4]);
        assert_eq!(&bytes[64..], b"tail");
    }

    #[test]
    fn damaged_streams_are_refused_with_the_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (flat(&[(0, b"x")], false), "without its end marker"),
            (
                {
                    let mut s = flat(&[], true);
                    s[0] = b'M';
                    s
                },
                "signature",
            ),
            (
                {
                    let mut s = flat(&[], true);
                    s[23] = 2;
                    s
                },
                "type 2",
            ),
            (flat(&[(-5, b"x")], true), "offset -5"),
            (
                {
                    let mut s = flat(&[(0, b"abcd")], true);
                    s.truncate(s.len() - 18);
                    s
                },
                "ends inside",
            ),
            (vec![0u8; 100], "no flattened makedumpfile header"),
        ];
        for (i, (stream, expected)) in cases.into_iter().enumerate() {
            let input = scratch(&format!("bad{i}.flat"));
            fs::write(&input, stream).unwrap();
            let error = format!("{:#}", rearrange(&input, &scratch("bad.out")).unwrap_err());
            assert!(error.contains(expected), "case {i}: {error}");
        }
    }

    #[test]
    fn a_huge_block_size_is_refused_before_any_allocation() {
        let mut stream = flat(&[], false);
        stream.extend_from_slice(&0i64.to_be_bytes());
        stream.extend_from_slice(&(1i64 << 40).to_be_bytes());
        let input = scratch("huge.flat");
        fs::write(&input, stream).unwrap();
        let error = rearrange(&input, &scratch("huge.out"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("more than a block can hold"), "{error}");
    }

    #[test]
    fn needed_libraries_and_the_loader_are_read_from_an_executable() {
        // This test binary is itself a dynamically linked executable.
        let elf = fs::read(std::env::current_exe().unwrap()).unwrap();
        let info = dynamic_info(&elf).unwrap();
        assert!(
            info.needed.iter().any(|n| n.starts_with("libc.so")),
            "{info:?}"
        );
        let loader = info.interpreter.unwrap();
        assert!(
            loader.starts_with('/') && loader.contains("ld-linux"),
            "{loader}"
        );
        assert!(dynamic_info(b"not an elf").is_err());
    }

    #[test]
    fn symbolic_links_resolve_inside_the_tree() {
        let root = scratch("tree");
        let _ = fs::remove_dir_all(&root);
        let lib = root.join("lib/x86_64-linux-gnu");
        fs::create_dir_all(&lib).unwrap();
        fs::create_dir_all(root.join("lib64")).unwrap();
        fs::write(lib.join("libz.so.1.2.13"), b"z").unwrap();
        std::os::unix::fs::symlink("libz.so.1.2.13", lib.join("libz.so.1")).unwrap();
        std::os::unix::fs::symlink("/lib/x86_64-linux-gnu/libz.so.1", root.join("lib64/ld.so"))
            .unwrap();
        assert_eq!(
            find_library(&root, "libz.so.1"),
            Some(lib.join("libz.so.1.2.13"))
        );
        assert_eq!(
            resolve_in(&root, &root.join("lib64/ld.so")),
            Some(lib.join("libz.so.1.2.13"))
        );
        assert_eq!(find_library(&root, "libnone.so.1"), None);
    }
}
