//! Capture mode: this image, booted by the crashed hypervisor's purgatory
//! inside the crash reservation, reads the ELF core header the crash path
//! wrote and streams the dump out of the debug port (I/O port 0xE9), or to
//! a disk (Bochs), in the
//! format of `xtask/CAPTURE.md`. All-zero pages go as ZERO records, so a
//! mostly idle machine's dump crosses quickly.

use core::fmt::Write;

use kexec_loader::elfcore::CoreDump;

use crate::arch::port::{outb, outsb};
use crate::console::EmergencyConsole;

const DEBUG_PORT: u16 = 0xE9;
const PAGE: u64 = 4096;
/// Largest DATA record: consecutive non-zero pages are merged up to this.
const MAX_DATA_RECORD: u64 = 256 * 1024;
/// Old memory the capture image can read: its identity map covers 4 GiB.
const READABLE_END: u64 = 4 << 30;

const RECORD_HEADER: u8 = 1;
const RECORD_DATA: u8 = 2;
const RECORD_ZERO: u8 = 3;
const RECORD_END: u8 = 4;

/// Where the stream goes: the debug port (QEMU), or the primary ATA
/// channel's slave disk by PIO from sector 0 (Bochs, whose port 0xE9 shares
/// stdout with its screen).
// Boxing would need an allocator; the one Sink lives on the stack once.
#[allow(clippy::large_enum_variant)]
enum Sink {
    DebugPort,
    Ata(Ata),
}

impl Sink {
    fn emit(&mut self, bytes: &[u8]) {
        match self {
            Sink::DebugPort => outsb(DEBUG_PORT, bytes),
            Sink::Ata(ata) => ata.write(bytes),
        }
    }

    fn emit_u64(&mut self, value: u64) {
        self.emit(&value.to_le_bytes());
    }

    fn emit_record(&mut self, kind: u8) {
        match self {
            Sink::DebugPort => outb(DEBUG_PORT, kind),
            Sink::Ata(ata) => ata.write(&[kind]),
        }
    }

    fn finish(&mut self) {
        if let Sink::Ata(ata) = self {
            ata.finish();
        }
    }
}

const ATA_DATA: u16 = 0x1F0;
const ATA_SECTOR_COUNT: u16 = 0x1F2;
const ATA_LBA_LOW: u16 = 0x1F3;
const ATA_LBA_MID: u16 = 0x1F4;
const ATA_LBA_HIGH: u16 = 0x1F5;
const ATA_DRIVE: u16 = 0x1F6;
const ATA_COMMAND: u16 = 0x1F7;
const ATA_BUSY: u8 = 0x80;
const ATA_FAULT: u8 = 0x20;
const ATA_REQUEST: u8 = 0x08;
const ATA_ERROR: u8 = 0x01;
const ATA_WRITE_SECTORS_EXT: u8 = 0x34;
const ATA_FLUSH_CACHE_EXT: u8 = 0xEA;

/// Sector-buffered LBA48 PIO writes to the primary slave.
struct Ata {
    sector: [u16; 256],
    filled: usize,
    lba: u64,
}

impl Ata {
    fn wait(&self, want: u8) {
        for _ in 0..10_000_000 {
            let status = crate::arch::port::inb(ATA_COMMAND);
            if status & (ATA_ERROR | ATA_FAULT) != 0 {
                fail(&"the dump disk reported an error");
            }
            if status & ATA_BUSY == 0 && status & want == want {
                return;
            }
        }
        fail(&"the dump disk does not answer");
    }

    fn write_sector(&mut self) {
        self.wait(0);
        let lba = self.lba;
        outb(ATA_DRIVE, 0x50);
        outb(ATA_SECTOR_COUNT, 0);
        outb(ATA_LBA_LOW, (lba >> 24) as u8);
        outb(ATA_LBA_MID, (lba >> 32) as u8);
        outb(ATA_LBA_HIGH, (lba >> 40) as u8);
        outb(ATA_SECTOR_COUNT, 1);
        outb(ATA_LBA_LOW, lba as u8);
        outb(ATA_LBA_MID, (lba >> 8) as u8);
        outb(ATA_LBA_HIGH, (lba >> 16) as u8);
        outb(ATA_COMMAND, ATA_WRITE_SECTORS_EXT);
        self.wait(ATA_REQUEST);
        crate::arch::port::outsw(ATA_DATA, &self.sector);
        self.lba += 1;
        self.filled = 0;
        self.sector = [0; 256];
    }

    fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let at = self.filled;
            let take = (512 - at).min(bytes.len());
            for (index, &byte) in bytes[..take].iter().enumerate() {
                let position = at + index;
                let word = &mut self.sector[position / 2];
                *word |= u16::from(byte) << (8 * (position % 2));
            }
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == 512 {
                self.write_sector();
            }
        }
    }

    fn finish(&mut self) {
        if self.filled > 0 {
            self.write_sector();
        }
        self.wait(0);
        outb(ATA_COMMAND, ATA_FLUSH_CACHE_EXT);
        self.wait(0);
    }
}

/// Pending ZERO or DATA run, flushed when the kind changes.
struct Stream {
    sink: Sink,
    zero_start: u64,
    zero_len: u64,
}

impl Stream {
    fn flush_zero(&mut self) {
        if self.zero_len > 0 {
            self.sink.emit_record(RECORD_ZERO);
            self.sink.emit_u64(self.zero_start);
            self.sink.emit_u64(self.zero_len);
            self.zero_len = 0;
        }
    }

