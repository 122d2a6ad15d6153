//! The `newc` cpio format ("SVR4 with no CRC"), the one format Linux
//! unpacks as an initramfs (`init/initramfs.c`).
//!
//! Every entry is a 110-byte ASCII header, `070701` then thirteen 8-digit
//! hexadecimal fields (inode, mode, uid, gid, nlink, mtime, file size,
//! device major and minor, rdev major and minor, name size with its NUL,
//! check = 0), then the NUL-terminated name padded to a multiple of 4
//! bytes, then the data padded to a multiple of 4 bytes. The archive ends
//! with an entry named `TRAILER!!!`. Written here rather than with the
//! `cpio` tool, which is not installed on a fresh Debian machine.

use std::collections::BTreeSet;

use anyhow::{Result, bail};

/// The newc magic.
const MAGIC: &[u8; 6] = b"070701";
/// Size of an entry header.
const HEADER_LEN: usize = 110;
/// The name of the closing entry.
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `mode` (`S_IFMT` values).
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// An archive being written in memory, entry by entry.
///
/// Names are paths relative to the root (`bin/busybox`, no leading `/`).
/// Parent directories must be added before what they hold (Linux creates
/// each entry where it stands and does not make missing parents), and a
/// name may appear only once: both mistakes are refused here instead of
/// failing quietly at boot.
#[derive(Debug)]
pub struct Archive {
    bytes: Vec<u8>,
    names: BTreeSet<String>,
    next_inode: u32,
    finished: bool,
}

