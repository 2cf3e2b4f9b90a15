//! The forward for one query per head: a decoding step over a KV cache.

use super::super::par::SendPtr;
use super::super::simd::{dot, fmadd, multiversion};
use super::super::tensor::{Out4, View4};
use super::{Problem, run, softmax_rows};

impl Problem {
    /// Decoding: one query per head, and rows of the query, keys and values with unit stride
    /// (a KV cache's rows always are).
    pub(super) fn single_query(&self) -> bool {
        self.sq == 1
            && [&self.q, &self.k, &self.v]
                .iter()
                .all(|t| t.strides[3] == 1 || t.dims[3] == 1)
    }
}

/// The forward for one query per head ([`Problem::single_query`]; a decoding step over a KV
/// cache): one task per (batch, key/value head) runs the `heads / kv_heads` query heads that
/// share it, so each cached key and value row is read once for all of them, with dot products
/// and row updates instead of two GEMM calls per head (whose fixed cost dominated at cache
/// lengths of a few hundred). The same sums as the general path, in the same order of keys (the
/// lanes of each dot product in another order on AVX-512).
pub(super) fn single_query(p: &Problem, out: &mut Out4, lse: &mut [f32]) {
    let groups = p.groups();
    let out_strides = out.strides;
    let out_ptr = SendPtr(out.at(0, 0));
    let lse_ptr = SendPtr(lse.as_mut_ptr());
    let jobs = p.batch * p.kv_heads;
    run(
        jobs,
        groups * p.sk * (p.d + p.dv),
        groups * (p.sk + p.dv),
        |job, scratch| {
            let (b, kvh) = (job / p.kv_heads, job % p.kv_heads);
            let (scores, acc) = scratch.split_at_mut(groups * p.sk);
            // SAFETY: rows of the views are in bounds with unit stride (`single_query`); task
            // `job` alone writes the `groups` heads `kvh·groups ..` of batch `b` in `out` and
            // `lse`; both buffers outlive `run`.
            unsafe {
                let keys = rows(&p.k, b, kvh, p.sk, p.d);
                let values = rows(&p.v, b, kvh, p.sk, p.dv);
                let queries = |g: usize| p.q.at(b, kvh * groups + g);
                let (key_stride, value_stride) = (p.k.strides[2] as usize, p.v.strides[2] as usize);
                #[cfg(target_arch = "x86_64")]
                let grouped =
                    avx512::scores(groups, p.d, queries, keys, key_stride, p.scale, scores);
                #[cfg(not(target_arch = "x86_64"))]
                let grouped = false;
                for g in 0..groups {
                    let row = &mut scores[g * p.sk..(g + 1) * p.sk];
                    if !grouped {
                        let query = std::slice::from_raw_parts(queries(g), p.d);
                        query_scores(query, keys, key_stride, p.scale, row);
                    }
                    p.mask_row(b, kvh * groups + g, 0, row);
                }
                let first = b * p.heads + kvh * groups;
                let row_lse = std::slice::from_raw_parts_mut(lse_ptr.add(first as isize), groups);
                softmax_rows(scores, p.sk, row_lse);
                #[cfg(target_arch = "x86_64")]
                let grouped = avx512::weighted_values(scores, p.sk, values, value_stride, acc);
                #[cfg(not(target_arch = "x86_64"))]
                let grouped = false;
                if !grouped {
                    acc.fill(0.0);
                    weighted_values(scores, p.sk, values, value_stride, acc);
                }
                for g in 0..groups {
                    let h = kvh * groups + g;
                    let dst =
                        out_ptr.add(b as isize * out_strides[0] + h as isize * out_strides[1]);
                    for (c, x) in acc[g * p.dv..(g + 1) * p.dv].iter().enumerate() {
                        *dst.offset(c as isize * out_strides[3]) = *x;
                    }
                }
            }
        },
    );
}

/// The `len` rows (of `width`, unit stride) of head `(a, h)` of `t` as one slice from the first
/// row's start to the last row's end.
///
/// # Safety
/// The rows must be in bounds of `t`'s storage and the storage alive while the slice is used.
unsafe fn rows<'a>(t: &View4, a: usize, h: usize, len: usize, width: usize) -> &'a [f32] {
    if len == 0 {
        return &[];
    }
    let span = (len - 1) * t.strides[2] as usize + width;
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(t.at(a, h), span) }
}

