//! The legacy 8259A pair (master at 0x20/0x21, slave at 0xA0/0xA1 on the
//! master's IRQ 2) with the ELCR edge/level registers at 0x4D0/0x4D1.
//!
//! Initialization (ICW1-ICW4), the interrupt mask (OCW1), EOIs and priority
//! rotation (OCW2), IRR/ISR reads and poll mode (OCW3), auto-EOI, special
//! mask mode; edge triggering latches a rising edge in IRR, level
//! triggering follows the line. The platform hands the pair's output to the
//! boot vCPU's LINT0 and takes the vector with [`DualPic::acknowledge`].
//!
//! hv runs no BIOS: the pair starts as SeaBIOS leaves it (vectors 0x08 and
//! 0x70) but with every line unmasked, so a real-mode guest that raises an
//! IRQ and installs a handler gets it (kvm-unit-tests' `realmode` does, for
//! IRQ 11). Nothing drives a line the guest did not set up: no PIT ticks
//! until the guest programs channel 0.

/// Master command port.
pub const MASTER_COMMAND: u16 = 0x20;
/// Master data port.
pub const MASTER_DATA: u16 = 0x21;
/// Slave command port.
pub const SLAVE_COMMAND: u16 = 0xA0;
/// Slave data port.
pub const SLAVE_DATA: u16 = 0xA1;
/// ELCR for IRQs 0-7.
pub const ELCR_MASTER: u16 = 0x4D0;
/// ELCR for IRQs 8-15.
pub const ELCR_SLAVE: u16 = 0x4D1;

const CASCADE_IRQ: u8 = 2;

/// One 8259A.
#[derive(Debug, Clone)]
struct Pic {
    irr: u8,
    imr: u8,
    isr: u8,
    /// Line levels, for edge detection.
    lines: u8,
    elcr: u8,
    elcr_mask: u8,
    base: u8,
    /// Lowest-priority rotation: IRQ `priority_add` has the highest priority.
    priority_add: u8,
    init_step: u8,
    init4: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_mask: bool,
    special_fully_nested: bool,
    read_isr: bool,
    poll: bool,
}

