//! Capture mode: this image, booted by the crashed hypervisor's purgatory
//! inside the crash reservation, reads the ELF core header the crash path
//! wrote and streams the dump out of the debug port (I/O port 0xE9), or to
//! a disk (Bochs), as an `HVDUMP1` stream (`hv_abi::dump_stream`). All-zero
//! pages go as ZERO records, so a mostly idle machine's dump crosses
//! quickly.

use core::fmt::Write;

use hv_abi::dump_stream::{self, Encoder};
use kexec_loader::elfcore::CoreDump;

use hv_core::cmdline::Options;

use super::{share, wake};
use crate::arch::apic;
use crate::arch::port::{outb, outsb};
use crate::console::EmergencyConsole;
use crate::cpu::time;
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
/// `entry_tsc` is the TSC at the image's first instruction; `rsdp` the
/// ACPI tables' root (for the clock); `purgatory` the crashed hypervisor's
/// purgatory area, whose TSC stamps and NMI counts are reported.
pub fn run(
    header: u64,
    options: &Options,
    rsdp: Option<u64>,
    entry_tsc: u64,
    purgatory: Option<u64>,
) -> ! {
    log::info!("capture: hv capture mode, ELF core header at {header:#x}");
    // The area lies in the reservation, below 4 GiB, and the memory map
    // keeps it reserved: nothing here wrote it.
    let stamps = purgatory
        .filter(|area| *area < READABLE_END)
        .map(crate::crash::purgatory::stamps);
    crate::console::report::capture_line(|o| {
        o.field("capture").object(|o| {
            o.field("entered").bool(true)?;
            o.field("kernel").str("hv")?;
            o.field("entered_tsc").u64(entry_tsc)?;
            o.field("streaming_tsc").u64(crate::arch::cpu::rdtsc())?;
            // NMIs this image took on its own IDT (the purgatory's IDT
            // counts those before it, below).
            o.field("stray_nmis")
                .u64(u64::from(crate::crash::nmi::external()))?;
            if let Some(stamps) = stamps {
                o.field("purgatory").object(|o| {
                    o.field("entry_tsc").u64(stamps.entry_tsc)?;
                    o.field("verified_tsc").u64(stamps.verified_tsc)?;
                    o.field("jump_tsc").u64(stamps.jump_tsc)?;
                    o.field("nmis_64").u64(stamps.nmis_64)?;
                    o.field("nmis_32").u64(stamps.nmis_32)
                })?;
            }
            Ok(())
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

    // The clock (the wake's bounded wait, the throughput) and the local
    // APIC (its IPIs).
    if let Err(error) = time::calibrate(rsdp) {
        log::warn!("capture: TSC not calibrated: {error}; assuming 1 GHz");
    }
    apic::choose_mode();
    apic::enable();
    let sharing = options.capture_wake && options.capture_share && share::prepare(&dump);
    if sharing {
        crate::cpu::idle::set_work(share::help);
    }
    let wake = wake::wake_old_cpus(&dump, options);
    report_wake(&wake);

    log::info!(
        "capture: {cpu_notes} CPU notes; streaming the dump to {}",
        options.capture_sink.name()
    );
    let sink = match options.capture_sink {
        hv_core::cmdline::CaptureSink::DebugPort => Sink::DebugPort,
        hv_core::cmdline::CaptureSink::AtaSlave => Sink::Ata(Ata {
            sector: [0; 256],
            filled: 0,
            lba: 0,
        }),
    };
    let borrowed = wake.borrowed;
    // A borrowed page's bytes come from its copy: the dump is what the
    // old kernel left, whatever the wake wrote there.
    let read = |address: u64, len: u64| match borrowed.copy_of(address) {
        Some(copy) => phys::read(copy + address % PAGE, len),
        None => old_memory(address, len),
    };
    let mut streamer = share::Streamer::new(borrowed);
    let started_us = time::now_us();
    let mut stream = Encoder::start(sink, header);
    let mut offset = layout.data_offset;
    for (index, segment) in dump.load_segments().enumerate() {
        let (start, len) = (segment.p_offset, segment.p_memsz);
        if start.checked_add(len).is_none_or(|end| end > READABLE_END) {
            fail(&"old memory above 4 GiB is not captured by this image");
        }
        stream.segment_classified(offset, start, len, read, |address, bytes| {
            streamer.is_zero(index, address, bytes)
        });
        offset += len;
    }
    let (mut sink, stats) = stream.finish(offset);
    sink.finish();
    let stream_us = time::now_us().saturating_sub(started_us).max(1);
    let data_pages = stats.data_pages;
    let (helper_pages, helpers) = share::helpers();
    let mb_per_s = offset as f64 / stream_us as f64;
    log::info!(
        "capture: dump of {offset} bytes streamed ({data_pages} non-zero pages) in {stream_us} us \
         ({mb_per_s:.1} MB/s; {} CPUs: {helper_pages} pages judged by {helpers} helpers, {} by this CPU)",
        1 + helpers,
        streamer.scanned
    );
    crate::console::report::capture_line(|o| {
        o.field("capture").object(|o| {
            o.field("streamed").bool(true)?;
            o.field("cpu_notes").u64(cpu_notes as u64)?;
            o.field("streamed_bytes").u64(offset)?;
            o.field("data_pages").u64(data_pages)?;
            o.field("stream_us").u64(stream_us)?;
            o.field("stream_mb_per_s").f64(mb_per_s)?;
            o.field("share").bool(sharing)?;
            o.field("workers").u64(1 + u64::from(helpers))?;
            o.field("helper_pages").u64(helper_pages)?;
            o.field("streamer_pages").u64(streamer.scanned)?;
            o.field("taken_pages").u64(streamer.taken)?;
            o.field("tsc_khz").u64(time::tsc_khz())
        })
    });
    crate::console::finish::success_stop()
}

/// The wake's report line.
fn report_wake(wake: &wake::Outcome) {
    use wake::Fate;
    let woken = wake.with(Fate::Woken, None).count();
    let silent = wake.with(Fate::Silent, None).count();
    log::info!(
        "capture: {woken} CPUs woken, {silent} silent, of {} that checked in (old boot CPU: {}){}",
        wake.checked_in_others(),
        wake.boot_cpu.name(),
        wake.error.map_or("", |_| "; could not wake")
    );
    if let Some(error) = wake.error {
        log::warn!("capture: {error}");
    }
    crate::console::report::capture_line(|o| {
        o.field("capture").object(|o| {
            o.field("wake").bool(wake.asked)?;
            o.field("wake_checked_in")
                .u64(wake.checked_in_others() as u64)?;
            o.field("woken").u64_array(wake.with(Fate::Woken, None))?;
            o.field("silent").u64_array(wake.with(Fate::Silent, None))?;
            o.field("woken_stragglers")
                .u64_array(wake.with(Fate::Woken, Some(true)))?;
            o.field("silent_stragglers")
                .u64_array(wake.with(Fate::Silent, Some(true)))?;
            o.field("stragglers_left_alone")
                .u64_array(wake.with(Fate::StragglerLeftAlone, None))?;
            o.field("not_sent")
                .u64_array(wake.with(Fate::NotSent, None))?;
            o.field("boot_cpu_left_alone")
                .u64_array(wake.with(Fate::BootCpuLeftAlone, None))?;
            o.field("old_boot_cpu").str(wake.boot_cpu.name())?;
            o.field("wake_us").u64(wake.elapsed_us)?;
            o.field("woken_us").u64_array(wake.woken_us())?;
            o.field("trampoline_page")
                .option(wake.trampoline_page, |value, page| value.u64(page))?;
            o.field("low_memory_unchanged")
                .option(wake.low_memory_unchanged, |value, same| value.bool(same))?;
            o.field("wake_error")
                .option(wake.error, |value, error| value.str(error))
        })
    });
}
