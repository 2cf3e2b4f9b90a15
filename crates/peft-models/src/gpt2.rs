//! GPT-2: fused `c_attn` in Conv1D layout, learned positions, tied head.

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Int, Tensor};
use peft_core::Adaptable;
use peft_core::nn::{Embedding, EmbeddingConfig, KvPrefix, Linear, LinearConfig, WeightLayout};
use peft_ops::nn::layer_norm;

use crate::cache::KvCache;
use crate::config::Gpt2Config;
use crate::ops::{gelu_new, merge_heads, padding_mask, positions, sdpa, split_heads};

/// Attention with the fused q/k/v projection.
#[derive(Module, Debug, Adaptable)]
pub struct Gpt2Attention {
    /// Fused q/k/v (`Conv1D`, `[in, 3*in]`).
    pub c_attn: Linear,
    /// Output projection (`Conv1D`).
    pub c_proj: Linear,
    #[module(skip)]
    heads: usize,
}

/// MLP.
#[derive(Module, Debug, Adaptable)]
pub struct Gpt2Mlp {
    /// Up projection (`Conv1D`).
    pub c_fc: Linear,
    /// Down projection (`Conv1D`).
    pub c_proj: Linear,
}

/// One block.
#[derive(Module, Debug, Adaptable)]
pub struct Gpt2Block {
    /// Pre-attention norm.
    pub ln_1: LayerNorm,
    /// Attention.
    pub attn: Gpt2Attention,
    /// Pre-MLP norm.
    pub ln_2: LayerNorm,
    /// MLP.
    pub mlp: Gpt2Mlp,
}

/// The transformer (`transformer.` in checkpoints).
#[derive(Module, Debug, Adaptable)]
pub struct Gpt2Model {
    /// Token embeddings.
    pub wte: Embedding,
    /// Position embeddings.
    pub wpe: Embedding,
    /// Blocks.
    pub h: Vec<Gpt2Block>,
    /// Final norm.
    pub ln_f: LayerNorm,
    /// Attention key/value prefix site (prefix tuning).
    pub prompt_encoder: KvPrefix,
    /// `layer_norm_epsilon` of the config (`burn::nn::LayerNorm` keeps its own private).
    #[module(skip)]
    layer_norm_epsilon: f64,
}

/// `GPT2LMHeadModel`: the head is tied to `wte`.
#[derive(Module, Debug, Adaptable)]
pub struct Gpt2LMHeadModel {
    /// The transformer.
    pub transformer: Gpt2Model,
}

/// `GPT2ForSequenceClassification`: `score` at the last non-pad token.
#[derive(Module, Debug, Adaptable)]
#[peft(output_layer = "score")]
pub struct Gpt2ForSequenceClassification {
    /// The transformer.
    pub transformer: Gpt2Model,
    /// Classification head (no bias).
    pub score: Linear,
    #[module(skip)]
    pad_token_id: Option<i64>,
}

fn conv1d(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .init(device)
        .with_layout(WeightLayout::Conv1D)
}

impl Gpt2Model {
    /// An uninitialized (lazy) model of this shape.
    pub fn new(c: &Gpt2Config, device: &Device) -> Self {
        let d = c.n_embd;
        let inner = c.n_inner.unwrap_or(4 * d);
        let norm = || {
            LayerNormConfig::new(d)
                .with_epsilon(c.layer_norm_epsilon)
                .init(device)
        };
        Self {
            wte: EmbeddingConfig::new(c.vocab_size, d).init(device),
            wpe: EmbeddingConfig::new(c.n_positions, d).init(device),
            h: (0..c.n_layer)
                .map(|_| Gpt2Block {
                    ln_1: norm(),
                    attn: Gpt2Attention {
                        c_attn: conv1d(d, 3 * d, device),
                        c_proj: conv1d(d, d, device),
                        heads: c.n_head,
                    },
                    ln_2: norm(),
                    mlp: Gpt2Mlp {
                        c_fc: conv1d(d, inner, device),
                        c_proj: conv1d(inner, d, device),
                    },
                })
                .collect(),
            ln_f: norm(),
            prompt_encoder: KvPrefix::new(c.n_layer, c.n_head, c.n_head, d / c.n_head, d),
            layer_norm_epsilon: c.layer_norm_epsilon,
        }
    }

    /// Final hidden states `[b, s, hidden]`; positions continue from the cache length (prefix
    /// included); `attention_mask` covers the real tokens so far.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let [b, s] = input_ids.dims();
        let mut local = KvCache::new(self.h.len());
        let (mut cache, attention_mask) =
            KvCache::with_prefix(&self.prompt_encoder, b, cache, &mut local, attention_mask);
        let past = cache.as_ref().map_or(0, |c| c.len());
        let pos = positions(b, past, s, &input_ids.device());
        let mut h = self.wte.forward(input_ids) + self.wpe.forward(pos);
        let eps = self.layer_norm_epsilon;
        for (i, block) in self.h.iter().enumerate() {
            let x = layer_norm(&block.ln_1, eps, h.clone(), None);
            let qkv = block.attn.c_attn.forward(x);
            let d = qkv.dims()[2] / 3;
            let heads = block.attn.heads;
            let q = split_heads(qkv.clone().slice([0..b, 0..s, 0..d]), heads);
            let k = split_heads(qkv.clone().slice([0..b, 0..s, d..2 * d]), heads);
            let v = split_heads(qkv.slice([0..b, 0..s, 2 * d..3 * d]), heads);
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.append(i, k, v),
                None => (k, v),
            };
            let mask = attention_mask.as_ref().map(|m| padding_mask(m, heads, s));
            let attn = sdpa(q, k, v, mask, true, None);
            h = h + block.attn.c_proj.forward(merge_heads(attn));
            let x = layer_norm(&block.ln_2, eps, h.clone(), None);
            h = h + block
                .mlp
                .c_proj
                .forward(gelu_new(block.mlp.c_fc.forward(x)));
        }
        layer_norm(&self.ln_f, eps, h, None)
    }
}

impl Gpt2LMHeadModel {
    /// An uninitialized model.
    pub fn new(c: &Gpt2Config, device: &Device) -> Self {
        Self {
            transformer: Gpt2Model::new(c, device),
        }
    }

    /// Logits `[b, s, vocab]`.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        let h = self.transformer.forward(input_ids, attention_mask, cache);
        crate::heads::tied_logits(h, &self.transformer.wte)
    }

    /// Number of layers (for a [`KvCache`]).
    pub fn num_layers(&self) -> usize {
        self.transformer.h.len()
    }
}

impl Gpt2ForSequenceClassification {
    /// An uninitialized classifier.
    pub fn new(
        c: &Gpt2Config,
        num_labels: usize,
        pad_token_id: Option<i64>,
        device: &Device,
    ) -> Self {
        Self {
            transformer: Gpt2Model::new(c, device),
            score: LinearConfig::new(c.n_embd, num_labels)
                .with_bias(false)
                .init(device),
            pad_token_id,
        }
    }

    /// Logits `[b, num_labels]` at each row's last non-pad token.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Tensor<2> {
        let h = self
            .transformer
            .forward(input_ids.clone(), attention_mask, None);
        crate::heads::pool_last_non_pad(self.score.forward(h), &input_ids, self.pad_token_id)
    }
}
