//! Validation of a Linux bzImage for the 64-bit boot protocol.
//!
//! The image is hostile input: it arrives as a boot module that anybody with
//! access to the boot configuration can replace, and a bad value here ends
//! up steering where the hypervisor copies bytes and where it jumps. So every
//! field the loader relies on is checked before it is used, with checked
//! arithmetic, and each rejection names what was wrong.
//!
//! What is accepted is what Linux's own `kexec_file_load` accepts for a
//! 64-bit bzImage (`arch/x86/kernel/kexec-bzimage64.c`), plus the checks
//! that make placement inside a small reservation safe: boot protocol 2.12
//! or later, `XLF_KERNEL_64` and `XLF_CAN_BE_LOADED_ABOVE_4G`, a relocatable
//! kernel, and sane `kernel_alignment`, `pref_address`, `init_size`,
//! `cmdline_size` and payload bounds.
//!
//! Layout of the file (Documentation/arch/x86/boot.rst): the real-mode setup
//! code is `(setup_sects + 1) * 512` bytes (`setup_sects == 0` means 4), the
//! setup header starts at 0x1f1 inside it, and the protected-mode kernel is
//! the rest of the file. Its 64-bit entry point `startup_64` lies 0x200
//! bytes after the address it is loaded at.

use core::fmt;
use core::ops::Range;

use crate::bytes::{self, u8_at, u16_at, u32_at, u64_at};

/// Offsets of the setup-header fields, from the start of the image file.
///
/// They are the same from the start of `struct boot_params`, since the
/// header sits at 0x1f1 in both.
pub mod hdr {
    /// Start of the setup header (`setup_sects`).
    pub const START: usize = 0x1f1;
    /// `setup_sects`: size of the setup code in 512-byte sectors, minus one.
    pub const SETUP_SECTS: usize = 0x1f1;
    /// `syssize`: size of the protected-mode code in 16-byte paragraphs.
    pub const SYSSIZE: usize = 0x1f4;
    /// `boot_flag`: 0xAA55.
    pub const BOOT_FLAG: usize = 0x1fe;
    /// `jump`: a short jump whose displacement byte (at 0x201) gives the end
    /// of the header: `0x202 + displacement`.
    pub const JUMP: usize = 0x200;
    /// `header`: the magic "HdrS".
    pub const HEADER: usize = 0x202;
    /// `version`: boot protocol version, major in the high byte.
    pub const VERSION: usize = 0x206;
    /// `kernel_version`: offset of the version string, minus 0x200.
    pub const KERNEL_VERSION: usize = 0x20e;
    /// `type_of_loader`.
    pub const TYPE_OF_LOADER: usize = 0x210;
    /// `loadflags`.
    pub const LOADFLAGS: usize = 0x211;
    /// `ramdisk_image`: low 32 bits of the initrd address.
    pub const RAMDISK_IMAGE: usize = 0x218;
    /// `ramdisk_size`: low 32 bits of the initrd size.
    pub const RAMDISK_SIZE: usize = 0x21c;
    /// `heap_end_ptr`: end of the real-mode setup heap.
    pub const HEAP_END_PTR: usize = 0x224;
    /// `cmd_line_ptr`: low 32 bits of the command-line address.
    pub const CMD_LINE_PTR: usize = 0x228;
    /// `kernel_alignment`: physical alignment the kernel needs.
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    /// `relocatable_kernel`: non-zero if the kernel may be loaded anywhere.
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    /// `xloadflags`.
    pub const XLOADFLAGS: usize = 0x236;
    /// `cmdline_size`: longest command line, without its terminating NUL.
    pub const CMDLINE_SIZE: usize = 0x238;
    /// `payload_offset`: start of the compressed kernel, from the start of
    /// the protected-mode code.
    pub const PAYLOAD_OFFSET: usize = 0x248;
    /// `payload_length`.
    pub const PAYLOAD_LENGTH: usize = 0x24c;
    /// `pref_address`: preferred (and, for the 64-bit entry, lowest
    /// effective) load address.
    pub const PREF_ADDRESS: usize = 0x258;
    /// `init_size`: memory the kernel needs from its load address while it
    /// decompresses and initializes.
    pub const INIT_SIZE: usize = 0x260;
    /// One past the last field this loader reads (`init_size`).
    pub const MIN_END: usize = 0x264;
    /// The setup header may not extend past this offset: `boot_params`
    /// holds `edd_mbr_sig_buffer` there.
    pub const MAX_END: usize = 0x290;
}

