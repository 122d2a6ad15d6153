//! The `HVDUMP1` stream: how hv's capture mode sends a dump over a byte
//! pipe (QEMU's debug port, or a raw disk), and how the harness rebuilds
//! the file (`xtask/CAPTURE.md`).
//!
//! ```text
//! magic  "HVDUMP1\0"
//! 1 HEADER  len u64, bytes          the dump file's header, at offset 0
//! 2 DATA    offset u64, len u64, bytes
//! 3 ZERO    offset u64, len u64     (nothing sent)
//! 4 END     total u64
//! ```
//!
//! All numbers are little-endian. Records come in increasing file offset
//! order and never overlap; ZERO records and gaps read as zeros. The
//! [`Encoder`] sends all-zero pages as ZERO records and merges runs of
//! non-zero pages into DATA records of at most [`MAX_DATA_RECORD`] bytes;
//! the [`Decoder`] checks the order and the sizes of what it reads.

use core::fmt;

/// The stream's first bytes.
pub const MAGIC: [u8; 8] = *b"HVDUMP1\0";
/// Record type: the file header.
pub const HEADER: u8 = 1;
/// Record type: bytes at an offset.
pub const DATA: u8 = 2;
/// Record type: zeros at an offset, not sent.
pub const ZERO: u8 = 3;
/// Record type: the end, with the file's length.
pub const END: u8 = 4;
/// Largest DATA record the encoder makes.
pub const MAX_DATA_RECORD: u64 = 256 * 1024;
/// The largest header a decoder accepts: far more than 64K program headers
/// and notes for hundreds of CPUs need.
pub const MAX_HEADER_LEN: u64 = 64 << 20;
/// The page size zero detection works in.
pub const PAGE: u64 = 4096;

/// Whether `bytes` are all zero: 64 bytes at a time, their eight words
/// ORed together (scalar code that an emulator runs fast too).
pub fn is_zero(bytes: &[u8]) -> bool {
    let (blocks, rest) = bytes.as_chunks::<64>();
    blocks.iter().all(|block| {
        let (words, _) = block.as_chunks::<8>();
        words
            .iter()
            .fold(0u64, |acc, word| acc | u64::from_ne_bytes(*word))
            == 0
    }) && rest.iter().all(|&byte| byte == 0)
}

/// Where encoded bytes go.
pub trait Sink {
    /// Sends `bytes`, in order.
    fn emit(&mut self, bytes: &[u8]);
}

/// What an encoder sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Bytes sent in DATA records.
    pub data_bytes: u64,
    /// Pages (or parts of pages) sent in DATA records.
    pub data_pages: u64,
    /// Bytes declared by ZERO records.
    pub zero_bytes: u64,
}

/// Writes a stream: [`Encoder::start`], one [`Encoder::segment`] per
/// `PT_LOAD` in file order, then [`Encoder::finish`].
#[derive(Debug)]
pub struct Encoder<S: Sink> {
    sink: S,
    zero_start: u64,
    zero_len: u64,
    stats: EncodeStats,
}

impl<S: Sink> Encoder<S> {
    /// Sends the magic and the HEADER record.
    pub fn start(mut sink: S, header: &[u8]) -> Self {
        sink.emit(&MAGIC);
        sink.emit(&[HEADER]);
        sink.emit(&(header.len() as u64).to_le_bytes());
        sink.emit(header);
        Self {
            sink,
            zero_start: 0,
            zero_len: 0,
            stats: EncodeStats::default(),
        }
    }

    fn flush_zero(&mut self) {
        if self.zero_len > 0 {
            self.sink.emit(&[ZERO]);
            self.sink.emit(&self.zero_start.to_le_bytes());
            self.sink.emit(&self.zero_len.to_le_bytes());
            self.stats.zero_bytes += self.zero_len;
            self.zero_len = 0;
        }
    }

    fn zero(&mut self, offset: u64, len: u64) {
        if self.zero_len == 0 {
            self.zero_start = offset;
        }
        self.zero_len += len;
    }

