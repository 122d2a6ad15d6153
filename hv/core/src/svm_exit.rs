//! What an SVM `#VMEXIT` means (AMD APM volume 2, section 15 and
//! appendix C): the exit code and exit information the VMCB holds,
//! decoded into the backend-neutral [`Exit`], and the lengths and operands
//! of the intercepted instructions for a CPU without NRIP save or decode
//! assists (QEMU 7.2 TCG's SVM has neither), read from the instruction's
//! bytes. Pure: the SVM backend reads the VMCB and guest memory, this
//! module decides.

use crate::exits::{CrAccess, CrAccessKind, Exit, IoAccess, StringIoAccess};

/// SVM exit codes (APM volume 2, appendix C).
pub mod code {
    /// MOV from CR0; CRn is `READ_CR0 + n`.
    pub const READ_CR0: u64 = 0x00;
    /// MOV to CR0; CRn is `WRITE_CR0 + n`.
    pub const WRITE_CR0: u64 = 0x10;
    /// Exception vector 0; vector n is `EXCEPTION_0 + n`.
    pub const EXCEPTION_0: u64 = 0x40;
    /// A physical interrupt (INTR intercept).
    pub const INTR: u64 = 0x60;
    /// A physical NMI (NMI intercept).
    pub const NMI: u64 = 0x61;
    /// The guest can take the virtual interrupt asked for (VINTR).
    pub const VINTR: u64 = 0x64;
    /// CPUID.
    pub const CPUID: u64 = 0x72;
    /// IRET.
    pub const IRET: u64 = 0x74;
    /// INVD.
    pub const INVD: u64 = 0x76;
    /// HLT.
    pub const HLT: u64 = 0x78;
    /// IN, OUT, INS, OUTS.
    pub const IOIO: u64 = 0x7B;
    /// RDMSR (EXITINFO1 0) or WRMSR (1).
    pub const MSR: u64 = 0x7C;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u64 = 0x7F;
    /// VMRUN.
    pub const VMRUN: u64 = 0x80;
    /// VMMCALL.
    pub const VMMCALL: u64 = 0x81;
    /// VMLOAD.
    pub const VMLOAD: u64 = 0x82;
    /// SKINIT (the last of VMLOAD, VMSAVE, STGI, CLGI, SKINIT).
    pub const SKINIT: u64 = 0x86;
    /// RDTSCP (intercepted when the guest's CPUID offers none).
    pub const RDTSCP: u64 = 0x87;
    /// WBINVD.
    pub const WBINVD: u64 = 0x89;
    /// MONITOR.
    pub const MONITOR: u64 = 0x8A;
    /// MWAIT (0x8B) and conditional MWAIT (0x8C).
    pub const MWAIT_CONDITIONAL: u64 = 0x8C;
    /// XSETBV.
    pub const XSETBV: u64 = 0x8D;
    /// A nested page fault.
    pub const NPF: u64 = 0x400;
    /// VMRUN refused the guest's state (VMEXIT_INVALID, -1).
    pub const INVALID: u64 = u64::MAX;
    /// VMEXIT_INVALID as QEMU TCG writes it (-1 in 32 bits).
    pub const INVALID_32: u64 = 0xFFFF_FFFF;
}

/// #UD.
const INVALID_OPCODE: u64 = 6;

/// IOIO EXITINFO1: IN (else OUT).
const IOIO_IN: u64 = 1 << 0;
/// IOIO EXITINFO1: INS or OUTS.
const IOIO_STRING: u64 = 1 << 2;
/// IOIO EXITINFO1: with a REP prefix.
const IOIO_REP: u64 = 1 << 3;
/// CR access EXITINFO1 (decode assists): bit 63 says bits 3:0 name the GPR.
const CR_DECODE_VALID: u64 = 1 << 63;

/// What the backend read of the VMCB and the guest at a `#VMEXIT`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitFields {
    /// EXITCODE.
    pub code: u64,
    /// EXITINFO1.
    pub info1: u64,
    /// EXITINFO2.
    pub info2: u64,
    /// The host's slice timer has expired: a physical-interrupt exit ends
    /// the slice.
    pub slice_over: bool,
    /// The guest's RSI and RDI (string I/O addresses).
    pub rsi: u64,
    /// See `rsi`.
    pub rdi: u64,
    /// DS base (OUTS reads DS:RSI).
    pub ds_base: u64,
    /// ES base (INS writes ES:RDI).
    pub es_base: u64,
    /// The guest runs 64-bit code (segment bases of DS and ES are 0).
    pub long_mode: bool,
}

