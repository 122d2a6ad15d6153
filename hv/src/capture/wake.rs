//! Waking the crashed hypervisor's CPUs from the capture image: proof
//! from the other side of the jump that each one left VMX.
//!
//! A CPU in VMX root operation blocks INIT (Intel SDM, "INIT" in the VMX
//! chapters; Bochs models it), so INIT, then two startup IPIs, wake only
//! a CPU that really executed VMXOFF. The crash note lists every CPU of
//! the old kernel (index, APIC ID, whether it checked in); this module
//! sends INIT-SIPI-SIPI to each one but the CPU it runs on, waits a
//! bounded time, and names the CPUs that came up (`woken`) and those that
//! did not (`silent`). The crash's stragglers may be running anything and
//! are left alone unless `wake_stragglers=1`.
//!
//! The trampoline needs a page below 1 MiB, and the capture image owns no
//! RAM there: all of low RAM is the old kernel's, which is the dump's
//! content. One page of it is borrowed: its bytes are copied first, and
//! the stream sends the copy ([`Borrowed::copy_of`]).
//!
//! The old boot CPU is special: INIT sends a boot CPU to the firmware's
//! reset vector, not to wait for a startup IPI. Where a legacy BIOS is
//! there, it honours the warm-reset convention of the MultiProcessor
//! specification (CMOS shutdown code 0x0A: jump through the vector at
//! 0040:0067), which this module points at the trampoline for the time
//! of the wake (its four bytes are written back after). Without one
//! (UEFI) the old boot CPU is left alone, as Linux's `disable_cpu_apicid=`
//! leaves it. A check over the old RAM below 1 MiB, before and after the
//! wake, shows that the firmware's path changed none of it.

use hv_abi::crash_note::cpu_flags;
use hv_core::cmdline::Options;
use kexec_loader::elfcore::CoreDump;
use smp_boot::bringup::CpuState;
use smp_boot::madt::MAX_CPUS;

use crate::arch::cpu;
use crate::arch::port::{inb, outb};
use crate::cpu::smp;
use crate::mm::{self, phys};

const PAGE: u64 = 4096;
/// Low RAM the trampoline page comes from: above the real-mode IVT, BIOS
/// data area and what BIOSes keep below 64 KiB, below the EBDA and video.
const TRAMPOLINE_FROM: u64 = 0x1_0000;
const TRAMPOLINE_BELOW: u64 = 0xA_0000;
/// What the RAM check covers.
const LOW_MEMORY_END: u64 = 0x10_0000;

/// CMOS index and data ports; the shutdown-status register; the code that
/// makes a BIOS jump through the warm-reset vector after a reset.
const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;
const CMOS_SHUTDOWN_STATUS: u8 = 0x0F;
const SHUTDOWN_JUMP_VIA_467: u8 = 0x0A;
/// The warm-reset vector: offset, then segment, at 0040:0067.
const WARM_RESET_VECTOR: u64 = 0x467;
/// The legacy reset vector's copy below 1 MiB (F000:FFF0).
const LEGACY_RESET_VECTOR: u64 = 0xF_FFF0;

/// What happened to one CPU of the old kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The capture image runs on it.
    ThisCpu,
    /// Waking was not asked for (`capture_wake=0`).
    NotAsked,
    /// A straggler of the crash, left alone (`wake_stragglers=0`).
    StragglerLeftAlone,
    /// The old boot CPU, left alone: no BIOS warm-reset path to its reset.
    BootCpuLeftAlone,
    /// To be sent INIT-SIPI-SIPI.
    Pending,
    /// Not sent anything: the wake could not start (`Outcome::error`).
    NotSent,
    /// Sent INIT-SIPI-SIPI; it came up in the capture image.
    Woken,
    /// Sent INIT-SIPI-SIPI; it never came up.
    Silent,
}

/// One CPU of the old kernel, as the crash note lists it.
#[derive(Debug, Clone, Copy)]
pub struct OldCpu {
    /// Its APIC ID.
    pub apic_id: u32,
    /// Its index in the old kernel (`u32::MAX`: named a straggler, not in
    /// the ledger).
    pub cpu_index: u32,
    /// It checked in with the crash's coordinator (or was it).
    pub checked_in: bool,
    /// The crash named it a straggler.
    pub straggler: bool,
    /// What the capture did with it.
    pub fate: Fate,
    /// Woken: microseconds from the first INIT to its check-in.
    pub woken_us: u64,
}

/// How the old boot CPU was treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootCpuPath {
    /// The capture image runs on it.
    ThisCpu,
    /// Sent INIT-SIPI-SIPI, its reset sent through the BIOS's warm-reset
    /// vector to the trampoline.
    WarmReset,
    /// Left alone: no legacy BIOS to send its reset back.
    LeftAlone,
    /// Not sent anything: waking not asked for, a straggler left alone,
    /// the wake could not start, or the note does not list it.
    NotSent,
}

