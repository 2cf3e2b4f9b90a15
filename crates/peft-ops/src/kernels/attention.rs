//! Scaled dot-product attention, forward and backward, one task per (batch, head) on rayon.
//!
//! `out = softmax(scale·Q·Kᵀ + mask)·V` with a boolean mask (true = masked out, broadcast over
//! any of its dimensions), a causal mask aligned bottom-right as Burn's `attention` (query `i`
//! of `sq` sees keys `j <= i + sk - sq`: a prefix or a cache before the queries stays visible),
//! keys and values longer than the queries, and GQA (query head `h` reads key/value head
//! `h / (heads / kv_heads)`, transformers' `repeat_kv` order). A row with every key masked
//! gives zeros, as Burn's `attention_fallback`.
//!
//! The forward keeps only each row's log-sum-exp; the backward recomputes the probabilities
//! from it (FlashAttention's scheme: Dao et al., 2022) and runs
//! `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP - rowsum(dO∘O))`, `dQ = scale·dS·K`,
//! `dK = scale·dSᵀ·Q`, accumulating `dK`/`dV` over the query heads of a key/value head inside
//! one task (so no two tasks write the same gradient rows).

use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::math::exp;
use super::matmul::{Mat, MatMut, gemm};
use super::par::SendPtr;
use super::simd::{LANES, max, multiversion};
use super::tensor::{Out4, View4, from_vec, slice};

mod single_query;
use single_query::single_query;

/// A boolean mask `[b | 1, h | 1, sq | 1, sk | 1]` as bytes (non-zero = masked out).
#[derive(Debug, Clone, Copy)]
struct MaskView {
    base: *const u8,
    strides: [isize; 4],
}

// SAFETY: read-only; the mask tensor outlives the parallel loop (held by the caller).
unsafe impl Send for MaskView {}
// SAFETY: as above.
unsafe impl Sync for MaskView {}

impl MaskView {
    /// Whether key `j` is masked for query `i` of head `(b, h)`.
    #[inline]
    fn masked(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        let offset = b as isize * self.strides[0]
            + h as isize * self.strides[1]
            + i as isize * self.strides[2]
            + j as isize * self.strides[3];
        // SAFETY: in bounds for in-bounds indices (broadcast dims have stride 0).
        unsafe { *self.base.offset(offset) != 0 }
    }
}

/// Everything a forward or backward task reads.
#[derive(Debug, Clone, Copy)]
struct Problem {
    q: View4,
    k: View4,
    v: View4,
    mask: Option<MaskView>,
    causal: bool,
    scale: f32,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    sq: usize,
    sk: usize,
    d: usize,
    dv: usize,
}

impl Problem {
    fn new(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        mask: Option<&FlexTensor>,
        causal: bool,
        scale: f32,
    ) -> Self {
        let q = View4::of(q).expect("query prepared by `prepare`");
        let k = View4::of(k).expect("key prepared by `prepare`");
        let v = View4::of(v).expect("value prepared by `prepare`");
        let [batch, heads, sq, d] = q.dims;
        let [kb, kv_heads, sk, kd] = k.dims;
        let [vb, vh, vs, dv] = v.dims;
        assert!(
            kb == batch && vb == batch,
            "attention: batch of query {batch}, key {kb}, value {vb} differ"
        );
        assert_eq!(kd, d, "attention: query and key head sizes differ");
        assert!(
            vh == kv_heads && vs == sk,
            "attention: key {:?} and value {:?} shapes differ",
            k.dims,
            v.dims
        );
        assert!(
            kv_heads > 0 && heads % kv_heads == 0,
            "attention: {heads} query heads are not a multiple of {kv_heads} key/value heads"
        );
        let mask = mask.map(|m| {
            let layout = m.layout();
            let shape = layout.shape();
            assert_eq!(shape.num_dims(), 4, "attention: the mask must be 4-D");
            let target = [batch, heads, sq, sk];
            let mut strides = [0isize; 4];
            for i in 0..4 {
                assert!(
                    shape[i] == target[i] || shape[i] == 1,
                    "attention: mask dim {i} is {}, expected {} or 1",
                    shape[i],
                    target[i]
                );
                strides[i] = if shape[i] == 1 {
                    0
                } else {
                    layout.strides()[i]
                };
            }
            let bytes = m.bytes();
            MaskView {
                // SAFETY: the start offset lies inside the buffer (bool elements are bytes).
                base: unsafe { bytes.as_ptr().add(layout.start_offset()) },
                strides,
            }
        });
        Self {
            q,
            k,
            v,
            mask,
            causal,
            scale,
            batch,
            heads,
            kv_heads,
            sq,
            sk,
            d,
            dv,
        }
    }

    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn q_mat(&self, b: usize, h: usize) -> Mat {
        view_mat(&self.q, b, h)
    }

