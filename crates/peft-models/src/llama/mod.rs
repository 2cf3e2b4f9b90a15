//! Llama family (Llama, Qwen2, Mistral): RoPE (rotate-half), GQA, RMSNorm, SwiGLU.

use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use peft_core::Adaptable;
use peft_core::nn::{Embedding, EmbeddingConfig, ForwardContext, KvPrefix, Linear, LinearConfig};
use peft_ops::nn::rms_norm;
use peft_ops::swiglu;

use crate::cache::KvCache;
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::Result;
use crate::input_checks;
use crate::ops::{
    RopeCache, apply_rope, merge_heads, padding_mask, rope_tables, sdpa, split_heads,
};

/// Self-attention with q/k/v/o projections.
#[derive(Module, Debug, Adaptable)]
pub struct LlamaAttention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    kv_heads: usize,
    /// Mistral's attention window (`sliding_window`), `None` for full attention.
    #[module(skip)]
    sliding_window: Option<usize>,
}

/// SwiGLU MLP.
#[derive(Module, Debug, Adaptable)]
pub struct LlamaMlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

/// One decoder layer.
#[derive(Module, Debug, Adaptable)]
pub struct LlamaDecoderLayer {
    /// Attention.
    pub self_attn: LlamaAttention,
    /// MLP.
    pub mlp: LlamaMlp,
    /// Pre-attention norm.
    pub input_layernorm: RmsNorm,
    /// Pre-MLP norm.
    pub post_attention_layernorm: RmsNorm,
}

/// The decoder stack (`model.` in Hugging Face checkpoints).
#[derive(Module, Debug, Adaptable)]
pub struct LlamaModel {
    /// Token embeddings.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<LlamaDecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Attention key/value prefix site (prefix tuning).
    pub prompt_encoder: KvPrefix,
    #[module(skip)]
    inv_freq: Vec<f64>,
    #[module(skip)]
    rope_cache: RopeCache,
}

/// Causal LM (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`).
#[derive(Module, Debug, Adaptable)]
#[peft(output_layer = "lm_head")]
pub struct LlamaForCausalLM {
    /// The decoder.
    pub model: LlamaModel,
    /// Output head; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
}

/// Sequence classifier pooling the last non-pad token (`LlamaForSequenceClassification`).
#[derive(Module, Debug, Adaptable)]
#[peft(classifier_head = "score")]
pub struct LlamaForSequenceClassification {
    /// The decoder.
    pub model: LlamaModel,
    /// Classification head (no bias).
    pub score: Linear,
    #[module(skip)]
    pad_token_id: Option<i64>,
}

