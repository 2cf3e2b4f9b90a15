//! Elementwise kernels (GELU in its erf and tanh forms, forward and backward): vectorized,
//! split over rayon, in place when the input buffer is not shared.

use burn::backend::flex::FlexTensor;

use super::math::{exp, one_plus_erf};
use super::par::{CHUNK, chunks_mut};
use super::simd::{fmadd, multiversion};
use super::tensor::{contiguous, dims, exclusive, from_vec, slice};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
/// `√(2/π)`, the tanh form's scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The tanh form's cubic coefficient.
const TANH_CUBIC: f32 = 0.044_715;

/// `gelu(x) = x·Φ(x) = x/2·(1 + erf(x/√2))` (transformers' `gelu`, `GELUActivation`).
#[inline(always)]
fn gelu_erf<const F: bool>(x: f32) -> f32 {
    let (one_plus, _) = one_plus_erf::<F>(x * FRAC_1_SQRT_2);
    0.5 * x * one_plus
}

/// `d gelu / dx = Φ(x) + x·φ(x)`, `φ(x) = e^(-x²/2)/√(2π)` (the `e^(-z²)` of the erf).
#[inline(always)]
fn gelu_erf_grad<const F: bool>(x: f32) -> f32 {
    let (one_plus, gauss) = one_plus_erf::<F>(x * FRAC_1_SQRT_2);
    fmadd::<F>(x * FRAC_1_SQRT_2PI, gauss, 0.5 * one_plus)
}

/// `gelu_new(x) = x/2·(1 + tanh(u))`, `u = √(2/π)(x + 0.044715 x³)` (GPT-2's `gelu_new`,
/// transformers' `NewGELUActivation`), computed as `x·σ(2u)`.
#[inline(always)]
fn gelu_tanh<const F: bool>(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * fmadd::<F>(TANH_CUBIC * x * x, x, x);
    x / (1.0 + exp::<F>(-2.0 * u))
}

/// `d gelu_new / dx = σ + 2x·σ(1-σ)·u'`, `σ = σ(2u)`, `u' = √(2/π)(1 + 3·0.044715 x²)`.
#[inline(always)]
fn gelu_tanh_grad<const F: bool>(x: f32) -> f32 {
    let x2 = x * x;
    let u = SQRT_2_OVER_PI * fmadd::<F>(TANH_CUBIC * x2, x, x);
    let du = SQRT_2_OVER_PI * fmadd::<F>(3.0 * TANH_CUBIC, x2, 1.0);
    let s = 1.0 / (1.0 + exp::<F>(-2.0 * u));
    fmadd::<F>(2.0 * x * s * (1.0 - s), du, s)
}

/// An elementwise function `f` and its derivative `df` as slice kernels.
macro_rules! elementwise {
    ($module:ident, $f:ident, $df:ident) => {
        pub(crate) mod $module {
            use super::*;

            #[inline(always)]
            fn forward_kernel<const F: bool>(x: &[f32], y: &mut [f32]) {
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = $f::<F>(v);
                }
            }

            #[inline(always)]
            fn forward_in_place_kernel<const F: bool>(y: &mut [f32]) {
                for o in y.iter_mut() {
                    *o = $f::<F>(*o);
                }
            }

            #[inline(always)]
            fn backward_kernel<const F: bool>(x: &[f32], g: &[f32], out: &mut [f32]) {
                for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
                    *o = g * $df::<F>(v);
                }
            }

            #[inline(always)]
            fn backward_in_place_kernel<const F: bool>(x: &[f32], g: &mut [f32]) {
                for (o, &v) in g.iter_mut().zip(x) {
                    *o *= $df::<F>(v);
                }
            }

            multiversion!(pub fn forward(x: &[f32], y: &mut [f32]) = forward_kernel);
            multiversion!(pub fn forward_in_place(y: &mut [f32]) = forward_in_place_kernel);
            multiversion!(pub fn backward(x: &[f32], g: &[f32], out: &mut [f32]) = backward_kernel);
            multiversion!(pub fn backward_in_place(x: &[f32], g: &mut [f32]) = backward_in_place_kernel);
        }
    };
}

elementwise!(erf_form, gelu_erf, gelu_erf_grad);
elementwise!(tanh_form, gelu_tanh, gelu_tanh_grad);

/// Which GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// Exact, with `erf`.
    Erf,
    /// GPT-2's tanh approximation.
    Tanh,
}

type Map = fn(&[f32], &mut [f32]);
type MapInPlace = fn(&mut [f32]);
type Grad = fn(&[f32], &[f32], &mut [f32]);
type GradInPlace = fn(&[f32], &mut [f32]);

