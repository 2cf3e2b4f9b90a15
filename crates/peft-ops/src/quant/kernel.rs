//! The fused dequantize-and-multiply kernels on raw `f32` buffers.
//!
//! Nothing dense of the whole matrix is ever built:
//! - `n = 1` (decoding one token): rows split over rayon; each row is dotted with `x` block by
//!   block, by a hand-vectorized AVX2 kernel (`super::x86`: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, NF4)
//!   or, for the other formats and CPUs, by decoding 256 values at a time into a stack buffer
//!   and dotting them in 32 independent lanes (compiled for AVX-512 / AVX2 + FMA / baseline,
//!   chosen at run time).
//! - `n > 1`: a tile of rows is dequantized into a small buffer (about 128 KiB) and multiplied
//!   with the `gemm` crate; tiles split over rayon.
//! - The input gradient `dx = dy · W` splits the columns into block-aligned chunks (each task
//!   owns a slice of `dx`), walking the rows in tiles: an axpy per row for `n = 1`, a GEMM per
//!   tile otherwise.
//!
//! Work is split by shape only (the GEMM's own threads, used when a product has fewer tiles
//! than there are threads, split its output, not its sums), so results are the same with any
//! number of threads.

use rayon::prelude::*;

use super::QuantMatrix;
use super::dequant::{decode, dequantize_blocks};
use crate::kernels::matmul::{Mat, MatMut, gemm, threaded};
use crate::kernels::par::SendPtr;
use crate::kernels::simd::{fmadd, multiversion};

/// Values decoded at a time by the row kernels (a multiple of every block size).
const CHUNK: usize = 256;

/// Lanes of the dot-product accumulators (two AVX-512 or four AVX2 registers: enough
/// independent FMA chains to hide their latency).
const LANES: usize = 32;

/// Multiply-accumulates per rayon task (a few tens of µs of work).
const TASK_WORK: usize = 1 << 16;

/// Values of `f32` per dequantized tile (128 KiB: stays in L2 next to the GEMM's packing).
const TILE_VALUES: usize = 1 << 15;

/// Calls `f(first_row, chunk)` over consecutive chunks of whole rows of `out` (rows of `width`
/// values), in parallel when there is more than one task's work.
pub fn for_row_chunks<F>(out: &mut [f32], width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let rows_per_task = (TASK_WORK / width.max(1)).max(1);
    crate::kernels::par::chunks_mut(out, rows_per_task * width, |start, c| {
        f(start / width.max(1), c)
    });
}

/// `out[j] = Σ_c x[c]·w[j][c]` for the rows of `data` (`out.len()` rows of `row_bytes`).
#[inline(always)]
fn rows_dot<const FMA: bool>(w: &QuantMatrix, data: &[u8], x: &[f32], out: &mut [f32]) {
    let format = w.format();
    let row_bytes = w.row_bytes();
    let chunk_bytes = CHUNK / format.block_size() * format.block_bytes();
    let mut buf = [0f32; CHUNK];
    for (o, row) in out.iter_mut().zip(data.chunks_exact(row_bytes)) {
        let mut acc = [0f32; LANES];
        let mut tail = 0f32;
        for (xc, bc) in x.chunks(CHUNK).zip(row.chunks(chunk_bytes)) {
            let vals = &mut buf[..xc.len()];
            decode::<FMA>(format, bc, vals);
            let (xa, xr) = xc.as_chunks::<LANES>();
            let (va, vr) = vals.as_chunks::<LANES>();
            for (xv, vv) in xa.iter().zip(va) {
                for i in 0..LANES {
                    acc[i] = fmadd::<FMA>(xv[i], vv[i], acc[i]);
                }
            }
            for (a, b) in xr.iter().zip(vr) {
                tail = fmadd::<FMA>(*a, *b, tail);
            }
        }
        *o = acc.iter().sum::<f32>() + tail;
    }
}

multiversion!(
    /// [`rows_dot`] for the running CPU.
    fn rows_dot_mv(w: &QuantMatrix, data: &[u8], x: &[f32], out: &mut [f32]) = rows_dot
);

