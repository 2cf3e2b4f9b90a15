//! Pieces shared by the architectures: heads, masks, attention, RoPE, activations.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

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

/// Repeat each key/value head `groups` times (GQA -> MHA), keeping head order
/// `(kv0, kv0, kv1, kv1, ...)` as transformers' `repeat_kv`.
pub fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [b, h, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, h, groups, s, d])
        .reshape([b, h * groups, s, d])
}

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
            Activation::Gelu => peft_ops::gelu(x),
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

/// Rotate-half RoPE as transformers implements it: `x * cos + rotate_half(x) * sin`, with
/// `cos`/`sin` broadcastable to `x` (`[1 or b, 1, s, d]`: the frequency table concatenated
/// twice, per position). One table for the whole batch (`[1, 1, s, d]`) is one fused op on
/// flex; per-row tables (mixed batches whose rows start at different positions) broadcast.
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [rows, heads, s, d] = cos.dims();
    if rows == 1 && heads == 1 {
        return peft_ops::rope(x, cos.clone().reshape([s, d]), sin.clone().reshape([s, d]));
    }
    let [b, h, s, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// RoPE `cos`/`sin` tables `[len, head_dim]` for `positions`, from `inv_freq` `[head_dim/2]`.
pub fn rope_tables(inv_freq: &[f64], positions: &[i64], device: &Device) -> (Tensor<2>, Tensor<2>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half * 2);
    let mut sin = Vec::with_capacity(positions.len() * half * 2);
    for &p in positions {
        // float32 like transformers: position * inv_freq, then cos/sin.
        let row: Vec<f32> = inv_freq.iter().map(|f| (p as f32) * (*f as f32)).collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos()));
            sin.extend(row.iter().map(|a| a.sin()));
        }
    }
    let shape = [positions.len(), half * 2];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// Positions `offset..offset+len` as an int tensor `[1, len]` expanded to `[batch, len]`.
pub fn positions(batch: usize, offset: usize, len: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<1, Int>::arange(offset as i64..(offset + len) as i64, device)
        .reshape([1, len])
        .expand([batch, len])
}