/// RoPE inverse frequencies with the configured scaling, as transformers computes them.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    match scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl LlamaAttention {
    fn new(c: &LlamaConfig, device: &Device) -> Self {
        let (h, kv, d) = (c.num_attention_heads, c.kv_heads(), c.head_size());
        let qkv_bias = c.qkv_bias();
        Self {
            q_proj: LinearConfig::new(c.hidden_size, h * d)
                .with_bias(qkv_bias)
                .init(device),
            k_proj: LinearConfig::new(c.hidden_size, kv * d)
                .with_bias(qkv_bias)
                .init(device),
            v_proj: LinearConfig::new(c.hidden_size, kv * d)
                .with_bias(qkv_bias)
                .init(device),
            o_proj: LinearConfig::new(h * d, c.hidden_size)
                .with_bias(c.attention_bias)
                .init(device),
            heads: h,
            kv_heads: kv,
            sliding_window: c.attention_window(),
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        mask: Option<&Tensor<2, Int>>,
        cache: Option<(&mut KvCache, usize)>,
        fc: &ForwardContext,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let q = apply_rope(
            split_heads(self.q_proj.forward_in(x.clone(), fc), self.heads),
            &rope.cos,
            &rope.sin,
        );
        let k = apply_rope(
            split_heads(self.k_proj.forward_in(x.clone(), fc), self.kv_heads),
            &rope.cos,
            &rope.sin,
        );
        let v = split_heads(self.v_proj.forward_in(x, fc), self.kv_heads);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let mut mask = mask.map(|m| padding_mask(m, self.heads, s));
        let keys = k.dims()[2];
        if let Some(window) = self.sliding_window.filter(|w| *w < keys) {
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
        let out = sdpa(q, k, v, mask, true, None);
        self.o_proj.forward_in(merge_heads(out), fc)
    }
}

/// RoPE tables for one forward, `[1 or batch, 1, seq, head_dim]`, and, when rows are shifted
/// in position, each row's query and key positions (for the sliding window).
struct Rope {
    cos: Tensor<4>,
    sin: Tensor<4>,
    query_positions: Vec<Vec<i64>>,
    key_positions: Option<Vec<Vec<i64>>>,
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

impl LlamaModel {
    /// An uninitialized (lazy) model of this shape; load weights into it.
    pub fn new(c: &LlamaConfig, scaling: &RopeScaling, device: &Device) -> Self {
        let norm = || {
            RmsNormConfig::new(c.hidden_size)
                .with_epsilon(c.rms_norm_eps)
                .init(device)
        };
        let layers = (0..c.num_hidden_layers)
            .map(|_| LlamaDecoderLayer {
                self_attn: LlamaAttention::new(c, device),
                mlp: LlamaMlp {
                    gate_proj: LinearConfig::new(c.hidden_size, c.intermediate_size)
                        .with_bias(c.mlp_bias)
                        .init(device),
                    up_proj: LinearConfig::new(c.hidden_size, c.intermediate_size)
                        .with_bias(c.mlp_bias)
                        .init(device),
                    down_proj: LinearConfig::new(c.intermediate_size, c.hidden_size)
                        .with_bias(c.mlp_bias)
                        .init(device),
                },
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
            })
            .collect();
        Self {
            embed_tokens: EmbeddingConfig::new(c.vocab_size, c.hidden_size).init(device),
            layers,
            norm: norm(),
            prompt_encoder: KvPrefix::new(
                c.num_hidden_layers,
                c.num_attention_heads,
                c.kv_heads(),
                c.head_size(),
                c.hidden_size,
            ),
            inv_freq: inv_freq(c.head_size(), c.theta(), scaling),
            rope_cache: RopeCache::default(),
        }
    }

    /// Final hidden states `[b, s, hidden]`. `attention_mask` covers the real tokens so far
    /// (`[b, past + s]`, 1 = attend; a prefix is added in front); positions continue from the
    /// cache length (prefix included), as transformers' `cache_position`. Ids outside the
    /// vocabulary and a mask of another shape are
    /// [`ModelError::InputOutOfRange`](crate::ModelError::InputOutOfRange); RoPE has no
    /// position limit (transformers does not enforce `max_position_embeddings` either).
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>> {
        self.forward_with(input_ids, attention_mask, cache, &ForwardContext::default())
    }

    /// [`forward`](Self::forward) with a per-call context (e.g. a different adapter per row).
    pub fn forward_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>> {
        let [b, s] = input_checks::ids_dims(&input_ids)?;
        input_checks::check_token_ids(&input_ids, self.embed_tokens.dims()[0], fc.id_bounds().0)?;
        let device = input_ids.device();
        let mut local = KvCache::new(self.layers.len());
        let (mut cache, attention_mask) = KvCache::checked_with_prefix(
            &self.prompt_encoder,
            [b, s],
            cache,
            &mut local,
            attention_mask,
            fc,
        )?;
        let rope = self.rope(cache.as_deref(), b, s, &device);
        let mut h = self.embed_tokens.forward_in(input_ids, fc);
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&layer.input_layernorm, h.clone());
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            h = h + layer.self_attn.forward(
                normed,
                &rope,
                attention_mask.as_ref(),
                layer_cache,
                fc,
            );
            let normed = rms_norm(&layer.post_attention_layernorm, h.clone());
            let mlp = &layer.mlp;
            let act = swiglu(
                mlp.gate_proj.forward_in(normed.clone(), fc),
                mlp.up_proj.forward_in(normed, fc),
            );
            h = h + mlp.down_proj.forward_in(act, fc);
        }
        Ok(rms_norm(&self.norm, h))
    }
}

