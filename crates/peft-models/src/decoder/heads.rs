//! The heads every rotary decoder family shares, under transformers' names: the backbone is
//! `model.`, the LM head `lm_head` (absent when tied to `model.embed_tokens`), the classifier
//! `score` at the last non-pad token. A family implements [`DecoderBackbone`] for its
//! `model.` module and gets [`DecoderHeads`], its [`ArchModel`], from here.

use std::fmt::Debug;

use burn::module::{Module, ModuleDisplay};
use burn::tensor::{Device, Int, Tensor};
use peft_core::nn::{Embedding, ForwardContext, KvPrefix, Linear, LinearConfig};
use peft_core::{Adaptable, DefaultTargets};

use crate::arch::{
    ArchModel, Checkpoint, KeyRename, PeftDefaults, not_a_causal_lm, unsupported_task,
};
use crate::auto::{HfModel, ModelInputs, ModelOutputs, Task};
use crate::cache::KvCache;
use crate::config::HfConfig;
use crate::error::Result;
use crate::heads::pool_last_non_pad;
use crate::lm_head::LmHead;

/// What a decoder family's backbone (`model.` in its checkpoints) says for the shared heads.
pub trait DecoderBackbone: Module + ModuleDisplay + Adaptable {
    /// Final hidden states `[b, s, hidden]` (after the final norm). `attention_mask` covers
    /// the real tokens so far; positions continue from the cache (prefix included).
    fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>>;

    /// The token embedding table (`model.embed_tokens`), which a tied head reuses.
    fn embed_tokens(&self) -> &Embedding;

    /// The attention key/value prefix site.
    fn prompt_encoder(&self) -> &KvPrefix;

    /// Number of decoder layers.
    fn num_layers(&self) -> usize;

    /// The transformers class prefix (`Qwen3` in `Qwen3ForCausalLM`).
    fn class_prefix(&self) -> &'static str;

    /// The transformers class of this backbone with `head` (`ForCausalLM`,
    /// `ForSequenceClassification`): the prefix and the head unless the family names its
    /// classes otherwise.
    fn hf_class(&self, head: &str) -> String {
        format!("{}{head}", self.class_prefix())
    }

    /// PEFT's defaults for the model type.
    fn peft_defaults(&self) -> PeftDefaults;

    /// See [`ArchModel::cache_is_stale`].
    fn cache_is_stale(&self, cached: usize, total: usize) -> bool {
        let _ = (cached, total);
        false
    }

    /// `final_logit_softcapping`: next-token logits become `cap * tanh(logits / cap)`
    /// (Gemma); `None` for no capping.
    fn final_logit_softcapping(&self) -> Option<f64> {
        None
    }
}

/// `*ForCausalLM`: the backbone and its LM head.
#[derive(Module, Debug, Adaptable)]
#[peft(output_layer = "lm_head")]
pub struct DecoderForCausalLM<M: Module + DecoderBackbone> {
    /// The backbone.
    pub model: M,
    /// Output head; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Linear>,
}

/// `*ForSequenceClassification`: the backbone and a `score` head read at each row's last
/// non-pad token.
#[derive(Module, Debug, Adaptable)]
#[peft(classifier_head = "score")]
pub struct DecoderForSequenceClassification<M: Module + DecoderBackbone> {
    /// The backbone.
    pub model: M,
    /// Classification head (no bias).
    pub score: Linear,
    #[module(skip)]
    pad_token_id: Option<i64>,
}

impl<M: Module + DecoderBackbone> DecoderForCausalLM<M> {
    /// Logits `[b, s, vocab]`.
    pub fn forward_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>> {
        let h = self
            .model
            .hidden_states(input_ids, attention_mask, cache, fc)?;
        Ok(self.head().logits(h, fc))
    }

    /// [`forward_with`](Self::forward_with)'s logits of the last position only,
    /// `[b, 1, vocab]`: the head runs on that position alone (generation's prefill).
    pub fn forward_last_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>> {
        let h = self
            .model
            .hidden_states(input_ids, attention_mask, cache, fc)?;
        let [b, s, d] = h.dims();
        Ok(self.head().logits(h.slice([0..b, s - 1..s, 0..d]), fc))
    }

    /// The LM head (its own layer or the tied table, and the logit soft-capping).
    pub fn head(&self) -> LmHead<'_> {
        LmHead {
            linear: self.lm_head.as_ref(),
            embedding: self.model.embed_tokens(),
            softcap: self.model.final_logit_softcapping(),
        }
    }
}

impl<M: Module + DecoderBackbone> DecoderForSequenceClassification<M> {
    /// Logits `[b, num_labels]` at each row's last non-pad token.
    pub fn forward_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        fc: &ForwardContext,
    ) -> Result<Tensor<2>> {
        let h = self
            .model
            .hidden_states(input_ids.clone(), attention_mask, None, fc)?;
        let logits = self.score.forward_in(h, fc);
        Ok(pool_last_non_pad(logits, &input_ids, self.pad_token_id))
    }
}

/// A decoder family's model with its head: what the family registers.
#[derive(Module, Debug, Adaptable)]
#[peft(default_targets = "DecoderHeads::peft_defaults")]
pub enum DecoderHeads<M: Module + DecoderBackbone> {
    /// `*ForCausalLM`.
    CausalLm(DecoderForCausalLM<M>),
    /// `*ForSequenceClassification`.
    SequenceClassification(DecoderForSequenceClassification<M>),
}

