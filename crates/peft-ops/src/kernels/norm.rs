//! LayerNorm (with an optional residual added first) and RMSNorm over the last dimension,
//! forward and backward, rows split over rayon.
//!
//! Same arithmetic as Burn's compositions (`burn::tensor::module::layer_norm`: two-pass mean
//! and biased variance, `eps` inside the square root; `burn::nn::RmsNorm`:
//! `x / sqrt(mean(x²) + eps) · γ`), so values agree to rounding.

use rayon::prelude::*;

use super::par::{SendPtr, rows_per_task};
use super::simd::{LANES, dot, fmadd, multiversion, sum};

/// Which normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// `(z - mean)/sqrt(var + eps)·γ + β`.
    Layer,
    /// `z/sqrt(mean(z²) + eps)·γ`.
    Rms,
}

/// Per-row statistics saved for the backward: the mean (zero for RMSNorm) and `1/σ`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Row means.
    pub mean: Vec<f32>,
    /// Row reciprocal standard deviations (RMS for RMSNorm).
    pub rstd: Vec<f32>,
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_rows_kernel<const F: bool>(
    z: &[f32],
    out: &mut [f32],
    width: usize,
    gamma: &[f32],
    beta: Option<&[f32]>,
    eps: f32,
    norm: Norm,
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    for (((row, o), m), r) in z
        .chunks_exact(width)
        .zip(out.chunks_exact_mut(width))
        .zip(mean.iter_mut())
        .zip(rstd.iter_mut())
    {
        let mu = match norm {
            Norm::Layer => sum(row) / width as f32,
            Norm::Rms => 0.0,
        };
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                let d = c[i] - mu;
                acc[i] = fmadd::<F>(d, d, acc[i]);
            }
        }
        let mut var: f32 = chunks.remainder().iter().map(|x| (x - mu) * (x - mu)).sum();
        var += acc.iter().sum::<f32>();
        let inv = 1.0 / (var / width as f32 + eps).sqrt();
        *m = mu;
        *r = inv;
        match beta {
            Some(beta) => {
                for (((o, &x), &g), &b) in o.iter_mut().zip(row).zip(gamma).zip(beta) {
                    *o = fmadd::<F>((x - mu) * inv, g, b);
                }
            }
            None => {
                for ((o, &x), &g) in o.iter_mut().zip(row).zip(gamma) {
                    *o = (x - mu) * inv * g;
                }
            }
        }
    }
}

multiversion!(fn forward_rows(z: &[f32], out: &mut [f32], width: usize, gamma: &[f32], beta: Option<&[f32]>, eps: f32, norm: Norm, mean: &mut [f32], rstd: &mut [f32]) = forward_rows_kernel);

/// Normalizes the rows (`width` wide) of `z` into a new buffer; returns it and the statistics.
pub fn forward(
    z: &[f32],
    width: usize,
    gamma: &[f32],
    beta: Option<&[f32]>,
    eps: f64,
    norm: Norm,
) -> (Vec<f32>, Stats) {
    let rows = z.len() / width;
    let mut out = vec![0f32; z.len()];
    let mut stats = Stats {
        mean: vec![0f32; rows],
        rstd: vec![0f32; rows],
    };
    let per = rows_per_task(width);
    let eps = eps as f32;
    out.par_chunks_mut(per * width)
        .zip(stats.mean.par_chunks_mut(per))
        .zip(stats.rstd.par_chunks_mut(per))
        .enumerate()
        .for_each(|(t, ((o, m), r))| {
            let start = t * per * width;
            forward_rows(
                &z[start..start + o.len()],
                o,
                width,
                gamma,
                beta,
                eps,
                norm,
                m,
                r,
            );
        });
    (out, stats)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_rows_kernel<const F: bool>(
    z: &[f32],
    grad: &[f32],
    width: usize,
    gamma: &[f32],
    norm: Norm,
    mean: &[f32],
    rstd: &[f32],
    dz: Option<&mut [f32]>,
    dgamma: Option<&mut [f64]>,
    dbeta: Option<&mut [f64]>,
    xhat: &mut [f32],
    gx: &mut [f32],
) {
    let inv_w = 1.0 / width as f32;
    let mut dz = dz;
    let mut dgamma = dgamma;
    let mut dbeta = dbeta;
    for (r, (row, g)) in z
        .chunks_exact(width)
        .zip(grad.chunks_exact(width))
        .enumerate()
    {
        let (mu, inv) = (mean[r], rstd[r]);
        for (((xh, gxv), &x), (&gv, &ga)) in xhat
            .iter_mut()
            .zip(gx.iter_mut())
            .zip(row)
            .zip(g.iter().zip(gamma))
        {
            *xh = (x - mu) * inv;
            *gxv = gv * ga;
        }
        // `dγ`, `dβ` sum over every row: accumulated in f64 (a sum of ~1000 terms of both
        // signs loses about 1e-5 of its value in f32).
        if let Some(dg) = dgamma.as_deref_mut() {
            for ((acc, &gv), &xh) in dg.iter_mut().zip(g).zip(xhat.iter()) {
                *acc += f64::from(gv * xh);
            }
        }
        if let Some(db) = dbeta.as_deref_mut() {
            for (acc, &gv) in db.iter_mut().zip(g) {
                *acc += f64::from(gv);
            }
        }
        if let Some(dz) = dz.as_deref_mut() {
            let mean_gx = match norm {
                Norm::Layer => sum(gx) * inv_w,
                Norm::Rms => 0.0,
            };
            let mean_gx_xhat = dot::<F>(gx, xhat) * inv_w;
            let out = &mut dz[r * width..(r + 1) * width];
            for ((o, &gxv), &xh) in out.iter_mut().zip(gx.iter()).zip(xhat.iter()) {
                *o = inv * (gxv - mean_gx - xh * mean_gx_xhat);
            }
        }
    }
}

multiversion!(fn backward_rows(z: &[f32], grad: &[f32], width: usize, gamma: &[f32], norm: Norm, mean: &[f32], rstd: &[f32], dz: Option<&mut [f32]>, dgamma: Option<&mut [f64]>, dbeta: Option<&mut [f64]>, xhat: &mut [f32], gx: &mut [f32]) = backward_rows_kernel);

/// Which gradients the backward computes.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    /// The normalized input (and so the residual).
    pub input: bool,
    /// `γ`.
    pub gamma: bool,
    /// `β`.
    pub beta: bool,
}

