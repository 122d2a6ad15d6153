//! A virtual I/O APIC (82093AA, version 0x11, 24 pins) at 0xFEC0_0000:
//! IOREGSEL at offset 0x00, IOWIN at 0x10; ID (bits 27:24 writable),
//! version and arbitration registers, 24 redirection entries.
//!
//! Pins are driven with [`IoApic::set_pin`]. An unmasked edge-triggered pin
//! sends a message on each rising edge; an unmasked level-triggered pin
//! sends one while it is asserted and its remote IRR is clear, and sets
//! remote IRR until the local APICs' EOI for its vector comes back
//! ([`IoApic::eoi`]), after which a still-asserted pin sends again. Messages
//! are taken with [`IoApic::next_message`] and routed by the platform.

use crate::lapic::{DeliveryMode, Destination};

/// Default base of the I/O APIC's page.
pub const BASE: u64 = 0xFEC0_0000;
/// Number of pins (GSIs 0-23).
pub const PINS: usize = 24;
/// The version register: version 0x11, maximum redirection entry 23.
pub const VERSION: u32 = ((PINS as u32 - 1) << 16) | 0x11;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
/// Bits the guest may write: vector, delivery mode, destination mode,
/// polarity, trigger mode, mask, destination.
const WRITABLE: u64 = 0xFF00_0000_0001_AFFF;

/// An interrupt message for the local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApicMessage {
    /// The pin that sent it.
    pub pin: u8,
    /// Vector.
    pub vector: u8,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Destination (8-bit, xAPIC format).
    pub destination: Destination,
    /// Level-triggered: the accepting APIC sets TMR and will EOI it back.
    pub level_triggered: bool,
}

/// The device.
#[derive(Debug, Clone)]
pub struct IoApic {
    id: u32,
    select: u8,
    redirection: [u64; PINS],
    /// Pin levels, one bit per pin.
    lines: u32,
    /// Edge-triggered pins with a rising edge not yet sent.
    edges: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// The state after reset: ID 0, every entry masked.
    pub const fn new() -> Self {
        Self {
            id: 0,
            select: 0,
            redirection: [MASKED; PINS],
            lines: 0,
            edges: 0,
        }
    }

    /// A read of `size` bytes at `offset` in the page.
    pub fn mmio_read(&self, offset: u64, size: u8) -> u32 {
        let value = match offset & !3 {
            IOREGSEL => u32::from(self.select),
            IOWIN => self.read_register(self.select),
            _ => 0,
        };
        let shifted = value >> (8 * (offset & 3));
        match size {
            1 => shifted & 0xFF,
            2 => shifted & 0xFFFF,
            _ => shifted,
        }
    }

    /// A write of `size` bytes at `offset` in the page. Messages it causes
    /// (an entry unmasked while its pin is asserted) wait in
    /// [`Self::next_message`].
    pub fn mmio_write(&mut self, offset: u64, size: u8, value: u32) {
        match offset {
            IOREGSEL => self.select = value as u8,
            IOWIN if size == 4 => self.write_register(self.select, value),
            _ => {}
        }
    }

