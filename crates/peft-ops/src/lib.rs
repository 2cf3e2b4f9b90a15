//! Fused CPU ops for burn-peft: exact and tanh GELU, scaled dot-product attention (padding and
//! causal masks, keys longer than queries, GQA), LayerNorm (with a residual) and RMSNorm,
//! rotary embeddings, SwiGLU, log-softmax, dropout from a counter-based RNG, LoRA on
//! activations as one op, and LoRA over a mixed-adapter batch as one pass ([`mixed_lora`]);
//! products with block-quantized frozen weights ([`quant`]: GGUF's llama.cpp formats and
//! bitsandbytes' NF4).
//!
//! Each op is a Burn backend extension ([`PeftOps`]) with a hand-written forward and backward
//! on flex and on autodiff over flex. On every other backend (cuda, vulkan, ...) and for
//! dtypes other than `f32` the functions here run the standard Burn composition
//! ([`reference`]), so every backend computes the same thing; callers never look at the
//! backend.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//!
//! let device = Device::flex().autodiff();
//! let x = Tensor::<2>::from_floats([[-1.0, 0.0, 2.0]], &device).require_grad();
//! let y = peft_ops::gelu(x.clone());
//! let grads = y.sum().backward();
//! let dx = x.grad(&grads).unwrap().into_data().try_to_vec::<f32>().unwrap();
//! assert!((dx[1] - 0.5).abs() < 1e-6); // gelu'(0) = 1/2
//! ```

mod autodiff;
mod backend;
pub mod heap;
mod kernels;
mod mixed;
pub mod nn;
pub mod quant;
pub mod reference;

use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::{Dispatch, DispatchDevice};
use burn::tensor::{Bool, DType, Device, Distribution, Tensor};

pub use backend::PeftOps;
pub use kernels::optim::AdamWStep;
pub use mixed::{LowRank, mixed_lora};

/// The `f32` math behind the kernels, for callers that need the same approximations.
pub mod math {
    pub use crate::kernels::math::{erf, exp_f32 as exp};
}

/// 0: not read yet, 1: fused, 2: composed.
static FUSED: AtomicU8 = AtomicU8::new(0);

/// Whether the fused kernels are used on flex (default: yes; the environment variable
/// `PEFT_OPS_FUSED=0` or [`set_fused_enabled`] turns them off, e.g. to time the composition).
pub fn fused_enabled() -> bool {
    match FUSED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("PEFT_OPS_FUSED").map_or(true, |v| v != "0");
            FUSED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Switch the fused kernels on or off for the whole process (both paths compute the same
/// values; this exists for benchmarks and tests).
pub fn set_fused_enabled(on: bool) {
    FUSED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether `device` is flex (with or without autodiff).
pub fn is_flex(device: &Device) -> bool {
    matches!(
        device.clone().without_autodiff().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Runs `f` on a worker of rayon's global pool, the pool every parallel kernel here and
/// burn-flex's GEMM split their work over, and returns what it returns (a panic in `f` reaches
/// the caller). Called from a pool worker, it runs `f` in place.
///
/// Wrap a loop of many small parallel ops in it: a decode loop, a server's batch step. Each
/// op called from outside the pool hands its work to the pool and sleeps until it is done,
/// two cross-thread wake-ups per op; from a worker, the worker takes its own share and the
/// other workers, still spinning from the previous op, take theirs. Measured on
/// SmolLM2-135M, 2 threads (`benches/llm_shape.rs`, 4 paired runs): greedy decoding about 7%
/// faster at batch 1 and at batch 32, and a tenth of the context switches.
///
/// ```
/// let on_worker = peft_ops::on_pool(|| rayon::current_thread_index().is_some());
/// assert!(on_worker);
/// ```
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Whether `t` goes to the fused kernels.
fn fused<const D: usize>(t: &Tensor<D>) -> bool {
    fused_enabled() && t.dtype() == DType::F32 && is_flex(&t.device())
}

/// Rows per pass of [`few_rows_matmul`]'s kernels: each pass keeps its rows in L2 and streams
/// the weight past them once, so a row count that is a multiple of it wastes no pass on a few
/// rows (the chunks of `peft_train`'s causal LM loss are sized by it).
pub const FEW_ROWS_PASS: usize = kernels::few_rows::PASS_ROWS;

/// Whether [`few_rows_matmul`] may take `x · w` to its own path: f32 on flex, 1 to
/// [`kernels::few_rows::MAX_ROWS`] rows, and `w` not in an autodiff graph (a frozen weight;
/// `x` may be, as in a LoRA step). Row counts that are faster through burn-flex's product for
/// `w`'s layout still go there.
pub fn few_rows(x: &Tensor<2>, w: &Tensor<2>) -> bool {
    fused(x)
        && w.dtype() == DType::F32
        && (1..=kernels::few_rows::MAX_ROWS).contains(&x.dims()[0])
        // Not `is_require_grad`, which is false for an intermediate tensor of a graph.
        && !w.is_tracked()
}

/// `x · w` for `x` `[m, k]` and `w` `[k, n]`. With a few rows ([`few_rows`]: decoding, one row
/// per sequence; a short prompt; a small training batch against a frozen weight) `w` is read in
/// place, in bands that stay in cache, where the `gemm` crate would first pack all of `w`;
/// otherwise `x.matmul(w)`. The same values up to the order of the sums. A tracked `x` gets its
/// gradient `dy · wᵀ`, as from `matmul`.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// let device = Device::flex();
/// let x = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &device);
/// let w = Tensor::<2>::from_floats([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], &device);
/// let y = peft_ops::few_rows_matmul(x, w);
/// assert_eq!(y.into_data().try_to_vec::<f32>().unwrap(), [1.0, 2.0, 4.0, 3.0, 4.0, 10.0]);
/// ```
pub fn few_rows_matmul(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    if !few_rows(&x, &w) {
        return x.matmul(w);
    }
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_few_rows_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}

/// Exact GELU, `x·Φ(x)` (transformers' `gelu`); within 1e-6 of the `f64` reference.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !fused(&x) {
        return reference::gelu(x);
    }
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_gelu(x.into_dispatch()))
}

/// GPT-2's `gelu_new`, `x/2·(1 + tanh(√(2/π)(x + 0.044715 x³)))`.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !fused(&x) {
        return reference::gelu_tanh(x);
    }
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_gelu_tanh(x.into_dispatch()))
}

