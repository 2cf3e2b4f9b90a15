//! GPT-2 behind the architecture seam.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor};
use burn_store::burn_pack::Tensor as PackTensor;
use peft_core::DefaultTargets;
use peft_core::nn::{ForwardContext, KvPrefix};
use serde_json::Value;

use super::names::{self, CLASSIFIER_NEW, LM_HEAD, PREFIX, TOKEN_EMBEDDING, is_conv1d_weight};
use super::{Gpt2Config, Gpt2ForSequenceClassification, Gpt2LMHeadModel, Gpt2Model};
use crate::arch::{
    ArchConfig, ArchModel, Architecture, Checkpoint, PeftDefaults, mul, sum, unsupported_task,
};
use crate::auto::{HfModel, ModelInputs, ModelOutputs, Task};
use crate::cache::KvCache;
use crate::config::HfConfig;
use crate::error::Result;

/// The family's registration: `gpt2`.
pub static ARCHITECTURE: Architecture = Architecture {
    model_types: &["gpt2"],
    parse: parse_config,
    gguf: None,
};

fn parse_config(_: &str, raw: &Value, file: &Path) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(Gpt2Config::parse(raw, file)?))
}

/// PEFT's defaults for `gpt2` (`peft/utils/constants.py`).
const PEFT: PeftDefaults = PeftDefaults {
    lora: Some(&["c_attn"]),
    ia3: Some(&["c_attn", "mlp.c_proj"]),
    ia3_feedforward: Some(&["mlp.c_proj"]),
};

/// A GPT-2 with its head.
// A model is built once: the size difference between heads is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(burn::module::Module, Debug, peft_core::Adaptable)]
#[peft(default_targets = "Gpt2::peft_defaults")]
pub enum Gpt2 {
    /// `GPT2LMHeadModel`.
    CausalLm(Gpt2LMHeadModel),
    /// `GPT2ForSequenceClassification`.
    SequenceClassification(Gpt2ForSequenceClassification),
}

impl Gpt2 {
    /// The transformer.
    pub fn backbone(&self) -> &Gpt2Model {
        match self {
            Gpt2::CausalLm(m) => &m.transformer,
            Gpt2::SequenceClassification(m) => &m.transformer,
        }
    }

    fn peft_defaults(&self, table: &str) -> Option<DefaultTargets> {
        PEFT.lookup(table)
    }
}

impl ArchConfig for Gpt2Config {
    fn min_parameters(&self) -> u128 {
        let h = self.n_embd;
        let inner = self.n_inner.unwrap_or(h.saturating_mul(4));
        let layer = sum(&[mul(&[4, h, h]), mul(&[2, h, inner]), mul(&[4, h])]);
        sum(&[
            mul(&[self.vocab_size, h]),
            mul(&[self.n_positions, h]),
            layer.saturating_mul(self.n_layer as u128),
        ])
    }

    fn position_limit(&self) -> Option<(usize, &'static str)> {
        Some((self.n_positions, "n_positions"))
    }

    fn build(
        &self,
        config: &HfConfig,
        task: Task,
        weights: Option<&Checkpoint>,
        device: &Device,
    ) -> Result<HfModel> {
        // Checkpoints of the bare `GPT2Model` lack the `transformer.` prefix.
        let renames = names::renames(weights.is_none_or(|w| w.has_prefix(PREFIX)));
        Ok(match task {
            Task::CausalLm => Gpt2::CausalLm(Checkpoint::fill(
                weights,
                Gpt2LMHeadModel::new(self, device),
                &renames,
                is_conv1d_weight,
                &[],
            )?),
            Task::SequenceClassification { num_labels } => {
                Gpt2::SequenceClassification(Checkpoint::fill(
                    weights,
                    Gpt2ForSequenceClassification::new(
                        self,
                        num_labels,
                        self.pad_token_id,
                        device,
                    ),
                    &renames,
                    is_conv1d_weight,
                    CLASSIFIER_NEW,
                )?)
            }
            other => return Err(unsupported_task(config, other)),
        }
        .into())
    }
}

impl ArchModel for Gpt2 {
    fn forward_with(&self, inputs: &ModelInputs, fc: &ForwardContext) -> Result<ModelOutputs> {
        let (ids, mask) = (inputs.input_ids.clone(), inputs.attention_mask.clone());
        Ok(match self {
            Gpt2::CausalLm(m) => ModelOutputs::logits(m.forward_with(ids, mask, None, fc)?),
            Gpt2::SequenceClassification(m) => {
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
            Gpt2::CausalLm(m) => m.forward_with(input_ids, attention_mask, cache, fc),
            Gpt2::SequenceClassification(_) => {
                Err(crate::arch::not_a_causal_lm(&self.hf_class()))
            }
        }
    }

    fn lm_hidden_with(
        &self,
        inputs: &ModelInputs,
        fc: &ForwardContext,
    ) -> Result<Option<(Tensor<3>, crate::lm_head::LmHead<'_>)>> {
        let Gpt2::CausalLm(m) = self else {
            return Ok(None);
        };
        let (ids, mask) = (inputs.input_ids.clone(), inputs.attention_mask.clone());
        let h = m.transformer.forward_with(ids, mask, None, fc)?;
        Ok(Some((h, m.head())))
    }

    fn task(&self) -> Task {
        match self {
            Gpt2::CausalLm(_) => Task::CausalLm,
            Gpt2::SequenceClassification(m) => Task::SequenceClassification {
                num_labels: m.score.dims()[1],
            },
        }
    }

    fn vocab_size(&self) -> usize {
        self.backbone().wte.dims()[0]
    }

    fn position_limit(&self) -> Option<(usize, &'static str)> {
        Some((self.backbone().wpe.dims()[0], "n_positions"))
    }

    fn prompt_encoder(&self) -> &KvPrefix {
        &self.backbone().prompt_encoder
    }

    fn num_layers(&self) -> usize {
        self.backbone().h.len()
    }

    fn hf_class(&self) -> String {
        match self {
            Gpt2::CausalLm(_) => "GPT2LMHeadModel",
            Gpt2::SequenceClassification(_) => "GPT2ForSequenceClassification",
        }
        .into()
    }

    fn stored_as_in_out(&self, name: &str) -> bool {
        is_conv1d_weight(name)
    }

    fn to_checkpoint(
        &self,
        mut tensors: Vec<(String, PackTensor)>,
        _source_dir: &Path,
    ) -> Vec<(String, PackTensor)> {
        // GPT2LMHeadModel always computes with the tied head; a config that unties it makes
        // transformers look for `lm_head.weight`, so store the table there too.
        if let Gpt2::CausalLm(m) = self
            && m.untied_in_checkpoint()
            && let Some((_, wte)) = tensors.iter().find(|(n, _)| n == TOKEN_EMBEDDING)
        {
            let mut head = wte.clone();
            head.name = LM_HEAD.into();
            tensors.push((LM_HEAD.into(), head));
        }
        tensors
    }
}