    fn read_register(&self, index: u8) -> u32 {
        match index {
            0x00 => self.id,
            0x01 => VERSION,
            // The arbitration ID follows the ID.
            0x02 => self.id,
            0x10..=0x3F => {
                let entry = self.redirection[usize::from(index - 0x10) / 2];
                if index.is_multiple_of(2) {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, index: u8, value: u32) {
        match index {
            0x00 => self.id = value & 0x0F00_0000,
            0x10..=0x3F => {
                let pin = usize::from(index - 0x10) / 2;
                let old = self.redirection[pin];
                let new = if index.is_multiple_of(2) {
                    (old & !0xFFFF_FFFF) | u64::from(value)
                } else {
                    (old & 0xFFFF_FFFF) | u64::from(value) << 32
                };
                let mut entry = (new & WRITABLE) | (old & REMOTE_IRR);
                if entry & LEVEL == 0 {
                    // Remote IRR means nothing for an edge-triggered pin.
                    entry &= !REMOTE_IRR;
                }
                self.redirection[pin] = entry;
            }
            _ => {}
        }
    }

    /// Drives pin `pin` to `level`. Pins past the last are ignored.
    pub fn set_pin(&mut self, pin: usize, level: bool) {
        if pin >= PINS {
            return;
        }
        let bit = 1 << pin;
        let rising = level && self.lines & bit == 0;
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        let entry = self.redirection[pin];
        if rising && entry & LEVEL == 0 && entry & MASKED == 0 {
            self.edges |= bit;
        }
    }

    /// The local APICs retired level-triggered `vector`: clear remote IRR
    /// of the level-triggered entries with that vector.
    pub fn eoi(&mut self, vector: u8) {
        for entry in &mut self.redirection {
            if *entry & LEVEL != 0 && *entry as u8 == vector {
                *entry &= !REMOTE_IRR;
            }
        }
    }

    /// The next message to send, if a pin wants to send one. Call until
    /// `None` after every change.
    pub fn next_message(&mut self) -> Option<IoApicMessage> {
        for pin in 0..PINS {
            let bit = 1u32 << pin;
            let entry = self.redirection[pin];
            let masked = entry & MASKED != 0;
            let level = entry & LEVEL != 0;
            let send = if level {
                !masked && self.lines & bit != 0 && entry & REMOTE_IRR == 0
            } else {
                let edge = self.edges & bit != 0;
                self.edges &= !bit;
                edge && !masked
            };
            if !send {
                continue;
            }
            if level {
                self.redirection[pin] |= REMOTE_IRR;
            }
            return Some(IoApicMessage {
                pin: pin as u8,
                vector: entry as u8,
                mode: DeliveryMode::from_bits(entry as u32),
                destination: Destination {
                    id: (entry >> 56) as u32,
                    logical: entry & (1 << 11) != 0,
                    x2apic: false,
                },
                level_triggered: level,
            });
        }
        None
    }

    /// Redirection entry `pin`, as the guest reads it.
    pub fn entry(&self, pin: usize) -> u64 {
        self.redirection[pin]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_reg(io: &mut IoApic, index: u8, value: u32) {
        io.mmio_write(IOREGSEL, 4, u32::from(index));
        io.mmio_write(IOWIN, 4, value);
    }

    fn read_reg(io: &mut IoApic, index: u8) -> u32 {
        io.mmio_write(IOREGSEL, 4, u32::from(index));
        io.mmio_read(IOWIN, 4)
    }

    fn set_redir(io: &mut IoApic, pin: u8, vector: u8, level: bool) {
        write_reg(
            io,
            0x10 + 2 * pin,
            u32::from(vector) | if level { 1 << 15 } else { 0 },
        );
        write_reg(io, 0x11 + 2 * pin, 0);
    }

    fn messages(io: &mut IoApic) -> Vec<u8> {
        core::iter::from_fn(|| io.next_message())
            .map(|m| m.vector)
            .collect()
    }

    #[test]
    fn registers_as_ioapic_c_checks_them() {
        let mut io = IoApic::new();
        let version = read_reg(&mut io, 1);
        write_reg(&mut io, 1, !version);
        assert_eq!(
            read_reg(&mut io, 1),
            version,
            "version register is read-only"
        );
        assert_eq!(version & 0xFF, 0x11);
        let id = read_reg(&mut io, 0);
        write_reg(&mut io, 0, !id);
        assert_eq!(
            read_reg(&mut io, 0) ^ id,
            0x0F00_0000,
            "only ID bits 27:24 are writable"
        );
        write_reg(&mut io, 0, 0x0F00_0000);
        assert_eq!(
            read_reg(&mut io, 2),
            0x0F00_0000,
            "arbitration ID set by ID"
        );
        write_reg(&mut io, 2, 0);
        assert_eq!(
            read_reg(&mut io, 2),
            0x0F00_0000,
            "arbitration register read-only"
        );
        assert_eq!(io.mmio_read(IOREGSEL, 4), 2);
    }

    #[test]
    fn edge_pins_send_once_per_rising_edge_and_not_when_masked() {
        let mut io = IoApic::new();
        set_redir(&mut io, 0x0E, 0x76, false);
        io.set_pin(0x0E, true);
        io.set_pin(0x0E, false);
        assert_eq!(messages(&mut io), [0x76]);
        io.set_pin(0x0E, true);
        io.set_pin(0x0E, true);
        assert_eq!(messages(&mut io), [0x76], "no edge while high");
        io.set_pin(0x0E, false);
        // Masked: the edge is lost, even once unmasked.
        write_reg(&mut io, 0x10 + 2 * 0x0E, 0x81 | 1 << 16);
        io.set_pin(0x0E, true);
        io.set_pin(0x0E, false);
        write_reg(&mut io, 0x10 + 2 * 0x0E, 0x81);
        assert_eq!(messages(&mut io), Vec::<u8>::new());
        io.set_pin(0x0E, true);
        assert_eq!(messages(&mut io), [0x81]);
    }

    #[test]
    fn level_pins_hold_remote_irr_until_eoi_and_resend_if_still_asserted() {
        let mut io = IoApic::new();
        set_redir(&mut io, 0x0E, 0x9A, true);
        io.set_pin(0x0E, true);
        assert_eq!(messages(&mut io), [0x9A]);
        assert_ne!(io.entry(0x0E) & REMOTE_IRR, 0);
        assert_eq!(messages(&mut io), Vec::<u8>::new(), "remote IRR holds it");
        // Coalesce: a toggle while remote IRR is set sends nothing more.
        io.set_pin(0x0E, false);
        io.set_pin(0x0E, true);
        assert_eq!(messages(&mut io), Vec::<u8>::new());
        // EOI with the line still high: sent again.
        io.eoi(0x9A);
        assert_eq!(messages(&mut io), [0x9A]);
        io.set_pin(0x0E, false);
        io.eoi(0x9A);
        assert_eq!(messages(&mut io), Vec::<u8>::new());
        assert_eq!(io.entry(0x0E) & REMOTE_IRR, 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_sends_and_remote_irr_survives_reconfiguration() {
        let mut io = IoApic::new();
        write_reg(&mut io, 0x10 + 2 * 0x0E, 0x82 | 1 << 15 | 1 << 16);
        io.set_pin(0x0E, true);
        assert_eq!(messages(&mut io), Vec::<u8>::new());
        write_reg(&mut io, 0x10 + 2 * 0x0E, 0x82 | 1 << 15);
        assert_eq!(messages(&mut io), [0x82]);
        // Rewriting the destination keeps remote IRR (the guest cannot
        // write it), as ioapic.c's "Reconfigure Remote IRR set" expects.
        write_reg(&mut io, 0x11 + 2 * 0x0E, 1 << 24);
        assert_ne!(io.entry(0x0E) & REMOTE_IRR, 0);
        assert_eq!(io.entry(0x0E) >> 56, 1);
        write_reg(&mut io, 0x10 + 2 * 0x0E, 0x82 | 1 << 15 | REMOTE_IRR as u32);
        assert_ne!(io.entry(0x0E) & REMOTE_IRR, 0);
        // Switching to edge clears it.
        write_reg(&mut io, 0x10 + 2 * 0x0E, 0x82);
        assert_eq!(io.entry(0x0E) & REMOTE_IRR, 0);
    }

    #[test]
    fn messages_carry_the_entry() {
        let mut io = IoApic::new();
        write_reg(&mut io, 0x10 + 2 * 3, 0x45 | 0x100 | 1 << 11);
        write_reg(&mut io, 0x11 + 2 * 3, 0x0D << 24);
        io.set_pin(3, true);
        assert_eq!(
            io.next_message(),
            Some(IoApicMessage {
                pin: 3,
                vector: 0x45,
                mode: DeliveryMode::LowestPriority,
                destination: Destination {
                    id: 0x0D,
                    logical: true,
                    x2apic: false
                },
                level_triggered: false,
            })
        );
        io.set_pin(99, true);
        assert_eq!(io.next_message(), None);
    }
}
