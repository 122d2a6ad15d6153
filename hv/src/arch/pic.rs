//! The legacy 8259 PICs: remapped away from the exception vectors and
//! masked. The BIOS leaves them delivering IRQ 0 on vector 8, which would
//! look like a double fault the moment interrupts are enabled.

use super::port::outb;

const PRIMARY_COMMAND: u16 = 0x20;
const PRIMARY_DATA: u16 = 0x21;
const SECONDARY_COMMAND: u16 = 0xA0;
const SECONDARY_DATA: u16 = 0xA1;

/// First vector of the remapped PICs (spurious IRQ 7/15 land at +7/+15).
pub const PIC_VECTOR_BASE: u8 = 0x20;

/// Remaps both PICs to vectors 0x20..0x30 and masks every line.
pub fn remap_and_mask() {
    outb(PRIMARY_COMMAND, 0x11); // ICW1: init, ICW4 follows
    outb(SECONDARY_COMMAND, 0x11);
    outb(PRIMARY_DATA, PIC_VECTOR_BASE); // ICW2: vector base
    outb(SECONDARY_DATA, PIC_VECTOR_BASE + 8);
    outb(PRIMARY_DATA, 4); // ICW3: secondary on IRQ 2
    outb(SECONDARY_DATA, 2);
    outb(PRIMARY_DATA, 1); // ICW4: 8086 mode
    outb(SECONDARY_DATA, 1);
    outb(PRIMARY_DATA, 0xFF);
    outb(SECONDARY_DATA, 0xFF);
}
