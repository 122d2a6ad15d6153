//! A 16550 UART at 0x3F8 (COM1), output only: what the guest transmits is
//! gathered into lines and handed to a [`ConsoleSink`].
//!
//! The transmitter is always empty (LSR.THRE and LSR.TEMT set), as the
//! kvm-unit-tests driver polls for; nothing is ever received except, in
//! loopback mode, what the guest transmits itself. No interrupts are raised
//! (IIR always reads "none pending").

/// Where complete output lines go (hv's console, the run report).
pub trait ConsoleSink {
    /// One line, without its line terminator and carriage returns.
    fn line(&mut self, line: &[u8]);
}

/// COM1's base port.
pub const COM1: u16 = 0x3F8;
/// Longest line kept; a longer one is handed over in pieces.
pub const LINE_MAX: usize = 256;

const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;
const LSR_TRANSMITTER_EMPTY: u8 = 1 << 6;
const LCR_DLAB: u8 = 1 << 7;
const MCR_LOOPBACK: u8 = 1 << 4;
const IIR_NONE_PENDING: u8 = 1;
const IIR_FIFOS_ENABLED: u8 = 0xC0;

/// The UART's registers and the line being gathered.
#[derive(Debug, Clone)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    divisor: u16,
    fifo_enabled: bool,
    received: Option<u8>,
    line: [u8; LINE_MAX],
    len: usize,
}

impl Default for Uart16550 {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart16550 {
    /// The state after reset (8N1 is set by the guest's driver).
    pub const fn new() -> Self {
        Self {
            ier: 0,
            lcr: 0,
            mcr: 0,
            scratch: 0,
            divisor: 12,
            fifo_enabled: false,
            received: None,
            line: [0; LINE_MAX],
            len: 0,
        }
    }

    /// A read of register `offset` (0-7).
    pub fn read(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor as u8,
            0 => self.received.take().unwrap_or(0),
            1 if dlab => (self.divisor >> 8) as u8,
            1 => self.ier,
            2 => {
                IIR_NONE_PENDING
                    | if self.fifo_enabled {
                        IIR_FIFOS_ENABLED
                    } else {
                        0
                    }
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => {
                LSR_THR_EMPTY
                    | LSR_TRANSMITTER_EMPTY
                    | if self.received.is_some() {
                        LSR_DATA_READY
                    } else {
                        0
                    }
            }
            // MSR: in loopback the modem inputs follow the outputs
            // (DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD); else DCD, DSR, CTS.
            6 if self.mcr & MCR_LOOPBACK != 0 => {
                let m = self.mcr;
                (m & 1) << 5 | (m & 2) << 3 | (m & 4) << 4 | (m & 8) << 4
            }
            6 => 0xB0,
            7 => self.scratch,
            _ => 0xFF,
        }
    }

    /// A write of `value` to register `offset` (0-7).
    pub fn write(&mut self, offset: u16, value: u8, sink: &mut dyn ConsoleSink) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.divisor = (self.divisor & 0xFF00) | u16::from(value),
            0 if self.mcr & MCR_LOOPBACK != 0 => self.received = Some(value),
            0 => self.transmit(value, sink),
            1 if dlab => self.divisor = (self.divisor & 0x00FF) | u16::from(value) << 8,
            1 => self.ier = value & 0x0F,
            2 => self.fifo_enabled = value & 1 != 0,
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1F,
            7 => self.scratch = value,
            _ => {}
        }
    }

    fn transmit(&mut self, byte: u8, sink: &mut dyn ConsoleSink) {
        match byte {
            b'\n' => self.flush_line(sink),
            b'\r' => {}
            _ => {
                if self.len == LINE_MAX {
                    self.flush_line(sink);
                }
                self.line[self.len] = byte;
                self.len += 1;
            }
        }
    }

    fn flush_line(&mut self, sink: &mut dyn ConsoleSink) {
        sink.line(&self.line[..self.len]);
        self.len = 0;
    }

    /// Hands over a partial last line, if any (the guest stopped mid-line).
    pub fn flush(&mut self, sink: &mut dyn ConsoleSink) {
        if self.len > 0 {
            self.flush_line(sink);
        }
    }

    /// The divisor latch the guest programmed (115200 / divisor baud).
    pub fn divisor(&self) -> u16 {
        self.divisor
    }
}

