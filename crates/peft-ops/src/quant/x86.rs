//! Hand-vectorized `n = 1` row kernels for x86-64 with AVX2 + FMA + F16C (every x86 CPU since
//! 2013-2015, AVX-512 ones included), for the formats that matter most when decoding one token:
//! F32, F16, BF16 (unquantized GGUF bases), Q4_0, Q4_1, Q8_0 (legacy GGUF), Q4_K, Q5_K, Q6_K (the
//! `Q4_K_M` / `Q5_K_M` mixes) and NF4 (QLoRA).
//!
//! Each computes `out[j] = Σ_c x[c]·w[j][c]` block by block without writing the dequantized
//! values anywhere: the block's integer codes are widened to `f32` lanes, dotted with `x`, and
//! the block's scale applied once to the 8-lane partial sum (`Σ d·q·x = d·Σ q·x`); additive
//! offsets use the sums of `x` over each 32-value group (`Σ (d·q + m)·x = d·Σ q·x + m·Σ x`).
//! The values differ from dequantize-then-dot only by `f32` rounding.
//!
//! The code layouts are those of `super::dequant` (ggml-quants.c `dequantize_row_*`); the
//! auto-vectorized path (`super::kernel`) covers every other format and CPU.

#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::QuantFormat;
use super::nf4::NF4_CODE;

/// Whether the running CPU has AVX2, FMA and F16C (detected once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// The row kernel of `format`, if there is one: `(data, row_bytes, x, group_sums, out)`.
type RowKernel = unsafe fn(&[u8], usize, &[f32], &[f32], &mut [f32]);

/// `out[j] = dot(x, row j)` for the `out.len()` rows of `data` with the hand-vectorized kernel
/// of `format`; false (nothing written) when the CPU or the format has none.
///
/// `sums` are the sums of `x` over consecutive 32-value groups (used by Q4_1, Q4_K and Q5_K).
///
/// # Panics
/// If the buffers do not fit: `data` must hold `out.len()` rows of `row_bytes`, each a whole
/// number of blocks, `x` the row's values and `sums` one sum per 32 of them.
pub fn row_dots(
    format: QuantFormat,
    data: &[u8],
    row_bytes: usize,
    x: &[f32],
    sums: &[f32],
    out: &mut [f32],
) -> bool {
    let kernel: RowKernel = match format {
        QuantFormat::Q4_0 => q4_0,
        QuantFormat::Q4_1 => q4_1,
        QuantFormat::Q8_0 => q8_0,
        QuantFormat::Q4_K => q4_k,
        QuantFormat::Q5_K => q5_k,
        QuantFormat::Q6_K => q6_k,
        QuantFormat::F32 => f32_rows,
        QuantFormat::F16 => f16_rows,
        QuantFormat::BF16 => bf16_rows,
        QuantFormat::Nf4 => nf4,
        _ => return false,
    };
    if !available() {
        return false;
    }
    let (bs, bb) = (format.block_size(), format.block_bytes());
    assert!(
        row_bytes.is_multiple_of(bb)
            && data.len() >= out.len() * row_bytes
            && x.len() >= row_bytes / bb * bs
            && sums.len() >= x.len() / 32,
        "quant kernel: buffers do not fit"
    );
    // SAFETY: the CPU has the kernels' features (`available`); the assertion above gives every
    // bound the kernels read within (rows of whole blocks, `x` and `sums` as long as a row).
    unsafe { kernel(data, row_bytes, x, sums, out) };
    true
}

/// The little-endian `f16` at `p`, as `f32` (F16C, exact).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half(p: *const u8) -> f32 {
    let bits = u16::from_le((p as *const u16).read_unaligned());
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Lanes `0..16` of `q` (signed bytes) times `x[0..16]`, as 8 partial sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot16_i8(q: __m128i, x: *const f32) -> __m256 {
    let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    let b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
    let t = _mm256_mul_ps(a, _mm256_loadu_ps(x));
    _mm256_fmadd_ps(b, _mm256_loadu_ps(x.add(8)), t)
}

