//! The 8254 PIT (ports 0x40-0x43) and port 0x61 (channel 2's gate, its
//! output, the refresh toggle).
//!
//! Counting follows the datasheet's modes 0-5 at 1.193182 MHz, reading the
//! host TSC when asked rather than ticking. Channel 0's output raises
//! ISA IRQ 0 at terminal count (mode 0, 4) or once per period (modes 2, 3);
//! [`Pit::irq0_deadline`] says when, [`Pit::advance`] reports it. Channel 2
//! with its gate and output on port 0x61 is what calibration loops use
//! (Linux' `pit_calibrate_tsc`). Channel 1 counts but drives nothing.

use crate::time::{scale, scale_up};

/// Channel 0's data port (channels 1 and 2 follow).
pub const CHANNEL0_PORT: u16 = 0x40;
/// The mode/command port.
pub const COMMAND_PORT: u16 = 0x43;
/// System control port B.
pub const PORT_B: u16 = 0x61;
/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// DRAM refresh period that toggles port 0x61 bit 4, in ns.
const REFRESH_NS: u64 = 15_085;

/// Which byte(s) of the count a data-port access moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Low,
    High,
    /// Low byte next, then high.
    Word0,
    /// High byte next.
    Word1,
}

#[derive(Debug, Clone)]
struct Channel {
    /// Reload value, 1..=0x10000.
    count: u32,
    mode: u8,
    bcd: bool,
    /// Access mode as programmed (1, 2, 3).
    access: u8,
    read: Access,
    write: Access,
    write_low: u8,
    latched_count: Option<(u16, Access)>,
    latched_status: Option<u8>,
    gate: bool,
    /// Host TSC when the count was loaded (or the gate restarted it).
    start: Option<u64>,
    /// Terminal-count interrupts (modes 0, 1, 4, 5) happen once.
    fired: bool,
    /// Periods already signalled (modes 2, 3).
    periods_signalled: u64,
}

impl Channel {
    const fn new(gate: bool) -> Self {
        Self {
            count: 0x10000,
            mode: 0,
            bcd: false,
            access: 3,
            read: Access::Word0,
            write: Access::Word0,
            write_low: 0,
            latched_count: None,
            latched_status: None,
            gate,
            start: None,
            fired: false,
            periods_signalled: 0,
        }
    }

    fn elapsed(&self, now: u64, tsc_hz: u64) -> Option<u64> {
        self.start
            .map(|start| scale(now.saturating_sub(start), tsc_hz, PIT_HZ))
    }

    fn current_count(&self, now: u64, tsc_hz: u64) -> u16 {
        let Some(d) = self.elapsed(now, tsc_hz) else {
            return self.count as u16;
        };
        let count = u64::from(self.count);
        let value = match self.mode {
            2 => count - d % count,
            3 => count - (2 * d) % count,
            _ => count.wrapping_sub(d),
        };
        value as u16
    }

    fn output(&self, now: u64, tsc_hz: u64) -> bool {
        let Some(d) = self.elapsed(now, tsc_hz) else {
            // Before a count is loaded: low in mode 0, high otherwise.
            return self.mode != 0;
        };
        let count = u64::from(self.count);
        match self.mode {
            0 => d >= count,
            1 => d >= count,
            2 => d % count != count - 1,
            3 => d % count < count.div_ceil(2),
            _ => d != count,
        }
    }

    fn status(&self, now: u64, tsc_hz: u64) -> u8 {
        u8::from(self.output(now, tsc_hz)) << 7
            | u8::from(self.start.is_none()) << 6
            | self.access << 4
            | self.mode << 1
            | u8::from(self.bcd)
    }

    fn load(&mut self, value: u16, now: u64) {
        self.count = if value == 0 {
            0x10000
        } else {
            u32::from(value)
        };
        self.fired = false;
        self.periods_signalled = 0;
        // Mode 1 and 5 wait for a gate edge; the others start now (with
        // the gate high, which channels 0 and 1 always have).
        self.start = match self.mode {
            1 | 5 => None,
            _ => Some(now),
        };
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate && !self.gate && matches!(self.mode, 1 | 2 | 3 | 5) {
            self.start = Some(now);
            self.fired = false;
            self.periods_signalled = 0;
        }
        self.gate = gate;
    }

    /// Host TSC of the next output event that raises IRQ 0.
    fn next_event(&self, tsc_hz: u64) -> Option<u64> {
        let start = self.start?;
        let count = u64::from(self.count);
        let ticks = match self.mode {
            0 | 4 if !self.fired => count,
            2 | 3 => count.saturating_mul(self.periods_signalled + 1),
            _ => return None,
        };
        Some(start.saturating_add(scale_up(ticks, PIT_HZ, tsc_hz)))
    }

    /// Whether an IRQ 0 event happened by `now` (missed periods coalesce).
    fn advance(&mut self, now: u64, tsc_hz: u64) -> bool {
        let Some(due) = self.next_event(tsc_hz) else {
            return false;
        };
        if now < due {
            return false;
        }
        match self.mode {
            2 | 3 => {
                let d = self.elapsed(now, tsc_hz).unwrap_or(0);
                self.periods_signalled = d / u64::from(self.count);
            }
            _ => self.fired = true,
        }
        true
    }
}

