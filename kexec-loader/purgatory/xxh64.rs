//! XXH64 (the xxHash 64-bit algorithm, as its specification describes
//! it), one-shot: the fast segment checksum. In QEMU's TCG it runs about
//! twenty times faster than SHA-256, which is what keeps the purgatory's
//! check of a whole hv image within the crash path's budget. It detects
//! stray writes, not an attacker (who could rewrite the table as well).
//!
//! No allocation, no panic path, no pointer in its constants (the blob
//! must need no relocation). The same file is compiled into the
//! purgatory blob and `kexec-loader`, whose host tests check it against
//! the `xxhash-rust` crate.
#![deny(unsafe_code)]

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// One lane step.
#[inline(always)]
fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

/// Folds a lane accumulator into the result.
#[inline(always)]
fn merge(acc: u64, lane_acc: u64) -> u64 {
    (acc ^ round(0, lane_acc)).wrapping_mul(P1).wrapping_add(P4)
}

#[inline(always)]
fn u64_le(bytes: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*bytes)
}

/// XXH64 of `bytes` with `seed`.
pub fn xxh64(bytes: &[u8], seed: u64) -> u64 {
    let (stripes, tail) = bytes.as_chunks::<32>();
    let mut acc = if stripes.is_empty() {
        seed.wrapping_add(P5)
    } else {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        for stripe in stripes {
            let (lanes, _) = stripe.as_chunks::<8>();
            for (v, lane) in v.iter_mut().zip(lanes) {
                *v = round(*v, u64_le(lane));
            }
        }
        let mut acc = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for v in v {
            acc = merge(acc, v);
        }
        acc
    };
    acc = acc.wrapping_add(bytes.len() as u64);
    let (words, tail) = tail.as_chunks::<8>();
    for word in words {
        acc = (acc ^ round(0, u64_le(word)))
            .rotate_left(27)
            .wrapping_mul(P1)
            .wrapping_add(P4);
    }
    let (halves, tail) = tail.as_chunks::<4>();
    for half in halves {
        acc = (acc ^ u64::from(u32::from_le_bytes(*half)).wrapping_mul(P1))
            .rotate_left(23)
            .wrapping_mul(P2)
            .wrapping_add(P3);
    }
    for &byte in tail {
        acc = (acc ^ u64::from(byte).wrapping_mul(P5))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    acc ^= acc >> 33;
    acc = acc.wrapping_mul(P2);
    acc ^= acc >> 29;
    acc = acc.wrapping_mul(P3);
    acc ^ (acc >> 32)
}

/// The 32-byte digest field's value for `bytes`: XXH64 with seed 0,
/// little-endian, in the first 8 bytes; the rest zero.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let (head, _) = out.split_at_mut(8);
    head.copy_from_slice(&xxh64(bytes, 0).to_le_bytes());
    out
}