/// Whether decoding this exit needs the bytes of the guest's instruction:
/// a CR access without decode assists.
pub fn needs_instruction(code: u64, info1: u64) -> bool {
    matches!(code, 0x00..=0x1F) && info1 & CR_DECODE_VALID == 0
}

/// Decodes an exit. `instruction`: the bytes at the guest's RIP, when
/// [`needs_instruction`] says they are needed (else ignored).
pub fn decode(fields: &ExitFields, instruction: Option<&[u8]>) -> Exit {
    let unhandled = Exit::Unhandled {
        reason: fields.code,
    };
    match fields.code {
        code::READ_CR0..=0x1F => {
            let cr = (fields.code & 0xF) as u8;
            let write = fields.code >= code::WRITE_CR0;
            let gpr = if fields.info1 & CR_DECODE_VALID != 0 {
                Some((fields.info1 & 0xF) as u8)
            } else {
                instruction
                    .and_then(|bytes| decode_mov_cr(bytes, fields.long_mode))
                    .filter(|mov| mov.cr == cr && mov.write == write)
                    .map(|mov| mov.gpr)
            };
            match gpr {
                Some(gpr) => Exit::ControlRegister(CrAccess {
                    cr,
                    kind: if write {
                        CrAccessKind::Write { gpr }
                    } else {
                        CrAccessKind::Read { gpr }
                    },
                }),
                None => unhandled,
            }
        }
        code if code == code::EXCEPTION_0 + INVALID_OPCODE => Exit::InvalidOpcode,
        code::INTR if fields.slice_over => Exit::Preempted,
        code::INTR => Exit::ExternalInterrupt,
        code::NMI => Exit::Nmi,
        code::VINTR => Exit::InterruptWindow,
        code::CPUID => Exit::Cpuid,
        code::IRET => Exit::NmiWindow,
        code::INVD | code::WBINVD => Exit::CacheFlush,
        code::HLT => Exit::Hlt,
        code::IOIO => decode_io(fields),
        code::MSR if fields.info1 == 0 => Exit::Rdmsr,
        code::MSR if fields.info1 == 1 => Exit::Wrmsr,
        code::SHUTDOWN => Exit::TripleFault,
        code::VMMCALL => Exit::Hypercall,
        code::VMRUN
        | code::VMLOAD..=code::SKINIT
        | code::RDTSCP
        | code::MONITOR..=code::MWAIT_CONDITIONAL => Exit::UndefinedInstruction,
        code::XSETBV => Exit::Xsetbv,
        code::NPF => Exit::NestedPageFault {
            gpa: fields.info2,
            detail: fields.info1,
        },
        code::INVALID | code::INVALID_32 => Exit::InvalidGuestState {
            reason: fields.code,
        },
        _ => unhandled,
    }
}

fn decode_io(fields: &ExitFields) -> Exit {
    let info = fields.info1;
    // SZ8, SZ16, SZ32 in bits 4 to 6.
    let size = match (info >> 4) & 0b111 {
        0b001 => 1,
        0b010 => 2,
        _ => 4,
    };
    let io = IoAccess {
        port: ((info >> 16) & 0xFFFF) as u16,
        size,
        input: info & IOIO_IN != 0,
    };
    if info & IOIO_STRING == 0 {
        return Exit::Io(io);
    }
    // A16, A32, A64 in bits 7 to 9.
    let (address_size, mask) = match (info >> 7) & 0b111 {
        0b001 => (2, 0xFFFF),
        0b010 => (4, 0xFFFF_FFFF),
        _ => (8, u64::MAX),
    };
    // INS writes ES:RDI; OUTS reads DS:RSI (a segment override is not
    // reported without decode assists: DS is assumed). 64-bit code has
    // flat DS and ES.
    let (base, offset) = if io.input {
        (fields.es_base, fields.rdi)
    } else {
        (fields.ds_base, fields.rsi)
    };
    let base = if fields.long_mode { 0 } else { base };
    Exit::StringIo(StringIoAccess {
        io,
        rep: info & IOIO_REP != 0,
        address_size,
        linear: base.wrapping_add(offset & mask),
    })
}

