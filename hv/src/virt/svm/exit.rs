//! Reading an SVM `#VMEXIT` out of the VMCB: the exit code, its
//! information and the guest state the decoding needs, handed to
//! `hv_core::svm_exit`, which decides what the exit means (host-tested).

use hv_core::exits::{Exit, GuestRegisters};
use hv_core::svm_exit::{self, ExitFields, code};

use super::{platform, vmcb};

/// EFER.LMA.
const EFER_LMA: u64 = 1 << 10;
/// The L bit of a segment's VMCB attributes.
const ATTRIBUTE_LONG: u16 = 1 << 9;

/// Whether the guest of `vmcb` runs 64-bit code.
pub fn long_mode(vmcb: u64) -> bool {
    vmcb::read_u64(vmcb, vmcb::EFER) & EFER_LMA != 0
        && vmcb::read_u16(vmcb, vmcb::CS + 2) & ATTRIBUTE_LONG != 0
}

/// Decodes the exit that just happened on `vmcb`. `slice_over`: the slice
/// timer has expired, so a host-interrupt exit is the end of the slice.
pub fn decode(vmcb: u64, registers: &GuestRegisters, slice_over: bool) -> Exit {
    let fields = ExitFields {
        code: vmcb::read_u64(vmcb, vmcb::EXIT_CODE),
        info1: vmcb::read_u64(vmcb, vmcb::EXIT_INFO1),
        info2: vmcb::read_u64(vmcb, vmcb::EXIT_INFO2),
        slice_over,
        rsi: registers.rsi,
        rdi: registers.rdi,
        ds_base: vmcb::read_u64(vmcb, vmcb::DS + vmcb::SEGMENT_BASE),
        es_base: vmcb::read_u64(vmcb, vmcb::ES + vmcb::SEGMENT_BASE),
        long_mode: long_mode(vmcb),
    };
    if svm_exit::needs_instruction(fields.code, fields.info1) {
        let mut bytes = [0u8; 15];
        let got = platform::fetch_instruction(vmcb, &mut bytes).unwrap_or(0);
        return svm_exit::decode(&fields, Some(&bytes[..got]));
    }
    svm_exit::decode(&fields, None)
}

/// Whether an exit with `code` comes from an instruction the guest did
/// not finish (whose next RIP NRIP save records).
fn instruction_intercept(code: u64) -> bool {
    matches!(
        code,
        0x00..=0x1F
            | code::CPUID
            | code::INVD
            | code::HLT
            | code::MSR
            | code::VMMCALL
            | code::WBINVD
            | code::XSETBV
    )
}

/// The guest's RIP after the instruction that exited on `vmcb`: EXITINFO2
/// for port I/O, the saved next RIP with NRIP save, else the instruction's
/// length from its bytes (the usual encoding's length when they cannot be
/// read).
pub fn next_rip(vmcb: u64, nrip_save: bool) -> u64 {
    let code = vmcb::read_u64(vmcb, vmcb::EXIT_CODE);
    if code == code::IOIO {
        return vmcb::read_u64(vmcb, vmcb::EXIT_INFO2);
    }
    let next_rip = vmcb::read_u64(vmcb, vmcb::NEXT_RIP);
    if nrip_save && next_rip != 0 && instruction_intercept(code) {
        return next_rip;
    }
    let rip = vmcb::read_u64(vmcb, vmcb::RIP);
    let mut bytes = [0u8; 15];
    let got = platform::fetch_instruction(vmcb, &mut bytes).unwrap_or(0);
    let length = svm_exit::instruction_length(code, &bytes[..got], long_mode(vmcb))
        .map_or_else(|| usual_length(code), u64::from);
    rip.wrapping_add(length)
}

/// The length of the usual encoding of the instruction that exited with
/// `code`, without prefixes.
fn usual_length(code: u64) -> u64 {
    match code {
        code::HLT => 1,
        code::CPUID | code::MSR | code::INVD | code::WBINVD => 2,
        code::VMMCALL | code::XSETBV | 0x00..=0x1F => 3,
        _ => 0,
    }
}