/// `row[j] = scale · query · key_j` for the keys at `stride` in `keys`.
#[inline(always)]
fn query_scores_kernel<const F: bool>(
    query: &[f32],
    keys: &[f32],
    stride: usize,
    scale: f32,
    row: &mut [f32],
) {
    let d = query.len();
    for (j, x) in row.iter_mut().enumerate() {
        *x = scale * dot::<F>(query, &keys[j * stride..j * stride + d]);
    }
}

/// `acc[g] += Σ_j p[g][j] · value_j` for each of the query heads `g` (rows of `probs`, `len`
/// wide), values at `stride` in `values`.
#[inline(always)]
fn weighted_values_kernel<const F: bool>(
    probs: &[f32],
    len: usize,
    values: &[f32],
    stride: usize,
    acc: &mut [f32],
) {
    let groups = probs.len() / len.max(1);
    let dv = acc.len() / groups.max(1);
    for j in 0..len {
        let value = &values[j * stride..j * stride + dv];
        for g in 0..groups {
            let p = probs[g * len + j];
            if p == 0.0 {
                continue;
            }
            for (a, v) in acc[g * dv..(g + 1) * dv].iter_mut().zip(value) {
                *a = fmadd::<F>(p, *v, *a);
            }
        }
    }
}

multiversion!(fn query_scores(query: &[f32], keys: &[f32], stride: usize, scale: f32, row: &mut [f32]) = query_scores_kernel);
multiversion!(fn weighted_values(probs: &[f32], len: usize, values: &[f32], stride: usize, acc: &mut [f32]) = weighted_values_kernel);