/// "HdrS", the setup-header magic.
pub const HEADER_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
/// The boot sector signature at 0x1fe.
pub const BOOT_FLAG_MAGIC: u16 = 0xAA55;
/// Boot protocol 2.12: the first with `xloadflags` and the 64-bit entry.
pub const MIN_PROTOCOL: u16 = 0x020C;
/// `loadflags` bit 0: the protected-mode code is loaded at 1 MiB or above.
pub const LOADED_HIGH: u8 = 1 << 0;
/// `xloadflags` bit 0: the kernel has the 64-bit entry at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags` bit 1: kernel, boot_params, command line and initrd may lie
/// above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// Offset of `startup_64` from the load address of the protected-mode code.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// Smallest `kernel_alignment` accepted: a page.
pub const MIN_KERNEL_ALIGNMENT: u64 = 4096;
/// Largest `kernel_alignment` accepted. Linux uses 2 MiB (up to 16 MiB with
/// `CONFIG_PHYSICAL_ALIGN`); 1 GiB already cannot fit a sane reservation.
pub const MAX_KERNEL_ALIGNMENT: u64 = 1 << 30;
/// Largest `init_size` accepted. Distribution kernels need well under
/// 128 MiB; anything above this is a corrupt header, not a kernel.
pub const MAX_INIT_SIZE: u64 = 1 << 30;
/// Largest `cmdline_size` accepted. x86 Linux has a 2 KiB command line.
pub const MAX_CMDLINE_SIZE: u32 = 64 * 1024;
/// `pref_address` must lie below the architectural physical-address limit.
pub const MAX_PHYS_ADDR: u64 = 1 << 52;
/// The kernel version string is read up to this many bytes.
const MAX_KERNEL_VERSION_LEN: usize = 256;

/// Why an image was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BzImageError {
    /// The file ends before `needed` bytes.
    Truncated {
        /// Length of the file.
        len: usize,
        /// Bytes needed to read the next field.
        needed: usize,
    },
    /// No 0xAA55 boot sector signature.
    BadBootFlag(u16),
    /// No "HdrS" setup-header magic.
    BadMagic(u32),
    /// Boot protocol older than 2.12.
    ProtocolTooOld(u16),
    /// The setup header, as its jump instruction gives it, ends before the
    /// fields this loader reads.
    HeaderTooShort {
        /// Where the header says it ends.
        end: usize,
    },
    /// The setup header would overlap the rest of `boot_params`.
    HeaderTooLong {
        /// Where the header says it ends.
        end: usize,
    },
    /// `LOADED_HIGH` clear: a zImage, not a bzImage.
    NotLoadedHigh,
    /// `XLF_KERNEL_64` clear: no 64-bit entry point.
    Not64BitCapable,
    /// `XLF_CAN_BE_LOADED_ABOVE_4G` clear.
    NotLoadableAbove4G,
    /// `relocatable_kernel` is 0: the kernel could only run at one address.
    NotRelocatable,
    /// The setup code, `(setup_sects + 1) * 512` bytes, does not fit the file.
    SetupExceedsImage {
        /// Size of the setup code in bytes.
        setup_len: usize,
        /// Length of the file.
        image_len: usize,
    },
    /// No protected-mode code after the setup code.
    EmptyKernel,
    /// `syssize` is 0 or larger than the protected-mode code.
    BadSyssize {
        /// `syssize * 16`.
        syssize_bytes: u64,
        /// Length of the protected-mode code.
        kernel_len: usize,
    },
    /// `kernel_alignment` is not a power of two in the accepted range.
    BadAlignment(u32),
    /// `pref_address` is not a multiple of `kernel_alignment`.
    PrefAddressMisaligned {
        /// The header's `pref_address`.
        pref_address: u64,
        /// The header's `kernel_alignment`.
        alignment: u32,
    },
    /// `pref_address` (plus `init_size`) is beyond physical memory.
    PrefAddressTooHigh(u64),
    /// `init_size` is 0.
    InitSizeZero,
    /// `init_size` is larger than [`MAX_INIT_SIZE`].
    InitSizeAbsurd(u32),
    /// `init_size` is smaller than the protected-mode code itself.
    InitSizeBelowKernel {
        /// The header's `init_size`.
        init_size: u32,
        /// Length of the protected-mode code.
        kernel_len: usize,
    },
    /// `cmdline_size` is 0 or larger than [`MAX_CMDLINE_SIZE`].
    BadCmdlineSize(u32),
    /// The compressed payload lies outside the protected-mode code.
    PayloadOutOfBounds {
        /// `payload_offset`.
        offset: u32,
        /// `payload_length`.
        length: u32,
        /// Length of the protected-mode code.
        kernel_len: usize,
    },
}

