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
use super::simd::{LANES, fmadd, multiversion};

/// The most rows one pass of the kernels takes. They keep `x` in L2 while `W` streams past
/// once: at 64 rows `x` is 384 KiB for an input of 1,536. One thread, an `[out, in]` weight out
/// of cache (SmolLM2-135M's 576 -> 1,536): 100-104 GFLOP/s at 48 and 64 rows against 59-71 for
/// the `gemm` crate; at 1 row 10.7 against 7.4-10.4. More rows go in passes of this many.
pub const PASS_ROWS: usize = 64;

/// The most rows this path takes for an `[out, in]` weight read as its transpose, in passes of
/// [`PASS_ROWS`] that each stream `W` from L3 again. At 256 rows (a LoRA step of 2 x 128
/// tokens, 2 threads) SmolLM2-135M's products ran at 155-205 GFLOP/s against 94-185 for the
/// `gemm` crate with its own threads (576 -> 576: 160-186 against 115-133; 1,536 -> 576:
/// 155-173 against 100-107); at 1,024 rows the `gemm` crate was as fast or faster (160-210
/// against 148-185), its blocking keeping more of both operands in cache.
pub const MAX_ROWS: usize = 256;

/// The most rows for a weight whose rows along `k` are not contiguous (a row-major `[in, out]`
/// weight, as `LinearConfig::init` makes): there the `gemm` crate was faster from 33 rows
/// (76 against 86 GFLOP/s at 64 rows, one thread) and at 1 row (its GEMV streams `w` row by
/// row, where 32-column bands read it in 128-byte pieces `n` apart: `serve`'s
/// one-request-at-a-time rows ran at 0.68x).
const MAX_ROWS_OTHER: usize = 32;

/// Whether [`matmul`] is the faster product for `m` rows against `w`: 1 to [`MAX_ROWS`] rows
/// for an `[out, in]` weight read as its transpose (unit row stride: the dot-product tiles),
/// 2 to [`MAX_ROWS_OTHER`] for other layouts.
pub fn suits(m: usize, w: &Mat) -> bool {
    if w.rs == 1 {
        (1..=MAX_ROWS).contains(&m)
    } else {
        (2..=MAX_ROWS_OTHER).contains(&m)
    }
}

/// Multiply-adds below which one call runs on the calling thread: a task on rayon's pool costs
/// microseconds, more than such a product (a tiny model's decode step).
const SEQUENTIAL_BELOW: usize = 1 << 17;

/// Output columns per band (per task) of the fallback through the `gemm` crate, for a `w` with
/// no unit stride. Measured on SmolLM2-135M decode (2 threads): 16-column bands ran batch 8 at
/// 150 tokens/s and batch 32 at 213, against 110 / 200 for bands of 128 KiB of `W` and 76 / 164
/// for 512 KiB; 64 columns ran 82 / 181 and 8 columns 133 / 229.
pub const BAND: usize = 16;

/// Rows of `x` per register tile of the direct kernels.
const MR: usize = 4;
/// Output columns per band of the direct kernels. With contiguous columns of `w` a tile of
/// [`MR`] rows keeps `MR x NC` sums in registers (8 AVX-512 registers).
const NC: usize = 32;
/// Columns per tile when `w`'s rows along `k` are contiguous: `MR x NJ` dot products in
/// [`LANES`]-wide accumulators (16 AVX-512 registers).
const NJ: usize = 4;

/// A read-only strided matrix that may cross threads.
#[derive(Clone, Copy)]
struct Shared(Mat);

// SAFETY: only read, and the buffers it points into outlive the parallel loop (see `matmul`).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// How a band is multiplied.
#[derive(Clone, Copy)]
enum Kernel {
    /// `w`'s columns are contiguous (a row-major `[in, out]` weight): rows of `w` scaled by
    /// elements of `x` and summed.
    Axpy,
    /// `w`'s rows along `k` are contiguous (the transposed view of an `[out, in]` weight, a
    /// tied head): dot products.
    Dot,
    /// Any other strides: the `gemm` crate on the band.
    Gemm,
}

