//! The purgatory's installation and the hypervisor's own check before the
//! jump.
//!
//! At boot the capture layer hands [`install`] the digests of every loaded
//! segment; the area (the last [`AREA_BYTES`] of the reservation) is laid
//! out by `kexec_loader::purgatory::build`: the blob (`arch::blobs`), its
//! parameters, GDT, IDTs, identity page tables (first 4 GiB), its own copy
//! of the digest table and a seal over all of it. The hypervisor copies
//! those bytes and digests the area's fixed part with everything else.
//!
//! At crash time [`check_before_jump`] checks the hypervisor's sealed copy
//! of the table (a zeroed or damaged table is refused, not trusted) and
//! every segment: a fast refusal, said on the hypervisor's console. Then
//! the purgatory checks again, from the reservation, on its own copy: that
//! is the check a stray write into the hypervisor cannot fool.
//!
//! Two ways out of the purgatory ([`Entry`]):
//! - Linux 64-bit boot protocol: CS = 0x10, DS/ES/SS = 0x18, RSI = the
//!   zero page, jump to `startup_64`, paging on with an identity map.
//! - PVH (the hv image in capture mode): down to 32-bit protected mode
//!   with the PVH ABI's register state (CR0 = PE | ET, CR4 = 0, EFER.LME
//!   off, TR a 32-bit TSS, EFLAGS.IF clear), EBX = start info.
//!
//! The purgatory stamps the TSC at its entry and before its jump in its
//! scratch fields; hv's capture mode reads them in old memory ([`stamps`])
//! and reports the time spent in the purgatory.

use core::sync::atomic::{AtomicBool, Ordering};

use kexec_loader::digest::SegmentDigest;
use kexec_loader::purgatory::{self as area, BuildError, CheckError, Options, SealedTable};

use crate::arch::blobs::purgatory_blob;
use crate::mm::phys;

pub use kexec_loader::purgatory::Entry;

/// Bytes the purgatory takes at the end of the reservation.
pub const AREA_BYTES: u64 = area::AREA_BYTES;
/// Room for the PVH start info, its memory map and command line, inside
/// the area (the loader writes and digests it as a segment of its own).
pub const BOOT_DATA_OFFSET: u64 = area::BOOT_DATA_OFFSET as u64;
/// Bytes of that room.
pub const BOOT_DATA_BYTES: u64 = area::BOOT_DATA_BYTES as u64;

/// The hypervisor's own copy of the digest table.
pub type HvTable = SealedTable<{ super::handover::DIGESTS }>;

// The purgatory checks every segment digested before it.
const _: () = assert!(super::handover::DIGESTS - 1 <= kexec_loader::purgatory::MAX_SEGMENTS);

// The purgatory's entry IDT names the hypervisor's code selector, so that
// it is valid under either GDT from the purgatory's first instruction.
const _: () = assert!(
    crate::arch::gdt::KERNEL_CODE_SELECTOR == area::abi::selector::CODE64_ENTRY,
    "the purgatory's entry IDT must name the hypervisor's code selector"
);

/// What the purgatory is told besides where to go.
#[derive(Debug, Clone, Copy)]
pub struct InstallOptions {
    /// A refusal ends the emulator (`finish=exit`).
    pub exit_emulator: bool,
    /// Test knob `capture_purgatory_nmi=1`.
    pub self_nmi: bool,
    /// `capture_hv_check=off` (test knob) skips [`check_before_jump`].
    pub hv_check: bool,
    /// How the segments were summed (`capture_digest=`).
    pub digest: kexec_loader::digest::Algorithm,
    /// The crash words mailbox the purgatory prints on a refusal (0: the
    /// words were printed before the jump).
    pub mailbox: u64,
}

/// Set once at boot by [`install`] when `capture_hv_check=off`.
static HV_CHECK_SKIPPED: AtomicBool = AtomicBool::new(false);

/// Lays the purgatory out at `area` (the reservation's last
/// [`AREA_BYTES`], memory the kernel owns, below 4 GiB) to check
/// `segments` and then enter the capture kernel through `entry`. Returns
/// the bytes the hypervisor digests of it.
pub fn install(
    area: u64,
    entry: Entry,
    segments: &[SegmentDigest],
    options: InstallOptions,
) -> Result<&'static [u8], BuildError> {
    let built = phys::with_bytes_mut(area, area::BUILT_BYTES as u64, |out| {
        area::build(
            out,
            purgatory_blob(),
            area,
            entry,
            segments,
            Options {
                exit_emulator: options.exit_emulator,
                self_nmi: options.self_nmi,
                digest: options.digest,
                mailbox: options.mailbox,
            },
        )
    });
    built?;
    HV_CHECK_SKIPPED.store(!options.hv_check, Ordering::Relaxed);
    Ok(phys::read(area, area::DIGESTED_BYTES as u64))
}

/// Whether the hypervisor checks the digests itself before the jump (not
/// `capture_hv_check=off`).
pub fn hv_check_on() -> bool {
    !HV_CHECK_SKIPPED.load(Ordering::Relaxed)
}

/// What the hypervisor's check before the jump found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HvCheck {
    /// Its table is intact and every segment matches.
    Verified,
    /// Skipped (`capture_hv_check=off`): only the purgatory checks.
    Skipped,
}

/// The hypervisor's own check of its sealed table and every segment.
pub fn check_before_jump(table: &HvTable) -> Result<HvCheck, CheckError> {
    if HV_CHECK_SKIPPED.load(Ordering::Relaxed) {
        return Ok(HvCheck::Skipped);
    }
    // Digested ranges lie in the reservation, which nothing writes.
    table
        .verify(|address, len| Some(phys::read(address, len as u64)))
        .map(|()| HvCheck::Verified)
}

/// What the purgatory left in its scratch fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamps {
    /// TSC at its entry.
    pub entry_tsc: u64,
    /// TSC once every check had passed.
    pub verified_tsc: u64,
    /// TSC just before the jump into the capture kernel.
    pub jump_tsc: u64,
    /// NMIs it took in 64-bit mode.
    pub nmis_64: u64,
    /// NMIs it took in 32-bit protected mode.
    pub nmis_32: u64,
}

/// The crashed hypervisor's purgatory stamps, read in old memory at
/// `area` (hv's capture mode, which never writes there: the area lies in
/// its reservation, the memory map gives it as RAM, and this is read
/// before anything is allocated beyond the image).
pub fn stamps(area_address: u64) -> Stamps {
    let scratch = phys::read(
        area_address + area::abi::SCRATCH_OFFSET as u64,
        area::abi::scratch::END as u64,
    );
    let field = |offset| area::abi::u64_at(scratch, offset).unwrap_or(0);
    use area::abi::scratch::*;
    Stamps {
        entry_tsc: field(ENTRY_TSC),
        verified_tsc: field(VERIFIED_TSC),
        jump_tsc: field(JUMP_TSC),
        nmis_64: field(NMI64_COUNT),
        nmis_32: field(NMI32_COUNT),
    }
}
