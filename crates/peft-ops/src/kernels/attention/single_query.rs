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
/// lengths of a few hundred). The same sums as the general path, in the same order of keys.
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
                for g in 0..groups {
                    let h = kvh * groups + g;
                    let query = std::slice::from_raw_parts(p.q.at(b, h), p.d);
                    let row = &mut scores[g * p.sk..(g + 1) * p.sk];
                    query_scores(query, keys, p.k.strides[2] as usize, p.scale, row);
                    p.mask_row(b, h, 0, row);
                }
                let first = b * p.heads + kvh * groups;
                let row_lse = std::slice::from_raw_parts_mut(lse_ptr.add(first as isize), groups);
                softmax_rows(scores, p.sk, row_lse);
                acc.fill(0.0);
                weighted_values(scores, p.sk, values, p.v.strides[2] as usize, acc);
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