impl Pic {
    const fn new(base: u8, elcr_mask: u8) -> Self {
        Self {
            irr: 0,
            imr: 0,
            isr: 0,
            lines: 0,
            elcr: 0,
            elcr_mask,
            base,
            priority_add: 0,
            init_step: 0,
            init4: true,
            single: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_mask: false,
            special_fully_nested: false,
            read_isr: false,
            poll: false,
        }
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        let bit = 1 << irq;
        if self.elcr & bit != 0 {
            // Level-triggered: IRR follows the line.
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// Priority (0 highest) of the highest-priority bit of `mask`, with the
    /// current rotation.
    fn priority(&self, mask: u8) -> Option<u8> {
        (0..8).find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
    }

    /// The IRQ this PIC asks the CPU (or the master) for, given the
    /// requests in `irr` (the master sees the slave's output on IRQ 2).
    fn output(&self, irr: u8) -> Option<u8> {
        let requested = self.priority(irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.elcr_mask == 0xF8 {
            // A master in special fully nested mode lets the slave
            // interrupt its own in-service cascade.
            in_service &= !(1 << CASCADE_IRQ);
        }
        let current = self.priority(in_service).unwrap_or(8);
        (requested < current).then_some((requested + self.priority_add) & 7)
    }

    fn acknowledge(&mut self, irq: u8) {
        let bit = 1 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1: a fresh initialization.
            let elcr = self.elcr;
            let (base, mask, lines) = (self.base, self.elcr_mask, self.lines);
            *self = Self::new(base, mask);
            self.elcr = elcr;
            self.lines = lines;
            self.irr &= elcr;
            self.init4 = value & 1 != 0;
            self.single = value & 2 != 0;
            self.init_step = 1;
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            // OCW2.
            let irq = value & 7;
            match value >> 5 {
                0 | 4 => self.rotate_on_auto_eoi = value >> 7 != 0,
                1 | 5 => {
                    if let Some(p) = self.priority(self.isr) {
                        let irq = (p + self.priority_add) & 7;
                        self.isr &= !(1 << irq);
                        if value >> 5 == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << irq),
                6 => self.priority_add = (irq + 1) & 7,
                7 => {
                    self.isr &= !(1 << irq);
                    self.priority_add = (irq + 1) & 7;
                }
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_step {
            1 => {
                self.base = value & 0xF8;
                self.init_step = if self.single {
                    if self.init4 { 3 } else { 0 }
                } else {
                    2
                };
            }
            2 => self.init_step = if self.init4 { 3 } else { 0 },
            3 => {
                self.special_fully_nested = value & 0x10 != 0;
                self.auto_eoi = value & 0x02 != 0;
                self.init_step = 0;
            }
            _ => self.imr = value,
        }
    }
}

/// The master/slave pair and its ELCR.
#[derive(Debug, Clone)]
pub struct DualPic {
    master: Pic,
    slave: Pic,
}

impl Default for DualPic {
    fn default() -> Self {
        Self::new()
    }
}

impl DualPic {
    /// The pair as hv hands it to a guest (see the module's comment).
    pub const fn new() -> Self {
        Self {
            master: Pic::new(0x08, 0xF8),
            slave: Pic::new(0x70, 0xDE),
        }
    }

    fn slave_output(&self) -> bool {
        self.slave.output(self.slave.irr).is_some()
    }

    fn master_requests(&self) -> u8 {
        let cascade = if self.slave_output() {
            1 << CASCADE_IRQ
        } else {
            0
        };
        (self.master.irr & !(1 << CASCADE_IRQ)) | cascade
    }

    /// Drives ISA IRQ `irq` (0-15) to `level`.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 if irq != CASCADE_IRQ => self.master.set_irq(irq, level),
            8..=15 => self.slave.set_irq(irq - 8, level),
            _ => {}
        }
    }

    /// Whether the pair's INTR output is asserted.
    pub fn interrupt_pending(&self) -> bool {
        self.master.output(self.master_requests()).is_some()
    }

    /// INTA: the vector of the highest-priority request, its ISR bits set
    /// (a spurious IRQ 7 / 15 if the request went away).
    pub fn acknowledge(&mut self) -> u8 {
        let Some(irq) = self.master.output(self.master_requests()) else {
            return self.master.base | 7;
        };
        self.master.acknowledge(irq);
        if irq != CASCADE_IRQ {
            return self.master.base | irq;
        }
        match self.slave.output(self.slave.irr) {
            Some(slave_irq) => {
                self.slave.acknowledge(slave_irq);
                self.slave.base | slave_irq
            }
            None => self.slave.base | 7,
        }
    }

    /// A read of `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            MASTER_COMMAND | SLAVE_COMMAND => {
                let slave = port == SLAVE_COMMAND;
                let poll = if slave {
                    self.slave.poll
                } else {
                    self.master.poll
                };
                if poll {
                    return self.poll(slave);
                }
                let pic = if slave { &self.slave } else { &self.master };
                if pic.read_isr { pic.isr } else { pic.irr }
            }
            MASTER_DATA => self.master.imr,
            SLAVE_DATA => self.slave.imr,
            ELCR_MASTER => self.master.elcr,
            ELCR_SLAVE => self.slave.elcr,
            _ => 0xFF,
        }
    }

    /// Poll mode: the highest request (bit 7 set if any), acknowledged.
    fn poll(&mut self, slave: bool) -> u8 {
        let (pic, irr) = if slave {
            let irr = self.slave.irr;
            (&mut self.slave, irr)
        } else {
            let irr = self.master_requests();
            (&mut self.master, irr)
        };
        pic.poll = false;
        match pic.output(irr) {
            Some(irq) => {
                pic.acknowledge(irq);
                0x80 | irq
            }
            None => 0,
        }
    }

    /// A write of `value` to `port`.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            MASTER_COMMAND => self.master.write_command(value),
            SLAVE_COMMAND => self.slave.write_command(value),
            MASTER_DATA => self.master.write_data(value),
            SLAVE_DATA => self.slave.write_data(value),
            ELCR_MASTER => self.master.elcr = value & self.master.elcr_mask,
            ELCR_SLAVE => self.slave.elcr = value & self.slave.elcr_mask,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's / SeaBIOS's init sequence with the given bases.
    fn init(pic: &mut DualPic, master_base: u8, slave_base: u8) {
        pic.write(MASTER_COMMAND, 0x11);
        pic.write(SLAVE_COMMAND, 0x11);
        pic.write(MASTER_DATA, master_base);
        pic.write(SLAVE_DATA, slave_base);
        pic.write(MASTER_DATA, 4);
        pic.write(SLAVE_DATA, 2);
        pic.write(MASTER_DATA, 1);
        pic.write(SLAVE_DATA, 1);
    }

