//! Pieces shared by the architectures: head splits, masks, attention, activations (RoPE is in
//! [`rope`](crate::rope)).

use burn::tensor::{Bool, Device, Int, Tensor};

/// `[b, s, h*d]` -> `[b, h, s, d]`.
pub fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, s, hd] = x.dims();
    x.reshape([b, s, heads, hd / heads]).swap_dims(1, 2)
}

/// `[b, h, s, d]` -> `[b, s, h*d]`.
pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, s, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, s, h * d])
}

/// transformers' `repeat_kv` (GQA -> MHA); the models' attention reads key/value heads in
/// place, this stays for callers that want the expanded tensors.
pub use peft_ops::reference::repeat_kv;

/// Boolean mask `[b, heads, q, k]`, true where key `k` is padding (`attention_mask == 0`).
pub fn padding_mask(
    attention_mask: &Tensor<2, Int>,
    heads: usize,
    q_len: usize,
) -> Tensor<4, Bool> {
    let [b, k] = attention_mask.dims();
    attention_mask
        .clone()
        .equal_elem(0)
        .reshape([b, 1, 1, k])
        .expand([b, heads, q_len, k])
}

/// Scaled dot-product attention (peft-ops: fused forward and backward on flex, Burn's
/// `attention` elsewhere); `causal` aligns bottom-right, so queries that are the last `q` of `k`
/// positions (a cache or a prefix) see everything before. `k`/`v` may have fewer heads than `q`
/// (GQA, no `repeat_kv` needed).
pub fn sdpa(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    causal: bool,
    scale: Option<f64>,
) -> Tensor<4> {
    peft_ops::attention(q, k, v, mask, causal, scale)
}

/// GELU, exact (erf) form as transformers' `gelu`, with an exact gradient on every backend:
/// peft-ops' fused kernel on flex, elsewhere an erf composition (`peft_ops::reference::gelu`
/// says why Burn's own `gelu` is not used there).
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    peft_ops::gelu(x)
}

/// An MLP activation, by its name in transformers' `ACT2FN` (`hidden_act`,
/// `activation_function` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `gelu`: the exact form with `erf` (BERT).
    #[default]
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation (GPT-2); the three
    /// are the same function.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `relu`.
    Relu,
    /// `silu` / `swish`: `x * sigmoid(x)`.
    Silu,
}

impl Activation {
    /// The names [`from_hf`](Self::from_hf) accepts.
    pub const NAMES: [&'static str; 8] = [
        "gelu",
        "gelu_new",
        "gelu_pytorch_tanh",
        "gelu_fast",
        "quick_gelu",
        "relu",
        "silu",
        "swish",
    ];

    /// The activation transformers' `ACT2FN[name]` computes, if implemented.
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    /// Apply it.
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        use burn::tensor::activation;
        match self {
            Activation::Gelu => gelu(x),
            Activation::GeluTanh => gelu_new(x),
            Activation::QuickGelu => x.clone() * activation::sigmoid(x.mul_scalar(1.702)),
            Activation::Relu => activation::relu(x),
            Activation::Silu => activation::silu(x),
        }
    }
}

/// GPT-2's `gelu_new` (tanh approximation).
pub fn gelu_new<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    peft_ops::gelu_tanh(x)
}

/// Positions `offset..offset+len` as an int tensor `[1, len]` expanded to `[batch, len]`.
pub fn positions(batch: usize, offset: usize, len: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<1, Int>::arange(offset as i64..(offset + len) as i64, device)
        .reshape([1, len])
        .expand([batch, len])
}