    fn k_mat(&self, b: usize, kvh: usize) -> Mat {
        view_mat(&self.k, b, kvh)
    }

    fn v_mat(&self, b: usize, kvh: usize) -> Mat {
        view_mat(&self.v, b, kvh)
    }

    /// `s = scale·Q·Kᵀ` for head `(b, h)`, masked entries set to `-inf`.
    fn scores(&self, b: usize, h: usize, s: &mut [f32]) {
        let kvh = h / self.groups();
        // SAFETY: `s` holds `sq x sk`; the views are in bounds and outlive the call.
        unsafe {
            gemm(
                MatMut::row_major(s, self.sk),
                false,
                self.q_mat(b, h),
                self.k_mat(b, kvh).t(),
                self.scale,
                false,
            );
        }
        for i in 0..self.sq {
            self.mask_row(b, h, i, &mut s[i * self.sk..(i + 1) * self.sk]);
        }
    }

    /// Set to `-inf` the scores of query `i` of head `(b, h)` (a row of `sk`) that the causal
    /// rule or the mask hide.
    fn mask_row(&self, b: usize, h: usize, i: usize, row: &mut [f32]) {
        if self.causal {
            let offset = self.sk as isize - self.sq as isize;
            let visible = (i as isize + offset + 1).clamp(0, self.sk as isize) as usize;
            row[visible..].fill(f32::NEG_INFINITY);
        }
        if let Some(mask) = &self.mask {
            for (j, x) in row.iter_mut().enumerate() {
                if mask.masked(b, h, i, j) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

fn view_mat(v: &View4, a: usize, b: usize) -> Mat {
    Mat {
        ptr: v.at(a, b),
        rows: v.dims[2],
        cols: v.dims[3],
        rs: v.strides[2],
        cs: v.strides[3],
    }
}

/// Row-wise softmax of `s` (`cols` wide) in place, writing each row's log-sum-exp; masked
/// entries (`-inf`) become exact zeros, fully masked rows all zeros with log-sum-exp `-inf`.
#[inline(always)]
fn softmax_rows_kernel<const F: bool>(s: &mut [f32], cols: usize, lse: &mut [f32]) {
    for (row, l) in s.chunks_exact_mut(cols).zip(lse.iter_mut()) {
        let m = max(row);
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            *l = f32::NEG_INFINITY;
            continue;
        }
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                let e = if c[i] == f32::NEG_INFINITY {
                    0.0
                } else {
                    exp::<F>(c[i] - m)
                };
                c[i] = e;
                acc[i] += e;
            }
        }
        let mut total = 0f32;
        for x in chunks.into_remainder() {
            let e = if *x == f32::NEG_INFINITY {
                0.0
            } else {
                exp::<F>(*x - m)
            };
            *x = e;
            total += e;
        }
        total += acc.iter().sum::<f32>();
        let inv = 1.0 / total;
        for x in row.iter_mut() {
            *x *= inv;
        }
        *l = m + total.ln();
    }
}

/// Probabilities from scores and saved log-sum-exp rows: `p = e^(s - lse)`, zero where masked.
#[inline(always)]
fn probs_kernel<const F: bool>(s: &mut [f32], cols: usize, lse: &[f32]) {
    for (row, &l) in s.chunks_exact_mut(cols).zip(lse) {
        if l == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        for x in row.iter_mut() {
            *x = if *x == f32::NEG_INFINITY {
                0.0
            } else {
                exp::<F>(*x - l)
            };
        }
    }
}

/// `dp = p∘(dp - delta_row)`, the softmax backward.
#[inline(always)]
fn softmax_grad_kernel<const F: bool>(p: &[f32], dp: &mut [f32], cols: usize, delta: &[f32]) {
    let _ = F;
    for ((prow, drow), &dl) in p
        .chunks_exact(cols)
        .zip(dp.chunks_exact_mut(cols))
        .zip(delta)
    {
        for (g, &pv) in drow.iter_mut().zip(prow) {
            *g = pv * (*g - dl);
        }
    }
}

multiversion!(fn softmax_rows(s: &mut [f32], cols: usize, lse: &mut [f32]) = softmax_rows_kernel);
multiversion!(fn probs(s: &mut [f32], cols: usize, lse: &[f32]) = probs_kernel);
multiversion!(fn softmax_grad(p: &[f32], dp: &mut [f32], cols: usize, delta: &[f32]) = softmax_grad_kernel);

/// Whether `jobs` tasks of `macs` multiply-accumulates each are worth rayon.
fn parallel(jobs: usize, macs: usize) -> bool {
    jobs > 1 && jobs.saturating_mul(macs) >= 1 << 18
}

/// Runs `task(job, scratch)` for `0..jobs`, with a `scratch_len` buffer per worker.
fn run<T>(jobs: usize, macs: usize, scratch_len: usize, task: T)
where
    T: Fn(usize, &mut [f32]) + Sync + Send,
{
    if parallel(jobs, macs) {
        (0..jobs)
            .into_par_iter()
            .for_each_init(|| vec![0f32; scratch_len], |s, j| task(j, s));
    } else {
        let mut s = vec![0f32; scratch_len];
        for j in 0..jobs {
            task(j, &mut s);
        }
    }
}

/// `t` as it goes to the kernels: strides the GEMM can use (else a contiguous copy).
pub fn prepare(t: FlexTensor) -> FlexTensor {
    View4::of_or_copy(t).0
}

/// The forward: the output `[b, h, sq, dv]` (laid out like the query in memory, so a
/// `[b, s, h, d]` query from `split_heads` gives a `[b, s, h, d]` output and merging the heads
/// is free) and, when `with_lse`, the log-sum-exp rows `[b, h, sq]`. The inputs must come from
/// [`prepare`].
pub fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    mask: Option<&FlexTensor>,
    causal: bool,
    scale: f32,
    with_lse: bool,
) -> (FlexTensor, Option<FlexTensor>) {
    let p = Problem::new(q, k, v, mask, causal, scale);
    let mut out = Out4::like([p.batch, p.heads, p.sq, p.dv], Some(&p.q));
    let mut lse = vec![0f32; p.batch * p.heads * p.sq];
    if p.single_query() {
        single_query(&p, &mut out, &mut lse);
        let lse = with_lse.then(|| from_vec(lse, &[p.batch, p.heads, p.sq]));
        return (out.into_tensor(), lse);
    }
    let out_strides = out.strides;
    let out_ptr = SendPtr(out.at(0, 0));
    let lse_ptr = SendPtr(lse.as_mut_ptr());
    let jobs = p.batch * p.heads;
    run(jobs, p.sq * p.sk * (p.d + p.dv), p.sq * p.sk, |job, s| {
        let (b, h) = (job / p.heads, job % p.heads);
        p.scores(b, h, s);
        // SAFETY: task `job` alone writes rows `job·sq ..` of `lse` and head `(b, h)` of `out`;
        // both buffers outlive `run`.
        let row_lse =
            unsafe { std::slice::from_raw_parts_mut(lse_ptr.add((job * p.sq) as isize), p.sq) };
        softmax_rows(s, p.sk, row_lse);
        let dst = MatMut {
            // SAFETY: in bounds of `out`.
            ptr: unsafe { out_ptr.add(b as isize * out_strides[0] + h as isize * out_strides[1]) },
            rs: out_strides[2],
            cs: out_strides[3],
        };
        let kvh = h / p.groups();
        // SAFETY: see above; `s` holds `sq x sk` probabilities.
        unsafe {
            gemm(
                dst,
                false,
                Mat::row_major(s, p.sq, p.sk),
                p.v_mat(b, kvh),
                1.0,
                false,
            )
        };
    });
    let lse = with_lse.then(|| from_vec(lse, &[p.batch, p.heads, p.sq]));
    (out.into_tensor(), lse)
}