impl BootCpuPath {
    /// The report's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ThisCpu => "this_cpu",
            Self::WarmReset => "warm_reset",
            Self::LeftAlone => "left_alone",
            Self::NotSent => "not_sent",
        }
    }
}

/// Old pages the capture image wrote over (the trampoline's), each with
/// the copy of its original bytes that the dump takes instead.
#[derive(Debug, Clone, Copy, Default)]
pub struct Borrowed {
    /// (old page, copy) pairs.
    pages: [(u64, u64); 2],
    count: usize,
}

impl Borrowed {
    /// The copy of the page holding `address`, if that page was borrowed.
    pub fn copy_of(&self, address: u64) -> Option<u64> {
        let page = address & !(PAGE - 1);
        self.pages[..self.count]
            .iter()
            .find(|(old, _)| *old == page)
            .map(|&(_, copy)| copy)
    }

    /// Whether the page holding `address` was borrowed.
    pub fn contains(&self, address: u64) -> bool {
        self.copy_of(address).is_some()
    }

    /// Copies the old page at `page` (in the dump's RAM) to a frame of the
    /// capture image's, after which the capture image may write the page.
    fn borrow(&mut self, page: u64) -> Result<(), &'static str> {
        if self.contains(page) {
            return Ok(());
        }
        if self.count == self.pages.len() {
            return Err("too many borrowed pages");
        }
        let copy = mm::alloc_aligned(1, 1).ok_or("no memory for a borrowed page's copy")?;
        // `copy` is a fresh frame of ours; the old page is read before
        // anything writes it.
        phys::write(copy, phys::read(page, PAGE));
        self.pages[self.count] = (page, copy);
        self.count += 1;
        Ok(())
    }
}

/// What [`wake_old_cpus`] did.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Waking was asked for (`capture_wake=1`).
    pub asked: bool,
    /// The old kernel's CPUs, in the note's order.
    cpus: [Option<OldCpu>; MAX_CPUS],
    /// The old boot CPU's path.
    pub boot_cpu: BootCpuPath,
    /// The page the trampoline borrowed.
    pub trampoline_page: Option<u64>,
    /// First INIT to the last CPU up, or to the deadline.
    pub elapsed_us: u64,
    /// The old RAM below 1 MiB (borrowed pages aside) read the same after
    /// the wake as before (`None`: nothing was woken).
    pub low_memory_unchanged: Option<bool>,
    /// Pages the dump must take from their copies.
    pub borrowed: Borrowed,
    /// Why nothing could be woken.
    pub error: Option<&'static str>,
}

impl Outcome {
    fn new(asked: bool) -> Self {
        Self {
            asked,
            cpus: [None; MAX_CPUS],
            boot_cpu: BootCpuPath::NotSent,
            trampoline_page: None,
            elapsed_us: 0,
            low_memory_unchanged: None,
            borrowed: Borrowed::default(),
            error: None,
        }
    }

    /// The old kernel's CPUs.
    pub fn cpus(&self) -> impl Iterator<Item = &OldCpu> + '_ {
        self.cpus.iter().flatten()
    }

    /// Microseconds from the first INIT to each woken CPU's check-in, in
    /// the order of [`Self::with`]`(Fate::Woken, None)`.
    pub fn woken_us(&self) -> impl Iterator<Item = u64> + '_ {
        self.cpus()
            .filter(|cpu| cpu.fate == Fate::Woken)
            .map(|cpu| cpu.woken_us)
    }

    /// APIC IDs of the CPUs whose fate is `fate`, straggler or not.
    pub fn with(&self, fate: Fate, straggler: Option<bool>) -> impl Iterator<Item = u64> + '_ {
        self.cpus()
            .filter(move |cpu| cpu.fate == fate && straggler.is_none_or(|s| cpu.straggler == s))
            .map(|cpu| u64::from(cpu.apic_id))
    }

    /// CPUs the note says checked in, the one the capture runs on left out.
    pub fn checked_in_others(&self) -> usize {
        self.cpus()
            .filter(|cpu| cpu.checked_in && cpu.fate != Fate::ThisCpu)
            .count()
    }

    fn pending(&self) -> impl Iterator<Item = u32> + '_ {
        self.cpus()
            .filter(|cpu| cpu.fate == Fate::Pending)
            .map(|cpu| cpu.apic_id)
    }

    /// Stops before sending anything, for `why`.
    fn give_up(mut self, why: &'static str) -> Self {
        self.error = Some(why);
        if self.boot_cpu == BootCpuPath::WarmReset {
            self.boot_cpu = BootCpuPath::NotSent;
        }
        for cpu in self.cpus.iter_mut().flatten() {
            if cpu.fate == Fate::Pending {
                cpu.fate = Fate::NotSent;
            }
        }
        self
    }
}