#[cfg(test)]
pub(crate) mod fake {
    /// Collects lines for tests.
    #[derive(Default, Debug)]
    pub struct Lines(pub Vec<Vec<u8>>);

    impl super::ConsoleSink for Lines {
        fn line(&mut self, line: &[u8]) {
            self.0.push(line.to_vec());
        }
    }

    impl Lines {
        pub fn strings(&self) -> Vec<String> {
            self.0
                .iter()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::Lines;
    use super::*;

    /// What lib/x86/io.c's serial_init() and serial_outb() do.
    fn kvm_unit_tests_print(uart: &mut Uart16550, sink: &mut Lines, text: &str) {
        let lcr = uart.read(3);
        uart.write(3, lcr | 0x80, sink);
        uart.write(0, 0x01, sink);
        uart.write(1, 0x00, sink);
        let lcr = uart.read(3);
        uart.write(3, lcr & !0x80, sink);
        uart.write(1, 0x00, sink);
        uart.write(3, 0x03, sink);
        uart.write(2, 0x00, sink);
        uart.write(4, 0x03, sink);
        for byte in text.bytes() {
            if byte == b'\n' {
                assert_ne!(uart.read(5) & 0x20, 0);
                uart.write(0, b'\r', sink);
            }
            assert_ne!(
                uart.read(5) & 0x20,
                0,
                "the driver spins until THR is empty"
            );
            uart.write(0, byte, sink);
        }
    }

    #[test]
    fn the_test_driver_s_output_arrives_as_lines() {
        let mut uart = Uart16550::new();
        let mut lines = Lines::default();
        kvm_unit_tests_print(
            &mut uart,
            &mut lines,
            "enabling apic\nPASS: x\nSUMMARY: 1 tests\npartial",
        );
        assert_eq!(uart.divisor(), 1, "115200 baud");
        assert_eq!(
            lines.strings(),
            ["enabling apic", "PASS: x", "SUMMARY: 1 tests"]
        );
        uart.flush(&mut lines);
        assert_eq!(lines.strings().last().unwrap(), "partial");
        uart.flush(&mut lines);
        assert_eq!(lines.0.len(), 4, "nothing left to flush");
    }

    #[test]
    fn long_lines_come_in_pieces_and_empty_lines_survive() {
        let mut uart = Uart16550::new();
        let mut lines = Lines::default();
        for _ in 0..LINE_MAX + 10 {
            uart.write(0, b'a', &mut lines);
        }
        uart.write(0, b'\n', &mut lines);
        uart.write(0, b'\n', &mut lines);
        assert_eq!(lines.0.len(), 3);
        assert_eq!(lines.0[0].len(), LINE_MAX);
        assert_eq!(lines.0[1].len(), 10);
        assert!(lines.0[2].is_empty());
    }

    #[test]
    fn loopback_receives_what_it_sends_and_divisor_latch_hides_data() {
        let mut uart = Uart16550::new();
        let mut lines = Lines::default();
        uart.write(4, MCR_LOOPBACK | 0x3, &mut lines);
        assert_eq!(uart.read(5) & LSR_DATA_READY, 0);
        uart.write(0, 0x42, &mut lines);
        assert_ne!(uart.read(5) & LSR_DATA_READY, 0);
        assert_eq!(uart.read(6) & 0x30, 0x30, "DTR and RTS loop to DSR and CTS");
        assert_eq!(uart.read(0), 0x42);
        assert_eq!(uart.read(5) & LSR_DATA_READY, 0);
        assert!(lines.0.is_empty(), "loopback output is not transmitted");
        uart.write(7, 0x5A, &mut lines);
        assert_eq!(uart.read(7), 0x5A);
        assert_eq!(uart.read(2), IIR_NONE_PENDING);
        uart.write(2, 1, &mut lines);
        assert_eq!(uart.read(2), IIR_NONE_PENDING | IIR_FIFOS_ENABLED);
    }
}
