//! [`TrainerBuilder`]: a [`Trainer`] from a model, an objective and settings with defaults, so
//! that a new setting never breaks a caller.

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::Device;
use peft_core::{Adaptable, PeftModel};

use super::{ModelExport, TrainConfig, Trainer};
use crate::error::{Result, TrainError};
use crate::objective::Objective;

/// Settings of a [`Trainer`] ([`Trainer::builder`]). Only the output folder is required.
pub struct TrainerBuilder<M: Adaptable + Module> {
    model: PeftModel<M>,
    objective: Box<dyn Objective<M>>,
    adapters: Option<Vec<String>>,
    config: TrainConfig,
    output_dir: Option<PathBuf>,
    device: Option<Device>,
    pad_id: i64,
    export: Option<Box<dyn ModelExport<M>>>,
    bundle_files: Vec<(String, Vec<u8>)>,
    summary_fields: Vec<(String, serde_json::Value)>,
}

impl<M: Adaptable + Module> TrainerBuilder<M> {
    pub(super) fn new(model: PeftModel<M>, objective: Box<dyn Objective<M>>) -> Self {
        Self {
            model,
            objective,
            adapters: None,
            config: TrainConfig::default(),
            output_dir: None,
            device: None,
            pad_id: 0,
            export: None,
            bundle_files: Vec::new(),
            summary_fields: Vec::new(),
        }
    }

    /// The adapters to train together (made active; each saved as its own PEFT bundle,
    /// `default` at the result folder itself, any other name in `<folder>/<name>/`, PEFT's
    /// layout). Default: the model's active adapters. None, with
    /// [`PeftModel::set_train_base`], fine-tunes the whole model.
    pub fn adapters<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.adapters = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// All hyper-parameters at once (default: [`TrainConfig::default`]).
    pub fn config(mut self, config: TrainConfig) -> Self {
        self.config = config;
        self
    }

    /// Passes over the training data.
    pub fn epochs(mut self, epochs: usize) -> Self {
        self.config.epochs = epochs;
        self
    }

    /// Stop after this many optimizer steps.
    pub fn max_steps(mut self, steps: u64) -> Self {
        self.config.max_steps = Some(steps);
        self
    }

    /// Examples per micro-batch.
    pub fn batch_size(mut self, size: usize) -> Self {
        self.config.batch_size = size;
        self
    }

    /// The peak learning rate.
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.config.learning_rate = lr;
        self
    }

    /// Show a progress bar (or, without a terminal, about 20 progress lines).
    pub fn progress(mut self, show: bool) -> Self {
        self.config.progress = show;
        self
    }

    /// The output folder: `adapter/` (or `model/`), `best/`, `checkpoints/`, `runs/`
    /// (TensorBoard), `run.json`. Required.
    pub fn output_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.output_dir = Some(dir.into());
        self
    }

    /// The training device; it gets autodiff. Default: the model's device.
    pub fn device(mut self, device: Device) -> Self {
        self.device = Some(device);
        self
    }

    /// The token id batches are padded with (default 0).
    pub fn pad_id(mut self, pad_id: i64) -> Self {
        self.pad_id = pad_id;
        self
    }

    /// How full fine-tuning writes the model (`best/`, `model/`); required for it, unused
    /// when training adapters (saved as PEFT bundles).
    pub fn full_export(mut self, export: impl ModelExport<M> + 'static) -> Self {
        self.export = Some(Box::new(export));
        self
    }

    /// A file written beside every saved bundle (`best/`, `adapter/`, checkpoints excluded):
    /// a label map, how the data was read, a chat template.
    pub fn bundle_file(mut self, name: impl Into<String>, contents: impl Into<Vec<u8>>) -> Self {
        self.bundle_files.push((name.into(), contents.into()));
        self
    }

    /// An extra top-level entry of the `results.json` that [`Trainer::fit`] writes.
    pub fn summary_field(mut self, key: impl Into<String>, value: serde_json::Value) -> Self {
        self.summary_fields.push((key.into(), value));
        self
    }

    /// Check the settings and build the trainer: a bad config, an adapter the model does not
    /// have, full fine-tuning without an export or of a quantized base are refused here,
    /// before anything is written.
    pub fn build(self) -> Result<Trainer<M>> {
        let config_error = |key: &str, reason: String| TrainError::Config {
            key: key.into(),
            reason,
        };
        self.config
            .validate()
            .map_err(|(key, reason)| TrainError::Config { key, reason })?;
        let output_dir = self.output_dir.ok_or_else(|| {
            config_error(
                "output_dir",
                "no output folder: call `.output_dir(dir)` on the builder".into(),
            )
        })?;
        let adapters = self
            .adapters
            .unwrap_or_else(|| self.model.active_adapters().to_vec());
        if let Some(missing) = adapters
            .iter()
            .find(|a| self.model.adapter_config(a).is_none())
        {
            return Err(config_error(
                "adapters",
                format!(
                    "the model has no adapter `{missing}` (it has {:?}); add it with \
                     `add_adapter` first",
                    self.model.adapter_names()
                ),
            ));
        }
        if adapters.is_empty() {
            if !self.model.trains_base() {
                return Err(config_error(
                    "adapters",
                    "nothing to train: the model has no adapter; add one, or call \
                     `set_train_base(true)` for full fine-tuning"
                        .into(),
                ));
            }
            if self.export.is_none() {
                return Err(config_error(
                    "full_export",
                    "full fine-tuning writes the whole model: say how with `.full_export(..)`"
                        .into(),
                ));
            }
        }
        // A quantized base holds no dense weight to train: full fine-tuning would silently
        // leave those layers as they are.
        let quantized = peft_core::nn::quantized_sites(self.model.model());
        if self.model.trains_base() && quantized > 0 {
            return Err(config_error(
                "method",
                format!(
                    "full fine-tuning needs dense base weights, but {quantized} layers hold \
                     theirs quantized (a GGUF base, or dtype nf4 / q8); train an adapter \
                     (lora, dora, ia3, prefix) on it, or fine-tune the f32 / f16 model"
                ),
            ));
        }
        let device = match self.device {
            Some(device) => device,
            None => self
                .model
                .model()
                .devices()
                .into_iter()
                .next()
                .ok_or_else(|| {
                    config_error(
                        "device",
                        "the model has no parameters to find a device from: call `.device(..)`"
                            .into(),
                    )
                })?,
        };
        let device = if device.is_autodiff() {
            device
        } else {
            device.autodiff()
        };
        Ok(Trainer {
            model: self.model,
            adapters,
            objective: self.objective,
            config: self.config,
            output_dir,
            device,
            pad_id: self.pad_id,
            export: self.export,
            bundle_files: self.bundle_files,
            summary_fields: self.summary_fields,
        })
    }
}