    /// Starts a DATA record of `len` bytes at `offset`; its bytes follow.
    fn data_header(&mut self, offset: u64, len: u64) {
        self.flush_zero();
        self.sink.emit(&[DATA]);
        self.sink.emit(&offset.to_le_bytes());
        self.sink.emit(&len.to_le_bytes());
        self.stats.data_bytes += len;
    }

    /// Sends a segment of `len` bytes that lands at `file_offset` in the
    /// file, read through `read(start, len)` from `start` on (the memory's
    /// own address: its page boundaries decide the steps). `read` returns
    /// exactly `len` bytes.
    pub fn segment<'m>(
        &mut self,
        file_offset: u64,
        start: u64,
        len: u64,
        read: impl FnMut(u64, u64) -> &'m [u8],
    ) {
        self.segment_classified(file_offset, start, len, read, |_, bytes| is_zero(bytes));
    }

    /// [`Self::segment`], with the caller deciding which steps are all
    /// zero: `zero(address, bytes)` for each page-sized step, given its
    /// bytes as `read` returned them (a caller that already knows, e.g.
    /// from another CPU's scan, need not look at them). `read` is only
    /// ever asked for one step at a time, so a caller may hand back a
    /// copy of some pages instead of the memory itself. The stream is the
    /// same as [`Self::segment`]'s whenever `zero` tells the truth.
    pub fn segment_classified<'m>(
        &mut self,
        file_offset: u64,
        start: u64,
        len: u64,
        mut read: impl FnMut(u64, u64) -> &'m [u8],
        mut zero: impl FnMut(u64, &[u8]) -> bool,
    ) {
        let step_at = |done: u64| (PAGE - (start + done) % PAGE).min(len - done);
        let mut done = 0;
        while done < len {
            // Page-sized steps, aligned to the memory's own pages.
            let step = step_at(done);
            let bytes = read(start + done, step);
            if zero(start + done, bytes) {
                self.zero(file_offset + done, step);
                done += step;
                continue;
            }
            // The following non-zero steps join this one's record.
            let mut run = step;
            while done + run < len && run < MAX_DATA_RECORD {
                let next = step_at(done + run);
                let address = start + done + run;
                if zero(address, read(address, next)) {
                    break;
                }
                run += next;
            }
            self.data_header(file_offset + done, run);
            let mut sent = 0;
            while sent < run {
                let next = step_at(done + sent);
                self.sink.emit(read(start + done + sent, next));
                sent += next;
            }
            self.stats.data_pages += run.div_ceil(PAGE);
            done += run;
        }
    }

    /// Sends the END record with the file's length; gives back the sink.
    pub fn finish(mut self, total: u64) -> (S, EncodeStats) {
        self.flush_zero();
        self.sink.emit(&[END]);
        self.sink.emit(&total.to_le_bytes());
        (self.sink, self.stats)
    }
}

/// One record, as the decoder read its fixed part. A HEADER's or a DATA's
/// bytes follow it in the stream; the caller reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// The file header, `len` bytes, at offset 0.
    Header {
        /// Its length.
        len: u64,
    },
    /// `len` bytes at `offset`.
    Data {
        /// Where in the file.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// `len` zero bytes at `offset`, not sent.
    Zero {
        /// Where in the file.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// The end: the file is `total` bytes long.
    End {
        /// The file's length.
        total: u64,
    },
}

/// Why a stream is not valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended inside a record, or before the END record.
    Truncated {
        /// Records read completely before.
        records: u64,
    },
    /// The first record is not a HEADER.
    FirstNotHeader {
        /// Its type.
        kind: u8,
    },
    /// The HEADER record is empty or larger than [`MAX_HEADER_LEN`].
    HeaderLength {
        /// The length it declares.
        len: u64,
    },
    /// A second HEADER record.
    SecondHeader,
    /// A record's end overflows.
    Overflow {
        /// Where it starts.
        offset: u64,
    },
    /// A record starts before the end of the previous one.
    GoesBack {
        /// Where it starts.
        offset: u64,
        /// Where the stream had got to.
        covered_to: u64,
    },
    /// END declares a file shorter than the records reach.
    ShortEnd {
        /// The length END declares.
        total: u64,
        /// Where the records reach.
        covered_to: u64,
    },
    /// An unknown record type.
    UnknownRecord {
        /// Its type.
        kind: u8,
        /// Its number (1 is the HEADER).
        record: u64,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated { records } => write!(
                f,
                "the stream ends inside a record or without an END record, after {records} \
                 records: the capture did not finish"
            ),
            Self::FirstNotHeader { kind } => {
                write!(f, "the first record is of type {kind}, not HEADER")
            }
            Self::HeaderLength { len } => write!(f, "HEADER record of {len} bytes"),
            Self::SecondHeader => f.write_str("a second HEADER record"),
            Self::Overflow { offset } => write!(f, "the record at {offset:#x} overflows"),
            Self::GoesBack { offset, covered_to } => write!(
                f,
                "record at {offset:#x} goes back before {covered_to:#x} (records must come in \
                 increasing offset order)"
            ),
            Self::ShortEnd { total, covered_to } => {
                write!(f, "END says {total} bytes, but records reach {covered_to}")
            }
            Self::UnknownRecord { kind, record } => {
                write!(f, "unknown record type {kind} (record {record})")
            }
        }
    }
}

