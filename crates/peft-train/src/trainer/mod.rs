//! The trainer: any [`Adaptable`] model with an [`Objective`], its base frozen, its adapters
//! trained ([`Trainer`], built with [`Trainer::builder`]). The loop is in `train_loop.rs` (one
//! optimizer step, evaluation, checkpoints, logging, each its own function), a whole run with a
//! held-out test and `results.json` in `fit.rs`, saving results in `save.rs`.

mod builder;
mod fit;
mod save;
mod train_loop;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;
use peft_core::{Adaptable, PeftModel};
use serde::Serialize;

use crate::data::Example;
use crate::error::Result;
use crate::eval::EvalReport;
use crate::objective::Objective;

pub use crate::config::TrainConfig;
pub use builder::TrainerBuilder;
pub use fit::{BestMetric, Datasets, RESULTS_FILE, RunSummary, method_name};
pub use save::{FullExport, ModelExport};

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// Optimizer steps done.
    pub steps: u64,
    /// Training loss per step.
    pub losses: Vec<f64>,
    /// Last evaluation.
    pub last_eval: Option<EvalReport>,
    /// Best metric and its step.
    pub best: Option<(f64, u64)>,
    /// Optimizer steps per second (this process; training steps only, not evaluation or
    /// checkpoint writes).
    pub steps_per_sec: f64,
    /// Training tokens per second (as `steps_per_sec`).
    pub tokens_per_sec: f64,
    /// Seconds spent in training steps (this process), without evaluation and checkpoints.
    pub step_seconds: f64,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// The adapter bundle (or, for full fine-tuning, the model folder) written at the end.
    pub adapter_dir: PathBuf,
}

/// Trains the adapters of a [`PeftModel`] of any [`Adaptable`] model: only their parameters
/// get gradients and optimizer state, the base stays frozen. Evaluation, checkpoints that
/// resume bit for bit, TensorBoard logs and the best adapter by a metric come with it.
///
/// Built with [`Trainer::builder`]; [`train`](Self::train) runs the loop,
/// [`fit`](Self::fit) a whole run (training, the held-out test with the best adapter, label
/// maps and `results.json`).
///
/// ```
/// use burn::tensor::{Device, Tensor, activation::relu};
/// use peft_core::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
/// use peft_core::{Adaptable, PeftModel};
/// use peft_lora::LoraConfig;
/// use peft_train::data::{Collated, Example};
/// use peft_train::{TrainConfig, Trainer, objective::classifier};
///
/// #[derive(burn::module::Module, Debug, Adaptable)]
/// struct Bag {
///     embed: Embedding,
///     hidden: Linear,
///     classifier: Linear,
/// }
///
/// impl Bag {
///     fn logits(&self, batch: &Collated) -> Tensor<2> {
///         let x = self.embed.forward(batch.input_ids.clone()).mean_dim(1).squeeze_dim(1);
///         self.classifier.forward(relu(self.hidden.forward(x)))
///     }
/// }
///
/// let device = Device::flex().autodiff();
/// let base = Bag {
///     embed: EmbeddingConfig::new(16, 8).init(&device),
///     hidden: LinearConfig::new(8, 8).init(&device),
///     classifier: LinearConfig::new(8, 2).init(&device),
/// };
/// let mut model = PeftModel::new(base);
/// model.add_adapter("default", &LoraConfig::new(4).targets(["hidden"]))?;
/// // Class 1 when the sequence starts with a high token id.
/// let data: Vec<Example> = (0..16)
///     .map(|i| Example::classification(vec![i, (i + 3) % 16], usize::from(i >= 8)))
///     .collect();
/// let out = tempfile::tempdir()?;
/// let mut trainer = Trainer::builder(model, classifier(|m: &Bag, b: &Collated| m.logits(b)))
///     .config(TrainConfig { batch_size: 4, max_steps: Some(3), progress: false, ..Default::default() })
///     .output_dir(out.path())
///     .device(device)
///     .build()?;
/// let report = trainer.train(&data, Some(&data), None)?;
/// assert_eq!(report.steps, 3);
/// assert!(out.path().join("adapter/adapter_model.safetensors").is_file());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Trainer<M: Adaptable + Module> {
    model: PeftModel<M>,
    adapters: Vec<String>,
    objective: Box<dyn Objective<M>>,
    config: TrainConfig,
    output_dir: PathBuf,
    device: Device,
    pad_id: i64,
    export: Option<Box<dyn ModelExport<M>>>,
    /// Files written beside every saved bundle (`label_map.json`, how the data was read, ...).
    bundle_files: Vec<(String, Vec<u8>)>,
    /// Extra top-level entries of `results.json` ([`fit`](Self::fit)).
    summary_fields: Vec<(String, serde_json::Value)>,
}

impl<M: Adaptable + Module> Trainer<M> {
    /// Start building a trainer of `model`'s adapters for `objective`. See [`TrainerBuilder`]
    /// for the settings and their defaults.
    pub fn builder(
        model: PeftModel<M>,
        objective: impl Objective<M> + 'static,
    ) -> TrainerBuilder<M> {
        TrainerBuilder::new(model, Box::new(objective))
    }

    /// The model being trained.
    pub fn model(&self) -> &PeftModel<M> {
        &self.model
    }

    /// The model being trained, to change (switch adapters, reload weights) between runs.
    pub fn model_mut(&mut self) -> &mut PeftModel<M> {
        &mut self.model
    }

    /// The trained model.
    pub fn into_model(self) -> PeftModel<M> {
        self.model
    }

    /// The adapters trained together (empty for full fine-tuning).
    pub fn adapters(&self) -> &[String] {
        &self.adapters
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The output folder: `adapter/` (or `model/`), `best/`, `checkpoints/`, `runs/`.
    pub fn output_dir(&self) -> &Path {
        &self.output_dir
    }

    /// The training device (autodiff).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The padding token id batches are padded with.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// Evaluate on `examples` without gradients or dropout (batches of `eval_batch_size`, else
    /// `batch_size`), as the objective defines it.
    pub fn evaluate(&self, examples: &[Example]) -> Result<EvalReport> {
        let size = self
            .config
            .eval_batch_size
            .unwrap_or(self.config.batch_size);
        self.objective.evaluate(
            self.model.model(),
            examples,
            self.pad_id,
            size,
            &self.device,
        )
    }

    /// The metric that picks the best result: the config's, else the objective's default.
    fn metric_name(&self) -> String {
        self.config
            .metric
            .clone()
            .unwrap_or_else(|| self.objective.default_metric().to_string())
    }

    /// Whether this run fine-tunes the whole model rather than adapters.
    pub fn is_full_fine_tuning(&self) -> bool {
        self.adapters
            .iter()
            .all(|a| self.model.adapter_config(a).is_none())
    }

    /// The folder name of the final result: `adapter` (PEFT bundles) or `model` (full
    /// fine-tuning, written by the [`ModelExport`]).
    pub fn result_folder(&self) -> &'static str {
        if self.is_full_fine_tuning() {
            "model"
        } else {
            "adapter"
        }
    }
}
