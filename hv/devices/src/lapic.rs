//! A virtual local APIC (SDM Vol. 3, chapter 11 "Advanced Programmable
//! Interrupt Controller"): xAPIC registers through MMIO, x2APIC registers
//! through MSRs 0x800-0x8FF, the IA32_APIC_BASE MSR and its mode switches,
//! interrupt acceptance (IRR, TMR), priorities (TPR, PPR), acknowledge
//! (IRR to ISR), EOI, the ICR, the LVTs and the timer in its one-shot,
//! periodic and TSC-deadline modes.
//!
//! One [`LocalApic`] per vCPU. Sending an IPI is the platform's business:
//! a write to the ICR returns an [`ApicEffect::SendIpi`] and
//! [`crate::platform`] routes it with [`LocalApic::matches`].
//!
//! Time is host TSC ticks (see [`crate::time`]); the timer counts at
//! [`ApicTiming::bus_hz`]. A guest's TSC is the host's plus a per-vCPU
//! offset, which the TSC-deadline timer needs to compare against.

use crate::time::{scale, scale_up};

/// Default physical base of the xAPIC page.
pub const DEFAULT_BASE: u64 = 0xFEE0_0000;
/// IA32_APIC_BASE.BSP.
pub const BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE.EXTD: x2APIC mode.
pub const BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE.EN: the APIC is enabled.
pub const BASE_ENABLE: u64 = 1 << 11;
/// The version register: version 0x14, 6 LVT entries (max LVT 5).
pub const VERSION: u32 = 0x0005_0014;
/// First x2APIC MSR.
pub const X2APIC_MSR_BASE: u32 = 0x800;
/// Last x2APIC MSR.
pub const X2APIC_MSR_LAST: u32 = 0x8FF;

/// Register offsets in the xAPIC page (the x2APIC MSR is
/// `0x800 + offset / 16`).
pub mod reg {
    /// Local APIC ID.
    pub const ID: u32 = 0x20;
    /// Version.
    pub const VERSION: u32 = 0x30;
    /// Task priority.
    pub const TPR: u32 = 0x80;
    /// Arbitration priority (xAPIC only).
    pub const APR: u32 = 0x90;
    /// Processor priority.
    pub const PPR: u32 = 0xA0;
    /// End of interrupt.
    pub const EOI: u32 = 0xB0;
    /// Remote read (xAPIC only).
    pub const RRD: u32 = 0xC0;
    /// Logical destination.
    pub const LDR: u32 = 0xD0;
    /// Destination format (xAPIC only).
    pub const DFR: u32 = 0xE0;
    /// Spurious interrupt vector.
    pub const SVR: u32 = 0xF0;
    /// In-service register, 8 x 32 bits.
    pub const ISR: u32 = 0x100;
    /// Trigger mode register, 8 x 32 bits.
    pub const TMR: u32 = 0x180;
    /// Interrupt request register, 8 x 32 bits.
    pub const IRR: u32 = 0x200;
    /// Error status.
    pub const ESR: u32 = 0x280;
    /// Interrupt command, low half (x2APIC: all 64 bits).
    pub const ICR: u32 = 0x300;
    /// Interrupt command, high half (xAPIC only).
    pub const ICR2: u32 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u32 = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: u32 = 0x330;
    /// LVT performance counters.
    pub const LVT_PERF: u32 = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: u32 = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: u32 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u32 = 0x370;
    /// Timer initial count.
    pub const TMICT: u32 = 0x380;
    /// Timer current count.
    pub const TMCCT: u32 = 0x390;
    /// Timer divide configuration.
    pub const TDCR: u32 = 0x3E0;
    /// Self IPI (x2APIC only).
    pub const SELF_IPI: u32 = 0x3F0;
}

const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_MODE_SHIFT: u32 = 17;
const SVR_ENABLE: u32 = 1 << 8;
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const LVT_COUNT: usize = 6;

/// The APIC's operating mode, from IA32_APIC_BASE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicMode {
    /// EN clear: no interrupts, the MMIO page reads as nothing.
    Disabled,
    /// xAPIC: MMIO registers.
    XApic,
    /// x2APIC: MSRs 0x800-0x8FF.
    X2Apic,
}

/// The timer's mode (LVT timer bits 18:17).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerMode {
    /// Counts TMICT down once.
    OneShot,
    /// Counts TMICT down and reloads.
    Periodic,
    /// Fires when the TSC reaches IA32_TSC_DEADLINE.
    TscDeadline,
}

/// An interrupt's delivery mode (ICR, LVT and I/O APIC bits 10:8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// To the vector.
    Fixed,
    /// To the lowest-priority processor among the destinations.
    LowestPriority,
    /// System management interrupt (not supported: dropped).
    Smi,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT.
    Init,
    /// Start-up IPI.
    StartUp,
    /// External interrupt: the vector comes from the 8259.
    ExtInt,
    /// Reserved encoding (3): dropped.
    Reserved,
}

impl DeliveryMode {
    /// Decodes bits 10:8 of an ICR, LVT or redirection entry.
    pub fn from_bits(value: u32) -> Self {
        match (value >> 8) & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::StartUp,
            7 => Self::ExtInt,
            _ => Self::Reserved,
        }
    }
}

/// The ICR's destination shorthand (bits 19:18).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shorthand {
    /// The destination field decides.
    None,
    /// The sender.
    SelfOnly,
    /// Everyone, the sender included.
    AllIncludingSelf,
    /// Everyone but the sender.
    AllExcludingSelf,
}

/// Who an interrupt message is for, as the destination field says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    /// The field: an 8-bit xAPIC ID or logical mask, or a 32-bit x2APIC one.
    pub id: u32,
    /// Logical (true) or physical.
    pub logical: bool,
    /// The field is in x2APIC format (32 bits; broadcast 0xFFFF_FFFF).
    pub x2apic: bool,
}

impl Destination {
    /// Whether this is the broadcast destination of its format.
    pub fn is_broadcast(&self) -> bool {
        if self.x2apic {
            self.id == u32::MAX
        } else {
            self.id & 0xFF == 0xFF
        }
    }
}

/// An interprocessor interrupt, decoded from the ICR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    /// Vector (start-up page for SIPI).
    pub vector: u8,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Destination field and mode.
    pub destination: Destination,
    /// Shorthand.
    pub shorthand: Shorthand,
    /// Level (bit 14): assert (true) or de-assert.
    pub assert: bool,
    /// Trigger mode (bit 15): level (true) or edge.
    pub level_triggered: bool,
}

impl Ipi {
    /// Decodes an ICR; `x2apic` picks the destination field's format.
    pub fn from_icr(icr: u64, x2apic: bool) -> Self {
        let low = icr as u32;
        let high = (icr >> 32) as u32;
        Self {
            vector: low as u8,
            mode: DeliveryMode::from_bits(low),
            destination: Destination {
                id: if x2apic { high } else { high >> 24 },
                logical: low & (1 << 11) != 0,
                x2apic,
            },
            shorthand: match (low >> 18) & 3 {
                0 => Shorthand::None,
                1 => Shorthand::SelfOnly,
                2 => Shorthand::AllIncludingSelf,
                _ => Shorthand::AllExcludingSelf,
            },
            assert: low & (1 << 14) != 0,
            level_triggered: low & (1 << 15) != 0,
        }
    }
}

/// Why a register access faults (#GP in x2APIC mode; a disabled or
/// misdirected access).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicFault {
    /// The access raises #GP(0).
    GeneralProtection,
}

