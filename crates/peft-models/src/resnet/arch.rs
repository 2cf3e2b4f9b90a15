//! ResNet behind the architecture seam.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor};
use burn_store::burn_pack::Tensor as PackTensor;
use peft_core::DefaultTargets;
use peft_core::nn::{ForwardContext, KvPrefix};
use serde_json::Value;

use super::config::BOTTLENECK_REDUCTION;
use super::names::{self, CLASSIFIER_NEW, PREFIX};
use super::{ResNetConfig, ResNetForImageClassification, ResNetModel};
use crate::arch::{
    ArchConfig, ArchModel, Architecture, Checkpoint, mul, not_a_causal_lm, sum, unsupported_task,
};
use crate::auto::{HfModel, ModelInputs, ModelOutputs, Task};
use crate::cache::KvCache;
use crate::config::HfConfig;
use crate::error::Result;

/// The family's registration: `resnet`.
pub static ARCHITECTURE: Architecture = Architecture {
    model_types: &["resnet"],
    parse: parse_config,
    gguf: None,
};

fn parse_config(_: &str, raw: &Value, file: &Path) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(ResNetConfig::parse(raw, file)?))
}

/// A ResNet with its head.
// A model is built once: the size difference between heads is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(burn::module::Module, Debug, peft_core::Adaptable)]
#[peft(default_targets = "ResNet::peft_defaults")]
pub enum ResNet {
    /// `ResNetModel`: the pooled features (`pooler_output`).
    Encoder(ResNetModel),
    /// `ResNetForImageClassification`.
    ImageClassification(ResNetForImageClassification),
}

impl ResNet {
    /// The backbone.
    pub fn backbone(&self) -> &ResNetModel {
        match self {
            ResNet::Encoder(m) => m,
            ResNet::ImageClassification(m) => &m.resnet,
        }
    }

    /// PEFT has no default `target_modules` for `resnet` (`peft/utils/constants.py`): name
    /// them (`convolution`, a regex, `classifier.1`).
    fn peft_defaults(&self, _table: &str) -> Option<DefaultTargets> {
        None
    }
}

impl ArchConfig for ResNetConfig {
    fn image_channels(&self) -> Option<usize> {
        Some(self.num_channels)
    }

    /// The convolution kernels (no BatchNorm, no head).
    fn min_parameters(&self) -> u128 {
        let mut total = mul(&[self.num_channels, self.embedding_size, 7, 7]);
        let mut inputs = self.embedding_size;
        for (s, (&out, &depth)) in self.hidden_sizes.iter().zip(&self.depths).enumerate() {
            for l in 0..depth {
                let first = l == 0;
                let i = if first { inputs } else { out };
                let strided = first && (s > 0 || self.downsample_in_first_stage);
                let layer = if self.bottleneck() {
                    let r = out / BOTTLENECK_REDUCTION;
                    sum(&[mul(&[i, r]), mul(&[r, r, 9]), mul(&[r, out])])
                } else {
                    sum(&[mul(&[i, out, 9]), mul(&[out, out, 9])])
                };
                let shortcut = if i != out || strided {
                    mul(&[i, out])
                } else {
                    0
                };
                total = sum(&[total, layer, shortcut]);
            }
            inputs = out;
        }
        total
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
            Task::Encoder => ResNet::Encoder(Checkpoint::fill(
                weights,
                ResNetModel::new(self, device),
                &names::encoder_renames(),
                none,
                &[],
            )?),
            Task::SequenceClassification { num_labels } => {
                let prefixed = weights.is_some_and(|w| w.has_prefix(PREFIX));
                ResNet::ImageClassification(Checkpoint::fill(
                    weights,
                    ResNetForImageClassification::new(self, num_labels, device),
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

impl ArchModel for ResNet {
    fn forward_with(&self, inputs: &ModelInputs, fc: &ForwardContext) -> Result<ModelOutputs> {
        let pixels = inputs.pixel_values.as_ref();
        Ok(match self {
            ResNet::Encoder(m) => ModelOutputs {
                pooler_output: Some(m.forward_with(pixels, fc)?.pooler_output),
                ..Default::default()
            },
            ResNet::ImageClassification(m) => {
                ModelOutputs::class_logits(m.forward_with(pixels, fc)?)
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
            ResNet::Encoder(_) => Task::Encoder,
            ResNet::ImageClassification(m) => Task::SequenceClassification {
                num_labels: m.classifier.linear.dims()[1],
            },
        }
    }

    /// Every image is processed whole (no attention, no padding).
    fn attends_bidirectionally(&self) -> bool {
        true
    }

    /// An image model reads no token ids.
    fn vocab_size(&self) -> usize {
        0
    }

    /// An empty site outside the adapter tree (ResNet has no attention).
    fn prompt_encoder(&self) -> &KvPrefix {
        &self.backbone().prompt_encoder
    }

    /// Residual layers over all stages.
    fn num_layers(&self) -> usize {
        self.backbone().num_layers()
    }

    fn hf_class(&self) -> String {
        match self {
            ResNet::Encoder(_) => "ResNetModel",
            ResNet::ImageClassification(_) => "ResNetForImageClassification",
        }
        .into()
    }

    fn to_checkpoint(
        &self,
        tensors: Vec<(String, PackTensor)>,
        _source_dir: &Path,
    ) -> Vec<(String, PackTensor)> {
        tensors
            .into_iter()
            .map(|(path, t)| (names::hf_name(&path), t))
            .collect()
    }
}
