//! One guest's virtual platform: its devices, its vCPUs' local APICs and
//! run states, and the decisions about which event each vCPU takes next.
//!
//! The kernel owns one [`Platform`] per guest, behind a lock shared by the
//! guest's vCPUs (every method is short, allocation-free and never blocks),
//! and calls it from its exit handlers; see the crate documentation for
//! what each exit kind calls. Every call that can make another vCPU's state
//! change returns [`Effects`], whose `kick` set names the vCPUs to wake or
//! to interrupt out of guest mode so that they look again.

use core::fmt;

use crate::acpi_pm::{self, AcpiPm};
use crate::cpuid::{CpuidPolicy, CpuidResult, GuestFeatures, HostCpuid, VcpuCpuidState};
use crate::debug_exit::{self, GuestExit};
use crate::fw_cfg::{self, FwCfg};
use crate::ioapic::{self, IoApic};
use crate::lapic::{
    ApicEffect, ApicFeatures, ApicMode, ApicTiming, DeliveryMode, Ipi, LocalApic, Shorthand,
};
use crate::memory::GpaRange;
use crate::msr::{self, MsrClass};
use crate::pci::{self, PciNoDevices};
use crate::pic::{self, DualPic};
use crate::pit::{self, Pit};
use crate::testdev::{self, PcTestdev};
use crate::time::Clock;
use crate::uart::{self, ConsoleSink, Uart16550};

/// Most vCPUs a guest may have.
pub const MAX_VCPUS: usize = 64;

/// The physical window the platform decodes beyond RAM: the I/O APIC at
/// its start, the local APIC at 0xFEE0_0000 (and wherever a guest moves it
/// inside). Accesses there that no device claims read all ones and write
/// nothing, as on a PC; accesses outside RAM and outside it are errors.
pub const APIC_WINDOW: GpaRange = GpaRange::new(0xFEC0_0000, 0xFF00_0000);

/// A set of vCPUs, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VcpuSet(u64);

impl VcpuSet {
    /// No vCPU.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Adds `vcpu`.
    pub fn insert(&mut self, vcpu: usize) {
        if vcpu < MAX_VCPUS {
            self.0 |= 1 << vcpu;
        }
    }

    /// Whether `vcpu` is in.
    pub fn contains(&self, vcpu: usize) -> bool {
        vcpu < MAX_VCPUS && self.0 & (1 << vcpu) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The vCPUs in it, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_VCPUS).filter(|&i| self.contains(i))
    }

    /// Adds every vCPU of `other`.
    pub fn extend(&mut self, other: VcpuSet) {
        self.0 |= other.0;
    }

    /// The raw bitmap (bit n = vCPU n).
    pub fn bits(&self) -> u64 {
        self.0
    }
}

/// Why a guest stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// It wrote its exit status to the debug-exit port.
    Exit(GuestExit),
    /// A vCPU triple-faulted (reported by the kernel).
    TripleFault {
        /// The vCPU.
        vcpu: usize,
    },
    /// A reset was requested: INIT to the boot vCPU, port 0xCF9 or the
    /// keyboard controller. There is no firmware to reset into.
    Reset {
        /// The vCPU that asked.
        vcpu: usize,
    },
}

/// What a platform call changed beyond the calling vCPU's registers.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Effects {
    /// vCPUs with a new event (interrupt, NMI, INIT, SIPI): wake them if
    /// parked, interrupt them out of guest mode if running elsewhere. May
    /// include the caller, which looks at its events before its next entry
    /// anyway.
    pub kick: VcpuSet,
    /// The guest must stop: every vCPU leaves guest mode and is not entered
    /// again.
    pub stop: Option<StopReason>,
    /// The caller's xAPIC page moved or appeared/disappeared
    /// ([`Platform::apic_mmio_base`]).
    pub apic_page_moved: bool,
    /// The caller's TSC offset changed ([`Platform::tsc_offset`]).
    pub tsc_offset_changed: bool,
}

/// A vCPU's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Runs.
    Running,
    /// Executed HLT; waits for an event it can take.
    Halted,
    /// Got INIT (or never started): waits for a SIPI.
    WaitForSipi,
    /// Got a SIPI with this vector: the kernel loads
    /// [`crate::cpu_state::SipiStartState`] ([`Platform::take_start`]).
    Startup(u8),
}

/// The vCPU's interruptibility at a VM entry, read from its VMCS (or VMCB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InterruptState {
    /// RFLAGS.IF.
    pub interrupts_enabled: bool,
    /// Blocking by STI (the instruction after STI).
    pub blocked_by_sti: bool,
    /// Blocking by MOV SS / POP SS.
    pub blocked_by_mov_ss: bool,
    /// Blocking by NMI (in an NMI handler until IRET).
    pub blocked_by_nmi: bool,
    /// The backend is already injecting an event on this entry (one that
    /// an exit interrupted during delivery): nothing else can go in.
    pub event_pending: bool,
}

/// An event to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A non-maskable interrupt.
    Nmi,
    /// An external interrupt; the platform already acknowledged it (it is
    /// in the local APIC's ISR, or the 8259's): it must be delivered.
    Interrupt(u8),
}

/// What to do at a VM entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventDecision {
    /// Inject this.
    pub inject: Option<Event>,
    /// An interrupt waits for the guest to become interruptible: exit as
    /// soon as it is (VMX interrupt-window exiting, SVM VINTR).
    pub interrupt_window: bool,
    /// An NMI waits for NMI blocking to end (VMX NMI-window exiting, SVM
    /// IRET interception).
    pub nmi_window: bool,
    /// The priority class (vector bits 7:4) of the highest interrupt TPR
    /// holds back, 0 if none: with a TPR shadow, exit when TPR drops below
    /// it (VMX TPR threshold).
    pub tpr_threshold: u8,
}

/// Why a platform MMIO access failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioError {
    /// Neither RAM nor a device: the guest touched memory it does not have.
    Unclaimed(u64),
    /// An access size other than 1, 2, 4, 8.
    BadSize(u8),
}

/// An MSR access that faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrFault {
    /// #GP(0).
    GeneralProtection,
}

/// Why a platform cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// No vCPU, or more than [`MAX_VCPUS`].
    VcpuCount(usize),
    /// A zero TSC or APIC bus rate.
    ZeroRate,
    /// `features.vcpus` differs from `vcpus`.
    FeaturesMismatch,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::VcpuCount(n) => write!(f, "{n} vCPUs: between 1 and {MAX_VCPUS} are possible"),
            Self::ZeroRate => write!(f, "a clock rate of zero"),
            Self::FeaturesMismatch => write!(f, "CPUID features describe another vCPU count"),
        }
    }
}

/// A guest's platform configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlatformConfig {
    /// Number of vCPUs; vCPU n has APIC ID n, vCPU 0 boots.
    pub vcpus: usize,
    /// RAM size (fw_cfg reports it).
    pub ram_bytes: u64,
    /// Host TSC rate, the unit of [`Clock::now`].
    pub tsc_hz: u64,
    /// The APIC timer's input clock.
    pub apic_bus_hz: u64,
    /// What CPUID and the MSR policy offer.
    pub features: GuestFeatures,
    /// MAXPHYADDR the guest sees.
    pub phys_addr_bits: u8,
}

impl PlatformConfig {
    /// `vcpus` vCPUs with everything offered, `ram_bytes` of RAM, a host
    /// TSC of `tsc_hz`; the APIC timer at 1 GHz as under KVM and QEMU, or
    /// at the TSC's rate if that is slower (kvm-unit-tests' `apic` checks
    /// that a timer interval takes at least as many TSC ticks).
    pub const fn new(vcpus: usize, ram_bytes: u64, tsc_hz: u64) -> Self {
        let bus = if tsc_hz < 1_000_000_000 {
            tsc_hz
        } else {
            1_000_000_000
        };
        Self {
            vcpus,
            ram_bytes,
            tsc_hz,
            apic_bus_hz: bus,
            features: GuestFeatures::new(vcpus as u32),
            phys_addr_bits: 39,
        }
    }
}

