//! ViT behind the architecture seam.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor};
use burn_store::burn_pack::Tensor as PackTensor;
use peft_core::DefaultTargets;
use peft_core::nn::{ForwardContext, KvPrefix};
use serde_json::Value;

use super::names::{self, CLASSIFIER_NEW, PREFIX};
use super::{VitConfig, VitForImageClassification, VitModel};
use crate::arch::{
    ArchConfig, ArchModel, Architecture, Checkpoint, PeftDefaults, mul, not_a_causal_lm, sum,
    unsupported_task,
};
use crate::auto::{HfModel, ModelInputs, ModelOutputs, Task};
use crate::cache::KvCache;
use crate::config::HfConfig;
use crate::error::Result;

/// The family's registration: `vit`.
pub static ARCHITECTURE: Architecture = Architecture {
    model_types: &["vit"],
    parse: parse_config,
    gguf: None,
};

fn parse_config(_: &str, raw: &Value, file: &Path) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(VitConfig::parse(raw, file)?))
}

/// PEFT's defaults for `vit` (`peft/utils/constants.py`): none for LoRA and IA3 (only some
/// other methods list `vit`), so a LoRA config for ViT must name its `target_modules`.
const PEFT: PeftDefaults = PeftDefaults {
    lora: None,
    ia3: None,
    ia3_feedforward: None,
};

/// A ViT with its head.
// A model is built once: the size difference between heads is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(burn::module::Module, Debug, peft_core::Adaptable)]
#[peft(default_targets = "Vit::peft_defaults")]
pub enum Vit {
    /// `ViTModel`: encoder outputs and pooler output.
    Encoder(VitModel),
    /// `ViTForImageClassification`.
    ImageClassification(VitForImageClassification),
}

impl Vit {
    /// The encoder.
    pub fn backbone(&self) -> &VitModel {
        match self {
            Vit::Encoder(m) => m,
            Vit::ImageClassification(m) => &m.vit,
        }
    }

    fn peft_defaults(&self, table: &str) -> Option<DefaultTargets> {
        PEFT.lookup(table)
    }
}

impl ArchConfig for VitConfig {
    fn image_channels(&self) -> Option<usize> {
        Some(self.num_channels)
    }

    fn min_parameters(&self) -> u128 {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let [ph, pw] = self.patch_size.hw();
        let layer = sum(&[mul(&[4, h, h]), mul(&[2, h, i]), mul(&[4, h])]);
        sum(&[
            mul(&[self.num_channels, ph, pw, h]),
            mul(&[self.num_patches() + 2, h]),
            layer.saturating_mul(self.num_hidden_layers as u128),
        ])
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
                // A classifier's checkpoint has no pooler.
                let pooler =
                    weights.is_none_or(|w| w.names.iter().any(|n| n.contains("pooler.dense")));
                Vit::Encoder(Checkpoint::fill(
                    weights,
                    VitModel::new(self, pooler, device),
                    &names::encoder_renames(),
                    none,
                    &[],
                )?)
            }
            Task::SequenceClassification { num_labels } => {
                let prefixed = weights.is_some_and(|w| w.has_prefix(PREFIX));
                Vit::ImageClassification(Checkpoint::fill(
                    weights,
                    VitForImageClassification::new(self, num_labels, device),
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

impl ArchModel for Vit {
    fn forward_with(&self, inputs: &ModelInputs, fc: &ForwardContext) -> Result<ModelOutputs> {
        let pixels = inputs.pixel_values.as_ref();
        Ok(match self {
            Vit::Encoder(m) => {
                let out = m.forward_with(pixels, fc)?;
                ModelOutputs {
                    last_hidden_state: Some(out.last_hidden_state),
                    pooler_output: out.pooler_output,
                    ..Default::default()
                }
            }
            Vit::ImageClassification(m) => ModelOutputs::class_logits(m.forward_with(pixels, fc)?),
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
            Vit::Encoder(_) => Task::Encoder,
            Vit::ImageClassification(m) => Task::SequenceClassification {
                num_labels: m.classifier.dims()[1],
            },
        }
    }

    fn attends_bidirectionally(&self) -> bool {
        true
    }

    /// No token table: ViT reads `pixel_values`.
    fn vocab_size(&self) -> usize {
        0
    }

    fn prompt_encoder(&self) -> &KvPrefix {
        &self.backbone().prompt_encoder
    }

    fn num_layers(&self) -> usize {
        self.backbone().layers.len()
    }

    fn hf_class(&self) -> String {
        match self {
            Vit::Encoder(_) => "ViTModel",
            Vit::ImageClassification(_) => "ViTForImageClassification",
        }
        .into()
    }

    fn to_checkpoint(
        &self,
        tensors: Vec<(String, PackTensor)>,
        _: &Path,
    ) -> Vec<(String, PackTensor)> {
        // The names transformers 5's `save_pretrained` writes (those of the Hub checkpoints).
        tensors
            .into_iter()
            .map(|(path, t)| (names::hf_name(&path), t))
            .collect()
    }
}
