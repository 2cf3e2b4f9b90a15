//! Llama family (Llama, Qwen2, Mistral): RoPE (rotate-half), GQA, RMSNorm, SwiGLU.

use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::{Device, Int, Tensor};
use peft_core::Adaptable;
use peft_core::nn::{Embedding, EmbeddingConfig, KvPrefix, Linear, LinearConfig};
use peft_ops::nn::rms_norm;
use peft_ops::swiglu;

use crate::cache::KvCache;
use crate::config::{LlamaConfig, RopeScaling};
use crate::ops::{apply_rope, merge_heads, padding_mask, rope_tables, sdpa, split_heads};

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
#[peft(output_layer = "score")]
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
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        rope: &(Tensor<2>, Tensor<2>),
        mask: Option<&Tensor<2, Int>>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let [_, s, _] = x.dims();
        let q = apply_rope(
            split_heads(self.q_proj.forward(x.clone()), self.heads),
            &rope.0,
            &rope.1,
        );
        let k = apply_rope(
            split_heads(self.k_proj.forward(x.clone()), self.kv_heads),
            &rope.0,
            &rope.1,
        );
        let v = split_heads(self.v_proj.forward(x), self.kv_heads);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let mask = mask.map(|m| padding_mask(m, self.heads, s));
        // GQA: `sdpa` reads each key/value head for its query heads (transformers' repeat_kv).
        let out = sdpa(q, k, v, mask, true, None);
        self.o_proj.forward(merge_heads(out))
    }
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
        }
    }

    /// Final hidden states `[b, s, hidden]`. `attention_mask` covers the real tokens so far
    /// (`[b, past + s]`, 1 = attend; a prefix is added in front); positions continue from the
    /// cache length (prefix included), as transformers' `cache_position`.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let [b, s] = input_ids.dims();
        let device = input_ids.device();
        let mut local = KvCache::new(self.layers.len());
        let (mut cache, attention_mask) =
            KvCache::with_prefix(&self.prompt_encoder, b, cache, &mut local, attention_mask);
        let past = cache.as_ref().map_or(0, |c| c.len());
        let positions: Vec<i64> = (past as i64..(past + s) as i64).collect();
        let rope = rope_tables(&self.inv_freq, &positions, &device);
        let mut h = self.embed_tokens.forward(input_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&layer.input_layernorm, h.clone());
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            h = h + layer
                .self_attn
                .forward(normed, &rope, attention_mask.as_ref(), layer_cache);
            let normed = rms_norm(&layer.post_attention_layernorm, h.clone());
            let mlp = &layer.mlp;
            let act = swiglu(
                mlp.gate_proj.forward(normed.clone()),
                mlp.up_proj.forward(normed),
            );
            h = h + mlp.down_proj.forward(act);
        }
        rms_norm(&self.norm, h)
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
    ) -> Tensor<3> {
        let h = self.model.forward(input_ids, attention_mask, cache);
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => crate::heads::tied_logits(h, &self.model.embed_tokens),
        }
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
    ) -> Tensor<2> {
        let h = self.model.forward(input_ids.clone(), attention_mask, None);
        let logits = self.score.forward(h);
        crate::heads::pool_last_non_pad(logits, &input_ids, self.pad_token_id)
    }
}
