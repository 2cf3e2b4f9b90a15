//! Pieces shared by the rotary decoder families (Llama, Qwen3, Gemma 3, Phi-3): the sizes every
//! such `config.json` has and their checks, per-layer attention types (`layer_types`), the start
//! of a forward (input checks, cache and prefix), and causal attention over a KV cache with an
//! optional sliding window. Each family keeps its own modules (their field names are its
//! Hugging Face names) and composes these.

mod heads;

pub use heads::{
    DecoderBackbone, DecoderForCausalLM, DecoderForSequenceClassification, DecoderHeads, HeadShape,
};

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use peft_core::Adaptable;
use peft_core::nn::{ForwardContext, KvPrefix, Linear, LinearConfig};
use serde::Deserialize;
use serde_json::Value;

use crate::arch::{mul, sum};
use crate::cache::KvCache;
use crate::config_checks::{divides, epsilon, invalid, positive, unsupported};
use crate::error::Result;
use crate::input_checks;
use crate::ops::{Activation, merge_heads, sdpa};
use crate::packing::{PackedPositions, key_mask, packed_positions};
use crate::rope::Rope;

fn default_rms_eps() -> f64 {
    1e-6
}

/// The sizes of a rotary decoder's `config.json` (the keys transformers' Llama, Qwen, Gemma and
/// Phi-3 configs share).
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderShape {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP size.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head size; defaults to hidden / heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Padding token (sequence classification pools the last non-pad token).
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// Context length the model was trained for (informational for RoPE, LongRoPE's ratio).
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
}

impl DecoderShape {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one head.
    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Check the sizes: nothing empty, heads that divide, an even head size for RoPE, a
    /// positive epsilon. Every failure names the key.
    pub fn validate(&self, file: &Path) -> Result<()> {
        positive(file, "vocab_size", self.vocab_size)?;
        positive(file, "hidden_size", self.hidden_size)?;
        positive(file, "intermediate_size", self.intermediate_size)?;
        positive(file, "num_hidden_layers", self.num_hidden_layers)?;
        positive(file, "num_attention_heads", self.num_attention_heads)?;
        positive(file, "num_key_value_heads", self.kv_heads())?;
        divides(
            file,
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        )?;
        match self.head_dim {
            Some(d) => positive(file, "head_dim", d)?,
            None => divides(
                file,
                ("hidden_size", self.hidden_size),
                ("num_attention_heads", self.num_attention_heads),
            )?,
        }
        if !self.head_size().is_multiple_of(2) {
            return Err(invalid(
                file,
                "head_dim",
                self.head_size(),
                "rotary embeddings need an even head size",
            ));
        }
        epsilon(file, "rms_norm_eps", self.rms_norm_eps)
    }

    /// A lower bound of the parameter count of a decoder of this shape with a gated MLP
    /// (q/k/v/o, gate/up/down, two norms per layer, the embedding).
    pub fn min_parameters(&self) -> u128 {
        let (h, d) = (self.hidden_size, self.head_size());
        let layer = sum(&[
            mul(&[2, h, self.num_attention_heads, d]),
            mul(&[2, h, self.kv_heads(), d]),
            mul(&[3, h, self.intermediate_size]),
            mul(&[2, h]),
        ]);
        sum(&[
            mul(&[self.vocab_size, h]),
            layer.saturating_mul(self.num_hidden_layers as u128),
        ])
    }
}

/// The attention window of each layer from `config.json`'s `layer_types`
/// (`"full_attention"`: `None`; `"sliding_attention"`: `window`), as transformers 5 reads it;
/// `default` when the key is absent. A list of another length, an unknown type, or a sliding
/// layer without a window is an error naming `layer_types`.
pub fn layer_windows(
    raw: &Value,
    file: &Path,
    layers: usize,
    window: Option<usize>,
    default: impl FnOnce() -> Vec<Option<usize>>,
) -> Result<Vec<Option<usize>>> {
    let Some(types) = raw.get("layer_types").filter(|v| !v.is_null()) else {
        return Ok(default());
    };
    let list = types
        .as_array()
        .ok_or_else(|| invalid(file, "layer_types", types, "must be a list of strings"))?;
    if list.len() != layers {
        return Err(invalid(
            file,
            "layer_types",
            format!("a list of {}", list.len()),
            &format!("must name one type per layer ({layers}, `num_hidden_layers`)"),
        ));
    }
    list.iter()
        .map(|t| match t.as_str() {
            Some("full_attention") => Ok(None),
            Some("sliding_attention") => match window {
                Some(w) => Ok(Some(w)),
                None => Err(invalid(
                    file,
                    "sliding_window",
                    "null",
                    "`layer_types` has sliding_attention layers, which need a window size",
                )),
            },
            _ => Err(unsupported(
                file,
                "layer_types",
                t,
                "implemented: \"full_attention\", \"sliding_attention\"",
            )),
        })
        .collect()
}

