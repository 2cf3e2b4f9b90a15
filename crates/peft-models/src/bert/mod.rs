//! BERT (covers all-MiniLM-L6-v2): absolute positions, token types, GELU, post-norm.

mod arch;
mod config;
mod names;

pub use arch::{ARCHITECTURE, Bert};
pub use config::BertConfig;

use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::activation::tanh;
use burn::tensor::{Device, Int, Tensor};
use peft_core::Adaptable;
use peft_core::nn::{Embedding, EmbeddingConfig, ForwardContext, KvPrefix, Linear, LinearConfig};
use peft_ops::nn::layer_norm;

use crate::cache::{KvCache, position_ids};
use crate::error::Result;
use crate::input_checks;
use crate::ops::{Activation, merge_heads, padding_mask, sdpa, split_heads};

/// Word, position and token-type embeddings, summed and normalised.
#[derive(Module, Debug, Adaptable)]
pub struct BertEmbeddings {
    /// Token table.
    pub word_embeddings: Embedding,
    /// Position table.
    pub position_embeddings: Embedding,
    /// Segment table.
    pub token_type_embeddings: Embedding,
    /// `LayerNorm` in checkpoints.
    pub layer_norm: LayerNorm,
}

/// `attention.self`.
#[derive(Module, Debug, Adaptable)]
pub struct BertSelfAttention {
    /// Query projection.
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
    #[module(skip)]
    heads: usize,
}

/// `attention.output` / `output`: dense, residual, LayerNorm.
#[derive(Module, Debug, Adaptable)]
pub struct BertDenseNorm {
    /// Projection.
    pub dense: Linear,
    /// `LayerNorm` in checkpoints.
    pub layer_norm: LayerNorm,
}

/// `attention`.
#[derive(Module, Debug, Adaptable)]
pub struct BertAttention {
    /// `self` in checkpoints.
    #[peft(rename = "self")]
    pub self_attn: BertSelfAttention,
    /// `output`.
    pub output: BertDenseNorm,
}

/// `intermediate`.
#[derive(Module, Debug, Adaptable)]
pub struct BertIntermediate {
    /// Up projection.
    pub dense: Linear,
    /// `hidden_act`.
    #[module(skip)]
    pub act: Activation,
}

/// One encoder layer.
#[derive(Module, Debug, Adaptable)]
pub struct BertLayer {
    /// Attention block.
    pub attention: BertAttention,
    /// MLP up.
    pub intermediate: BertIntermediate,
    /// MLP down + norm.
    pub output: BertDenseNorm,
}

/// `encoder`.
#[derive(Module, Debug, Adaptable)]
pub struct BertEncoder {
    /// Layers.
    pub layer: Vec<BertLayer>,
}

/// `pooler`: tanh(dense(first token)).
#[derive(Module, Debug, Adaptable)]
pub struct BertPooler {
    /// Projection.
    pub dense: Linear,
}

/// `BertModel`.
#[derive(Module, Debug, Adaptable)]
pub struct BertModel {
    /// Embeddings.
    pub embeddings: BertEmbeddings,
    /// Encoder.
    pub encoder: BertEncoder,
    /// Pooler (absent in some checkpoints).
    pub pooler: Option<BertPooler>,
    /// Attention key/value prefix site (prefix tuning).
    pub prompt_encoder: KvPrefix,
    /// `layer_norm_eps` of the config (`burn::nn::LayerNorm` keeps its own private).
    #[module(skip)]
    layer_norm_eps: f64,
}

/// `BertForSequenceClassification`: pooler output -> `classifier`.
#[derive(Module, Debug, Adaptable)]
#[peft(classifier_head = "classifier")]
pub struct BertForSequenceClassification {
    /// The encoder.
    pub bert: BertModel,
    /// Classification head.
    pub classifier: Linear,
}

/// What a BERT forward returns.
#[derive(Debug, Clone)]
pub struct BertOutput {
    /// `[b, s, hidden]`.
    pub last_hidden_state: Tensor<3>,
    /// `[b, hidden]`, when the model has a pooler.
    pub pooler_output: Option<Tensor<2>>,
}

