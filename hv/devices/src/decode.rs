//! Decoding the instruction behind an MMIO access.
//!
//! An EPT violation (NPT fault on SVM) on the local APIC or I/O APIC page
//! gives the kernel the guest-physical address but not the access's width,
//! direction or register. It fetches the instruction's bytes at the guest's
//! RIP and [`decode`]s them here. Only the forms compilers emit for a
//! volatile load or store are known:
//!
//! | opcode | form |
//! |---|---|
//! | 88, 89 | `mov r/m, reg` (store) |
//! | 8A, 8B | `mov reg, r/m` (load) |
//! | C6 /0, C7 /0 | `mov r/m, imm` (store) |
//! | A0-A3 | `mov al/ax/eax/rax, moffs` and back |
//! | 0F B6, 0F B7 | `movzx reg, r/m8` / `r/m16` (load) |
//! | 0F BE, 0F BF | `movsx reg, r/m8` / `r/m16` (load) |
//!
//! with operand-size, address-size, segment and REX prefixes, in 16-, 32-
//! and 64-bit code. Anything else is an error, which the kernel reports
//! (and stops the guest) rather than guesses at.

/// The code size of the guest at the access (CS.L, CS.D, CR0.PE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeSize {
    /// Real mode or 16-bit protected mode.
    Bits16,
    /// 32-bit protected or compatibility mode.
    Bits32,
    /// 64-bit mode.
    Bits64,
}

/// How a load's value reaches its register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extend {
    /// `mov` and `movzx`: zero-extended.
    Zero,
    /// `movsx`: sign-extended.
    Sign,
}

/// A store's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A register: index 0-15 (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI,
    /// R8-R15); `high_byte` for AH, CH, DH, BH (index 0-3).
    Register {
        /// Register index.
        reg: u8,
        /// Bits 15:8 of it.
        high_byte: bool,
    },
    /// An immediate, already sign-extended as the instruction does.
    Immediate(u64),
}

/// What the instruction does with the memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads memory into a register.
    Load {
        /// Register index 0-15.
        reg: u8,
        /// AH, CH, DH or BH.
        high_byte: bool,
        /// Size of the destination register in bytes (1, 2, 4, 8).
        dest_size: u8,
        /// Zero or sign extension from the memory size.
        extend: Extend,
    },
    /// Writes memory.
    Store(Source),
}

/// A decoded MMIO instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioInstruction {
    /// Instruction length: RIP advances by it.
    pub length: u8,
    /// Bytes of memory accessed (1, 2, 4, 8).
    pub size: u8,
    /// Load or store.
    pub access: Access,
}

/// Why the bytes are not a known MMIO instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end mid-instruction.
    Truncated,
    /// More than 15 bytes.
    TooLong,
    /// An opcode (0x0F-prefixed ones as 0x0Fxx) this decoder does not know.
    Unsupported(u16),
    /// A LOCK or REP prefix on a move.
    BadPrefix(u8),
    /// A register operand where memory was expected (ModRM.mod = 3).
    NotMemory,
}

fn mask(size: u8) -> u64 {
    match size {
        1 => 0xFF,
        2 => 0xFFFF,
        4 => 0xFFFF_FFFF,
        _ => u64::MAX,
    }
}

fn sign_extend(value: u64, size: u8) -> u64 {
    let bits = u32::from(size) * 8;
    if bits >= 64 {
        return value;
    }
    let shift = 64 - bits;
    (((value << shift) as i64) >> shift) as u64
}

impl MmioInstruction {
    /// For a store, the value written, from the guest's registers (RAX to
    /// R15 in encoding order).
    pub fn store_value(&self, regs: &[u64; 16]) -> Option<u64> {
        match self.access {
            Access::Store(Source::Register { reg, high_byte }) => {
                let value = regs[usize::from(reg & 15)];
                Some(if high_byte {
                    (value >> 8) & 0xFF
                } else {
                    value & mask(self.size)
                })
            }
            Access::Store(Source::Immediate(imm)) => Some(imm & mask(self.size)),
            Access::Load { .. } => None,
        }
    }