/// `sliding_window` of `config.json`: a positive integer or null/absent.
pub fn sliding_window(raw: &Value, file: &Path) -> Result<Option<usize>> {
    match raw.get("sliding_window") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|w| w > 0) => {
            Ok(n.as_u64().map(|w| w as usize))
        }
        Some(other) => Err(invalid(
            file,
            "sliding_window",
            other,
            "must be a positive integer or null",
        )),
    }
}

/// What [`begin`] hands a decoder forward.
pub struct Begun<'a> {
    /// `[batch, seq]` of the new tokens.
    pub dims: [usize; 2],
    /// The cache to run with (the caller's, or a local one seeded with a prefix).
    pub cache: Option<&'a mut KvCache>,
    /// `[batch, 1, seq, keys]` over every key (prefix slots included), true where a query must
    /// not see a key: padding, or another sequence of a packed row. `None`: every key is seen.
    pub mask: Option<Tensor<4, Bool>>,
    /// Where the tokens of a packed batch sit ([`ForwardContext::with_packed`]); `None`:
    /// positions continue from the cache.
    pub packed: Option<PackedPositions>,
}

/// The start of a decoder forward: `[batch, seq]` of `input_ids` (non-empty), ids inside a
/// vocabulary of `vocab` rows, and the cache and mask to run with, the active prefix (or each
/// row's, in a mixed batch) placed first ([`KvCache::checked_with_prefix`]); for a packed
/// batch, the positions and the mask that keep its sequences apart ([`packed_positions`]).
pub fn begin<'a>(
    input_ids: &Tensor<2, Int>,
    vocab: usize,
    prefix: &KvPrefix,
    attention_mask: Option<Tensor<2, Int>>,
    cache: Option<&'a mut KvCache>,
    local: &'a mut KvCache,
    fc: &ForwardContext,
) -> Result<Begun<'a>> {
    let [b, s] = input_checks::ids_dims(input_ids)?;
    input_checks::check_token_ids(input_ids, vocab, fc.id_bounds().0)?;
    let (cache, mask) =
        KvCache::checked_with_prefix(prefix, [b, s], cache, local, attention_mask, fc)?;
    let packed = packed_positions(fc, [b, s], cache.as_deref(), &input_ids.device())?;
    let mask = key_mask(mask.as_ref(), packed.as_ref(), s);
    Ok(Begun {
        dims: [b, s],
        cache,
        mask,
        packed,
    })
}

/// How one decoder layer attends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CausalAttention {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA).
    pub kv_heads: usize,
    /// The attention window (`sliding_window` on a sliding layer), `None` for full attention:
    /// each query sees the keys of the last `window` positions, itself included (transformers'
    /// `sliding_window_overlay`: `kv_idx > q_idx - sliding_window`).
    pub window: Option<usize>,
    /// Score scale; `None` is `1/sqrt(head_dim)`.
    pub scale: Option<f64>,
}

impl CausalAttention {
    /// Attend with `q` `[b, heads, s, d]` and `k`, `v` `[b, kv_heads, s, d]` (after any
    /// per-head norm, before RoPE): rotate `q` and `k`, append `k`, `v` to the layer's cache,
    /// mask what `mask` hides (`[b, 1, s, keys]`, [`Begun::mask`]) and the window; returns
    /// `[b, s, heads * d]`, before the output projection.
    pub fn attend(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        rope: &Rope,
        mask: Option<&Tensor<4, Bool>>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let [b, _, s, _] = q.dims();
        let q = rope.apply(q);
        let k = rope.apply(k);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let keys = k.dims()[2];
        let mut mask = mask.map(|m| m.clone().expand([b, self.heads, s, keys]));
        if let Some(window) = self.window.filter(|w| *w < keys) {
            let outside = match &rope.key_positions {
                // Rows shifted in position (left padding, prefixes of different lengths):
                // the window is over each row's own positions.
                Some(key_positions) => {
                    window_mask_rows(&rope.query_positions, key_positions, window, &q.device())
                }
                None => sliding_window_mask(s, keys, window, &q.device())
                    .unsqueeze::<4>()
                    .expand([b, 1, s, keys]),
            }
            .expand([b, self.heads, s, keys]);
            mask = Some(match mask {
                Some(m) => m.bool_or(outside),
                None => outside,
            });
        }
        // GQA: `sdpa` reads each key/value head for its query heads (transformers' repeat_kv).
        merge_heads(sdpa(q, k, v, mask, true, self.scale))
    }
}