/// The old kernel's CPUs from the dump's crash note.
fn old_cpus(dump: &CoreDump<'_>, outcome: &mut Outcome) -> Result<(), &'static str> {
    let note = dump
        .crash_note()
        .ok_or("the dump has no HVCRASH note: which CPUs to wake is unknown")?;
    let own = cpu::apic_id();
    let mut count = 0;
    let mut add = |cpu: OldCpu| {
        if let Some(slot) = outcome.cpus.get_mut(count) {
            *slot = Some(cpu);
            count += 1;
        }
    };
    for ledger in note.cpus() {
        let coordinator = ledger.flags & cpu_flags::COORDINATOR != 0;
        let checked_in = coordinator || ledger.flags & cpu_flags::CHECKED_IN != 0;
        add(OldCpu {
            apic_id: ledger.apic_id,
            cpu_index: ledger.cpu_index,
            checked_in,
            straggler: !checked_in || note.stragglers().any(|id| id == ledger.apic_id),
            fate: if ledger.apic_id == own {
                Fate::ThisCpu
            } else {
                Fate::Pending
            },
            woken_us: 0,
        });
    }
    // A straggler the ledger left out (a second hand-over attempt writes
    // no ledger) is still one of the old kernel's CPUs.
    for apic_id in note.stragglers() {
        if !note.cpus().any(|ledger| ledger.apic_id == apic_id) {
            add(OldCpu {
                apic_id,
                cpu_index: u32::MAX,
                checked_in: false,
                straggler: true,
                fate: Fate::Pending,
                woken_us: 0,
            });
        }
    }
    if count == 0 {
        return Err("the crash note lists no CPU (no ledger)");
    }
    Ok(())
}

/// A page of old RAM (inside one of the dump's segments) in
/// `[from, below)`.
fn old_ram_page(dump: &CoreDump<'_>, from: u64, below: u64) -> Option<u64> {
    dump.load_segments().find_map(|segment| {
        let start = segment.p_offset.max(from).next_multiple_of(PAGE);
        let end = segment.p_offset.checked_add(segment.p_memsz)?.min(below);
        (start.checked_add(PAGE)? <= end).then_some(start)
    })
}

/// Whether a legacy BIOS sits below 1 MiB: its reset vector, a far jump
/// into segment F000 (UEFI firmware's starts with NOPs and a near jump).
fn legacy_bios() -> bool {
    let vector = phys::read(LEGACY_RESET_VECTOR, 5);
    vector[0] == 0xEA && vector[3..5] == [0x00, 0xF0]
}

fn write_cmos(register: u8, value: u8) {
    // Bit 7 of the index clear: NMIs stay enabled.
    outb(CMOS_INDEX, register & 0x7F);
    outb(CMOS_DATA, value);
}

fn read_cmos(register: u8) -> u8 {
    outb(CMOS_INDEX, register & 0x7F);
    inb(CMOS_DATA)
}

/// FNV-1a over the old RAM below 1 MiB, borrowed pages left out.
fn low_memory_digest(dump: &CoreDump<'_>, borrowed: &Borrowed) -> u64 {
    let mut hash = 0xCBF2_9CE4_8422_2325u64;
    for segment in dump.load_segments() {
        let start = segment.p_offset;
        let end = start.saturating_add(segment.p_memsz).min(LOW_MEMORY_END);
        // Not address 0 itself: a Rust reference to it is undefined
        // behaviour (the first two interrupt vectors stay unchecked).
        let mut at = start.max(8);
        while at < end {
            let step = (PAGE - at % PAGE).min(end - at);
            if !borrowed.contains(at) {
                let (words, rest) = phys::read(at, step).as_chunks::<8>();
                for word in words {
                    hash = (hash ^ u64::from_ne_bytes(*word)).wrapping_mul(0x100_0000_01B3);
                }
                for &byte in rest {
                    hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01B3);
                }
            }
            at += step;
        }
    }
    hash
}

/// Does nothing: a woken CPU has no crash to join before it checks in.
fn no_checkpoint(_: usize) {}