/// `acc[c] += Σ_j dy[j]·w[j][c]` over the rows of `data`, for the columns whose blocks are
/// `byte_range` of each row (`acc.len()` values).
#[inline(always)]
fn rows_axpy<const FMA: bool>(
    w: &QuantMatrix,
    data: &[u8],
    byte_start: usize,
    dy: &[f32],
    acc: &mut [f32],
) {
    let format = w.format();
    let chunk_bytes = CHUNK / format.block_size() * format.block_bytes();
    let mut buf = [0f32; CHUNK];
    let width = acc.len();
    let byte_len = width / format.block_size() * format.block_bytes();
    for (&g, row) in dy.iter().zip(data.chunks_exact(w.row_bytes())) {
        let row = &row[byte_start..byte_start + byte_len];
        for (ac, bc) in acc.chunks_mut(CHUNK).zip(row.chunks(chunk_bytes)) {
            let vals = &mut buf[..ac.len()];
            decode::<FMA>(format, bc, vals);
            for (a, v) in ac.iter_mut().zip(vals.iter()) {
                *a = fmadd::<FMA>(g, *v, *a);
            }
        }
    }
}

multiversion!(
    /// [`rows_axpy`] for the running CPU.
    fn rows_axpy_mv(w: &QuantMatrix, data: &[u8], byte_start: usize, dy: &[f32], acc: &mut [f32]) = rows_axpy
);

/// Rows per dequantized tile for rows of `width` values (a multiple of 16 when above 16).
fn tile_rows(width: usize, max: usize) -> usize {
    let t = (TILE_VALUES / width.max(1)).clamp(16, 1024);
    (t / 16 * 16).min(max.max(1))
}

/// Dequantizes rows `r0..r0 + count`, columns whose blocks start at byte `byte_start` and span
/// `width` values, into `buf` (`count x width`, row-major).
fn dequantize_tile(
    w: &QuantMatrix,
    bytes: &[u8],
    r0: usize,
    count: usize,
    byte_start: usize,
    width: usize,
    buf: &mut Vec<f32>,
) {
    let format = w.format();
    let byte_len = width / format.block_size() * format.block_bytes();
    buf.clear();
    buf.resize(count * width, 0.0);
    for (i, out) in buf.chunks_exact_mut(width.max(1)).enumerate() {
        let start = (r0 + i) * w.row_bytes() + byte_start;
        dequantize_blocks(format, &bytes[start..start + byte_len], out);
    }
}

/// `out = x · Wᵀ`: `x` `[n, cols]`, `out` `[n, rows]` (zeroed by the caller), both row-major.
pub fn matmul(w: &QuantMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(x.len(), n * cols, "quant_matmul: x must be [n, {cols}]");
    assert_eq!(out.len(), n * rows, "quant_matmul: out must be [n, {rows}]");
    if rows == 0 || cols == 0 || n == 0 {
        return;
    }
    let bytes = w.bytes().as_slice();
    if n == 1 {
        // Sums of `x` over 32-value groups, for the formats with additive offsets.
        let sums: Vec<f32> = x.chunks(32).map(|c| c.iter().sum()).collect();
        let rows_per_task = (TASK_WORK / cols).max(1);
        crate::kernels::par::chunks_mut(out, rows_per_task, |r0, o| {
            let data = &bytes[r0 * w.row_bytes()..(r0 + o.len()) * w.row_bytes()];
            #[cfg(target_arch = "x86_64")]
            if super::x86::row_dots(w.format(), data, w.row_bytes(), x, &sums, o) {
                return;
            }
            let _ = &sums;
            rows_dot_mv(w, data, x, o);
        });
        return;
    }
    let tr = tile_rows(cols, rows);
    let tiles = rows.div_ceil(tr);
    let dst = SendPtr(out.as_mut_ptr());
    // Parallel over tiles when there are enough of them; otherwise the GEMM's own threads.
    let gemm_threads = tiles < rayon::current_num_threads() && threaded(n, tr, cols);
    let run = |buf: &mut Vec<f32>, t: usize| {
        let r0 = t * tr;
        let count = tr.min(rows - r0);
        dequantize_tile(w, bytes, r0, count, 0, cols, buf);
        let lhs = Mat::row_major(x, n, cols);
        let rhs = Mat::row_major(buf, count, cols).t();
        // SAFETY: `dst + r0` with row stride `rows` addresses columns `r0..r0 + count` of
        // every output row, inside `out`; tiles write disjoint columns; `lhs` and `buf` are
        // live buffers of the sizes given and do not overlap `out`.
        unsafe {
            let d = MatMut {
                ptr: dst.add(r0 as isize),
                rs: rows as isize,
                cs: 1,
            };
            gemm(d, false, lhs, rhs, 1.0, gemm_threads);
        }
    };
    if gemm_threads || tiles == 1 {
        let mut buf = Vec::new();
        (0..tiles).for_each(|t| run(&mut buf, t));
    } else {
        (0..tiles)
            .into_par_iter()
            .for_each_init(Vec::new, |buf, t| run(buf, t));
    }
}