/// `[b, 1, q, k]`, true where key `j` of row `r` is outside query `i`'s window:
/// `query_position - key_position >= window`.
fn window_mask_rows(
    query_positions: &[Vec<i64>],
    key_positions: &[Vec<i64>],
    window: usize,
    device: &Device,
) -> Tensor<4, Bool> {
    let b = query_positions.len();
    let q = query_positions.first().map_or(0, Vec::len);
    let k = key_positions.first().map_or(0, Vec::len);
    let outside: Vec<bool> = query_positions
        .iter()
        .zip(key_positions)
        .flat_map(|(qp, kp)| {
            qp.iter()
                .flat_map(move |&i| kp.iter().map(move |&j| i - j >= window as i64))
        })
        .collect();
    Tensor::from_data(TensorData::new(outside, [b, 1, q, k]), device)
}

/// `[q, k]`, true where key position `j` is outside the window of query `i` (the queries are
/// the last `q` of `k` positions): `query - key >= window`.
fn sliding_window_mask(q: usize, k: usize, window: usize, device: &Device) -> Tensor<2, Bool> {
    let offset = k - q;
    let outside: Vec<bool> = (0..q)
        .flat_map(|i| (0..k).map(move |j| offset + i >= j + window))
        .collect();
    Tensor::from_data(TensorData::new(outside, [q, k]), device)
}

/// The gated MLP of Llama, Qwen and Gemma: `down_proj(act(gate_proj(x)) * up_proj(x))`
/// (SwiGLU with silu, one fused op on flex; GeGLU with Gemma's tanh GELU).
#[derive(Module, Debug, Adaptable)]
pub struct GatedMlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
    /// The gate's activation (`hidden_act` / `hidden_activation`).
    #[module(skip)]
    pub act: Activation,
}

impl GatedMlp {
    /// An uninitialized MLP `hidden -> intermediate -> hidden`.
    pub fn new(
        hidden: usize,
        intermediate: usize,
        bias: bool,
        act: Activation,
        device: &Device,
    ) -> Self {
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).with_bias(bias).init(device);
        Self {
            gate_proj: linear(hidden, intermediate),
            up_proj: linear(hidden, intermediate),
            down_proj: linear(intermediate, hidden),
            act,
        }
    }

    /// Apply it to `x` `[b, s, hidden]`.
    pub fn forward_in(&self, x: Tensor<3>, fc: &ForwardContext) -> Tensor<3> {
        if self.act == Activation::Silu
            && let (Some(gate), Some(up)) =
                (plain_blocks(&self.gate_proj), plain_blocks(&self.up_proj))
        {
            // A quantized base with nothing attached to gate / up (QLoRA on attention, a GGUF
            // model): one op whose backward recomputes both products (peft_ops::quant::quant_swiglu).
            let [b, s, d] = x.dims();
            let hidden = peft_ops::quant::quant_swiglu(x.reshape([b * s, d]), &gate, &up);
            let i = hidden.dims()[1];
            return self.down_proj.forward_in(hidden.reshape([b, s, i]), fc);
        }
        let gate = self.gate_proj.forward_in(x.clone(), fc);
        let up = self.up_proj.forward_in(x, fc);
        let hidden = match self.act {
            Activation::Silu => peft_ops::swiglu(gate, up),
            act => act.apply(gate) * up,
        };
        self.down_proj.forward_in(hidden, fc)
    }
}

/// The quantized blocks of `layer` when it is only that: no bias, no adapter, no trainable copy.
fn plain_blocks(layer: &Linear) -> Option<std::sync::Arc<peft_ops::quant::QuantMatrix>> {
    let plain = layer.bias.is_none() && layer.adapters.is_empty() && layer.copies.is_empty();
    plain.then(|| layer.quantized.as_ref()?.blocks()).flatten()
}