/// What [`DecoderHeads::build`] needs besides the backbone.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    /// Hidden size.
    pub hidden_size: usize,
    /// Vocabulary size (the LM head's outputs).
    pub vocab_size: usize,
    /// Whether the LM head is the embedding table (`tie_word_embeddings`).
    pub tie_word_embeddings: bool,
    /// The classifier pools the last token whose id is not this one.
    pub pad_token_id: Option<i64>,
}

impl<M: Module + DecoderBackbone> DecoderHeads<M> {
    /// The model of `task` around `backbone`, loaded from `weights` when given (checkpoint
    /// keys are the module paths, after `renames`); a classifier's `score` may be missing from
    /// the checkpoint (a fresh head). Other tasks are [`unsupported_task`].
    pub fn build(
        config: &HfConfig,
        task: Task,
        backbone: M,
        shape: HeadShape,
        weights: Option<&Checkpoint>,
        renames: &[KeyRename],
        device: &Device,
    ) -> Result<HfModel>
    where
        HfModel: From<Self>,
    {
        let linear = |o: usize| {
            LinearConfig::new(shape.hidden_size, o)
                .with_bias(false)
                .init(device)
        };
        let none = |_: &str| false;
        let model = match task {
            Task::CausalLm => DecoderHeads::CausalLm(Checkpoint::fill(
                weights,
                DecoderForCausalLM {
                    model: backbone,
                    lm_head: (!shape.tie_word_embeddings).then(|| linear(shape.vocab_size)),
                },
                renames,
                none,
                &[],
            )?),
            Task::SequenceClassification { num_labels } => {
                DecoderHeads::SequenceClassification(Checkpoint::fill(
                    weights,
                    DecoderForSequenceClassification {
                        model: backbone,
                        score: linear(num_labels),
                        pad_token_id: shape.pad_token_id,
                    },
                    renames,
                    none,
                    &["score."],
                )?)
            }
            other => return Err(unsupported_task(config, other)),
        };
        Ok(model.into())
    }

    /// The backbone.
    pub fn backbone(&self) -> &M {
        match self {
            DecoderHeads::CausalLm(m) => &m.model,
            DecoderHeads::SequenceClassification(m) => &m.model,
        }
    }

    fn peft_defaults(&self, table: &str) -> Option<DefaultTargets> {
        self.backbone().peft_defaults().lookup(table)
    }
}

impl<M: Module + DecoderBackbone> ArchModel for DecoderHeads<M> {
    fn forward_with(&self, inputs: &ModelInputs, fc: &ForwardContext) -> Result<ModelOutputs> {
        let (ids, mask) = (inputs.input_ids.clone(), inputs.attention_mask.clone());
        Ok(match self {
            DecoderHeads::CausalLm(m) => ModelOutputs::logits(m.forward_with(ids, mask, None, fc)?),
            DecoderHeads::SequenceClassification(m) => {
                ModelOutputs::class_logits(m.forward_with(ids, mask, fc)?)
            }
        })
    }

    fn forward_lm_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>> {
        match self {
            DecoderHeads::CausalLm(m) => m.forward_with(input_ids, attention_mask, cache, fc),
            DecoderHeads::SequenceClassification(_) => Err(not_a_causal_lm(&self.hf_class())),
        }
    }

    fn forward_lm_last_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>> {
        match self {
            DecoderHeads::CausalLm(m) => m.forward_last_with(input_ids, attention_mask, cache, fc),
            DecoderHeads::SequenceClassification(_) => Err(not_a_causal_lm(&self.hf_class())),
        }
    }

    fn lm_hidden_with(
        &self,
        inputs: &ModelInputs,
        fc: &ForwardContext,
    ) -> Result<Option<(Tensor<3>, LmHead<'_>)>> {
        let DecoderHeads::CausalLm(m) = self else {
            return Ok(None);
        };
        let (ids, mask) = (inputs.input_ids.clone(), inputs.attention_mask.clone());
        let h = m.model.hidden_states(ids, mask, None, fc)?;
        Ok(Some((h, m.head())))
    }

    fn task(&self) -> Task {
        match self {
            DecoderHeads::CausalLm(_) => Task::CausalLm,
            DecoderHeads::SequenceClassification(m) => Task::SequenceClassification {
                num_labels: m.score.dims()[1],
            },
        }
    }

    fn vocab_size(&self) -> usize {
        self.backbone().embed_tokens().dims()[0]
    }

    fn prompt_encoder(&self) -> &KvPrefix {
        self.backbone().prompt_encoder()
    }

    fn num_layers(&self) -> usize {
        self.backbone().num_layers()
    }

    fn cache_is_stale(&self, cached: usize, total: usize) -> bool {
        self.backbone().cache_is_stale(cached, total)
    }

    fn hf_class(&self) -> String {
        let head = match self {
            DecoderHeads::CausalLm(_) => "ForCausalLM",
            DecoderHeads::SequenceClassification(_) => "ForSequenceClassification",
        };
        self.backbone().hf_class(head)
    }
}
