//! Block decoders: bytes of whole blocks to `f32`, bit for bit as gguf-py's
//! `gguf.quants.dequantize` (`gguf/quants.py`, each class's `dequantize_blocks`) and as
//! bitsandbytes' `dequantize_4bit` for NF4.
//!
//! Every value is computed with the same `f32` operations in the same order as the numpy code
//! (e.g. Q4_K's `(d·sc)·q - dmin·m`, two roundings, never fused: Rust does not contract `a·b + c`
//! into an FMA), so the results are identical on every CPU. The layouts are ggml's
//! (`block_q4_0` ... `block_q6_K` in ggml-common.h, `dequantize_row_*` in ggml-quants.c); the
//! comments below give the element order in the numpy reshapes' terms.

use super::QuantFormat;
use super::nf4::NF4_CODE;

/// `f16` bits to `f32`: exact for every finite value and the infinities (NaN stays NaN).
///
/// Branch-free (selects), after Fabian Giesen's `half_to_float`, so that it vectorizes.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let o = u32::from(h & 0x7fff) << 13;
    let exp = o & 0x0f80_0000;
    let normal = o + ((127 - 15) << 23);
    let inf_nan = normal + ((128 - 16) << 23);
    // A subnormal half is `mant·2⁻²⁴`: build `2⁻¹⁴·(1 + mant/1024)` and subtract `2⁻¹⁴`
    // (exact).
    let sub = (f32::from_bits(normal + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let bits = if exp == 0x0f80_0000 {
        inf_nan
    } else if exp == 0 {
        sub
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// The little-endian `f16` at `b[i..i + 2]`, as `f32`.
#[inline(always)]
fn half(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Q4_0 (`block_q4_0 { d: f16, qs: [u8; 16] }`): element `i < 16` is the low nibble of
/// `qs[i]`, element `16 + i` its high nibble; `d·(q - 8)`.
#[inline(always)]
fn q4_0(b: &[u8; 18], out: &mut [f32; 32]) {
    let d = half(b, 0);
    let (lo, hi) = out.split_at_mut(16);
    for i in 0..16 {
        let q = b[2 + i];
        lo[i] = d * f32::from((q & 0x0f) as i8 - 8);
        hi[i] = d * f32::from((q >> 4) as i8 - 8);
    }
}

/// Q4_1 (`block_q4_1 { d, m: f16, qs: [u8; 16] }`): nibbles as Q4_0; `(d·q) + m`.
#[inline(always)]
fn q4_1(b: &[u8; 20], out: &mut [f32; 32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let (lo, hi) = out.split_at_mut(16);
    for i in 0..16 {
        let q = b[4 + i];
        lo[i] = d * f32::from(q & 0x0f) + m;
        hi[i] = d * f32::from(q >> 4) + m;
    }
}

/// Q5_0 (`block_q5_0 { d: f16, qh: u32 (LE), qs: [u8; 16] }`): nibbles as Q4_0, bit `i` of
/// `qh` is the fifth bit of element `i`; `d·(q - 16)`.
#[inline(always)]
fn q5_0(b: &[u8; 22], out: &mut [f32; 32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let (lo, hi) = out.split_at_mut(16);
    for i in 0..16 {
        let q = b[6 + i];
        let h0 = ((qh >> i) & 1) as u8;
        let h1 = ((qh >> (i + 16)) & 1) as u8;
        lo[i] = d * f32::from(((q & 0x0f) | (h0 << 4)) as i8 - 16);
        hi[i] = d * f32::from(((q >> 4) | (h1 << 4)) as i8 - 16);
    }
}

/// Q5_1 (`block_q5_1 { d, m: f16, qh: u32, qs: [u8; 16] }`): 5-bit `q` as Q5_0; `(d·q) + m`.
#[inline(always)]
fn q5_1(b: &[u8; 24], out: &mut [f32; 32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let (lo, hi) = out.split_at_mut(16);
    for i in 0..16 {
        let q = b[8 + i];
        let h0 = ((qh >> i) & 1) as u8;
        let h1 = ((qh >> (i + 16)) & 1) as u8;
        lo[i] = d * f32::from((q & 0x0f) | (h0 << 4)) + m;
        hi[i] = d * f32::from((q >> 4) | (h1 << 4)) + m;
    }
}

/// Q8_0 (`block_q8_0 { d: f16, qs: [i8; 32] }`): `q·d`.
#[inline(always)]
fn q8_0(b: &[u8; 34], out: &mut [f32; 32]) {
    let d = half(b, 0);
    for i in 0..32 {
        out[i] = f32::from(b[2 + i] as i8) * d;
    }
}

/// Q2_K (`block_q2_K { scales: [u8; 16], qs: [u8; 64], d, dmin: f16 }`): element
/// `p = 128·j + 32·s + l` is bits `2s..2s+2` of `qs[32·j + l]`; group `p / 16` has scale
/// `dl = d·(sc & 15)` and minimum `ml = dmin·(sc >> 4)`; `(dl·q) - ml`.
#[inline(always)]
fn q2_k(b: &[u8; 84], out: &mut [f32; 256]) {
    let (sc, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (half(b, 80), half(b, 82));
    for g in 0..16 {
        let dl = d * f32::from(sc[g] & 0x0f);
        let ml = dmin * f32::from(sc[g] >> 4);
        // Group g covers p in 16g..16g+16: j = g / 8, s = (g / 2) % 4, l = 16·(g % 2) + i.
        let (j, s, l0) = (g / 8, (g / 2) % 4, 16 * (g % 2));
        for i in 0..16 {
            let q = (qs[32 * j + l0 + i] >> (2 * s)) & 3;
            out[16 * g + i] = dl * f32::from(q) - ml;
        }
    }
}

/// The 16 signed 6-bit scales of a Q3_K block (`scales: [u8; 12]`): scale `i` has low nibble
/// `sc[i] & 15` (`i < 8`) or `sc[i - 8] >> 4`, high bits `(sc[8 + i % 4] >> 2·(i / 4)) & 3`,
/// minus 32 (gguf-py's `lscales` / `hscales`).
#[inline(always)]
fn q3_k_scales(sc: &[u8]) -> [f32; 16] {
    let mut out = [0f32; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { sc[i] & 0x0f } else { sc[i - 8] >> 4 };
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = f32::from((low | (high << 4)) as i8 - 32);
    }
    out
}

/// Q3_K (`block_q3_K { hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16 }`): the low
/// two bits of element `p = 128·j + 32·s + l` are bits `2s..2s+2` of `qs[32·j + l]`, its high
/// bit is bit `p / 32` of `hmask[p % 32]`, and `q = low - 4·(1 - high)` ("the offset is zero
/// when the bitmask is 1"); group `p / 16` scales by `d·scale`: `(d·scale)·q`.
#[inline(always)]
fn q3_k(b: &[u8; 110], out: &mut [f32; 256]) {
    let (hmask, qs) = (&b[..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = half(b, 108);
    for g in 0..16 {
        let dl = d * scales[g];
        let (j, s, l0) = (g / 8, (g / 2) % 4, 16 * (g % 2));
        let hbit = g / 2; // p / 32
        for i in 0..16 {
            let low = ((qs[32 * j + l0 + i] >> (2 * s)) & 3) as i8;
            let high = (hmask[l0 + i] >> hbit) & 1;
            let q = low - (((high ^ 1) << 2) as i8);
            out[16 * g + i] = dl * f32::from(q);
        }
    }
}

/// The 8 six-bit scales and minimums of a Q4_K / Q5_K block (`scales: [u8; 12]`, ggml's
/// `get_scale_min_k4`, gguf-py's `Q4_K.get_scale_min`).
#[inline(always)]
fn k4_scale_min(s: &[u8]) -> ([f32; 8], [f32; 8]) {
    let (mut sc, mut mn) = ([0f32; 8], [0f32; 8]);
    for i in 0..4 {
        sc[i] = f32::from(s[i] & 0x3f);
        mn[i] = f32::from(s[4 + i] & 0x3f);
        sc[4 + i] = f32::from((s[8 + i] & 0x0f) | ((s[i] >> 2) & 0x30));
        mn[4 + i] = f32::from((s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30));
    }
    (sc, mn)
}

/// Q4_K (`block_q4_K { d, dmin: f16, scales: [u8; 12], qs: [u8; 128] }`): element
/// `p = 64·j + 32·t + l` is nibble `t` of `qs[32·j + l]`; group `p / 32` (= `2j + t`) has
/// `d·sc` and `dmin·m`: `(d·sc)·q - dmin·m`.
#[inline(always)]
fn q4_k(b: &[u8; 144], out: &mut [f32; 256]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (sc, mn) = k4_scale_min(&b[4..16]);
    let qs = &b[16..144];
    for j in 0..4 {
        let (d0, m0) = (d * sc[2 * j], dmin * mn[2 * j]);
        let (d1, m1) = (d * sc[2 * j + 1], dmin * mn[2 * j + 1]);
        for l in 0..32 {
            let q = qs[32 * j + l];
            out[64 * j + l] = d0 * f32::from(q & 0x0f) - m0;
            out[64 * j + 32 + l] = d1 * f32::from(q >> 4) - m1;
        }
    }
}

/// Q5_K (`block_q5_K { d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128] }`): low
/// nibbles as Q4_K, the fifth bit of element `p` is bit `p / 32` of `qh[p % 32]`.
#[inline(always)]
fn q5_k(b: &[u8; 176], out: &mut [f32; 256]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (sc, mn) = k4_scale_min(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for j in 0..4 {
        let (d0, m0) = (d * sc[2 * j], dmin * mn[2 * j]);
        let (d1, m1) = (d * sc[2 * j + 1], dmin * mn[2 * j + 1]);
        for l in 0..32 {
            let q = qs[32 * j + l];
            let h0 = (qh[l] >> (2 * j)) & 1;
            let h1 = (qh[l] >> (2 * j + 1)) & 1;
            out[64 * j + l] = d0 * f32::from((q & 0x0f) | (h0 << 4)) - m0;
            out[64 * j + 32 + l] = d1 * f32::from((q >> 4) | (h1 << 4)) - m1;
        }
    }
}

/// Q6_K (`block_q6_K { ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16 }`): element
/// `p = 128·j + 32·s + l` (`s < 4`, `l < 32`) has low nibble `s / 2` of
/// `ql[64·j + 32·(s % 2) + l]` and high bits `2s..2s+2` of `qh[32·j + l]`; `q - 32` scaled by
/// `d·scales[p / 16]`: `(d·sc)·q`.
#[inline(always)]
fn q6_k(b: &[u8; 210], out: &mut [f32; 256]) {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for j in 0..2 {
        for s in 0..4 {
            let g = 8 * j + 2 * s; // group of the first 16 elements of this run of 32
            let (d0, d1) = (d * f32::from(sc[g] as i8), d * f32::from(sc[g + 1] as i8));
            for l in 0..32 {
                let low = (ql[64 * j + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0x0f;
                let high = (qh[32 * j + l] >> (2 * s)) & 3;
                let q = f32::from((low | (high << 4)) as i8 - 32);
                out[128 * j + 32 * s + l] = if l < 16 { d0 * q } else { d1 * q };
            }
        }
    }
}

/// NF4 (this crate's block: an `f32` LE absmax, then 32 bytes of codes, the first of each
/// pair in the high nibble as bitsandbytes packs them): `NF4[code]·absmax`.
#[inline(always)]
fn nf4(b: &[u8; 36], out: &mut [f32; 64]) {
    let absmax = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for i in 0..32 {
        let q = b[4 + i];
        out[2 * i] = NF4_CODE[usize::from(q >> 4)] * absmax;
        out[2 * i + 1] = NF4_CODE[usize::from(q & 0x0f)] * absmax;
    }
}

/// Runs `$f` on every `$bb`-byte block of `$bytes` and `$bs`-value chunk of `$out`.
macro_rules! blocks {
    ($bytes:expr, $out:expr, $bb:literal, $bs:literal, $f:ident) => {{
        let (blocks, _) = $bytes.as_chunks::<$bb>();
        let (outs, _) = $out.as_chunks_mut::<$bs>();
        for (b, o) in blocks.iter().zip(outs) {
            $f(b, o);
        }
    }};
}

/// Decodes whole blocks: `bytes` holds `k` blocks of `format`, `out` their `k·block_size`
/// values (extra bytes or values are left alone).
#[inline(always)]
pub fn decode<const FMA: bool>(format: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    match format {
        QuantFormat::F32 => {
            let (vals, _) = bytes.as_chunks::<4>();
            for (o, v) in out.iter_mut().zip(vals) {
                *o = f32::from_le_bytes(*v);
            }
        }
        QuantFormat::F16 => {
            let (vals, _) = bytes.as_chunks::<2>();
            for (o, v) in out.iter_mut().zip(vals) {
                *o = f16_to_f32(u16::from_le_bytes(*v));
            }
        }
        QuantFormat::BF16 => {
            let (vals, _) = bytes.as_chunks::<2>();
            for (o, v) in out.iter_mut().zip(vals) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes(*v)) << 16);
            }
        }
        QuantFormat::Q4_0 => blocks!(bytes, out, 18, 32, q4_0),
        QuantFormat::Q4_1 => blocks!(bytes, out, 20, 32, q4_1),
        QuantFormat::Q5_0 => blocks!(bytes, out, 22, 32, q5_0),
        QuantFormat::Q5_1 => blocks!(bytes, out, 24, 32, q5_1),
        QuantFormat::Q8_0 => blocks!(bytes, out, 34, 32, q8_0),
        QuantFormat::Q2_K => blocks!(bytes, out, 84, 256, q2_k),
        QuantFormat::Q3_K => blocks!(bytes, out, 110, 256, q3_k),
        QuantFormat::Q4_K => blocks!(bytes, out, 144, 256, q4_k),
        QuantFormat::Q5_K => blocks!(bytes, out, 176, 256, q5_k),
        QuantFormat::Q6_K => blocks!(bytes, out, 210, 256, q6_k),
        QuantFormat::Nf4 => blocks!(bytes, out, 36, 64, nf4),
    }
}

crate::kernels::simd::multiversion!(
    /// [`decode`] compiled for the running CPU's best instruction set.
    pub fn dequantize_blocks(format: QuantFormat, bytes: &[u8], out: &mut [f32]) = decode
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }
}
