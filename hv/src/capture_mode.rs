//! Capture mode: this image, booted by the crashed hypervisor's purgatory
//! inside the crash reservation, reads the ELF core header the crash path
//! wrote and streams the dump out of the debug port (I/O port 0xE9) in the
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

fn emit(bytes: &[u8]) {
    outsb(DEBUG_PORT, bytes);
}

fn emit_u64(value: u64) {
    emit(&value.to_le_bytes());
}

fn emit_record(kind: u8) {
    outb(DEBUG_PORT, kind);
}

/// Pending ZERO or DATA run, flushed when the kind changes.
struct Stream {
    zero_start: u64,
    zero_len: u64,
}

impl Stream {
    fn flush_zero(&mut self) {
        if self.zero_len > 0 {
            emit_record(RECORD_ZERO);
            emit_u64(self.zero_start);
            emit_u64(self.zero_len);
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
        emit_record(RECORD_DATA);
        emit_u64(offset);
        emit_u64(bytes.len() as u64);
        emit(bytes);
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
    crate::report::line(|o| {
        o.field("capture").object(|o| {
            o.field("entered").bool(true)?;
            o.field("kernel").str("hv")?;
            o.field("error").display(why)
        })
    });
    crate::finish::fail_stop()
}

/// Streams the dump described by the core header at `header` and ends.
pub fn run(header: u64) -> ! {
    log::info!("capture: hv capture mode, ELF core header at {header:#x}");
    crate::report::line(|o| {
        o.field("capture").object(|o| {
            o.field("entered").bool(true)?;
            o.field("kernel").str("hv")?;
            o.field("entered_us").u64(crate::time::now_us())
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
    log::info!("capture: {cpu_notes} CPU notes; streaming the dump on port {DEBUG_PORT:#x}");

    emit(b"HVDUMP1\0");
    emit_record(RECORD_HEADER);
    emit_u64(layout.len as u64);
    emit(&out[..layout.len]);
    let mut stream = Stream {
        zero_start: 0,
        zero_len: 0,
    };
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
    emit_record(RECORD_END);
    emit_u64(offset);
    log::info!("capture: dump of {offset} bytes streamed ({data_pages} non-zero pages)");
    crate::report::line(|o| {
        o.field("capture").object(|o| {
            o.field("streamed").bool(true)?;
            o.field("cpu_notes").u64(cpu_notes as u64)?;
            o.field("dump_bytes").u64(offset)?;
            o.field("data_pages").u64(data_pages)
        })
    });
    crate::finish::success_stop()
}