/// Port-I/O and MMIO accesses no device claimed, for the run report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unclaimed {
    /// Port reads answered with all ones.
    pub port_reads: u64,
    /// Port writes dropped.
    pub port_writes: u64,
    /// The last such port.
    pub last_port: u16,
    /// Accesses to the APIC window no device claimed.
    pub mmio: u64,
}

#[derive(Debug, Clone)]
struct Vcpu {
    apic: LocalApic,
    state: RunState,
    nmi_pending: bool,
    /// RFLAGS.IF when it halted.
    halted_with_interrupts: bool,
    tsc_offset: u64,
    tsc_adjust: u64,
    misc_enable: u64,
}

/// One guest's platform. `C` gives the time, `S` takes its console lines.
///
/// About 16 KiB (64 local APICs): keep it where it lives (a static or a
/// frame of its own), not on a small stack.
pub struct Platform<C: Clock, S: ConsoleSink> {
    config: PlatformConfig,
    clock: C,
    sink: S,
    vcpus: [Vcpu; MAX_VCPUS],
    uart: Uart16550,
    fw_cfg: FwCfg,
    testdev: PcTestdev,
    pci: PciNoDevices,
    pm: AcpiPm,
    pic: DualPic,
    ioapic: IoApic,
    pit: Pit,
    stop: Option<StopReason>,
    unclaimed: Unclaimed,
}

impl<C: Clock, S: ConsoleSink> fmt::Debug for Platform<C, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct States<'a>(&'a [Vcpu]);
        impl fmt::Debug for States<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list()
                    .entries(self.0.iter().map(|v| v.state))
                    .finish()
            }
        }
        f.debug_struct("Platform")
            .field("config", &self.config)
            .field("states", &States(&self.vcpus[..self.config.vcpus]))
            .field("stop", &self.stop)
            .field("unclaimed", &self.unclaimed)
            .finish_non_exhaustive()
    }
}

const CMOS_RESET_PORT: u16 = 0xCF9;
const KEYBOARD_COMMAND_PORT: u16 = 0x64;