/// Scaled dot-product attention `softmax(scale·q·kᵀ + mask)·v`.
///
/// - `q` `[b, heads, sq, d]`; `k` `[b, kv_heads, sk, d]`, `v` `[b, kv_heads, sk, dv]` with
///   `heads` a multiple of `kv_heads` (GQA: query head `h` uses key/value head
///   `h / (heads / kv_heads)`, transformers' `repeat_kv` order) and `sk >= sq` allowed (a prefix
///   or a cache before the queries);
/// - `mask` broadcastable to `[b, heads, sq, sk]`, true where a key is masked out;
/// - `causal`: query `i` sees keys `j <= i + sk - sq` (aligned bottom-right, as Burn's
///   `attention`);
/// - `scale` defaults to `1/√d`. A row with every key masked gives zeros.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    causal: bool,
    scale: Option<f64>,
) -> Tensor<4> {
    if !(fused(&q) && k.dtype() == DType::F32 && v.dtype() == DType::F32) {
        return reference::attention(q, k, v, mask, causal, scale);
    }
    let scale = scale.unwrap_or_else(|| 1.0 / (q.dims()[3] as f64).sqrt());
    let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
    Tensor::from_dispatch(match mask {
        Some(m) => {
            <Dispatch as PeftOps>::fused_attention_masked(q, k, v, m.into_dispatch(), causal, scale)
        }
        None => <Dispatch as PeftOps>::fused_attention(q, k, v, causal, scale),
    })
}