    #[test]
    fn realmode_s_irq_11_arrives_at_vector_0x73() {
        let mut pic = DualPic::new();
        // outl 1 then 0 to pc-testdev's IRQ 11 port: an edge.
        pic.set_irq(11, true);
        pic.set_irq(11, false);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), 0x73);
        assert!(!pic.interrupt_pending(), "in service, no new edge");
        assert_eq!(pic.read(SLAVE_COMMAND), 0, "IRR reads by default");
        pic.write(SLAVE_COMMAND, 0x0B);
        assert_eq!(pic.read(SLAVE_COMMAND), 1 << 3, "ISR after OCW3 read-ISR");
    }

    #[test]
    fn masking_priorities_and_eoi() {
        let mut pic = DualPic::new();
        init(&mut pic, 0x20, 0x28);
        pic.write(MASTER_DATA, 0xFF);
        pic.write(SLAVE_DATA, 0xFF);
        // mask_pic_interrupts(): nothing gets through.
        pic.set_irq(1, true);
        pic.set_irq(9, true);
        assert!(!pic.interrupt_pending());
        assert_eq!(pic.read(MASTER_DATA), 0xFF);
        pic.write(MASTER_DATA, !(1 << 1 | 1 << 2));
        pic.write(SLAVE_DATA, !(1 << 1));
        // IRQ 1 before IRQ 9 (which is behind IRQ 2, lower priority).
        assert_eq!(pic.acknowledge(), 0x21);
        assert!(
            !pic.interrupt_pending(),
            "IRQ 9 has lower priority than the one in service"
        );
        pic.write(MASTER_COMMAND, 0x20); // non-specific EOI
        assert_eq!(pic.acknowledge(), 0x29);
        pic.write(SLAVE_COMMAND, 0x20);
        pic.write(MASTER_COMMAND, 0x62); // specific EOI, IRQ 2
        assert!(!pic.interrupt_pending());
        // A higher-priority IRQ preempts one in service.
        pic.set_irq(1, false);
        pic.write(MASTER_DATA, 0);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), 0x24);
        pic.set_irq(1, true);
        assert_eq!(pic.acknowledge(), 0x21);
    }

    #[test]
    fn level_triggered_lines_follow_the_line() {
        let mut pic = DualPic::new();
        pic.write(ELCR_SLAVE, 1 << 3);
        assert_eq!(pic.read(ELCR_SLAVE), 1 << 3);
        pic.write(ELCR_MASTER, 0xFF);
        assert_eq!(pic.read(ELCR_MASTER), 0xF8, "IRQs 0-2 are always edge");
        pic.set_irq(11, true);
        pic.set_irq(11, false);
        assert!(
            !pic.interrupt_pending(),
            "level: the request went away with the line"
        );
        pic.set_irq(11, true);
        assert_eq!(pic.acknowledge(), 0x73);
        pic.write(SLAVE_COMMAND, 0x20);
        pic.write(MASTER_COMMAND, 0x20);
        assert!(
            pic.interrupt_pending(),
            "still asserted after EOI: requested again"
        );
    }

    #[test]
    fn auto_eoi_poll_and_spurious() {
        let mut pic = DualPic::new();
        pic.write(MASTER_COMMAND, 0x11);
        pic.write(MASTER_DATA, 0x40);
        pic.write(MASTER_DATA, 4);
        pic.write(MASTER_DATA, 0x03); // 8086 mode, auto-EOI
        pic.set_irq(5, true);
        assert_eq!(pic.acknowledge(), 0x45);
        pic.write(MASTER_COMMAND, 0x0B);
        assert_eq!(
            pic.read(MASTER_COMMAND),
            0,
            "auto-EOI leaves nothing in service"
        );
        // Nothing pending: spurious IRQ 7.
        assert_eq!(pic.acknowledge(), 0x47);
        // Poll.
        pic.set_irq(5, false);
        pic.set_irq(5, true);
        pic.write(MASTER_COMMAND, 0x0C);
        assert_eq!(pic.read(MASTER_COMMAND), 0x85);
        assert!(!pic.interrupt_pending());
    }

    #[test]
    fn rotation_gives_the_last_served_irq_the_lowest_priority() {
        let mut pic = DualPic::new();
        pic.set_irq(0, true);
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), 0x08);
        pic.write(MASTER_COMMAND, 0xA0); // rotate on non-specific EOI
        pic.set_irq(0, false);
        pic.set_irq(0, true);
        // IRQ 0 now has the lowest priority: IRQ 3 first.
        assert_eq!(pic.acknowledge(), 0x0B);
    }
}
