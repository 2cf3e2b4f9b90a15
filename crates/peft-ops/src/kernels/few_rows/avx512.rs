//! The direct kernels written with AVX-512 intrinsics: LLVM does not keep the portable
//! kernels' `MR x NJ x LANES` sums in registers (it spilled them to the stack on every step of
//! `k`), which made them slower than the `gemm` crate. Same tiles; the 4-column dot tiles sum
//! their lanes in another order (`sums4`).

use std::arch::x86_64::*;

use super::{NC, Tiles};
use crate::kernels::matmul::{Mat, MatMut};
use crate::kernels::simd::{Level, level, sums4};

/// Whether the running CPU runs these tiles: the AVX-512 level the other kernels detect
/// (`simd::level`), as the single-query attention kernels do.
pub fn available() -> bool {
    level() == Level::V4
}

/// Lanes `0 .. n` (`n <= 16`) of a 512-bit register.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 }
}

/// The AVX-512 tiles.
pub struct Avx512;

impl Tiles for Avx512 {
    unsafe fn axpy<const R: usize>(x: *const f32, w: Mat, d: MatMut) {
        // SAFETY: the caller's guarantee, CPU included.
        unsafe { axpy_tile::<R>(x, w, d.ptr, d.rs) }
    }

    unsafe fn dot<const R: usize, const J: usize>(x: *const f32, w: Mat, d: MatMut) {
        // SAFETY: the caller's guarantee, CPU included.
        unsafe { dot_tile::<R, J>(x, w.rows, w.ptr, w.cs, d.ptr, d.rs) }
    }
}

/// `R` rows by up to [`NC`] (32) columns: two registers of sums per row.
#[target_feature(enable = "avx512f")]
unsafe fn axpy_tile<const R: usize>(x: *const f32, w: Mat, d: *mut f32, drs: isize) {
    let k = w.rows;
    let (m0, m1) = (lanes(w.cols), lanes(w.cols.saturating_sub(16)));
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // SAFETY: row `kk` of `w` holds `w.cols <= 32` contiguous values (masked beyond);
    // `x` holds `R x k`, `d` `R` rows of `w.cols`.
    unsafe {
        for kk in 0..k {
            let wr = w.ptr.offset(kk as isize * w.rs);
            let w0 = _mm512_maskz_loadu_ps(m0, wr);
            let w1 = _mm512_maskz_loadu_ps(m1, wr.add(16));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(r * k + kk));
                a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let out = d.offset(r as isize * drs);
            _mm512_mask_storeu_ps(out, m0, a[0]);
            _mm512_mask_storeu_ps(out.add(16), m1, a[1]);
        }
    }
}

/// `R x J` dot products of length `k`: rows of `x` (row-major) with columns of `w` (each
/// contiguous, `wcs` apart); the last partial 16 by masked loads.
#[target_feature(enable = "avx512f")]
unsafe fn dot_tile<const R: usize, const J: usize>(
    x: *const f32,
    k: usize,
    w: *const f32,
    wcs: isize,
    d: *mut f32,
    drs: isize,
) {
    let mut acc = [[_mm512_setzero_ps(); J]; R];
    let full = k / 16 * 16;
    // SAFETY: every load reads lanes `k0 .. min(k0 + 16, k)` of a row of `x` or a column
    // of `w` (masked beyond `k` in the last step); `d` holds the `R x J` tile.
    unsafe {
        let cols: [*const f32; J] = std::array::from_fn(|j| w.offset(j as isize * wcs));
        let rows: [*const f32; R] = std::array::from_fn(|r| x.add(r * k));
        // The next tile of columns (the band is read in order): fetched into L2 while this
        // one is multiplied, so the stream of `w` from memory does not stall the FMAs.
        // Measured at batch 32 (SmolLM2 decode): 5-8% faster than no prefetch; two tiles
        // ahead, or a prefetch from the first tile of rows only, were no better. Into L2
        // (`T1`), not L1 (`T0`): the rows of `x` streaming through L1 evicted the fetched
        // lines before use. One thread, 30 weights out of cache: 576 -> 1,536 at 32 rows
        // went from 72-82 to 90-93 GFLOP/s, 1,536 -> 576 from 60-66 to 86-88, and 8 rows
        // from 37-45 to 58-77.
        let ahead = J as isize * wcs;
        let mut step = |k0: usize, m: __mmask16| {
            for c in &cols {
                // Past the band's last tile this points outside `w`: wrapping arithmetic,
                // and a prefetch never faults.
                let next = c.wrapping_offset(ahead).wrapping_add(k0);
                _mm_prefetch::<_MM_HINT_T1>(next as *const i8);
            }
            let wv: [__m512; J] =
                std::array::from_fn(|j| _mm512_maskz_loadu_ps(m, cols[j].add(k0)));
            for (a, row) in acc.iter_mut().zip(&rows) {
                let xv = _mm512_maskz_loadu_ps(m, row.add(k0));
                for (aj, wj) in a.iter_mut().zip(&wv) {
                    *aj = _mm512_fmadd_ps(xv, *wj, *aj);
                }
            }
        };
        let mut k0 = 0;
        while k0 < full {
            step(k0, 0xFFFF);
            k0 += 16;
        }
        if full < k {
            step(full, lanes(k - full));
        }
        for (r, a) in acc.iter().enumerate() {
            let out = d.offset(r as isize * drs);
            if J == 4 {
                _mm_storeu_ps(out, sums4(a[0], a[1], a[2], a[3]));
            } else {
                for (j, aj) in a.iter().enumerate() {
                    *out.add(j) = _mm512_reduce_add_ps(*aj);
                }
            }
        }
    }
}

const _: () = assert!(NC == 32, "axpy_tile holds two 16-lane registers per row");
