//! MobileNetV2 behind the architecture seam.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor};
use burn_store::burn_pack::Tensor as PackTensor;
use peft_core::nn::{ForwardContext, KvPrefix};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{MobileNetV2, make_divisible, names};
use crate::arch::{
    ArchConfig, ArchModel, Architecture, Checkpoint, not_a_causal_lm, unsupported_task,
};
use crate::auto::{HfModel, ModelInputs, ModelOutputs, Task};
use crate::cache::KvCache;
use crate::config::{HfConfig, parse_json};
use crate::error::{ModelError, Result};
use crate::input_checks::pixel_dims;

/// The `model_type` of a MobileNetV2 folder this crate writes (torchvision has no
/// `config.json`; transformers' own `mobilenet_v2` is a different port with other names).
pub const MODEL_TYPE: &str = "torchvision_mobilenet_v2";

/// The family's registration: `torchvision_mobilenet_v2`.
pub static ARCHITECTURE: Architecture = Architecture {
    model_types: &[MODEL_TYPE],
    parse: parse_config,
    gguf: None,
};

/// `torchvision.models.mobilenet_v2`'s arguments.
#[derive(Debug, Clone, Deserialize)]
pub struct MobileNetV2Config {
    /// Classes of the ImageNet head the weights carry (`num_classes`).
    #[serde(default = "imagenet_classes")]
    pub num_classes: usize,
    /// Channel multiplier (`width_mult`).
    #[serde(default = "one")]
    pub width_mult: f64,
    /// Dropout before the classifier (`dropout`).
    #[serde(default = "point_two")]
    pub dropout: f64,
}

fn imagenet_classes() -> usize {
    1000
}
fn one() -> f64 {
    1.0
}
fn point_two() -> f64 {
    0.2
}

impl Default for MobileNetV2Config {
    fn default() -> Self {
        Self {
            num_classes: 1000,
            width_mult: 1.0,
            dropout: 0.2,
        }
    }
}

fn parse_config(_: &str, raw: &Value, file: &Path) -> Result<Arc<dyn ArchConfig>> {
    let mut config: MobileNetV2Config = parse_json(raw, file)?;
    // A folder we saved after training a new head names its classes as transformers does
    // (`id2label`, `num_labels`, written by `save_pretrained`): they size the head.
    let labelled = raw
        .get("id2label")
        .and_then(Value::as_object)
        .map(|m| m.len())
        .or_else(|| raw.get("num_labels").and_then(Value::as_u64).map(|n| n as usize));
    if let Some(n) = labelled {
        config.num_classes = n;
    }
    let invalid = |reason: String| ModelError::InvalidConfig {
        file: file.to_path_buf(),
        reason,
    };
    if !(config.width_mult > 0.0 && config.width_mult <= 4.0) {
        return Err(invalid(format!(
            "`width_mult` = {} is outside (0, 4]",
            config.width_mult
        )));
    }
    if !(0.0..1.0).contains(&config.dropout) {
        return Err(invalid(format!(
            "`dropout` = {} is outside [0, 1)",
            config.dropout
        )));
    }
    if config.num_classes == 0 || config.num_classes > 1 << 20 {
        return Err(invalid(format!(
            "`num_classes` = {} is outside 1..=1048576",
            config.num_classes
        )));
    }
    Ok(Arc::new(config))
}

/// The config of a torchvision state dict whose tensor shapes are `shapes`, if they are a
/// MobileNetV2's: the classes from the classifier, the width from the stem.
pub(crate) fn detect(shapes: &BTreeMap<String, Vec<usize>>) -> Option<Value> {
    let stem = shapes.get("features.0.0.weight")?;
    let classifier = shapes.get("classifier.1.weight")?;
    shapes.get("features.1.conv.0.0.weight")?;
    let (&stem_out, &classes) = (stem.first()?, classifier.first()?);
    // The stem has make_divisible(32 * width_mult) channels: the multiples torchvision ships.
    let width_mult = [0.35, 0.5, 0.75, 1.0, 1.3, 1.4, 2.0]
        .into_iter()
        .find(|w| make_divisible(32.0 * w, 8) == stem_out)?;
    Some(json!({
        "model_type": MODEL_TYPE,
        "architectures": ["MobileNetV2"],
        "num_classes": classes,
        "width_mult": width_mult,
        "dropout": 0.2,
    }))
}

impl ArchConfig for MobileNetV2Config {
    fn min_parameters(&self) -> u128 {
        // The last 1x1 convolution alone: 320·w -> 1280·max(w, 1) channels.
        let last = make_divisible(1280.0 * self.width_mult.max(1.0), 8) as u128;
        let before = make_divisible(320.0 * self.width_mult, 8) as u128;
        last * before
    }

    fn default_task(&self) -> Task {
        Task::SequenceClassification {
            num_labels: self.num_classes,
        }
    }

    fn image_channels(&self) -> Option<usize> {
        Some(3)
    }

    fn build(
        &self,
        config: &HfConfig,
        task: Task,
        weights: Option<&Checkpoint>,
        device: &Device,
    ) -> Result<HfModel> {
        let classes = match task {
            Task::Encoder => None,
            Task::SequenceClassification { num_labels } => Some(num_labels),
            other => return Err(unsupported_task(config, other)),
        };
        let model = MobileNetV2::new(self, classes, device);
        let mut renames = names::renames(&model);
        // A head of another size than the checkpoint's starts fresh (a new task).
        let fresh_head = classes.is_some_and(|n| n != self.num_classes);
        if fresh_head {
            renames.retain(|(pattern, _)| !pattern.starts_with("^classifier"));
        }
        let may_be_missing: &[&str] = if fresh_head { &["classifier."] } else { &[] };
        let model = Checkpoint::fill(weights, model, &renames, |_| false, may_be_missing)?;
        Ok(model.into())
    }
}

impl ArchModel for MobileNetV2 {
    fn forward_with(&self, inputs: &ModelInputs, fc: &ForwardContext) -> Result<ModelOutputs> {
        let channels = self.stem.conv.in_channels();
        pixel_dims(inputs.pixel_values.as_ref(), channels)?;
        let pixels = inputs.pixel_values.clone().expect("checked above");
        let pooled = self.features(pixels, fc);
        Ok(ModelOutputs {
            class_logits: self.logits(pooled.clone(), fc),
            pooler_output: Some(pooled),
            ..Default::default()
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
        match &self.classifier {
            Some(c) => Task::SequenceClassification {
                num_labels: c.dims()[1],
            },
            None => Task::Encoder,
        }
    }

    fn attends_bidirectionally(&self) -> bool {
        true
    }

    fn vocab_size(&self) -> usize {
        0
    }

    fn prompt_encoder(&self) -> &KvPrefix {
        &self.no_prefix
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn hf_class(&self) -> String {
        "MobileNetV2".into()
    }

    fn to_checkpoint(
        &self,
        tensors: Vec<(String, PackTensor)>,
        _source_dir: &Path,
    ) -> Vec<(String, PackTensor)> {
        tensors
            .into_iter()
            .map(|(path, t)| (names::torchvision_name(self, &path), t))
            .collect()
    }
}