/// What the platform must do after a register write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicEffect {
    /// Nothing beyond the register change.
    None,
    /// Route this IPI (the write was to the ICR or SELF IPI).
    SendIpi(Ipi),
    /// An EOI retired a level-triggered vector: tell the I/O APIC.
    LevelEoi(u8),
    /// IA32_APIC_BASE moved the xAPIC page or changed mode: the kernel
    /// remaps the MMIO page it traps ([`LocalApic::mmio_base`]).
    BaseChanged,
}

/// Clock rates the timer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicTiming {
    /// Host TSC rate.
    pub tsc_hz: u64,
    /// The timer's input clock before the divider. QEMU and KVM use 1 GHz;
    /// kvm-unit-tests' `apic` expects it no faster than the TSC.
    pub bus_hz: u64,
}

/// Features the guest's CPUID advertises, which decide what the APIC
/// accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicFeatures {
    /// x2APIC mode may be entered (CPUID.1:ECX.x2APIC).
    pub x2apic: bool,
    /// The TSC-deadline mode exists (CPUID.1:ECX.TSC_DEADLINE).
    pub tsc_deadline: bool,
    /// MAXPHYADDR: bits at and above it in IA32_APIC_BASE are reserved.
    pub phys_addr_bits: u8,
}

/// One vCPU's local APIC.
#[derive(Debug, Clone)]
pub struct LocalApic {
    initial_id: u32,
    base: u64,
    xapic_id: u8,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    esr: u32,
    esr_pending: u32,
    icr: u64,
    lvt: [u32; LVT_COUNT],
    tmict: u32,
    tdcr: u32,
    /// Host TSC at which the current countdown started (one-shot and
    /// periodic), if it runs.
    count_start: Option<u64>,
    /// Guest TSC value of an armed TSC deadline.
    deadline: Option<u64>,
    /// Guest TSC = host TSC + this (wrapping).
    tsc_offset: u64,
}

