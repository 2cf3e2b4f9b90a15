//! Dropout with a counter-based mask: element `i` is kept when a SplitMix64 hash of
//! `(key, i)` falls below `keep · 2^32`. The mask is a pure function of the key and the index,
//! so the backward regenerates it (nothing is stored), any thread can draw any element, and the
//! same key gives the same mask on every run and after a resume.
//!
//! SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
//! OOPSLA 2014): state `key + (j + 1)·γ`, then the variant-13 finalizer; its 64 output bits give
//! elements `2j` (low half) and `2j + 1` (high half).

use super::par::{CHUNK, chunks_mut};
use super::simd::multiversion;

/// SplitMix64's increment `γ` (the odd integer closest to `2^64/φ`).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finalizer.
#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a dropout draw needs: the key and the keep threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mask {
    /// The draw's key (from the device RNG, see `crate::dropout_key`).
    pub key: u64,
    /// Elements whose 32-bit draw is below this are kept (`keep · 2^32`, at most `u32::MAX`).
    pub threshold: u32,
    /// `1 / keep`, the scale of kept elements.
    pub scale: f32,
}

impl Mask {
    /// Drop probability `p` (`0 < p < 1`) with `key`.
    pub fn new(p: f64, key: u64) -> Self {
        assert!(
            p > 0.0 && p < 1.0,
            "dropout probability must be in (0, 1), got {p}"
        );
        let keep = 1.0 - p;
        let threshold = (keep * 4_294_967_296.0).round().min(u32::MAX as f64) as u32;
        Self {
            key,
            threshold,
            scale: (1.0 / keep) as f32,
        }
    }

    /// Whether element `i` is kept.
    #[inline]
    pub fn keeps(&self, i: usize) -> bool {
        let h = mix(self
            .key
            .wrapping_add(((i / 2) as u64 + 1).wrapping_mul(GAMMA)));
        let draw = if i.is_multiple_of(2) {
            h as u32
        } else {
            (h >> 32) as u32
        };
        draw < self.threshold
    }
}

/// `out[i] = src[i] · mask(start + i) · scale`; `start` is even (chunks are).
#[inline(always)]
fn apply_kernel<const F: bool>(src: &[f32], out: &mut [f32], start: usize, mask: Mask) {
    let _ = F;
    let base = (start / 2) as u64;
    let mut pairs_out = out.chunks_exact_mut(2);
    let mut pairs_src = src.chunks_exact(2);
    for (j, (o, s)) in (&mut pairs_out).zip(&mut pairs_src).enumerate() {
        let h = mix(mask
            .key
            .wrapping_add((base + j as u64 + 1).wrapping_mul(GAMMA)));
        let lo = if (h as u32) < mask.threshold {
            mask.scale
        } else {
            0.0
        };
        let hi = if ((h >> 32) as u32) < mask.threshold {
            mask.scale
        } else {
            0.0
        };
        o[0] = s[0] * lo;
        o[1] = s[1] * hi;
    }
    let done = src.len() & !1;
    for (i, (o, s)) in pairs_out
        .into_remainder()
        .iter_mut()
        .zip(pairs_src.remainder())
        .enumerate()
    {
        *o = if mask.keeps(start + done + i) {
            s * mask.scale
        } else {
            0.0
        };
    }
}

multiversion!(fn apply_chunk(src: &[f32], out: &mut [f32], start: usize, mask: Mask) = apply_kernel);

/// `src` with dropped elements zeroed and kept ones scaled by `1/keep` (also the backward:
/// the same mask applied to the incoming gradient).
pub fn apply(src: &[f32], mask: Mask) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    // `CHUNK` is even, so every chunk starts on a pair boundary.
    chunks_mut(&mut out, CHUNK, |start, c| {
        apply_chunk(&src[start..start + c.len()], c, start, mask)
    });
    out
}