impl Default for Archive {
    fn default() -> Self {
        Self::new()
    }
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            bytes: Vec::new(),
            names: BTreeSet::new(),
            // Inode 0 is avoided: some readers take it for "no inode".
            next_inode: 1,
            finished: false,
        }
    }

    /// A directory, `mode` its permission bits (e.g. `0o755`).
    pub fn dir(&mut self, name: &str, mode: u32) -> Result<()> {
        self.entry(name, S_IFDIR | (mode & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file with `data`.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.entry(name, S_IFREG | (mode & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node `major:minor`.
    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(name, S_IFCHR | (mode & 0o7777), 1, (major, minor), &[])
    }

    /// Closes the archive with the trailer and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.push_entry(TRAILER, 0, 1, 0, (0, 0), &[]);
        self.finished = true;
        std::mem::take(&mut self.bytes)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<()> {
        check_name(name)?;
        if let Some((parent, _)) = name.rsplit_once('/')
            && !self.names.contains(parent)
        {
            bail!("cpio: `{name}` added before its directory `{parent}`");
        }
        if !self.names.insert(name.to_owned()) {
            bail!("cpio: `{name}` added twice");
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        self.push_entry(name, inode, nlink, mode, rdev, data);
        Ok(())
    }

    fn push_entry(
        &mut self,
        name: &str,
        inode: u32,
        nlink: u32,
        mode: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) {
        let size = u32::try_from(data.len()).expect("cpio newc holds files below 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("a short name");
        let fields = [
            inode, mode, 0, // uid
            0, // gid
            nlink, 0, // mtime: fixed, so the same inputs give the same archive
            size, 0, // devmajor
            0, // devminor
            rdev.0, rdev.1, name_size, 0, // check
        ];
        self.bytes.extend_from_slice(MAGIC);
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        // An archive without its trailer still unpacks in Linux, but a
        // forgotten `finish` is a bug worth hearing about in tests.
        debug_assert!(
            self.finished || self.names.is_empty() || std::thread::panicking(),
            "cpio archive dropped without finish()"
        );
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('/')
        || name.ends_with('/')
        || name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        || name.contains('\0')
        || name == TRAILER
    {
        bail!("cpio: `{name}` is not a plain relative path");
    }
    Ok(())
}

/// One entry of a newc archive, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// `mode`: type and permission bits.
    pub mode: u32,
    /// `rdevmajor`, `rdevminor`.
    pub rdev: (u32, u32),
    /// Its data (a symlink's target).
    pub data: Vec<u8>,
}

/// Reads a newc archive up to its trailer: what the tests check the writer
/// against, and a way to look inside a built initramfs.
pub fn read(bytes: &[u8]) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    loop {
        let header = bytes
            .get(at..at + HEADER_LEN)
            .ok_or_else(|| anyhow::anyhow!("cpio: truncated header at offset {at}"))?;
        if &header[..6] != MAGIC {
            bail!("cpio: no newc magic at offset {at}");
        }
        let field = |i: usize| -> Result<u32> {
            let text = std::str::from_utf8(&header[6 + i * 8..14 + i * 8])?;
            Ok(u32::from_str_radix(text, 16)?)
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let name_size = field(11)? as usize;
        let name_at = at + HEADER_LEN;
        let name = bytes
            .get(name_at..name_at + name_size)
            .and_then(|n| n.strip_suffix(&[0]))
            .ok_or_else(|| anyhow::anyhow!("cpio: bad name at offset {name_at}"))?;
        let name = String::from_utf8(name.to_vec())?;
        let data_at = (name_at + name_size).next_multiple_of(4);
        let data = bytes
            .get(data_at..data_at + size)
            .ok_or_else(|| anyhow::anyhow!("cpio: `{name}` runs past the end"))?;
        at = (data_at + size).next_multiple_of(4);
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(Entry {
            name,
            mode,
            rdev,
            data: data.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_archive_is_the_trailer_alone() {
        let bytes = Archive::new().finish();
        assert_eq!(bytes.len(), 124); // 110 + "TRAILER!!!\0" (11) padded to 124
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(&bytes[110..120], b"TRAILER!!!");
        assert_eq!(read(&bytes).unwrap(), []);
    }

    #[test]
    fn the_header_is_exactly_the_newc_layout() {
        let mut archive = Archive::new();
        archive.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let bytes = archive.finish();
        let header = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(
            header,
            concat!(
                "070701", "00000001", // ino
                "000081ed", // mode: regular file, 0755
                "00000000", // uid
                "00000000", // gid
                "00000001", // nlink
                "00000000", // mtime
                "0000000a", // filesize
                "00000000", // devmajor
                "00000000", // devminor
                "00000000", // rdevmajor
                "00000000", // rdevminor
                "00000005", // namesize: "init\0"
                "00000000", // check
            )
        );
        // Name at 110, padded to 116; data at 116, 10 bytes, padded to 128.
        assert_eq!(&bytes[110..116], b"init\0\0");
        assert_eq!(&bytes[116..126], b"#!/bin/sh\n");
        assert_eq!(&bytes[126..128], b"\0\0");
        assert!(bytes[128..].starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn every_kind_of_entry_reads_back() {
        let mut archive = Archive::new();
        archive.dir("bin", 0o755).unwrap();
        archive
            .file("bin/busybox", 0o755, &[0x7f, b'E', b'L', b'F', 1])
            .unwrap();
        archive.symlink("bin/sh", "busybox").unwrap();
        archive.dir("dev", 0o755).unwrap();
        archive.char_device("dev/console", 0o600, 5, 1).unwrap();
        let entries = read(&archive.finish()).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/busybox", "bin/sh", "dev", "dev/console"]
        );
        assert_eq!(entries[0].mode, 0o040755);
        assert_eq!(entries[1].data, [0x7f, b'E', b'L', b'F', 1]);
        assert_eq!(entries[2].mode, 0o120777);
        assert_eq!(entries[2].data, b"busybox");
        assert_eq!(entries[4].mode, 0o020600);
        assert_eq!(entries[4].rdev, (5, 1));
    }

    /// Every kind of entry, with names and data of every padding.
    fn every_kind() -> Vec<u8> {
        let mut archive = Archive::new();
        archive.dir("bin", 0o755).unwrap();
        archive.file("bin/busybox", 0o755, b"\x7fELF\x01").unwrap();
        archive.symlink("bin/sh", "busybox").unwrap();
        archive.dir("dev", 0o755).unwrap();
        archive.char_device("dev/console", 0o600, 5, 1).unwrap();
        for len in 0..5 {
            archive
                .file(&"f".repeat(len + 1), 0o644, &vec![0xA5; len])
                .unwrap();
        }
        archive.finish()
    }

    #[test]
    fn the_bytes_are_those_the_hand_written_writer_wrote() {
        // Written by the newc writer xtask had before it used the `cpio`
        // crate: the archive must stay byte for byte the same.
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/cpio/every-kind.cpio");
        if std::env::var_os("XTASK_GOLDEN_WRITE").is_some() {
            std::fs::write(&file, every_kind()).unwrap();
        }
        assert_eq!(every_kind(), std::fs::read(&file).unwrap());
    }

    #[test]
    fn data_of_every_length_stays_aligned() {
        for len in 0..9 {
            let mut archive = Archive::new();
            let data = vec![0xA5; len];
            archive.file("f", 0o644, &data).unwrap();
            archive.file("g", 0o644, b"x").unwrap();
            let bytes = archive.finish();
            let entries = read(&bytes).unwrap();
            assert_eq!(entries[0].data, data, "length {len}");
            assert_eq!(entries[1].data, b"x", "length {len}");
        }
    }

    #[test]
    fn bad_names_duplicates_and_orphans_are_refused() {
        let mut archive = Archive::new();
        for bad in ["", "/init", "bin/", "a//b", "../x", "./x", "TRAILER!!!"] {
            assert!(archive.file(bad, 0o644, b"").is_err(), "{bad:?}");
        }
        let orphan = archive.file("lib/modules/x.ko", 0o644, b"").unwrap_err();
        assert!(
            orphan
                .to_string()
                .contains("before its directory `lib/modules`")
        );
        archive.file("init", 0o755, b"").unwrap();
        assert!(
            archive
                .file("init", 0o755, b"")
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let _ = archive.finish();
    }

    #[test]
    fn reading_rejects_garbage() {
        assert!(read(b"").is_err());
        assert!(read(&[b'0'; 200]).is_err());
        let mut bytes = Archive::new().finish();
        bytes[0] = b'1';
        assert!(read(&bytes).is_err());
    }
}