/// The three channels and port 0x61.
#[derive(Debug, Clone)]
pub struct Pit {
    channels: [Channel; 3],
    speaker_data: bool,
    tsc_hz: u64,
}

impl Pit {
    /// An unprogrammed PIT (no interrupts until channel 0 is loaded) on a
    /// host whose TSC runs at `tsc_hz`.
    pub const fn new(tsc_hz: u64) -> Self {
        Self {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            speaker_data: false,
            tsc_hz,
        }
    }

    /// A read of `port` (0x40-0x43, 0x61) at host TSC `now`.
    pub fn read(&mut self, port: u16, now: u64) -> u8 {
        let tsc_hz = self.tsc_hz;
        match port {
            PORT_B => {
                let refresh = (scale(now, tsc_hz, 1_000_000_000) / REFRESH_NS) & 1 == 1;
                let out2 = self.channels[2].output(now, tsc_hz);
                u8::from(self.channels[2].gate)
                    | u8::from(self.speaker_data) << 1
                    | u8::from(refresh) << 4
                    | u8::from(out2) << 5
            }
            0x40..=0x42 => {
                let channel = &mut self.channels[usize::from(port - CHANNEL0_PORT)];
                if let Some(status) = channel.latched_status.take() {
                    return status;
                }
                if let Some((value, state)) = channel.latched_count {
                    let (byte, next) = match state {
                        Access::Low => (value as u8, None),
                        Access::High => ((value >> 8) as u8, None),
                        Access::Word0 => (value as u8, Some((value, Access::Word1))),
                        Access::Word1 => ((value >> 8) as u8, None),
                    };
                    channel.latched_count = next;
                    return byte;
                }
                let value = channel.current_count(now, tsc_hz);
                match channel.read {
                    Access::Low => value as u8,
                    Access::High => (value >> 8) as u8,
                    Access::Word0 => {
                        channel.read = Access::Word1;
                        value as u8
                    }
                    Access::Word1 => {
                        channel.read = Access::Word0;
                        (value >> 8) as u8
                    }
                }
            }
            // The command port is write-only.
            _ => 0xFF,
        }
    }

    /// A write of `value` to `port` at host TSC `now`.
    pub fn write(&mut self, port: u16, value: u8, now: u64) {
        match port {
            PORT_B => {
                self.channels[2].set_gate(value & 1 != 0, now);
                self.speaker_data = value & 2 != 0;
            }
            COMMAND_PORT => self.command(value, now),
            0x40..=0x42 => {
                let channel = &mut self.channels[usize::from(port - CHANNEL0_PORT)];
                match channel.write {
                    Access::Low => channel.load(u16::from(value), now),
                    Access::High => channel.load(u16::from(value) << 8, now),
                    Access::Word0 => {
                        channel.write_low = value;
                        channel.write = Access::Word1;
                    }
                    Access::Word1 => {
                        channel.load(u16::from(channel.write_low) | u16::from(value) << 8, now);
                        channel.write = Access::Word0;
                    }
                }
            }
            _ => {}
        }
    }

    fn command(&mut self, value: u8, now: u64) {
        let tsc_hz = self.tsc_hz;
        let select = value >> 6;
        if select == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear statuses.
            for (i, channel) in self.channels.iter_mut().enumerate() {
                if value & (2 << i) == 0 {
                    continue;
                }
                if value & 0x20 == 0 && channel.latched_count.is_none() {
                    channel.latched_count = Some((
                        channel.current_count(now, tsc_hz),
                        latch_state(channel.access),
                    ));
                }
                if value & 0x10 == 0 && channel.latched_status.is_none() {
                    channel.latched_status = Some(channel.status(now, tsc_hz));
                }
            }
            return;
        }
        let channel = &mut self.channels[usize::from(select)];
        let access = (value >> 4) & 3;
        if access == 0 {
            // Counter latch command.
            if channel.latched_count.is_none() {
                channel.latched_count = Some((
                    channel.current_count(now, tsc_hz),
                    latch_state(channel.access),
                ));
            }
            return;
        }
        let mode = (value >> 1) & 7;
        channel.mode = if mode >= 6 { mode - 4 } else { mode };
        channel.bcd = value & 1 != 0;
        channel.access = access;
        let state = latch_state(access);
        channel.read = state;
        channel.write = state;
        channel.start = None;
        channel.fired = false;
        channel.periods_signalled = 0;
    }

    /// Host TSC when channel 0 next raises IRQ 0, if it will.
    pub fn irq0_deadline(&self) -> Option<u64> {
        self.channels[0].next_event(self.tsc_hz)
    }

    /// Brings channel 0 up to `now`: true when IRQ 0 should pulse (the
    /// platform raises and lowers ISA IRQ 0 / GSI 2).
    pub fn advance(&mut self, now: u64) -> bool {
        let tsc_hz = self.tsc_hz;
        self.channels[0].advance(now, tsc_hz)
    }
}