impl fmt::Display for BzImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated { len, needed } => {
                write!(f, "truncated: {len} bytes, at least {needed} needed")
            }
            Self::BadBootFlag(flag) => {
                write!(f, "no x86 boot sector: boot_flag {flag:#06x}, not 0xaa55")
            }
            Self::BadMagic(magic) => {
                write!(f, "not a bzImage: header magic {magic:#010x}, not \"HdrS\"")
            }
            Self::ProtocolTooOld(v) => write!(
                f,
                "boot protocol {}.{:02} is older than 2.12, which the 64-bit entry needs",
                v >> 8,
                v & 0xff
            ),
            Self::HeaderTooShort { end } => write!(
                f,
                "setup header ends at {end:#x}, before init_size at {:#x}",
                hdr::INIT_SIZE
            ),
            Self::HeaderTooLong { end } => write!(
                f,
                "setup header ends at {end:#x}, past the {:#x} boot_params allows",
                hdr::MAX_END
            ),
            Self::NotLoadedHigh => write!(f, "a zImage (LOADED_HIGH clear), not a bzImage"),
            Self::Not64BitCapable => write!(f, "no 64-bit entry point (XLF_KERNEL_64 clear)"),
            Self::NotLoadableAbove4G => {
                write!(
                    f,
                    "cannot be loaded above 4 GiB (XLF_CAN_BE_LOADED_ABOVE_4G clear)"
                )
            }
            Self::NotRelocatable => write!(f, "not a relocatable kernel"),
            Self::SetupExceedsImage {
                setup_len,
                image_len,
            } => write!(
                f,
                "setup code of {setup_len} bytes (setup_sects) does not fit the {image_len}-byte file"
            ),
            Self::EmptyKernel => write!(f, "no protected-mode kernel after the setup code"),
            Self::BadSyssize {
                syssize_bytes,
                kernel_len,
            } => write!(
                f,
                "syssize gives {syssize_bytes} bytes of kernel, the file holds {kernel_len}"
            ),
            Self::BadAlignment(a) => write!(
                f,
                "kernel_alignment {a:#x} is not a power of two between {MIN_KERNEL_ALIGNMENT:#x} and {MAX_KERNEL_ALIGNMENT:#x}"
            ),
            Self::PrefAddressMisaligned {
                pref_address,
                alignment,
            } => write!(
                f,
                "pref_address {pref_address:#x} is not aligned to kernel_alignment {alignment:#x}"
            ),
            Self::PrefAddressTooHigh(a) => {
                write!(
                    f,
                    "pref_address {a:#x} plus init_size is beyond physical memory"
                )
            }
            Self::InitSizeZero => write!(f, "init_size is 0"),
            Self::InitSizeAbsurd(s) => {
                write!(f, "init_size {s:#x} is larger than {MAX_INIT_SIZE:#x}")
            }
            Self::InitSizeBelowKernel {
                init_size,
                kernel_len,
            } => write!(
                f,
                "init_size {init_size:#x} is smaller than the {kernel_len:#x}-byte kernel"
            ),
            Self::BadCmdlineSize(s) => {
                write!(
                    f,
                    "cmdline_size {s} is not between 1 and {MAX_CMDLINE_SIZE}"
                )
            }
            Self::PayloadOutOfBounds {
                offset,
                length,
                kernel_len,
            } => write!(
                f,
                "payload [{offset:#x}, +{length:#x}) is outside the {kernel_len:#x}-byte kernel"
            ),
        }
    }
}

/// The compression of the kernel payload, recognised by its magic bytes.
/// Informational: the decompressor is inside the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// gzip.
    Gzip,
    /// bzip2.
    Bzip2,
    /// LZMA.
    Lzma,
    /// xz.
    Xz,
    /// LZO.
    Lzo,
    /// LZ4 (legacy frame).
    Lz4,
    /// Zstandard.
    Zstd,
    /// None of the above, or an empty payload.
    Unknown,
}

/// A validated bzImage. Borrowed from the module bytes: nothing is copied.
#[derive(Clone, Copy, Debug)]
pub struct BzImage<'a> {
    image: &'a [u8],
    version: u16,
    setup_len: usize,
    header_end: usize,
    kernel_alignment: u32,
    pref_address: u64,
    init_size: u32,
    cmdline_size: u32,
    xloadflags: u16,
    payload_start: usize,
    payload_end: usize,
}

fn field<T>(image: &[u8], offset: usize, size: usize, read: Option<T>) -> Result<T, BzImageError> {
    read.ok_or(BzImageError::Truncated {
        len: image.len(),
        needed: offset.saturating_add(size),
    })
}