/// Lanes `0..16` of `q` (unsigned bytes) times `x[0..16]`, as 8 partial sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot16_u8(q: __m128i, x: *const f32) -> __m256 {
    let a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
    let b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
    let t = _mm256_mul_ps(a, _mm256_loadu_ps(x));
    _mm256_fmadd_ps(b, _mm256_loadu_ps(x.add(8)), t)
}

/// Q8_0: `d·Σ q·x` per 34-byte block (`d: f16, qs: [i8; 32]`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0(data: &[u8], rb: usize, x: &[f32], _: &[f32], out: &mut [f32]) {
    let nb = rb / 34;
    for (o, row) in out.iter_mut().zip(data.chunks_exact(rb)) {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for b in 0..nb {
            let bp = row.as_ptr().add(34 * b);
            let xb = x.as_ptr().add(32 * b);
            let d = _mm256_set1_ps(half(bp));
            let q0 = _mm_loadu_si128(bp.add(2) as *const __m128i);
            let q1 = _mm_loadu_si128(bp.add(18) as *const __m128i);
            let t = _mm256_add_ps(dot16_i8(q0, xb), dot16_i8(q1, xb.add(16)));
            // Two accumulators: consecutive blocks do not wait on each other's FMA.
            if b % 2 == 0 {
                acc0 = _mm256_fmadd_ps(d, t, acc0);
            } else {
                acc1 = _mm256_fmadd_ps(d, t, acc1);
            }
        }
        *o = hsum(_mm256_add_ps(acc0, acc1));
    }
}

/// Q4_0: `d·Σ (q - 8)·x` per 18-byte block; element `i < 16` is the low nibble of byte `i`,
/// `16 + i` its high nibble.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0(data: &[u8], rb: usize, x: &[f32], _: &[f32], out: &mut [f32]) {
    let nb = rb / 18;
    let (m4, e8) = (_mm_set1_epi8(15), _mm_set1_epi8(8));
    for (o, row) in out.iter_mut().zip(data.chunks_exact(rb)) {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for b in 0..nb {
            let bp = row.as_ptr().add(18 * b);
            let xb = x.as_ptr().add(32 * b);
            let d = _mm256_set1_ps(half(bp));
            let q = _mm_loadu_si128(bp.add(2) as *const __m128i);
            let lo = _mm_sub_epi8(_mm_and_si128(q, m4), e8);
            let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), e8);
            let t = _mm256_add_ps(dot16_i8(lo, xb), dot16_i8(hi, xb.add(16)));
            if b % 2 == 0 {
                acc0 = _mm256_fmadd_ps(d, t, acc0);
            } else {
                acc1 = _mm256_fmadd_ps(d, t, acc1);
            }
        }
        *o = hsum(_mm256_add_ps(acc0, acc1));
    }
}

/// Q4_1: `d·Σ q·x + m·Σ x` per 20-byte block (`d, m: f16`, nibbles as Q4_0).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1(data: &[u8], rb: usize, x: &[f32], sums: &[f32], out: &mut [f32]) {
    let nb = rb / 20;
    let m4 = _mm_set1_epi8(15);
    for (o, row) in out.iter_mut().zip(data.chunks_exact(rb)) {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut offsets = 0f32;
        for b in 0..nb {
            let bp = row.as_ptr().add(20 * b);
            let xb = x.as_ptr().add(32 * b);
            let d = _mm256_set1_ps(half(bp));
            offsets = half(bp.add(2)).mul_add(*sums.get_unchecked(b), offsets);
            let q = _mm_loadu_si128(bp.add(4) as *const __m128i);
            let lo = _mm_and_si128(q, m4);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
            let t = _mm256_add_ps(dot16_u8(lo, xb), dot16_u8(hi, xb.add(16)));
            if b % 2 == 0 {
                acc0 = _mm256_fmadd_ps(d, t, acc0);
            } else {
                acc1 = _mm256_fmadd_ps(d, t, acc1);
            }
        }
        *o = hsum(_mm256_add_ps(acc0, acc1)) + offsets;
    }
}

