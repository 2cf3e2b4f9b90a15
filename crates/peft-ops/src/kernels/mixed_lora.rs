//! LoRA over a mixed-adapter batch as one pass: `y[i] += s_k·(x[i]·A_k)·B_k` for every row `i`
//! whose adapter is `k`, in place, without gathering the rows of each adapter into their own
//! tensors and scattering the change back.
//!
//! At a decode step each adapter owns one or two rows, so the composition (PEFT's
//! `_mixed_batch_forward` in `tuners/lora/layer.py`: select, two matmuls, scale, add back per
//! adapter) is several small ops per adapter and site, each allocating; here a row costs
//! `r·(in + out)` multiply-adds read straight from the adapter's factors, and a run of rows of
//! one adapter (a prompt) goes through the GEMM.

use rayon::prelude::*;

use super::matmul::{Mat, MatMut, gemm};

/// One adapter's factors: `A` `[d_in, r]` and `B` `[r, d_out]`, row-major, and its scale.
#[derive(Debug, Clone, Copy)]
pub struct Factors<'a> {
    /// `A`, `d_in·r` values.
    pub a: &'a [f32],
    /// `B`, `r·d_out` values.
    pub b: &'a [f32],
    /// The rank.
    pub r: usize,
    /// `lora_alpha / r` (or what the method chose).
    pub scaling: f32,
}

/// Sizes of a mixed LoRA product: `x` is `[slots.len()·per_row, d_in]`, `y` `[.., d_out]`.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// Consecutive rows of `x` that share one entry of the slots (the sequence positions of one
    /// batch row).
    pub per_row: usize,
}

/// Below this many multiply-adds the whole pass runs on the calling thread (a rayon split costs
/// a few µs, about 30,000 multiply-adds here).
const PARALLEL_WORK: usize = 1 << 17;

/// Consecutive rows of one adapter from which its two products go to the GEMM (which packs
/// `A` and `B` once for all of them) rather than row by row.
const GEMM_ROWS: usize = 4;

/// Rows per task: long runs of one adapter (a prompt, or a batch on one adapter) are cut so
/// both cores get work.
const TASK_ROWS: usize = 64;

/// Consecutive rows of one adapter: `y` holds them (`y.len() / d_out` rows), from row `start`
/// of `x` on.
struct Task<'y> {
    /// The adapter.
    slot: usize,
    /// The first row.
    start: usize,
    /// Those rows of the output.
    y: &'y mut [f32],
}

/// Adds each batch row's LoRA change to `y` in place. `slots[b]` names the adapter of batch row
/// `b` (`None`: no change); every factor must chain with `shape`.
///
/// # Panics
/// If the buffers or factors do not have the sizes `shape` and `slots` give, or a slot names
/// no adapter (callers build both from the same list).
pub fn add_in_place(
    x: &[f32],
    y: &mut [f32],
    shape: Shape,
    slots: &[Option<usize>],
    adapters: &[Factors<'_>],
) {
    let Shape {
        d_in,
        d_out,
        per_row,
    } = shape;
    let rows = slots.len() * per_row;
    assert_eq!(x.len(), rows * d_in, "mixed lora: x is not [rows, in]");
    assert_eq!(y.len(), rows * d_out, "mixed lora: y is not [rows, out]");
    for f in adapters {
        assert!(
            f.a.len() == d_in * f.r && f.b.len() == f.r * d_out,
            "mixed lora: factors of rank {} do not chain with [{d_in}, {d_out}]",
            f.r
        );
    }
    // Nothing to add (and no zero-width chunks below) when a dimension is empty.
    if rows == 0 || d_in == 0 || d_out == 0 {
        return;
    }
    let tasks = tasks(y, shape, slots);
    let work: usize = tasks
        .iter()
        .map(|t| t.y.len() / d_out * adapters[t.slot].r * (d_in + d_out))
        .sum();
    let run = |t: Task<'_>| {
        let f = &adapters[t.slot];
        if f.r == 0 {
            return;
        }
        let n = t.y.len() / d_out;
        let xs = &x[t.start * d_in..(t.start + n) * d_in];
        if n >= GEMM_ROWS {
            rows_by_gemm(xs, t.y, shape, f);
        } else {
            let mut low = vec![0f32; f.r];
            for (x_row, y_row) in xs.chunks_exact(d_in).zip(t.y.chunks_exact_mut(d_out)) {
                row(x_row, y_row, f, &mut low);
            }
        }
    };
    if work < PARALLEL_WORK || tasks.len() == 1 {
        tasks.into_iter().for_each(run);
    } else {
        tasks.into_par_iter().for_each(run);
    }
}

/// Runs of consecutive rows of one adapter (at most [`TASK_ROWS`] each), with their disjoint
/// parts of `y`; rows without an adapter get no task.
fn tasks<'y>(mut y: &'y mut [f32], shape: Shape, slots: &[Option<usize>]) -> Vec<Task<'y>> {
    let mut tasks = Vec::new();
    let mut done = 0; // rows of `y` already split off
    let mut b = 0;
    while b < slots.len() {
        let end = (b..slots.len())
            .find(|&e| slots[e] != slots[b])
            .unwrap_or(slots.len());
        if let Some(slot) = slots[b] {
            let (first, last) = (b * shape.per_row, end * shape.per_row);
            let rest = std::mem::take(&mut y);
            y = &mut rest[(first - done) * shape.d_out..];
            let mut start = first;
            while start < last {
                let n = (last - start).min(TASK_ROWS);
                let rest = std::mem::take(&mut y);
                let (part, after) = rest.split_at_mut(n * shape.d_out);
                tasks.push(Task {
                    slot,
                    start,
                    y: part,
                });
                y = after;
                start += n;
            }
            done = last;
        }
        b = end;
    }
    tasks
}

