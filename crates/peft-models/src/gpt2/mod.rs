//! GPT-2: fused `c_attn` in Conv1D layout, learned positions, tied head.

mod arch;
mod config;
mod names;

pub use arch::{ARCHITECTURE, Gpt2};
pub use config::Gpt2Config;

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::Adaptable;
use peft_core::nn::{
    Embedding, EmbeddingConfig, ForwardContext, KvPrefix, Linear, LinearConfig, WeightLayout,
};
use peft_ops::nn::layer_norm;

use crate::cache::{KvCache, position_ids};
use crate::error::Result;
use crate::input_checks;
use crate::packing::{key_mask, packed_positions};
use crate::ops::{Activation, merge_heads, sdpa, split_heads};

/// Attention with the fused q/k/v projection.
#[derive(Module, Debug, Adaptable)]
pub struct Gpt2Attention {
    /// Fused q/k/v (`Conv1D`, `[in, 3*in]`).
    pub c_attn: Linear,
    /// Output projection (`Conv1D`).
    pub c_proj: Linear,
    #[module(skip)]
    heads: usize,
    /// Attention score scale: `1/sqrt(head_dim)` unless `scale_attn_weights` is false, divided
    /// by `layer + 1` with `scale_attn_by_inverse_layer_idx` (transformers' `GPT2Attention`).
    #[module(skip)]
    scale: f64,
}

/// MLP.
#[derive(Module, Debug, Adaptable)]
pub struct Gpt2Mlp {
    /// Up projection (`Conv1D`).
    pub c_fc: Linear,
    /// Down projection (`Conv1D`).
    pub c_proj: Linear,
    /// `activation_function`.
    #[module(skip)]
    pub act: Activation,
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
    /// The config unties the head (`tie_word_embeddings: false`): transformers then looks for
    /// `lm_head.weight` in the checkpoint, so saving stores the table there too.
    #[module(skip)]
    untied_in_checkpoint: bool,
}

/// `GPT2ForSequenceClassification`: `score` at the last non-pad token.
#[derive(Module, Debug, Adaptable)]
#[peft(classifier_head = "score")]
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
                .map(|layer| Gpt2Block {
                    ln_1: norm(),
                    attn: Gpt2Attention {
                        c_attn: conv1d(d, 3 * d, device),
                        c_proj: conv1d(d, d, device),
                        heads: c.n_head,
                        scale: c.attention_scale(layer),
                    },
                    ln_2: norm(),
                    mlp: Gpt2Mlp {
                        c_fc: conv1d(d, inner, device),
                        c_proj: conv1d(inner, d, device),
                        // Checked when the config was read.
                        act: Activation::from_hf(&c.activation_function).unwrap_or_default(),
                    },
                })
                .collect(),
            ln_f: norm(),
            prompt_encoder: KvPrefix::new(c.n_layer, c.n_head, c.n_head, d / c.n_head, d),
            layer_norm_epsilon: c.layer_norm_epsilon,
        }
    }

    /// Final hidden states `[b, s, hidden]`; positions continue from the cache length (prefix
    /// included); `attention_mask` covers the real tokens so far. Ids outside the vocabulary,
    /// positions beyond `n_positions` and a mask of another shape are
    /// [`ModelError::InputOutOfRange`](crate::ModelError::InputOutOfRange).
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
        input_checks::check_token_ids(&input_ids, self.wte.dims()[0], fc.id_bounds().0)?;
        let mut local = KvCache::new(self.h.len());
        let (mut cache, attention_mask) = KvCache::checked_with_prefix(
            &self.prompt_encoder,
            [b, s],
            cache,
            &mut local,
            attention_mask,
            fc,
        )?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        input_checks::check_positions(past + s, 0, self.wpe.dims()[0], "n_positions")?;
        let device = input_ids.device();
        let packed = packed_positions(fc, [b, s], cache.as_deref(), &device)?;
        let pos = match &packed {
            // Each packed sequence's learned positions start anew.
            Some(p) => Tensor::from_data(TensorData::new(p.query.concat(), [b, s]), &device),
            None => position_ids(cache.as_deref(), b, s, &device),
        };
        let mask = key_mask(attention_mask.as_ref(), packed.as_ref(), s);
        let mut h = self.wte.forward_in(input_ids, fc) + self.wpe.forward_in(pos, fc);
        let eps = self.layer_norm_epsilon;
        for (i, block) in self.h.iter().enumerate() {
            let x = layer_norm(&block.ln_1, eps, h.clone(), None);
            let qkv = block.attn.c_attn.forward_in(x, fc);
            let d = qkv.dims()[2] / 3;
            let heads = block.attn.heads;
            let q = split_heads(qkv.clone().slice([0..b, 0..s, 0..d]), heads);
            let k = split_heads(qkv.clone().slice([0..b, 0..s, d..2 * d]), heads);
            let v = split_heads(qkv.slice([0..b, 0..s, 2 * d..3 * d]), heads);
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.append(i, k, v),
                None => (k, v),
            };
            let keys = k.dims()[2];
            let mask = mask.clone().map(|m| m.expand([b, heads, s, keys]));
            let attn = sdpa(q, k, v, mask, true, Some(block.attn.scale));
            h = h + block.attn.c_proj.forward_in(merge_heads(attn), fc);
            let x = layer_norm(&block.ln_2, eps, h.clone(), None);
            let up = block.mlp.act.apply(block.mlp.c_fc.forward_in(x, fc));
            h = h + block.mlp.c_proj.forward_in(up, fc);
        }
        Ok(layer_norm(&self.ln_f, eps, h, None))
    }
}

impl Gpt2LMHeadModel {
    /// An uninitialized model.
    pub fn new(c: &Gpt2Config, device: &Device) -> Self {
        Self {
            transformer: Gpt2Model::new(c, device),
            untied_in_checkpoint: !c.tie_word_embeddings,
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
            .transformer
            .forward_with(input_ids, attention_mask, cache, fc)?;
        Ok(self.head().logits(h, fc))
    }

    /// The LM head: tied to `wte`.
    pub fn head(&self) -> crate::lm_head::LmHead<'_> {
        crate::lm_head::LmHead {
            linear: None,
            embedding: &self.transformer.wte,
            softcap: None,
        }
    }

    /// Number of layers (for a [`KvCache`]).
    pub fn num_layers(&self) -> usize {
        self.transformer.h.len()
    }

    /// Whether the config unties the head, so a saved checkpoint stores `lm_head.weight`.
    pub fn untied_in_checkpoint(&self) -> bool {
        self.untied_in_checkpoint
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
            .transformer
            .forward_with(input_ids.clone(), attention_mask, None, fc)?;
        Ok(crate::heads::pool_last_non_pad(
            self.score.forward_in(h, fc),
            &input_ids,
            self.pad_token_id,
        ))
    }
}
