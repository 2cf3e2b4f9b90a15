//! The training loop.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::optim::GradientsAccumulator;
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::PeftModel;
use peft_models::HfModel;
use serde::Serialize;

use crate::checkpoint::{self, TrainerState};
use crate::data::{Example, collate, epoch_order};
use crate::error::{Result, TrainError};
use crate::eval::{EvalReport, evaluate};
use crate::optim::{AdamW, trainable_paths, trainable_shapes};
use crate::readout;
use crate::run::{self, TrainOptions};
use crate::schedule::lr_at;
use crate::step::{accumulate_gradients, forward_loss};

pub use crate::config::TrainConfig;
use crate::tensorboard::EventWriter;

/// What is learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Cross-entropy over `num_labels` classes.
    Classification {
        /// Number of classes.
        num_labels: usize,
    },
    /// Next-token cross-entropy on tokens whose label is not -100.
    CausalLm,
}

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
    /// The adapter bundle written at the end.
    pub adapter_dir: PathBuf,
}

/// Trains one adapter of a [`PeftModel`]; only its parameters get gradients and optimizer state.
pub struct Trainer {
    /// The model (base frozen, adapter trainable).
    pub model: PeftModel<HfModel>,
    /// The adapters being trained, together (e.g. LoRA and prefix tuning): they are made
    /// active, each is saved as its own PEFT bundle (`default` at the folder itself, any other
    /// name in `<folder>/<name>/`, PEFT's layout). Empty (or naming no adapter of the model) with
    /// [`PeftModel::set_train_base`] for full fine-tuning.
    pub adapters: Vec<String>,
    /// The objective.
    pub objective: Objective,
    /// Hyper-parameters.
    pub config: TrainConfig,
    /// Output folder: `adapter/`, `best/`, `checkpoints/`, `runs/` (TensorBoard).
    pub output_dir: PathBuf,
    /// The training device (autodiff); parameters and optimizer state live here.
    pub device: Device,
    /// Padding token id.
    pub pad_id: i64,
    /// For full fine-tuning (`PeftModel::set_train_base(true)` and no adapter `adapter`):
    /// how to write the model as a Hugging Face folder into `best/` and `model/`. `None`
    /// when training an adapter, which is saved as a PEFT bundle (`best/`, `adapter/`).
    pub full_export: Option<FullExport>,
}

/// What it takes to write a fully fine-tuned model as a Hugging Face model folder.
#[derive(Debug, Clone)]
pub struct FullExport {
    /// The base model's config.
    pub config: peft_models::HfConfig,
    /// The base model's folder (tokenizer files are copied from it).
    pub source_dir: PathBuf,
    /// Class names (classification), written as `id2label` / `label2id`.
    pub labels: Option<Vec<String>>,
}

impl Trainer {
    /// Evaluate on `examples` without gradients or dropout (batches of `eval_batch_size`, else
    /// `batch_size`).
    pub fn evaluate(&self, examples: &[Example]) -> Result<EvalReport> {
        let size = self
            .config
            .eval_batch_size
            .unwrap_or(self.config.batch_size);
        evaluate(
            self.model.model(),
            examples,
            self.objective,
            self.pad_id,
            size,
            &self.device,
        )
    }

    fn metric_name(&self) -> String {
        self.config
            .metric
            .clone()
            .unwrap_or_else(|| match self.objective {
                Objective::Classification { .. } => "accuracy".into(),
                Objective::CausalLm => "loss".into(),
            })
    }

    /// Train on `train` (evaluating on `eval`), resuming from the checkpoint in `resume` if
    /// given. Writes `adapter/` (final), `best/` (best by the metric), `checkpoints/`, `runs/`
    /// and `run.json` (the run record).
    ///
    /// A fresh run refuses an output folder that holds a run, and a resume refuses a
    /// checkpoint of another run config ([`crate::run`]); [`train_with`](Self::train_with)
    /// can overwrite or force.
    pub fn train(
        &mut self,
        train: &[Example],
        eval: Option<&[Example]>,
        resume: Option<&Path>,
    ) -> Result<TrainReport> {
        self.train_with(train, eval, resume, TrainOptions::default())
    }

