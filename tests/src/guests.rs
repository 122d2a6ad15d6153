//! Small guest kernels made on the spot: multiboot1 ELF32 images whose
//! one segment holds a few instructions, for the bad-input cases (a guest
//! that triple-faults, floods exits, reads outside its memory) and a
//! well-behaved guest that prints a line and exits with status 0.

use std::path::PathBuf;

/// Where small guests are loaded when nothing else is asked: 1 MiB.
pub const LOAD_ADDRESS: u32 = 0x10_0000;

/// The code of a guest that prints `ok` on COM1 and writes 0 to the
/// debug-exit port (kvm-unit-tests' `exit(0)`: a pass).
pub const PRINTS_OK_AND_EXITS: &[u8] = &[
    0x66, 0xBA, 0xF8, 0x03, // mov dx, 0x3f8
    0xB0, b'o', 0xEE, // mov al, 'o'; out dx, al
    0xB0, b'k', 0xEE, // mov al, 'k'; out dx, al
    0xB0, b'\n', 0xEE, // mov al, '\n'; out dx, al
    0x66, 0xBA, 0xF4, 0x00, // mov dx, 0xf4
    0x31, 0xC0, // xor eax, eax
    0xEF, // out dx, eax
    0xF4, 0xEB, 0xFD, // hlt; jmp back to the hlt
];

/// A guest that loads an empty IDT and executes UD2: #UD cannot be
/// delivered, nor the #DF after it: a triple fault.
pub const TRIPLE_FAULTS: &[u8] = &[
    0xBC, 0x00, 0x80, 0x00, 0x00, // mov esp, 0x8000
    0x31, 0xC0, // xor eax, eax
    0x50, 0x50, // push eax; push eax
    0x0F, 0x01, 0x1C, 0x24, // lidt [esp]: limit 0, base 0
    0x0F, 0x0B, // ud2
];

/// A guest that writes to an I/O port (POST code 0x80) forever: one VM
/// exit every other instruction.
pub const FLOODS_EXITS: &[u8] = &[
    0xE6, 0x80, // out 0x80, al
    0xEB, 0xFC, // jmp back
];

/// A guest that reads guest-physical 1 GiB, which is neither its RAM (less
/// than that) nor a device.
pub const READS_OUTSIDE_ITS_MEMORY: &[u8] = &[
    0xA1, 0x00, 0x00, 0x00, 0x40, // mov eax, [0x40000000]
    0xF4, 0xEB, 0xFD, // hlt; jmp back
];

/// A multiboot1 ELF32 executable: `code` in one segment at `load`,
/// entered at its first byte.
pub fn multiboot_elf(code: &[u8], load: u32) -> Vec<u8> {
    const CODE_OFFSET: usize = 0x1000;
    let mut image = vec![0u8; CODE_OFFSET];
    let put16 = |image: &mut Vec<u8>, at: usize, v: u16| {
        image[at..at + 2].copy_from_slice(&v.to_le_bytes());
    };
    let put32 = |image: &mut Vec<u8>, at: usize, v: u32| {
        image[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    // ELF header.
    image[..7].copy_from_slice(&[0x7F, b'E', b'L', b'F', 1, 1, 1]);
    put16(&mut image, 16, 2); // ET_EXEC
    put16(&mut image, 18, 3); // EM_386
    put32(&mut image, 20, 1); // EV_CURRENT
    put32(&mut image, 24, load); // e_entry
    put32(&mut image, 28, 52); // e_phoff
    put16(&mut image, 40, 52); // e_ehsize
    put16(&mut image, 42, 32); // e_phentsize
    put16(&mut image, 44, 1); // e_phnum
    // The program header: one loadable segment.
    let len = code.len() as u32;
    for (i, value) in [1, CODE_OFFSET as u32, load, load, len, len, 7, 0x1000]
        .into_iter()
        .enumerate()
    {
        put32(&mut image, 52 + 4 * i, value);
    }
    // The multiboot1 header (flags 0: the ELF says where to load), within
    // the first 8 KiB.
    let magic = 0x1BAD_B002u32;
    put32(&mut image, 0x100, magic);
    put32(&mut image, 0x104, 0);
    put32(&mut image, 0x108, 0u32.wrapping_sub(magic));
    image.extend_from_slice(code);
    image
}

/// Writes `bytes` to `build/<dir>/<name>` and returns the path.
pub fn write_image(dir: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let dir = xtask::paths::workspace_root().join("build").join(dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}
