//! Reading the emulator's serial log while it is being written.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Follows a file that an emulator appends to, like `tail -f`.
///
/// The file may not exist yet when watching starts (the emulator creates it
/// once it is up); until then reads return nothing.
#[derive(Debug)]
pub struct FileTail {
    path: PathBuf,
    file: Option<File>,
}

impl FileTail {
    /// Follows `path` from its start.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            file: None,
        }
    }

    /// The bytes appended since the last call.
    pub fn read_new(&mut self) -> io::Result<Vec<u8>> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(error) => return Err(error),
            }
        }
        let mut bytes = Vec::new();
        if let Some(file) = &mut self.file {
            // At the end of a regular file this returns 0 bytes; the file
            // offset stays put, so later calls pick up what is appended.
            file.read_to_end(&mut bytes)?;
        }
        Ok(bytes)
    }
}

/// Cuts a byte stream into lines; a line split across two reads is kept
/// until its end arrives.
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Adds `bytes` and returns every line now complete, without its `\n`
    /// (and without a `\r` before it).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            lines.push(decode_line(&line[..end]));
        }
        lines
    }

    /// The unterminated last line, if any (for when the stream has ended).
    pub fn finish(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return None;
        }
        let line = decode_line(&self.pending);
        self.pending.clear();
        Some(line)
    }
}

fn decode_line(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

/// The text of a serial line with terminal control sequences removed, for
/// echoing to the user's terminal: GRUB sends cursor movements and screen
/// clears that would otherwise scramble it.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC backslash.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' || (c == '\x1b' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                // Two-character sequences such as `ESC c` (reset).
                _ => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_reads_are_joined() {
        let mut buffer = LineBuffer::default();
        assert!(buffer.push(b"@hv {\"do").is_empty());
        assert_eq!(buffer.push(b"ne\":true}\r\nnext"), ["@hv {\"done\":true}"]);
        assert_eq!(buffer.finish().as_deref(), Some("next"));
        assert_eq!(buffer.finish(), None);
    }

    #[test]
    fn several_lines_in_one_read() {
        let mut buffer = LineBuffer::default();
        assert_eq!(buffer.push(b"a\nb\n\nc"), ["a", "b", ""]);
    }

    #[test]
    fn invalid_utf8_does_not_lose_the_line() {
        let mut buffer = LineBuffer::default();
        assert_eq!(buffer.push(b"x\xffy\n"), ["x\u{fffd}y"]);
    }

    #[test]
    fn ansi_sequences_are_removed() {
        assert_eq!(
            strip_ansi("\x1b[2J\x1b[0;30;47m@hv {}\x1b[0m\x1bc"),
            "@hv {}"
        );
        assert_eq!(strip_ansi("a\x1b]0;title\x07b\x1b]x\x1b\\c"), "abc");
        assert_eq!(strip_ansi("tab\there\x08"), "tab\there");
    }

    #[test]
    fn tail_reads_only_new_bytes_and_waits_for_the_file() {
        let dir = std::env::temp_dir().join(format!("xtask-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.log");
        let _ = std::fs::remove_file(&path);
        let mut tail = FileTail::new(&path);
        assert!(tail.read_new().unwrap().is_empty());
        std::fs::write(&path, b"one\n").unwrap();
        assert_eq!(tail.read_new().unwrap(), b"one\n");
        assert!(tail.read_new().unwrap().is_empty());
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"two\n").unwrap();
        assert_eq!(tail.read_new().unwrap(), b"two\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
