//! The virtual platform of hv's guests: everything of running a guest
//! kernel that is not VMX (or SVM) itself, as plain logic that runs in
//! `cargo test`. The kernel's VMX glue calls it from its exit handlers.
//!
//! - [`multiboot`]: loads a multiboot1 kernel (kvm-unit-tests' `.flat`) with
//!   its modules and command line, builds the multiboot information and
//!   gives the boot vCPU's entry state;
//! - [`acpi_tables`]: RSDP, RSDT, XSDT, FADT, FACS, DSDT, MADT in the BIOS
//!   area;
//! - [`platform`]: one guest's devices and vCPUs: port I/O, MMIO, MSRs,
//!   CR8, CPUID, run states (running, halted, waiting for SIPI), the next
//!   event at each VM entry, the stop reason;
//! - the devices: [`uart`] (16550 at 0x3F8), [`debug_exit`] (0xF4),
//!   [`fw_cfg`] (0x510), [`testdev`] (QEMU's pc-testdev), [`pci`] (no
//!   devices), [`acpi_pm`] (PM timer, PM1 blocks), [`lapic`] (one per vCPU),
//!   [`ioapic`], [`pic`] (8259 pair, ELCR), [`pit`] (8254, port 0x61);
//! - [`cpuid`] and [`msr`]: what the guest sees of the CPU, XSETBV's rules;
//! - [`decode`]: the instruction behind an MMIO access, and
//!   [`guest_paging`]: the page walk that fetches it;
//! - [`cpu_state`]: register states to load (multiboot entry, SIPI start),
//!   with segment attributes in both VMX and SVM layouts;
//! - [`time`], [`memory`]: the kernel-provided clock and guest memory.
//!
//! Nothing here allocates, blocks or uses `unsafe`; nothing is VMX- or
//! SVM-specific beyond naming both layouts of segment attributes.
//!
//! # What the kernel does
//!
//! The kernel owns one [`platform::Platform`] per guest behind a lock its
//! vCPUs share, gives it a [`time::Clock`] (host TSC ticks, the same
//! timeline on every core) and a [`uart::ConsoleSink`] (hv's console with
//! the guest's name in front, and the run report). Every call that can
//! touch another vCPU returns [`platform::Effects`]: wake each parked vCPU
//! in `kick`, and send a host IPI to each one running on another core so it
//! exits and looks again; if `stop` is set, stop every vCPU of the guest
//! and report the [`platform::StopReason`].
//!
//! ## Creating a guest
//! 1. [`multiboot::MultibootImage::parse`] the image, plan it with
//!    [`multiboot::LoadPlan::new`] in [`multiboot::GuestLayout::pc`] of the
//!    guest's RAM size, with the environment file as the one module and
//!    `"NAME.flat ARGS"` as the command line (kvm-unit-tests take `argv[0]`
//!    from it, as QEMU makes it the file name). A bad image is an error
//!    before anything is written: report it and do not create the guest.
//! 2. Back RAM `[0, ram)` with EPT, map nothing of
//!    [`platform::APIC_WINDOW`] or above RAM, then
//!    [`multiboot::LoadPlan::load`] and [`acpi_tables::write`] through a
//!    [`memory::GuestMemory`] over those frames.
//! 3. [`platform::Platform::new`] with [`platform::PlatformConfig::new`]
//!    (vCPU count, RAM size, the TSC rate; set `features.x2apic = false`
//!    for the cfg's `-x2apic` entries; `phys_addr_bits` from
//!    [`cpuid::CpuidPolicy::phys_addr_bits`]).
//! 4. Load vCPU 0 with the returned [`cpu_state::MultibootEntryState`]; the
//!    other vCPUs wait for a SIPI.
//!
//! ## Before each VM entry of vCPU n
//! - [`platform::Platform::runnable`]: false while halted without a wakeup
//!   or waiting for a SIPI: park (until a kick, or until
//!   [`platform::Platform::next_deadline`] when it is `Some`).
//! - [`platform::Platform::take_start`]: `Some(vector)` after INIT and SIPI:
//!   load [`cpu_state::SipiStartState::new`]`(vector, CPUID.1:EAX)` (real
//!   mode at `vector << 12`; needs unrestricted guest), clear pending
//!   events, then enter.
//! - Read RFLAGS.IF and the interruptibility state into
//!   [`platform::InterruptState`] (`event_pending` when re-injecting the
//!   event an exit interrupted, from the IDT-vectoring information) and call
//!   [`platform::Platform::next_event`]: inject its `inject` (an
//!   `Interrupt` is already acknowledged: it must be delivered, re-injected
//!   if an exit interrupts its delivery), set interrupt-window exiting if
//!   `interrupt_window`, NMI-window exiting if `nmi_window`, and with a TPR
//!   shadow the TPR threshold to `tpr_threshold`.
//! - Arm the VMX preemption timer (or a host timer) for the earlier of
//!   [`platform::Platform::next_deadline`] and
//!   [`platform::Platform::next_platform_deadline`]; when it fires, call
//!   [`platform::Platform::poll`] and kick what it returns.
//!
//! ## On each exit
//! | exit | call |
//! |---|---|
//! | I/O instruction (IN/OUT; string forms one element at a time) | [`platform::Platform::io_in`] / [`platform::Platform::io_out`] |
//! | EPT violation outside RAM | [`guest_paging::fetch_instruction`] at CS.base + RIP, [`decode::decode`] it in the current [`decode::CodeSize`]; [`platform::Platform::mmio_read`] then [`decode::MmioInstruction::load_result`] into the register, or [`decode::MmioInstruction::store_value`] then [`platform::Platform::mmio_write`]; advance RIP by `length`. [`platform::MmioError::Unclaimed`] or a decode error: stop the guest ("touched memory outside its RAM") |
//! | RDMSR / WRMSR | [`platform::Platform::msr_class`]: `Platform` → [`platform::Platform::rdmsr`] / [`platform::Platform::wrmsr`] (`Err` → inject #GP); `GuestState` → the VMCS field or the switched MSR; `Unsupported` → #GP. After a write, `apic_page_moved` → re-check [`platform::Platform::apic_mmio_base`], `tsc_offset_changed` → write [`platform::Platform::tsc_offset`] to the TSC offset |
//! | CPUID | [`platform::Platform::cpuid`] with guest CR4 and XCR0 |
//! | XSETBV | [`cpuid::check_xsetbv`] against [`cpuid::CpuidPolicy::supported_xcr0`]; `Err` → #GP, else load the guest's XCR0 |
//! | MOV to/from CR8 (without a TPR shadow) | [`platform::Platform::write_cr8`] (`Err` → #GP) / [`platform::Platform::read_cr8`] |
//! | TPR below threshold (with a TPR shadow) | write the shadow TPR back with [`platform::Platform::write_cr8`]`(tpr >> 4)` |
//! | HLT | advance RIP, then [`platform::Platform::halt`]`(n, RFLAGS.IF)`: true → park |
//! | interrupt window, NMI window | nothing: the next entry's decision injects |
//! | triple fault | [`platform::Platform::triple_fault`]: the guest stops |
//! | external interrupt (a kick) | nothing: the next entry looks |
//!
//! After emulating any instruction (advancing RIP), clear blocking by STI
//! and by MOV SS, as the CPU would have at the next instruction.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

pub mod acpi_pm;
pub mod acpi_tables;
pub mod cpu_state;
pub mod cpuid;
pub mod debug_exit;
pub mod decode;
pub mod fw_cfg;
pub mod guest_paging;
pub mod ioapic;
pub mod lapic;
pub mod memory;
pub mod msr;
pub mod multiboot;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod platform;
pub mod testdev;
pub mod time;
pub mod uart;

#[cfg(test)]
mod robustness;
