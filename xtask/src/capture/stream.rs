//! Reassembling the dump that hv's capture mode streams on the debug port
//! (`xtask/CAPTURE.md`):
//!
//! ```text
//! magic  "HVDUMP1\0"
//! 1 HEADER  len u64, bytes          the dump file's header, at offset 0
//! 2 DATA    offset u64, len u64, bytes
//! 3 ZERO    offset u64, len u64     (nothing sent)
//! 4 END     total u64
//! ```
//!
//! The port may carry other bytes before the stream (and the dumped memory
//! holds the magic itself, inside hv's image), so every occurrence of the
//! magic is tried in turn until one starts a complete stream. The file is
//! written sparse: ZERO records and gaps are holes.

use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use kexec_loader::elfcore::{CoreDump, PT_LOAD};

pub use hv_abi::dump_stream::MAGIC;
use hv_abi::dump_stream::{self as wire, Decoder, Encoder, Record};

/// What a complete stream held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSummary {
    /// Where in the port's output the stream starts.
    pub stream_offset: u64,
    /// The file's length (the END record).
    pub total: u64,
    /// Length of the HEADER record.
    pub header_len: u64,
    /// Bytes sent in DATA records.
    pub data_bytes: u64,
    /// Bytes declared by ZERO records.
    pub zero_bytes: u64,
    /// Bytes of `PT_LOAD` segments (as the header declares them) that no
    /// record covered: they read as zeros, but nothing said they were.
    pub uncovered_bytes: u64,
    /// Number of records, END included.
    pub records: u64,
}

/// Finds the stream in `port_log` and writes the dump it carries to
/// `out`. Fails, naming the problem with the last candidate, when no
/// occurrence of the magic starts a complete stream.
pub fn reassemble(port_log: &Path, out: &Path) -> Result<StreamSummary> {
    let mut file =
        File::open(port_log).with_context(|| format!("opening {}", port_log.display()))?;
    let mut from = 0u64;
    let mut last_error = None;
    while let Some(at) = find_magic(&mut file, from)? {
        file.seek(SeekFrom::Start(at + MAGIC.len() as u64))?;
        match read_stream(BufReader::new(&mut file), out) {
            Ok(mut summary) => {
                summary.stream_offset = at;
                return Ok(summary);
            }
            Err(error) => last_error = Some(error.context(format!("stream at offset {at}"))),
        }
        from = at + 1;
    }
    let _ = fs::remove_file(out);
    Err(match last_error {
        Some(error) => error,
        None => anyhow::anyhow!(
            "no dump stream in {} (no \"HVDUMP1\" magic: the capture mode never started streaming)",
            port_log.display()
        ),
    })
}

/// The offset of the first magic at or after `from`.
fn find_magic(file: &mut File, from: u64) -> Result<Option<u64>> {
    file.seek(SeekFrom::Start(from))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut window: Vec<u8> = Vec::new();
    let mut window_start = from;
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        window.extend_from_slice(&chunk[..n]);
        if let Some(i) = window.windows(MAGIC.len()).position(|w| w == MAGIC) {
            return Ok(Some(window_start + i as u64));
        }
        // Keep the tail that may hold the start of a magic.
        let drop = window.len() - window.len().min(MAGIC.len() - 1);
        window.drain(..drop);
        window_start += drop as u64;
    }
}

/// Reads the records after a magic and writes the file.
fn read_stream(mut input: impl Read, out: &Path) -> Result<StreamSummary> {
    let mut decoder = Decoder::new();
    let mut read_exact = |buffer: &mut [u8]| input.read_exact(buffer).is_ok();
    let Record::Header { len: header_len } = decoder.next_record(&mut read_exact)? else {
        bail!("the first record is not a HEADER");
    };
    let mut header = vec![0; header_len as usize];
    if !read_exact(&mut header) {
        bail!("truncated HEADER record");
    }
    let loads = load_ranges(&header)?;
    let mut output = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    output.write_all(&header)?;
    let mut covered = vec![(0, header_len)];
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        match decoder.next_record(&mut read_exact)? {
            Record::Header { .. } => unreachable!("the decoder refuses a second HEADER"),
            Record::Data { offset, len } => {
                output.seek(SeekFrom::Start(offset))?;
                let mut left = len;
                while left > 0 {
                    let n = left.min(buffer.len() as u64) as usize;
                    if !read_exact(&mut buffer[..n]) {
                        bail!("DATA record at {offset:#x} is cut short");
                    }
                    output.write_all(&buffer[..n])?;
                    left -= n as u64;
                }
                covered.push((offset, offset + len));
            }
            Record::Zero { offset, len } => covered.push((offset, offset + len)),
            Record::End { total } => {
                let needed = loads.iter().map(|&(_, end)| end).max().unwrap_or(0);
                if total < needed {
                    bail!("END says {total} bytes, but the header's segments reach {needed}");
                }
                output.set_len(total)?;
                output.flush()?;
                return Ok(StreamSummary {
                    stream_offset: 0,
                    total,
                    header_len,
                    data_bytes: decoder.data_bytes(),
                    zero_bytes: decoder.zero_bytes(),
                    uncovered_bytes: uncovered(&loads, &covered),
                    records: decoder.records(),
                });
            }
        }
    }
}

