//! Llama family (Llama, Qwen2, Mistral): RoPE (rotate-half), GQA, RMSNorm, SwiGLU.

mod arch;
mod config;

pub use arch::{ARCHITECTURE, Llama};
pub use config::{FLAVORS, Flavor, LlamaConfig};

use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::{Bool, Device, Int, Tensor};
use peft_core::Adaptable;
use peft_core::nn::{Embedding, EmbeddingConfig, ForwardContext, KvPrefix, Linear, LinearConfig};
use peft_ops::nn::rms_norm;

use crate::cache::KvCache;
use crate::arch::PeftDefaults;
use crate::decoder::{
    self, CausalAttention, DecoderBackbone, DecoderForCausalLM, DecoderForSequenceClassification,
    GatedMlp,
};
use crate::error::Result;
use crate::ops::{Activation, split_heads};
use crate::rope::{Rope, Rotary};

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
    /// Heads, GQA and Mistral's window.
    #[module(skip)]
    attention: CausalAttention,
}

/// One decoder layer.
#[derive(Module, Debug, Adaptable)]
pub struct LlamaDecoderLayer {
    /// Attention.
    pub self_attn: LlamaAttention,
    /// SwiGLU MLP.
    pub mlp: GatedMlp,
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
    rotary: Rotary,
    /// Which model type of the family (its transformers class, PEFT's defaults).
    #[module(skip)]
    flavor: &'static Flavor,
}

/// `LlamaForCausalLM` (and `Qwen2ForCausalLM`, `MistralForCausalLM`).
pub type LlamaForCausalLM = DecoderForCausalLM<LlamaModel>;

/// `LlamaForSequenceClassification` (and Qwen2's, Mistral's): the last non-pad token.
pub type LlamaForSequenceClassification = DecoderForSequenceClassification<LlamaModel>;

impl LlamaAttention {
    fn new(c: &LlamaConfig, device: &Device) -> Self {
        let shape = &c.shape;
        let (h, kv, d) = (shape.num_attention_heads, shape.kv_heads(), shape.head_size());
        let linear = |i: usize, o: usize, bias: bool| {
            LinearConfig::new(i, o).with_bias(bias).init(device)
        };
        Self {
            q_proj: linear(shape.hidden_size, h * d, c.qkv_bias),
            k_proj: linear(shape.hidden_size, kv * d, c.qkv_bias),
            v_proj: linear(shape.hidden_size, kv * d, c.qkv_bias),
            o_proj: linear(h * d, shape.hidden_size, c.o_bias),
            attention: CausalAttention {
                heads: h,
                kv_heads: kv,
                window: c.window,
                scale: None,
            },
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        mask: Option<&Tensor<4, Bool>>,
        cache: Option<(&mut KvCache, usize)>,
        fc: &ForwardContext,
    ) -> Tensor<3> {
        let (heads, kv_heads) = (self.attention.heads, self.attention.kv_heads);
        let q = split_heads(self.q_proj.forward_in(x.clone(), fc), heads);
        let k = split_heads(self.k_proj.forward_in(x.clone(), fc), kv_heads);
        let v = split_heads(self.v_proj.forward_in(x, fc), kv_heads);
        let out = self.attention.attend(q, k, v, rope, mask, cache);
        self.o_proj.forward_in(out, fc)
    }
}

impl LlamaModel {
    /// An uninitialized (lazy) model of this shape; load weights into it.
    pub fn new(c: &LlamaConfig, device: &Device) -> Self {
        let shape = &c.shape;
        let norm = || {
            RmsNormConfig::new(shape.hidden_size)
                .with_epsilon(shape.rms_norm_eps)
                .init(device)
        };
        let (hidden, inter) = (shape.hidden_size, shape.intermediate_size);
        let layers = (0..shape.num_hidden_layers)
            .map(|_| LlamaDecoderLayer {
                self_attn: LlamaAttention::new(c, device),
                mlp: GatedMlp::new(hidden, inter, c.mlp_bias, Activation::Silu, device),
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
            })
            .collect();
        Self {
            embed_tokens: EmbeddingConfig::new(shape.vocab_size, hidden).init(device),
            layers,
            norm: norm(),
            prompt_encoder: KvPrefix::new(
                shape.num_hidden_layers,
                shape.num_attention_heads,
                shape.kv_heads(),
                shape.head_size(),
                hidden,
            ),
            rotary: Rotary::new(&c.rope),
            flavor: c.flavor,
        }
    }

    /// Which model type of the family this is.
    pub fn flavor(&self) -> &'static Flavor {
        self.flavor
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
        let mut local = KvCache::new(self.layers.len());
        let decoder::Begun {
            dims: [b, s],
            mut cache,
            mask: attention_mask,
            packed,
        } = decoder::begin(
            &input_ids,
            self.embed_tokens.dims()[0],
            &self.prompt_encoder,
            attention_mask,
            cache,
            &mut local,
            fc,
        )?;
        let rope = self
            .rotary
            .tables(cache.as_deref(), packed.as_ref(), b, s, &input_ids.device());
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
            h = h + layer.mlp.forward_in(normed, fc);
        }
        Ok(rms_norm(&self.norm, h))
    }
}

impl DecoderBackbone for LlamaModel {
    fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>> {
        self.forward_with(input_ids, attention_mask, cache, fc)
    }

    fn embed_tokens(&self) -> &Embedding {
        &self.embed_tokens
    }

    fn prompt_encoder(&self) -> &KvPrefix {
        &self.prompt_encoder
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn class_prefix(&self) -> &'static str {
        self.flavor.class_prefix
    }

    fn peft_defaults(&self) -> PeftDefaults {
        self.flavor.peft
    }
}