/// `out[m, n] = x[m, k] · w` for a row-major `x` and a strided `w` (`k x n`); bands of output
/// columns in parallel.
///
/// When either stride of `w` is 1 (a weight or its transposed view), register-tiled kernels
/// read `w` in place: nothing is packed and nothing is called per band. Through the `gemm`
/// crate on 16-column bands, its fixed cost per call (12,800 calls per step of a SmolLM2-135M
/// decode) and the packing took 70% of a batch-32 step (perf). `w` crosses the memory bus once
/// per call; a band is re-read from cache by each tile of rows.
///
/// More than [`PASS_ROWS`] rows go in passes of that many, each streaming `w` again.
///
/// # Safety
/// `w` must describe readable memory of `k x n` elements at its strides, not overlapping `out`.
pub unsafe fn matmul(x: &[f32], m: usize, w: Mat, out: &mut [f32]) {
    let (k, n) = (w.rows, w.cols);
    assert!(
        x.len() >= m * k && out.len() >= m * n,
        "few_rows::matmul: buffer sizes"
    );
    for r0 in (0..m).step_by(PASS_ROWS) {
        let rows = PASS_ROWS.min(m - r0);
        // SAFETY: the caller's guarantee; rows `r0 ..` of `x` and `out` are in the buffers.
        unsafe { pass(&x[r0 * k..], rows, w, &mut out[r0 * n..]) };
    }
}

/// [`matmul`] for at most [`PASS_ROWS`] rows.
///
/// # Safety
/// As [`matmul`].
unsafe fn pass(x: &[f32], m: usize, w: Mat, out: &mut [f32]) {
    let (k, n) = (w.rows, w.cols);
    let (width, kernel) = if w.cs == 1 {
        (NC, Kernel::Axpy)
    } else if w.rs == 1 {
        (NC, Kernel::Dot)
    } else {
        (BAND, Kernel::Gemm)
    };
    let bands = n.div_ceil(width);
    // A few bands per task: balanced over the threads, each task well above rayon's cost.
    let per_task = (bands / (rayon::current_num_threads() * 8)).max(1);
    let lhs = Shared(Mat::row_major(x, m, k));
    let rhs = Shared(w);
    let dst = SendPtr(out.as_mut_ptr());
    let band = |band: usize| {
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
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Axpy if avx512::available() => {
                    axpy_band_with::<avx512::Avx512>(lhs.0, band_w, d)
                }
                #[cfg(target_arch = "x86_64")]
                Kernel::Dot if avx512::available() => {
                    dot_band_with::<avx512::Avx512>(lhs.0, band_w, d)
                }
                Kernel::Axpy => axpy_band(lhs.0, band_w, d),
                Kernel::Dot => dot_band(lhs.0, band_w, d),
                Kernel::Gemm => gemm(d, false, lhs.0, band_w, 1.0, false),
            }
        }
    };
    if m.saturating_mul(k).saturating_mul(n) < SEQUENTIAL_BELOW {
        (0..bands).for_each(band);
    } else {
        (0..bands)
            .into_par_iter()
            .with_min_len(per_task)
            .for_each(band);
    }
}

multiversion! {
    /// `d = x · w` for one band (`w.cols <= NC`, unit column stride), in tiles of [`MR`] rows.
    /// The operands must be valid as [`matmul`] requires (a private kernel: not `unsafe` only
    /// because [`multiversion!`] wraps safe functions).
    fn axpy_band(x: Mat, w: Mat, d: MatMut) = axpy_band_k
}

multiversion! {
    /// `d = x · w` for one band (`w.cols <= NC`, unit row stride), in tiles of [`MR`] rows
    /// by [`NJ`] columns.
    fn dot_band(x: Mat, w: Mat, d: MatMut) = dot_band_k
}

/// One instruction set's register tiles, walked over a band by [`axpy_band_with`] and
/// [`dot_band_with`]: the portable kernels ([`Portable`]) and the AVX-512 ones.
trait Tiles {
    /// `d = x · w` for `R` rows of `x` (row stride `w.rows`) and the band's `w.cols <= NC`
    /// columns (unit column stride).
    ///
    /// # Safety
    /// The tile is inside `x`, `w` and `d`, and the CPU runs the set's instructions.
    unsafe fn axpy<const R: usize>(x: *const f32, w: Mat, d: MatMut);

    /// `R x J` dot products of length `w.rows`: rows of `x` with the `J` columns of `w` (unit
    /// row stride), written to `d`.
    ///
    /// # Safety
    /// As [`Tiles::axpy`].
    unsafe fn dot<const R: usize, const J: usize>(x: *const f32, w: Mat, d: MatMut);
}

