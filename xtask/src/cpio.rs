//! The `newc` cpio format ("SVR4 with no CRC"), the one format Linux
//! unpacks as an initramfs (`init/initramfs.c`).
//!
//! Every entry is a 110-byte ASCII header, `070701` then thirteen 8-digit
//! hexadecimal fields (inode, mode, uid, gid, nlink, mtime, file size,
//! device major and minor, rdev major and minor, name size with its NUL,
//! check = 0), then the NUL-terminated name padded to a multiple of 4
//! bytes, then the data padded to a multiple of 4 bytes. The archive ends
//! with an entry named `TRAILER!!!`. The `cpio` crate writes and reads
//! the entries; this module keeps what an initramfs needs on top (the
//! entry kinds, parents before children, no name twice) and is why the
//! `cpio` tool, which a fresh Debian machine does not have, is not needed.

use std::collections::BTreeSet;
use std::io::{Read, Write};

use anyhow::{Context, Result, bail};

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
        // Writing into a Vec cannot fail.
        cpio::newc::trailer(&mut self.bytes).expect("writing the cpio trailer into memory");
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
        // uid, gid, mtime and the device stay 0: the same inputs give the
        // same archive.
        let mut writer = cpio::newc::Builder::new(name)
            .ino(inode)
            .mode(mode)
            .nlink(nlink)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1)
            .write(&mut self.bytes, size);
        // Writing into a Vec cannot fail, and `size` is the data's length.
        writer
            .write_all(data)
            .and_then(|()| writer.finish().map(drop))
            .expect("writing a cpio entry into memory");
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
    let mut rest = bytes;
    loop {
        let mut reader = cpio::newc::Reader::new(rest).context("cpio: no newc entry")?;
        let entry = reader.entry();
        if entry.is_trailer() {
            return Ok(entries);
        }
        let (name, mode) = (entry.name().to_owned(), entry.mode());
        let rdev = (entry.rdev_major(), entry.rdev_minor());
        let mut data = Vec::new();
        reader
            .read_to_end(&mut data)
            .with_context(|| format!("cpio: `{name}` runs past the end"))?;
        rest = reader.finish().context("cpio: a truncated entry")?;
        entries.push(Entry {
            name,
            mode,
            rdev,
            data,
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
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/cpio/every-kind.cpio");
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