/// AVX-512 kernels for the common shapes: head widths of 64 or 128 and up to 4 query heads per
/// key/value head (SmolLM2: 64 and 3; Llama 3: 128 and 4). The query heads of a group are
/// multiplied together, so each key and value row is loaded once for all of them, with the
/// queries and sums in registers; the generic kernels above read every key once per query head
/// and, for the values, load and store the sums on every key. At batch 32 of a SmolLM2-135M
/// decode (cache of up to 128) these two were 11% of a step (perf).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::kernels::simd::{Level, level, sums4};

    /// Runs `$f::<G, NV>` for `groups` in 1..=4 and `width` 64 or 128 on an AVX-512 CPU, and
    /// evaluates to whether it did.
    macro_rules! dispatch {
        ($groups:expr, $width:expr, $f:ident($($arg:expr),*)) => {{
            if level() != Level::V4 {
                false
            } else {
                // SAFETY: the CPU has AVX-512 F (`level`); the caller's bounds hold.
                unsafe {
                    match ($groups, $width) {
                        (1, 64) => $f::<1, 4>($($arg),*),
                        (2, 64) => $f::<2, 4>($($arg),*),
                        (3, 64) => $f::<3, 4>($($arg),*),
                        (4, 64) => $f::<4, 4>($($arg),*),
                        (1, 128) => $f::<1, 8>($($arg),*),
                        (2, 128) => $f::<2, 8>($($arg),*),
                        (3, 128) => $f::<3, 8>($($arg),*),
                        (4, 128) => $f::<4, 8>($($arg),*),
                        _ => return false,
                    }
                }
                true
            }
        }};
    }

    /// `scores[g·len + j] = scale · query_g · key_j` for the `groups` query heads of a group
    /// (`len = scores.len() / groups` keys at `stride` in `keys`); false (nothing written) when
    /// the shape has no kernel here.
    ///
    /// # Safety
    /// `query(g)` points at `d` readable values for each `g < groups`.
    pub(super) unsafe fn scores(
        groups: usize,
        d: usize,
        query: impl Fn(usize) -> *const f32,
        keys: &[f32],
        stride: usize,
        scale: f32,
        scores: &mut [f32],
    ) -> bool {
        let len = scores.len() / groups.max(1);
        if len > 0 && keys.len() < (len - 1) * stride + d {
            return false;
        }
        dispatch!(
            groups,
            d,
            scores_k(
                &query,
                keys.as_ptr(),
                stride,
                scale,
                scores.as_mut_ptr(),
                len
            )
        )
    }

    // Register tiles indexed by (head, key, lane block) read plainer than zipped iterators.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_k<const G: usize, const NV: usize>(
        query: &dyn Fn(usize) -> *const f32,
        keys: *const f32,
        stride: usize,
        scale: f32,
        out: *mut f32,
        len: usize,
    ) {
        // SAFETY: queries of `16·NV` values, `len` keys of as many at `stride` (checked by
        // `scores`), `G x len` scores.
        unsafe {
            let q: [[__m512; NV]; G] = std::array::from_fn(|g| {
                std::array::from_fn(|v| _mm512_loadu_ps(query(g).add(16 * v)))
            });
            let scale4 = _mm_set1_ps(scale);
            let mut j = 0;
            // Four keys at a time: the four sums of each query head reduce together (`sums4`).
            while j + 4 <= len {
                let mut acc = [[_mm512_setzero_ps(); 4]; G];
                for t in 0..4 {
                    let key = keys.add((j + t) * stride);
                    for v in 0..NV {
                        let kv = _mm512_loadu_ps(key.add(16 * v));
                        for g in 0..G {
                            acc[g][t] = _mm512_fmadd_ps(q[g][v], kv, acc[g][t]);
                        }
                    }
                }
                for (g, a) in acc.iter().enumerate() {
                    let s = _mm_mul_ps(scale4, sums4(a[0], a[1], a[2], a[3]));
                    _mm_storeu_ps(out.add(g * len + j), s);
                }
                j += 4;
            }
            while j < len {
                let key = keys.add(j * stride);
                let mut acc = [_mm512_setzero_ps(); G];
                for v in 0..NV {
                    let kv = _mm512_loadu_ps(key.add(16 * v));
                    for g in 0..G {
                        acc[g] = _mm512_fmadd_ps(q[g][v], kv, acc[g]);
                    }
                }
                for (g, a) in acc.iter().enumerate() {
                    *out.add(g * len + j) = scale * _mm512_reduce_add_ps(*a);
                }
                j += 1;
            }
        }
    }

    /// `acc[g] = Σ_j probs[g][j] · value_j` (overwritten) for the query heads `g` of a group:
    /// rows of `probs`, `len` wide; values at `stride` in `values`. Keys with probability 0
    /// (masked) are skipped per head, as the generic kernel does. False (nothing written) when
    /// the shape has no kernel here.
    pub(super) fn weighted_values(
        probs: &[f32],
        len: usize,
        values: &[f32],
        stride: usize,
        acc: &mut [f32],
    ) -> bool {
        let groups = probs.len() / len.max(1);
        let dv = acc.len() / groups.max(1);
        if len == 0 || probs.len() != groups * len || acc.len() != groups * dv {
            return false;
        }
        if values.len() < (len - 1) * stride + dv {
            return false;
        }
        dispatch!(
            groups,
            dv,
            values_k(
                probs.as_ptr(),
                len,
                values.as_ptr(),
                stride,
                acc.as_mut_ptr()
            )
        )
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn values_k<const G: usize, const NV: usize>(
        probs: *const f32,
        len: usize,
        values: *const f32,
        stride: usize,
        out: *mut f32,
    ) {
        // SAFETY: `G x len` probabilities, `len` value rows of `16·NV` at `stride` (checked by
        // `weighted_values`), `G x 16·NV` outputs.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NV]; G];
            for j in 0..len {
                let value = values.add(j * stride);
                let row: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(value.add(16 * v)));
                for (g, a) in acc.iter_mut().enumerate() {
                    let p = *probs.add(g * len + j);
                    if p == 0.0 {
                        continue;
                    }
                    let p = _mm512_set1_ps(p);
                    for (av, rv) in a.iter_mut().zip(&row) {
                        *av = _mm512_fmadd_ps(p, *rv, *av);
                    }
                }
            }
            for (g, a) in acc.iter().enumerate() {
                for (v, av) in a.iter().enumerate() {
                    _mm512_storeu_ps(out.add(g * 16 * NV + 16 * v), *av);
                }
            }
        }
    }
}