impl BertModel {
    /// An uninitialized (lazy) model of this shape.
    pub fn new(c: &BertConfig, pooler: bool, device: &Device) -> Self {
        let d = c.hidden_size;
        let norm = || {
            LayerNormConfig::new(d)
                .with_epsilon(c.layer_norm_eps)
                .init(device)
        };
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).init(device);
        Self {
            embeddings: BertEmbeddings {
                word_embeddings: EmbeddingConfig::new(c.vocab_size, d).init(device),
                position_embeddings: EmbeddingConfig::new(c.max_position_embeddings, d)
                    .init(device),
                token_type_embeddings: EmbeddingConfig::new(c.type_vocab_size, d).init(device),
                layer_norm: norm(),
            },
            encoder: BertEncoder {
                layer: (0..c.num_hidden_layers)
                    .map(|_| BertLayer {
                        attention: BertAttention {
                            self_attn: BertSelfAttention {
                                query: linear(d, d),
                                key: linear(d, d),
                                value: linear(d, d),
                                heads: c.num_attention_heads,
                            },
                            output: BertDenseNorm {
                                dense: linear(d, d),
                                layer_norm: norm(),
                            },
                        },
                        intermediate: BertIntermediate {
                            dense: linear(d, c.intermediate_size),
                            // Checked when the config was read.
                            act: Activation::from_hf(&c.hidden_act).unwrap_or_default(),
                        },
                        output: BertDenseNorm {
                            dense: linear(c.intermediate_size, d),
                            layer_norm: norm(),
                        },
                    })
                    .collect(),
            },
            pooler: pooler.then(|| BertPooler {
                dense: linear(d, d),
            }),
            prompt_encoder: KvPrefix::new(
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_attention_heads,
                d / c.num_attention_heads,
                d,
            ),
            layer_norm_eps: c.layer_norm_eps,
        }
    }

    /// Encode `input_ids` `[b, s]`; `attention_mask` (1 = token) and `token_type_ids` default to
    /// all ones and all zeros. Ids outside the vocabulary or the segment table, a sequence
    /// longer than the position table (prefix included) and masks of another shape are
    /// [`ModelError::InputOutOfRange`](crate::ModelError::InputOutOfRange).
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        token_type_ids: Option<Tensor<2, Int>>,
    ) -> Result<BertOutput> {
        self.forward_with(
            input_ids,
            attention_mask,
            token_type_ids,
            &ForwardContext::default(),
        )
    }

    /// [`forward`](Self::forward) with a per-call context (e.g. a different adapter per row,
    /// [`ForwardContext::mixed`]).
    pub fn forward_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        token_type_ids: Option<Tensor<2, Int>>,
        fc: &ForwardContext,
    ) -> Result<BertOutput> {
        let [b, s] = input_checks::ids_dims(&input_ids)?;
        let e = &self.embeddings;
        input_checks::check_token_ids(&input_ids, e.word_embeddings.dims()[0], fc.id_bounds().0)?;
        input_checks::check_shape(
            token_type_ids.as_ref(),
            "token_type_ids",
            [b, s],
            "[batch, seq] of input_ids",
        )?;
        if let Some(types) = &token_type_ids {
            input_checks::check_range(
                types,
                e.token_type_embeddings.dims()[0],
                fc.id_bounds().1,
                "token_type_ids",
                "segment ids must be below `type_vocab_size` of config.json",
            )?;
        }
        let device = input_ids.device();
        let types = token_type_ids.unwrap_or_else(|| Tensor::zeros([b, s], &device));
        // A prefix enters as a cache of its length (transformers 4.x with PEFT): positions of
        // the real tokens start after it and the mask gains ones in front.
        let mut local = KvCache::new(self.encoder.layer.len());
        let (mut prefix, attention_mask) = KvCache::checked_with_prefix(
            &self.prompt_encoder,
            [b, s],
            None,
            &mut local,
            attention_mask,
            fc,
        )?;
        let offset = prefix.as_ref().map_or(0, |c| c.len());
        input_checks::check_positions(
            s,
            offset,
            e.position_embeddings.dims()[0],
            "max_position_embeddings",
        )?;
        let pos = position_ids(prefix.as_deref(), b, s, &device);
        let h = e.word_embeddings.forward_in(input_ids, fc)
            + e.position_embeddings.forward_in(pos, fc)
            + e.token_type_embeddings.forward_in(types, fc);
        let eps = self.layer_norm_eps;
        let mut h = layer_norm(&e.layer_norm, eps, h, None);
        for (i, layer) in self.encoder.layer.iter().enumerate() {
            let sa = &layer.attention.self_attn;
            let q = split_heads(sa.query.forward_in(h.clone(), fc), sa.heads);
            let k = split_heads(sa.key.forward_in(h.clone(), fc), sa.heads);
            let v = split_heads(sa.value.forward_in(h.clone(), fc), sa.heads);
            let (k, v) = match prefix.as_deref_mut() {
                Some(c) => c.append(i, k, v),
                None => (k, v),
            };
            let mask = attention_mask
                .as_ref()
                .map(|m| padding_mask(m, sa.heads, s));
            let ctx = merge_heads(sdpa(q, k, v, mask, false, None));
            let out = &layer.attention.output;
            h = layer_norm(&out.layer_norm, eps, out.dense.forward_in(ctx, fc), Some(h));
            let up = layer
                .intermediate
                .act
                .apply(layer.intermediate.dense.forward_in(h.clone(), fc));
            let out = &layer.output;
            h = layer_norm(&out.layer_norm, eps, out.dense.forward_in(up, fc), Some(h));
        }
        let pooler_output = self.pooler.as_ref().map(|p| {
            let [b, _, d] = h.dims();
            let first = h.clone().slice([0..b, 0..1, 0..d]).reshape([b, d]);
            tanh(p.dense.forward_in(first, fc))
        });
        Ok(BertOutput {
            last_hidden_state: h,
            pooler_output,
        })
    }
}

impl BertForSequenceClassification {
    /// An uninitialized classifier with `num_labels` outputs.
    pub fn new(c: &BertConfig, num_labels: usize, device: &Device) -> Self {
        Self {
            bert: BertModel::new(c, true, device),
            classifier: LinearConfig::new(c.hidden_size, num_labels).init(device),
        }
    }

    /// Logits `[b, num_labels]` (dropout is inactive at inference, as in eval mode).
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        token_type_ids: Option<Tensor<2, Int>>,
    ) -> Result<Tensor<2>> {
        self.forward_with(
            input_ids,
            attention_mask,
            token_type_ids,
            &ForwardContext::default(),
        )
    }

    /// [`forward`](Self::forward) with a per-call context.
    pub fn forward_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        token_type_ids: Option<Tensor<2, Int>>,
        fc: &ForwardContext,
    ) -> Result<Tensor<2>> {
        let out = self
            .bert
            .forward_with(input_ids, attention_mask, token_type_ids, fc)?;
        let pooled = out.pooler_output.ok_or_else(|| {
            crate::ModelError::InvalidInput(
                "this BertForSequenceClassification has no pooler (it is built with one)".into(),
            )
        })?;
        Ok(self.classifier.forward_in(pooled, fc))
    }
}