impl<'a> BzImage<'a> {
    /// Validates `image` (the whole bzImage file).
    pub fn parse(image: &'a [u8]) -> Result<Self, BzImageError> {
        use BzImageError as E;
        // Every fixed field is read only after this, so the `field` calls
        // below cannot fail; they still go through checked reads.
        if image.len() < hdr::MIN_END {
            return Err(E::Truncated {
                len: image.len(),
                needed: hdr::MIN_END,
            });
        }
        let boot_flag = field(image, hdr::BOOT_FLAG, 2, u16_at(image, hdr::BOOT_FLAG))?;
        if boot_flag != BOOT_FLAG_MAGIC {
            return Err(E::BadBootFlag(boot_flag));
        }
        let magic = field(image, hdr::HEADER, 4, u32_at(image, hdr::HEADER))?;
        if magic != HEADER_MAGIC {
            return Err(E::BadMagic(magic));
        }
        let version = field(image, hdr::VERSION, 2, u16_at(image, hdr::VERSION))?;
        if version < MIN_PROTOCOL {
            return Err(E::ProtocolTooOld(version));
        }
        let jump_displacement = field(image, hdr::JUMP + 1, 1, u8_at(image, hdr::JUMP + 1))?;
        let header_end = hdr::HEADER + usize::from(jump_displacement);
        if header_end < hdr::MIN_END {
            return Err(E::HeaderTooShort { end: header_end });
        }
        if header_end > hdr::MAX_END {
            return Err(E::HeaderTooLong { end: header_end });
        }
        let loadflags = field(image, hdr::LOADFLAGS, 1, u8_at(image, hdr::LOADFLAGS))?;
        if loadflags & LOADED_HIGH == 0 {
            return Err(E::NotLoadedHigh);
        }
        let xloadflags = field(image, hdr::XLOADFLAGS, 2, u16_at(image, hdr::XLOADFLAGS))?;
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(E::Not64BitCapable);
        }
        if xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G == 0 {
            return Err(E::NotLoadableAbove4G);
        }
        let relocatable = field(
            image,
            hdr::RELOCATABLE_KERNEL,
            1,
            u8_at(image, hdr::RELOCATABLE_KERNEL),
        )?;
        if relocatable == 0 {
            return Err(E::NotRelocatable);
        }

        let setup_sects = field(image, hdr::SETUP_SECTS, 1, u8_at(image, hdr::SETUP_SECTS))?;
        let setup_sects = if setup_sects == 0 { 4 } else { setup_sects };
        // At most 256 * 512: cannot overflow.
        let setup_len = (usize::from(setup_sects) + 1) * 512;
        if setup_len < header_end || setup_len > image.len() {
            return Err(E::SetupExceedsImage {
                setup_len,
                image_len: image.len(),
            });
        }
        let kernel_len = image.len() - setup_len;
        if kernel_len == 0 {
            return Err(E::EmptyKernel);
        }
        let syssize = field(image, hdr::SYSSIZE, 4, u32_at(image, hdr::SYSSIZE))?;
        let syssize_bytes = u64::from(syssize) * 16;
        // `syssize` rounds the kernel up to whole paragraphs; signed images
        // carry extra bytes after it, so it may be smaller but never larger.
        let kernel_paragraphs = bytes::align_up(kernel_len as u64, 16);
        if syssize == 0 || kernel_paragraphs.is_none_or(|k| syssize_bytes > k) {
            return Err(E::BadSyssize {
                syssize_bytes,
                kernel_len,
            });
        }

        let kernel_alignment = field(
            image,
            hdr::KERNEL_ALIGNMENT,
            4,
            u32_at(image, hdr::KERNEL_ALIGNMENT),
        )?;
        let alignment = u64::from(kernel_alignment);
        if !alignment.is_power_of_two()
            || !(MIN_KERNEL_ALIGNMENT..=MAX_KERNEL_ALIGNMENT).contains(&alignment)
        {
            return Err(E::BadAlignment(kernel_alignment));
        }
        let init_size = field(image, hdr::INIT_SIZE, 4, u32_at(image, hdr::INIT_SIZE))?;
        if init_size == 0 {
            return Err(E::InitSizeZero);
        }
        if u64::from(init_size) > MAX_INIT_SIZE {
            return Err(E::InitSizeAbsurd(init_size));
        }
        if (init_size as usize) < kernel_len {
            return Err(E::InitSizeBelowKernel {
                init_size,
                kernel_len,
            });
        }
        let pref_address = field(
            image,
            hdr::PREF_ADDRESS,
            8,
            u64_at(image, hdr::PREF_ADDRESS),
        )?;
        if !pref_address.is_multiple_of(alignment) {
            return Err(E::PrefAddressMisaligned {
                pref_address,
                alignment: kernel_alignment,
            });
        }
        if pref_address
            .checked_add(u64::from(init_size))
            .is_none_or(|end| end > MAX_PHYS_ADDR)
        {
            return Err(E::PrefAddressTooHigh(pref_address));
        }
        let cmdline_size = field(
            image,
            hdr::CMDLINE_SIZE,
            4,
            u32_at(image, hdr::CMDLINE_SIZE),
        )?;
        if cmdline_size == 0 || cmdline_size > MAX_CMDLINE_SIZE {
            return Err(E::BadCmdlineSize(cmdline_size));
        }

