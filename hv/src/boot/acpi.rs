//! ACPI: finding the RSDP and reading the MADT through `smp-boot`.

use smp_boot::madt::{self, Topology};

use super::info::BootInfo;
use crate::mm::phys;

/// What the ACPI tables told.
#[derive(Debug)]
pub struct Acpi {
    /// Every processor, I/O APIC and interrupt override; `None` (logged and
    /// reported) when the tables cannot be read: the kernel then runs on
    /// the boot CPU alone.
    pub topology: Option<Topology>,
    /// The RSDP, when the MADT reader accepted it and its root table.
    pub rsdp: Option<u64>,
}

/// Reads the ACPI tables.
pub fn discover(boot: &BootInfo) -> Acpi {
    let topology = read_madt(boot);
    let rsdp = topology
        .as_ref()
        .and(boot.rsdp.or_else(phys::find_rsdp_in_bios));
    Acpi { topology, rsdp }
}

/// Finds every processor, I/O APIC and interrupt override.
fn read_madt(boot: &BootInfo) -> Option<Topology> {
    let rsdp = boot.rsdp.or_else(phys::find_rsdp_in_bios);
    let report = |topology: Option<&Topology>, error: Option<&madt::MadtError>| {
        crate::console::report::line(|o| {
            o.field("acpi").object(|o| {
                o.field("rsdp")
                    .option(rsdp, |value, address| value.u64(address))?;
                o.field("madt").bool(topology.is_some())?;
                o.field("ioapics")
                    .u64(topology.map_or(0, |t| t.ioapics().len() as u64))?;
                o.field("overrides")
                    .u64(topology.map_or(0, |t| t.overrides().len() as u64))?;
                o.field("error")
                    .option(error, |value, error| value.display(error))
            })
        })
    };
    let topology = match phys::read_madt(rsdp.unwrap_or(0)) {
        Ok(topology) => topology,
        Err(error) => {
            log::error!("ACPI: {error}; running on the boot CPU alone");
            report(None, Some(&error));
            return None;
        }
    };
    for cpu in topology.processors() {
        log::debug!(
            "ACPI: CPU APIC ID {} uid {} {}{}{}",
            cpu.apic_id,
            cpu.acpi_uid,
            if cpu.enabled { "enabled" } else { "disabled" },
            if cpu.online_capable {
                ", online-capable"
            } else {
                ""
            },
            if cpu.from_x2apic_entry {
                ", x2APIC entry"
            } else {
                ""
            },
        );
    }
    for ioapic in topology.ioapics() {
        log::info!(
            "ACPI: I/O APIC {} at {:#x}, GSI base {}",
            ioapic.id,
            ioapic.address,
            ioapic.gsi_base
        );
    }
    for entry in topology.overrides() {
        log::debug!(
            "ACPI: IRQ {} -> GSI {} (flags {:#x})",
            entry.irq,
            entry.gsi,
            entry.flags
        );
    }
    if topology.truncated() {
        log::warn!(
            "ACPI: more than {} CPUs; the rest are ignored",
            madt::MAX_CPUS
        );
    }
    log::info!(
        "ACPI: {} CPUs can be started ({} disabled, {} online-capable)",
        topology.possible_count(),
        topology.disabled_count(),
        topology.online_capable_count()
    );
    report(Some(&topology), None);
    Some(topology)
}