fn kernels(kind: Gelu) -> (Map, MapInPlace, Grad, GradInPlace) {
    match kind {
        Gelu::Erf => (
            erf_form::forward,
            erf_form::forward_in_place,
            erf_form::backward,
            erf_form::backward_in_place,
        ),
        Gelu::Tanh => (
            tanh_form::forward,
            tanh_form::forward_in_place,
            tanh_form::backward,
            tanh_form::backward_in_place,
        ),
    }
}

/// GELU of `x` (overwriting `x`'s buffer when nothing else holds it).
pub fn forward(x: FlexTensor, kind: Gelu) -> FlexTensor {
    let (map, map_in_place, _, _) = kernels(kind);
    let mut x = contiguous(x);
    if let Some(buf) = exclusive(&mut x) {
        chunks_mut(buf, CHUNK, |_, c| map_in_place(c));
        return x;
    }
    let src = slice(&x);
    let mut out = vec![0f32; src.len()];
    chunks_mut(&mut out, CHUNK, |start, c| {
        map(&src[start..start + c.len()], c)
    });
    from_vec(out, &dims(&x))
}

/// `grad · gelu'(x)` (overwriting `grad`'s buffer when nothing else holds it).
pub fn backward(x: &FlexTensor, grad: FlexTensor, kind: Gelu) -> FlexTensor {
    let (_, _, grad_map, grad_in_place) = kernels(kind);
    let x = contiguous(x.clone());
    let src = slice(&x);
    let mut grad = contiguous(grad);
    if let Some(buf) = exclusive(&mut grad) {
        chunks_mut(buf, CHUNK, |start, c| {
            grad_in_place(&src[start..start + c.len()], c)
        });
        return grad;
    }
    let g = slice(&grad);
    let mut out = vec![0f32; src.len()];
    chunks_mut(&mut out, CHUNK, |start, c| {
        let end = start + c.len();
        grad_map(&src[start..end], &g[start..end], c)
    });
    from_vec(out, &dims(&x))
}

/// `silu(a)·b` (Llama's SwiGLU: `silu(gate_proj(x)) · up_proj(x)`), `silu(a) = a·σ(a)`.
#[inline(always)]
fn swiglu_kernel<const F: bool>(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x / (1.0 + exp::<F>(-x)) * y;
    }
}

/// Gradients of `silu(a)·b`: `da = g·b·σ(a)(1 + a(1 - σ(a)))`, `db = g·silu(a)`.
#[inline(always)]
fn swiglu_grad_kernel<const F: bool>(
    a: &[f32],
    b: &[f32],
    g: &[f32],
    da: &mut [f32],
    db: &mut [f32],
) {
    for ((((da, db), &x), &y), &gv) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(g) {
        let s = 1.0 / (1.0 + exp::<F>(-x));
        *db = gv * x * s;
        *da = gv * y * s * fmadd::<F>(x, 1.0 - s, 1.0);
    }
}

multiversion!(fn swiglu_chunk(a: &[f32], b: &[f32], out: &mut [f32]) = swiglu_kernel);
multiversion!(fn swiglu_grad_chunk(a: &[f32], b: &[f32], g: &[f32], da: &mut [f32], db: &mut [f32]) = swiglu_grad_kernel);

/// `silu(a)·b`, elementwise (`a`, `b` contiguous, same shape).
pub fn swiglu(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let (sa, sb) = (slice(a), slice(b));
    assert_eq!(sa.len(), sb.len(), "swiglu: shapes differ");
    let mut out = vec![0f32; sa.len()];
    chunks_mut(&mut out, CHUNK, |start, c| {
        let end = start + c.len();
        swiglu_chunk(&sa[start..end], &sb[start..end], c)
    });
    from_vec(out, &dims(a))
}

/// `(da, db)` of `silu(a)·b` for the incoming gradient `g` (all contiguous).
pub fn swiglu_backward(a: &FlexTensor, b: &FlexTensor, g: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let (sa, sb, sg) = (slice(a), slice(b), slice(g));
    let n = sa.len();
    let mut da = vec![0f32; n];
    let mut db = vec![0f32; n];
    {
        use rayon::prelude::*;
        da.par_chunks_mut(CHUNK)
            .zip(db.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, (ca, cb))| {
                let start = i * CHUNK;
                let end = start + ca.len();
                swiglu_grad_chunk(&sa[start..end], &sb[start..end], &sg[start..end], ca, cb)
            });
    }
    let shape = dims(a);
    (from_vec(da, &shape), from_vec(db, &shape))
}
