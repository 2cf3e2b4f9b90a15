//! The ops as a Burn backend extension, and their forward on flex.
//!
//! `#[backend_extension(Flex, Autodiff)]` generates the `Dispatch` implementation that routes a
//! call to [`Flex`] (plain tensors) or to `Autodiff<Flex, C>` (tracked tensors, see
//! `crate::autodiff`), following the tensors' device. The public functions in the crate root
//! call it only for f32 tensors on flex; every other backend gets the standard composition
//! (`crate::reference`), so the macro's panic for unlisted backends is never reached.

use std::sync::Arc;

use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Backend, Flex, backend_extension};

use crate::kernels::dropout::Mask;
use crate::kernels::elementwise::{self, Gelu};
use crate::kernels::norm::{self, Norm};
use crate::kernels::optim::{self, AdamWStep};
use crate::kernels::tensor::{contiguous, dims, from_vec, mat_or_copy, slice};
use crate::kernels::{attention, few_rows, lora, rope, softmax};
use crate::quant::QuantMatrix;

/// burn-peft's fused ops. Arguments as in the crate-root functions; `dropout` is
/// `(probability, key)` with probability 0 meaning none. (Optional tensors get their own
/// methods: the extension macro routes plain tensor arguments only.)
#[backend_extension(Flex, Autodiff)]
pub trait PeftOps: Backend {
    /// Exact GELU.
    fn fused_gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Tanh-approximated GELU (`gelu_new`).
    fn fused_gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Scaled dot-product attention.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
        scale: f64,
    ) -> FloatTensor<Self>;
    /// Scaled dot-product attention with a boolean mask (true = masked out).
    fn fused_attention_masked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        causal: bool,
        scale: f64,
    ) -> FloatTensor<Self>;
    /// LayerNorm of `x` over the last dimension.
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// LayerNorm of `x + residual` over the last dimension.
    fn fused_add_layer_norm(
        x: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// RMSNorm over the last dimension.
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    /// Rotate-half RoPE of `x` `[b, h, s, d]` with `cos`, `sin` `[s, d]`, or `[b·s, d]` with a
    /// table per batch row (constants).
    fn fused_rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
    /// `silu(a)·b`.
    fn fused_swiglu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Log-softmax over the last dimension.
    fn fused_log_softmax(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Dropout with a counter-based mask.
    fn fused_dropout(x: FloatTensor<Self>, prob: f64, key: u64) -> FloatTensor<Self>;
    /// One AdamW update of the flattened parameter `p` with gradient `g` and moments `m`, `v`:
    /// `(p, m, v)` after the step.
    fn fused_adamw(
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// `Σ x²` as a one-element `f64` tensor.
    fn fused_sum_squares(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `y + scaling·(drop(x)·a)·b`.
    #[allow(clippy::too_many_arguments)]
    fn fused_lora(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scaling: f64,
        prob: f64,
        key: u64,
    ) -> FloatTensor<Self>;
    /// `x · Wᵀ` for `x` `[n, cols]` and a quantized `W` `[rows, cols]` (frozen: the backward
    /// gives `dx` only, through [`fused_quant_matmul_t`](PeftOps::fused_quant_matmul_t)).
    fn fused_quant_matmul(x: FloatTensor<Self>, w: Arc<QuantMatrix>) -> FloatTensor<Self>;
    /// `dy · W` for `dy` `[n, rows]`: the input gradient of
    /// [`fused_quant_matmul`](PeftOps::fused_quant_matmul) (its backward is that product).
    fn fused_quant_matmul_t(dy: FloatTensor<Self>, w: Arc<QuantMatrix>) -> FloatTensor<Self>;
    /// `silu(x · Gᵀ) ⊙ (x · Uᵀ)` for frozen quantized `G`, `U` (a gated MLP's gate and up
    /// projections): the backward recomputes both products from `x` rather than keeping them.
    fn fused_quant_swiglu(
        x: FloatTensor<Self>,
        gate: Arc<QuantMatrix>,
        up: Arc<QuantMatrix>,
    ) -> FloatTensor<Self>;
    /// `x · w` for `x` `[m, k]` with few rows and `w` `[k, n]` (any strides), without packing
    /// all of `w` first; `w` takes no gradient (`crate::few_rows` sends no tracked `w`).
    fn fused_few_rows_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The dropout mask of `(prob, key)`, `None` for probability 0.
pub(crate) fn mask(prob: f64, key: u64) -> Option<Mask> {
    (prob > 0.0).then(|| Mask::new(prob, key))
}

/// Width of the last dimension and a contiguous copy of `x`.
fn rows(x: FlexTensor) -> (FlexTensor, usize) {
    let x = contiguous(x);
    let width = *dims(&x).last().expect("at least 1-D");
    (x, width)
}

/// LayerNorm or RMSNorm forward on flex: the output, the normalized input `z` and its stats.
pub(crate) fn norm_forward(
    x: FlexTensor,
    residual: Option<FlexTensor>,
    gamma: &FlexTensor,
    beta: Option<&FlexTensor>,
    eps: f64,
    kind: Norm,
) -> (FlexTensor, FlexTensor, norm::Stats) {
    let (x, width) = rows(x);
    let shape = dims(&x);
    let z = match residual {
        Some(r) => {
            let r = contiguous(r);
            assert_eq!(dims(&r), shape, "layer_norm: residual shape differs");
            from_vec(norm::add(slice(&x), slice(&r)), &shape)
        }
        None => x,
    };
    let gamma = contiguous(gamma.clone());
    let beta = beta.map(|b| contiguous(b.clone()));
    assert_eq!(
        slice(&gamma).len(),
        width,
        "norm: gamma size differs from the last dim"
    );
    let (out, stats) = norm::forward(
        slice(&z),
        width,
        slice(&gamma),
        beta.as_ref().map(slice),
        eps,
        kind,
    );
    (from_vec(out, &shape), z, stats)
}

fn attention_forward(
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    mask: Option<FlexTensor>,
    causal: bool,
    scale: f64,
) -> FlexTensor {
    let (q, k, v) = (
        attention::prepare(q),
        attention::prepare(k),
        attention::prepare(v),
    );
    attention::forward(&q, &k, &v, mask.as_ref(), causal, scale as f32, false).0
}

impl PeftOps for Flex {
    fn fused_gelu(x: FlexTensor) -> FlexTensor {
        elementwise::forward(x, Gelu::Erf)
    }

    fn fused_gelu_tanh(x: FlexTensor) -> FlexTensor {
        elementwise::forward(x, Gelu::Tanh)
    }

    fn fused_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        causal: bool,
        scale: f64,
    ) -> FlexTensor {
        attention_forward(q, k, v, None, causal, scale)
    }

    fn fused_attention_masked(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        mask: FlexTensor,
        causal: bool,
        scale: f64,
    ) -> FlexTensor {
        attention_forward(q, k, v, Some(mask), causal, scale)
    }

    fn fused_layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> FlexTensor {
        norm_forward(x, None, &gamma, Some(&beta), eps, Norm::Layer).0
    }

    fn fused_add_layer_norm(
        x: FlexTensor,
        residual: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> FlexTensor {
        norm_forward(x, Some(residual), &gamma, Some(&beta), eps, Norm::Layer).0
    }

    fn fused_rms_norm(x: FlexTensor, gamma: FlexTensor, eps: f64) -> FlexTensor {
        norm_forward(x, None, &gamma, None, eps, Norm::Rms).0
    }

    fn fused_rope(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        rope::apply(x, &cos, &sin, false)
    }

    fn fused_swiglu(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        elementwise::swiglu(&contiguous(a), &contiguous(b))
    }

    fn fused_log_softmax(x: FlexTensor) -> FlexTensor {
        let (x, width) = rows(x);
        from_vec(softmax::forward(slice(&x), width), &dims(&x))
    }

    fn fused_dropout(x: FlexTensor, prob: f64, key: u64) -> FlexTensor {
        match mask(prob, key) {
            Some(m) => {
                let x = contiguous(x);
                from_vec(crate::kernels::dropout::apply(slice(&x), m), &dims(&x))
            }
            None => x,
        }
    }

    fn fused_adamw(
        p: FlexTensor,
        g: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        step: AdamWStep,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = dims(&p);
        let g = contiguous(g);
        // Each buffer is updated in place when nothing else holds it (copied otherwise).
        let owned = |t: FlexTensor| {
            contiguous(t)
                .into_data()
                .try_into_vec::<f32>()
                .expect("f32 tensor")
        };
        let (mut p, mut m, mut v) = (owned(p), owned(m), owned(v));
        optim::adamw(&mut p, slice(&g), &mut m, &mut v, &step);
        (
            from_vec(p, &shape),
            from_vec(m, &shape),
            from_vec(v, &shape),
        )
    }

    fn fused_sum_squares(x: FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let total = optim::sum_squares(slice(&x));
        FlexTensor::from_data(burn::tensor::TensorData::new(vec![total], [1]))
    }

    fn fused_lora(
        x: FlexTensor,
        y: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        scaling: f64,
        prob: f64,
        key: u64,
    ) -> FlexTensor {
        let (x, a, b) = (contiguous(x), contiguous(a), contiguous(b));
        lora::forward(&x, y, &a, &b, scaling as f32, mask(prob, key)).0
    }

    fn fused_quant_matmul(x: FlexTensor, w: Arc<QuantMatrix>) -> FlexTensor {
        crate::quant::flex_product(x, &w, false)
    }

    fn fused_quant_matmul_t(dy: FlexTensor, w: Arc<QuantMatrix>) -> FlexTensor {
        crate::quant::flex_product(dy, &w, true)
    }

    fn fused_quant_swiglu(
        x: FlexTensor,
        gate: Arc<QuantMatrix>,
        up: Arc<QuantMatrix>,
    ) -> FlexTensor {
        let a = crate::quant::flex_product(x.clone(), &gate, false);
        let b = crate::quant::flex_product(x, &up, false);
        elementwise::swiglu(&a, &b)
    }

    fn fused_few_rows_matmul(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let [m, k] = two(&x);
        // A linear layer's `[in, out]` weight, or the transposed view of its `[out, in]`
        // storage, is read in place (`w` keeps it alive for the call).
        let (w, view) = mat_or_copy(w);
        let n = view.cols;
        assert_eq!(
            k, view.rows,
            "few_rows_matmul: x [{m}, {k}] and w [{}, {n}] do not chain",
            view.rows
        );
        if !few_rows::suits(m, &view) {
            // A row count that is faster through burn-flex's own product for this layout.
            return <Flex as FloatTensorOps<Flex>>::float_matmul(x, w);
        }
        let mut out = vec![0f32; m * n];
        // SAFETY: `view` is `w`'s own layout over its storage, alive for the call; `out` is a
        // fresh buffer.
        unsafe { few_rows::matmul(slice(&x), m, view, &mut out) };
        from_vec(out, &[m, n])
    }
}

/// The sizes of a 2-D tensor.
fn two(t: &FlexTensor) -> [usize; 2] {
    let d = dims(t);
    assert_eq!(d.len(), 2, "a 2-D tensor expected, got {d:?}");
    [d[0], d[1]]
}