/// `d = x · w` for one band (`w.cols <= NC`, unit column stride), in tiles of [`MR`] rows.
///
/// # Safety
/// As [`matmul`] for the band; the CPU runs `T`'s instructions.
#[inline(always)]
unsafe fn axpy_band_with<T: Tiles>(x: Mat, w: Mat, d: MatMut) {
    let mut r0 = 0;
    while r0 < x.rows {
        let rows = MR.min(x.rows - r0);
        // SAFETY: rows `r0 .. r0 + rows` of `x` and `d` exist (the caller's guarantee).
        unsafe {
            let xt = x.ptr.offset(r0 as isize * x.rs);
            let dt = MatMut {
                ptr: d.ptr.offset(r0 as isize * d.rs),
                ..d
            };
            match rows {
                4 => T::axpy::<4>(xt, w, dt),
                3 => T::axpy::<3>(xt, w, dt),
                2 => T::axpy::<2>(xt, w, dt),
                _ => T::axpy::<1>(xt, w, dt),
            }
        }
        r0 += rows;
    }
}

/// `d = x · w` for one band (`w.cols <= NC`, unit row stride), in tiles of [`MR`] rows by
/// [`NJ`] columns; edge tiles one column at a time.
///
/// # Safety
/// As [`axpy_band_with`].
#[inline(always)]
unsafe fn dot_band_with<T: Tiles>(x: Mat, w: Mat, d: MatMut) {
    // Columns outer: a group of `NJ` columns of `w` (contiguous along `k`) stays in L1 while
    // every tile of rows reads it.
    let mut c0 = 0;
    while c0 < w.cols {
        let cols = NJ.min(w.cols - c0);
        let mut r0 = 0;
        while r0 < x.rows {
            let rows = MR.min(x.rows - r0);
            // SAFETY: rows `r0 .. r0 + rows` of `x` / `d` and columns `c0 .. c0 + cols` of
            // `w` / `d` exist (the caller's guarantee).
            unsafe {
                let xt = x.ptr.offset(r0 as isize * x.rs);
                let wt = Mat {
                    ptr: w.ptr.offset(c0 as isize * w.cs),
                    cols,
                    ..w
                };
                let dt = MatMut {
                    ptr: d.ptr.offset(r0 as isize * d.rs + c0 as isize),
                    ..d
                };
                match (rows, cols) {
                    (4, 4) => T::dot::<4, 4>(xt, wt, dt),
                    (3, 4) => T::dot::<3, 4>(xt, wt, dt),
                    (2, 4) => T::dot::<2, 4>(xt, wt, dt),
                    (1, 4) => T::dot::<1, 4>(xt, wt, dt),
                    (r, c) => {
                        for j in 0..c {
                            let wj = Mat {
                                ptr: wt.ptr.offset(j as isize * w.cs),
                                cols: 1,
                                ..wt
                            };
                            let dj = MatMut {
                                ptr: dt.ptr.add(j),
                                ..dt
                            };
                            match r {
                                4 => T::dot::<4, 1>(xt, wj, dj),
                                3 => T::dot::<3, 1>(xt, wj, dj),
                                2 => T::dot::<2, 1>(xt, wj, dj),
                                _ => T::dot::<1, 1>(xt, wj, dj),
                            }
                        }
                    }
                }
            }
            r0 += rows;
        }
        c0 += cols;
    }
}

/// The portable tiles: plain loops that LLVM vectorizes for the level [`multiversion!`] picks.
struct Portable<const FMA: bool>;

impl<const FMA: bool> Tiles for Portable<FMA> {
    #[inline(always)]
    unsafe fn axpy<const R: usize>(x: *const f32, w: Mat, d: MatMut) {
        // A full band with its width known at compile time keeps the sums in registers.
        // SAFETY: the caller's guarantee.
        unsafe {
            if w.cols == NC {
                axpy_tile::<FMA, R, NC>(x, w, d, NC)
            } else {
                axpy_tile::<FMA, R, NC>(x, w, d, w.cols)
            }
        }
    }

    #[inline(always)]
    unsafe fn dot<const R: usize, const J: usize>(x: *const f32, w: Mat, d: MatMut) {
        // SAFETY: the caller's guarantee.
        unsafe { dot_tile::<FMA, R, J>(x, w, d) }
    }
}

#[inline(always)]
fn axpy_band_k<const FMA: bool>(x: Mat, w: Mat, d: MatMut) {
    // SAFETY: the operands are valid (`matmul`'s guarantee); `multiversion!` picked a level
    // the CPU runs.
    unsafe { axpy_band_with::<Portable<FMA>>(x, w, d) }
}

#[inline(always)]
fn dot_band_k<const FMA: bool>(x: Mat, w: Mat, d: MatMut) {
    // SAFETY: as above.
    unsafe { dot_band_with::<Portable<FMA>>(x, w, d) }
}

