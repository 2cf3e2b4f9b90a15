//! The standard Burn compositions of the ops: what every backend other than flex runs, and the
//! reference the fused kernels are tested against.

use burn::tensor::activation;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Distribution, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::quant::QuantMatrix;

/// Exact GELU, `x·Φ(x)`: Burn's `activation::gelu` on flex, an erf composition elsewhere.
///
/// Burn's `activation::gelu` computes the erf form, but its backward on backends that keep
/// burn-backend's default `gelu_backward` (the cubecl ones: Vulkan, CUDA) is the derivative of
/// the *tanh approximation*, off by up to ~4e-4 (burn-peft's tests/vulkan.rs,
/// `op_gradients_on_vulkan_match_flex`). Flex implements the exact derivative, so it keeps
/// Burn's single op; elsewhere the erf composition lets autodiff differentiate erf exactly.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if crate::is_flex(&x.device()) {
        return activation::gelu(x);
    }
    let cdf = x
        .clone()
        .mul_scalar(std::f64::consts::FRAC_1_SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul_scalar(0.5);
    x * cdf
}

/// GPT-2's `gelu_new`: `x/2·(1 + tanh(√(2/π)(x + 0.044715 x³)))`.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powf_scalar(3.0).mul_scalar(0.044715)).mul_scalar(c);
    x.mul_scalar(0.5) * (inner.tanh().add_scalar(1.0))
}

/// Repeat each key/value head `groups` times (GQA -> MHA), head order `(kv0, kv0, kv1, ...)` as
/// transformers' `repeat_kv`.
pub fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, h, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, h, groups, s, d])
        .reshape([b, h * groups, s, d])
}

/// Burn's `attention` after expanding GQA heads and the mask to `[b, heads, sq, sk]`.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    causal: bool,
    scale: Option<f64>,
) -> Tensor<4> {
    let [b, heads, sq, _] = q.dims();
    let [_, kv_heads, sk, _] = k.dims();
    let groups = heads / kv_heads;
    let mask = mask.map(|m| m.expand([b, heads, sq, sk]));
    burn_attention(
        q,
        repeat_kv(k, groups),
        repeat_kv(v, groups),
        mask,
        None,
        AttentionModuleOptions {
            scale,
            softcap: None,
            is_causal: causal,
        },
    )
}

/// `burn::tensor::module::layer_norm` of `x (+ residual)`.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    residual: Option<Tensor<D>>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    eps: f64,
) -> Tensor<D> {
    let z = match residual {
        Some(r) => x + r,
        None => x,
    };
    burn::tensor::module::layer_norm(z, gamma, beta, eps)
}

/// `burn::nn::RmsNorm`'s forward: `x / sqrt(mean(x²) + eps) · γ`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    let rms = (x.clone().square().mean_dim(D - 1) + eps).sqrt();
    (x / rms) * gamma.unsqueeze()
}

/// Rotate-half RoPE as transformers' `apply_rotary_pos_emb`: `x·cos + rotate_half(x)·sin`
/// for `x` `[b, h, s, d]` and tables `[s, d]`, or `[b·s, d]` (one per batch row).
pub fn rope(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<4> {
    let [b, _, s, d] = x.dims();
    if cos.dims()[0] == b * s && b > 1 {
        return rope_broadcast(x, cos.reshape([b, 1, s, d]), sin.reshape([b, 1, s, d]));
    }
    rope_broadcast(x, cos.unsqueeze::<4>(), sin.unsqueeze::<4>())
}

/// [`rope`] with `cos`, `sin` broadcastable to `x` (`[1 or b, 1, s, d]`): a table per row, for
/// batches whose rows start at different positions.
pub fn rope_broadcast(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

/// `silu(a)·b` (SwiGLU).
pub fn swiglu<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    activation::silu(a) * b
}

/// `burn::tensor::activation::log_softmax` over the last dimension.
pub fn log_softmax<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation::log_softmax(x, D - 1)
}

