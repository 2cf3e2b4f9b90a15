//! Rotate-half rotary position embedding (transformers' `apply_rotary_pos_emb`):
//! `out = x·cos + rotate_half(x)·sin`, `rotate_half(x) = [-x₂, x₁]` on the two halves of the
//! head dimension, with `cos`/`sin` tables `[s, d]` shared by every batch row and head, or
//! `[b·s, d]`, one table per batch row (a left-padded batch, whose rows start at different
//! positions).
//!
//! The backward is the transpose: `dx = g·cos + [ (g·sin)₂, -(g·sin)₁ ]`.

use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::par::SendPtr;
use super::tensor::{Out4, View4, contiguous, dims, slice};

/// One row of `d`: the forward (`sign = 1`) or the backward (`sign = -1`, tables read at the
/// partner position) of the rotation.
#[inline]
fn rotate_row(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32], backward: bool) {
    let half = x.len() / 2;
    for j in 0..half {
        let (a, b) = (x[j], x[j + half]);
        if backward {
            // dx_j = g_j cos_j + g_{j+h} sin_{j+h};  dx_{j+h} = g_{j+h} cos_{j+h} - g_j sin_j
            out[j] = a * cos[j] + b * sin[j + half];
            out[j + half] = b * cos[j + half] - a * sin[j];
        } else {
            out[j] = a * cos[j] - b * sin[j];
            out[j + half] = b * cos[j + half] + a * sin[j + half];
        }
    }
}

/// The rotation of `x` `[b, h, s, d]` (any strides with a unit last stride; copied otherwise)
/// by `cos`, `sin` `[s, d]` or `[b·s, d]` (per batch row); the output is laid out like `x`.
pub fn apply(x: FlexTensor, cos: &FlexTensor, sin: &FlexTensor, backward: bool) -> FlexTensor {
    let (x, view) = View4::of_or_copy(x);
    let (x, view) = if view.strides[3] == 1 || view.dims[3] <= 1 {
        (x, view)
    } else {
        View4::of_or_copy(x.to_contiguous())
    };
    let [b, h, s, d] = view.dims;
    assert!(d % 2 == 0, "rope: the head size {d} is odd");
    let (cos, sin) = (contiguous(cos.clone()), contiguous(sin.clone()));
    let per_row = dims(&cos)[0] == b * s && b > 1;
    let rows = if per_row { b * s } else { s };
    assert_eq!(
        dims(&cos),
        [rows, d],
        "rope: cos must be [seq or batch·seq, head_dim]"
    );
    assert_eq!(dims(&sin), [rows, d], "rope: sin must be like cos");
    let (cos, sin) = (slice(&cos), slice(&sin));
    let mut out = Out4::like([b, h, s, d], Some(&view));
    let os = out.strides;
    let optr = SendPtr(out.at(0, 0));
    (0..b * h).into_par_iter().with_min_len(8).for_each(|job| {
        let (bi, hi) = (job / h, job % h);
        let src = view.at(bi, hi);
        let first = if per_row { bi * s } else { 0 };
        for si in 0..s {
            let t = (first + si) * d..(first + si + 1) * d;
            // SAFETY: row `si` of head `(bi, hi)` is `d` unit-stride elements inside `x`; the
            // output row is written by this task only.
            let (row, dst) = unsafe {
                (
                    std::slice::from_raw_parts(src.offset(si as isize * view.strides[2]), d),
                    std::slice::from_raw_parts_mut(
                        optr.add(bi as isize * os[0] + hi as isize * os[1] + si as isize * os[2]),
                        d,
                    ),
                )
            };
            rotate_row(row, &cos[t.clone()], &sin[t], dst, backward);
        }
    });
    drop(x);
    out.into_tensor()
}