fn latch_state(access: u8) -> Access {
    match access {
        1 => Access::Low,
        2 => Access::High,
        _ => Access::Word0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TSC_HZ: u64 = PIT_HZ * 100;

    fn ticks(pit_ticks: u64) -> u64 {
        pit_ticks * 100
    }

    #[test]
    fn channel_2_calibration_as_linux_does_it() {
        let mut pit = Pit::new(TSC_HZ);
        // Gate high, speaker off; mode 0, lobyte/hibyte; count 0x2E9B.
        let b = pit.read(PORT_B, 0);
        pit.write(PORT_B, (b & !0x02) | 0x01, 0);
        pit.write(COMMAND_PORT, 0xB0, 0);
        pit.write(0x42, 0x9B, 0);
        pit.write(0x42, 0x2E, 0);
        assert_eq!(
            pit.read(PORT_B, ticks(0x2E9B) - 1) & 0x20,
            0,
            "OUT low while counting"
        );
        assert_ne!(
            pit.read(PORT_B, ticks(0x2E9B)) & 0x20,
            0,
            "OUT high at terminal count"
        );
        // Reading the count: low then high byte.
        let now = ticks(0x100);
        let low = pit.read(0x42, now);
        let high = pit.read(0x42, now);
        assert_eq!(u16::from(low) | u16::from(high) << 8, 0x2E9B - 0x100);
    }

    #[test]
    fn latch_and_read_back_freeze_the_count() {
        let mut pit = Pit::new(TSC_HZ);
        pit.write(COMMAND_PORT, 0x34, 0); // channel 0, mode 2, lo/hi
        pit.write(0x40, 0x00, 0);
        pit.write(0x40, 0x10, 0); // 0x1000
        pit.write(COMMAND_PORT, 0x00, ticks(0x10)); // latch channel 0
        let later = ticks(0x800);
        assert_eq!(pit.read(0x40, later), 0xF0);
        assert_eq!(
            pit.read(0x40, later),
            0x0F,
            "the latched 0x0FF0, not the live count"
        );
        // Read-back of status and count of channel 0.
        pit.write(COMMAND_PORT, 0xC2, later);
        let status = pit.read(0x40, later);
        assert_eq!(status & 0x3F, 0x34, "access mode 3, mode 2, binary");
        assert_eq!(status & 0x80, 0x80, "mode 2 output is high mid-period");
        let low = pit.read(0x40, later);
        let high = pit.read(0x40, later);
        assert_eq!(u16::from(low) | u16::from(high) << 8, 0x1000 - 0x800);
    }

    #[test]
    fn channel_0_rate_generator_raises_irq0_every_period() {
        let mut pit = Pit::new(TSC_HZ);
        assert_eq!(pit.irq0_deadline(), None, "unprogrammed: silent");
        pit.write(COMMAND_PORT, 0x34, 1000);
        pit.write(0x40, 0x9C, 1000);
        pit.write(0x40, 0x2E, 1000); // 11932: 100 Hz
        assert_eq!(pit.irq0_deadline(), Some(1000 + ticks(11932)));
        assert!(!pit.advance(1000 + ticks(11932) - 1));
        assert!(pit.advance(1000 + ticks(11932)));
        assert_eq!(pit.irq0_deadline(), Some(1000 + ticks(2 * 11932)));
        assert!(pit.advance(1000 + ticks(5 * 11932 + 7)), "late: one pulse");
        assert_eq!(pit.irq0_deadline(), Some(1000 + ticks(6 * 11932)));
    }

    #[test]
    fn channel_0_one_shot_fires_once() {
        let mut pit = Pit::new(TSC_HZ);
        pit.write(COMMAND_PORT, 0x30, 0); // mode 0
        pit.write(0x40, 100, 0);
        pit.write(0x40, 0, 0);
        assert!(pit.advance(ticks(100)));
        assert_eq!(pit.irq0_deadline(), None);
        assert!(!pit.advance(ticks(1_000_000)));
        // Reloading re-arms it.
        pit.write(0x40, 50, ticks(2_000_000));
        pit.write(0x40, 0, ticks(2_000_000));
        assert_eq!(pit.irq0_deadline(), Some(ticks(2_000_050)));
    }

    #[test]
    fn gate_restarts_mode_1_and_the_refresh_bit_toggles() {
        let mut pit = Pit::new(TSC_HZ);
        pit.write(COMMAND_PORT, 0x92, 0); // channel 2, mode 1, low byte only
        pit.write(0x42, 10, 0);
        assert_ne!(
            pit.read(PORT_B, ticks(100)) & 0x20,
            0,
            "mode 1 waits for the gate"
        );
        pit.write(PORT_B, 1, ticks(100));
        assert_eq!(
            pit.read(PORT_B, ticks(105)) & 0x20,
            0,
            "one-shot pulse low after the trigger"
        );
        assert_ne!(pit.read(PORT_B, ticks(110)) & 0x20, 0);
        let mut at = |ns: u64| pit.read(PORT_B, scale(ns, 1_000_000_000, TSC_HZ)) & 0x10;
        assert_ne!(at(REFRESH_NS / 2), at(REFRESH_NS + REFRESH_NS / 2));
    }
}
