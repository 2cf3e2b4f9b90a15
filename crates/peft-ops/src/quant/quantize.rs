//! Quantizers, bit for bit as gguf-py's `quantize_blocks` (`gguf/quants.py`, which follows the
//! reference `quantize_row_*_ref` of ggml-quants.c) and as bitsandbytes for NF4.
//!
//! The K-quants are not quantized here (gguf-py does not either: llama.cpp's K-quant search is
//! iterative); converting a model to them is llama.cpp's `llama-quantize`'s job.

use half::f16;

use super::{QuantError, QuantFormat, nf4};

/// `f32` to `f16` bits, rounding to nearest even (numpy's `astype(np.float16)`).
fn to_f16(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

/// `f32` to bfloat16 bits as gguf-py's `BF16.quantize_blocks` (ggml's
/// `ggml_compute_fp32_to_bf16`): NaN forced quiet, otherwise round to nearest even.
pub fn to_bf16(x: f32) -> u16 {
    let mut n = u64::from(x.to_bits());
    if (n & 0x7fff_ffff) > 0x7f80_0000 {
        n = (n & 0xffff_0000) | (64 << 16);
    }
    ((n + (0x7fff + ((n >> 16) & 1))) >> 16) as u16
}

/// `1/d`, or 0 when `d` is 0 (gguf-py's `np.where(d == 0, 0, 1 / d)`).
fn inverse(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

/// The first value of largest magnitude (numpy's `argmax` of `abs`).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut best = x[0];
    for &v in &x[1..] {
        if v.abs() > best.abs() {
            best = v;
        }
    }
    best
}

/// `(min, max)` of `x`.
fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// `trunc(v)` as a code clipped to `max` (numpy's `np.trunc(...).astype(np.uint8).clip(0, max)`;
/// the argument is never below 0 here).
fn code(v: f32, max: u8) -> u8 {
    (v.trunc() as u8).min(max)
}

/// Q4_0 / Q5_0: `d = max / -2^(bits-1)` of the value of largest magnitude, codes
/// `trunc(x/d + 2^(bits-1) + 0.5)`.
fn q_sym(x: &[f32], bits: u32, out: &mut [u8]) {
    let half_range = (1u32 << (bits - 1)) as f32;
    let d = signed_absmax(x) / -half_range;
    let id = inverse(d);
    let max = ((1u32 << bits) - 1) as u8;
    let q: Vec<u8> = x
        .iter()
        .map(|&v| code(v * id + (half_range + 0.5), max))
        .collect();
    out[..2].copy_from_slice(&to_f16(d));
    pack(&q, bits, &mut out[2..]);
}

/// Q4_1 / Q5_1: `d = (max - min) / (2^bits - 1)`, `m = min`, codes `trunc((x - min)/d + 0.5)`.
fn q_affine(x: &[f32], bits: u32, out: &mut [u8]) {
    let (lo, hi) = min_max(x);
    let max = ((1u32 << bits) - 1) as u8;
    let d = (hi - lo) / f32::from(max);
    let id = inverse(d);
    let q: Vec<u8> = x.iter().map(|&v| code((v - lo) * id + 0.5, max)).collect();
    out[..2].copy_from_slice(&to_f16(d));
    out[2..4].copy_from_slice(&to_f16(lo));
    pack(&q, bits, &mut out[4..]);
}

/// 32 codes of 4 or 5 bits: for 5 bits the fifth bits first as a little-endian `u32` (`qh`),
/// then the low nibbles, element `i` low and `16 + i` high in byte `i`.
fn pack(q: &[u8], bits: u32, out: &mut [u8]) {
    let qs = if bits == 5 {
        let qh = q
            .iter()
            .enumerate()
            .fold(0u32, |h, (i, &c)| h | (u32::from(c >> 4) << i));
        out[..4].copy_from_slice(&qh.to_le_bytes());
        &mut out[4..]
    } else {
        out
    };
    for i in 0..16 {
        qs[i] = (q[i] & 0x0f) | (q[16 + i] << 4);
    }
}

/// Q8_0: `d = max|x| / 127`, codes `round(x/d)` (half away from zero, gguf-py's `np_roundf`).
fn q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    out[..2].copy_from_slice(&to_f16(d));
    for (o, &v) in out[2..].iter_mut().zip(x) {
        *o = ((v * id).round() as i8) as u8;
    }
}

/// Quantizes `values` (`rows·cols`, row-major, `cols` a multiple of the block size) to the
/// blocks of `format`.
pub fn quantize(format: QuantFormat, values: &[f32], cols: usize) -> Result<Vec<u8>, QuantError> {
    let bs = format.block_size();
    let bb = format.block_bytes();
    let blocks = values.len() / bs;
    let err = || QuantError::TooLarge {
        format,
        rows: values.len() / cols.max(1),
        cols,
    };
    let mut out = vec![0u8; blocks.checked_mul(bb).ok_or_else(err)?];
    let block_formats = !matches!(
        format,
        QuantFormat::F32 | QuantFormat::F16 | QuantFormat::BF16
    );
    if block_formats && let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite { format, index });
    }
    let chunks = values.chunks_exact(bs).zip(out.chunks_exact_mut(bb));
    match format {
        QuantFormat::F32 => out.copy_from_slice(
            &values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
        QuantFormat::F16 => chunks.for_each(|(x, o)| o.copy_from_slice(&to_f16(x[0]))),
        QuantFormat::BF16 => {
            chunks.for_each(|(x, o)| o.copy_from_slice(&to_bf16(x[0]).to_le_bytes()))
        }
        QuantFormat::Q4_0 => chunks.for_each(|(x, o)| q_sym(x, 4, o)),
        QuantFormat::Q5_0 => chunks.for_each(|(x, o)| q_sym(x, 5, o)),
        QuantFormat::Q4_1 => chunks.for_each(|(x, o)| q_affine(x, 4, o)),
        QuantFormat::Q5_1 => chunks.for_each(|(x, o)| q_affine(x, 5, o)),
        QuantFormat::Q8_0 => chunks.for_each(|(x, o)| q8_0(x, o)),
        QuantFormat::Nf4 => chunks.for_each(|(x, o)| nf4::encode_block(x, o)),
        QuantFormat::Q2_K
        | QuantFormat::Q3_K
        | QuantFormat::Q4_K
        | QuantFormat::Q5_K
        | QuantFormat::Q6_K => return Err(QuantError::CannotQuantize(format)),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie -> even
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82); // tie -> even
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(to_bf16(f32::NAN) & 0x7fc0, 0x7fc0);
    }
}