/// Which input gradients to compute.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    /// Query.
    pub q: bool,
    /// Key.
    pub k: bool,
    /// Value.
    pub v: bool,
}

/// Gradients `(dq, dk, dv)` of the inputs named in `needs` (each laid out like its input).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    mask: Option<&FlexTensor>,
    out: &FlexTensor,
    lse: &FlexTensor,
    grad: FlexTensor,
    causal: bool,
    scale: f32,
    needs: Needs,
) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
    let p = Problem::new(q, k, v, mask, causal, scale);
    let (grad, g) = View4::of_or_copy(grad);
    let o = View4::of(out).expect("the forward's output has positive strides");
    let lse = slice(lse);
    let mut dq = needs
        .q
        .then(|| Out4::like([p.batch, p.heads, p.sq, p.d], Some(&p.q)));
    let mut dk = needs
        .k
        .then(|| Out4::like([p.batch, p.kv_heads, p.sk, p.d], Some(&p.k)));
    let mut dv = needs
        .v
        .then(|| Out4::like([p.batch, p.kv_heads, p.sk, p.dv], Some(&p.v)));
    let ptrs = |o: &mut Option<Out4>| o.as_mut().map(|o| (SendPtr(o.at(0, 0)), o.strides));
    let (dq_ptr, dk_ptr, dv_ptr) = (ptrs(&mut dq), ptrs(&mut dk), ptrs(&mut dv));
    let groups = p.groups();
    let (sq, sk) = (p.sq, p.sk);
    let jobs = p.batch * p.kv_heads;
    let macs = groups * sq * sk * (2 * p.d + 2 * p.dv);
    run(jobs, macs, 2 * sq * sk + sq, |job, scratch| {
        let (b, kvh) = (job / p.kv_heads, job % p.kv_heads);
        let (s, rest) = scratch.split_at_mut(sq * sk);
        let (dp, delta) = rest.split_at_mut(sq * sk);
        for gi in 0..groups {
            let h = kvh * groups + gi;
            p.scores(b, h, s);
            let row = (b * p.heads + h) * sq;
            probs(s, sk, &lse[row..row + sq]);
            let g_mat = view_mat(&g, b, h);
            let first = gi == 0;
            // SAFETY (all GEMMs below): task `job` alone writes head `(b, kvh)` of dk/dv and
            // heads `kvh·groups ..` of dq; scratch buffers hold `sq x sk`.
            if let Some((ptr, st)) = dv_ptr {
                let dst = out_mat(ptr, st, b, kvh);
                unsafe {
                    gemm(
                        dst,
                        !first,
                        Mat::row_major(s, sq, sk).t(),
                        g_mat,
                        1.0,
                        false,
                    )
                };
            }
            if dq_ptr.is_none() && dk_ptr.is_none() {
                continue;
            }
            unsafe {
                gemm(
                    MatMut::row_major(dp, sk),
                    false,
                    g_mat,
                    p.v_mat(b, kvh).t(),
                    1.0,
                    false,
                )
            };
            for (i, dl) in delta.iter_mut().enumerate() {
                *dl = row_dot(&g, &o, b, h, i);
            }
            softmax_grad(s, dp, sk, delta);
            if let Some((ptr, st)) = dq_ptr {
                let dst = out_mat(ptr, st, b, h);
                let ds = Mat::row_major(dp, sq, sk);
                unsafe { gemm(dst, false, ds, p.k_mat(b, kvh), scale, false) };
            }
            if let Some((ptr, st)) = dk_ptr {
                let dst = out_mat(ptr, st, b, kvh);
                let ds_t = Mat::row_major(dp, sq, sk).t();
                unsafe { gemm(dst, !first, ds_t, p.q_mat(b, h), scale, false) };
            }
        }
    });
    drop(grad);
    (
        dq.map(Out4::into_tensor),
        dk.map(Out4::into_tensor),
        dv.map(Out4::into_tensor),
    )
}

fn out_mat(ptr: SendPtr, strides: [isize; 4], a: usize, b: usize) -> MatMut {
    MatMut {
        // SAFETY: in bounds for in-bounds `a`, `b`.
        ptr: unsafe { ptr.add(a as isize * strides[0] + b as isize * strides[1]) },
        rs: strides[2],
        cs: strides[3],
    }
}

/// `Σ_c g[b, h, i, c]·o[b, h, i, c]`.
fn row_dot(g: &View4, o: &View4, b: usize, h: usize, i: usize) -> f32 {
    let (gp, op) = (g.at(b, h), o.at(b, h));
    let mut acc = 0f32;
    for c in 0..g.dims[3] {
        // SAFETY: in bounds of both views.
        unsafe {
            acc += *gp.offset(i as isize * g.strides[2] + c as isize * g.strides[3])
                * *op.offset(i as isize * o.strides[2] + c as isize * o.strides[3]);
        }
    }
    acc
}
