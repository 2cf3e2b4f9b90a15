//! PEFT's `AutoPeftModelForCausalLM` / `AutoPeftModelForSequenceClassification`: a bundle
//! names its base model (`base_model_name_or_path` in `adapter_config.json`), so one call loads
//! that base and the bundle on it ([`AutoPeftModel::from_pretrained`]).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use peft_core::PeftModel;

use crate::auto::{HfModel, Task, from_pretrained};
use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::tokenizer::HfTokenizer;

/// Loads a PEFT bundle together with the base model it names, as PEFT's `AutoPeftModelFor...`
/// classes do (`peft/auto.py`: read the adapter config, load its `base_model_name_or_path` with
/// the task's auto class, then `PeftModel.from_pretrained`).
pub struct AutoPeftModel {
    /// The base with the bundle loaded as adapter `default`, active.
    pub model: PeftModel<HfModel>,
    /// The base model's config.
    pub config: HfConfig,
    /// The folder the base model's files came from.
    pub base_dir: PathBuf,
    /// The base model's tokenizer, when it has one.
    pub tokenizer: Option<HfTokenizer>,
}

impl AutoPeftModel {
    /// Load the bundle in `dir` onto the base model it names (a hub id through the Hugging Face
    /// cache, a local folder or a GGUF file), with `task`'s head. `Task::Auto` takes the
    /// bundle's `task_type`: `CAUSAL_LM` loads an LM head; otherwise the base's `config.json`
    /// decides (a `SEQ_CLS` bundle on a base without a classification head needs
    /// `Task::SequenceClassification { num_labels }`). `trainable: false` loads the adapter
    /// frozen for inference, `true` to train it further (PEFT's `is_trainable`).
    ///
    /// A bundle without `base_model_name_or_path` is an error that says to load the base
    /// yourself and use [`PeftModel::from_pretrained`].
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        task: Task,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let file = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io {
            file: file.clone(),
            source,
        })?;
        let invalid = |reason: String| ModelError::InvalidConfig {
            file: file.clone(),
            reason,
        };
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let base = config
            .get("base_model_name_or_path")
            .and_then(|v| v.as_str())
            .filter(|name| !name.is_empty())
            .ok_or_else(|| {
                invalid(
                    "no `base_model_name_or_path`: the bundle does not name its base model; \
                     load the base yourself and use PeftModel::from_pretrained(base, dir, ..)"
                        .into(),
                )
            })?;
        let task = match (task, config.get("task_type").and_then(|v| v.as_str())) {
            (Task::Auto, Some("CAUSAL_LM")) => Task::CausalLm,
            (task, _) => task,
        };
        let pretrained = from_pretrained(base, task, device)?;
        let model =
            PeftModel::from_pretrained(pretrained.model, dir, trainable).map_err(|source| {
                ModelError::Adapter {
                    dir: dir.to_path_buf(),
                    source: Box::new(source),
                }
            })?;
        Ok(Self {
            model,
            config: pretrained.config,
            base_dir: pretrained.dir,
            tokenizer: pretrained.tokenizer,
        })
    }
}