/// The 6-bit scales and minimums of a Q4_K block (`get_scale_min_k4`), as integers.
#[inline(always)]
fn k4_scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for i in 0..4 {
        sc[i] = s[i] & 0x3f;
        mn[i] = s[4 + i] & 0x3f;
        sc[4 + i] = (s[8 + i] & 0x0f) | ((s[i] >> 2) & 0x30);
        mn[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30);
    }
    (sc, mn)
}

/// `Σ_k m[k] · sums[k]` over the eight groups of a K-quant block: the minimums' share.
#[inline(always)]
fn group_mins(mn: &[u8; 8], sums: &[f32]) -> f32 {
    mn.iter()
        .zip(sums)
        .fold(0f32, |m, (&mk, &s)| f32::from(mk).mul_add(s, m))
}

/// One pair of 32-value groups of a Q4_K / Q5_K block: `lo` (32 unsigned codes) times
/// `x[0..32]` scaled by `scales.0`, added to `acc.0`; `hi` times `x[32..64]` by `scales.1`, to
/// `acc.1`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_pair(
    lo: __m256i,
    hi: __m256i,
    x: *const f32,
    scales: (f32, f32),
    acc: (__m256, __m256),
) -> (__m256, __m256) {
    let t0 = _mm256_add_ps(
        dot16_u8(_mm256_castsi256_si128(lo), x),
        dot16_u8(_mm256_extracti128_si256(lo, 1), x.add(16)),
    );
    let t1 = _mm256_add_ps(
        dot16_u8(_mm256_castsi256_si128(hi), x.add(32)),
        dot16_u8(_mm256_extracti128_si256(hi, 1), x.add(48)),
    );
    (
        _mm256_fmadd_ps(_mm256_set1_ps(scales.0), t0, acc.0),
        _mm256_fmadd_ps(_mm256_set1_ps(scales.1), t1, acc.1),
    )
}

/// Q4_K: per 144-byte block, `Σ_k d·sc[k]·Σ q·x - dmin·Σ_k m[k]·Σ x` over its eight 32-value
/// groups (group `2j` the low nibbles of `qs[32j..32j + 32]`, `2j + 1` their high nibbles).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k(data: &[u8], rb: usize, x: &[f32], sums: &[f32], out: &mut [f32]) {
    let m4 = _mm256_set1_epi8(15);
    for (o, row) in out.iter_mut().zip(data.chunks_exact(rb)) {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut mins = 0f32;
        for (b, blk) in row.chunks_exact(144).enumerate() {
            let bp = blk.as_ptr();
            let xb = x.as_ptr().add(256 * b);
            let (d, dmin) = (half(bp), half(bp.add(2)));
            let (sc, mn) = k4_scale_min(&blk[4..16]);
            mins = dmin.mul_add(group_mins(&mn, sums.get_unchecked(8 * b..8 * b + 8)), mins);
            for j in 0..4 {
                let q = _mm256_loadu_si256(bp.add(16 + 32 * j) as *const __m256i);
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                let scales = (d * f32::from(sc[2 * j]), d * f32::from(sc[2 * j + 1]));
                (acc0, acc1) = group_pair(lo, hi, xb.add(64 * j), scales, (acc0, acc1));
            }
        }
        *o = hsum(_mm256_add_ps(acc0, acc1)) - mins;
    }
}

