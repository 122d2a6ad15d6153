//! Capture mode: this image, booted by the crashed hypervisor's purgatory
//! inside the crash reservation, reads the ELF core header the crash path
//! wrote and streams the dump out of the debug port (I/O port 0xE9), or to
//! a disk (Bochs), as an `HVDUMP1` stream (`hv_abi::dump_stream`). All-zero
//! pages go as ZERO records, so a mostly idle machine's dump crosses
//! quickly.

use core::fmt::Write;

use hv_abi::dump_stream::{self, Encoder};
use kexec_loader::elfcore::CoreDump;

use crate::arch::port::{outb, outsb};
use crate::console::EmergencyConsole;
use crate::mm::{self, phys};

const DEBUG_PORT: u16 = 0xE9;
const PAGE: u64 = 4096;
/// Old memory the capture image can read: its identity map covers 4 GiB.
const READABLE_END: u64 = 4 << 30;

/// Where the stream goes: the debug port (QEMU), or the primary ATA
/// channel's slave disk by PIO from sector 0 (Bochs, whose port 0xE9 shares
/// stdout with its screen).
// Boxing would need an allocator; the one Sink lives on the stack once.
#[allow(clippy::large_enum_variant)]
enum Sink {
    DebugPort,
    Ata(Ata),
}

impl dump_stream::Sink for Sink {
    fn emit(&mut self, bytes: &[u8]) {
        match self {
            Sink::DebugPort if bytes.len() == 1 => outb(DEBUG_PORT, bytes[0]),
            Sink::DebugPort => outsb(DEBUG_PORT, bytes),
            Sink::Ata(ata) => ata.write(bytes),
        }
    }
}

impl Sink {
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

/// Old memory at `[address, address + len)`: below 4 GiB (checked by the
/// caller), which the identity map covers; this image never writes it.
fn old_memory(address: u64, len: u64) -> &'static [u8] {
    phys::read(address, len)
}

fn fail(why: &dyn core::fmt::Display) -> ! {
    let _ = writeln!(EmergencyConsole, "capture: {why}");
    crate::console::report::capture_line(|o| {
        o.field("capture").object(|o| {
            o.field("entered").bool(true)?;
            o.field("kernel").str("hv")?;
            o.field("error").display(why)
        })
    });
    crate::console::finish::fail_stop()
}

/// Streams the dump described by the core header at `header` and ends.
/// `entry_tsc` is the TSC at the image's first instruction.
pub fn run(header: u64, sink: hv_core::cmdline::CaptureSink, entry_tsc: u64) -> ! {
    log::info!("capture: hv capture mode, ELF core header at {header:#x}");
    crate::console::report::capture_line(|o| {
        o.field("capture").object(|o| {
            o.field("entered").bool(true)?;
            o.field("kernel").str("hv")?;
            o.field("entered_tsc").u64(entry_tsc)?;
            o.field("streaming_tsc").u64(crate::arch::cpu::rdtsc())
        })
    });
    // The header region is the reserved map entry that starts at it.
    let Some(region) = mm::FIRMWARE_MAP.get().and_then(|map| {
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
    let Some(buffer) = mm::alloc_aligned(buffer_pages, 1) else {
        fail(&"no memory for the file header");
    };
    // Fresh frames of ours.
    let layout = match phys::with_bytes_mut(buffer, buffer_pages * PAGE, |out| {
        dump.write_file_header(out)
    }) {
        Ok(layout) => layout,
        Err(error) => fail(&error),
    };
    let header = phys::read(buffer, layout.len as u64);
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
    let mut stream = Encoder::start(sink, header);
    let mut offset = layout.data_offset;
    for segment in dump.load_segments() {
        let (start, len) = (segment.p_offset, segment.p_memsz);
        if start.checked_add(len).is_none_or(|end| end > READABLE_END) {
            fail(&"old memory above 4 GiB is not captured by this image");
        }
        stream.segment(offset, start, len, old_memory);
        offset += len;
    }
    let (mut sink, stats) = stream.finish(offset);
    sink.finish();
    let data_pages = stats.data_pages;
    log::info!("capture: dump of {offset} bytes streamed ({data_pages} non-zero pages)");
    crate::console::report::capture_line(|o| {
        o.field("capture").object(|o| {
            o.field("streamed").bool(true)?;
            o.field("cpu_notes").u64(cpu_notes as u64)?;
            o.field("streamed_bytes").u64(offset)?;
            o.field("data_pages").u64(data_pages)
        })
    });
    crate::console::finish::success_stop()
}
