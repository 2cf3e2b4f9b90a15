//! The AdamW update and the squared norm of a gradient, each in one pass over rayon (the
//! composition runs about a dozen single-threaded elementwise passes per parameter, each
//! allocating its result: most of a full fine-tuning step's optimizer time).

use rayon::prelude::*;

use super::par::CHUNK;
use super::simd::{LANES, multiversion};

/// The scalars of one AdamW update (`torch.optim.AdamW` semantics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (0 for none).
    pub weight_decay: f64,
    /// The step number, from 1 (bias corrections `1 - beta^t`).
    pub step: u64,
    /// Factor on the gradient first (clipping, accumulation averaging).
    pub grad_scale: f64,
}

/// The update's scalars as the kernel uses them.
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    grad_scale: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    decay: f32,
    sqrt_bias2: f32,
    eps: f32,
    step_size: f32,
}

impl Coefficients {
    fn of(s: &AdamWStep) -> Self {
        let t = i32::try_from(s.step).unwrap_or(i32::MAX);
        let bias1 = 1.0 - s.beta1.powi(t);
        let bias2 = 1.0 - s.beta2.powi(t);
        Self {
            grad_scale: s.grad_scale as f32,
            beta1: s.beta1 as f32,
            one_minus_beta1: (1.0 - s.beta1) as f32,
            beta2: s.beta2 as f32,
            one_minus_beta2: (1.0 - s.beta2) as f32,
            decay: (1.0 - s.lr * s.weight_decay) as f32,
            sqrt_bias2: bias2.sqrt() as f32,
            eps: s.eps as f32,
            step_size: (s.lr / bias1) as f32,
        }
    }
}

/// `m = β1 m + (1-β1) g; v = β2 v + (1-β2) g²; p = p(1 - lr·wd) - lr/(1-β1ᵗ) · m / (√v/√(1-β2ᵗ) + ε)`,
/// in the order of `torch.optim.AdamW`'s single-tensor path (and of `reference::adamw`, operation
/// for operation, so both give the same bits).
#[inline(always)]
fn adamw_kernel<const F: bool>(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    c: Coefficients,
) {
    let _ = F;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = g * c.grad_scale;
        *m = *m * c.beta1 + g * c.one_minus_beta1;
        *v = *v * c.beta2 + g * g * c.one_minus_beta2;
        let denom = v.sqrt() / c.sqrt_bias2 + c.eps;
        *p = *p * c.decay - *m / denom * c.step_size;
    }
}

multiversion!(fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: Coefficients) = adamw_kernel);

/// One AdamW update of `p`, `m`, `v` in place with gradient `g` (same lengths).
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step: &AdamWStep) {
    assert!(
        p.len() == g.len() && p.len() == m.len() && p.len() == v.len(),
        "adamw: parameter, gradient and moments differ in size"
    );
    let c = Coefficients::of(step);
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(i, ((p, m), v))| {
            let start = i * CHUNK;
            adamw_chunk(p, &g[start..start + p.len()], m, v, c)
        });
}

#[inline(always)]
fn sum_squares_kernel<const F: bool>(x: &[f32]) -> f64 {
    let _ = F;
    // f32 lanes over short runs, folded into f64 so that millions of terms keep their digits.
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut acc = [0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] += c[i] * c[i];
            }
        }
        let rest: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        total += f64::from(acc.iter().sum::<f32>() + rest);
    }
    total
}

multiversion!(fn sum_squares_chunk(x: &[f32]) -> f64 = sum_squares_kernel);

/// `Σ x²`, accumulated in `f64`.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(CHUNK).map(sum_squares_chunk).sum()
}