/// `d[r, c] = Σ_k x[r, k] · w[k, c]` for `R` rows of `x` (row stride `w.rows`) and `cols <= C`
/// columns; with `cols == C` known at compile time the sums stay in registers.
///
/// # Safety
/// `x`: `R x w.rows` row-major; `w`: `w.rows x cols` with unit column stride; `d`: `R` rows of
/// `cols` contiguous values (written, not read).
#[inline(always)]
unsafe fn axpy_tile<const FMA: bool, const R: usize, const C: usize>(
    x: *const f32,
    w: Mat,
    d: MatMut,
    cols: usize,
) {
    let k = w.rows;
    let mut acc = [[0f32; C]; R];
    for kk in 0..k {
        // SAFETY: row `kk` of `w` holds `cols` contiguous values; `x` holds `R x k`.
        unsafe {
            let wr = w.ptr.offset(kk as isize * w.rs);
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = *x.add(r * k + kk);
                for (c, a) in row.iter_mut().enumerate().take(cols) {
                    *a = fmadd::<FMA>(xv, *wr.add(c), *a);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (c, a) in row.iter().enumerate().take(cols) {
            // SAFETY: inside the tile of `d` (the caller's guarantee).
            unsafe { *d.ptr.offset(r as isize * d.rs + c as isize) = *a };
        }
    }
}

/// `d[r, j] = x[r, :] · w[:, j]` for `R` rows and `J` columns of a `w` with unit row stride,
/// in [`LANES`]-wide partial sums.
///
/// # Safety
/// `x`: `R x w.rows` row-major; `w`: `w.rows x J` with unit row stride; `d`: `R x J` at its
/// row stride, unit column stride.
#[inline(always)]
unsafe fn dot_tile<const FMA: bool, const R: usize, const J: usize>(
    x: *const f32,
    w: Mat,
    d: MatMut,
) {
    let k = w.rows;
    let mut acc = [[[0f32; LANES]; J]; R];
    let full = k / LANES * LANES;
    let mut k0 = 0;
    while k0 < full {
        // SAFETY: `k0 + LANES <= k`: inside every row of `x` and column of `w`.
        unsafe {
            let mut wv = [[0f32; LANES]; J];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = *(w.ptr.offset(j as isize * w.cs).add(k0) as *const [f32; LANES]);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = *(x.add(r * k + k0) as *const [f32; LANES]);
                for (a, wj) in row.iter_mut().zip(&wv) {
                    for l in 0..LANES {
                        a[l] = fmadd::<FMA>(xv[l], wj[l], a[l]);
                    }
                }
            }
        }
        k0 += LANES;
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            let mut total: f32 = a.iter().sum();
            for kk in full..k {
                // SAFETY: `kk < k`.
                unsafe { total += *x.add(r * k + kk) * *w.ptr.offset(j as isize * w.cs).add(kk) };
            }
            // SAFETY: inside the tile of `d`.
            unsafe { *d.ptr.offset(r as isize * d.rs + j as isize) = total };
        }
    }
}

/// The same tiles in AVX-512 intrinsics.
#[cfg(target_arch = "x86_64")]
mod avx512;

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
            (1, 40, 96),
            (5, 33, 33),
            (9, 48, 31),
            (3, 17, 64),
            (4, 64, 130),
            (7, 576, 200),
            (32, 2000, 70),
            (64, 300, 90),
            (1, 1536, 600),
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

    #[test]
    fn portable_kernels_equal_the_product() {
        // The kernels a CPU without AVX-512 runs (this machine may take the intrinsics path in
        // `matmul`): one band each, rows in tiles and a partial last tile.
        let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 500.0;
        for (m, k, n) in [(1, 40, 32), (6, 37, 32), (9, 64, 13)] {
            let x: Vec<f32> = (0..m * k).map(value).collect();
            let w: Vec<f32> = (0..k * n).map(|i| value(i + 13)).collect();
            let want = reference(&x, m, k, &w, n);
            let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let lhs = Mat::row_major(&x, m, k);
            for (dot, view) in [
                (false, Mat::row_major(&w, k, n)),
                (true, Mat::row_major(&wt, n, k).t()),
            ] {
                let mut out = vec![f32::NAN; m * n];
                let d = MatMut::row_major(&mut out, n);
                if dot {
                    dot_band(lhs, view, d);
                } else {
                    axpy_band(lhs, view, d);
                }
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