/// A decoded MOV to or from a control register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovCr {
    /// The control register (LOCK MOV CR0 is CR8 on AMD).
    pub cr: u8,
    /// MOV to CRn (else from).
    pub write: bool,
    /// The general-purpose register (0-15, RAX first).
    pub gpr: u8,
    /// The instruction's length in bytes.
    pub length: u8,
}

/// The prefixes before the opcode: legacy prefixes, then in 64-bit code a
/// REX byte. Returns (LOCK seen, REX, bytes of prefixes), or `None` when
/// there are more than 14.
fn prefixes(bytes: &[u8], long_mode: bool) -> Option<(bool, u8, usize)> {
    let mut lock = false;
    let mut rex = 0;
    for (at, &byte) in bytes.iter().enumerate().take(14) {
        match byte {
            0xF0 => {
                lock = true;
                rex = 0;
            }
            0x66 | 0x67 | 0xF2 | 0xF3 | 0x2E | 0x36 | 0x3E | 0x26 | 0x64 | 0x65 => rex = 0,
            0x40..=0x4F if long_mode => rex = byte,
            _ => return Some((lock, rex, at)),
        }
    }
    None
}

/// Decodes `0F 20 /r` (MOV from CR) or `0F 22 /r` (MOV to CR) at the
/// start of `bytes`; `None` for anything else.
pub fn decode_mov_cr(bytes: &[u8], long_mode: bool) -> Option<MovCr> {
    let (lock, rex, at) = prefixes(bytes, long_mode)?;
    let [0x0F, opcode, modrm] = *bytes.get(at..at + 3)? else {
        return None;
    };
    let write = match opcode {
        0x20 => false,
        0x22 => true,
        _ => return None,
    };
    let mut cr = ((modrm >> 3) & 7) | if rex & 0x4 != 0 { 8 } else { 0 };
    if lock && cr == 0 {
        cr = 8;
    }
    Some(MovCr {
        cr,
        write,
        gpr: (modrm & 7) | if rex & 0x1 != 0 { 8 } else { 0 },
        length: (at + 3) as u8,
    })
}