/// `(d input, dγ, dβ)`, each present when asked for.
pub type NormGrads = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

/// Per-task partial sums of `dγ`, `dβ`.
type Partial = (Option<Vec<f64>>, Option<Vec<f64>>);

/// Gradients of the input, `γ` and `β` (those in `needs`).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    z: &[f32],
    grad: &[f32],
    width: usize,
    gamma: &[f32],
    norm: Norm,
    stats: &Stats,
    needs: Needs,
) -> NormGrads {
    let rows = z.len() / width;
    let per = rows_per_task(width);
    let tasks = rows.div_ceil(per);
    let mut dz = needs.input.then(|| vec![0f32; z.len()]);
    let dz_ptr = dz.as_mut().map(|d| SendPtr(d.as_mut_ptr()));
    // One partial `dγ`/`dβ` per task, summed after.
    let partials: Vec<Partial> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
            let mut dg = needs.gamma.then(|| vec![0f64; width]);
            let mut db = needs.beta.then(|| vec![0f64; width]);
            let mut xhat = vec![0f32; width];
            let mut gx = vec![0f32; width];
            let span = r0 * width..r1 * width;
            let dz = dz_ptr.map(|p| {
                // SAFETY: task `t` alone writes rows `r0..r1` of `dz`, which outlives the loop.
                unsafe { std::slice::from_raw_parts_mut(p.add(span.start as isize), span.len()) }
            });
            backward_rows(
                &z[span.clone()],
                &grad[span],
                width,
                gamma,
                norm,
                &stats.mean[r0..r1],
                &stats.rstd[r0..r1],
                dz,
                dg.as_deref_mut(),
                db.as_deref_mut(),
                &mut xhat,
                &mut gx,
            );
            (dg, db)
        })
        .collect();
    let reduce = |pick: fn(&Partial) -> Option<&Vec<f64>>| {
        let mut total: Option<Vec<f64>> = None;
        for p in &partials {
            if let Some(v) = pick(p) {
                match &mut total {
                    Some(t) => t.iter_mut().zip(v).for_each(|(a, b)| *a += b),
                    None => total = Some(v.clone()),
                }
            }
        }
        total.map(|t| t.into_iter().map(|v| v as f32).collect::<Vec<f32>>())
    };
    let dgamma = reduce(|p| p.0.as_ref());
    let dbeta = reduce(|p| p.1.as_ref());
    (dz, dgamma, dbeta)
}

#[inline(always)]
fn add_kernel<const F: bool>(a: &[f32], b: &[f32], out: &mut [f32]) {
    let _ = F;
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

multiversion!(fn add_chunk(a: &[f32], b: &[f32], out: &mut [f32]) = add_kernel);

/// `a + b`, elementwise, over rayon.
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    super::par::chunks_mut(&mut out, super::par::CHUNK, |start, c| {
        let end = start + c.len();
        add_chunk(&a[start..end], &b[start..end], c)
    });
    out
}