/// `y += s·(x·A)·B` for a block of rows through the GEMM.
fn rows_by_gemm(x: &[f32], y: &mut [f32], shape: Shape, f: &Factors<'_>) {
    let n = y.len() / shape.d_out;
    let mut low = vec![0f32; n * f.r];
    // SAFETY (both): the slices hold the shapes given, and `low` / `y` are written by this call
    // alone (each task owns its rows of `y`).
    unsafe {
        gemm(
            MatMut::row_major(&mut low, f.r),
            false,
            Mat::row_major(x, n, shape.d_in),
            Mat::row_major(f.a, shape.d_in, f.r),
            1.0,
            false,
        );
        gemm(
            MatMut::row_major(y, shape.d_out),
            true,
            Mat::row_major(&low, n, f.r),
            Mat::row_major(f.b, f.r, shape.d_out),
            f.scaling,
            false,
        );
    }
}

/// `y += s·(x·A)·B` for one row: `low = x·A` as axpys over `A`'s rows (`r` wide, contiguous),
/// then `r` axpys of `B`'s rows into `y`, which stays in L1 across them.
#[inline]
fn row(x: &[f32], y: &mut [f32], f: &Factors<'_>, low: &mut [f32]) {
    low.fill(0.0);
    for (&xv, a_row) in x.iter().zip(f.a.chunks_exact(f.r)) {
        for (l, &av) in low.iter_mut().zip(a_row) {
            *l += xv * av;
        }
    }
    for (&l, b_row) in low.iter().zip(f.b.chunks_exact(y.len())) {
        let c = l * f.scaling;
        for (yv, &bv) in y.iter_mut().zip(b_row) {
            *yv += c * bv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `y + s·(x·A)·B` for one row, summed in `f64`.
    fn expected(x: &[f32], y: &[f32], f: &Factors<'_>) -> Vec<f32> {
        let d_out = y.len();
        let low: Vec<f64> = (0..f.r)
            .map(|j| {
                x.iter()
                    .enumerate()
                    .map(|(p, &xv)| xv as f64 * f.a[p * f.r + j] as f64)
                    .sum()
            })
            .collect();
        (0..d_out)
            .map(|c| {
                let d: f64 = (0..f.r).map(|j| low[j] * f.b[j * d_out + c] as f64).sum();
                (y[c] as f64 + f.scaling as f64 * d) as f32
            })
            .collect()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// `add_in_place` against [`expected`] row by row, for two adapters of ranks 2 and 4.
    fn check(d_in: usize, d_out: usize, per_row: usize, slots: &[Option<usize>]) {
        let (a1, b1) = (values(d_in * 2, 1), values(2 * d_out, 2));
        let (a2, b2) = (values(d_in * 4, 3), values(4 * d_out, 4));
        let adapters = [
            Factors {
                a: &a1,
                b: &b1,
                r: 2,
                scaling: 0.5,
            },
            Factors {
                a: &a2,
                b: &b2,
                r: 4,
                scaling: 2.0,
            },
        ];
        let rows = slots.len() * per_row;
        let x = values(rows * d_in, 5);
        let y0 = values(rows * d_out, 6);
        let mut y = y0.clone();
        let shape = Shape {
            d_in,
            d_out,
            per_row,
        };
        add_in_place(&x, &mut y, shape, slots, &adapters);
        for i in 0..rows {
            let (xr, y0r) = (&x[i * d_in..][..d_in], &y0[i * d_out..][..d_out]);
            let want = match slots[i / per_row] {
                Some(k) => expected(xr, y0r, &adapters[k]),
                None => y0r.to_vec(),
            };
            for (got, want) in y[i * d_out..][..d_out].iter().zip(&want) {
                assert!(
                    (got - want).abs() < 1e-4 * want.abs().max(1.0),
                    "row {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn single_rows_get_their_own_adapter_and_base_rows_stay() {
        check(7, 5, 1, &[Some(1), None, Some(0), Some(1)]);
        check(7, 5, 3, &[Some(1), None, Some(0), Some(1)]);
    }

    #[test]
    fn runs_of_one_adapter_go_through_the_gemm_in_tasks() {
        // Runs of 2 batch rows x 5 positions (GEMM), cut at 64 rows; base rows between them.
        let slots: Vec<Option<usize>> = (0..60)
            .map(|b| [Some(0), Some(0), None, Some(1), Some(1), Some(1)][b % 6])
            .collect();
        check(33, 17, 5, &slots);
        // One adapter on every row: one long run, cut into tasks.
        check(256, 192, 7, &[Some(1); 30]);
    }

    #[test]
    fn empty_inputs_and_rank_zero_add_nothing() {
        check(0, 5, 2, &[Some(0), None]);
        check(7, 0, 2, &[Some(1)]);
        let (a, b) = (Vec::new(), Vec::new());
        let zero = [Factors {
            a: &a,
            b: &b,
            r: 0,
            scaling: 1.0,
        }];
        let x = values(2 * 3, 1);
        let mut y = values(2 * 4, 2);
        let y0 = y.clone();
        let shape = Shape {
            d_in: 3,
            d_out: 4,
            per_row: 1,
        };
        add_in_place(&x, &mut y, shape, &[Some(0), Some(0)], &zero);
        assert_eq!(y, y0);
    }

    #[test]
    fn large_batches_split_over_threads_give_the_same_rows() {
        let slots: Vec<Option<usize>> = (0..64).map(|i| [None, Some(0), Some(1)][i % 3]).collect();
        check(256, 192, 1, &slots);
    }
}