/// The length of the intercepted instruction at the start of `bytes`
/// that exited with `code`, for a CPU without NRIP save; `None` when the
/// bytes are not that instruction (or the exit is not an instruction's).
/// IOIO exits carry the next RIP in EXITINFO2 and need no length.
pub fn instruction_length(code: u64, bytes: &[u8], long_mode: bool) -> Option<u8> {
    if matches!(code, 0x00..=0x1F) {
        return decode_mov_cr(bytes, long_mode).map(|mov| mov.length);
    }
    let (_, _, at) = prefixes(bytes, long_mode)?;
    let opcode = bytes.get(at..)?;
    let expected: &[u8] = match code {
        code::CPUID => &[0x0F, 0xA2],
        code::HLT => &[0xF4],
        code::INVD => &[0x0F, 0x08],
        code::WBINVD => &[0x0F, 0x09],
        code::MSR => match opcode.get(..2)? {
            [0x0F, 0x32] => &[0x0F, 0x32],
            _ => &[0x0F, 0x30],
        },
        code::XSETBV => &[0x0F, 0x01, 0xD1],
        code::VMMCALL => &[0x0F, 0x01, 0xD9],
        _ => return None,
    };
    opcode
        .starts_with(expected)
        .then_some((at + expected.len()) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(code: u64, info1: u64) -> ExitFields {
        ExitFields {
            code,
            info1,
            ..ExitFields::default()
        }
    }

    #[test]
    fn instruction_intercepts_map_to_their_exits() {
        assert_eq!(decode(&fields(code::CPUID, 0), None), Exit::Cpuid);
        assert_eq!(decode(&fields(code::HLT, 0), None), Exit::Hlt);
        assert_eq!(decode(&fields(code::MSR, 0), None), Exit::Rdmsr);
        assert_eq!(decode(&fields(code::MSR, 1), None), Exit::Wrmsr);
        assert_eq!(
            decode(&fields(code::MSR, 2), None),
            Exit::Unhandled { reason: code::MSR }
        );
        assert_eq!(decode(&fields(code::XSETBV, 0), None), Exit::Xsetbv);
        assert_eq!(decode(&fields(code::VMMCALL, 0), None), Exit::Hypercall);
        assert_eq!(
            decode(&fields(code::VMRUN, 0), None),
            Exit::UndefinedInstruction
        );
        assert_eq!(decode(&fields(0x84, 0), None), Exit::UndefinedInstruction);
        assert_eq!(decode(&fields(0x8B, 0), None), Exit::UndefinedInstruction);
        assert_eq!(
            decode(&fields(code::RDTSCP, 0), None),
            Exit::UndefinedInstruction
        );
        assert_eq!(decode(&fields(code::WBINVD, 0), None), Exit::CacheFlush);
        assert_eq!(decode(&fields(code::INVD, 0), None), Exit::CacheFlush);
        assert_eq!(decode(&fields(0x46, 0), None), Exit::InvalidOpcode);
        assert_eq!(
            decode(&fields(0x4E, 0), None),
            Exit::Unhandled { reason: 0x4E }
        );
        assert_eq!(decode(&fields(code::SHUTDOWN, 0), None), Exit::TripleFault);
        assert_eq!(
            decode(&fields(code::INVALID_32, 0), None),
            Exit::InvalidGuestState {
                reason: code::INVALID_32
            }
        );
        assert_eq!(
            decode(&fields(code::INVALID, 0), None),
            Exit::InvalidGuestState {
                reason: code::INVALID
            }
        );
    }

    #[test]
    fn events_and_windows() {
        assert_eq!(decode(&fields(code::NMI, 0), None), Exit::Nmi);
        assert_eq!(decode(&fields(code::VINTR, 0), None), Exit::InterruptWindow);
        assert_eq!(decode(&fields(code::IRET, 0), None), Exit::NmiWindow);
        assert_eq!(
            decode(&fields(code::INTR, 0), None),
            Exit::ExternalInterrupt
        );
        let over = ExitFields {
            slice_over: true,
            ..fields(code::INTR, 0)
        };
        assert_eq!(decode(&over, None), Exit::Preempted);
    }

    #[test]
    fn nested_page_faults_carry_address_and_error_code() {
        let npf = ExitFields {
            info2: 0xFEE0_0030,
            ..fields(code::NPF, 0b110)
        };
        assert_eq!(
            decode(&npf, None),
            Exit::NestedPageFault {
                gpa: 0xFEE0_0030,
                detail: 0b110
            }
        );
    }

    #[test]
    fn port_io_decodes_port_size_and_direction() {
        // OUT DX, AL to 0x3F8: SZ8.
        let out = fields(code::IOIO, (0x3F8 << 16) | (1 << 4));
        assert_eq!(
            decode(&out, None),
            Exit::Io(IoAccess {
                port: 0x3F8,
                size: 1,
                input: false
            })
        );
        // IN EAX, 0xF4: SZ32.
        let input = fields(code::IOIO, (0xF4 << 16) | (1 << 6) | IOIO_IN);
        assert_eq!(
            decode(&input, None),
            Exit::Io(IoAccess {
                port: 0xF4,
                size: 4,
                input: true
            })
        );
    }

    #[test]
    fn string_io_addresses_the_element_through_its_segment() {
        // REP OUTSW, 32-bit addresses: DS:ESI.
        let outs = ExitFields {
            rsi: 0xFFFF_FFFF_0000_1000,
            ds_base: 0x10_0000,
            ..fields(
                code::IOIO,
                (0x80 << 16) | IOIO_STRING | IOIO_REP | (1 << 5) | (1 << 8),
            )
        };
        assert_eq!(
            decode(&outs, None),
            Exit::StringIo(StringIoAccess {
                io: IoAccess {
                    port: 0x80,
                    size: 2,
                    input: false
                },
                rep: true,
                address_size: 4,
                linear: 0x10_1000,
            })
        );
        // INSB in 64-bit code: RDI, ES base ignored.
        let ins = ExitFields {
            rdi: 0x2000,
            es_base: 0x999,
            long_mode: true,
            ..fields(
                code::IOIO,
                (0x60 << 16) | IOIO_STRING | IOIO_IN | (1 << 4) | (1 << 9),
            )
        };
        let Exit::StringIo(access) = decode(&ins, None) else {
            panic!("not string I/O");
        };
        assert_eq!(
            (access.linear, access.address_size, access.rep),
            (0x2000, 8, false)
        );
        assert!(access.io.input);
    }

    #[test]
    fn cr8_accesses_decode_from_the_instruction_without_decode_assists() {
        // mov rax, cr8 (REX.R): 44 0F 20 C0.
        let read = fields(code::READ_CR0 + 8, 0);
        assert!(needs_instruction(read.code, read.info1));
        let long = ExitFields {
            long_mode: true,
            ..read
        };
        assert_eq!(
            decode(&long, Some(&[0x44, 0x0F, 0x20, 0xC0])),
            Exit::ControlRegister(CrAccess {
                cr: 8,
                kind: CrAccessKind::Read { gpr: 0 }
            })
        );
        // mov cr8, r9 (REX.R and REX.B): 45 0F 22 C1.
        let write = ExitFields {
            long_mode: true,
            ..fields(code::WRITE_CR0 + 8, 0)
        };
        assert_eq!(
            decode(&write, Some(&[0x45, 0x0F, 0x22, 0xC1])),
            Exit::ControlRegister(CrAccess {
                cr: 8,
                kind: CrAccessKind::Write { gpr: 9 }
            })
        );
        // 32-bit code: LOCK mov cr0, ebx is AMD's CR8: F0 0F 22 C3.
        let legacy = fields(code::WRITE_CR0 + 8, 0);
        assert_eq!(
            decode(&legacy, Some(&[0xF0, 0x0F, 0x22, 0xC3])),
            Exit::ControlRegister(CrAccess {
                cr: 8,
                kind: CrAccessKind::Write { gpr: 3 }
            })
        );
        // Bytes of another instruction (or another CR) are not trusted.
        assert_eq!(
            decode(&write, Some(&[0x0F, 0x22, 0xC1])),
            Exit::Unhandled {
                reason: code::WRITE_CR0 + 8
            }
        );
        assert_eq!(
            decode(&write, Some(&[0x0F, 0xA2])),
            Exit::Unhandled {
                reason: code::WRITE_CR0 + 8
            }
        );
        assert_eq!(
            decode(&write, None),
            Exit::Unhandled {
                reason: code::WRITE_CR0 + 8
            }
        );
    }

    #[test]
    fn decode_assists_name_the_register() {
        let assisted = fields(code::WRITE_CR0 + 8, CR_DECODE_VALID | 10);
        assert!(!needs_instruction(assisted.code, assisted.info1));
        assert_eq!(
            decode(&assisted, None),
            Exit::ControlRegister(CrAccess {
                cr: 8,
                kind: CrAccessKind::Write { gpr: 10 }
            })
        );
    }

    #[test]
    fn rex_is_a_prefix_only_in_64_bit_code() {
        // In 32-bit code 0x44 is INC ESP, not a prefix.
        assert_eq!(decode_mov_cr(&[0x44, 0x0F, 0x20, 0xC0], false), None);
        assert_eq!(
            decode_mov_cr(&[0x0F, 0x20, 0xD8], false),
            Some(MovCr {
                cr: 3,
                write: false,
                gpr: 0,
                length: 3
            })
        );
    }

    #[test]
    fn lengths_of_intercepted_instructions_count_their_prefixes() {
        assert_eq!(
            instruction_length(code::CPUID, &[0x0F, 0xA2], false),
            Some(2)
        );
        assert_eq!(instruction_length(code::HLT, &[0xF4, 0x90], false), Some(1));
        assert_eq!(instruction_length(code::MSR, &[0x0F, 0x32], true), Some(2));
        assert_eq!(
            instruction_length(code::MSR, &[0x48, 0x0F, 0x30], true),
            Some(3)
        );
        assert_eq!(
            instruction_length(code::XSETBV, &[0x0F, 0x01, 0xD1], true),
            Some(3)
        );
        assert_eq!(
            instruction_length(code::VMMCALL, &[0x66, 0x0F, 0x01, 0xD9], false),
            Some(4)
        );
        assert_eq!(
            instruction_length(code::WRITE_CR0 + 8, &[0x44, 0x0F, 0x22, 0xC0], true),
            Some(4)
        );
        // Not the instruction the exit names.
        assert_eq!(instruction_length(code::CPUID, &[0xF4], false), None);
        assert_eq!(instruction_length(code::NPF, &[0x0F, 0xA2], false), None);
        // Fifteen prefixes are no instruction.
        assert_eq!(instruction_length(code::HLT, &[0x66; 15], false), None);
    }
}