impl<C: Clock, S: ConsoleSink> Platform<C, S> {
    /// A platform with every vCPU at power-on: vCPU 0 running, its APIC as
    /// firmware leaves it (virtual wire), the others waiting for a SIPI.
    pub fn new(config: PlatformConfig, clock: C, sink: S) -> Result<Self, ConfigError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(config.vcpus));
        }
        if config.tsc_hz == 0 || config.apic_bus_hz == 0 {
            return Err(ConfigError::ZeroRate);
        }
        if config.features.vcpus as usize != config.vcpus {
            return Err(ConfigError::FeaturesMismatch);
        }
        let vcpus = core::array::from_fn(|i| Vcpu {
            apic: if i == 0 {
                LocalApic::new_virtual_wire(0)
            } else {
                LocalApic::new(i as u32, false)
            },
            state: if i == 0 {
                RunState::Running
            } else {
                RunState::WaitForSipi
            },
            nmi_pending: false,
            halted_with_interrupts: false,
            tsc_offset: 0,
            tsc_adjust: 0,
            misc_enable: msr::MISC_ENABLE_DEFAULT,
        });
        Ok(Self {
            config,
            clock,
            sink,
            vcpus,
            uart: Uart16550::new(),
            fw_cfg: FwCfg::new(config.vcpus as u16, config.ram_bytes),
            testdev: PcTestdev::default(),
            pci: PciNoDevices::default(),
            pm: AcpiPm::new(),
            pic: DualPic::new(),
            ioapic: IoApic::new(),
            pit: Pit::new(config.tsc_hz),
            stop: None,
            unclaimed: Unclaimed::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PlatformConfig {
        &self.config
    }

    /// The console sink (e.g. to read what it gathered).
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Why the guest stopped, once it did.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// Unclaimed accesses so far.
    pub fn unclaimed(&self) -> Unclaimed {
        self.unclaimed
    }

    /// vCPU `vcpu`'s run state.
    pub fn run_state(&self, vcpu: usize) -> RunState {
        self.vcpus[vcpu].state
    }

    /// vCPU `vcpu`'s local APIC (diagnostics, tests).
    pub fn apic(&self, vcpu: usize) -> &LocalApic {
        &self.vcpus[vcpu].apic
    }

    fn timing(&self) -> ApicTiming {
        ApicTiming {
            tsc_hz: self.config.tsc_hz,
            bus_hz: self.config.apic_bus_hz,
        }
    }

    fn apic_features(&self) -> ApicFeatures {
        ApicFeatures {
            x2apic: self.config.features.x2apic,
            tsc_deadline: self.config.features.tsc_deadline,
            phys_addr_bits: self.config.phys_addr_bits,
        }
    }

    fn stop_with(&mut self, reason: StopReason, fx: &mut Effects) {
        if self.stop.is_none() {
            self.stop = Some(reason);
            // The guest's last words, if it stopped mid-line.
            self.uart.flush(&mut self.sink);
        }
        fx.stop = self.stop;
    }

    /// The kernel saw a triple fault (or shutdown) on `vcpu`: the guest
    /// stops.
    pub fn triple_fault(&mut self, vcpu: usize) -> Effects {
        let mut fx = Effects::default();
        self.stop_with(StopReason::TripleFault { vcpu }, &mut fx);
        fx
    }

    // ----- Port I/O -----

    /// An `IN` of `size` bytes (1, 2, 4) from `port` by `vcpu`. Ports no
    /// device claims read all ones.
    pub fn io_in(&mut self, vcpu: usize, port: u16, size: u8) -> u32 {
        let _ = vcpu;
        let now = self.clock.now();
        match port {
            pci::ADDRESS_PORT..=0xCFF => self.pci.read(port, size),
            acpi_pm::PM1A_EVT_PORT..=0x60B => self.pm.read(port, size, now, self.config.tsc_hz),
            testdev::DATA_PORT..=0xE3 => self.testdev.read_data(port - testdev::DATA_PORT, size),
            _ => {
                // Byte-wide devices: a wider access reads consecutive ports.
                let mut value = 0u32;
                for i in 0..u16::from(size.min(4)) {
                    value |= u32::from(self.byte_in(port.wrapping_add(i), now)) << (8 * i);
                }
                value
            }
        }
    }

    fn byte_in(&mut self, port: u16, now: u64) -> u8 {
        match port {
            uart::COM1..=0x3FF => self.uart.read(port - uart::COM1),
            pic::MASTER_COMMAND
            | pic::MASTER_DATA
            | pic::SLAVE_COMMAND
            | pic::SLAVE_DATA
            | pic::ELCR_MASTER
            | pic::ELCR_SLAVE => self.pic.read(port),
            pit::CHANNEL0_PORT..=pit::COMMAND_PORT | pit::PORT_B => self.pit.read(port, now),
            fw_cfg::DATA_PORT => self.fw_cfg.read_data(),
            fw_cfg::SELECTOR_PORT => 0,
            debug_exit::PORT..=0xF7 => 0,
            testdev::FLUSH_PAGE_PORT..=0xE7 => 0,
            testdev::IRQ_PORT..=0x2017 => 0,
            _ => {
                self.unclaimed.port_reads += 1;
                self.unclaimed.last_port = port;
                0xFF
            }
        }
    }

    /// An `OUT` of `size` bytes of `value` to `port` by `vcpu`.
    pub fn io_out(&mut self, vcpu: usize, port: u16, size: u8, value: u32) -> Effects {
        let mut fx = Effects::default();
        let now = self.clock.now();
        match port {
            debug_exit::PORT..=0xF7 => {
                let value = value & pci::all_ones(size);
                self.stop_with(StopReason::Exit(GuestExit { value }), &mut fx);
            }
            pci::ADDRESS_PORT..=0xCFF if !(port == CMOS_RESET_PORT && size == 1) => {
                self.pci.write(port, size, value);
            }
            CMOS_RESET_PORT => {
                if value & 0x4 != 0 {
                    self.stop_with(StopReason::Reset { vcpu }, &mut fx);
                }
            }
            acpi_pm::PM1A_EVT_PORT..=0x60B => self.pm.write(port, size, value),
            testdev::DATA_PORT..=0xE3 => {
                self.testdev
                    .write_data(port - testdev::DATA_PORT, size, value)
            }
            // Under QEMU the page is unmapped from the guest to make the
            // next access fault; the guest sees no difference here.
            testdev::FLUSH_PAGE_PORT..=0xE7 => {}
            fw_cfg::SELECTOR_PORT => self.fw_cfg.select(value as u16),
            _ => {
                for i in 0..u16::from(size.min(4)) {
                    self.byte_out(
                        vcpu,
                        port.wrapping_add(i),
                        (value >> (8 * i)) as u8,
                        now,
                        &mut fx,
                    );
                }
            }
        }
        fx
    }

    fn byte_out(&mut self, vcpu: usize, port: u16, value: u8, now: u64, fx: &mut Effects) {
        match port {
            uart::COM1..=0x3FF => self.uart.write(port - uart::COM1, value, &mut self.sink),
            pic::MASTER_COMMAND
            | pic::MASTER_DATA
            | pic::SLAVE_COMMAND
            | pic::SLAVE_DATA
            | pic::ELCR_MASTER
            | pic::ELCR_SLAVE => {
                self.pic.write(port, value);
                self.check_extint(fx);
            }
            pit::CHANNEL0_PORT..=pit::COMMAND_PORT | pit::PORT_B => {
                self.pit.write(port, value, now)
            }
            testdev::IRQ_PORT..=0x2017 => {
                self.set_gsi((port - testdev::IRQ_PORT) as u8, value != 0, fx)
            }
            KEYBOARD_COMMAND_PORT if value == 0xFE => {
                self.stop_with(StopReason::Reset { vcpu }, fx)
            }
            // POST codes, Bochs' and QEMU's debug and shutdown ports.
            0x80 | 0x402 | 0xE9 | 0x8900 => {}
            _ => {
                self.unclaimed.port_writes += 1;
                self.unclaimed.last_port = port;
            }
        }
    }

    // ----- Interrupt routing -----

    /// Drives GSI `gsi` (ISA IRQs 0-15 and the I/O APIC's pins 0-23) to
    /// `level`. ISA IRQ 0 reaches I/O APIC pin 2, as the MADT's interrupt
    /// source override says.
    pub fn set_gsi(&mut self, gsi: u8, level: bool, fx: &mut Effects) {
        if gsi < 16 {
            self.pic.set_irq(gsi, level);
        }
        let pin = if gsi == 0 { 2 } else { usize::from(gsi) };
        self.ioapic.set_pin(pin, level);
        self.service_ioapic(fx);
        self.check_extint(fx);
    }

    fn check_extint(&self, fx: &mut Effects) {
        if self.pic.interrupt_pending() && self.vcpus[0].apic.accepts_extint() {
            fx.kick.insert(0);
        }
    }

    fn service_ioapic(&mut self, fx: &mut Effects) {
        while let Some(message) = self.ioapic.next_message() {
            let mut targets = VcpuSet::empty();
            for i in 0..self.config.vcpus {
                if self.vcpus[i].apic.matches(message.destination) {
                    targets.insert(i);
                }
            }
            self.deliver(
                targets,
                message.mode,
                message.vector,
                message.level_triggered,
                true,
                fx,
            );
        }
    }

    fn send_ipi(&mut self, from: usize, ipi: Ipi, fx: &mut Effects) {
        let mut targets = VcpuSet::empty();
        for i in 0..self.config.vcpus {
            let present = self.vcpus[i].apic.mode() != ApicMode::Disabled;
            let hit = match ipi.shorthand {
                Shorthand::SelfOnly => i == from,
                Shorthand::AllIncludingSelf => present,
                Shorthand::AllExcludingSelf => present && i != from,
                Shorthand::None => self.vcpus[i].apic.matches(ipi.destination),
            };
            if hit {
                targets.insert(i);
            }
        }
        self.deliver(
            targets,
            ipi.mode,
            ipi.vector,
            ipi.level_triggered,
            ipi.assert,
            fx,
        );
    }

    fn deliver(
        &mut self,
        targets: VcpuSet,
        mode: DeliveryMode,
        vector: u8,
        level_triggered: bool,
        assert: bool,
        fx: &mut Effects,
    ) {
        match mode {
            DeliveryMode::Fixed => {
                // A level-triggered de-assert message carries no interrupt.
                if level_triggered && !assert {
                    return;
                }
                for t in targets.iter() {
                    if self.vcpus[t].apic.accept(vector, level_triggered) {
                        fx.kick.insert(t);
                    }
                }
            }
            DeliveryMode::LowestPriority => {
                if level_triggered && !assert {
                    return;
                }
                let chosen = targets
                    .iter()
                    .filter(|&t| self.vcpus[t].apic.enabled())
                    .min_by_key(|&t| self.vcpus[t].apic.ppr());
                if let Some(t) = chosen
                    && self.vcpus[t].apic.accept(vector, level_triggered)
                {
                    fx.kick.insert(t);
                }
            }
            DeliveryMode::Nmi => {
                for t in targets.iter() {
                    self.vcpus[t].nmi_pending = true;
                    fx.kick.insert(t);
                }
            }
            DeliveryMode::Init => {
                // INIT level de-assert only synchronizes arbitration IDs.
                if level_triggered && !assert {
                    return;
                }
                for t in targets.iter() {
                    if t == 0 {
                        // The boot vCPU would restart at the reset vector,
                        // and there is no firmware there.
                        self.stop_with(StopReason::Reset { vcpu: t }, fx);
                        continue;
                    }
                    let v = &mut self.vcpus[t];
                    v.apic.reset();
                    v.state = RunState::WaitForSipi;
                    v.nmi_pending = false;
                    fx.kick.insert(t);
                }
            }
            DeliveryMode::StartUp => {
                for t in targets.iter() {
                    let v = &mut self.vcpus[t];
                    if v.state == RunState::WaitForSipi {
                        v.state = RunState::Startup(vector);
                        fx.kick.insert(t);
                    }
                }
            }
            DeliveryMode::Smi | DeliveryMode::ExtInt | DeliveryMode::Reserved => {}
        }
    }

    fn apply_apic_effect(&mut self, vcpu: usize, effect: ApicEffect, fx: &mut Effects) {
        match effect {
            ApicEffect::None => {}
            ApicEffect::SendIpi(ipi) => self.send_ipi(vcpu, ipi, fx),
            ApicEffect::LevelEoi(vector) => {
                self.ioapic.eoi(vector);
                self.service_ioapic(fx);
            }
            ApicEffect::BaseChanged => fx.apic_page_moved = true,
        }
    }

    /// Pulses NMI on every vCPU's LINT1, as a BMC's NMI button does: an NMI
    /// where LVT LINT1 is an unmasked NMI entry or the APIC is disabled.
    pub fn nmi_button(&mut self) -> Effects {
        let mut fx = Effects::default();
        for i in 0..self.config.vcpus {
            if self.vcpus[i].apic.lint1_is_nmi() != Some(false) {
                self.vcpus[i].nmi_pending = true;
                fx.kick.insert(i);
            }
        }
        fx
    }

    // ----- MMIO -----

    /// Guest-physical address of `vcpu`'s xAPIC page, while in xAPIC mode.
    pub fn apic_mmio_base(&self, vcpu: usize) -> Option<u64> {
        self.vcpus[vcpu].apic.mmio_base()
    }

    /// Whether `gpa` is platform MMIO for `vcpu` (the kernel must trap it,
    /// not map RAM there).
    pub fn claims(&self, vcpu: usize, gpa: u64) -> bool {
        APIC_WINDOW.contains(gpa)
            || self
                .apic_mmio_base(vcpu)
                .is_some_and(|base| gpa & !0xFFF == base)
    }

    fn check_size(size: u8) -> Result<(), MmioError> {
        match size {
            1 | 2 | 4 | 8 => Ok(()),
            _ => Err(MmioError::BadSize(size)),
        }
    }

    /// A read of `size` bytes at `gpa` by `vcpu` (an EPT violation outside
    /// RAM).
    pub fn mmio_read(&mut self, vcpu: usize, gpa: u64, size: u8) -> Result<u64, MmioError> {
        Self::check_size(size)?;
        let now = self.clock.now();
        let timing = self.timing();
        if self
            .apic_mmio_base(vcpu)
            .is_some_and(|base| gpa & !0xFFF == base)
        {
            return Ok(self.vcpus[vcpu]
                .apic
                .mmio_read(gpa & 0xFFF, size, now, timing));
        }
        if gpa & !0xFFF == ioapic::BASE {
            return Ok(u64::from(self.ioapic.mmio_read(gpa & 0xFFF, size)));
        }
        if APIC_WINDOW.contains(gpa) {
            self.unclaimed.mmio += 1;
            return Ok(u64::from(pci::all_ones(size.min(4))) | if size == 8 { u64::MAX } else { 0 });
        }
        Err(MmioError::Unclaimed(gpa))
    }

    /// A write of `size` bytes of `value` at `gpa` by `vcpu`.
    pub fn mmio_write(
        &mut self,
        vcpu: usize,
        gpa: u64,
        size: u8,
        value: u64,
    ) -> Result<Effects, MmioError> {
        Self::check_size(size)?;
        let mut fx = Effects::default();
        let now = self.clock.now();
        let timing = self.timing();
        let features = self.apic_features();
        if self
            .apic_mmio_base(vcpu)
            .is_some_and(|base| gpa & !0xFFF == base)
        {
            let effect =
                self.vcpus[vcpu]
                    .apic
                    .mmio_write(gpa & 0xFFF, size, value, now, timing, features);
            self.apply_apic_effect(vcpu, effect, &mut fx);
            return Ok(fx);
        }
        if gpa & !0xFFF == ioapic::BASE {
            self.ioapic.mmio_write(gpa & 0xFFF, size, value as u32);
            self.service_ioapic(&mut fx);
            return Ok(fx);
        }
        if APIC_WINDOW.contains(gpa) {
            self.unclaimed.mmio += 1;
            return Ok(fx);
        }
        Err(MmioError::Unclaimed(gpa))
    }

    // ----- MSRs, CR8, CPUID -----

    /// The policy class of `msr`: the kernel calls [`Self::rdmsr`] and
    /// [`Self::wrmsr`] for [`MsrClass::Platform`] ones.
    pub fn msr_class(&self, msr: u32) -> MsrClass {
        msr::classify(msr, &self.config.features)
    }

    /// RDMSR of a platform MSR.
    pub fn rdmsr(&mut self, vcpu: usize, msr: u32) -> Result<u64, MsrFault> {
        if self.msr_class(msr) != MsrClass::Platform {
            return Err(MsrFault::GeneralProtection);
        }
        let now = self.clock.now();
        let timing = self.timing();
        let v = &mut self.vcpus[vcpu];
        match msr {
            msr::IA32_TSC => Ok(now.wrapping_add(v.tsc_offset)),
            msr::IA32_TSC_ADJUST => Ok(v.tsc_adjust),
            msr::IA32_APIC_BASE => Ok(v.apic.base()),
            msr::IA32_FEATURE_CONTROL => Ok(msr::FEATURE_CONTROL_VALUE),
            msr::IA32_BIOS_SIGN_ID => Ok(0),
            msr::IA32_MISC_ENABLE => Ok(v.misc_enable),
            msr::IA32_TSC_DEADLINE => Ok(v.apic.read_tsc_deadline()),
            // Counters that never count.
            msr::AMD_PERF_FIRST..=msr::AMD_PERF_LAST => Ok(0),
            _ => v
                .apic
                .read_msr(msr, now, timing)
                .map_err(|_| MsrFault::GeneralProtection),
        }
    }

    /// WRMSR of a platform MSR.
    pub fn wrmsr(&mut self, vcpu: usize, msr: u32, value: u64) -> Result<Effects, MsrFault> {
        if self.msr_class(msr) != MsrClass::Platform {
            return Err(MsrFault::GeneralProtection);
        }
        let mut fx = Effects::default();
        let now = self.clock.now();
        let timing = self.timing();
        let features = self.apic_features();
        let gp = Err(MsrFault::GeneralProtection);
        let v = &mut self.vcpus[vcpu];
        match msr {
            msr::IA32_TSC => {
                // Moving the TSC moves IA32_TSC_ADJUST by as much (SDM 18.17.3).
                let offset = value.wrapping_sub(now);
                v.tsc_adjust = v.tsc_adjust.wrapping_add(offset.wrapping_sub(v.tsc_offset));
                v.tsc_offset = offset;
                v.apic.set_tsc_offset(offset);
                fx.tsc_offset_changed = true;
            }
            msr::IA32_TSC_ADJUST => {
                v.tsc_offset = v.tsc_offset.wrapping_add(value.wrapping_sub(v.tsc_adjust));
                v.tsc_adjust = value;
                v.apic.set_tsc_offset(v.tsc_offset);
                fx.tsc_offset_changed = true;
            }
            msr::IA32_APIC_BASE => {
                let effect = v
                    .apic
                    .write_base(value, features)
                    .map_err(|_| MsrFault::GeneralProtection)?;
                self.apply_apic_effect(vcpu, effect, &mut fx);
            }
            msr::IA32_FEATURE_CONTROL => return gp,
            msr::IA32_BIOS_SIGN_ID => {}
            msr::IA32_MISC_ENABLE => {
                v.misc_enable = (v.misc_enable & !msr::MISC_ENABLE_WRITABLE)
                    | (value & msr::MISC_ENABLE_WRITABLE);
            }
            msr::IA32_TSC_DEADLINE => {
                if v.apic.write_tsc_deadline(value, now, timing) {
                    fx.kick.insert(vcpu);
                }
            }
            msr::AMD_PERF_FIRST..=msr::AMD_PERF_LAST => {}
            _ => {
                let effect = v
                    .apic
                    .write_msr(msr, value, now, timing, features)
                    .map_err(|_| MsrFault::GeneralProtection)?;
                self.apply_apic_effect(vcpu, effect, &mut fx);
            }
        }
        Ok(fx)
    }

    /// `vcpu`'s TSC offset: guest TSC = host TSC + offset (wrapping).
    pub fn tsc_offset(&self, vcpu: usize) -> u64 {
        self.vcpus[vcpu].tsc_offset
    }

    /// MOV from CR8.
    pub fn read_cr8(&self, vcpu: usize) -> u64 {
        self.vcpus[vcpu].apic.cr8()
    }

    /// MOV to CR8 (reserved bits: #GP).
    pub fn write_cr8(&mut self, vcpu: usize, value: u64) -> Result<(), MsrFault> {
        self.vcpus[vcpu]
            .apic
            .write_cr8(value)
            .map_err(|_| MsrFault::GeneralProtection)
    }

    /// The guest's CPUID(`leaf`, `subleaf`) on `vcpu`, whose CR4 and XCR0
    /// the kernel passes.
    pub fn cpuid(
        &self,
        vcpu: usize,
        leaf: u32,
        subleaf: u32,
        host: &dyn HostCpuid,
        cr4: u64,
        xcr0: u64,
    ) -> CpuidResult {
        let apic = &self.vcpus[vcpu].apic;
        let state = VcpuCpuidState {
            apic_id: apic.initial_id(),
            apic_enabled: apic.mode() != ApicMode::Disabled,
            cr4,
            xcr0,
        };
        CpuidPolicy::new(self.config.features).query(host, leaf, subleaf, state)
    }

    // ----- Run states and events -----

    /// Decides the event for `vcpu`'s next VM entry, given its
    /// interruptibility. An interrupt the decision injects is acknowledged
    /// here (IRR to ISR): the kernel must deliver it, re-injecting it if
    /// the entry's delivery is interrupted by an exit.
    pub fn next_event(&mut self, vcpu: usize, state: InterruptState) -> EventDecision {
        let now = self.clock.now();
        let timing = self.timing();
        let extint =
            vcpu == 0 && self.pic.interrupt_pending() && self.vcpus[0].apic.accepts_extint();
        let v = &mut self.vcpus[vcpu];
        v.apic.advance_timer(now, timing);
        let mut decision = EventDecision::default();
        let shadow = state.blocked_by_sti || state.blocked_by_mov_ss || state.event_pending;
        if v.nmi_pending {
            if shadow || state.blocked_by_nmi {
                decision.nmi_window = true;
            } else {
                v.nmi_pending = false;
                decision.inject = Some(Event::Nmi);
            }
        }
        let apic_interrupt = v.apic.deliverable().is_some();
        if extint || apic_interrupt {
            if decision.inject.is_none() && state.interrupts_enabled && !shadow {
                // ExtINT bypasses the local APIC's priorities.
                let vector = if extint {
                    self.pic.acknowledge()
                } else {
                    // Present: `deliverable` just said so.
                    self.vcpus[vcpu].apic.acknowledge().unwrap_or(0)
                };
                decision.inject = Some(Event::Interrupt(vector));
            } else {
                decision.interrupt_window = true;
            }
        }
        let apic = &self.vcpus[vcpu].apic;
        if let Some(requested) = apic.highest_requested()
            && apic.deliverable().is_none()
            && requested >> 4 <= apic.tpr() >> 4
        {
            decision.tpr_threshold = requested >> 4;
        }
        decision
    }

    fn wake_pending(&self, vcpu: usize, interrupts_enabled: bool) -> bool {
        let v = &self.vcpus[vcpu];
        let extint = vcpu == 0 && self.pic.interrupt_pending() && v.apic.accepts_extint();
        v.nmi_pending || (interrupts_enabled && (extint || v.apic.deliverable().is_some()))
    }

    /// The guest executed HLT on `vcpu` (the kernel advanced RIP past it).
    /// Returns true when the vCPU now sleeps (the kernel parks it until a
    /// kick or its [`Self::next_deadline`]); false when an event it can
    /// take is already pending and it goes on.
    pub fn halt(&mut self, vcpu: usize, interrupts_enabled: bool) -> bool {
        let now = self.clock.now();
        let timing = self.timing();
        self.vcpus[vcpu].apic.advance_timer(now, timing);
        if self.wake_pending(vcpu, interrupts_enabled) {
            return false;
        }
        let v = &mut self.vcpus[vcpu];
        v.state = RunState::Halted;
        v.halted_with_interrupts = interrupts_enabled;
        true
    }

    /// Whether `vcpu` can be entered now; a halted vCPU with an event it
    /// can take becomes running. A vCPU in [`RunState::Startup`] is
    /// runnable once the kernel took its start state ([`Self::take_start`]).
    pub fn runnable(&mut self, vcpu: usize) -> bool {
        match self.vcpus[vcpu].state {
            RunState::Running | RunState::Startup(_) => self.stop.is_none(),
            RunState::WaitForSipi => false,
            RunState::Halted => {
                let now = self.clock.now();
                let timing = self.timing();
                self.vcpus[vcpu].apic.advance_timer(now, timing);
                let interrupts = self.vcpus[vcpu].halted_with_interrupts;
                if self.stop.is_none() && self.wake_pending(vcpu, interrupts) {
                    self.vcpus[vcpu].state = RunState::Running;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// A vCPU that got a SIPI: returns its start-up vector and marks it
    /// running. The kernel loads [`crate::cpu_state::SipiStartState`] for
    /// that vector before entering it.
    pub fn take_start(&mut self, vcpu: usize) -> Option<u8> {
        let v = &mut self.vcpus[vcpu];
        match v.state {
            RunState::Startup(vector) => {
                v.state = RunState::Running;
                Some(vector)
            }
            _ => None,
        }
    }

    /// When `vcpu`'s local APIC timer next fires (host TSC), if it runs:
    /// a parked vCPU must be looked at again by then.
    pub fn next_deadline(&self, vcpu: usize) -> Option<u64> {
        self.vcpus[vcpu].apic.timer_deadline(self.timing())
    }

    /// When the next platform-wide timer event is (the PIT's IRQ 0), if
    /// any: call [`Self::poll`] by then.
    pub fn next_platform_deadline(&self) -> Option<u64> {
        self.pit.irq0_deadline()
    }

    /// Brings every timer up to now; returns the vCPUs that got an event.
    pub fn poll(&mut self) -> VcpuSet {
        let now = self.clock.now();
        let timing = self.timing();
        let mut fx = Effects::default();
        for i in 0..self.config.vcpus {
            if self.vcpus[i].apic.advance_timer(now, timing) {
                fx.kick.insert(i);
            }
        }
        if self.pit.advance(now) {
            self.set_gsi(0, true, &mut fx);
            self.set_gsi(0, false, &mut fx);
        }
        fx.kick
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuid::fake::FakeHost;
    use crate::lapic::reg;
    use crate::time::fake::FakeClock;
    use crate::uart::fake::Lines;

    const TSC_HZ: u64 = 2_000_000_000;

    fn platform(vcpus: usize) -> (Platform<FakeClock, Lines>, FakeClock) {
        let clock = FakeClock::default();
        let config = PlatformConfig::new(vcpus, 64 << 20, TSC_HZ);
        (
            Platform::new(config, clock.clone(), Lines::default()).unwrap(),
            clock,
        )
    }

    const APIC: u64 = 0xFEE0_0000;

    fn apic_write(
        p: &mut Platform<FakeClock, Lines>,
        vcpu: usize,
        offset: u32,
        value: u32,
    ) -> Effects {
        p.mmio_write(vcpu, APIC + u64::from(offset), 4, u64::from(value))
            .unwrap()
    }

    fn apic_read(p: &mut Platform<FakeClock, Lines>, vcpu: usize, offset: u32) -> u32 {
        p.mmio_read(vcpu, APIC + u64::from(offset), 4).unwrap() as u32
    }

    fn open() -> InterruptState {
        InterruptState {
            interrupts_enabled: true,
            ..InterruptState::default()
        }
    }

    /// What cstart64.S and smp.c do to bring the APs up: reset_apic and
    /// enable_apic on the BSP, INIT and SIPI to all but self; then each AP
    /// starts at the vector and does its own reset_apic/enable_apic.
    fn boot_aps(p: &mut Platform<FakeClock, Lines>) {
        reset_and_enable(p, 0);
        let fx = apic_write(p, 0, reg::ICR, 0xC0000 | 0x500 | 0x4000);
        for ap in 1..p.config().vcpus {
            assert!(fx.kick.contains(ap));
            assert_eq!(p.run_state(ap), RunState::WaitForSipi);
        }
        let fx = apic_write(p, 0, reg::ICR, 0xC0000 | 0x600);
        for ap in 1..p.config().vcpus {
            assert!(fx.kick.contains(ap));
            assert_eq!(p.run_state(ap), RunState::Startup(0));
            assert!(p.runnable(ap));
            assert_eq!(p.take_start(ap), Some(0));
            assert_eq!(p.run_state(ap), RunState::Running);
            reset_and_enable(p, ap);
        }
        assert!(!fx.kick.contains(0));
    }

    fn reset_and_enable(p: &mut Platform<FakeClock, Lines>, vcpu: usize) {
        let base = p.rdmsr(vcpu, msr::IA32_APIC_BASE).unwrap();
        let fx = p
            .wrmsr(vcpu, msr::IA32_APIC_BASE, base & !(1 << 11 | 1 << 10))
            .unwrap();
        assert!(fx.apic_page_moved);
        let fx = p
            .wrmsr(vcpu, msr::IA32_APIC_BASE, (base & !(1 << 10)) | 1 << 11)
            .unwrap();
        assert!(fx.apic_page_moved);
        let _ = apic_write(p, vcpu, reg::SVR, 0x1FF);
    }

    #[test]
    fn amd_legacy_counters_read_zero_and_take_writes_where_offered() {
        let mut config = PlatformConfig::new(1, 64 << 20, TSC_HZ);
        let mut p = Platform::new(config, FakeClock::default(), Lines::default()).unwrap();
        assert_eq!(
            p.wrmsr(0, msr::AMD_PERF_FIRST, 0x43_0076),
            Err(MsrFault::GeneralProtection)
        );
        config.features.amd_legacy_pmu = true;
        let mut p = Platform::new(config, FakeClock::default(), Lines::default()).unwrap();
        assert_eq!(
            p.wrmsr(0, msr::AMD_PERF_FIRST, 0x43_0076),
            Ok(Effects::default())
        );
        assert_eq!(p.wrmsr(0, msr::AMD_PERF_LAST, 5), Ok(Effects::default()));
        assert_eq!(p.rdmsr(0, msr::AMD_PERF_FIRST), Ok(0));
        assert_eq!(p.rdmsr(0, msr::AMD_PERF_LAST), Ok(0));
    }

    #[test]
    fn configuration_is_checked() {
        let clock = FakeClock::default();
        let mut config = PlatformConfig::new(0, 64 << 20, TSC_HZ);
        assert_eq!(
            Platform::new(config, clock.clone(), Lines::default()).unwrap_err(),
            ConfigError::VcpuCount(0)
        );
        config = PlatformConfig::new(MAX_VCPUS + 1, 64 << 20, TSC_HZ);
        assert!(Platform::new(config, clock.clone(), Lines::default()).is_err());
        config = PlatformConfig::new(2, 64 << 20, 0);
        assert_eq!(
            Platform::new(config, clock.clone(), Lines::default()).unwrap_err(),
            ConfigError::ZeroRate
        );
        config = PlatformConfig::new(2, 64 << 20, TSC_HZ);
        config.features.vcpus = 3;
        assert_eq!(
            Platform::new(config, clock, Lines::default()).unwrap_err(),
            ConfigError::FeaturesMismatch
        );
        assert_eq!(
            PlatformConfig::new(1, 1 << 20, 500_000_000).apic_bus_hz,
            500_000_000
        );
    }

    #[test]
    fn init_then_sipi_starts_the_aps_at_the_vector() {
        let (mut p, _) = platform(3);
        assert_eq!(p.run_state(0), RunState::Running);
        assert_eq!(p.run_state(1), RunState::WaitForSipi);
        assert!(!p.runnable(1), "APs wait for a SIPI");
        boot_aps(&mut p);
        // A SIPI to a running vCPU is ignored; INIT resets it.
        let _ = apic_write(&mut p, 0, reg::ICR2, 1 << 24);
        let fx = apic_write(&mut p, 0, reg::ICR, 0x600 | 0x9A);
        assert!(fx.kick.is_empty());
        assert_eq!(p.run_state(1), RunState::Running);
        let _ = apic_write(&mut p, 1, reg::TPR, 0x40);
        let fx = apic_write(&mut p, 0, reg::ICR, 0x4500);
        assert!(fx.kick.contains(1));
        assert_eq!(p.run_state(1), RunState::WaitForSipi);
        assert_eq!(apic_read(&mut p, 1, reg::TPR), 0, "INIT reset the APIC");
        assert_eq!(apic_read(&mut p, 1, reg::ID), 1 << 24, "but kept its ID");
        // INIT level de-assert does nothing.
        let _ = apic_write(&mut p, 0, reg::ICR, 0x8500);
        assert_eq!(p.run_state(1), RunState::WaitForSipi);
        let _ = apic_write(&mut p, 0, reg::ICR, 0x4600 | 0x9A);
        assert_eq!(p.take_start(1), Some(0x9A));
        let start = crate::cpu_state::SipiStartState::new(0x9A, 0);
        assert_eq!(start.cs.base, 0x9A000);
    }

    #[test]
    fn an_ipi_from_vcpu_0_is_vcpu_1_s_pending_vector() {
        let (mut p, _) = platform(2);
        boot_aps(&mut p);
        // smp.c __on_cpu(): fixed, physical, vector 0x20, to APIC ID 1.
        let _ = apic_write(&mut p, 0, reg::ICR2, 1 << 24);
        let fx = apic_write(&mut p, 0, reg::ICR, 0x4000 | 0x20);
        assert_eq!(fx.kick.iter().collect::<Vec<_>>(), [1]);
        assert!(p.apic(1).irr_bit(0x20));
        assert!(!p.apic(0).irr_bit(0x20));
        // vCPU 1 halted in ap_online() with interrupts on: it wakes and
        // takes the vector.
        let decision = p.next_event(1, open());
        assert_eq!(decision.inject, Some(Event::Interrupt(0x20)));
        assert!(p.apic(1).isr_bit(0x20));
        let _ = apic_write(&mut p, 1, reg::EOI, 0);
        assert!(!p.apic(1).isr_bit(0x20));
        assert_eq!(p.next_event(1, open()), EventDecision::default());
    }

    #[test]
    fn halted_vcpus_wake_for_interrupts_they_can_take() {
        let (mut p, clock) = platform(2);
        boot_aps(&mut p);
        assert!(p.halt(1, true), "nothing pending: sleeps");
        assert_eq!(p.run_state(1), RunState::Halted);
        assert!(!p.runnable(1));
        let _ = apic_write(&mut p, 0, reg::ICR2, 1 << 24);
        let _ = apic_write(&mut p, 0, reg::ICR, 0x4000 | 0x20);
        assert!(p.runnable(1));
        assert_eq!(p.run_state(1), RunState::Running);
        // HLT with interrupts off: an interrupt does not wake it, an NMI does.
        let _ = p.next_event(1, open());
        let _ = apic_write(&mut p, 1, reg::EOI, 0);
        let _ = apic_write(&mut p, 0, reg::ICR, 0x4000 | 0x21);
        assert!(p.halt(1, false));
        assert!(!p.runnable(1));
        let _ = apic_write(&mut p, 0, reg::ICR, 0x4400);
        assert!(p.runnable(1));
        // HLT with an interrupt already pending and IF=1: no sleep at all.
        assert!(!p.halt(1, true));
        // A timer wakes a halted vCPU once the kernel polls after the deadline.
        let _ = apic_write(&mut p, 0, reg::LVT_TIMER, 0xEE);
        let _ = apic_write(&mut p, 0, reg::TDCR, 0xB);
        let _ = apic_write(&mut p, 0, reg::TMICT, 1000);
        assert!(p.halt(0, true));
        let deadline = p.next_deadline(0).unwrap();
        assert_eq!(deadline, 2000);
        clock.set(deadline);
        assert!(p.poll().contains(0));
        assert!(p.runnable(0));
    }

    #[test]
    fn event_injection_follows_the_interruptibility_rules() {
        let (mut p, _) = platform(1);
        reset_and_enable(&mut p, 0);
        // vmexit.c self_ipi_sti_nop: cli; self IPI; sti; nop.
        let _ = apic_write(&mut p, 0, reg::ICR, 0x40000 | 0x4000 | 0xB0);
        let closed = InterruptState::default();
        let d = p.next_event(0, closed);
        assert_eq!(
            (d.inject, d.interrupt_window),
            (None, true),
            "IF=0: ask for a window"
        );
        let sti = InterruptState {
            blocked_by_sti: true,
            ..open()
        };
        assert_eq!(p.next_event(0, sti).inject, None, "STI shadow: still wait");
        assert_eq!(p.next_event(0, open()).inject, Some(Event::Interrupt(0xB0)));
        let _ = apic_write(&mut p, 0, reg::EOI, 0);
        // self_ipi_tpr: TPR 0x0f holds 0xB0 back... no, 0x0F is class 0:
        // vmexit.c's CR8 = 0xF holds it (class 0xF).
        p.write_cr8(0, 0xF).unwrap();
        let _ = apic_write(&mut p, 0, reg::ICR, 0x40000 | 0x4000 | 0xB0);
        let d = p.next_event(0, open());
        assert_eq!(d.inject, None);
        assert!(!d.interrupt_window, "not a matter of IF: TPR holds it");
        assert_eq!(d.tpr_threshold, 0xB);
        p.write_cr8(0, 0).unwrap();
        assert_eq!(p.next_event(0, open()).inject, Some(Event::Interrupt(0xB0)));
        let _ = apic_write(&mut p, 0, reg::EOI, 0);
        // NMIs first, blocked by NMI blocking and the shadows.
        let _ = apic_write(&mut p, 0, reg::ICR, 0x4400);
        let _ = apic_write(&mut p, 0, reg::ICR, 0x40000 | 0x4000 | 0x40);
        let blocked = InterruptState {
            blocked_by_nmi: true,
            ..open()
        };
        let d = p.next_event(0, blocked);
        assert_eq!(
            d.inject,
            Some(Event::Interrupt(0x40)),
            "an interrupt may go while NMIs are blocked"
        );
        assert!(d.nmi_window);
        let _ = apic_write(&mut p, 0, reg::EOI, 0);
        let _ = apic_write(&mut p, 0, reg::ICR, 0x40000 | 0x4000 | 0x41);
        let d = p.next_event(0, open());
        assert_eq!(d.inject, Some(Event::Nmi));
        assert!(
            d.interrupt_window,
            "the interrupt waits for the next window"
        );
        assert_eq!(p.next_event(0, open()).inject, Some(Event::Interrupt(0x41)));
        // An event being re-injected blocks everything else.
        let _ = apic_write(&mut p, 0, reg::EOI, 0);
        let _ = apic_write(&mut p, 0, reg::ICR, 0x40000 | 0x4000 | 0x42);
        let busy = InterruptState {
            event_pending: true,
            ..open()
        };
        let d = p.next_event(0, busy);
        assert_eq!((d.inject, d.interrupt_window), (None, true));
    }

    #[test]
    fn tsc_deadline_fires_at_entry_once_time_passes_it() {
        let (mut p, clock) = platform(1);
        reset_and_enable(&mut p, 0);
        let _ = apic_write(&mut p, 0, reg::LVT_TIMER, 2 << 17 | 0xB0);
        clock.set(10_000);
        let now = p.rdmsr(0, msr::IA32_TSC).unwrap();
        assert_eq!(now, 10_000);
        // vmexit.c tscdeadline: deadline = rdtsc() + 3000, spin until it fires.
        let fx = p.wrmsr(0, msr::IA32_TSC_DEADLINE, now + 3000).unwrap();
        assert!(fx.kick.is_empty());
        assert_eq!(p.next_deadline(0), Some(13_000));
        assert_eq!(p.next_event(0, open()).inject, None);
        clock.set(13_000);
        assert_eq!(p.next_event(0, open()).inject, Some(Event::Interrupt(0xB0)));
        assert_eq!(p.rdmsr(0, msr::IA32_TSC_DEADLINE), Ok(0));
        // tscdeadline_immed: a deadline in the past fires on the write.
        let fx = p.wrmsr(0, msr::IA32_TSC_DEADLINE, 1).unwrap();
        assert!(fx.kick.contains(0));
    }

    #[test]
    fn tsc_writes_move_the_offset_and_tsc_adjust() {
        let (mut p, clock) = platform(1);
        clock.set(1000);
        let fx = p.wrmsr(0, msr::IA32_TSC, 5000).unwrap();
        assert!(fx.tsc_offset_changed);
        assert_eq!(p.tsc_offset(0), 4000);
        assert_eq!(p.rdmsr(0, msr::IA32_TSC_ADJUST), Ok(4000));
        clock.set(2000);
        assert_eq!(p.rdmsr(0, msr::IA32_TSC), Ok(6000));
        let _ = p.wrmsr(0, msr::IA32_TSC_ADJUST, 0).unwrap();
        assert_eq!(p.rdmsr(0, msr::IA32_TSC), Ok(2000));
        assert_eq!(p.rdmsr(0, msr::IA32_FEATURE_CONTROL), Ok(1));
        assert_eq!(
            p.wrmsr(0, msr::IA32_FEATURE_CONTROL, 5),
            Err(MsrFault::GeneralProtection)
        );
        assert_eq!(
            p.rdmsr(0, 0xFE),
            Err(MsrFault::GeneralProtection),
            "not a platform MSR"
        );
        assert_eq!(
            p.msr_class(0xC000_0080),
            MsrClass::GuestState(msr::GuestStateMsr::Efer)
        );
    }

    #[test]
    fn x2apic_ipis_and_broadcasts_reach_every_vcpu() {
        let (mut p, _) = platform(3);
        boot_aps(&mut p);
        for vcpu in 0..3 {
            let base = p.rdmsr(vcpu, msr::IA32_APIC_BASE).unwrap();
            let fx = p.wrmsr(vcpu, msr::IA32_APIC_BASE, base | 1 << 10).unwrap();
            assert!(fx.apic_page_moved);
            assert_eq!(p.apic_mmio_base(vcpu), None);
        }
        // Physical broadcast 0xFFFFFFFF (apic.c test_physical_broadcast).
        let fx = p
            .wrmsr(0, 0x830, 0xFFFF_FFFF << 32 | 0x4000 | 0xCF)
            .unwrap();
        assert_eq!(fx.kick.iter().collect::<Vec<_>>(), [0, 1, 2]);
        for vcpu in 0..3 {
            assert!(p.apic(vcpu).irr_bit(0xCF));
        }
        // All-excluding-self shorthand.
        let fx = p.wrmsr(1, 0x830, 0xC0000 | 0x4000 | 0xD0).unwrap();
        assert_eq!(fx.kick.iter().collect::<Vec<_>>(), [0, 2]);
        // Self IPI register.
        let fx = p.wrmsr(2, 0x83F, 0xB0).unwrap();
        assert_eq!(fx.kick.iter().collect::<Vec<_>>(), [2]);
        // NMI to APIC ID 1.
        let fx = p.wrmsr(0, 0x830, 1 << 32 | 0x4400).unwrap();
        assert!(fx.kick.contains(1));
        assert_eq!(p.next_event(1, open()).inject, Some(Event::Nmi));
        // In x2APIC mode the old page is not the APIC's: all ones.
        assert_eq!(p.mmio_read(0, APIC + 0x30, 4), Ok(0xFFFF_FFFF));
    }

    #[test]
    fn logical_and_lowest_priority_delivery() {
        let (mut p, _) = platform(3);
        boot_aps(&mut p);
        for vcpu in 0..3 {
            let _ = apic_write(&mut p, vcpu, reg::LDR, (1 << vcpu) << 24);
        }
        let _ = apic_write(&mut p, 0, reg::ICR2, 0b110 << 24);
        let fx = apic_write(&mut p, 0, reg::ICR, 0x4000 | 0x800 | 0x50);
        assert_eq!(fx.kick.iter().collect::<Vec<_>>(), [1, 2]);
        // Lowest priority: the one with the lowest TPR of the two.
        let _ = apic_write(&mut p, 1, reg::TPR, 0x30);
        let fx = apic_write(&mut p, 0, reg::ICR, 0x4000 | 0x800 | 0x100 | 0x60);
        assert_eq!(fx.kick.iter().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn the_ioapic_routes_testdev_irq_lines_and_takes_eois_back() {
        let (mut p, _) = platform(2);
        boot_aps(&mut p);
        let ioapic = |p: &mut Platform<FakeClock, Lines>, reg: u32, value: u32| {
            let _ = p.mmio_write(0, ioapic::BASE, 4, u64::from(reg)).unwrap();
            let _ = p
                .mmio_write(0, ioapic::BASE + 0x10, 4, u64::from(value))
                .unwrap();
        };
        // Pin 14, vector 0x77, level, to APIC ID 1.
        ioapic(&mut p, 0x10 + 2 * 14, 0x77 | 1 << 15);
        ioapic(&mut p, 0x11 + 2 * 14, 1 << 24);
        let fx = p.io_out(0, 0x2000 + 14, 1, 1);
        assert_eq!(fx.kick.iter().collect::<Vec<_>>(), [1]);
        assert_eq!(p.next_event(1, open()).inject, Some(Event::Interrupt(0x77)));
        assert!(p.apic(1).tmr_bit(0x77));
        // The handler lowers the line and EOIs: remote IRR clears.
        let _ = p.io_out(1, 0x2000 + 14, 1, 0);
        let _ = apic_write(&mut p, 1, reg::EOI, 0);
        let _ = p.mmio_write(0, ioapic::BASE, 4, 0x10 + 2 * 14).unwrap();
        let entry = p.mmio_read(0, ioapic::BASE + 0x10, 4).unwrap();
        assert_eq!(entry & 1 << 14, 0);
        // Still asserted at EOI: delivered again.
        let _ = p.io_out(0, 0x2000 + 14, 1, 1);
        assert_eq!(p.next_event(1, open()).inject, Some(Event::Interrupt(0x77)));
        let fx = apic_write(&mut p, 1, reg::EOI, 0);
        assert!(fx.kick.contains(1));
        assert!(p.apic(1).irr_bit(0x77));
        // GSI 0 goes to pin 2.
        ioapic(&mut p, 0x10 + 2 * 2, 0x30);
        ioapic(&mut p, 0x11 + 2 * 2, 0);
        let fx = p.io_out(0, 0x2000, 1, 1);
        assert!(fx.kick.contains(0));
        assert!(p.apic(0).irr_bit(0x30));
    }

    #[test]
    fn the_pic_reaches_the_boot_vcpu_through_lint0_extint() {
        let (mut p, _) = platform(1);
        // realmode.c test_sti_inhibit: cli; IRQ 11 up and down; sti; hlt.
        let fx = p.io_out(0, 0x200B, 4, 1);
        assert!(fx.kick.contains(0));
        let _ = p.io_out(0, 0x200B, 4, 0);
        let d = p.next_event(0, InterruptState::default());
        assert_eq!((d.inject, d.interrupt_window), (None, true));
        assert!(!p.halt(0, true), "the pending IRQ keeps HLT from sleeping");
        assert_eq!(p.next_event(0, open()).inject, Some(Event::Interrupt(0x73)));
        // Once the tests' reset_apic masks LINT0, the PIC no longer gets in.
        reset_and_enable(&mut p, 0);
        let _ = p.io_out(0, 0x200A, 1, 1);
        assert_eq!(p.next_event(0, open()), EventDecision::default());
    }

    #[test]
    fn the_pit_raises_irq0_through_the_ioapic() {
        let (mut p, clock) = platform(1);
        reset_and_enable(&mut p, 0);
        let _ = p.mmio_write(0, ioapic::BASE, 4, 0x10 + 4).unwrap();
        let _ = p.mmio_write(0, ioapic::BASE + 0x10, 4, 0x31).unwrap();
        let _ = p.io_out(0, 0x43, 1, 0x34);
        let _ = p.io_out(0, 0x40, 1, 0x00);
        let _ = p.io_out(0, 0x40, 1, 0x01); // 256 ticks
        let deadline = p.next_platform_deadline().unwrap();
        clock.set(deadline);
        assert!(p.poll().contains(0));
        assert!(p.apic(0).irr_bit(0x31));
    }

    #[test]
    fn devices_answer_their_ports() {
        let (mut p, _) = platform(2);
        // fw_cfg: 16-bit selector write, byte reads.
        let _ = p.io_out(0, 0x510, 2, 0x05);
        assert_eq!(p.io_in(0, 0x511, 1) | p.io_in(0, 0x511, 1) << 8, 2);
        let _ = p.io_out(0, 0x510, 2, 0x03);
        let ram = (0..8).fold(0u64, |acc, i| {
            acc | u64::from(p.io_in(0, 0x511, 1)) << (8 * i)
        });
        assert_eq!(ram, 64 << 20);
        // UART: lines reach the sink.
        for &b in b"hello\r\n" {
            assert_ne!(p.io_in(0, 0x3FD, 1) & 0x20, 0);
            let _ = p.io_out(0, 0x3F8, 1, u32::from(b));
        }
        assert_eq!(p.sink().strings(), ["hello"]);
        // pc-testdev's data port.
        let _ = p.io_out(0, 0xE0, 4, 0xDEAD_BEEF);
        assert_eq!(p.io_in(0, 0xE2, 2), 0xDEAD);
        // PCI: no device.
        let _ = p.io_out(0, 0xCF8, 4, 0x8000_0000);
        assert_eq!(p.io_in(0, 0xCFC, 4), 0xFFFF_FFFF);
        // The PM timer counts.
        assert_eq!(p.io_in(0, 0x608, 4), 0);
        // Nothing at 0x1234: all ones, counted.
        assert_eq!(p.io_in(0, 0x1234, 2), 0xFFFF);
        assert_eq!(p.unclaimed().port_reads, 2);
        assert_eq!(p.unclaimed().last_port, 0x1235);
    }

    #[test]
    fn debug_exit_stops_the_guest_and_flushes_its_last_line() {
        let (mut p, _) = platform(1);
        for &b in b"SUMMARY: 1 tests" {
            let _ = p.io_out(0, 0x3F8, 1, u32::from(b));
        }
        let fx = p.io_out(0, 0xF4, 4, 0);
        assert_eq!(fx.stop, Some(StopReason::Exit(GuestExit { value: 0 })));
        assert_eq!(p.sink().strings(), ["SUMMARY: 1 tests"]);
        let Some(StopReason::Exit(exit)) = p.stop_reason() else {
            panic!()
        };
        assert_eq!(exit.qemu_status(), 1);
        assert!(!p.runnable(0), "a stopped guest runs no more");
        // The first reason stays.
        let fx = p.triple_fault(0);
        assert_eq!(fx.stop, Some(StopReason::Exit(GuestExit { value: 0 })));
    }

    #[test]
    fn triple_faults_and_resets_stop_the_guest() {
        let (mut p, _) = platform(2);
        assert_eq!(
            p.triple_fault(1).stop,
            Some(StopReason::TripleFault { vcpu: 1 })
        );
        let (mut p, _) = platform(1);
        assert_eq!(
            p.io_out(0, 0xCF9, 1, 0x06).stop,
            Some(StopReason::Reset { vcpu: 0 })
        );
        let (mut p, _) = platform(2);
        boot_aps(&mut p);
        // INIT to the boot vCPU.
        let fx = apic_write(&mut p, 1, reg::ICR, 0x4500);
        assert_eq!(fx.stop, Some(StopReason::Reset { vcpu: 0 }));
    }

    #[test]
    fn mmio_outside_ram_and_the_apic_window_is_an_error() {
        let (mut p, _) = platform(1);
        assert_eq!(
            p.mmio_read(0, 0x4000_0000, 4),
            Err(MmioError::Unclaimed(0x4000_0000))
        );
        assert!(p.mmio_write(0, 0xFFFF_F000, 4, 0).is_err());
        assert_eq!(
            p.mmio_read(0, 0xFED0_0000, 4),
            Ok(0xFFFF_FFFF),
            "HPET's page: nothing there"
        );
        assert_eq!(p.mmio_read(0, APIC, 3), Err(MmioError::BadSize(3)));
        assert!(p.claims(0, 0xFEE0_0000) && p.claims(0, 0xFEC0_0010) && !p.claims(0, 0x1000));
        // Relocating the APIC moves what is claimed (apic.c test_apicbase).
        let _ = p
            .wrmsr(0, msr::IA32_APIC_BASE, 0xFED4_0000 | 1 << 8 | 1 << 11)
            .unwrap();
        assert_eq!(apic_read(&mut p, 0, 0x30), 0xFFFF_FFFF, "old page: nothing");
        assert_eq!(p.mmio_read(0, 0xFED4_0030, 4).unwrap() as u8, 0x14);
    }

    #[test]
    fn cpuid_carries_the_vcpu_s_apic_id_and_apic_state() {
        let (mut p, _) = platform(2);
        let r = p.cpuid(1, 1, 0, &FakeHost, 0, 1);
        assert_eq!(r.ebx >> 24, 1);
        assert_eq!(p.cpuid(1, 0xB, 0, &FakeHost, 0, 1).edx, 1);
        assert_ne!(r.edx & (1 << 9), 0);
        let _ = p.wrmsr(1, msr::IA32_APIC_BASE, 0xFEE0_0000).unwrap();
        assert_eq!(p.cpuid(1, 1, 0, &FakeHost, 0, 1).edx & (1 << 9), 0);
    }

    #[test]
    fn the_nmi_button_follows_lint1() {
        let (mut p, _) = platform(2);
        boot_aps(&mut p);
        // vCPU 0's LINT1 was reset (masked) by reset_apic; vCPU 1's too.
        assert!(p.nmi_button().kick.is_empty());
        let _ = apic_write(&mut p, 1, reg::LVT_LINT1, 0x400);
        assert_eq!(p.nmi_button().kick.iter().collect::<Vec<_>>(), [1]);
    }
}