impl core::error::Error for DecodeError {}

/// Reads a stream's records after the magic and checks their order. The
/// caller reads (or skips) a HEADER's and a DATA's bytes itself before it
/// asks for the next record.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decoder {
    records: u64,
    covered_to: u64,
    data_bytes: u64,
    zero_bytes: u64,
    ended: bool,
}

impl Decoder {
    /// A decoder positioned just after the magic.
    pub const fn new() -> Self {
        Self {
            records: 0,
            covered_to: 0,
            data_bytes: 0,
            zero_bytes: 0,
            ended: false,
        }
    }

    /// Reads the next record's fixed part with `read_exact`, which fills
    /// its buffer from the input or returns `false` at its end.
    pub fn next_record(
        &mut self,
        mut read_exact: impl FnMut(&mut [u8]) -> bool,
    ) -> Result<Record, DecodeError> {
        let truncated = DecodeError::Truncated {
            records: self.records,
        };
        let mut kind = [0u8; 1];
        if self.ended || !read_exact(&mut kind) {
            return Err(truncated);
        }
        let word = |read_exact: &mut dyn FnMut(&mut [u8]) -> bool| {
            let mut bytes = [0u8; 8];
            read_exact(&mut bytes)
                .then(|| u64::from_le_bytes(bytes))
                .ok_or(truncated)
        };
        let kind = kind[0];
        let record = match kind {
            HEADER if self.records == 0 => {
                let len = word(&mut read_exact)?;
                if len == 0 || len > MAX_HEADER_LEN {
                    return Err(DecodeError::HeaderLength { len });
                }
                self.covered_to = len;
                Record::Header { len }
            }
            _ if self.records == 0 => return Err(DecodeError::FirstNotHeader { kind }),
            HEADER => return Err(DecodeError::SecondHeader),
            DATA | ZERO => {
                let offset = word(&mut read_exact)?;
                let len = word(&mut read_exact)?;
                let end = offset
                    .checked_add(len)
                    .ok_or(DecodeError::Overflow { offset })?;
                if offset < self.covered_to {
                    return Err(DecodeError::GoesBack {
                        offset,
                        covered_to: self.covered_to,
                    });
                }
                self.covered_to = end;
                if kind == DATA {
                    self.data_bytes += len;
                    Record::Data { offset, len }
                } else {
                    self.zero_bytes += len;
                    Record::Zero { offset, len }
                }
            }
            END => {
                let total = word(&mut read_exact)?;
                if total < self.covered_to {
                    return Err(DecodeError::ShortEnd {
                        total,
                        covered_to: self.covered_to,
                    });
                }
                self.ended = true;
                Record::End { total }
            }
            kind => {
                return Err(DecodeError::UnknownRecord {
                    kind,
                    record: self.records + 1,
                });
            }
        };
        self.records += 1;
        Ok(record)
    }