/// The file ranges of the `PT_LOAD` segments the header declares.
fn load_ranges(header: &[u8]) -> Result<Vec<(u64, u64)>> {
    let core = CoreDump::parse(header)
        .map_err(|error| anyhow::anyhow!("the HEADER record is no ELF core header: {error}"))?;
    core.program_headers()
        .filter(|p| p.p_type == PT_LOAD && p.p_filesz > 0)
        .map(|p| {
            p.p_offset
                .checked_add(p.p_filesz)
                .map(|end| (p.p_offset, end))
                .context("a PT_LOAD segment overflows")
        })
        .collect()
}

/// Bytes of `loads` outside every range of `covered` (both sorted by start;
/// `covered` disjoint).
fn uncovered(loads: &[(u64, u64)], covered: &[(u64, u64)]) -> u64 {
    loads
        .iter()
        .map(|&(start, end)| {
            let inside: u64 = covered
                .iter()
                .map(|&(c_start, c_end)| c_end.min(end).saturating_sub(c_start.max(start)))
                .sum();
            (end - start).saturating_sub(inside)
        })
        .sum()
}

/// Writes a stream for `dump` (a complete dump file) the way CAPTURE.md
/// says, with all-zero pages sent as ZERO records: what hv's capture mode
/// does, for tests on both sides of the protocol.
pub fn encode(dump: &[u8]) -> Result<Vec<u8>> {
    struct Bytes(Vec<u8>);
    impl wire::Sink for Bytes {
        fn emit(&mut self, bytes: &[u8]) {
            self.0.extend_from_slice(bytes);
        }
    }
    let core =
        CoreDump::parse(dump).map_err(|error| anyhow::anyhow!("not a dump file: {error}"))?;
    // HEADER: everything before the first segment's bytes.
    let header_len = core
        .load_segments()
        .map(|p| p.p_offset)
        .min()
        .unwrap_or(dump.len() as u64);
    let mut encoder = Encoder::start(Bytes(Vec::new()), &dump[..header_len as usize]);
    for segment in core.load_segments() {
        let data = core
            .segment_data(&segment)
            .context("the dump holds less than its segments")?;
        // The file's own offsets stand in for memory addresses: a page of
        // the file is a page of memory.
        encoder.segment(
            segment.p_offset,
            segment.p_offset,
            data.len() as u64,
            |at, len| {
                let from = (at - segment.p_offset) as usize;
                &data[from..from + len as usize]
            },
        );
    }
    let (Bytes(stream), _) = encoder.finish(dump.len() as u64);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dump::tests::sample_dump;
    use hv_abi::dump_stream::{END, HEADER, ZERO};

    struct Dir(std::path::PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("xtask-stream-{name}-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn reassembled(name: &str, port: &[u8]) -> (Result<StreamSummary>, Option<Vec<u8>>) {
        let dir = Dir::new(name);
        let log = dir.0.join("port.log");
        let out = dir.0.join("vmcore");
        fs::write(&log, port).unwrap();
        let result = reassemble(&log, &out);
        (result, fs::read(&out).ok())
    }

    #[test]
    fn a_stream_after_other_output_gives_the_dump_back() {
        let dump = sample_dump();
        let mut port = b"hv debug chatter\n".to_vec();
        port.extend(encode(&dump).unwrap());
        port.extend_from_slice(b"anything after END is ignored");
        let (summary, file) = reassembled("ok", &port);
        let summary = summary.unwrap();
        assert_eq!(file.unwrap(), dump);
        assert_eq!(summary.stream_offset, 17);
        assert_eq!(summary.total, dump.len() as u64);
        assert!(summary.zero_bytes > 0 && summary.data_bytes > 0);
        assert_eq!(summary.uncovered_bytes, 0);
    }

    #[test]
    fn a_false_magic_before_the_stream_is_skipped() {
        let dump = sample_dump();
        let mut port = b"HVDUMP1\0\x09garbage".to_vec();
        port.extend(encode(&dump).unwrap());
        let (summary, file) = reassembled("false-magic", &port);
        assert_eq!(summary.unwrap().stream_offset, 16);
        assert_eq!(file.unwrap(), dump);
    }

    #[test]
    fn a_stream_without_end_is_a_failed_capture() {
        let dump = sample_dump();
        let mut port = encode(&dump).unwrap();
        port.truncate(port.len() - 9); // drop END
        let (result, file) = reassembled("no-end", &port);
        let error = format!("{:#}", result.unwrap_err());
        assert!(error.contains("without an END record"), "{error}");
        assert!(file.is_none(), "a failed capture leaves no dump behind");
    }

    #[test]
    fn no_magic_at_all_is_named() {
        let (result, _) = reassembled("none", b"just text\n");
        let error = format!("{:#}", result.unwrap_err());
        assert!(error.contains("no dump stream"), "{error}");
    }

    #[test]
    fn records_going_backwards_or_of_unknown_type_are_refused() {
        let dump = sample_dump();
        let header_len = encode(&dump).unwrap()[9..17].to_vec();
        let header_len = u64::from_le_bytes(header_len.try_into().unwrap()) as usize;
        let head = |records: &[u8]| {
            let mut s = MAGIC.to_vec();
            s.push(HEADER);
            s.extend_from_slice(&(header_len as u64).to_le_bytes());
            s.extend_from_slice(&dump[..header_len]);
            s.extend_from_slice(records);
            s
        };
        let mut back = vec![ZERO];
        back.extend_from_slice(&0u64.to_le_bytes());
        back.extend_from_slice(&16u64.to_le_bytes());
        let error = format!("{:#}", reassembled("back", &head(&back)).0.unwrap_err());
        assert!(error.contains("goes back"), "{error}");
        let error = format!("{:#}", reassembled("type", &head(&[9])).0.unwrap_err());
        assert!(error.contains("unknown record type 9"), "{error}");
        let mut short_end = vec![END];
        short_end.extend_from_slice(&(header_len as u64).to_le_bytes());
        let error = format!(
            "{:#}",
            reassembled("short", &head(&short_end)).0.unwrap_err()
        );
        assert!(error.contains("segments reach"), "{error}");
    }

    #[test]
    fn a_header_that_is_no_core_header_is_refused() {
        let mut port = MAGIC.to_vec();
        port.push(HEADER);
        port.extend_from_slice(&64u64.to_le_bytes());
        port.extend_from_slice(&[0u8; 64]);
        let error = format!("{:#}", reassembled("bad-header", &port).0.unwrap_err());
        assert!(error.contains("no ELF core header"), "{error}");
    }

    #[test]
    fn gaps_in_the_segments_are_counted() {
        let dump = sample_dump();
        let stream = encode(&dump).unwrap();
        // Drop the first record after HEADER (a page of the first segment).
        let header_len = u64::from_le_bytes(stream[9..17].try_into().unwrap()) as usize;
        let first = 17 + header_len;
        let len = match stream[first] {
            ZERO => 17,
            _ => {
                17 + u64::from_le_bytes(stream[first + 9..first + 17].try_into().unwrap()) as usize
            }
        };
        let dropped = u64::from_le_bytes(stream[first + 9..first + 17].try_into().unwrap());
        let mut gappy = stream[..first].to_vec();
        gappy.extend_from_slice(&stream[first + len..]);
        let summary = reassembled("gap", &gappy).0.unwrap();
        assert_eq!(summary.uncovered_bytes, dropped);
    }

    #[test]
    fn uncovered_counts_bytes_outside_every_record() {
        assert_eq!(uncovered(&[(100, 200)], &[(0, 150)]), 50);
        assert_eq!(uncovered(&[(100, 200)], &[(0, 120), (150, 300)]), 30);
        assert_eq!(uncovered(&[(100, 200), (300, 310)], &[(0, 1000)]), 0);
    }
}