    fn zero(&mut self, offset: u64, len: u64) {
        if self.zero_len == 0 {
            self.zero_start = offset;
        }
        self.zero_len += len;
    }

    fn data(&mut self, offset: u64, bytes: &[u8]) {
        self.flush_zero();
        self.sink.emit_record(RECORD_DATA);
        self.sink.emit_u64(offset);
        self.sink.emit_u64(bytes.len() as u64);
        self.sink.emit(bytes);
    }
}

/// Old memory at `[address, address + len)`.
fn old_memory(address: u64, len: u64) -> &'static [u8] {
    // SAFETY: the range lies below 4 GiB (checked by the caller), which the
    // identity map covers; old memory is never written by this image.
    unsafe { core::slice::from_raw_parts(address as *const u8, len as usize) }
}

fn fail(why: &dyn core::fmt::Display) -> ! {
    let _ = writeln!(EmergencyConsole, "capture: {why}");
    crate::report::capture_line(|o| {
        o.field("capture").object(|o| {
            o.field("entered").bool(true)?;
            o.field("kernel").str("hv")?;
            o.field("error").display(why)
        })
    });
    crate::finish::fail_stop()
}

/// Streams the dump described by the core header at `header` and ends.
pub fn run(header: u64, sink: hv_core::cmdline::CaptureSink) -> ! {
    log::info!("capture: hv capture mode, ELF core header at {header:#x}");
    crate::report::capture_line(|o| {
        o.field("capture").object(|o| {
            o.field("entered").bool(true)?;
            o.field("kernel").str("hv")?;
            o.field("entered_tsc").u64(crate::arch::cpu::rdtsc())
        })
    });
    // The header region is the reserved map entry that starts at it.
    let Some(region) = crate::memory::FIRMWARE_MAP.get().and_then(|map| {
        map.regions()
            .iter()
            .find(|region| region.start == header)
            .copied()
    }) else {
        fail(&"the ELF core header is not where the command line says");
    };
    let dump = match CoreDump::parse_elfcorehdr(old_memory(region.start, region.len), header) {
        Ok(dump) => dump,
        Err(error) => fail(&error),
    };
    let buffer_pages = region.len.div_ceil(PAGE) + 1;
    let Some(buffer) = crate::memory::alloc_aligned(buffer_pages, 1) else {
        fail(&"no memory for the file header");
    };
    // SAFETY: fresh frames of ours.
    let out = unsafe {
        core::slice::from_raw_parts_mut(buffer as *mut u8, (buffer_pages * PAGE) as usize)
    };
    let layout = match dump.write_file_header(out) {
        Ok(layout) => layout,
        Err(error) => fail(&error),
    };
    let cpu_notes = dump.cpus().count();
    log::info!(
        "capture: {cpu_notes} CPU notes; streaming the dump to {}",
        sink.name()
    );
    let sink = match sink {
        hv_core::cmdline::CaptureSink::DebugPort => Sink::DebugPort,
        hv_core::cmdline::CaptureSink::AtaSlave => Sink::Ata(Ata {
            sector: [0; 256],
            filled: 0,
            lba: 0,
        }),
    };
    let mut stream = Stream {
        sink,
        zero_start: 0,
        zero_len: 0,
    };
    stream.sink.emit(b"HVDUMP1\0");
    stream.sink.emit_record(RECORD_HEADER);
    stream.sink.emit_u64(layout.len as u64);
    stream.sink.emit(&out[..layout.len]);
    let mut offset = layout.data_offset;
    let mut data_pages = 0u64;
    for segment in dump.load_segments() {
        let (start, len) = (segment.p_offset, segment.p_memsz);
        if start.checked_add(len).is_none_or(|end| end > READABLE_END) {
            fail(&"old memory above 4 GiB is not captured by this image");
        }
        let mut done = 0;
        while done < len {
            // Page-sized steps, aligned to the segment's own pages.
            let step = (PAGE - (start + done) % PAGE).min(len - done);
            let bytes = old_memory(start + done, step);
            if bytes.iter().all(|&byte| byte == 0) {
                stream.zero(offset + done, step);
                done += step;
                continue;
            }
            // Merge the following non-zero pages into one record.
            let mut run = step;
            while done + run < len && run < MAX_DATA_RECORD {
                let next = (PAGE - (start + done + run) % PAGE).min(len - done - run);
                if old_memory(start + done + run, next)
                    .iter()
                    .all(|&byte| byte == 0)
                {
                    break;
                }
                run += next;
            }
            stream.data(offset + done, old_memory(start + done, run));
            data_pages += run.div_ceil(PAGE);
            done += run;
        }
        offset += len;
    }
    stream.flush_zero();
    stream.sink.emit_record(RECORD_END);
    stream.sink.emit_u64(offset);
    stream.sink.finish();
    log::info!("capture: dump of {offset} bytes streamed ({data_pages} non-zero pages)");
    crate::report::capture_line(|o| {
        o.field("capture").object(|o| {
            o.field("streamed").bool(true)?;
            o.field("cpu_notes").u64(cpu_notes as u64)?;
            o.field("streamed_bytes").u64(offset)?;
            o.field("data_pages").u64(data_pages)
        })
    });
    crate::finish::success_stop()
}