    /// Records read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes DATA records declared so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Bytes ZERO records declared so far.
    pub fn zero_bytes(&self) -> u64 {
        self.zero_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Buffer(Vec<u8>);
    impl Sink for Buffer {
        fn emit(&mut self, bytes: &[u8]) {
            self.0.extend_from_slice(bytes);
        }
    }

    /// Decodes `stream` (after its magic) back into a file.
    fn decode(stream: &[u8]) -> Result<(Vec<u8>, Decoder), DecodeError> {
        assert_eq!(stream[..8], MAGIC);
        let mut at = 8;
        let mut read = |buffer: &mut [u8]| {
            let Some(bytes) = stream.get(at..at + buffer.len()) else {
                return false;
            };
            buffer.copy_from_slice(bytes);
            at += buffer.len();
            true
        };
        let mut decoder = Decoder::new();
        let mut file = Vec::new();
        loop {
            let (offset, len, sent) = match decoder.next_record(&mut read)? {
                Record::Header { len } => (0, len, true),
                Record::Data { offset, len } => (offset, len, true),
                Record::Zero { offset, len } => (offset, len, false),
                Record::End { total } => {
                    file.resize(total as usize, 0);
                    return Ok((file, decoder));
                }
            };
            let end = (offset + len) as usize;
            file.resize(file.len().max(end), 0);
            if sent {
                assert!(read(&mut file[offset as usize..end]));
            }
        }
    }

    #[test]
    fn a_segment_round_trips_with_zero_pages_elided() {
        // Memory at 0x10000: page 0 data, pages 1-2 zero, page 3 data, and
        // a half page of data at the end.
        let mut memory = vec![0u8; 4 * 4096 + 2048];
        memory[10] = 1;
        memory[3 * 4096 + 5] = 2;
        memory[4 * 4096 + 7] = 3;
        let header = [0xAAu8; 100];
        let mut encoder = Encoder::start(Buffer(Vec::new()), &header);
        let base = 0x10000u64;
        encoder.segment(4096, base, memory.len() as u64, |at, len| {
            &memory[(at - base) as usize..(at - base + len) as usize]
        });
        let total = 4096 + memory.len() as u64;
        let (Buffer(stream), stats) = encoder.finish(total);
        assert_eq!(stats.zero_bytes, 2 * 4096);
        assert_eq!(stats.data_bytes, 4096 + 4096 + 2048);
        assert_eq!(stats.data_pages, 3);
        let (file, decoder) = decode(&stream).unwrap();
        assert_eq!(file.len() as u64, total);
        assert_eq!(&file[..100], &header);
        assert_eq!(&file[4096..], &memory[..]);
        // HEADER, DATA (page 0), ZERO (pages 1-2), DATA (pages 3-4), END.
        assert_eq!(decoder.records(), 5);
    }

    #[test]
    fn non_zero_runs_are_cut_at_the_record_limit() {
        let memory = vec![0x55u8; (MAX_DATA_RECORD + 4096) as usize];
        let mut encoder = Encoder::start(Buffer(Vec::new()), &[1]);
        encoder.segment(4096, 0, memory.len() as u64, |at, len| {
            &memory[at as usize..(at + len) as usize]
        });
        let (Buffer(stream), _) = encoder.finish(4096 + memory.len() as u64);
        let (file, decoder) = decode(&stream).unwrap();
        assert_eq!(&file[4096..], &memory[..]);
        assert_eq!(decoder.records(), 4, "HEADER, two DATA, END");
    }

    #[test]
    fn zero_detection_looks_at_every_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        assert!(is_zero(&[0; 70]));
        for at in [0, 7, 8, 63, 64, 4095] {
            let mut page = [0u8; 4096];
            page[at] = 0x80;
            assert!(!is_zero(&page), "byte {at}");
        }
        let mut odd = [0u8; 70];
        odd[69] = 1;
        assert!(!is_zero(&odd));
    }

    /// Memory with data, zero pages and a partial last page, from an
    /// address that is not page-aligned.
    fn mixed_memory() -> (u64, Vec<u8>) {
        let mut memory = vec![0u8; 70 * 4096 + 1000];
        for page in [0usize, 1, 5, 6, 7, 40, 41, 69] {
            memory[page * 4096 + 100] = page as u8 + 1;
        }
        memory[70 * 4096 + 999] = 9;
        (0x20800, memory)
    }