/// Q5_K: as Q4_K with a fifth bit per value: bit `2j` (low nibbles) or `2j + 1` (high nibbles)
/// of `qh[l]` for element `l` of the 32-value group (176-byte block: `d, dmin`, 12 scale
/// bytes, `qh[32]`, `qs[128]`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k(data: &[u8], rb: usize, x: &[f32], sums: &[f32], out: &mut [f32]) {
    let (m4, one) = (_mm256_set1_epi8(15), _mm256_set1_epi8(1));
    for (o, row) in out.iter_mut().zip(data.chunks_exact(rb)) {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut mins = 0f32;
        for (b, blk) in row.chunks_exact(176).enumerate() {
            let bp = blk.as_ptr();
            let xb = x.as_ptr().add(256 * b);
            let (d, dmin) = (half(bp), half(bp.add(2)));
            let (sc, mn) = k4_scale_min(&blk[4..16]);
            mins = dmin.mul_add(group_mins(&mn, sums.get_unchecked(8 * b..8 * b + 8)), mins);
            let qh = _mm256_loadu_si256(bp.add(16) as *const __m256i);
            for j in 0..4 {
                let q = _mm256_loadu_si256(bp.add(48 + 32 * j) as *const __m256i);
                // Bits 2j and 2j + 1 of every `qh` byte, moved to bit 4 (16-bit shifts, then
                // masks: no bit crosses into a neighbouring byte's kept bits).
                let (h0, h1) = match j {
                    0 => (qh, _mm256_srli_epi16(qh, 1)),
                    1 => (_mm256_srli_epi16(qh, 2), _mm256_srli_epi16(qh, 3)),
                    2 => (_mm256_srli_epi16(qh, 4), _mm256_srli_epi16(qh, 5)),
                    _ => (_mm256_srli_epi16(qh, 6), _mm256_srli_epi16(qh, 7)),
                };
                let h0 = _mm256_slli_epi16(_mm256_and_si256(h0, one), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(h1, one), 4);
                let lo = _mm256_or_si256(_mm256_and_si256(q, m4), h0);
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), h1);
                let scales = (d * f32::from(sc[2 * j]), d * f32::from(sc[2 * j + 1]));
                (acc0, acc1) = group_pair(lo, hi, xb.add(64 * j), scales, (acc0, acc1));
            }
        }
        *o = hsum(_mm256_add_ps(acc0, acc1)) - mins;
    }
}

/// Q6_K: per 210-byte block, `Σ_g d·sc[g]·Σ (q - 32)·x` over its sixteen 16-value groups
/// (element `128j + 32s + l`: nibble `s / 2` of `ql[64j + 32(s % 2) + l]`, bits `2s..2s+2` of
/// `qh[32j + l]`).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k(data: &[u8], rb: usize, x: &[f32], _: &[f32], out: &mut [f32]) {
    let (m4, m2, e32) = (
        _mm256_set1_epi8(15),
        _mm256_set1_epi8(3),
        _mm256_set1_epi8(32),
    );
    for (o, row) in out.iter_mut().zip(data.chunks_exact(rb)) {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (b, blk) in row.chunks_exact(210).enumerate() {
            let bp = blk.as_ptr();
            let xb = x.as_ptr().add(256 * b);
            let d = half(bp.add(208));
            let sc = &blk[192..208];
            for j in 0..2 {
                let qh = _mm256_loadu_si256(bp.add(128 + 32 * j) as *const __m256i);
                let ql0 = _mm256_loadu_si256(bp.add(64 * j) as *const __m256i);
                let ql1 = _mm256_loadu_si256(bp.add(64 * j + 32) as *const __m256i);
                let lows = [
                    _mm256_and_si256(ql0, m4),
                    _mm256_and_si256(ql1, m4),
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                ];
                let highs = [
                    _mm256_and_si256(qh, m2),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 4), m2),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 6), m2),
                ];
                for s in 0..4 {
                    let q = _mm256_or_si256(lows[s], _mm256_slli_epi16(highs[s], 4));
                    let q = _mm256_sub_epi8(q, e32);
                    let xs = xb.add(128 * j + 32 * s);
                    let g = 8 * j + 2 * s;
                    let t0 = dot16_i8(_mm256_castsi256_si128(q), xs);
                    let t1 = dot16_i8(_mm256_extracti128_si256(q, 1), xs.add(16));
                    let d0 = _mm256_set1_ps(d * f32::from(sc[g] as i8));
                    let d1 = _mm256_set1_ps(d * f32::from(sc[g + 1] as i8));
                    acc0 = _mm256_fmadd_ps(d0, t0, acc0);
                    acc1 = _mm256_fmadd_ps(d1, t1, acc1);
                }
            }
        }
        *o = hsum(_mm256_add_ps(acc0, acc1));
    }
}

/// NF4 codes (`i32` lanes, `0..16`) to codebook values: two 8-entry permutes and a select on
/// bit 3.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nf4_lookup(idx: __m256i, low: __m256, high: __m256) -> __m256 {
    let a = _mm256_permutevar8x32_ps(low, idx);
    let b = _mm256_permutevar8x32_ps(high, idx);
    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
}

