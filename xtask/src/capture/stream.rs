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
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use kexec_loader::elfcore::{CoreDump, PT_LOAD};

/// The stream's first bytes.
pub const MAGIC: &[u8; 8] = b"HVDUMP1\0";

const HEADER: u8 = 1;
const DATA: u8 = 2;
const ZERO: u8 = 3;
const END: u8 = 4;

/// The largest header accepted: far more than 64K program headers and
/// notes for hundreds of CPUs need.
const MAX_HEADER_LEN: u64 = 64 << 20;

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
    let mut summary = StreamSummary {
        stream_offset: 0,
        total: 0,
        header_len: 0,
        data_bytes: 0,
        zero_bytes: 0,
        uncovered_bytes: 0,
        records: 0,
    };
    let record_type = read_u8(&mut input).context("no HEADER record after the magic")?;
    if record_type != HEADER {
        bail!("the first record is of type {record_type}, not HEADER");
    }
    let header_len = read_u64(&mut input).context("truncated HEADER record")?;
    if header_len == 0 || header_len > MAX_HEADER_LEN {
        bail!("HEADER record of {header_len} bytes");
    }
    let mut header = vec![0; header_len as usize];
    input
        .read_exact(&mut header)
        .context("truncated HEADER record")?;
    let loads = load_ranges(&header)?;
    summary.header_len = header_len;
    summary.records = 1;

    let mut output = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    output.write_all(&header)?;
    // Everything covered so far: [0, covered_to); records must not go back.
    let mut covered_to = header_len;
    let mut covered = vec![(0, header_len)];
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let record_type = match read_u8(&mut input) {
            Ok(t) => t,
            Err(_) => bail!(
                "the stream ends without an END record after {} records \
                 ({} bytes of data): the capture did not finish",
                summary.records,
                summary.data_bytes
            ),
        };
        summary.records += 1;
        match record_type {
            DATA | ZERO => {
                let what = if record_type == DATA { "DATA" } else { "ZERO" };
                let offset = read_u64(&mut input).with_context(|| format!("truncated {what}"))?;
                let len = read_u64(&mut input).with_context(|| format!("truncated {what}"))?;
                let end = offset
                    .checked_add(len)
                    .with_context(|| format!("{what} record at {offset:#x} overflows"))?;
                if offset < covered_to {
                    bail!(
                        "{what} record at {offset:#x} goes back before {covered_to:#x} \
                         (records must come in increasing offset order)"
                    );
                }
                if record_type == DATA {
                    output.seek(SeekFrom::Start(offset))?;
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(buffer.len() as u64) as usize;
                        input
                            .read_exact(&mut buffer[..n])
                            .with_context(|| format!("DATA record at {offset:#x} is cut short"))?;
                        output.write_all(&buffer[..n])?;
                        left -= n as u64;
                    }
                    summary.data_bytes += len;
                } else {
                    summary.zero_bytes += len;
                }
                covered_to = end;
                covered.push((offset, end));
            }
            END => {
                let total = read_u64(&mut input).context("truncated END record")?;
                if total < covered_to {
                    bail!("END says {total} bytes, but records reach {covered_to}");
                }
                let needed = loads.iter().map(|&(_, end)| end).max().unwrap_or(0);
                if total < needed {
                    bail!("END says {total} bytes, but the header's segments reach {needed}");
                }
                output.set_len(total)?;
                output.flush()?;
                summary.total = total;
                summary.uncovered_bytes = uncovered(&loads, &covered);
                return Ok(summary);
            }
            other => bail!("unknown record type {other} (record {})", summary.records),
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

fn read_u8(input: &mut impl Read) -> io::Result<u8> {
    let mut byte = [0u8; 1];
    input.read_exact(&mut byte)?;
    Ok(byte[0])
}

fn read_u64(input: &mut impl Read) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    input.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

/// Writes a stream for `dump` (a complete dump file) the way CAPTURE.md
/// says, with all-zero pages sent as ZERO records: what hv's capture mode
/// does, for tests on both sides of the protocol.
pub fn encode(dump: &[u8]) -> Result<Vec<u8>> {
    let core =
        CoreDump::parse(dump).map_err(|error| anyhow::anyhow!("not a dump file: {error}"))?;
    // HEADER: everything before the first segment's bytes.
    let header_len = core
        .load_segments()
        .map(|p| p.p_offset)
        .min()
        .unwrap_or(dump.len() as u64);
    let mut stream = MAGIC.to_vec();
    stream.push(HEADER);
    stream.extend_from_slice(&header_len.to_le_bytes());
    stream.extend_from_slice(&dump[..header_len as usize]);
    for segment in core.load_segments() {
        let data = core
            .segment_data(&segment)
            .context("the dump holds less than its segments")?;
        for (i, page) in data.chunks(4096).enumerate() {
            let offset = segment.p_offset + (i * 4096) as u64;
            if page.iter().all(|&b| b == 0) {
                stream.push(ZERO);
                stream.extend_from_slice(&offset.to_le_bytes());
                stream.extend_from_slice(&(page.len() as u64).to_le_bytes());
            } else {
                stream.push(DATA);
                stream.extend_from_slice(&offset.to_le_bytes());
                stream.extend_from_slice(&(page.len() as u64).to_le_bytes());
                stream.extend_from_slice(page);
            }
        }
    }
    stream.push(END);
    stream.extend_from_slice(&(dump.len() as u64).to_le_bytes());
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dump::tests::sample_dump;

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
