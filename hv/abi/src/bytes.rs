//! Little-endian field access on byte slices that never panics.
//!
//! Every read returns `None` past the end of the slice and every write
//! returns `Err(OutOfBounds)`, so the parsers and builders above can turn a
//! short buffer into their own specific error instead of an index panic.

use core::fmt;

/// A write or read went past the end of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfBounds;

/// `bytes[offset..offset + N]` as an array, if it is inside the slice.
pub fn array<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    let end = offset.checked_add(N)?;
    bytes.get(offset..end)?.try_into().ok()
}

pub fn u8_at(bytes: &[u8], offset: usize) -> Option<u8> {
    bytes.get(offset).copied()
}

pub fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    array(bytes, offset).map(u16::from_le_bytes)
}

pub fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    array(bytes, offset).map(u32::from_le_bytes)
}

pub fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    array(bytes, offset).map(u64::from_le_bytes)
}

/// `bytes[offset..offset + len]`, if it is inside the slice.
pub fn slice_at(bytes: &[u8], offset: usize, len: usize) -> Option<&[u8]> {
    bytes.get(offset..offset.checked_add(len)?)
}

/// Copies `src` to `buf[offset..]`.
pub fn put(buf: &mut [u8], offset: usize, src: &[u8]) -> Result<(), OutOfBounds> {
    let end = offset.checked_add(src.len()).ok_or(OutOfBounds)?;
    buf.get_mut(offset..end)
        .ok_or(OutOfBounds)?
        .copy_from_slice(src);
    Ok(())
}

pub fn put_u8(buf: &mut [u8], offset: usize, value: u8) -> Result<(), OutOfBounds> {
    put(buf, offset, &[value])
}

pub fn put_u16(buf: &mut [u8], offset: usize, value: u16) -> Result<(), OutOfBounds> {
    put(buf, offset, &value.to_le_bytes())
}

pub fn put_u32(buf: &mut [u8], offset: usize, value: u32) -> Result<(), OutOfBounds> {
    put(buf, offset, &value.to_le_bytes())
}

pub fn put_u64(buf: &mut [u8], offset: usize, value: u64) -> Result<(), OutOfBounds> {
    put(buf, offset, &value.to_le_bytes())
}

/// Rounds `value` up to a multiple of `align` (a power of two), `None` on
/// overflow.
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    let mask = align.checked_sub(1)?;
    Some(value.checked_add(mask)? & !mask)
}

/// [`align_up`] for `usize`.
pub fn align_up_usize(value: usize, align: usize) -> Option<usize> {
    debug_assert!(align.is_power_of_two());
    let mask = align.checked_sub(1)?;
    Some(value.checked_add(mask)? & !mask)
}

/// A `core::fmt::Write` sink over a byte slice that fails instead of
/// truncating when the slice is full.
#[derive(Debug)]
pub struct SliceWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> SliceWriter<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }
}

impl fmt::Write for SliceWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        put(self.buf, self.len, s.as_bytes()).map_err(|OutOfBounds| fmt::Error)?;
        self.len = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn reads_stop_at_the_end_of_the_slice() {
        let bytes = [1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(u32_at(&bytes, 4), Some(0x0807_0605));
        assert_eq!(u32_at(&bytes, 5), None);
        assert_eq!(u64_at(&bytes, usize::MAX), None);
        assert_eq!(slice_at(&bytes, 6, 2), Some(&bytes[6..]));
        assert_eq!(slice_at(&bytes, 6, 3), None);
        assert_eq!(slice_at(&bytes, usize::MAX, 1), None);
    }

    #[test]
    fn writes_past_the_end_fail_and_leave_the_buffer_alone() {
        let mut buf = [0u8; 4];
        assert_eq!(put_u32(&mut buf, 1, u32::MAX), Err(OutOfBounds));
        assert_eq!(buf, [0; 4]);
        put_u16(&mut buf, 2, 0xBEEF).unwrap();
        assert_eq!(buf, [0, 0, 0xEF, 0xBE]);
        assert_eq!(put_u8(&mut buf, usize::MAX, 1), Err(OutOfBounds));
    }

    #[test]
    fn align_up_rounds_and_detects_overflow() {
        assert_eq!(align_up(0, 4096), Some(0));
        assert_eq!(align_up(1, 4096), Some(4096));
        assert_eq!(align_up(4096, 4096), Some(4096));
        assert_eq!(align_up(u64::MAX, 4096), None);
        assert_eq!(align_up_usize(13, 4), Some(16));
        assert_eq!(align_up_usize(usize::MAX, 4), None);
    }

    #[test]
    fn slice_writer_fails_instead_of_truncating() {
        let mut buf = [0u8; 5];
        let mut writer = SliceWriter::new(&mut buf);
        assert!(write!(writer, "abc").is_ok());
        assert!(write!(writer, "def").is_err());
        assert_eq!(&buf, b"abc\0\0", "a failed write leaves nothing behind");
    }
}
