//! BERT behind the architecture seam.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor};
use burn_store::burn_pack::Tensor as PackTensor;
use peft_core::DefaultTargets;
use peft_core::nn::{ForwardContext, KvPrefix};
use serde_json::Value;

use super::names::{self, CLASSIFIER_NEW, PREFIX};
use super::{BertConfig, BertForSequenceClassification, BertModel};
use crate::arch::{
    ArchConfig, ArchModel, Architecture, Checkpoint, PeftDefaults, mul, not_a_causal_lm, sum,
    unsupported_task,
};
use crate::auto::{HfModel, ModelInputs, ModelOutputs, Task};
use crate::cache::KvCache;
use crate::config::HfConfig;
use crate::error::Result;
use crate::heads::mean_pool_normalize;
use crate::load::{tensor_names, weight_files};

/// The family's registration: `bert`.
pub static ARCHITECTURE: Architecture = Architecture {
    model_types: &["bert"],
    parse: parse_config,
    gguf: None,
};

fn parse_config(_: &str, raw: &Value, file: &Path) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(BertConfig::parse(raw, file)?))
}

/// PEFT's defaults for `bert` (`peft/utils/constants.py`).
const PEFT: PeftDefaults = PeftDefaults {
    lora: Some(&["query", "value"]),
    ia3: Some(&["key", "value", "output.dense"]),
    ia3_feedforward: Some(&["output.dense"]),
};

/// A BERT with its head.
// A model is built once: the size difference between heads is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(burn::module::Module, Debug, peft_core::Adaptable)]
#[peft(default_targets = "Bert::peft_defaults")]
pub enum Bert {
    /// `BertModel`: encoder outputs, pooler output and the sentence embedding.
    Encoder(BertModel),
    /// `BertForSequenceClassification`.
    SequenceClassification(BertForSequenceClassification),
}

impl Bert {
    /// The encoder.
    pub fn backbone(&self) -> &BertModel {
        match self {
            Bert::Encoder(m) => m,
            Bert::SequenceClassification(m) => &m.bert,
        }
    }

    fn peft_defaults(&self, table: &str) -> Option<DefaultTargets> {
        PEFT.lookup(table)
    }
}

impl ArchConfig for BertConfig {
    fn min_parameters(&self) -> u128 {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let layer = sum(&[mul(&[4, h, h]), mul(&[2, h, i]), mul(&[4, h])]);
        sum(&[
            mul(&[self.vocab_size, h]),
            mul(&[self.max_position_embeddings, h]),
            mul(&[self.type_vocab_size, h]),
            layer.saturating_mul(self.num_hidden_layers as u128),
        ])
    }

    fn position_limit(&self) -> Option<(usize, &'static str)> {
        Some((self.max_position_embeddings, "max_position_embeddings"))
    }

    fn default_task(&self) -> Task {
        Task::Encoder
    }

    fn build(
        &self,
        config: &HfConfig,
        task: Task,
        weights: Option<&Checkpoint>,
        device: &Device,
    ) -> Result<HfModel> {
        let none = |_: &str| false;
        Ok(match task {
            Task::Encoder => {
                // sentence-transformers checkpoints drop the pooler.
                let pooler = weights.is_none_or(|w| w.names.iter().any(|n| n.contains("pooler.dense")));
                Bert::Encoder(Checkpoint::fill(
                    weights,
                    BertModel::new(self, pooler, device),
                    &names::encoder_renames(),
                    none,
                    &[],
                )?)
            }
            Task::SequenceClassification { num_labels } => {
                let prefixed = weights.is_some_and(|w| w.has_prefix(PREFIX));
                Bert::SequenceClassification(Checkpoint::fill(
                    weights,
                    BertForSequenceClassification::new(self, num_labels, device),
                    &names::classifier_renames(prefixed),
                    none,
                    CLASSIFIER_NEW,
                )?)
            }
            other => return Err(unsupported_task(config, other)),
        }
        .into())
    }
}

/// Whether the source checkpoint of an encoder stored its keys under `bert.` (checkpoints of
/// `BertForMaskedLM` / `BertForPreTraining` do, `BertModel` ones do not).
fn source_has_bert_prefix(source_dir: &Path) -> bool {
    weight_files(source_dir)
        .and_then(|files| tensor_names(&files))
        .map(|names| names.iter().any(|n| n.starts_with(PREFIX)))
        .unwrap_or(false)
}

impl ArchModel for Bert {
    fn forward_with(&self, inputs: &ModelInputs, fc: &ForwardContext) -> Result<ModelOutputs> {
        let ids = inputs.input_ids.clone();
        let mask = inputs.attention_mask.clone();
        let types = inputs.token_type_ids.clone();
        Ok(match self {
            Bert::Encoder(m) => {
                let out = m.forward_with(ids.clone(), mask.clone(), types, fc)?;
                let full = mask.unwrap_or_else(|| ids.ones_like());
                ModelOutputs {
                    sentence_embedding: Some(mean_pool_normalize(
                        out.last_hidden_state.clone(),
                        &full,
                    )),
                    last_hidden_state: Some(out.last_hidden_state),
                    pooler_output: out.pooler_output,
                    ..Default::default()
                }
            }
            Bert::SequenceClassification(m) => {
                ModelOutputs::class_logits(m.forward_with(ids, mask, types, fc)?)
            }
        })
    }

    fn forward_lm_with(
        &self,
        _: Tensor<2, Int>,
        _: Option<Tensor<2, Int>>,
        _: Option<&mut KvCache>,
        _: &ForwardContext,
    ) -> Result<Tensor<3>> {
        Err(not_a_causal_lm(&self.hf_class()))
    }

    fn task(&self) -> Task {
        match self {
            Bert::Encoder(_) => Task::Encoder,
            Bert::SequenceClassification(m) => Task::SequenceClassification {
                num_labels: m.classifier.dims()[1],
            },
        }
    }

    fn attends_bidirectionally(&self) -> bool {
        true
    }

    fn vocab_size(&self) -> usize {
        self.backbone().embeddings.word_embeddings.dims()[0]
    }

    fn position_limit(&self) -> Option<(usize, &'static str)> {
        let rows = self.backbone().embeddings.position_embeddings.dims()[0];
        Some((rows, "max_position_embeddings"))
    }

    fn prompt_encoder(&self) -> &KvPrefix {
        &self.backbone().prompt_encoder
    }

    fn num_layers(&self) -> usize {
        self.backbone().encoder.layer.len()
    }

    fn hf_class(&self) -> String {
        match self {
            Bert::Encoder(_) => "BertModel",
            Bert::SequenceClassification(_) => "BertForSequenceClassification",
        }
        .into()
    }

    fn to_checkpoint(
        &self,
        tensors: Vec<(String, PackTensor)>,
        source_dir: &Path,
    ) -> Vec<(String, PackTensor)> {
        // A bare encoder keeps the key style of the checkpoint it came from.
        let prefix = match self {
            Bert::Encoder(_) if source_has_bert_prefix(source_dir) => PREFIX,
            _ => "",
        };
        tensors
            .into_iter()
            .map(|(path, t)| (format!("{prefix}{}", names::hf_name(&path)), t))
            .collect()
    }
}
