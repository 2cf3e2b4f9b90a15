//! bitsandbytes' NormalFloat4 (NF4, QLoRA's base-weight format).
//!
//! - The codebook is bitsandbytes' `get_4bit_type("nf4")` (`bitsandbytes/functional.py`; the
//!   same 16 values as the `nf4_dequantization_lut` / `dDequantizeNF4` tables of its C++ and
//!   CUDA code): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
//! - Blocks of [`NF4_BLOCK`] (64) values with one `f32` absmax each (bitsandbytes'
//!   `quantize_4bit` default `blocksize=64`, absmax kept as `float32` unless
//!   `compress_statistics` double-quantizes it, which is not implemented here).
//! - Quantization is bitsandbytes' reference (`backends/default/ops.py`, `quantize_4bit`, the
//!   path its CPU backend takes): `scaled = clamp(x · (1 / max(absmax, 1e-38)), -1, 1)`, then
//!   `bucketize(scaled, midpoints)` with the `f32` midpoints between consecutive codes, a value
//!   exactly on a midpoint going to the lower code (`right=False`): the nearest code.
//! - Two codes per byte, the first value in the high nibble: `(q[2i] << 4) | q[2i + 1]`.
//! - Dequantization is `code[q] · absmax` in `f32` (`_dequantize_4bit_compute`).
//!
//! In a [`QuantMatrix`](super::QuantMatrix) a block is 36 bytes: the absmax (`f32`, little
//! endian) then the 32 code bytes; rows are whole blocks (the row length a multiple of 64), so a
//! row-major bitsandbytes tensor's blocks are exactly the rows' blocks.
//! [`QuantMatrix::from_bnb_nf4`](super::QuantMatrix::from_bnb_nf4) and
//! [`QuantMatrix::to_bnb_nf4`](super::QuantMatrix::to_bnb_nf4) convert from and to
//! bitsandbytes' separate `(packed codes, absmax)` arrays.

use super::format::NF4_BLOCK;

/// The NF4 codebook (bitsandbytes `functional.get_4bit_type("nf4")`), in code order.
///
/// The literals are bitsandbytes' own (the `float64` reprs of its `float32` table), so each
/// rounds to exactly the `float32` bitsandbytes uses (checked against the table it returns by
/// `tests/quant_formats.rs`).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The 15 `f32` midpoints `(code[k] + code[k + 1]) / 2` (bitsandbytes'
/// `_get_4bit_quantize_bounds`).
const fn bounds() -> [f32; 15] {
    let mut b = [0f32; 15];
    let mut k = 0;
    while k < 15 {
        b[k] = (NF4_CODE[k] + NF4_CODE[k + 1]) / 2.0;
        k += 1;
    }
    b
}

const BOUNDS: [f32; 15] = bounds();

/// The code of a scaled value: the number of midpoints strictly below it
/// (`torch.bucketize(scaled, bounds, right=False)`).
#[inline]
pub(crate) fn code_of(scaled: f32) -> u8 {
    BOUNDS.iter().filter(|&&b| b < scaled).count() as u8
}

/// One block: `values` (at most [`NF4_BLOCK`]) to the absmax and the codes, one per value.
pub(crate) fn quantize_block(values: &[f32]) -> (f32, [u8; NF4_BLOCK]) {
    let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inv = 1.0 / absmax.max(1e-38);
    let mut codes = [0u8; NF4_BLOCK];
    for (c, &v) in codes.iter_mut().zip(values) {
        *c = code_of((v * inv).clamp(-1.0, 1.0));
    }
    (absmax, codes)
}

/// Writes the 36-byte block of `values` (exactly [`NF4_BLOCK`] of them) into `out`.
pub(crate) fn encode_block(values: &[f32], out: &mut [u8]) {
    let (absmax, codes) = quantize_block(values);
    out[..4].copy_from_slice(&absmax.to_le_bytes());
    for (o, pair) in out[4..36].iter_mut().zip(codes.chunks_exact(2)) {
        *o = (pair[0] << 4) | pair[1];
    }
}

/// bitsandbytes' arrays (`packed`: the flat `uint8` codes of `quantize_4bit`, two per byte;
/// `absmax`: one `f32` per 64 values) as this crate's NF4 blocks: `None` when the sizes do not
/// match `values` values (a multiple of 64).
pub(crate) fn from_bnb(packed: &[u8], absmax: &[f32], values: usize) -> Option<Vec<u8>> {
    if !values.is_multiple_of(NF4_BLOCK)
        || packed.len() != values / 2
        || absmax.len() != values / NF4_BLOCK
    {
        return None;
    }
    let mut out = Vec::with_capacity(absmax.len().checked_mul(36)?);
    for (a, codes) in absmax.iter().zip(packed.chunks_exact(NF4_BLOCK / 2)) {
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(codes);
    }
    Some(out)
}

/// This crate's NF4 blocks as bitsandbytes' `(packed codes, absmax)`.
pub(crate) fn to_bnb(blocks: &[u8]) -> (Vec<u8>, Vec<f32>) {
    let (packed, absmax) = blocks
        .chunks_exact(36)
        .map(|b| (&b[4..], f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .unzip::<_, _, Vec<&[u8]>, Vec<f32>>();
    (packed.concat(), absmax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_nearest_with_ties_down() {
        for (k, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(code_of(c), k as u8);
        }
        for (k, &b) in BOUNDS.iter().enumerate() {
            assert_eq!(code_of(b), k as u8, "a midpoint goes to the lower code");
            assert_eq!(code_of(b.next_up()), k as u8 + 1);
        }
    }
}