impl LlamaModel {
    /// RoPE tables for the next `seq` tokens of `batch` rows: one table shared by every row, or
    /// one per row when the cache shifts rows in position.
    fn rope(&self, cache: Option<&KvCache>, batch: usize, seq: usize, device: &Device) -> Rope {
        let empty = KvCache::default();
        let cache = cache.unwrap_or(&empty);
        let positions = cache.positions(batch, seq);
        let d = self.inv_freq.len() * 2;
        if !cache.has_row_shift() {
            // Every row at positions `len..len + seq`: a slice of the tables kept on the device
            // (nothing computed or uploaded per call).
            let (cos, sin) = self
                .rope_cache
                .tables(&self.inv_freq, cache.len(), seq, device);
            return Rope {
                cos: cos.reshape([1, 1, seq, d]),
                sin: sin.reshape([1, 1, seq, d]),
                query_positions: positions,
                key_positions: None,
            };
        }
        let flat: Vec<i64> = positions.concat();
        let (cos, sin) = rope_tables(&self.inv_freq, &flat, device);
        let key_positions = cache.key_positions(batch, cache.len() + seq);
        Rope {
            cos: cos.reshape([batch, 1, seq, d]),
            sin: sin.reshape([batch, 1, seq, d]),
            query_positions: positions,
            key_positions: Some(key_positions),
        }
    }
}

impl LlamaForCausalLM {
    /// An uninitialized model; `tie` shares the embedding as output head.
    pub fn new(c: &LlamaConfig, scaling: &RopeScaling, device: &Device) -> Self {
        Self {
            model: LlamaModel::new(c, scaling, device),
            lm_head: (!c.tie_word_embeddings).then(|| {
                LinearConfig::new(c.hidden_size, c.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
        }
    }

    /// Logits `[b, s, vocab]`.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>> {
        self.forward_with(input_ids, attention_mask, cache, &ForwardContext::default())
    }

    /// [`forward`](Self::forward) with a per-call context.
    pub fn forward_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>> {
        let h = self
            .model
            .forward_with(input_ids, attention_mask, cache, fc)?;
        Ok(match &self.lm_head {
            Some(head) => head.forward_in(h, fc),
            None => crate::heads::tied_logits(h, &self.model.embed_tokens),
        })
    }

    /// Number of layers (for a [`KvCache`]).
    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }
}

impl LlamaForSequenceClassification {
    /// An uninitialized classifier with `num_labels` outputs.
    pub fn new(c: &LlamaConfig, scaling: &RopeScaling, num_labels: usize, device: &Device) -> Self {
        Self {
            model: LlamaModel::new(c, scaling, device),
            score: LinearConfig::new(c.hidden_size, num_labels)
                .with_bias(false)
                .init(device),
            pad_token_id: c.pad_token_id,
        }
    }

    /// Logits `[b, num_labels]` at each row's last non-pad token.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<2>> {
        self.forward_with(input_ids, attention_mask, &ForwardContext::default())
    }

    /// [`forward`](Self::forward) with a per-call context.
    pub fn forward_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        fc: &ForwardContext,
    ) -> Result<Tensor<2>> {
        let h = self
            .model
            .forward_with(input_ids.clone(), attention_mask, None, fc)?;
        let logits = self.score.forward_in(h, fc);
        Ok(crate::heads::pool_last_non_pad(
            logits,
            &input_ids,
            self.pad_token_id,
        ))
    }
}
