//! The register set of a CPU as the crash path saves it and a dump holds
//! it: Linux's `user_regs_struct` order, so a saved record becomes the
//! `pr_reg` of an ELF `NT_PRSTATUS` note as is and gdb reads it.

/// Registers in a `user_regs_struct`.
pub const PR_REG_COUNT: usize = 27;

/// A CPU's registers in `user_regs_struct` order.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct CpuRegisters {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

const _: () = assert!(core::mem::size_of::<CpuRegisters>() == PR_REG_COUNT * 8);

impl CpuRegisters {
    /// Registers in a `user_regs_struct`.
    pub const COUNT: usize = PR_REG_COUNT;

    /// The registers in `pr_reg` order.
    pub const fn to_array(&self) -> [u64; PR_REG_COUNT] {
        [
            self.r15,
            self.r14,
            self.r13,
            self.r12,
            self.rbp,
            self.rbx,
            self.r11,
            self.r10,
            self.r9,
            self.r8,
            self.rax,
            self.rcx,
            self.rdx,
            self.rsi,
            self.rdi,
            self.orig_rax,
            self.rip,
            self.cs,
            self.eflags,
            self.rsp,
            self.ss,
            self.fs_base,
            self.gs_base,
            self.ds,
            self.es,
            self.fs,
            self.gs,
        ]
    }

    /// The registers from an array in `pr_reg` order.
    pub const fn from_array(r: [u64; PR_REG_COUNT]) -> Self {
        Self {
            r15: r[0],
            r14: r[1],
            r13: r[2],
            r12: r[3],
            rbp: r[4],
            rbx: r[5],
            r11: r[6],
            r10: r[7],
            r9: r[8],
            r8: r[9],
            rax: r[10],
            rcx: r[11],
            rdx: r[12],
            rsi: r[13],
            rdi: r[14],
            orig_rax: r[15],
            rip: r[16],
            cs: r[17],
            eflags: r[18],
            rsp: r[19],
            ss: r[20],
            fs_base: r[21],
            gs_base: r[22],
            ds: r[23],
            es: r[24],
            fs: r[25],
            gs: r[26],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_array_order_is_user_regs_struct_order() {
        let array: [u64; PR_REG_COUNT] = core::array::from_fn(|i| i as u64 + 100);
        let regs = CpuRegisters::from_array(array);
        // Spot checks against Linux's arch/x86/include/asm/user_64.h.
        assert_eq!(regs.r15, 100);
        assert_eq!(regs.rax, 110);
        assert_eq!(regs.orig_rax, 115);
        assert_eq!(regs.rip, 116);
        assert_eq!(regs.eflags, 118);
        assert_eq!(regs.rsp, 119);
        assert_eq!(regs.gs, 126);
        assert_eq!(regs.to_array(), array);
    }

    #[test]
    fn the_struct_layout_is_the_array_layout() {
        assert_eq!(core::mem::offset_of!(CpuRegisters, rip), 16 * 8);
        assert_eq!(core::mem::offset_of!(CpuRegisters, gs), 26 * 8);
    }
}