    #[test]
    fn classified_segments_stream_what_plain_ones_do() {
        let (base, memory) = mixed_memory();
        let len = memory.len() as u64;
        let slice = |at: u64, n: u64| &memory[(at - base) as usize..(at - base + n) as usize];
        let mut plain = Encoder::start(Buffer(Vec::new()), &[7; 64]);
        plain.segment(4096, base, len, slice);
        let (Buffer(expected), expected_stats) = plain.finish(4096 + len);

        // The caller knows which pages are zero and never looks at them;
        // `read` is asked one step at a time, never across a page.
        let mut asked = Vec::new();
        let mut classified = Encoder::start(Buffer(Vec::new()), &[7; 64]);
        classified.segment_classified(
            4096,
            base,
            len,
            |at, n| {
                assert!(n <= PAGE && (at % PAGE) + n <= PAGE, "{at:#x}+{n}");
                asked.push(at);
                slice(at, n)
            },
            |at, _| is_zero(slice(at, (PAGE - at % PAGE).min(base + len - at))),
        );
        let (Buffer(stream), stats) = classified.finish(4096 + len);
        assert_eq!(stream, expected);
        assert_eq!(stats, expected_stats);
        assert!(!asked.is_empty());
    }

    #[test]
    fn a_classified_segment_may_read_a_saved_copy_of_a_page() {
        // Page 2 of this memory was borrowed (overwritten) after its bytes
        // were saved: reading the copy gives the original stream.
        let (base, original) = mixed_memory();
        let len = original.len() as u64;
        let borrowed_page = (base + 2 * PAGE) & !(PAGE - 1);
        let mut memory = original.clone();
        let at = (borrowed_page - base) as usize;
        memory[at..at + 4096].fill(0xCC);
        let saved = original[at..at + 4096].to_vec();
        let read = |address: u64, n: u64| -> &[u8] {
            if address & !(PAGE - 1) == borrowed_page {
                let from = (address - borrowed_page) as usize;
                &saved[from..from + n as usize]
            } else {
                &memory[(address - base) as usize..(address - base + n) as usize]
            }
        };
        let mut encoder = Encoder::start(Buffer(Vec::new()), &[1]);
        encoder.segment_classified(4096, base, len, read, |_, bytes| is_zero(bytes));
        let (Buffer(stream), _) = encoder.finish(4096 + len);
        let (file, _) = decode(&stream).unwrap();
        assert_eq!(&file[4096..], &original[..]);
    }

    fn records(parts: &[&[u8]]) -> Vec<u8> {
        let mut stream = MAGIC.to_vec();
        for part in parts {
            stream.extend_from_slice(part);
        }
        stream
    }

    fn le(value: u64) -> [u8; 8] {
        value.to_le_bytes()
    }

    #[test]
    fn bad_streams_are_named() {
        let header = [&[HEADER][..], &le(1), &[0]].concat();
        let cases: [(Vec<u8>, DecodeError); 5] = [
            (
                records(&[&[DATA], &le(0), &le(0)]),
                DecodeError::FirstNotHeader { kind: DATA },
            ),
            (
                records(&[&[HEADER], &le(0)]),
                DecodeError::HeaderLength { len: 0 },
            ),
            (
                records(&[&header, &[ZERO], &le(0), &le(5)]),
                DecodeError::GoesBack {
                    offset: 0,
                    covered_to: 1,
                },
            ),
            (
                records(&[&header, &[ZERO], &le(u64::MAX), &le(5)]),
                DecodeError::Overflow { offset: u64::MAX },
            ),
            (
                records(&[&header, &[9]]),
                DecodeError::UnknownRecord { kind: 9, record: 2 },
            ),
        ];
        for (stream, expected) in cases {
            assert_eq!(decode(&stream).err(), Some(expected));
        }
        assert_eq!(
            decode(&records(&[&header, &[ZERO], &le(8), &le(8)])).err(),
            Some(DecodeError::Truncated { records: 2 }),
            "no END record"
        );
        assert_eq!(
            decode(&records(&[&header, &[END], &le(0)])).err(),
            Some(DecodeError::ShortEnd {
                total: 0,
                covered_to: 1
            })
        );
    }
}
