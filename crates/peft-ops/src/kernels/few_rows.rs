//! `x · W` for a few rows of `x` (decoding: one row per sequence) and a large weight `W`.
//!
//! The `gemm` crate packs an operand into its micro-kernel layout before it multiplies. With a
//! few rows against a whole weight that packing is a pass over all of `W`, out of cache, before
//! the product makes another: batched greedy decoding of SmolLM2-135M (8 sequences) spent 53%
//! of its time in `gemm_common::pack_operands::pack_lhs` (perf). Here each task takes a band of
//! [`BAND`] output columns, whose packed slice of `W` stays in cache, so `W` crosses the memory
//! bus once per call. `W` may be any strided view (a row-major `[in, out]` weight, or the
//! transpose of an `[out, in]` one).

use rayon::prelude::*;

use super::matmul::{Mat, MatMut, gemm};
use super::par::SendPtr;

/// The most rows this path is used for: beyond them the product is compute-bound and the
/// `gemm` crate's own blocking is as good.
pub const MAX_ROWS: usize = 32;

/// Output columns per band (per task). Measured on SmolLM2-135M decode (2 threads): 16-column
/// bands ran batch 8 at 150 tokens/s and batch 32 at 213, against 110 / 200 for bands of 128 KiB
/// of `W` and 76 / 164 for 512 KiB; 64 columns ran 82 / 181 and 8 columns 133 / 229. Narrow
/// bands keep the GEMM's packed copy of a band in L1 and give every thread work.
pub const BAND: usize = 16;

/// A read-only strided matrix that may cross threads.
#[derive(Clone, Copy)]
struct Shared(Mat);

// SAFETY: only read, and the buffers it points into outlive the parallel loop (see `matmul`).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// `out[m, n] = x[m, k] · w` for a row-major `x` and a strided `w` (`k x n`); bands of output
/// columns in parallel.
///
/// # Safety
/// `w` must describe readable memory of `k x n` elements at its strides, not overlapping `out`.
pub unsafe fn matmul(x: &[f32], m: usize, w: Mat, out: &mut [f32]) {
    let (k, n) = (w.rows, w.cols);
    assert!(
        x.len() >= m * k && out.len() >= m * n,
        "few_rows::matmul: buffer sizes"
    );
    let width = BAND;
    let lhs = Shared(Mat::row_major(x, m, k));
    let rhs = Shared(w);
    let dst = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(width)).into_par_iter().for_each(|band| {
        let (lhs, rhs) = (lhs, rhs);
        let j0 = band * width;
        let cols = width.min(n - j0);
        // SAFETY: columns `j0 .. j0 + cols` of `w` and of the `m x n` row-major output are
        // inside them (the caller's guarantee for `w`); bands write disjoint columns.
        unsafe {
            let band_w = Mat {
                ptr: rhs.0.ptr.offset(j0 as isize * rhs.0.cs),
                rows: k,
                cols,
                rs: rhs.0.rs,
                cs: rhs.0.cs,
            };
            let d = MatMut {
                ptr: dst.add(j0 as isize),
                rs: n as isize,
                cs: 1,
            };
            gemm(d, false, lhs.0, band_w, 1.0, false);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|kk| x[i * k + kk] as f64 * w[kk * n + j] as f64)
                    .sum();
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn equals_the_product_for_row_major_and_transposed_weights() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 500.0;
        for (m, k, n) in [
            (1, 3, 5),
            (3, 17, 64),
            (4, 64, 130),
            (7, 576, 200),
            (32, 2000, 70),
        ] {
            let x: Vec<f32> = (0..m * k).map(value).collect();
            let w: Vec<f32> = (0..k * n).map(|i| value(i + 13)).collect();
            let want = reference(&x, m, k, &w, n);
            // The same weight stored transposed (`[n, k]` row-major), viewed as `k x n`.
            let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            for view in [Mat::row_major(&w, k, n), Mat::row_major(&wt, n, k).t()] {
                let mut out = vec![f32::NAN; m * n];
                // SAFETY: `view` describes `w` / `wt`, alive for the call.
                unsafe { matmul(&x, m, view, &mut out) };
                for (a, b) in out.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{m}x{k}x{n}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
