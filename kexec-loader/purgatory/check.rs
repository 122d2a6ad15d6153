//! What the purgatory checks before it enters the capture kernel, and the
//! lines it writes when it refuses. Nothing here touches hardware:
//! [`Memory`] is the identity map in the blob and a fake in
//! `kexec-loader`'s host tests, which compile this same file.
//!
//! The checks, in order (the first failure is the one reported):
//! 1. the parameters carry the magic and were built for the address the
//!    code runs at (the IDTs, GDT and page tables hold absolute addresses);
//! 2. the table's count is not 0, equals the complement of its check word,
//!    and fits the table;
//! 3. the parameters name a digest algorithm (XXH64 or SHA-256);
//! 4. the seal (that digest of code, parameters, descriptor tables, digest
//!    table and page tables) matches;
//! 5. every segment's digest matches its entry.
#![deny(unsafe_code)]

use super::abi::{self, param, table};
use super::{sha256, xxh64};

/// A digest function: bytes in, the 32-byte digest field out.
type DigestFn = fn(&[u8]) -> [u8; 32];

/// The digest `algorithm` (a [`param::DIGEST`] value) names, if any.
fn digest_with(algorithm: u64) -> Option<DigestFn> {
    match algorithm {
        abi::DIGEST_XXH64 => Some(xxh64::digest),
        abi::DIGEST_SHA256 => Some(sha256::digest),
        _ => None,
    }
}

/// Physical memory as the purgatory reads it.
pub trait Memory {
    /// The `len` bytes at physical address `start`, `None` when they cannot
    /// be read (outside the identity map).
    fn bytes(&self, start: u64, len: u64) -> Option<&[u8]>;
}

