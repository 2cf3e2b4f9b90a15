//! Pieces shared by the architectures: heads, masks, attention, RoPE, activations.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
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

/// Scaled dot-product attention through Burn's fused op; `causal` aligns bottom-right, so
/// queries that are the last `q` of `k` positions (a cache or a prefix) see everything before.
pub fn sdpa(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    causal: bool,
    scale: Option<f64>,
) -> Tensor<4> {
    attention(
        q,
        k,
        v,
        mask,
        None,
        AttentionModuleOptions {
            scale,
            softcap: None,
            is_causal: causal,
        },
    )
}

/// GELU, exact (erf) form as transformers' `gelu`, with an exact gradient on every backend.
///
/// Burn's `activation::gelu` computes the erf form, but its backward on backends that keep
/// burn-backend's default `gelu_backward` (the cubecl ones: Vulkan, CUDA) is the derivative of
/// the *tanh approximation*, off by up to ~4e-4 (tests/vulkan.rs,
/// `op_gradients_on_vulkan_match_flex`). Flex implements the exact derivative, so it keeps the
/// single op; elsewhere the erf composition lets autodiff differentiate erf exactly.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.device().without_autodiff() == Device::flex() {
        return burn::tensor::activation::gelu(x);
    }
    let cdf = x
        .clone()
        .mul_scalar(std::f64::consts::FRAC_1_SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul_scalar(0.5);
    x * cdf
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
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powf_scalar(3.0).mul_scalar(0.044715)).mul_scalar(c);
    x.clone().mul_scalar(0.5) * (inner.tanh().add_scalar(1.0))
}

/// Rotate-half RoPE as transformers implements it: `x * cos + rotate_half(x) * sin`, with
/// `cos`/`sin` broadcastable to `x` (`[1 or b, 1, s, d]`: the frequency table concatenated
/// twice, per position).
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
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