/// Column chunks of a row of `cols` values in blocks of `bs`: `(first column, width)` pairs,
/// about 256 columns each, block-aligned.
fn column_chunks(cols: usize, bs: usize) -> Vec<(usize, usize)> {
    let blocks = cols / bs;
    let pieces = cols.div_ceil(256).clamp(1, blocks.max(1));
    let per = blocks.div_ceil(pieces);
    (0..blocks)
        .step_by(per.max(1))
        .map(|b| (b * bs, (per.min(blocks - b)) * bs))
        .collect()
}

/// `dx = dy · W`: `dy` `[n, rows]`, `dx` `[n, cols]` (zeroed by the caller), both row-major.
pub fn matmul_t(w: &QuantMatrix, dy: &[f32], n: usize, dx: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    assert_eq!(
        dy.len(),
        n * rows,
        "quant_matmul backward: dy must be [n, {rows}]"
    );
    assert_eq!(
        dx.len(),
        n * cols,
        "quant_matmul backward: dx must be [n, {cols}]"
    );
    if rows == 0 || cols == 0 || n == 0 {
        return;
    }
    let format = w.format();
    let (bs, bb) = (format.block_size(), format.block_bytes());
    let bytes = w.bytes().as_slice();
    let chunks = column_chunks(cols, bs);
    let dst = SendPtr(dx.as_mut_ptr());
    // Columns `c0..c0 + width` of `dx`, one tile of `W`'s rows dequantized at a time; the GEMM
    // runs its own threads when `threads`.
    let run = |buf: &mut Vec<f32>, &(c0, width): &(usize, usize), threads: bool| {
        let byte_start = c0 / bs * bb;
        if n == 1 {
            // SAFETY: columns `c0..c0 + width` of the single row of `dx`; chunks are disjoint.
            let acc = unsafe { std::slice::from_raw_parts_mut(dst.add(c0 as isize), width) };
            let data = &bytes[..rows * w.row_bytes()];
            rows_axpy_mv(w, data, byte_start, dy, acc);
            return;
        }
        let tr = tile_rows(width, rows);
        for (t, r0) in (0..rows).step_by(tr).enumerate() {
            let count = tr.min(rows - r0);
            dequantize_tile(w, bytes, r0, count, byte_start, width, buf);
            let lhs = Mat {
                ptr: dy[r0..].as_ptr(),
                rows: n,
                cols: count,
                rs: rows as isize,
                cs: 1,
            };
            // SAFETY: `dx + c0` with row stride `cols` addresses columns `c0..c0 + width` of
            // every row of `dx`, owned by this task; `dy` and `buf` are live and disjoint from
            // `dx`.
            unsafe {
                let d = MatMut {
                    ptr: dst.add(c0 as isize),
                    rs: cols as isize,
                    cs: 1,
                };
                gemm(
                    d,
                    t > 0,
                    lhs,
                    Mat::row_major(buf, count, width),
                    1.0,
                    threads,
                );
            }
        }
    };
    if chunks.len() == 1 && n > 1 {
        // One chunk: the GEMM's own threads over the batch instead.
        run(&mut Vec::new(), &chunks[0], true);
        return;
    }
    chunks
        .par_iter()
        .for_each_init(Vec::new, |buf, chunk| run(buf, chunk, false));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QuantBytes, QuantFormat};

    /// A matrix of pseudo-random valid blocks: random bits, small finite `f16` / `f32` scales.
    fn random(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
        if format.can_quantize() {
            let v: Vec<f32> = (0..rows * cols)
                .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            return QuantMatrix::quantize(format, &v, rows, cols).unwrap();
        }
        let mut state = seed;
        let bytes: Vec<u8> = (0..rows * format.row_bytes(cols).unwrap())
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        let mut m = QuantMatrix::new(format, rows, cols, QuantBytes::from_vec(bytes)).unwrap();
        let fields: &[usize] = match format {
            QuantFormat::Q2_K => &[80, 82],
            QuantFormat::Q3_K => &[108],
            QuantFormat::Q6_K => &[208],
            _ => &[0, 2],
        };
        let mut b = m.bytes().as_slice().to_vec();
        for block in b.chunks_exact_mut(format.block_bytes()) {
            for &off in fields {
                block[off..off + 2].copy_from_slice(&0x2400u16.to_le_bytes()); // 2^-6
            }
        }
        m = QuantMatrix::new(format, rows, cols, QuantBytes::from_vec(b)).unwrap();
        m
    }

    /// The portable row kernel and the hand-vectorized one (where the CPU has it) against the
    /// `f64` dot product of the exact dequantization.
    #[test]
    fn row_kernels_match_the_dequantized_dot() {
        for format in QuantFormat::ALL {
            let cols =
                2 * format.block_size().max(32) * if format.block_size() == 1 { 3 } else { 1 };
            let rows = 5;
            let w = random(format, rows, cols, 42);
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let sums: Vec<f32> = x.chunks(32).map(|c| c.iter().sum()).collect();
            let dense = w.dequantize();
            let want: Vec<f64> = dense
                .chunks_exact(cols)
                .map(|r| {
                    r.iter()
                        .zip(&x)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum()
                })
                .collect();
            let scale: Vec<f64> = dense
                .chunks_exact(cols)
                .map(|r| {
                    r.iter()
                        .zip(&x)
                        .map(|(a, b)| f64::from((a * b).abs()))
                        .sum()
                })
                .collect();
            let mut portable = vec![0f32; rows];
            rows_dot_mv(&w, w.bytes().as_slice(), &x, &mut portable);
            let mut results = vec![("portable", portable)];
            #[cfg(target_arch = "x86_64")]
            {
                let mut simd = vec![0f32; rows];
                let bytes = w.bytes().as_slice();
                if super::super::x86::row_dots(format, bytes, w.row_bytes(), &x, &sums, &mut simd) {
                    results.push(("avx2", simd));
                }
            }
            let _ = &sums;
            for (name, got) in results {
                for j in 0..rows {
                    let err = (f64::from(got[j]) - want[j]).abs();
                    assert!(
                        err <= 1e-5 * scale[j] + 1e-6,
                        "{format} {name} row {j}: {} vs {} (scale {})",
                        got[j],
                        want[j],
                        scale[j]
                    );
                }
            }
        }
    }

    #[test]
    fn column_chunks_cover_the_row() {
        for (cols, bs) in [
            (576, 32),
            (1536, 32),
            (512, 256),
            (32, 32),
            (7, 1),
            (4096, 64),
        ] {
            let c = column_chunks(cols, bs);
            let mut next = 0;
            for &(c0, w) in &c {
                assert_eq!(c0, next);
                assert!(w > 0 && w % bs == 0 && c0 % bs == 0);
                next += w;
            }
            assert_eq!(next, cols, "{cols} / {bs}: {c:?}");
        }
    }
}