    /// For a load, the register's new value given its old one and the
    /// `value` read; `None` for a store. A 32-bit destination is
    /// zero-extended to 64 bits, 8- and 16-bit ones merge.
    pub fn load_result(&self, old: u64, value: u64) -> Option<u64> {
        let Access::Load {
            high_byte,
            dest_size,
            extend,
            ..
        } = self.access
        else {
            return None;
        };
        let value = value & mask(self.size);
        let value = match extend {
            Extend::Zero => value,
            Extend::Sign => sign_extend(value, self.size),
        };
        Some(match dest_size {
            1 if high_byte => (old & !0xFF00) | (value & 0xFF) << 8,
            1 => (old & !0xFF) | (value & 0xFF),
            2 => (old & !0xFFFF) | (value & 0xFFFF),
            4 => value & 0xFFFF_FFFF,
            _ => value,
        })
    }

    /// The register a load writes, if it is one.
    pub fn load_register(&self) -> Option<u8> {
        match self.access {
            Access::Load { reg, .. } => Some(reg),
            Access::Store(_) => None,
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        if self.at >= 15 {
            return Err(DecodeError::TooLong);
        }
        let b = *self.bytes.get(self.at).ok_or(DecodeError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        for _ in 0..n {
            self.byte()?;
        }
        Ok(())
    }

    fn imm(&mut self, n: usize) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..n {
            value |= u64::from(self.byte()?) << (8 * i);
        }
        Ok(value)
    }
}

/// Decodes the instruction at the start of `bytes` executed in `mode`.
pub fn decode(bytes: &[u8], mode: CodeSize) -> Result<MmioInstruction, DecodeError> {
    let mut c = Cursor { bytes, at: 0 };
    let mut operand_override = false;
    let mut address_override = false;
    let mut rex = 0u8;
    let opcode = loop {
        let b = c.byte()?;
        match b {
            0x66 => operand_override = true,
            0x67 => address_override = true,
            0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 => {}
            0xF0 | 0xF2 | 0xF3 => return Err(DecodeError::BadPrefix(b)),
            0x40..=0x4F if mode == CodeSize::Bits64 => {
                // REX counts only right before the opcode: any prefix after
                // it clears it again below.
                rex = b;
                continue;
            }
            _ => break b,
        }
        rex = 0;
    };
    let rex_w = rex & 8 != 0;
    let rex_r = (rex >> 2) & 1;
    let operand_size: u8 = match mode {
        CodeSize::Bits64 if rex_w => 8,
        CodeSize::Bits64 | CodeSize::Bits32 => {
            if operand_override {
                2
            } else {
                4
            }
        }
        CodeSize::Bits16 => {
            if operand_override {
                4
            } else {
                2
            }
        }
    };
    let address_size: u8 = match (mode, address_override) {
        (CodeSize::Bits64, false) => 8,
        (CodeSize::Bits64, true) | (CodeSize::Bits32, false) | (CodeSize::Bits16, true) => 4,
        (CodeSize::Bits32, true) | (CodeSize::Bits16, false) => 2,
    };
    // An 8-bit register operand: without REX, 4-7 are AH, CH, DH, BH.
    let byte_reg = |index: u8| -> (u8, bool) {
        if rex == 0 && (4..8).contains(&index) {
            (index - 4, true)
        } else {
            (index, false)
        }
    };

    let (size, access) = match opcode {
        0x88 | 0x89 | 0x8A | 0x8B | 0xC6 | 0xC7 => {
            let reg_field = modrm(&mut c, address_size)?;
            let reg = reg_field | rex_r << 3;
            let size = if opcode & 1 == 0 { 1 } else { operand_size };
            let access = match opcode {
                0x88 | 0x89 => {
                    let (reg, high_byte) = if size == 1 {
                        byte_reg(reg)
                    } else {
                        (reg, false)
                    };
                    Access::Store(Source::Register { reg, high_byte })
                }
                0x8A | 0x8B => {
                    let (reg, high_byte) = if size == 1 {
                        byte_reg(reg)
                    } else {
                        (reg, false)
                    };
                    Access::Load {
                        reg,
                        high_byte,
                        dest_size: size,
                        extend: Extend::Zero,
                    }
                }
                _ => {
                    if reg_field != 0 {
                        return Err(DecodeError::Unsupported(u16::from(opcode)));
                    }
                    let imm = match size {
                        1 => c.imm(1)?,
                        2 => c.imm(2)?,
                        // imm32, sign-extended for a 64-bit store.
                        _ => sign_extend(c.imm(4)?, 4) & mask(size),
                    };
                    Access::Store(Source::Immediate(imm))
                }
            };
            (size, access)
        }
        0xA0..=0xA3 => {
            c.skip(usize::from(address_size))?;
            let size = if opcode & 1 == 0 { 1 } else { operand_size };
            let access = if opcode < 0xA2 {
                Access::Load {
                    reg: 0,
                    high_byte: false,
                    dest_size: size,
                    extend: Extend::Zero,
                }
            } else {
                Access::Store(Source::Register {
                    reg: 0,
                    high_byte: false,
                })
            };
            (size, access)
        }
        0x0F => {
            let second = c.byte()?;
            let (size, extend) = match second {
                0xB6 => (1, Extend::Zero),
                0xB7 => (2, Extend::Zero),
                0xBE => (1, Extend::Sign),
                0xBF => (2, Extend::Sign),
                _ => return Err(DecodeError::Unsupported(0x0F00 | u16::from(second))),
            };
            let reg = modrm(&mut c, address_size)? | rex_r << 3;
            (
                size,
                Access::Load {
                    reg,
                    high_byte: false,
                    dest_size: operand_size,
                    extend,
                },
            )
        }
        _ => return Err(DecodeError::Unsupported(u16::from(opcode))),
    };
    Ok(MmioInstruction {
        // At most 15 (`Cursor::byte`).
        length: c.at as u8,
        size,
        access,
    })
}

/// Reads a ModRM byte with its SIB and displacement; returns the reg field.
/// The operand must be memory.
fn modrm(c: &mut Cursor<'_>, address_size: u8) -> Result<u8, DecodeError> {
    let modrm = c.byte()?;
    let mode = modrm >> 6;
    let reg = (modrm >> 3) & 7;
    let rm = modrm & 7;
    if mode == 3 {
        return Err(DecodeError::NotMemory);
    }
    if address_size == 2 {
        let disp = match (mode, rm) {
            (0, 6) | (2, _) => 2,
            (1, _) => 1,
            _ => 0,
        };
        c.skip(disp)?;
        return Ok(reg);
    }
    let mut disp = match mode {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = c.byte()?;
        if mode == 0 && sib & 7 == 5 {
            disp = 4;
        }
    } else if mode == 0 && rm == 5 {
        // disp32, RIP-relative in 64-bit mode.
        disp = 4;
    }
    c.skip(disp)?;
    Ok(reg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(reg: u8, dest_size: u8) -> Access {
        Access::Load {
            reg,
            high_byte: false,
            dest_size,
            extend: Extend::Zero,
        }
    }

    fn store_reg(reg: u8) -> Access {
        Access::Store(Source::Register {
            reg,
            high_byte: false,
        })
    }

    /// Instructions taken from the kvm-unit-tests binaries' disassembly.
    #[test]
    fn the_accesses_kvm_unit_tests_make() {
        let cases: &[(&[u8], u8, u8, Access)] = &[
            // xapic_read: mov eax, [rdi]
            (&[0x8B, 0x07], 2, 4, load(0, 4)),
            // xapic_write: mov [rdi], esi
            (&[0x89, 0x37], 2, 4, store_reg(6)),
            // ioapic_read_reg: mov eax, [rax+0x10]
            (&[0x8B, 0x40, 0x10], 3, 4, load(0, 4)),
            // reset_apic: mov dword [rax], 0x1ff
            (
                &[0xC7, 0x00, 0xFF, 0x01, 0x00, 0x00],
                6,
                4,
                Access::Store(Source::Immediate(0x1FF)),
            ),
            // xapic_icr_write: movabs [0xfee00310], eax
            (
                &[0xA3, 0x10, 0x03, 0xE0, 0xFE, 0, 0, 0, 0],
                9,
                4,
                store_reg(0),
            ),
            // xapic_id: movabs eax, [0xfee00020]
            (
                &[0xA1, 0x20, 0x00, 0xE0, 0xFE, 0, 0, 0, 0],
                9,
                4,
                load(0, 4),
            ),
            // memset: mov [rax], dl
            (
                &[0x88, 0x10],
                2,
                1,
                Access::Store(Source::Register {
                    reg: 2,
                    high_byte: false,
                }),
            ),
        ];
        for (bytes, length, size, access) in cases {
            let insn = decode(bytes, CodeSize::Bits64).unwrap();
            assert_eq!(
                (insn.length, insn.size, insn.access),
                (*length, *size, *access),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn prefixes_rex_and_register_merging() {
        // mov r9d, [r10+r11*4+0x12345678]
        let insn = decode(
            &[0x47, 0x8B, 0x8C, 0x9A, 0x78, 0x56, 0x34, 0x12],
            CodeSize::Bits64,
        )
        .unwrap();
        assert_eq!(
            (insn.length, insn.size, insn.load_register()),
            (8, 4, Some(9))
        );
        assert_eq!(
            insn.load_result(u64::MAX, 0x1234_5678_9ABC_DEF0),
            Some(0x9ABC_DEF0)
        );
        // mov rax, [rip+disp32] with REX.W
        let insn = decode(&[0x48, 0x8B, 0x05, 1, 2, 3, 4], CodeSize::Bits64).unwrap();
        assert_eq!((insn.length, insn.size), (7, 8));
        // 16-bit: mov ax, [bx+si]; 66-prefixed in 64-bit code.
        assert_eq!(decode(&[0x8B, 0x00], CodeSize::Bits16).unwrap().size, 2);
        let insn = decode(&[0x66, 0x8B, 0x08], CodeSize::Bits64).unwrap();
        assert_eq!((insn.size, insn.load_register()), (2, Some(1)));
        assert_eq!(
            insn.load_result(0xAAAA_BBBB_CCCC_DDDD, 0x1234),
            Some(0xAAAA_BBBB_CCCC_1234)
        );
        // mov ah, [rax]: high byte without REX; with REX it is SPL.
        let ah = decode(&[0x8A, 0x20], CodeSize::Bits64).unwrap();
        assert_eq!(
            ah.access,
            Access::Load {
                reg: 0,
                high_byte: true,
                dest_size: 1,
                extend: Extend::Zero
            }
        );
        assert_eq!(ah.load_result(0x1111, 0xAB), Some(0xAB11));
        let spl = decode(&[0x40, 0x8A, 0x20], CodeSize::Bits64).unwrap();
        assert_eq!(spl.load_register(), Some(4));
        // movsx eax, byte [rcx]; movzx rdx, word [rcx].
        let sx = decode(&[0x0F, 0xBE, 0x01], CodeSize::Bits64).unwrap();
        assert_eq!(sx.load_result(u64::MAX, 0x80), Some(0xFFFF_FF80));
        let zx = decode(&[0x48, 0x0F, 0xB7, 0x11], CodeSize::Bits64).unwrap();
        assert_eq!(
            (zx.size, zx.load_result(u64::MAX, 0xFFFF_8000)),
            (2, Some(0x8000))
        );
        // mov qword [rax], -1 (imm32 sign-extended); store values.
        let st = decode(
            &[0x48, 0xC7, 0x00, 0xFF, 0xFF, 0xFF, 0xFF],
            CodeSize::Bits64,
        )
        .unwrap();
        assert_eq!(st.store_value(&[0; 16]), Some(u64::MAX));
        let mut regs = [0u64; 16];
        regs[6] = 0xDEAD_BEEF_0000_1111;
        assert_eq!(
            decode(&[0x89, 0x37], CodeSize::Bits64)
                .unwrap()
                .store_value(&regs),
            Some(0x1111)
        );
        regs[3] = 0x5A00;
        let bh = decode(&[0x88, 0x38], CodeSize::Bits32).unwrap();
        assert_eq!(bh.store_value(&regs), Some(0x5A));
        // Segment override and 32-bit moffs in 32-bit code.
        let insn = decode(&[0x64, 0xA1, 0x30, 0x00, 0xE0, 0xFE], CodeSize::Bits32).unwrap();
        assert_eq!((insn.length, insn.size), (6, 4));
        // A REX followed by another prefix does not count.
        let insn = decode(&[0x48, 0x66, 0x8B, 0x00], CodeSize::Bits64).unwrap();
        assert_eq!(insn.size, 2);
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        assert_eq!(decode(&[], CodeSize::Bits64), Err(DecodeError::Truncated));
        assert_eq!(
            decode(&[0x8B], CodeSize::Bits64),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(&[0x8B, 0x80, 1, 2], CodeSize::Bits64),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(&[0x8B, 0xC0], CodeSize::Bits64),
            Err(DecodeError::NotMemory)
        );
        assert_eq!(
            decode(&[0xF0, 0x89, 0x00], CodeSize::Bits64),
            Err(DecodeError::BadPrefix(0xF0))
        );
        assert_eq!(
            decode(&[0xF3, 0xAB], CodeSize::Bits64),
            Err(DecodeError::BadPrefix(0xF3))
        );
        assert_eq!(
            decode(&[0x01, 0x00], CodeSize::Bits64),
            Err(DecodeError::Unsupported(0x01))
        );
        assert_eq!(
            decode(&[0x0F, 0x10, 0x00], CodeSize::Bits64),
            Err(DecodeError::Unsupported(0x0F10))
        );
        assert_eq!(
            decode(&[0xC7, 0x08, 0, 0, 0, 0], CodeSize::Bits64),
            Err(DecodeError::Unsupported(0xC7))
        );
        assert_eq!(
            decode(&[0x66; 20], CodeSize::Bits64),
            Err(DecodeError::TooLong)
        );
        // In 32-bit code 0x40 is INC EAX, not REX.
        assert_eq!(
            decode(&[0x40, 0x8B, 0x00], CodeSize::Bits32),
            Err(DecodeError::Unsupported(0x40))
        );
    }

    /// Every instruction the decoder accepts must decode the same under an
    /// independent decoder (iced-x86): length, memory size, register or
    /// immediate. Inputs: the known forms with random prefixes, ModRM, SIB,
    /// displacement and immediate bytes, and random bytes.
    #[test]
    fn agrees_with_an_independent_decoder() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};

        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        const OPCODES: [&[u8]; 14] = [
            &[0x88],
            &[0x89],
            &[0x8A],
            &[0x8B],
            &[0xC6],
            &[0xC7],
            &[0xA0],
            &[0xA1],
            &[0xA2],
            &[0xA3],
            &[0x0F, 0xB6],
            &[0x0F, 0xB7],
            &[0x0F, 0xBE],
            &[0x0F, 0xBF],
        ];
        const PREFIXES: [u8; 8] = [0x66, 0x67, 0x2E, 0x3E, 0x26, 0x64, 0x65, 0x36];
        let mut accepted = [0usize; 3];
        for round in 0..60_000 {
            let mode = [CodeSize::Bits16, CodeSize::Bits32, CodeSize::Bits64][round % 3];
            let bitness = [16, 32, 64][round % 3];
            let mut bytes = Vec::new();
            if round % 5 == 4 {
                bytes.extend((0..16).map(|_| next() as u8));
            } else {
                for _ in 0..next() % 3 {
                    bytes.push(PREFIXES[(next() % 8) as usize]);
                }
                if mode == CodeSize::Bits64 && next() % 2 == 0 {
                    bytes.push(0x40 | (next() % 16) as u8);
                }
                bytes.extend_from_slice(OPCODES[(next() % 14) as usize]);
                let mut modrm = next() as u8;
                if modrm >> 6 == 3 && next() % 4 != 0 {
                    modrm &= 0xBF;
                }
                if next() % 2 == 0 {
                    modrm &= 0xC7; // reg field 0, as C6/C7 want
                }
                bytes.push(modrm);
                bytes.extend((0..14).map(|_| next() as u8));
            }
            let ours = decode(&bytes, mode);
            let Ok(insn) = ours else { continue };
            accepted[round % 3] += 1;
            let mut decoder = Decoder::new(bitness, &bytes, DecoderOptions::NONE);
            let theirs = decoder.decode();
            let context = format!("{bytes:02x?} in {bitness}-bit: {insn:?} vs {theirs:?}");
            assert!(!theirs.is_invalid(), "{context}");
            assert_eq!(usize::from(insn.length), theirs.len(), "{context}");
            assert!(
                matches!(
                    theirs.mnemonic(),
                    Mnemonic::Mov | Mnemonic::Movzx | Mnemonic::Movsx
                ),
                "{context}"
            );
            assert_eq!(
                usize::from(insn.size),
                theirs.memory_size().size(),
                "{context}"
            );
            let reg_of = |r: Register| {
                let high = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
                (r.full_register().number() as u8, high)
            };
            match insn.access {
                Access::Load {
                    reg,
                    high_byte,
                    dest_size,
                    ..
                } => {
                    assert_eq!(theirs.op0_kind(), OpKind::Register, "{context}");
                    assert_eq!(reg_of(theirs.op0_register()), (reg, high_byte), "{context}");
                    assert_eq!(
                        usize::from(dest_size),
                        theirs.op0_register().size(),
                        "{context}"
                    );
                }
                Access::Store(Source::Register { reg, high_byte }) => {
                    assert_eq!(theirs.op1_kind(), OpKind::Register, "{context}");
                    assert_eq!(reg_of(theirs.op1_register()), (reg, high_byte), "{context}");
                }
                Access::Store(Source::Immediate(imm)) => {
                    assert_eq!(imm, theirs.immediate(1) & mask(insn.size), "{context}");
                }
            }
        }
        assert!(
            accepted.iter().all(|&n| n > 5_000),
            "too few accepted: {accepted:?}"
        );
    }
}