/// Bitmap helpers over 256 vectors held as 8 x u32.
fn test_bit(bits: &[u32; 8], vector: u8) -> bool {
    bits[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
}

fn set_bit(bits: &mut [u32; 8], vector: u8, value: bool) {
    let word = &mut bits[usize::from(vector >> 5)];
    if value {
        *word |= 1 << (vector & 31);
    } else {
        *word &= !(1 << (vector & 31));
    }
}

fn highest_bit(bits: &[u32; 8]) -> Option<u8> {
    bits.iter()
        .enumerate()
        .rev()
        .find(|(_, w)| **w != 0)
        .map(|(i, w)| (i * 32 + 31 - w.leading_zeros() as usize) as u8)
}

impl LocalApic {
    /// The APIC of the vCPU with APIC ID `id`, as at power-on: enabled in
    /// xAPIC mode at the default base, software-disabled, every LVT masked.
    pub fn new(id: u32, bsp: bool) -> Self {
        let mut apic = Self {
            initial_id: id,
            base: DEFAULT_BASE | BASE_ENABLE | if bsp { BASE_BSP } else { 0 },
            xapic_id: id as u8,
            tpr: 0,
            ldr: 0,
            dfr: u32::MAX,
            svr: 0xFF,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            tmict: 0,
            tdcr: 0,
            count_start: None,
            deadline: None,
            tsc_offset: 0,
        };
        apic.reset();
        apic
    }

    /// The BSP's APIC as firmware (SeaBIOS) hands it to a multiboot kernel:
    /// software-enabled, LINT0 in ExtINT mode ("virtual wire": the 8259's
    /// interrupts reach the CPU), LINT1 delivering NMIs.
    pub fn new_virtual_wire(id: u32) -> Self {
        let mut apic = Self::new(id, true);
        apic.svr = 0x1FF;
        apic.lvt[LVT_LINT0] = 0x8700;
        apic.lvt[LVT_LINT1] = 0x8400;
        apic
    }

    /// INIT (and power-on): every register to its reset value but the APIC
    /// ID and IA32_APIC_BASE (SDM Vol. 3, 11.4.7.3).
    pub fn reset(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = u32::MAX;
        self.svr = 0xFF;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.esr_pending = 0;
        self.icr = 0;
        self.lvt = [LVT_MASKED; LVT_COUNT];
        self.tmict = 0;
        self.tdcr = 0;
        self.count_start = None;
        self.deadline = None;
        if self.mode() == ApicMode::X2Apic {
            self.ldr = x2apic_ldr(self.initial_id);
        }
    }

    /// The operating mode.
    pub fn mode(&self) -> ApicMode {
        match (self.base & BASE_ENABLE != 0, self.base & BASE_EXTD != 0) {
            (false, _) => ApicMode::Disabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
        }
    }

    /// IA32_APIC_BASE.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Guest-physical address of the xAPIC page while in xAPIC mode: the
    /// page the kernel must trap. `None` in the other modes, where the page
    /// is ordinary (unbacked) address space.
    pub fn mmio_base(&self) -> Option<u64> {
        (self.mode() == ApicMode::XApic).then_some(self.base & !0xFFF & ((1 << 52) - 1))
    }

    /// Whether the APIC is enabled in hardware and in software (SVR bit 8):
    /// only then does it accept fixed interrupts.
    pub fn enabled(&self) -> bool {
        self.mode() != ApicMode::Disabled && self.svr & SVR_ENABLE != 0
    }

    /// The APIC ID as its current mode shows it (8-bit xAPIC ID, which the
    /// guest may have changed, or the x2APIC ID).
    pub fn id(&self) -> u32 {
        match self.mode() {
            ApicMode::X2Apic => self.initial_id,
            _ => u32::from(self.xapic_id),
        }
    }

    /// The ID the vCPU was created with (CPUID leaves 1 and 0xB).
    pub fn initial_id(&self) -> u32 {
        self.initial_id
    }

    /// Sets the guest's TSC offset (guest TSC = host TSC + offset).
    pub fn set_tsc_offset(&mut self, offset: u64) {
        self.tsc_offset = offset;
    }

    /// A write to IA32_APIC_BASE (SDM Vol. 3, 11.12.5: the allowed mode
    /// transitions; reserved bits fault).
    pub fn write_base(
        &mut self,
        value: u64,
        features: ApicFeatures,
    ) -> Result<ApicEffect, ApicFault> {
        let phys_mask = if features.phys_addr_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << features.phys_addr_bits) - 1
        };
        let mut reserved = 0xFF | (1 << 9) | !phys_mask;
        if !features.x2apic {
            reserved |= BASE_EXTD;
        }
        if value & reserved != 0 {
            return Err(ApicFault::GeneralProtection);
        }
        let old_mode = self.mode();
        let new_mode = match (value & BASE_ENABLE != 0, value & BASE_EXTD != 0) {
            (false, true) => return Err(ApicFault::GeneralProtection),
            (false, false) => ApicMode::Disabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
        };
        match (old_mode, new_mode) {
            (ApicMode::X2Apic, ApicMode::XApic) | (ApicMode::Disabled, ApicMode::X2Apic) => {
                return Err(ApicFault::GeneralProtection);
            }
            _ => {}
        }
        let old_base = self.base;
        self.base = value;
        match (old_mode, new_mode) {
            (ApicMode::Disabled, ApicMode::Disabled) => {}
            (_, ApicMode::Disabled) => {
                // A hardware-disabled APIC loses its state; enabled again it
                // is as at power-on, its xAPIC ID restored.
                self.reset();
                self.xapic_id = self.initial_id as u8;
            }
            (ApicMode::XApic, ApicMode::X2Apic) => {
                self.ldr = x2apic_ldr(self.initial_id);
            }
            _ => {}
        }
        if old_base & !0xFFF != value & !0xFFF || old_mode != new_mode {
            Ok(ApicEffect::BaseChanged)
        } else {
            Ok(ApicEffect::None)
        }
    }

    /// PPR: the higher of TPR and the in-service class (SDM 11.8.3.1).
    pub fn ppr(&self) -> u8 {
        let isrv = highest_bit(&self.isr).unwrap_or(0);
        if self.tpr & 0xF0 >= isrv & 0xF0 {
            self.tpr
        } else {
            isrv & 0xF0
        }
    }

    /// TPR.
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// CR8 reads: TPR bits 7:4.
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// A MOV to CR8: bits 63:4 are reserved (#GP).
    pub fn write_cr8(&mut self, value: u64) -> Result<(), ApicFault> {
        if value > 0xF {
            return Err(ApicFault::GeneralProtection);
        }
        self.tpr = (value as u8) << 4;
        Ok(())
    }

    /// Takes an interrupt into IRR (TMR records its trigger mode). Returns
    /// false when dropped: the APIC is disabled, or the vector is illegal
    /// (below 16, which sets ESR and may raise the error LVT).
    pub fn accept(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.enabled() {
            return false;
        }
        if vector < 16 {
            self.raise_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return false;
        }
        set_bit(&mut self.irr, vector, true);
        set_bit(&mut self.tmr, vector, level_triggered);
        true
    }

    fn raise_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if lvt & LVT_MASKED == 0 && self.enabled() && lvt as u8 >= 16 {
            set_bit(&mut self.irr, lvt as u8, true);
            set_bit(&mut self.tmr, lvt as u8, false);
        }
    }

    /// The vector the CPU would take now: the highest in IRR whose class is
    /// above PPR's.
    pub fn deliverable(&self) -> Option<u8> {
        let vector = highest_bit(&self.irr)?;
        (vector & 0xF0 > self.ppr() & 0xF0).then_some(vector)
    }

    /// The highest requested vector, deliverable or not.
    pub fn highest_requested(&self) -> Option<u8> {
        highest_bit(&self.irr)
    }

    /// Interrupt acknowledge: moves [`Self::deliverable`] from IRR to ISR.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.deliverable()?;
        set_bit(&mut self.irr, vector, false);
        set_bit(&mut self.isr, vector, true);
        Some(vector)
    }

    /// EOI: retires the highest in-service vector. Returns the effect: a
    /// level-triggered vector is broadcast to the I/O APIC.
    fn eoi(&mut self) -> ApicEffect {
        let Some(vector) = highest_bit(&self.isr) else {
            return ApicEffect::None;
        };
        set_bit(&mut self.isr, vector, false);
        if test_bit(&self.tmr, vector) {
            ApicEffect::LevelEoi(vector)
        } else {
            ApicEffect::None
        }
    }

    /// Whether a vector is requested (IRR).
    pub fn irr_bit(&self, vector: u8) -> bool {
        test_bit(&self.irr, vector)
    }

    /// Whether a vector is in service (ISR).
    pub fn isr_bit(&self, vector: u8) -> bool {
        test_bit(&self.isr, vector)
    }

    /// Whether a vector was accepted level-triggered (TMR).
    pub fn tmr_bit(&self, vector: u8) -> bool {
        test_bit(&self.tmr, vector)
    }

    /// LINT0 takes the 8259's INTR (ExtINT): true when the APIC is
    /// hardware-disabled (the pin goes straight to the CPU) or LVT LINT0 is
    /// unmasked in ExtINT mode.
    pub fn accepts_extint(&self) -> bool {
        if self.mode() == ApicMode::Disabled {
            return true;
        }
        let lvt = self.lvt[LVT_LINT0];
        lvt & LVT_MASKED == 0 && DeliveryMode::from_bits(lvt) == DeliveryMode::ExtInt
    }

    /// What an NMI on the LINT1 pin (the NMI button) does: `Some(true)` an
    /// NMI, `Some(false)` nothing, `None` when the APIC is disabled and the
    /// pin goes straight to the CPU's NMI input.
    pub fn lint1_is_nmi(&self) -> Option<bool> {
        if self.mode() == ApicMode::Disabled {
            return None;
        }
        let lvt = self.lvt[LVT_LINT1];
        Some(lvt & LVT_MASKED == 0 && DeliveryMode::from_bits(lvt) == DeliveryMode::Nmi)
    }

    /// Whether this APIC is a destination of `dest` (SDM 11.6.2). A
    /// hardware-disabled APIC is nobody's destination.
    pub fn matches(&self, dest: Destination) -> bool {
        let mode = self.mode();
        if mode == ApicMode::Disabled {
            return false;
        }
        if dest.is_broadcast() {
            return true;
        }
        let x2apic = mode == ApicMode::X2Apic;
        if !dest.logical {
            return if x2apic || dest.x2apic {
                self.id() == dest.id
            } else {
                u32::from(self.xapic_id) == dest.id & 0xFF
            };
        }
        if x2apic {
            // Cluster in 31:16, one bit per member in 15:0. An 8-bit
            // (I/O APIC) destination addresses cluster 0.
            let ldr = self.ldr;
            return ldr >> 16 == dest.id >> 16 && ldr & dest.id & 0xFFFF != 0;
        }
        let logical_id = self.ldr >> 24;
        let mda = dest.id & 0xFF;
        if self.dfr >> 28 == 0xF {
            // Flat: one bit per APIC.
            logical_id & mda != 0
        } else {
            // Cluster: cluster in 7:4, members in 3:0.
            logical_id >> 4 == mda >> 4 && logical_id & mda & 0xF != 0
        }
    }

    fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_TIMER] >> LVT_TIMER_MODE_SHIFT) & 3 {
            0 => TimerMode::OneShot,
            1 => TimerMode::Periodic,
            // 3 is reserved; masked off on write.
            _ => TimerMode::TscDeadline,
        }
    }

    fn divisor(&self) -> u64 {
        let code = (self.tdcr & 3) | ((self.tdcr >> 1) & 4);
        if code == 7 { 1 } else { 2 << code }
    }

    /// Host ticks of one countdown of TMICT.
    fn period(&self, timing: ApicTiming) -> u64 {
        let bus_ticks = u64::from(self.tmict) * self.divisor();
        scale_up(bus_ticks, timing.bus_hz, timing.tsc_hz).max(1)
    }

    /// When the timer next fires, in host TSC ticks, if it runs.
    pub fn timer_deadline(&self, timing: ApicTiming) -> Option<u64> {
        match self.timer_mode() {
            TimerMode::TscDeadline => {
                let deadline = self.deadline?;
                // The deadline is guest time; the answer host time.
                Some(deadline.wrapping_sub(self.tsc_offset))
            }
            _ => self
                .count_start
                .map(|start| start.saturating_add(self.period(timing))),
        }
    }

    /// Brings the timer up to `now`: fires it if due (into IRR unless LVT
    /// timer is masked). Returns true when an interrupt was taken into IRR.
    pub fn advance_timer(&mut self, now: u64, timing: ApicTiming) -> bool {
        let fired = match self.timer_mode() {
            TimerMode::TscDeadline => match self.deadline {
                Some(deadline) if now.wrapping_add(self.tsc_offset) >= deadline => {
                    self.deadline = None;
                    true
                }
                _ => false,
            },
            TimerMode::OneShot => match self.count_start {
                Some(start) if now >= start.saturating_add(self.period(timing)) => {
                    self.count_start = None;
                    true
                }
                _ => false,
            },
            TimerMode::Periodic => match self.count_start {
                Some(start) if now >= start.saturating_add(self.period(timing)) => {
                    // Missed periods coalesce into one interrupt, as IRR
                    // holds one bit per vector.
                    let period = self.period(timing);
                    let periods = (now - start) / period;
                    self.count_start = Some(start + periods * period);
                    true
                }
                _ => false,
            },
        };
        let lvt = self.lvt[LVT_TIMER];
        fired && lvt & LVT_MASKED == 0 && self.accept(lvt as u8, false)
    }

    fn current_count(&self, now: u64, timing: ApicTiming) -> u32 {
        let Some(start) = self.count_start else {
            return 0;
        };
        if self.tmict == 0 || self.timer_mode() == TimerMode::TscDeadline {
            return 0;
        }
        let elapsed =
            scale(now.saturating_sub(start), timing.tsc_hz, timing.bus_hz) / self.divisor();
        let tmict = u64::from(self.tmict);
        match self.timer_mode() {
            TimerMode::Periodic => (tmict - elapsed % tmict) as u32,
            _ => tmict.saturating_sub(elapsed) as u32,
        }
    }

    /// IA32_TSC_DEADLINE reads: the armed deadline, 0 once it fired or in
    /// the other timer modes.
    pub fn read_tsc_deadline(&self) -> u64 {
        match self.timer_mode() {
            TimerMode::TscDeadline => self.deadline.unwrap_or(0),
            _ => 0,
        }
    }

    /// IA32_TSC_DEADLINE writes (guest TSC value; 0 disarms). Ignored
    /// outside TSC-deadline mode; a deadline already passed fires at once.
    pub fn write_tsc_deadline(&mut self, value: u64, now: u64, timing: ApicTiming) -> bool {
        if self.timer_mode() != TimerMode::TscDeadline {
            return false;
        }
        self.deadline = (value != 0).then_some(value);
        self.advance_timer(now, timing)
    }

    /// A register read at `offset` in `mode`'s view. `now` is host TSC.
    fn read_register(
        &mut self,
        offset: u32,
        now: u64,
        timing: ApicTiming,
    ) -> Result<u32, ApicFault> {
        let x2apic = self.mode() == ApicMode::X2Apic;
        let value = match offset {
            reg::ID if x2apic => self.initial_id,
            reg::ID => u32::from(self.xapic_id) << 24,
            reg::VERSION => VERSION,
            reg::TPR => u32::from(self.tpr),
            reg::APR | reg::RRD if !x2apic => 0,
            reg::PPR => u32::from(self.ppr()),
            reg::EOI if x2apic => return Err(ApicFault::GeneralProtection),
            reg::EOI => 0,
            reg::LDR => self.ldr,
            reg::DFR if !x2apic => self.dfr,
            reg::SVR => self.svr,
            0x100..=0x170 if offset.is_multiple_of(16) => {
                self.isr[((offset - reg::ISR) / 16) as usize]
            }
            0x180..=0x1F0 if offset.is_multiple_of(16) => {
                self.tmr[((offset - reg::TMR) / 16) as usize]
            }
            0x200..=0x270 if offset.is_multiple_of(16) => {
                self.advance_timer(now, timing);
                self.irr[((offset - reg::IRR) / 16) as usize]
            }
            reg::ESR => self.esr,
            reg::ICR => self.icr as u32,
            reg::ICR2 if !x2apic => (self.icr >> 32) as u32,
            reg::LVT_TIMER..=reg::LVT_ERROR if offset.is_multiple_of(16) => {
                self.lvt[((offset - reg::LVT_TIMER) / 16) as usize]
            }
            reg::TMICT => self.tmict,
            reg::TMCCT => {
                self.advance_timer(now, timing);
                self.current_count(now, timing)
            }
            reg::TDCR => self.tdcr,
            _ if x2apic => return Err(ApicFault::GeneralProtection),
            _ => 0,
        };
        Ok(value)
    }

    /// A register write at `offset`; the high half of an x2APIC ICR write
    /// comes in `high`.
    fn write_register(
        &mut self,
        offset: u32,
        value: u32,
        high: u32,
        now: u64,
        timing: ApicTiming,
        features: ApicFeatures,
    ) -> Result<ApicEffect, ApicFault> {
        let x2apic = self.mode() == ApicMode::X2Apic;
        let gp = Err(ApicFault::GeneralProtection);
        // In x2APIC mode only the ICR takes a high half.
        if x2apic && high != 0 && offset != reg::ICR {
            return gp;
        }
        self.advance_timer(now, timing);
        match offset {
            reg::ID if x2apic => return gp,
            reg::ID => self.xapic_id = (value >> 24) as u8,
            reg::TPR => {
                if x2apic && value > 0xFF {
                    return gp;
                }
                self.tpr = value as u8;
            }
            reg::EOI => {
                if x2apic && value != 0 {
                    return gp;
                }
                return Ok(self.eoi());
            }
            reg::LDR if x2apic => return gp,
            reg::LDR => self.ldr = value & 0xFF00_0000,
            reg::DFR if x2apic => return gp,
            reg::DFR => self.dfr = value | 0x0FFF_FFFF,
            reg::SVR => {
                // Focus checking (bit 9) is kept; EOI-broadcast suppression
                // (bit 12) is not offered (VERSION bit 24 clear).
                self.svr = value & 0x3FF;
                if self.svr & SVR_ENABLE == 0 {
                    for lvt in &mut self.lvt {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => {
                if x2apic && value != 0 {
                    return gp;
                }
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            reg::ICR => {
                let low = value & 0x000C_CFFF;
                let icr = if x2apic {
                    u64::from(high) << 32 | u64::from(low)
                } else {
                    (self.icr & 0xFFFF_FFFF_0000_0000) | u64::from(low)
                };
                self.icr = icr;
                let ipi = Ipi::from_icr(icr, x2apic);
                if ipi.mode == DeliveryMode::Fixed && ipi.vector < 16 {
                    self.raise_error(ESR_SEND_ILLEGAL_VECTOR);
                    return Ok(ApicEffect::None);
                }
                return Ok(ApicEffect::SendIpi(ipi));
            }
            reg::ICR2 if !x2apic => {
                self.icr = (self.icr & 0xFFFF_FFFF) | u64::from(value & 0xFF00_0000) << 32;
            }
            reg::LVT_TIMER => self.write_lvt_timer(value, features),
            reg::LVT_THERMAL | reg::LVT_PERF => {
                self.write_lvt(((offset - reg::LVT_TIMER) / 16) as usize, value & 0x1_07FF);
            }
            reg::LVT_LINT0 | reg::LVT_LINT1 => {
                // Remote IRR (14) and delivery status (12) are read-only.
                self.write_lvt(((offset - reg::LVT_TIMER) / 16) as usize, value & 0x1_A7FF);
            }
            reg::LVT_ERROR => self.write_lvt(LVT_ERROR, value & 0x1_00FF),
            reg::TMICT => {
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.tmict = value;
                    self.count_start = (value != 0).then_some(now);
                }
            }
            reg::TMCCT if x2apic => return gp,
            reg::TDCR => {
                // Keep the count where it is and go on at the new rate.
                let count = self.current_count(now, timing);
                self.tdcr = value & 0xB;
                self.restart_from(count, now, timing);
            }
            reg::SELF_IPI if x2apic => {
                if value > 0xFF {
                    return gp;
                }
                return Ok(ApicEffect::SendIpi(Ipi {
                    vector: value as u8,
                    mode: DeliveryMode::Fixed,
                    destination: Destination {
                        id: 0,
                        logical: false,
                        x2apic: true,
                    },
                    shorthand: Shorthand::SelfOnly,
                    assert: true,
                    level_triggered: false,
                }));
            }
            // Read-only registers: #GP in x2APIC mode, ignored in xAPIC.
            _ if x2apic => return gp,
            reg::ESR..=reg::TDCR | reg::VERSION..=reg::SELF_IPI => {}
            _ => self.raise_error(ESR_ILLEGAL_REGISTER),
        }
        Ok(ApicEffect::None)
    }

    fn write_lvt(&mut self, index: usize, value: u32) {
        let masked = if self.svr & SVR_ENABLE == 0 {
            LVT_MASKED
        } else {
            0
        };
        self.lvt[index] = value | masked;
    }

    fn write_lvt_timer(&mut self, value: u32, features: ApicFeatures) {
        let mode_mask = if features.tsc_deadline { 3 } else { 1 };
        let value = value & (0xFF | LVT_MASKED | mode_mask << LVT_TIMER_MODE_SHIFT);
        let old = self.timer_mode();
        self.write_lvt(LVT_TIMER, value);
        let new = self.timer_mode();
        if (old == TimerMode::TscDeadline) != (new == TimerMode::TscDeadline) {
            // Entering or leaving TSC-deadline mode disarms the timer.
            self.tmict = 0;
            self.count_start = None;
            self.deadline = None;
        }
        // Between one-shot and periodic the countdown goes on from where it
        // is; a one-shot that reached zero stays there.
    }

    fn restart_from(&mut self, count: u32, now: u64, timing: ApicTiming) {
        if self.count_start.is_none() || self.tmict == 0 {
            return;
        }
        // Place the start so that `count` is left of TMICT at `now`.
        let done = u64::from(self.tmict - count.min(self.tmict)) * self.divisor();
        let done_host = scale(done, timing.bus_hz, timing.tsc_hz);
        self.count_start = Some(now.saturating_sub(done_host));
    }

    /// An access to the xAPIC page at `offset` (0-0xFFF) of `size` bytes.
    /// Only aligned 32-bit accesses to a register's first dword reach it,
    /// as on hardware; other reads see zeros, other writes are dropped
    /// (as KVM does). Outside xAPIC mode the page is not the APIC's: reads
    /// return all ones, writes are dropped.
    pub fn mmio_read(&mut self, offset: u64, size: u8, now: u64, timing: ApicTiming) -> u64 {
        if self.mode() != ApicMode::XApic {
            return all_ones(size);
        }
        let aligned = (offset & 0xFF0) as u32;
        let within = (offset & 0xF) as u32;
        if within + u32::from(size) > 4 {
            return 0;
        }
        let value = self.read_register(aligned, now, timing).unwrap_or(0);
        let shifted = u64::from(value >> (8 * within));
        shifted & size_mask(size)
    }

    /// See [`Self::mmio_read`].
    pub fn mmio_write(
        &mut self,
        offset: u64,
        size: u8,
        value: u64,
        now: u64,
        timing: ApicTiming,
        features: ApicFeatures,
    ) -> ApicEffect {
        if self.mode() != ApicMode::XApic || size != 4 || offset & 0xF != 0 {
            return ApicEffect::None;
        }
        self.write_register(
            (offset & 0xFF0) as u32,
            value as u32,
            0,
            now,
            timing,
            features,
        )
        .unwrap_or(ApicEffect::None)
    }

    /// RDMSR of an x2APIC register (0x800-0x8FF). #GP outside x2APIC mode.
    pub fn read_msr(&mut self, msr: u32, now: u64, timing: ApicTiming) -> Result<u64, ApicFault> {
        if self.mode() != ApicMode::X2Apic || !(X2APIC_MSR_BASE..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(ApicFault::GeneralProtection);
        }
        let offset = (msr - X2APIC_MSR_BASE) * 16;
        match offset {
            reg::ICR => Ok(self.icr),
            reg::SELF_IPI => Err(ApicFault::GeneralProtection),
            _ => self.read_register(offset, now, timing).map(u64::from),
        }
    }

    /// WRMSR of an x2APIC register. #GP outside x2APIC mode.
    pub fn write_msr(
        &mut self,
        msr: u32,
        value: u64,
        now: u64,
        timing: ApicTiming,
        features: ApicFeatures,
    ) -> Result<ApicEffect, ApicFault> {
        if self.mode() != ApicMode::X2Apic || !(X2APIC_MSR_BASE..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(ApicFault::GeneralProtection);
        }
        let offset = (msr - X2APIC_MSR_BASE) * 16;
        self.write_register(
            offset,
            value as u32,
            (value >> 32) as u32,
            now,
            timing,
            features,
        )
    }
}

fn x2apic_ldr(id: u32) -> u32 {
    (id >> 4) << 16 | 1 << (id & 0xF)
}

fn size_mask(size: u8) -> u64 {
    match size {
        1 => 0xFF,
        2 => 0xFFFF,
        4 => 0xFFFF_FFFF,
        _ => u64::MAX,
    }
}

fn all_ones(size: u8) -> u64 {
    size_mask(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: ApicTiming = ApicTiming {
        tsc_hz: 2_000_000_000,
        bus_hz: 1_000_000_000,
    };
    const FEATURES: ApicFeatures = ApicFeatures {
        x2apic: true,
        tsc_deadline: true,
        phys_addr_bits: 40,
    };

    fn enabled_apic(id: u32) -> LocalApic {
        let mut apic = LocalApic::new(id, id == 0);
        write(&mut apic, reg::SVR, 0x1FF);
        apic
    }

    fn write(apic: &mut LocalApic, offset: u32, value: u32) -> ApicEffect {
        apic.mmio_write(u64::from(offset), 4, u64::from(value), 0, TIMING, FEATURES)
    }

    fn write_at(apic: &mut LocalApic, offset: u32, value: u32, now: u64) -> ApicEffect {
        apic.mmio_write(
            u64::from(offset),
            4,
            u64::from(value),
            now,
            TIMING,
            FEATURES,
        )
    }

    fn read(apic: &mut LocalApic, offset: u32) -> u32 {
        apic.mmio_read(u64::from(offset), 4, 0, TIMING) as u32
    }

    fn read_at(apic: &mut LocalApic, offset: u32, now: u64) -> u32 {
        apic.mmio_read(u64::from(offset), 4, now, TIMING) as u32
    }

    #[test]
    fn power_on_state() {
        let mut apic = LocalApic::new(3, false);
        assert_eq!(apic.base(), DEFAULT_BASE | BASE_ENABLE);
        assert_eq!(LocalApic::new(0, true).base() & BASE_BSP, BASE_BSP);
        assert_eq!(read(&mut apic, reg::ID), 3 << 24);
        assert_eq!(
            read(&mut apic, reg::VERSION) & 0xFF,
            0x14,
            "kvm-unit-tests want 0x10..=0x15"
        );
        assert_eq!(read(&mut apic, reg::SVR), 0xFF);
        assert_eq!(read(&mut apic, reg::DFR), u32::MAX);
        for lvt in (reg::LVT_TIMER..=reg::LVT_ERROR).step_by(16) {
            assert_eq!(read(&mut apic, lvt), LVT_MASKED);
        }
        assert!(!apic.enabled(), "software-disabled until SVR bit 8");
        assert!(
            !apic.accept(0x40, false),
            "a software-disabled APIC drops fixed interrupts"
        );
        write(&mut apic, reg::SVR, 0x1FF);
        assert!(apic.enabled());
    }

    #[test]
    fn priorities_acknowledge_and_eoi() {
        let mut apic = enabled_apic(0);
        assert!(apic.accept(0x31, false));
        assert!(apic.accept(0x52, false));
        assert!(apic.accept(0x51, false));
        // Highest first.
        assert_eq!(apic.acknowledge(), Some(0x52));
        assert_eq!(read(&mut apic, reg::PPR), 0x50);
        // 0x51 is in the same class as the one in service: blocked.
        assert_eq!(apic.deliverable(), None);
        assert_eq!(apic.highest_requested(), Some(0x51));
        assert_eq!(write(&mut apic, reg::EOI, 0), ApicEffect::None);
        assert!(!apic.isr_bit(0x52));
        // EOI let the next lower-priority vector through.
        assert_eq!(apic.acknowledge(), Some(0x51));
        write(&mut apic, reg::EOI, 0);
        // TPR blocks by class.
        write(&mut apic, reg::TPR, 0x30);
        assert_eq!(
            apic.deliverable(),
            None,
            "0x31 is not above TPR 0x30's class"
        );
        apic.write_cr8(2).unwrap();
        assert_eq!(read(&mut apic, reg::TPR), 0x20);
        assert_eq!(apic.cr8(), 2);
        assert_eq!(apic.acknowledge(), Some(0x31));
        assert_eq!(apic.write_cr8(0x10), Err(ApicFault::GeneralProtection));
    }

    #[test]
    fn isr_irr_tmr_registers_show_the_bits() {
        let mut apic = enabled_apic(0);
        apic.accept(0x79, true);
        assert_eq!(read(&mut apic, reg::IRR + 0x30), 1 << (0x79 - 0x60));
        assert_eq!(read(&mut apic, reg::TMR + 0x30), 1 << (0x79 - 0x60));
        apic.acknowledge();
        assert_eq!(read(&mut apic, reg::IRR + 0x30), 0);
        assert_eq!(read(&mut apic, reg::ISR + 0x30), 1 << (0x79 - 0x60));
        // A level-triggered vector's EOI goes to the I/O APIC; TMR stays
        // set until an edge interrupt of that vector is accepted.
        assert_eq!(write(&mut apic, reg::EOI, 0), ApicEffect::LevelEoi(0x79));
        assert!(apic.tmr_bit(0x79));
        apic.accept(0x79, false);
        assert!(!apic.tmr_bit(0x79));
    }

    #[test]
    fn illegal_vectors_set_esr() {
        let mut apic = enabled_apic(0);
        assert!(!apic.accept(0x05, false));
        write(&mut apic, reg::ESR, 0);
        assert_eq!(read(&mut apic, reg::ESR), ESR_RECEIVE_ILLEGAL_VECTOR);
        write(&mut apic, reg::ESR, 0);
        assert_eq!(read(&mut apic, reg::ESR), 0);
        // Sending a fixed IPI with vector < 16 is a send error, not an IPI.
        write(&mut apic, reg::ICR2, 1 << 24);
        assert_eq!(write(&mut apic, reg::ICR, 0x4003), ApicEffect::None);
        write(&mut apic, reg::ESR, 0);
        assert_eq!(read(&mut apic, reg::ESR), ESR_SEND_ILLEGAL_VECTOR);
    }

    #[test]
    fn icr_writes_send_decoded_ipis() {
        let mut apic = enabled_apic(0);
        write(&mut apic, reg::ICR2, 1 << 24);
        let effect = write(&mut apic, reg::ICR, 0x4000 | 0x20);
        let ApicEffect::SendIpi(ipi) = effect else {
            panic!("{effect:?}")
        };
        assert_eq!(ipi.vector, 0x20);
        assert_eq!(ipi.mode, DeliveryMode::Fixed);
        assert_eq!(
            ipi.destination,
            Destination {
                id: 1,
                logical: false,
                x2apic: false
            }
        );
        assert_eq!(ipi.shorthand, Shorthand::None);
        assert_eq!(
            read(&mut apic, reg::ICR) & (1 << 12),
            0,
            "never busy: delivery is done"
        );
        // bringup_aps(): INIT then SIPI to all but self.
        let ApicEffect::SendIpi(init) = write(&mut apic, reg::ICR, 0xC0000 | 0x500 | 0x4000) else {
            panic!()
        };
        assert_eq!(
            (init.mode, init.shorthand),
            (DeliveryMode::Init, Shorthand::AllExcludingSelf)
        );
        let ApicEffect::SendIpi(sipi) = write(&mut apic, reg::ICR, 0xC0000 | 0x600) else {
            panic!()
        };
        assert_eq!((sipi.mode, sipi.vector), (DeliveryMode::StartUp, 0));
    }

    #[test]
    fn destinations_physical_logical_flat_and_cluster() {
        let mut a = enabled_apic(1);
        let phys = |id| Destination {
            id,
            logical: false,
            x2apic: false,
        };
        let logical = |id| Destination {
            id,
            logical: true,
            x2apic: false,
        };
        assert!(a.matches(phys(1)));
        assert!(!a.matches(phys(2)));
        assert!(a.matches(phys(0xFF)), "physical broadcast");
        // The xAPIC ID is writable and physical destinations follow it.
        write(&mut a, reg::ID, 7 << 24);
        assert!(a.matches(phys(7)) && !a.matches(phys(1)));
        // Flat: LDR bit per APIC.
        write(&mut a, reg::LDR, 0x04 << 24);
        assert!(a.matches(logical(0x04)) && a.matches(logical(0x0C)) && !a.matches(logical(0x08)));
        // Cluster: cluster 2, member bit 1.
        write(&mut a, reg::DFR, 0x0FFF_FFFF);
        write(&mut a, reg::LDR, 0x22 << 24);
        assert!(a.matches(logical(0x22)) && a.matches(logical(0x2F)));
        assert!(!a.matches(logical(0x12)) && !a.matches(logical(0x21)));
        assert!(a.matches(logical(0xFF)), "logical broadcast");
        // A hardware-disabled APIC is nobody's destination.
        a.write_base(DEFAULT_BASE, FEATURES).unwrap();
        assert!(!a.matches(phys(0xFF)));
    }

    #[test]
    fn x2apic_mode_registers_and_faults() {
        let mut apic = enabled_apic(0x13);
        let x2 = DEFAULT_BASE | BASE_ENABLE | BASE_EXTD;
        assert_eq!(
            apic.read_msr(0x802, 0, TIMING),
            Err(ApicFault::GeneralProtection),
            "not in x2APIC mode yet"
        );
        assert_eq!(apic.write_base(x2, FEATURES), Ok(ApicEffect::BaseChanged));
        assert_eq!(apic.mmio_base(), None, "the xAPIC page is gone");
        assert_eq!(apic.mmio_read(0x30, 4, 0, TIMING), 0xFFFF_FFFF);
        assert_eq!(apic.read_msr(0x802, 0, TIMING), Ok(0x13));
        // LDR: cluster 1, bit 3.
        assert_eq!(apic.read_msr(0x80D, 0, TIMING), Ok(1 << 16 | 1 << 3));
        let gp = Err(ApicFault::GeneralProtection);
        assert_eq!(
            apic.write_msr(0x802, 5, 0, TIMING, FEATURES),
            gp,
            "ID is read-only"
        );
        assert_eq!(
            apic.write_msr(0x80D, 5, 0, TIMING, FEATURES),
            gp,
            "LDR is read-only"
        );
        assert_eq!(
            apic.read_msr(0x80E, 0, TIMING),
            Err(ApicFault::GeneralProtection),
            "no DFR in x2APIC mode"
        );
        assert_eq!(
            apic.read_msr(0x80B, 0, TIMING),
            Err(ApicFault::GeneralProtection),
            "EOI is write-only"
        );
        assert_eq!(
            apic.write_msr(0x80B, 1, 0, TIMING, FEATURES),
            gp,
            "EOI takes only 0"
        );
        assert_eq!(
            apic.read_msr(0x83F, 0, TIMING),
            Err(ApicFault::GeneralProtection),
            "SELF IPI is write-only"
        );
        assert_eq!(
            apic.read_msr(0x831, 0, TIMING),
            Err(ApicFault::GeneralProtection),
            "no ICR2"
        );
        assert_eq!(
            apic.write_msr(0x808, 1 << 32, 0, TIMING, FEATURES),
            gp,
            "reserved high half"
        );
        // One 64-bit ICR write with a 32-bit destination.
        let Ok(ApicEffect::SendIpi(ipi)) = apic.write_msr(
            0x830,
            0x1234_5678 << 32 | 0x4000 | 0x30,
            0,
            TIMING,
            FEATURES,
        ) else {
            panic!()
        };
        assert_eq!(
            ipi.destination,
            Destination {
                id: 0x1234_5678,
                logical: false,
                x2apic: true
            }
        );
        assert_eq!(
            apic.read_msr(0x830, 0, TIMING),
            Ok(0x1234_5678 << 32 | 0x4030)
        );
        let Ok(ApicEffect::SendIpi(ipi)) = apic.write_msr(0x83F, 0xB0, 0, TIMING, FEATURES) else {
            panic!()
        };
        assert_eq!((ipi.vector, ipi.shorthand), (0xB0, Shorthand::SelfOnly));
        // x2APIC logical destinations: cluster 1, member bit 3.
        assert!(apic.matches(Destination {
            id: 1 << 16 | 0x8,
            logical: true,
            x2apic: true
        }));
        assert!(!apic.matches(Destination {
            id: 0x8,
            logical: true,
            x2apic: true
        }));
        assert!(apic.matches(Destination {
            id: 0x13,
            logical: false,
            x2apic: true
        }));
    }

    #[test]
    fn apic_base_transitions_follow_the_sdm() {
        // kvm-unit-tests apic.c test_enable_x2apic, step by step.
        let gp = Err(ApicFault::GeneralProtection);
        let mut apic = enabled_apic(0);
        let base = DEFAULT_BASE | BASE_BSP;
        apic.write_base(base | BASE_ENABLE | BASE_EXTD, FEATURES)
            .unwrap();
        assert_eq!(
            apic.write_base(base | BASE_EXTD, FEATURES),
            gp,
            "x2APIC to invalid"
        );
        assert_eq!(
            apic.write_base(base | BASE_ENABLE, FEATURES),
            gp,
            "x2APIC to xAPIC"
        );
        assert!(
            apic.write_base(base, FEATURES).is_ok(),
            "x2APIC to disabled"
        );
        assert_eq!(
            apic.write_base(base | BASE_EXTD, FEATURES),
            gp,
            "disabled to invalid"
        );
        assert_eq!(
            apic.write_base(base | BASE_ENABLE | BASE_EXTD, FEATURES),
            gp,
            "disabled to x2APIC"
        );
        assert!(
            apic.write_base(base | BASE_ENABLE, FEATURES).is_ok(),
            "disabled to xAPIC"
        );
        assert_eq!(
            apic.write_base(base | BASE_EXTD, FEATURES),
            gp,
            "xAPIC to invalid"
        );
        // Reserved bits: low bits, bit 9, above MAXPHYADDR, EXTD without x2APIC.
        assert_eq!(apic.write_base(base | BASE_ENABLE | 1, FEATURES), gp);
        assert_eq!(apic.write_base(base | BASE_ENABLE | 1 << 9, FEATURES), gp);
        assert_eq!(apic.write_base(base | BASE_ENABLE | 1 << 40, FEATURES), gp);
        let no_x2apic = ApicFeatures {
            x2apic: false,
            ..FEATURES
        };
        assert_eq!(
            apic.write_base(base | BASE_ENABLE | BASE_EXTD, no_x2apic),
            gp
        );
        // Relocation moves the page.
        assert_eq!(
            apic.write_base(0xFED4_0000 | BASE_BSP | BASE_ENABLE, FEATURES),
            Ok(ApicEffect::BaseChanged)
        );
        assert_eq!(apic.mmio_base(), Some(0xFED4_0000));
    }

    #[test]
    fn disabling_the_apic_resets_it_and_restores_its_id() {
        let mut apic = enabled_apic(1);
        write(&mut apic, reg::ID, 9 << 24);
        write(&mut apic, reg::TPR, 0x20);
        apic.accept(0x40, false);
        // reset_apic(): disable, enable, SVR = 0x1FF.
        apic.write_base(DEFAULT_BASE, FEATURES).unwrap();
        assert_eq!(
            apic.mmio_read(0x30, 4, 0, TIMING),
            0xFFFF_FFFF,
            "a disabled APIC's page is unbacked"
        );
        apic.write_base(DEFAULT_BASE | BASE_ENABLE, FEATURES)
            .unwrap();
        assert_eq!(read(&mut apic, reg::ID), 1 << 24);
        assert_eq!(read(&mut apic, reg::TPR), 0);
        assert!(!apic.irr_bit(0x40));
        assert_eq!(read(&mut apic, reg::SVR), 0xFF);
    }

    #[test]
    fn software_disable_masks_every_lvt() {
        let mut apic = enabled_apic(0);
        write(&mut apic, reg::LVT_LINT0, 0x700);
        assert_eq!(read(&mut apic, reg::LVT_LINT0), 0x700);
        assert!(apic.accepts_extint());
        write(&mut apic, reg::SVR, 0xFF);
        assert_eq!(read(&mut apic, reg::LVT_LINT0), 0x700 | LVT_MASKED);
        write(&mut apic, reg::LVT_LINT0, 0x700);
        assert_eq!(
            read(&mut apic, reg::LVT_LINT0),
            0x700 | LVT_MASKED,
            "cannot unmask while disabled"
        );
        assert!(!apic.accepts_extint());
        assert!(LocalApic::new_virtual_wire(0).accepts_extint());
        assert_eq!(LocalApic::new_virtual_wire(0).lint1_is_nmi(), Some(true));
    }

    #[test]
    fn one_shot_timer_counts_down_by_the_divider() {
        let mut apic = enabled_apic(0);
        write(&mut apic, reg::LVT_TIMER, 0xEE);
        write(&mut apic, reg::TDCR, 0x0); // divide by 2
        write_at(&mut apic, reg::TMICT, 1000, 0);
        // 1000 bus ticks x 2 = 2000 ns = 4000 host ticks at 2 GHz.
        assert_eq!(apic.timer_deadline(TIMING), Some(4000));
        assert_eq!(read_at(&mut apic, reg::TMCCT, 0), 1000);
        assert_eq!(read_at(&mut apic, reg::TMCCT, 2000), 500, "half way");
        assert!(!apic.advance_timer(3999, TIMING));
        assert!(apic.advance_timer(4000, TIMING));
        assert_eq!(apic.acknowledge(), Some(0xEE));
        assert_eq!(read_at(&mut apic, reg::TMCCT, 5000), 0);
        assert_eq!(apic.timer_deadline(TIMING), None, "one-shot: once");
        assert!(!apic.advance_timer(1 << 40, TIMING));
        // Divide by 1 (code 0b1011).
        write(&mut apic, reg::TDCR, 0xB);
        write_at(&mut apic, reg::TMICT, 1000, 10_000);
        assert_eq!(apic.timer_deadline(TIMING), Some(12_000));
        // TMICT 0 stops it.
        write_at(&mut apic, reg::TMICT, 0, 10_500);
        assert_eq!(apic.timer_deadline(TIMING), None);
    }

    #[test]
    fn periodic_timer_reloads_and_coalesces_missed_periods() {
        let mut apic = enabled_apic(0);
        write(&mut apic, reg::TDCR, 0xB);
        write(&mut apic, reg::LVT_TIMER, 1 << 17 | 0x40);
        write_at(&mut apic, reg::TMICT, 100, 0); // 200 host ticks
        assert!(apic.advance_timer(200, TIMING));
        assert_eq!(apic.timer_deadline(TIMING), Some(400));
        assert_eq!(apic.acknowledge(), Some(0x40));
        write(&mut apic, reg::EOI, 0);
        assert!(
            apic.advance_timer(1050, TIMING),
            "several periods late: one interrupt"
        );
        assert_eq!(apic.timer_deadline(TIMING), Some(1200));
        assert_eq!(read_at(&mut apic, reg::TMCCT, 1100), 50);
        // Masked: keeps counting, delivers nothing.
        write(&mut apic, reg::LVT_TIMER, 1 << 17 | LVT_MASKED | 0x40);
        apic.acknowledge();
        assert!(!apic.advance_timer(1200, TIMING));
        assert_eq!(apic.timer_deadline(TIMING), Some(1400));
    }

    #[test]
    fn mode_changes_keep_the_count_as_kvm_unit_tests_expect() {
        // apic.c test_apic_change_mode.
        let mut apic = enabled_apic(0);
        write(&mut apic, reg::TDCR, 0xB);
        let tmict = 1000;
        write_at(&mut apic, reg::TMICT, tmict, 0);
        write_at(&mut apic, reg::LVT_TIMER, 1 << 17 | LVT_MASKED, 0);
        assert_eq!(
            read(&mut apic, reg::TMICT),
            tmict,
            "TMICT survives a mode change"
        );
        write_at(&mut apic, reg::LVT_TIMER, LVT_MASKED, 0);
        write_at(&mut apic, reg::TMICT, tmict, 0);
        assert_ne!(read_at(&mut apic, reg::TMCCT, 0), 0);
        assert_eq!(
            read_at(&mut apic, reg::TMCCT, 2000),
            0,
            "one-shot reached zero"
        );
        // Re-armed one-shot at half way switched to periodic: goes on from
        // below half, then reloads to TMICT.
        write_at(&mut apic, reg::TMICT, tmict, 3000);
        write_at(&mut apic, reg::LVT_TIMER, 1 << 17 | LVT_MASKED, 4200);
        let count = read_at(&mut apic, reg::TMCCT, 4200);
        assert!(count > 0 && count < tmict / 2, "{count}");
        assert!(
            read_at(&mut apic, reg::TMCCT, 5100) > tmict / 2,
            "wrapped around to TMICT"
        );
        // Periodic at half way switched to one-shot: down to zero, stays.
        write_at(&mut apic, reg::LVT_TIMER, LVT_MASKED, 6200);
        assert!(read_at(&mut apic, reg::TMCCT, 6200) < tmict / 2);
        assert_eq!(read_at(&mut apic, reg::TMCCT, 7100), 0);
        write_at(&mut apic, reg::LVT_TIMER, 1 << 17 | LVT_MASKED, 7200);
        assert_eq!(
            read_at(&mut apic, reg::TMCCT, 7300),
            0,
            "stays at zero in periodic mode"
        );
    }

    #[test]
    fn tsc_deadline_fires_when_time_passes_it() {
        let mut apic = enabled_apic(0);
        apic.set_tsc_offset(1_000_000);
        write(&mut apic, reg::LVT_TIMER, 2 << 17 | 0xEF);
        // Guest TSC = host + 1_000_000. Deadline at guest 1_005_000 = host 5000.
        assert!(!apic.write_tsc_deadline(1_005_000, 0, TIMING));
        assert_eq!(apic.read_tsc_deadline(), 1_005_000);
        assert_eq!(apic.timer_deadline(TIMING), Some(5000));
        assert!(!apic.advance_timer(4999, TIMING));
        assert!(apic.advance_timer(5000, TIMING));
        assert_eq!(apic.acknowledge(), Some(0xEF));
        assert_eq!(apic.read_tsc_deadline(), 0, "reads 0 once fired");
        // A deadline already passed fires at once (vmexit_tscdeadline_immed).
        assert!(apic.write_tsc_deadline(1_006_000, 6000, TIMING));
        // TMICT is ignored in this mode; 0 disarms.
        write_at(&mut apic, reg::TMICT, 10, 7000);
        assert_eq!(read(&mut apic, reg::TMICT), 0);
        apic.write_tsc_deadline(2_000_000, 7000, TIMING);
        apic.write_tsc_deadline(0, 7000, TIMING);
        assert_eq!(apic.timer_deadline(TIMING), None);
        // Leaving TSC-deadline mode disarms; writes are then ignored.
        apic.write_tsc_deadline(2_000_000, 7000, TIMING);
        write(&mut apic, reg::LVT_TIMER, 0xEF);
        assert_eq!(apic.read_tsc_deadline(), 0);
        assert!(!apic.write_tsc_deadline(1, 8000, TIMING));
        // Without the feature, mode 2 cannot be selected.
        let no_tscdl = ApicFeatures {
            tsc_deadline: false,
            ..FEATURES
        };
        apic.mmio_write(
            u64::from(reg::LVT_TIMER),
            4,
            2 << 17 | 0xEF,
            0,
            TIMING,
            no_tscdl,
        );
        assert_eq!(read(&mut apic, reg::LVT_TIMER), 0xEF);
    }

    #[test]
    fn mmio_accesses_other_than_aligned_dwords() {
        let mut apic = enabled_apic(2);
        assert_eq!(
            apic.mmio_read(0x23, 1, 0, TIMING),
            2,
            "a byte of the ID register"
        );
        assert_eq!(
            apic.mmio_read(0x24, 4, 0, TIMING),
            0,
            "past the register's dword"
        );
        apic.mmio_write(0x80, 1, 0x50, 0, TIMING, FEATURES);
        assert_eq!(read(&mut apic, reg::TPR), 0, "byte writes are dropped");
        assert_eq!(apic.mmio_read(0x400, 4, 0, TIMING), 0, "no register");
    }
}
