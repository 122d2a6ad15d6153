//! Builders of test inputs shared by the unit tests.

use crate::bzimage::{XLF_CAN_BE_LOADED_ABOVE_4G, XLF_KERNEL_64, hdr};

/// A synthetic bzImage whose header fields the tests can set one by one.
/// The defaults mirror the Debian 6.1 kernel's header, scaled down.
#[derive(Clone, Debug)]
pub(crate) struct FakeBzImage {
    pub setup_sects: u8,
    pub version: u16,
    pub loadflags: u8,
    pub xloadflags: u16,
    pub relocatable: u8,
    pub kernel_alignment: u32,
    pub pref_address: u64,
    pub init_size: u32,
    pub cmdline_size: u32,
    /// Length of the protected-mode code.
    pub kernel_len: u32,
    /// `None`: derived from `kernel_len`.
    pub syssize: Option<u32>,
    pub payload_offset: u32,
    pub payload_len: u32,
}

impl Default for FakeBzImage {
    fn default() -> Self {
        Self {
            setup_sects: 7,
            version: 0x020f,
            loadflags: 0x01,
            xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G | 0x7c,
            relocatable: 1,
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 0x3_f000,
            cmdline_size: 2047,
            kernel_len: 0x3000,
            syssize: None,
            payload_offset: 0x2cc,
            payload_len: 0x2000,
        }
    }
}

impl FakeBzImage {
    /// Bytes of real-mode setup code before the kernel.
    pub(crate) fn setup_len(&self) -> usize {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            self.setup_sects
        };
        (usize::from(sects) + 1) * 512
    }

    /// The image file.
    pub(crate) fn build(&self) -> Vec<u8> {
        let setup_len = self.setup_len();
        let mut image = vec![0u8; setup_len + self.kernel_len as usize];
        let mut put = |offset: usize, bytes: &[u8]| {
            image[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        let syssize = self.syssize.unwrap_or(self.kernel_len.div_ceil(16));
        put(hdr::SETUP_SECTS, &[self.setup_sects]);
        put(hdr::SYSSIZE, &syssize.to_le_bytes());
        put(hdr::BOOT_FLAG, &0xAA55u16.to_le_bytes());
        put(hdr::JUMP, &[0xeb, 0x6a]); // header ends at 0x26c, as in 6.1
        put(hdr::HEADER, b"HdrS");
        put(hdr::VERSION, &self.version.to_le_bytes());
        put(hdr::KERNEL_VERSION, &0x0300u16.to_le_bytes());
        put(0x500, b"6.1.0-test (fake@example) #1 SMP\0");
        put(hdr::LOADFLAGS, &[self.loadflags]);
        put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        put(hdr::KERNEL_ALIGNMENT, &self.kernel_alignment.to_le_bytes());
        put(hdr::RELOCATABLE_KERNEL, &[self.relocatable]);
        put(0x235, &[21]); // min_alignment
        put(hdr::XLOADFLAGS, &self.xloadflags.to_le_bytes());
        put(hdr::CMDLINE_SIZE, &self.cmdline_size.to_le_bytes());
        put(hdr::PAYLOAD_OFFSET, &self.payload_offset.to_le_bytes());
        put(hdr::PAYLOAD_LENGTH, &self.payload_len.to_le_bytes());
        put(hdr::PREF_ADDRESS, &self.pref_address.to_le_bytes());
        put(hdr::INIT_SIZE, &self.init_size.to_le_bytes());
        put(0x264, &0x1234u32.to_le_bytes()); // handover_offset
        // The protected-mode code: a recognisable pattern and an xz payload.
        for (i, byte) in image[setup_len..].iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(7);
        }
        let payload = setup_len + self.payload_offset as usize;
        if let Some(magic) = image.get_mut(payload..payload + 6) {
            magic.copy_from_slice(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]);
        }
        image
    }
}

/// The randomized tests' generator: the workspace's seeded one
/// (fastrand), reproducible from its seed.
#[derive(Clone, Debug)]
pub(crate) struct Rng(fastrand::Rng);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// A value in `0..bound` (`bound > 0`).
    pub(crate) fn below(&mut self, bound: usize) -> usize {
        self.0.usize(0..bound)
    }
}