    /// [`train`](Self::train) with `options` for a used output folder or another run's
    /// checkpoint.
    pub fn train_with(
        &mut self,
        train: &[Example],
        eval: Option<&[Example]>,
        resume: Option<&Path>,
        options: TrainOptions,
    ) -> Result<TrainReport> {
        let c = self.config.clone();
        c.validate()
            .map_err(|(key, reason)| TrainError::Config { key, reason })?;
        // A quantized base holds no dense weight to train: full fine-tuning would silently
        // leave those layers as they are.
        let quantized = peft_core::nn::quantized_sites(self.model.model());
        if self.model.trains_base() && quantized > 0 {
            return Err(TrainError::Config {
                key: "method".into(),
                reason: format!(
                    "full fine-tuning needs dense base weights, but {quantized} layers hold \
                     theirs quantized (a GGUF base, or dtype nf4 / q8); train an adapter (lora, \
                     dora, ia3, prefix) on it, or fine-tune the f32 / f16 model"
                ),
            });
        }
        if train.is_empty() {
            return Err(TrainError::Config {
                key: "data.train".into(),
                reason: "the training set is empty".into(),
            });
        }
        // Every adapter trained here is active (and so trainable), whatever was active before.
        if !self.is_full_fine_tuning() {
            let names: Vec<&str> = self.adapters.iter().map(String::as_str).collect();
            self.model.set_adapters(&names)?;
        }
        let metric = self.metric_name();
        if eval.is_some()
            && EvalReport::default().metric(&metric).is_none()
            && !matches!(metric.as_str(), "accuracy" | "macro_f1" | "perplexity")
        {
            return Err(TrainError::Config {
                key: "train.metric".into(),
                reason: format!(
                    "unknown metric `{metric}`; use accuracy, macro_f1, loss or perplexity"
                ),
            });
        }
        let total = c.total_steps(train.len());
        let warmup = c
            .warmup_steps
            .unwrap_or((c.warmup_ratio * total as f64).round() as usize);
        let ckpt_root = self.output_dir.join("checkpoints");

        let mut optim = AdamW::new(c.adamw.clone());
        let mut state = TrainerState {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            best_metric: None,
            best_step: None,
            evals_without_improvement: 0,
            losses: Vec::new(),
            run: None,
        };
        let record = self.run_record(train, eval);
        if resume.is_none() {
            run::claim_fresh(&self.output_dir, &record, options.overwrite)?;
        }
        if let Some(dir) = resume {
            let loaded = checkpoint::load(dir)?;
            let sizes = trainable_shapes(self.model.model(), self.model.trainable_param_ids())
                .into_iter()
                .map(|(path, shape)| (path, shape.iter().product()))
                .collect();
            let inner = self.device.clone().without_autodiff();
            // Check the optimizer state before touching the model, so a bad checkpoint changes
            // nothing.
            let mut restored = AdamW::new(c.adamw.clone());
            restored
                .restore(loaded.optimizer.0, &loaded.optimizer.1, &sizes, &inner)
                .map_err(|reason| TrainError::Checkpoint {
                    dir: dir.to_path_buf(),
                    reason: format!("optimizer.safetensors: {reason}"),
                })?;
            checkpoint::check_params(&self.model, &loaded.params, dir)?;
            // Shapes match; the run must be this one too (data, batch size, seed, ...).
            run::check_resume(
                dir,
                loaded.state.run.as_ref(),
                &self.output_dir,
                &record,
                options.force_resume,
            )?;
            checkpoint::restore_params(&mut self.model, &loaded.params, dir)?;
            optim = restored;
            state = loaded.state;
        }
        state.run = Some(record.clone());
        std::fs::create_dir_all(&self.output_dir).map_err(|source| TrainError::Io {
            file: self.output_dir.clone(),
            source,
        })?;
        run::write(&self.output_dir, &record)?;
        let mut last_checkpoint = checkpoint::latest(&ckpt_root);
        let mut tb =
            EventWriter::new(self.output_dir.join("runs")).map_err(|source| TrainError::Io {
                file: self.output_dir.join("runs"),
                source,
            })?;
        let bar = if c.progress {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
                )
                .expect("static template"),
            );
            bar.set_position(state.step);
            bar
        } else {
            ProgressBar::hidden()
        };
        let started = Instant::now();
        // Evaluation and checkpoint writes are not training: the speeds count steps only.
        let mut overhead = 0.0f64;
        let (start_step, mut tokens) = (state.step, 0usize);
        let mut last_eval = None;
        let mut stopped_early = false;
        let trainable = trainable_paths(self.model.model(), self.model.trainable_param_ids());

        'epochs: for epoch in state.epoch..c.epochs.max(1) {
            let order = epoch_order(train.len(), c.seed, epoch);
            let batches: Vec<&[usize]> = order.chunks(c.batch_size).collect();
            let first = if epoch == state.epoch {
                state.batch_in_epoch
            } else {
                0
            };
            let mut accumulator = GradientsAccumulator::<HfModel>::new();
            let mut micro = 0usize;
            // The step's loss stays on the device until the one read per step (`readout`).
            let mut micro_loss: Option<Tensor<1>> = None;
            for (index, chunk) in batches.iter().enumerate().skip(first) {
                // A resumed run that already reached `max_steps` has nothing left to do.
                if c.max_steps.is_some_and(|m| state.step >= m) {
                    break 'epochs;
                }
                // Dropout draws depend only on (seed, step, micro-batch): a resumed run repeats them.
                self.device.seed(
                    c.seed
                        .wrapping_mul(1_000_003)
                        .wrapping_add(state.step * 64 + micro as u64),
                );
                let refs: Vec<&Example> = chunk.iter().map(|&i| &train[i]).collect();
                let batch = collate(&refs, self.pad_id, &self.device);
                tokens += batch.tokens;
                let loss = forward_loss(self.model.model(), self.objective, &batch)?;
                micro_loss = readout::accumulate(micro_loss, loss.clone().inner());
                accumulate_gradients(loss, self.model.model(), &mut accumulator);
                micro += 1;
                let end_of_epoch = index + 1 == batches.len();
                if micro < c.grad_accum && !end_of_epoch {
                    continue;
                }
                let grads = accumulator.grads();
                let scale = 1.0 / micro as f64;
                let [loss_sum, grad_sq] =
                    readout::loss_and_grad_sq(&self.device, micro_loss.take(), &grads, &trainable);
                if !loss_sum.is_finite() {
                    bar.abandon();
                    return Err(TrainError::NonFiniteLoss {
                        step: state.step,
                        value: loss_sum / micro as f64,
                        last_checkpoint,
                    });
                }
                let norm = grad_sq.sqrt() * scale;
                // Checked before the update: an infinite gradient with a finite loss made the
                // clip factor 0 and the parameters NaN, and the checkpoint saved right after
                // held them while the NaN loss was only seen one step later.
                if !norm.is_finite() {
                    bar.abandon();
                    return Err(TrainError::NonFiniteGradient {
                        step: state.step,
                        norm,
                        loss: loss_sum / micro as f64,
                        last_checkpoint,
                    });
                }
                let clip = match c.max_grad_norm {
                    Some(max) if norm > max => max / (norm + 1e-6),
                    _ => 1.0,
                };
                let lr = lr_at(
                    c.schedule,
                    c.learning_rate,
                    state.step as usize,
                    total as usize,
                    warmup,
                );
                self.model
                    .update(|m| optim.step(lr, m, grads, scale * clip));
                let step_loss = loss_sum / micro as f64;
                state.step += 1;
                state.epoch = epoch;
                state.batch_in_epoch = index + 1;
                state.losses.push(step_loss);
                micro = 0;
                let elapsed = (started.elapsed().as_secs_f64() - overhead).max(1e-9);
                let step = state.step as i64;
                let log = |tb: &mut EventWriter, tag: &str, v: f64| {
                    tb.scalar(tag, v as f32, step)
                        .map_err(|source| TrainError::Io {
                            file: self.output_dir.join("runs"),
                            source,
                        })
                };
                log(&mut tb, "train/loss", step_loss)?;
                log(&mut tb, "train/lr", lr)?;
                log(&mut tb, "train/grad_norm", norm)?;
                log(&mut tb, "train/tokens_per_sec", tokens as f64 / elapsed)?;
                bar.set_position(state.step);
                let status = format!(
                    "loss {step_loss:.4}  lr {lr:.2e}  {:.2} steps/s",
                    (state.step - start_step) as f64 / elapsed
                );
                // Without a terminal (logs, CI) the bar is invisible: print ~20 lines a run.
                if c.progress
                    && bar.is_hidden()
                    && (state.step.is_multiple_of((total / 20).max(1)) || state.step == total)
                {
                    eprintln!("step {}/{total}  {status}", state.step);
                }
                bar.set_message(status);
                let at_end = end_of_epoch || c.max_steps.is_some_and(|m| state.step >= m);
                let paused = Instant::now();
                if let Some(eval) = eval
                    && (at_end || c.eval_every.is_some_and(|n| state.step.is_multiple_of(n)))
                {
                    let report = self.evaluate(eval)?;
                    if c.progress {
                        let line = format!(
                            "step {}: eval loss {:.4}{}",
                            state.step,
                            report.loss,
                            report
                                .accuracy
                                .map(|a| format!(", accuracy {a:.4}"))
                                .unwrap_or_default()
                        );
                        if bar.is_hidden() {
                            eprintln!("{line}");
                        } else {
                            bar.println(line);
                        }
                    }
                    self.log_eval(&mut tb, &report, step)?;
                    if let Some((value, higher)) = report.metric(&metric) {
                        let improved = state
                            .best_metric
                            .is_none_or(|best| if higher { value > best } else { value < best });
                        if improved {
                            state.best_metric = Some(value);
                            state.best_step = Some(state.step);
                            state.evals_without_improvement = 0;
                            self.save_result(&self.output_dir.join("best"))?;
                        } else {
                            state.evals_without_improvement += 1;
                        }
                    }
                    last_eval = Some(report);
                    if c.early_stopping_patience
                        .is_some_and(|p| state.evals_without_improvement >= p)
                    {
                        stopped_early = true;
                    }
                }
                if at_end
                    || c.save_every.is_some_and(|n| state.step.is_multiple_of(n))
                    || stopped_early
                {
                    if end_of_epoch {
                        state.epoch = epoch + 1;
                        state.batch_in_epoch = 0;
                    }
                    last_checkpoint = Some(checkpoint::save(
                        &ckpt_root,
                        &self.model,
                        &self.adapters,
                        &optim,
                        &state,
                        c.keep_last,
                    )?);
                }
                overhead += paused.elapsed().as_secs_f64();
                if stopped_early || c.max_steps.is_some_and(|m| state.step >= m) {
                    break 'epochs;
                }
            }
            state.epoch = epoch + 1;
            state.batch_in_epoch = 0;
        }
        bar.finish_and_clear();
        let elapsed = (started.elapsed().as_secs_f64() - overhead).max(1e-9);
        let adapter_dir = self.output_dir.join(self.result_folder());
        self.save_result(&adapter_dir)?;
        Ok(TrainReport {
            steps: state.step,
            losses: state.losses.clone(),
            last_eval,
            best: state.best_metric.zip(state.best_step),
            steps_per_sec: (state.step - start_step) as f64 / elapsed,
            tokens_per_sec: tokens as f64 / elapsed,
            step_seconds: elapsed,
            stopped_early,
            adapter_dir,
        })
    }

    /// The record of this run on `train` / `eval` ([`run::record`]).
    fn run_record(&self, train: &[Example], eval: Option<&[Example]>) -> serde_json::Value {
        let adapters: Vec<(String, serde_json::Value)> = self
            .adapters
            .iter()
            .map(|a| {
                let config = self
                    .model
                    .adapter_config(a)
                    .map(peft_core::bundle::method_to_json)
                    .unwrap_or(serde_json::Value::Null);
                (a.clone(), config)
            })
            .collect();
        run::record(
            &self.config,
            &adapters,
            self.objective,
            self.pad_id,
            train,
            eval,
        )
    }

    /// Whether this run fine-tunes the whole model rather than an adapter.
    pub fn is_full_fine_tuning(&self) -> bool {
        self.adapters
            .iter()
            .all(|a| self.model.adapter_config(a).is_none())
    }

    /// The folder name of the final result: `adapter` (a PEFT bundle) or `model` (full
    /// fine-tuning: a Hugging Face model folder).
    pub fn result_folder(&self) -> &'static str {
        if self.is_full_fine_tuning() {
            "model"
        } else {
            "adapter"
        }
    }

    /// Save the trained adapter (a PEFT bundle) or, for full fine-tuning, the whole model (a
    /// Hugging Face folder) to `dir`.
    pub fn save_result(&self, dir: &Path) -> Result<()> {
        // No bundle or model folder ever holds a non-finite tensor either.
        if let Some(parameter) = checkpoint::non_finite_parameter(&self.model) {
            return Err(TrainError::NonFiniteParameter {
                step: None,
                parameter,
                last_checkpoint: checkpoint::latest(&self.output_dir.join("checkpoints")),
            });
        }
        if !self.is_full_fine_tuning() {
            for adapter in &self.adapters {
                self.model.save_adapter(dir, adapter)?;
            }
            return Ok(());
        }
        let export = self
            .full_export
            .as_ref()
            .ok_or_else(|| TrainError::Config {
                key: "adapters".into(),
                reason: format!(
                    "no adapter {:?} in the model and no `full_export` set for full fine-tuning",
                    self.adapters
                ),
            })?;
        peft_models::save_pretrained(
            self.model.model(),
            &export.config,
            &export.source_dir,
            dir,
            export.labels.as_deref(),
        )
        .map(|_| ())
        .map_err(|e| TrainError::Export {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        })
    }

    fn log_eval(&self, tb: &mut EventWriter, report: &EvalReport, step: i64) -> Result<()> {
        let mut write = |tag: &str, v: Option<f64>| -> Result<()> {
            if let Some(v) = v {
                tb.scalar(tag, v as f32, step)
                    .map_err(|source| TrainError::Io {
                        file: self.output_dir.join("runs"),
                        source,
                    })?;
            }
            Ok(())
        };
        write("eval/loss", Some(report.loss))?;
        write("eval/accuracy", report.accuracy)?;
        write("eval/macro_f1", report.macro_f1)?;
        write("eval/perplexity", report.perplexity)
    }
}