/// Why the purgatory does not enter the capture kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The area itself cannot be read.
    AreaUnreadable,
    /// The parameters do not start with [`abi::MAGIC`].
    BadMagic,
    /// The area was built for another address.
    WrongArea {
        /// The address in the parameters.
        built_for: u64,
        /// Where the code runs.
        running_at: u64,
    },
    /// The table's count is 0.
    EmptyTable,
    /// The count and its check word disagree.
    CountDisagrees {
        /// The count.
        count: u64,
        /// The check word (`!count` when intact).
        check: u64,
    },
    /// The count is larger than the table.
    TooManySegments {
        /// The count.
        count: u64,
    },
    /// The parameters name no digest algorithm.
    UnknownDigest {
        /// The [`param::DIGEST`] value.
        code: u64,
    },
    /// The sealed part of the area changed.
    SealMismatch,
    /// A segment lies outside what the purgatory can read.
    SegmentUnreadable {
        /// Its index in the table.
        index: u64,
        /// Its start.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// A segment's bytes changed since their digest was taken.
    SegmentChanged {
        /// Its index in the table.
        index: u64,
        /// Its start.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// The CPU took an exception in the purgatory.
    Exception {
        /// The vector.
        vector: u64,
        /// Where.
        rip: u64,
    },
}

/// Reads the little-endian `u64` at `at` of `bytes`; 0 past the end (the
/// callers check the lengths first, so 0 is never used).
fn word(bytes: &[u8], at: usize) -> u64 {
    abi::u64_at(bytes, at).unwrap_or(0)
}

/// Runs every check on the area at `area`.
pub fn check(area: u64, memory: &impl Memory) -> Result<(), Refusal> {
    let bytes = memory
        .bytes(area, abi::DIGESTED_BYTES as u64)
        .filter(|bytes| bytes.len() == abi::DIGESTED_BYTES)
        .ok_or(Refusal::AreaUnreadable)?;
    let parameter = |field: usize| word(bytes, abi::PARAMETERS_OFFSET + field);
    if parameter(param::MAGIC) != abi::MAGIC {
        return Err(Refusal::BadMagic);
    }
    let built_for = parameter(param::AREA);
    if built_for != area {
        return Err(Refusal::WrongArea {
            built_for,
            running_at: area,
        });
    }
    let count = word(bytes, abi::TABLE_OFFSET + table::COUNT);
    let check = word(bytes, abi::TABLE_OFFSET + table::COUNT_CHECK);
    if count == 0 {
        return Err(Refusal::EmptyTable);
    }
    if count != !check {
        return Err(Refusal::CountDisagrees { count, check });
    }
    if count > abi::MAX_SEGMENTS as u64 {
        return Err(Refusal::TooManySegments { count });
    }
    let code = parameter(param::DIGEST);
    let digest = digest_with(code).ok_or(Refusal::UnknownDigest { code })?;
    let (sealed, rest) = bytes.split_at(abi::SEALED_BYTES);
    if digest(sealed).as_slice() != rest {
        return Err(Refusal::SealMismatch);
    }
    let entries = (0..count).zip(
        bytes
            .get(abi::TABLE_OFFSET + table::ENTRIES..)
            .unwrap_or_default()
            .chunks_exact(table::ENTRY_BYTES),
    );
    for (index, entry) in entries {
        let (start, len) = (word(entry, 0), word(entry, 8));
        let segment = memory
            .bytes(start, len)
            .filter(|bytes| bytes.len() as u64 == len && len != 0)
            .ok_or(Refusal::SegmentUnreadable { index, start, len })?;
        if digest(segment).as_slice() != entry.get(16..).unwrap_or_default() {
            return Err(Refusal::SegmentChanged { index, start, len });
        }
    }
    Ok(())
}

/// The crash words waiting in the mailbox at `address` (see
/// [`abi::mailbox`]): none when there is no mailbox, its magic is gone or
/// its length is out of bounds; the text stops at the first byte that is
/// not [`abi::mailbox::printable`].
pub fn mailbox_text(address: u64, memory: &impl Memory) -> Option<&[u8]> {
    use abi::mailbox::{LEN_OFFSET, MAGIC, MAGIC_OFFSET, MAX_TEXT, TEXT_OFFSET, printable};
    if address == 0 {
        return None;
    }
    let header = memory.bytes(address, TEXT_OFFSET as u64)?;
    if abi::u64_at(header, MAGIC_OFFSET)? != MAGIC {
        return None;
    }
    let len = abi::u64_at(header, LEN_OFFSET)?;
    if len == 0 || len > MAX_TEXT as u64 {
        return None;
    }
    let text = memory.bytes(address + TEXT_OFFSET as u64, len)?;
    let end = text
        .iter()
        .position(|&byte| !printable(byte))
        .unwrap_or(text.len());
    text.get(..end)
}

/// A line of text in a fixed buffer; what does not fit is cut.
#[derive(Debug)]
pub struct Line {
    bytes: [u8; 320],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Self {
            bytes: [0; 320],
            len: 0,
        }
    }

    /// The text so far.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }

    /// Appends `text`.
    pub fn push(&mut self, text: &str) {
        let free = self.bytes.get_mut(self.len..).unwrap_or_default();
        let mut taken = 0;
        for (to, from) in free.iter_mut().zip(text.bytes()) {
            *to = from;
            taken += 1;
        }
        self.len += taken;
    }

    fn push_byte(&mut self, byte: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    /// Appends `value` in hexadecimal, `0x` first.
    pub fn push_hex(&mut self, value: u64) {
        self.push("0x");
        let digits = (64 - value.leading_zeros()).div_ceil(4).max(1);
        for shift in (0..digits).rev() {
            let nibble = ((value >> (shift * 4)) & 0xF) as u8;
            self.push_byte(if nibble < 10 {
                b'0' + nibble
            } else {
                b'a' + nibble - 10
            });
        }
    }

    /// Appends `value` in decimal.
    pub fn push_decimal(&mut self, value: u64) {
        let mut digits = [0u8; 20];
        let mut count = 0;
        let mut rest = value;
        for slot in digits.iter_mut() {
            *slot = b'0' + (rest % 10) as u8;
            count += 1;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        for digit in digits.iter().take(count).rev() {
            self.push_byte(*digit);
        }
    }
}

/// Appends why: plain words, no quote or backslash (it goes into JSON).
pub fn describe(refusal: &Refusal, line: &mut Line) {
    let segment = |line: &mut Line, index: u64, start: u64, len: u64| {
        line.push("segment ");
        line.push_decimal(index);
        line.push(" at ");
        line.push_hex(start);
        line.push(" (");
        line.push_hex(len);
        line.push(" bytes)");
    };
    match *refusal {
        Refusal::AreaUnreadable => line.push("the purgatory area cannot be read"),
        Refusal::BadMagic => line.push("the purgatory parameters have no magic"),
        Refusal::WrongArea {
            built_for,
            running_at,
        } => {
            line.push("the purgatory was built for ");
            line.push_hex(built_for);
            line.push(" but runs at ");
            line.push_hex(running_at);
        }
        Refusal::EmptyTable => line.push("the digest table is empty (count 0)"),
        Refusal::CountDisagrees { count, check } => {
            line.push("the digest table count ");
            line.push_hex(count);
            line.push(" disagrees with its check word ");
            line.push_hex(check);
        }
        Refusal::TooManySegments { count } => {
            line.push("the digest table count ");
            line.push_decimal(count);
            line.push(" exceeds its ");
            line.push_decimal(abi::MAX_SEGMENTS as u64);
            line.push(" entries");
        }
        Refusal::UnknownDigest { code } => {
            line.push("the purgatory parameters name no digest algorithm (");
            line.push_decimal(code);
            line.push(")");
        }
        Refusal::SealMismatch => line.push(
            "the purgatory area changed since it was built (code, parameters, descriptor tables, digest table or page tables)",
        ),
        Refusal::SegmentUnreadable { index, start, len } => {
            segment(line, index, start, len);
            line.push(" lies outside the purgatory identity map");
        }
        Refusal::SegmentChanged { index, start, len } => {
            segment(line, index, start, len);
            line.push(" changed since it was loaded");
        }
        Refusal::Exception { vector, rip } => {
            line.push("exception ");
            line.push_decimal(vector);
            line.push(" at ");
            line.push_hex(rip);
        }
    }
}

/// The two lines a refusal writes on the serial console: one for people,
/// one `@hv` report line for xtask.
pub fn refusal_lines(refusal: &Refusal, line: &mut Line) {
    line.push("\r\n*** purgatory: ");
    describe(refusal, line);
    line.push("; not entering the capture kernel\r\n@hv {\"capture\":{\"purgatory_refused\":\"");
    describe(refusal, line);
    line.push("\"}}\r\n");
}

/// The lines for an exception the capture kernel took after the jump,
/// before it had an IDT of its own.
pub fn capture_fault_lines(vector: u64, rip: u64, line: &mut Line) {
    let fault = Refusal::Exception { vector, rip };
    line.push("\r\n*** purgatory: the capture kernel took ");
    describe(&fault, line);
    line.push(" before loading its own IDT\r\n@hv {\"capture\":{\"purgatory_saw_fault\":\"");
    describe(&fault, line);
    line.push("\"}}\r\n");
}
