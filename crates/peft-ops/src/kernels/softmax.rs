//! Log-softmax over the last dimension, forward and backward.

use super::math::exp;
use super::par::{chunks_mut, rows_per_task};
use super::simd::{LANES, max, multiversion, sum};

#[inline(always)]
fn forward_kernel<const F: bool>(x: &[f32], out: &mut [f32], width: usize) {
    for (row, o) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let m = max(row);
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] += exp::<F>(c[i] - m);
            }
        }
        let mut total: f32 = chunks.remainder().iter().map(|v| exp::<F>(v - m)).sum();
        total += acc.iter().sum::<f32>();
        let lse = m + total.ln();
        for (o, &v) in o.iter_mut().zip(row) {
            *o = v - lse;
        }
    }
}

#[inline(always)]
fn backward_kernel<const F: bool>(y: &[f32], g: &[f32], out: &mut [f32], width: usize) {
    for ((yr, gr), o) in y
        .chunks_exact(width)
        .zip(g.chunks_exact(width))
        .zip(out.chunks_exact_mut(width))
    {
        let total = sum(gr);
        for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
            *o = gv - exp::<F>(yv) * total;
        }
    }
}

multiversion!(fn forward_rows(x: &[f32], out: &mut [f32], width: usize) = forward_kernel);
multiversion!(fn backward_rows(y: &[f32], g: &[f32], out: &mut [f32], width: usize) = backward_kernel);

/// `x - logsumexp(x)` per row of `width`.
pub fn forward(x: &[f32], width: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    chunks_mut(&mut out, rows_per_task(width) * width, |start, c| {
        forward_rows(&x[start..start + c.len()], c, width)
    });
    out
}

/// `g - softmax·Σg` per row, from the forward's output `y` (`softmax = e^y`).
pub fn backward(y: &[f32], g: &[f32], width: usize) -> Vec<f32> {
    let mut out = vec![0f32; y.len()];
    chunks_mut(&mut out, rows_per_task(width) * width, |start, c| {
        let end = start + c.len();
        backward_rows(&y[start..end], &g[start..end], c, width)
    });
    out
}