/// Wakes every CPU the crash note lists, but this one (and, unless
/// `wake_stragglers=1`, the crash's stragglers), and says which came up.
/// The woken CPUs go to the idle loop and the work it was handed.
pub fn wake_old_cpus(dump: &CoreDump<'_>, options: &Options) -> Outcome {
    let mut outcome = Outcome::new(options.capture_wake);
    if let Err(error) = old_cpus(dump, &mut outcome) {
        return outcome.give_up(error);
    }
    let bios = legacy_bios();
    for cpu in outcome.cpus.iter_mut().flatten() {
        if cpu.fate == Fate::ThisCpu {
            continue;
        }
        cpu.fate = if !options.capture_wake {
            Fate::NotAsked
        } else if cpu.straggler && !options.wake_stragglers {
            Fate::StragglerLeftAlone
        } else if cpu.cpu_index == 0 && !bios {
            Fate::BootCpuLeftAlone
        } else {
            Fate::Pending
        };
    }
    let boot_cpu = outcome.cpus().find(|cpu| cpu.cpu_index == 0).copied();
    outcome.boot_cpu = match boot_cpu.map(|cpu| cpu.fate) {
        Some(Fate::ThisCpu) => BootCpuPath::ThisCpu,
        Some(Fate::Pending) => BootCpuPath::WarmReset,
        Some(Fate::BootCpuLeftAlone) => BootCpuPath::LeftAlone,
        _ => BootCpuPath::NotSent,
    };
    if outcome.pending().next().is_none() {
        return outcome;
    }

    let Some(page) = old_ram_page(dump, TRAMPOLINE_FROM, TRAMPOLINE_BELOW)
        .or_else(|| old_ram_page(dump, PAGE, TRAMPOLINE_BELOW))
    else {
        return outcome.give_up("no page of old RAM below 1 MiB to borrow for the trampoline");
    };
    if let Err(error) = outcome.borrowed.borrow(page) {
        return outcome.give_up(error);
    }
    outcome.trampoline_page = Some(page);
    let warm_reset = outcome.boot_cpu == BootCpuPath::WarmReset;
    let before = low_memory_digest(dump, &outcome.borrowed);
    // The vector's old bytes, put back once the wake is over.
    let mut old_vector = [0u8; 4];
    if warm_reset {
        old_vector.copy_from_slice(phys::read(WARM_RESET_VECTOR, 4));
        let segment = (page >> 4) as u16;
        let mut vector = [0u8; 4];
        vector[2..].copy_from_slice(&segment.to_le_bytes());
        // Four bytes of the BIOS data area, written back below: the
        // capture image borrows them for the wake.
        phys::write(WARM_RESET_VECTOR, &vector);
        write_cmos(CMOS_SHUTDOWN_STATUS, SHUTDOWN_JUMP_VIA_467);
    }

    let mut targets = [0u32; MAX_CPUS];
    let mut count = 0;
    for apic_id in outcome.pending() {
        targets[count] = apic_id;
        count += 1;
    }
    let settings = smp::Settings {
        max_cpus: None,
        timing: smp_boot::bringup::Config {
            init_delay_us: options.init_delay_us,
            sipi_delay_us: options.sipi_delay_us,
            timeout_us: options.wake_timeout_ms * 1000,
        },
        hang_apic_id: None,
        before_check_in: no_checkpoint,
    };
    log::info!(
        "capture: waking {count} CPUs of the crashed hypervisor (trampoline in its page {page:#x}, saved){}",
        if warm_reset {
            ", the old boot CPU through the BIOS warm-reset vector"
        } else {
            ""
        }
    );
    let report = smp::wake(targets[..count].iter().copied(), page, &settings);
    outcome.elapsed_us = report.elapsed_us;
    if warm_reset {
        phys::write(WARM_RESET_VECTOR, &old_vector);
        if read_cmos(CMOS_SHUTDOWN_STATUS) != 0 {
            // No reset read it: leave the next one a normal boot.
            write_cmos(CMOS_SHUTDOWN_STATUS, 0);
        }
    }
    if report.started_us == 0 {
        // No INIT went out (bring-up said why): nobody is silent.
        return outcome.give_up("no memory for the woken CPUs' stacks, or the trampoline");
    }
    let started_us = report.started_us;
    let up = |apic_id: u32| {
        smp::cpus()
            .iter()
            .skip(1)
            .find(|cpu| cpu.slot.apic_id() == apic_id && cpu.slot.state() == CpuState::Online)
            .map(|cpu| cpu.slot.online_at_us().saturating_sub(started_us))
    };
    for cpu in outcome.cpus.iter_mut().flatten() {
        if cpu.fate == Fate::Pending {
            match up(cpu.apic_id) {
                Some(us) => {
                    cpu.fate = Fate::Woken;
                    cpu.woken_us = us;
                }
                None => cpu.fate = Fate::Silent,
            }
        }
    }
    outcome.low_memory_unchanged = Some(low_memory_digest(dump, &outcome.borrowed) == before);
    outcome
}