/// Dropout with a Bernoulli mask from the device's RNG (`x·mask/keep`).
pub fn dropout<const D: usize>(x: Tensor<D>, prob: f64) -> Tensor<D> {
    if prob <= 0.0 {
        return x;
    }
    let keep = 1.0 - prob;
    let mask = x.random_like(Distribution::Bernoulli(keep));
    (x * mask).div_scalar(keep)
}

/// `y + scaling·(x·a)·b` (apply [`dropout`] to `x` first for LoRA dropout).
pub fn lora(x: Tensor<2>, y: Tensor<2>, a: Tensor<2>, b: Tensor<2>, scaling: f64) -> Tensor<2> {
    y + x.matmul(a).matmul(b).mul_scalar(scaling)
}

/// One AdamW update (`torch.optim.AdamW`'s single-tensor path) of the flattened parameter `p`:
/// `(p, m, v)` after the step.
pub fn adamw(
    p: Tensor<1>,
    g: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    s: &crate::AdamWStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let g = g.mul_scalar(s.grad_scale);
    let m = m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1);
    let v = v.mul_scalar(s.beta2) + g.powf_scalar(2.0).mul_scalar(1.0 - s.beta2);
    let t = i32::try_from(s.step).unwrap_or(i32::MAX);
    let bias1 = 1.0 - s.beta1.powi(t);
    let bias2 = 1.0 - s.beta2.powi(t);
    let p = p.mul_scalar(1.0 - s.lr * s.weight_decay);
    let denom = v.clone().sqrt().div_scalar(bias2.sqrt()).add_scalar(s.eps);
    let p = p - (m.clone() / denom).mul_scalar(s.lr / bias1);
    (p, m, v)
}

/// `Σ x²`.
pub fn sum_squares<const D: usize>(x: Tensor<D>) -> f64 {
    x.powf_scalar(2.0).sum().into_scalar::<f64>()
}

/// The whole quantized matrix dequantized, `[rows, cols]` `f32` on `device` (a constant: no
/// gradient).
pub fn quant_dense(w: &QuantMatrix, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(w.dequantize(), w.shape()), device)
}

/// `x · Wᵀ` for a quantized `W` `[rows, cols]`: dequantize, then Burn's matmul (autodiff gives
/// `dx = dy · W`; the dense weight is a constant).
pub fn quant_matmul(x: Tensor<2>, w: &QuantMatrix) -> Tensor<2> {
    let dense = quant_dense(w, &x.device()).cast(x.dtype());
    x.matmul(dense.transpose())
}

/// `dy · W` for a quantized `W` `[rows, cols]`.
pub fn quant_matmul_t(dy: Tensor<2>, w: &QuantMatrix) -> Tensor<2> {
    let dense = quant_dense(w, &dy.device()).cast(dy.dtype());
    dy.matmul(dense)
}

/// LoRA over a mixed-adapter batch ([`crate::mixed_lora`]) as PEFT's `_mixed_batch_forward`
/// composes it: per adapter, its rows gathered, `s·(x·A)·B`, added back.
pub fn mixed_lora(
    x: Tensor<2>,
    mut y: Tensor<2>,
    slots: &[Option<usize>],
    adapters: &[crate::LowRank],
) -> Tensor<2> {
    let per_row = x.dims()[0] / slots.len().max(1);
    for (k, f) in adapters.iter().enumerate() {
        let rows: Vec<i64> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == Some(k))
            .flat_map(|(b, _)| (b * per_row) as i64..((b + 1) * per_row) as i64)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let count = rows.len();
        let index = Tensor::<1, Int>::from_data(TensorData::new(rows, [count]), &x.device());
        let xg = x.clone().select(0, index.clone());
        let delta = xg
            .matmul(f.a.clone())
            .matmul(f.b.clone())
            .mul_scalar(f.scaling);
        y = y.select_assign(0, index, delta, IndexingUpdateOp::Add);
    }
    y
}