        let payload_offset = field(
            image,
            hdr::PAYLOAD_OFFSET,
            4,
            u32_at(image, hdr::PAYLOAD_OFFSET),
        )?;
        let payload_length = field(
            image,
            hdr::PAYLOAD_LENGTH,
            4,
            u32_at(image, hdr::PAYLOAD_LENGTH),
        )?;
        let out_of_bounds = E::PayloadOutOfBounds {
            offset: payload_offset,
            length: payload_length,
            kernel_len,
        };
        let payload_start = setup_len
            .checked_add(payload_offset as usize)
            .ok_or(out_of_bounds)?;
        let payload_end = payload_start
            .checked_add(payload_length as usize)
            .ok_or(out_of_bounds)?;
        if payload_length == 0 || payload_end > image.len() {
            return Err(out_of_bounds);
        }

        Ok(Self {
            image,
            version,
            setup_len,
            header_end,
            kernel_alignment,
            pref_address,
            init_size,
            cmdline_size,
            xloadflags,
            payload_start,
            payload_end,
        })
    }

    /// The boot protocol version, e.g. 0x020f for 2.15.
    pub fn protocol_version(&self) -> u16 {
        self.version
    }

    /// The setup header as found in the file, from 0x1f1 to where its jump
    /// instruction says it ends: what goes into `boot_params.hdr`.
    pub fn setup_header(&self) -> &'a [u8] {
        self.image
            .get(hdr::START..self.header_end)
            .unwrap_or_default()
    }

    /// The protected-mode kernel: the bytes to copy to the load address.
    pub fn kernel_bytes(&self) -> &'a [u8] {
        self.image.get(self.setup_len..).unwrap_or_default()
    }

    /// Where [`Self::kernel_bytes`] lies in the file.
    pub fn kernel_file_range(&self) -> Range<usize> {
        self.setup_len..self.image.len()
    }

    /// Offset of the 64-bit entry point (`startup_64`) from the load address.
    pub fn entry_offset(&self) -> u64 {
        STARTUP_64_OFFSET
    }

    /// `kernel_alignment`: the load address must be a multiple of it (a
    /// power of two, at least a page).
    pub fn alignment(&self) -> u64 {
        u64::from(self.kernel_alignment)
    }

    /// `pref_address`. For the 64-bit entry of a relocatable kernel it is
    /// also the lowest address the kernel runs at: loaded below it, the
    /// decompressor moves itself *up to* `pref_address`
    /// (`arch/x86/boot/compressed/head_64.S`), which would be outside the
    /// reservation. [`crate::layout`] therefore never loads below it.
    pub fn pref_address(&self) -> u64 {
        self.pref_address
    }

    /// `init_size`: bytes the kernel uses from its load address while it
    /// decompresses and starts.
    pub fn init_size(&self) -> u64 {
        u64::from(self.init_size)
    }

    /// Memory to set aside at the load address: `init_size` (never smaller
    /// than the kernel bytes, see [`BzImageError::InitSizeBelowKernel`])
    /// rounded up to a page.
    pub fn load_footprint(&self) -> u64 {
        // init_size <= MAX_INIT_SIZE: cannot overflow.
        bytes::align_up(self.init_size(), crate::PAGE_SIZE).unwrap_or(u64::MAX)
    }

    /// `cmdline_size`: the longest command line, without its NUL.
    pub fn cmdline_size(&self) -> u32 {
        self.cmdline_size
    }

    /// `xloadflags`.
    pub fn xloadflags(&self) -> u16 {
        self.xloadflags
    }

    /// The compressed kernel inside [`Self::kernel_bytes`].
    pub fn payload(&self) -> &'a [u8] {
        self.image
            .get(self.payload_start..self.payload_end)
            .unwrap_or_default()
    }

    /// The payload's compression, from its magic bytes.
    pub fn compression(&self) -> Compression {
        let p = self.payload();
        let starts = |magic: &[u8]| p.starts_with(magic);
        if starts(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if starts(b"BZh") {
            Compression::Bzip2
        } else if starts(&[0x5d, 0x00, 0x00]) {
            Compression::Lzma
        } else if starts(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if starts(&[0x89, b'L', b'Z', b'O']) {
            Compression::Lzo
        } else if starts(&[0x02, 0x21, 0x4c, 0x18]) {
            Compression::Lz4
        } else if starts(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::Unknown
        }
    }

    /// The kernel's version string (what `uname -rv` prints), for the boot
    /// log. `None` if the header has none or it is not NUL-terminated UTF-8
    /// inside the setup code.
    pub fn kernel_version(&self) -> Option<&'a str> {
        let pointer = u16_at(self.image, hdr::KERNEL_VERSION)?;
        if pointer == 0 {
            return None;
        }
        let start = usize::from(pointer).checked_add(0x200)?;
        let setup = self.image.get(..self.setup_len)?;
        let rest = setup.get(start..)?;
        let rest = rest.get(..rest.len().min(MAX_KERNEL_VERSION_LEN))?;
        let len = rest.iter().position(|&b| b == 0)?;
        core::str::from_utf8(rest.get(..len)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::FakeBzImage;

    fn parse(image: &[u8]) -> Result<BzImage<'_>, BzImageError> {
        BzImage::parse(image)
    }

    #[test]
    fn a_well_formed_image_exposes_its_fields() {
        let fake = FakeBzImage::default();
        let bytes = fake.build();
        let image = parse(&bytes).unwrap();
        assert_eq!(image.protocol_version(), 0x020f);
        assert_eq!(image.kernel_file_range(), fake.setup_len()..bytes.len());
        assert_eq!(image.kernel_bytes(), &bytes[fake.setup_len()..]);
        assert_eq!(image.entry_offset(), 0x200);
        assert_eq!(image.alignment(), 0x20_0000);
        assert_eq!(image.pref_address(), 0x100_0000);
        assert_eq!(image.init_size(), u64::from(fake.init_size));
        assert_eq!(image.load_footprint(), 0x3_f000);
        assert_eq!(image.cmdline_size(), 2047);
        assert_eq!(image.setup_header().len(), 0x26c - 0x1f1);
        assert_eq!(image.setup_header()[0], fake.setup_sects);
        assert_eq!(image.compression(), Compression::Xz);
        assert_eq!(
            image.kernel_version(),
            Some("6.1.0-test (fake@example) #1 SMP")
        );
        assert_eq!(image.payload().len(), fake.payload_len as usize);
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let fake = FakeBzImage {
            setup_sects: 0,
            ..FakeBzImage::default()
        };
        let bytes = fake.build();
        let image = parse(&bytes).unwrap();
        assert_eq!(image.kernel_file_range().start, 5 * 512);
    }

    #[test]
    fn footprint_rounds_init_size_up_to_a_page() {
        let fake = FakeBzImage {
            init_size: 0x4_0001,
            ..FakeBzImage::default()
        };
        let bytes = fake.build();
        assert_eq!(parse(&bytes).unwrap().load_footprint(), 0x4_1000);
    }

    #[test]
    fn signed_images_with_bytes_after_syssize_are_accepted() {
        let mut bytes = FakeBzImage::default().build();
        bytes.extend_from_slice(&[0xAB; 0x600]); // an appended signature
        assert!(parse(&bytes).is_ok());
    }

    #[test]
    fn truncated_images_are_rejected() {
        let bytes = FakeBzImage::default().build();
        for len in [0, 1, 0x1f1, 0x263] {
            assert_eq!(
                parse(&bytes[..len]).unwrap_err(),
                BzImageError::Truncated {
                    len,
                    needed: hdr::MIN_END
                }
            );
        }
    }

    #[test]
    fn wrong_magic_numbers_are_rejected() {
        let mut bytes = FakeBzImage::default().build();
        bytes[hdr::BOOT_FLAG] = 0;
        assert_eq!(
            parse(&bytes).unwrap_err(),
            BzImageError::BadBootFlag(0xAA00)
        );
        let mut bytes = FakeBzImage::default().build();
        bytes[hdr::HEADER..hdr::HEADER + 4].copy_from_slice(b"HdrZ");
        assert_eq!(
            parse(&bytes).unwrap_err(),
            BzImageError::BadMagic(u32::from_le_bytes(*b"HdrZ"))
        );
    }

    #[test]
    fn protocols_before_2_12_are_rejected() {
        let fake = FakeBzImage {
            version: 0x020b,
            ..FakeBzImage::default()
        };
        let err = parse(&fake.build()).unwrap_err();
        assert_eq!(err, BzImageError::ProtocolTooOld(0x020b));
        assert!(err.to_string().contains("2.11"), "{err}");
    }

    #[test]
    fn header_extent_is_bounded_both_ways() {
        let mut bytes = FakeBzImage::default().build();
        bytes[hdr::JUMP + 1] = 0x20;
        assert_eq!(
            parse(&bytes).unwrap_err(),
            BzImageError::HeaderTooShort { end: 0x222 }
        );
        bytes[hdr::JUMP + 1] = 0xff;
        assert_eq!(
            parse(&bytes).unwrap_err(),
            BzImageError::HeaderTooLong { end: 0x301 }
        );
    }

    #[test]
    fn images_without_64_bit_or_high_loading_are_rejected() {
        let fake = FakeBzImage {
            loadflags: 0,
            ..FakeBzImage::default()
        };
        assert_eq!(
            parse(&fake.build()).unwrap_err(),
            BzImageError::NotLoadedHigh
        );
        let fake = FakeBzImage {
            xloadflags: XLF_CAN_BE_LOADED_ABOVE_4G,
            ..FakeBzImage::default()
        };
        assert_eq!(
            parse(&fake.build()).unwrap_err(),
            BzImageError::Not64BitCapable
        );
        let fake = FakeBzImage {
            xloadflags: XLF_KERNEL_64,
            ..FakeBzImage::default()
        };
        assert_eq!(
            parse(&fake.build()).unwrap_err(),
            BzImageError::NotLoadableAbove4G
        );
    }

    #[test]
    fn non_relocatable_kernels_are_rejected() {
        let fake = FakeBzImage {
            relocatable: 0,
            ..FakeBzImage::default()
        };
        assert_eq!(
            parse(&fake.build()).unwrap_err(),
            BzImageError::NotRelocatable
        );
    }

    #[test]
    fn setup_sects_beyond_the_file_are_rejected() {
        let fake = FakeBzImage::default();
        let mut bytes = fake.build();
        bytes[hdr::SETUP_SECTS] = 0xff;
        assert_eq!(
            parse(&bytes).unwrap_err(),
            BzImageError::SetupExceedsImage {
                setup_len: 256 * 512,
                image_len: bytes.len()
            }
        );
    }

    #[test]
    fn an_image_with_only_setup_code_is_rejected() {
        let fake = FakeBzImage::default();
        let bytes = fake.build();
        assert_eq!(
            parse(&bytes[..fake.setup_len()]).unwrap_err(),
            BzImageError::EmptyKernel
        );
    }

    #[test]
    fn syssize_must_be_nonzero_and_within_the_kernel() {
        for syssize in [0, 0x1_0000] {
            let fake = FakeBzImage {
                syssize: Some(syssize),
                ..FakeBzImage::default()
            };
            assert!(
                matches!(
                    parse(&fake.build()).unwrap_err(),
                    BzImageError::BadSyssize { syssize_bytes, .. } if syssize_bytes == u64::from(syssize) * 16
                ),
                "syssize {syssize:#x}"
            );
        }
    }

    #[test]
    fn kernel_alignment_must_be_a_sane_power_of_two() {
        for alignment in [0, 0x800, 0x20_0001, 0x8000_0000] {
            let fake = FakeBzImage {
                kernel_alignment: alignment,
                ..FakeBzImage::default()
            };
            assert_eq!(
                parse(&fake.build()).unwrap_err(),
                BzImageError::BadAlignment(alignment),
                "alignment {alignment:#x}"
            );
        }
    }

    #[test]
    fn pref_address_must_be_aligned_and_inside_physical_memory() {
        let fake = FakeBzImage {
            pref_address: 0x100_1000,
            ..FakeBzImage::default()
        };
        assert_eq!(
            parse(&fake.build()).unwrap_err(),
            BzImageError::PrefAddressMisaligned {
                pref_address: 0x100_1000,
                alignment: 0x20_0000
            }
        );
        for pref_address in [MAX_PHYS_ADDR, u64::MAX - 0x1f_ffff] {
            let fake = FakeBzImage {
                pref_address,
                ..FakeBzImage::default()
            };
            assert_eq!(
                parse(&fake.build()).unwrap_err(),
                BzImageError::PrefAddressTooHigh(pref_address)
            );
        }
    }

    #[test]
    fn init_size_must_be_nonzero_sane_and_cover_the_kernel() {
        let fake = FakeBzImage {
            init_size: 0,
            ..FakeBzImage::default()
        };
        assert_eq!(
            parse(&fake.build()).unwrap_err(),
            BzImageError::InitSizeZero
        );
        let fake = FakeBzImage {
            init_size: 0x4000_0001,
            ..FakeBzImage::default()
        };
        assert_eq!(
            parse(&fake.build()).unwrap_err(),
            BzImageError::InitSizeAbsurd(0x4000_0001)
        );
        let fake = FakeBzImage {
            init_size: 0x100,
            ..FakeBzImage::default()
        };
        assert_eq!(
            parse(&fake.build()).unwrap_err(),
            BzImageError::InitSizeBelowKernel {
                init_size: 0x100,
                kernel_len: fake.kernel_len as usize
            }
        );
    }

    #[test]
    fn cmdline_size_must_be_sane() {
        for cmdline_size in [0, MAX_CMDLINE_SIZE + 1] {
            let fake = FakeBzImage {
                cmdline_size,
                ..FakeBzImage::default()
            };
            assert_eq!(
                parse(&fake.build()).unwrap_err(),
                BzImageError::BadCmdlineSize(cmdline_size)
            );
        }
    }

    #[test]
    fn payload_must_lie_inside_the_kernel() {
        let base = FakeBzImage::default();
        let kernel_len = base.kernel_len as usize;
        for (offset, length) in [
            (0, 0),
            (0, base.kernel_len + 1),
            (base.kernel_len, 1),
            (u32::MAX, u32::MAX),
        ] {
            let fake = FakeBzImage {
                payload_offset: offset,
                payload_len: length,
                ..base.clone()
            };
            assert_eq!(
                parse(&fake.build()).unwrap_err(),
                BzImageError::PayloadOutOfBounds {
                    offset,
                    length,
                    kernel_len
                },
                "payload {offset:#x}+{length:#x}"
            );
        }
    }

    #[test]
    fn a_bad_kernel_version_pointer_gives_no_version() {
        let mut bytes = FakeBzImage::default().build();
        bytes[hdr::KERNEL_VERSION..hdr::KERNEL_VERSION + 2]
            .copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(parse(&bytes).unwrap().kernel_version(), None);
        bytes[hdr::KERNEL_VERSION..hdr::KERNEL_VERSION + 2].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(parse(&bytes).unwrap().kernel_version(), None);
    }

    #[test]
    fn every_rejection_has_a_message() {
        let errors = [
            BzImageError::Truncated { len: 1, needed: 2 },
            BzImageError::BadBootFlag(0),
            BzImageError::BadMagic(0),
            BzImageError::ProtocolTooOld(0x0200),
            BzImageError::HeaderTooShort { end: 0x220 },
            BzImageError::HeaderTooLong { end: 0x300 },
            BzImageError::NotLoadedHigh,
            BzImageError::Not64BitCapable,
            BzImageError::NotLoadableAbove4G,
            BzImageError::NotRelocatable,
            BzImageError::SetupExceedsImage {
                setup_len: 1,
                image_len: 0,
            },
            BzImageError::EmptyKernel,
            BzImageError::BadSyssize {
                syssize_bytes: 0,
                kernel_len: 1,
            },
            BzImageError::BadAlignment(3),
            BzImageError::PrefAddressMisaligned {
                pref_address: 1,
                alignment: 2,
            },
            BzImageError::PrefAddressTooHigh(1),
            BzImageError::InitSizeZero,
            BzImageError::InitSizeAbsurd(1),
            BzImageError::InitSizeBelowKernel {
                init_size: 1,
                kernel_len: 2,
            },
            BzImageError::BadCmdlineSize(0),
            BzImageError::PayloadOutOfBounds {
                offset: 0,
                length: 0,
                kernel_len: 0,
            },
        ];
        for error in errors {
            assert!(error.to_string().len() > 10, "{error:?}");
        }
    }

    /// Set `DEBIAN_VMLINUZ` to a real bzImage (PLATFORM.md: the Debian
    /// kernel) to check the parser against it.
    #[test]
    fn a_real_debian_kernel_parses_when_available() {
        let Ok(path) = std::env::var("DEBIAN_VMLINUZ") else {
            eprintln!("DEBIAN_VMLINUZ not set: real-kernel check skipped");
            return;
        };
        let bytes = std::fs::read(&path).unwrap();
        let image = BzImage::parse(&bytes).unwrap();
        assert!(image.protocol_version() >= MIN_PROTOCOL);
        assert_eq!(image.entry_offset(), 0x200);
        assert!(image.kernel_version().is_some());
        assert_ne!(image.compression(), Compression::Unknown);
    }
}