/// LayerNorm over the last dimension of `x + residual` (or `x`):
/// `(z - mean)/sqrt(var + eps)·γ + β`, as `burn::tensor::module::layer_norm`.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    residual: Option<Tensor<D>>,
    gamma: Tensor<1>,
    beta: Option<Tensor<1>>,
    eps: f64,
) -> Tensor<D> {
    if !(fused(&x) && residual.as_ref().is_none_or(|r| r.dtype() == DType::F32)) {
        return reference::layer_norm(x, residual, gamma, beta, eps);
    }
    // A zero `beta` when there is none: same values, and an untracked input gets no gradient.
    let beta = beta.unwrap_or_else(|| Tensor::zeros(gamma.dims(), &gamma.device()));
    let (x, gamma, beta) = (
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
    );
    Tensor::from_dispatch(match residual {
        Some(r) => {
            <Dispatch as PeftOps>::fused_add_layer_norm(x, r.into_dispatch(), gamma, beta, eps)
        }
        None => <Dispatch as PeftOps>::fused_layer_norm(x, gamma, beta, eps),
    })
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps)·γ`, as `burn::nn::RmsNorm`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    if !fused(&x) {
        return reference::rms_norm(x, gamma, eps);
    }
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_rms_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        eps,
    ))
}

/// Rotate-half rotary embedding (transformers' `apply_rotary_pos_emb`):
/// `x·cos + rotate_half(x)·sin` for `x` `[b, h, s, d]` and `cos`, `sin` `[s, d]`, or `[b·s, d]`
/// for a table per batch row (a left-padded batch, whose rows sit at different positions).
/// The tables are constants: no gradient flows to them.
pub fn rope(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<4> {
    if !(fused(&x) && cos.dtype() == DType::F32 && sin.dtype() == DType::F32) {
        return reference::rope(x, cos, sin);
    }
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_rope(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
    ))
}

/// `silu(a)·b`, Llama's SwiGLU (`silu(gate_proj(x)) · up_proj(x)`).
pub fn swiglu<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    if !(fused(&a) && b.dtype() == DType::F32) {
        return reference::swiglu(a, b);
    }
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_swiglu(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

/// Log-softmax over the last dimension.
pub fn log_softmax<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !fused(&x) {
        return reference::log_softmax(x);
    }
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_log_softmax(x.into_dispatch()))
}

/// A dropout key drawn from `device`'s random generator: a run that seeds the device the same
/// way (as the trainer does before every step) draws the same keys, so its dropout masks, and a
/// resumed run's, are bit-identical.
pub fn dropout_key(device: &Device) -> u64 {
    let device = device.clone().without_autodiff();
    let draws = Tensor::<1>::random([3], Distribution::Default, &device)
        .into_data()
        .try_to_vec::<f32>()
        .expect("uniform draws are f32");
    let bits = |i: usize| u64::from(draws[i].to_bits());
    kernels::dropout::mix(bits(0) | (bits(1) << 32)) ^ kernels::dropout::mix(!bits(2))
}

/// Dropout with probability `prob`: elements zeroed with probability `prob`, the rest scaled by
/// `1/(1 - prob)`. The caller decides whether it is training (`prob = 0` is the identity).
/// On flex the mask is a hash of a [`dropout_key`] and the element index, regenerated in the
/// backward; elsewhere a Bernoulli draw of the backend.
pub fn dropout<const D: usize>(x: Tensor<D>, prob: f64) -> Tensor<D> {
    if prob <= 0.0 {
        return x;
    }
    if !fused(&x) {
        return reference::dropout(x, prob);
    }
    let key = dropout_key(&x.device());
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_dropout(
        x.into_dispatch(),
        prob,
        key,
    ))
}

/// LoRA on activations, `y + scaling·(dropout(x)·a)·b`, for `x` `[n, in]`, `y` `[n, out]`,
/// `a` `[in, r]`, `b` `[r, out]`; `dropout` is the drop probability (0 for none). On flex one
/// op whose backward computes only `dx`, `da`, `db` (and passes `dy` through).
pub fn lora(
    x: Tensor<2>,
    y: Tensor<2>,
    a: Tensor<2>,
    b: Tensor<2>,
    scaling: f64,
    dropout: f64,
) -> Tensor<2> {
    let all_f32 = [&y, &a, &b].iter().all(|t| t.dtype() == DType::F32);
    if !(fused(&x) && all_f32) {
        let x = reference::dropout(x, dropout);
        return reference::lora(x, y, a, b, scaling);
    }
    let key = if dropout > 0.0 {
        dropout_key(&x.device())
    } else {
        0
    };
    Tensor::from_dispatch(<Dispatch as PeftOps>::fused_lora(
        x.into_dispatch(),
        y.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        scaling,
        dropout.max(0.0),
        key,
    ))
}

/// One AdamW update of a flattened parameter `p` (gradient `g`, moments `m`, `v`, all `[n]`
/// on a device without autodiff): `(p, m, v)` after the step. On flex one pass over rayon, in
/// place when the buffers are not shared; elsewhere the composition of `reference::adamw`.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use peft_ops::AdamWStep;
///
/// let d = Device::flex();
/// let (p, g) = (Tensor::<1>::ones([4], &d), Tensor::<1>::ones([4], &d));
/// let step = AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
/// let (p, _, _) = peft_ops::adamw(p, g, Tensor::zeros([4], &d), Tensor::zeros([4], &d), &step);
/// // The first step moves every element by `lr` against the gradient's sign.
/// assert!((p.into_data().try_to_vec::<f32>().unwrap()[0] - 0.9).abs() < 1e-6);
/// ```
pub fn adamw(
    p: Tensor<1>,
    g: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    step: &AdamWStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let all_f32 = [&g, &m, &v].iter().all(|t| t.dtype() == DType::F32);
    if !(fused(&p) && all_f32) {
        return reference::adamw(p, g, m, v, step);
    }
    let (p, m, v) = <Dispatch as PeftOps>::fused_adamw(
        p.into_dispatch(),
        g.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        *step,
    );
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// `Σ x²` of every element (a gradient's squared L2 norm), accumulated in `f64` on flex.
pub fn sum_squares<const D: usize>(x: Tensor<D>) -> f64 {
    if !fused(&x) {
        return reference::sum_squares(x);
    }
    Tensor::<1>::from_dispatch(<Dispatch as PeftOps>::fused_sum_squares(x.into_dispatch()))
        .into_scalar::<f64>()
}

/// The dropout mask the fused kernels draw for `key` (1 = kept), `len` elements: for tests and
/// for composing the same dropout elsewhere.
pub fn dropout_mask(key: u64, prob: f64, len: usize) -> Vec<bool> {
    let m = kernels::dropout::Mask::new(prob, key);
    (0..len).map(|i| m.keeps(i)).collect()
}
