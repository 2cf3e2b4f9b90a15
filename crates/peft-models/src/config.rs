//! Hugging Face `config.json`: which architecture, and what every architecture shares. The
//! architecture-specific part is parsed and checked by the family's own file (see
//! [`arch`](crate::arch)), found by `model_type` in the registry.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::arch::ArchConfig;
use crate::auto::{HfModel, Task};
use crate::error::{ModelError, Result};
use crate::registry;

/// A parsed `config.json` with what every architecture shares.
#[derive(Debug, Clone)]
pub struct HfConfig {
    /// The file it came from.
    pub file: PathBuf,
    /// `model_type`.
    pub model_type: String,
    /// `architectures` (e.g. `BertForSequenceClassification`).
    pub architectures: Vec<String>,
    /// Number of labels for classification heads (`id2label` length or `num_labels`).
    pub num_labels: Option<usize>,
    /// The architecture-specific part, parsed and checked by its family.
    pub arch: Arc<dyn ArchConfig>,
    /// The raw JSON, for writing merged models back.
    pub raw: Value,
}

impl HfConfig {
    /// Read and parse `config.json`.
    pub fn read(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file).map_err(|source| ModelError::Io {
            file: file.to_path_buf(),
            source,
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
            file: file.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Self::from_value(raw, file)
    }

    /// Parse a config value; `file` names it in errors. The family registered for its
    /// `model_type` parses and checks the rest (sizes, head counts, activations, options that
    /// change the math), so building and running the model cannot fail on the config later.
    pub fn from_value(raw: Value, file: &Path) -> Result<Self> {
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::InvalidConfig {
                file: file.to_path_buf(),
                reason: "missing `model_type`".into(),
            })?
            .to_string();
        let architecture = registry::architecture_for(&model_type).ok_or_else(|| {
            ModelError::UnsupportedArchitecture {
                file: file.to_path_buf(),
                found: model_type.clone(),
                supported: registry::model_types().join(", "),
            }
        })?;
        let arch = (architecture.parse)(&model_type, &raw, file)?;
        let architectures = raw
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let num_labels = raw
            .get("id2label")
            .and_then(Value::as_object)
            .map(|m| m.len())
            .or_else(|| {
                raw.get("num_labels")
                    .and_then(Value::as_u64)
                    .map(|n| n as usize)
            });
        Ok(Self {
            file: file.to_path_buf(),
            model_type,
            architectures,
            num_labels,
            arch,
            raw,
        })
    }

    /// The positions of a learned position table and the key that sets it (BERT's
    /// `max_position_embeddings`, GPT-2's `n_positions`); `None` for RoPE models.
    pub fn position_limit(&self) -> Option<(usize, &'static str)> {
        self.arch.position_limit()
    }

    /// Channels of the images the model reads; `None` for a text model (see
    /// [`ArchConfig::image_channels`]).
    pub fn image_channels(&self) -> Option<usize> {
        self.arch.image_channels()
    }

    /// A lower bound of the backbone's parameter count (see [`ArchConfig::min_parameters`]).
    pub fn min_parameters(&self) -> u128 {
        self.arch.min_parameters()
    }

    /// Whether `architectures` names a classifier of the whole input: a sequence classifier
    /// (`BertForSequenceClassification`) or an image classifier (`ViTForImageClassification`),
    /// both [`Task::SequenceClassification`] here.
    pub fn is_sequence_classifier(&self) -> bool {
        self.architectures.iter().any(|a| {
            a.ends_with("ForSequenceClassification") || a.ends_with("ForImageClassification")
        })
    }

    /// The head `task` means for this config: [`Task::Auto`] is a sequence classifier when
    /// `architectures` names one (with `num_labels`, 2 by default), else the family's default.
    pub fn resolve_task(&self, task: Task) -> Task {
        match task {
            Task::Auto if self.is_sequence_classifier() => Task::SequenceClassification {
                num_labels: self.num_labels.unwrap_or(2),
            },
            Task::Auto => self.arch.default_task(),
            other => other,
        }
    }

    /// The model of this config with `task`'s head, lazily initialized without weights
    /// (random values, for a shape alone: benchmarks). [`from_pretrained`](crate::from_pretrained)
    /// builds and loads in one step.
    pub fn build(&self, task: Task, device: &burn::tensor::Device) -> Result<HfModel> {
        self.arch.build(self, self.resolve_task(task), None, device)
    }
}

/// Deserialize a family's config struct from `raw`, naming the key of a value that does not
/// parse (`` `num_attention_heads`: invalid type ... ``).
pub fn parse_json<T: DeserializeOwned>(raw: &Value, file: &Path) -> Result<T> {
    serde_path_to_error::deserialize(raw.clone()).map_err(|e| ModelError::InvalidConfig {
        file: file.to_path_buf(),
        reason: format!("`{}`: {}", e.path(), e.inner()),
    })
}

/// `eos_token_id` of a config: a number or a list of numbers.
pub fn eos_ids(value: Option<&Value>) -> Vec<i64> {
    match value {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}