/// NF4: `absmax·Σ code[q]·x` per 36-byte block (`absmax: f32`, then 32 bytes, the first value
/// of each pair in the high nibble).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nf4(data: &[u8], rb: usize, x: &[f32], _: &[f32], out: &mut [f32]) {
    let nb = rb / 36;
    let m4 = _mm_set1_epi8(15);
    let low = _mm256_loadu_ps(NF4_CODE.as_ptr());
    let high = _mm256_loadu_ps(NF4_CODE.as_ptr().add(8));
    for (o, row) in out.iter_mut().zip(data.chunks_exact(rb)) {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for b in 0..nb {
            let bp = row.as_ptr().add(36 * b);
            let xb = x.as_ptr().add(64 * b);
            let absmax = _mm256_set1_ps((bp as *const f32).read_unaligned());
            let mut t = _mm256_setzero_ps();
            for h in 0..2 {
                let q = _mm_loadu_si128(bp.add(4 + 16 * h) as *const __m128i);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
                let lo = _mm_and_si128(q, m4);
                // Value order: high nibble of byte 0, low nibble of byte 0, byte 1, ...
                let v0 = _mm_unpacklo_epi8(hi, lo);
                let v1 = _mm_unpackhi_epi8(hi, lo);
                let xs = xb.add(32 * h);
                for (k, v) in [v0, v1].into_iter().enumerate() {
                    let i0 = _mm256_cvtepu8_epi32(v);
                    let i1 = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8));
                    let x0 = _mm256_loadu_ps(xs.add(16 * k));
                    let x1 = _mm256_loadu_ps(xs.add(16 * k + 8));
                    t = _mm256_fmadd_ps(nf4_lookup(i0, low, high), x0, t);
                    t = _mm256_fmadd_ps(nf4_lookup(i1, low, high), x1, t);
                }
            }
            if b % 2 == 0 {
                acc0 = _mm256_fmadd_ps(absmax, t, acc0);
            } else {
                acc1 = _mm256_fmadd_ps(absmax, t, acc1);
            }
        }
        *o = hsum(_mm256_add_ps(acc0, acc1));
    }
}

/// Rows of plain values (`F32`, `F16`, `BF16`: `$bytes` bytes per value): `$load(p)` reads 8
/// values at `p` as `f32` lanes, `$one(p)` one value; four accumulators, a scalar tail.
macro_rules! plain_rows {
    ($(#[$meta:meta])* $name:ident, $bytes:literal, $load:expr, $one:expr) => {
        $(#[$meta])*
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name(data: &[u8], rb: usize, x: &[f32], _: &[f32], out: &mut [f32]) {
            let cols = rb / $bytes;
            let full = cols / 32 * 32;
            for (o, row) in out.iter_mut().zip(data.chunks_exact(rb)) {
                let p = row.as_ptr();
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in (0..full).step_by(32) {
                    for (k, a) in acc.iter_mut().enumerate() {
                        let w = $load(p.add((c + 8 * k) * $bytes));
                        *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(c + 8 * k)), *a);
                    }
                }
                let mut tail = 0f32;
                for c in full..cols {
                    tail = $one(p.add(c * $bytes)).mul_add(*x.get_unchecked(c), tail);
                }
                let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                *o = hsum(s) + tail;
            }
        }
    };
}

plain_rows!(
    /// F32 rows (little-endian, unaligned).
    f32_rows,
    4,
    |p: *const u8| _mm256_loadu_ps(p as *const f32),
    |p: *const u8| (p as *const f32).read_unaligned()
);

plain_rows!(
    /// F16 rows: `vcvtph2ps`, exact.
    f16_rows,
    2,
    |p: *const u8| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    |p: *const u8| half(p)
);

plain_rows!(
    /// BF16 rows: the 16 bits shifted into the high half of an `f32`, exact.
    bf16_rows,
    2,
    |p: *const u8| {
        let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
    },
    |p: *const u8| f32::from_bits(u32::from(u16::from_le((p as *const u16).read_unaligned())) << 16)
);
