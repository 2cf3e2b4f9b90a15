//! Pieces shared by the architectures: heads, masks, attention, RoPE, activations.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

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

/// Rotate-half RoPE as transformers implements it: `x * cos + rotate_half(x) * sin`, with
/// `cos`/`sin` broadcastable to `x` (`[1 or b, 1, s, d]`: the frequency table concatenated
/// twice, per position). One table for the whole batch (`[1, 1, s, d]`) is one fused op on
/// flex; per-row tables (mixed batches whose rows start at different positions) broadcast.
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [rows, heads, s, d] = cos.dims();
    if rows == 1 && heads == 1 {
        return peft_ops::rope(x, cos.clone().reshape([s, d]), sin.clone().reshape([s, d]));
    }
    peft_ops::reference::rope_broadcast(x, cos.clone(), sin.clone())
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

/// RoPE tables kept on the device: computed once (as [`rope_tables`] does, so the values are the
/// same) for a length that doubles as longer inputs come, and sliced per forward. A forward
/// then uploads nothing and computes nothing on the host; the tables were rebuilt on the host
/// and copied to the device on every call before.
///
/// Clones share the tables (a model's `valid()` copy and data-parallel replicas reuse them);
/// they are kept per device and autodiff context, so a model moved to another device gets its
/// own.
#[derive(Clone, Default)]
pub struct RopeCache {
    tables: Arc<Mutex<Vec<RopeTables>>>,
}

struct RopeTables {
    device: Device,
    autodiff: bool,
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl fmt::Debug for RopeCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RopeCache")
    }
}

impl RopeCache {
    /// `cos`/`sin` `[len, head_dim]` for positions `offset..offset + len` on `device`.
    pub fn tables(
        &self,
        inv_freq: &[f64],
        offset: usize,
        len: usize,
        device: &Device,
    ) -> (Tensor<2>, Tensor<2>) {
        let end = offset + len;
        let autodiff = device.is_autodiff();
        let mut cached = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = cached
            .iter()
            .position(|t| t.autodiff == autodiff && &t.device == device);
        let slot = match slot {
            Some(i) if cached[i].cos.dims()[0] >= end => i,
            found => {
                let rows = end.next_power_of_two().max(64);
                let positions: Vec<i64> = (0..rows as i64).collect();
                let (cos, sin) = rope_tables(inv_freq, &positions, device);
                let tables = RopeTables {
                    device: device.clone(),
                    autodiff,
                    cos,
                    sin,
                };
                match found {
                    Some(i) => {
                        cached[i] = tables;
                        i
                    }
                    None => {
                        cached.push(tables);
                        cached.len() - 1
                    }
                }
            }
        };
        let t = &cached[slot];
        let d = t.cos.dims()[1];
        (
            t.cos.clone().slice([offset..end, 0..d]),
            t.sin.clone().slice([offset..end, 0..d]),
        )
    }
}

/// Positions `offset..offset+len` as an int tensor `[1, len]` expanded to `[batch, len]`.
pub fn positions(batch: usize, offset: usize, len: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<1, Int>::arange(offset as i64..(offset + len) as i64, device)
        .reshape([1, len])
        .expand([batch, len])
}
