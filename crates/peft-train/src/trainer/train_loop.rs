//! The training loop, in pieces: [`Trainer::begin`] (checks, resume, output folder),
//! [`Trainer::micro_batch`] (forward and backward), [`Trainer::optimizer_step`] (clipping,
//! schedule, update), [`Trainer::log_step`], [`Trainer::evaluate_and_track`] (best result,
//! early stopping), [`Trainer::checkpoint`] and [`Trainer::finish`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ParamId};
use burn::optim::GradientsAccumulator;
use burn::tensor::{Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::Adaptable;

use super::{TrainReport, Trainer};
use crate::checkpoint::{self, TrainerState};
use crate::data::{Example, collate, epoch_order};
use crate::error::{Result, TrainError};
use crate::eval::EvalReport;
use crate::optim::{AdamW, trainable_paths, trainable_shapes};
use crate::readout;
use crate::run::{self, TrainOptions};
use crate::schedule::lr_at;
use crate::step::accumulate_gradients;
use crate::tensorboard::EventWriter;

/// The state of a run between steps.
pub(super) struct Session {
    optim: AdamW,
    pub(super) state: TrainerState,
    tb: EventWriter,
    bar: ProgressBar,
    metric: String,
    total: u64,
    warmup: usize,
    started: Instant,
    /// Seconds of evaluation and checkpoint writes: the speeds count steps only.
    overhead: f64,
    start_step: u64,
    tokens: usize,
    last_eval: Option<EvalReport>,
    stopped_early: bool,
    last_checkpoint: Option<PathBuf>,
    trainable: Vec<(ParamId, String, usize)>,
    /// The trainable parameters at the best evaluation, when kept for a held-out test
    /// ([`Trainer::fit`]).
    pub(super) best_params: Option<BTreeMap<String, TensorData>>,
    keep_best: bool,
}

/// The micro-batches of the optimizer step being accumulated.
struct MicroBatches<M> {
    grads: GradientsAccumulator<M>,
    count: usize,
    /// The losses stay on the device until the one read per step ([`readout`]).
    loss: Option<Tensor<1>>,
}

/// What one optimizer step did.
struct StepOutcome {
    loss: f64,
    lr: f64,
    grad_norm: f64,
}

impl<M: Adaptable + Module> Trainer<M> {
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
        let mut session = self.begin(train, eval, resume, options, false)?;
        self.run_epochs(&mut session, train, eval)?;
        self.finish(session)
    }

    /// The epochs of a begun session.
    pub(super) fn run_epochs(
        &mut self,
        session: &mut Session,
        train: &[Example],
        eval: Option<&[Example]>,
    ) -> Result<()> {
        let c = self.config.clone();
        for epoch in session.state.epoch..c.epochs.max(1) {
            let order = epoch_order(train.len(), c.seed, epoch);
            let batches: Vec<&[usize]> = order.chunks(c.batch_size).collect();
            let first = if epoch == session.state.epoch {
                session.state.batch_in_epoch
            } else {
                0
            };
            let mut micro = MicroBatches {
                grads: GradientsAccumulator::<M>::new(),
                count: 0,
                loss: None,
            };
            for (index, chunk) in batches.iter().enumerate().skip(first) {
                // A resumed run that already reached `max_steps` has nothing left to do.
                if self.reached_max_steps(session) {
                    return Ok(());
                }
                self.micro_batch(&mut micro, train, chunk, session)?;
                let end_of_epoch = index + 1 == batches.len();
                if micro.count < c.grad_accum && !end_of_epoch {
                    continue;
                }
                let outcome = self.optimizer_step(session, &mut micro)?;
                session.state.step += 1;
                session.state.epoch = epoch;
                session.state.batch_in_epoch = index + 1;
                session.state.losses.push(outcome.loss);
                self.log_step(session, &outcome)?;
                let at_end = end_of_epoch || self.reached_max_steps(session);
                let paused = Instant::now();
                if let Some(eval) = eval
                    && (at_end
                        || c.eval_every
                            .is_some_and(|n| session.state.step.is_multiple_of(n)))
                {
                    self.evaluate_and_track(session, eval)?;
                }
                if at_end
                    || c.save_every
                        .is_some_and(|n| session.state.step.is_multiple_of(n))
                    || session.stopped_early
                {
                    if end_of_epoch {
                        session.state.epoch = epoch + 1;
                        session.state.batch_in_epoch = 0;
                    }
                    self.checkpoint(session)?;
                }
                session.overhead += paused.elapsed().as_secs_f64();
                if session.stopped_early || self.reached_max_steps(session) {
                    return Ok(());
                }
            }
            session.state.epoch = epoch + 1;
            session.state.batch_in_epoch = 0;
        }
        Ok(())
    }

    fn reached_max_steps(&self, session: &Session) -> bool {
        self.config
            .max_steps
            .is_some_and(|m| session.state.step >= m)
    }

    /// Check the run, resume from `resume` or claim the output folder, and open the logs.
    /// `keep_best` keeps the best evaluation's parameters in memory (for a held-out test).
    pub(super) fn begin(
        &mut self,
        train: &[Example],
        eval: Option<&[Example]>,
        resume: Option<&Path>,
        options: TrainOptions,
        keep_best: bool,
    ) -> Result<Session> {
        let c = self.config.clone();
        c.validate()
            .map_err(|(key, reason)| TrainError::Config { key, reason })?;
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
            && !matches!(
                metric.as_str(),
                "accuracy" | "macro_f1" | "perplexity" | "loss"
            )
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
        match resume {
            None => run::claim_fresh(&self.output_dir, &record, options.overwrite)?,
            Some(dir) => {
                (optim, state) = self.resume_from(dir, &record, options)?;
            }
        }
        state.run = Some(record.clone());
        std::fs::create_dir_all(&self.output_dir).map_err(|source| TrainError::Io {
            file: self.output_dir.clone(),
            source,
        })?;
        run::write(&self.output_dir, &record)?;
        let tb =
            EventWriter::new(self.output_dir.join("runs")).map_err(|source| TrainError::Io {
                file: self.output_dir.join("runs"),
                source,
            })?;
        let bar = progress_bar(c.progress, total, state.step);
        Ok(Session {
            optim,
            start_step: state.step,
            state,
            tb,
            bar,
            metric,
            total,
            warmup,
            started: Instant::now(),
            overhead: 0.0,
            tokens: 0,
            last_eval: None,
            stopped_early: false,
            last_checkpoint: checkpoint::latest(&self.output_dir.join("checkpoints")),
            trainable: trainable_paths(self.model.model(), self.model.trainable_param_ids()),
            best_params: None,
            keep_best,
        })
    }

    /// The optimizer and trainer state of the checkpoint in `dir`, its parameters restored
    /// into the model. Everything is checked before the model changes: a bad checkpoint
    /// changes nothing.
    fn resume_from(
        &mut self,
        dir: &Path,
        record: &serde_json::Value,
        options: TrainOptions,
    ) -> Result<(AdamW, TrainerState)> {
        let loaded = checkpoint::load(dir)?;
        let sizes = trainable_shapes(self.model.model(), self.model.trainable_param_ids())
            .into_iter()
            .map(|(path, shape)| (path, shape.iter().product()))
            .collect();
        let inner = self.device.clone().without_autodiff();
        let mut restored = AdamW::new(self.config.adamw.clone());
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
            record,
            options.force_resume,
        )?;
        checkpoint::restore_params(&mut self.model, &loaded.params, dir)?;
        Ok((restored, loaded.state))
    }

    /// Forward and backward of one micro-batch (the examples of `train` at `indices`), its
    /// gradients added to `micro`.
    fn micro_batch(
        &self,
        micro: &mut MicroBatches<M>,
        train: &[Example],
        indices: &[usize],
        session: &mut Session,
    ) -> Result<()> {
        // Dropout draws depend only on (seed, step, micro-batch): a resumed run repeats them.
        self.device.seed(
            self.config
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(session.state.step * 64 + micro.count as u64),
        );
        let refs: Vec<&Example> = indices.iter().map(|&i| &train[i]).collect();
        let batch = collate(&refs, self.pad_id, &self.device);
        session.tokens += batch.tokens;
        let loss = self.objective.loss(self.model.model(), &batch)?;
        micro.loss = readout::accumulate(micro.loss.take(), loss.clone().inner());
        accumulate_gradients(loss, self.model.model(), &mut micro.grads);
        micro.count += 1;
        Ok(())
    }

    /// Average the accumulated gradients, check them, clip them, and update the parameters
    /// at the scheduled learning rate.
    fn optimizer_step(
        &mut self,
        session: &mut Session,
        micro: &mut MicroBatches<M>,
    ) -> Result<StepOutcome> {
        let grads = micro.grads.grads();
        let count = std::mem::take(&mut micro.count) as f64;
        let scale = 1.0 / count;
        let [loss_sum, grad_sq] =
            readout::loss_and_grad_sq(&self.device, micro.loss.take(), &grads, &session.trainable);
        let loss = loss_sum / count;
        if !loss_sum.is_finite() {
            session.bar.abandon();
            return Err(TrainError::NonFiniteLoss {
                step: session.state.step,
                value: loss,
                last_checkpoint: session.last_checkpoint.clone(),
            });
        }
        let grad_norm = grad_sq.sqrt() * scale;
        // Checked before the update: an infinite gradient with a finite loss made the clip
        // factor 0 and the parameters NaN, and the checkpoint saved right after held them
        // while the NaN loss was only seen one step later.
        if !grad_norm.is_finite() {
            session.bar.abandon();
            return Err(TrainError::NonFiniteGradient {
                step: session.state.step,
                norm: grad_norm,
                loss,
                last_checkpoint: session.last_checkpoint.clone(),
            });
        }
        // torch.nn.utils.clip_grad_norm_, as transformers' Trainer applies `max_grad_norm`.
        let clip = match self.config.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        let lr = lr_at(
            self.config.schedule,
            self.config.learning_rate,
            session.state.step as usize,
            session.total as usize,
            session.warmup,
        );
        let optim = &mut session.optim;
        self.model
            .update(|m| optim.step(lr, m, grads, scale * clip));
        Ok(StepOutcome {
            loss,
            lr,
            grad_norm,
        })
    }

    /// TensorBoard scalars and the progress bar (or, without a terminal, ~20 lines a run).
    fn log_step(&self, session: &mut Session, outcome: &StepOutcome) -> Result<()> {
        let elapsed = (session.started.elapsed().as_secs_f64() - session.overhead).max(1e-9);
        let step = session.state.step;
        for (tag, value) in [
            ("train/loss", outcome.loss),
            ("train/lr", outcome.lr),
            ("train/grad_norm", outcome.grad_norm),
            ("train/tokens_per_sec", session.tokens as f64 / elapsed),
        ] {
            self.scalar(&mut session.tb, tag, value, step)?;
        }
        session.bar.set_position(step);
        let status = format!(
            "loss {:.4}  lr {:.2e}  {:.2} steps/s",
            outcome.loss,
            outcome.lr,
            (step - session.start_step) as f64 / elapsed
        );
        let total = session.total;
        if self.config.progress
            && session.bar.is_hidden()
            && (step.is_multiple_of((total / 20).max(1)) || step == total)
        {
            eprintln!("step {step}/{total}  {status}");
        }
        session.bar.set_message(status);
        Ok(())
    }

    fn scalar(&self, tb: &mut EventWriter, tag: &str, value: f64, step: u64) -> Result<()> {
        tb.scalar(tag, value as f32, step as i64)
            .map_err(|source| TrainError::Io {
                file: self.output_dir.join("runs"),
                source,
            })
    }

    /// Evaluate, log, save `best/` when the metric improved, count evaluations without
    /// improvement for early stopping.
    fn evaluate_and_track(&self, session: &mut Session, eval: &[Example]) -> Result<()> {
        let report = self.evaluate(eval)?;
        let step = session.state.step;
        if self.config.progress {
            let line = format!(
                "step {step}: eval loss {:.4}{}",
                report.loss,
                report
                    .accuracy
                    .map(|a| format!(", accuracy {a:.4}"))
                    .unwrap_or_default()
            );
            if session.bar.is_hidden() {
                eprintln!("{line}");
            } else {
                session.bar.println(line);
            }
        }
        for (tag, value) in [
            ("eval/loss", Some(report.loss)),
            ("eval/accuracy", report.accuracy),
            ("eval/macro_f1", report.macro_f1),
            ("eval/perplexity", report.perplexity),
        ] {
            if let Some(value) = value {
                self.scalar(&mut session.tb, tag, value, step)?;
            }
        }
        if let Some((value, higher)) = report.metric(&session.metric) {
            let state = &mut session.state;
            let improved = state
                .best_metric
                .is_none_or(|best| if higher { value > best } else { value < best });
            if improved {
                state.best_metric = Some(value);
                state.best_step = Some(step);
                state.evals_without_improvement = 0;
                self.save_result(&self.output_dir.join("best"))?;
                if session.keep_best {
                    session.best_params = Some(checkpoint::trainable_named_values(&self.model));
                }
            } else {
                state.evals_without_improvement += 1;
            }
        }
        session.last_eval = Some(report);
        if self
            .config
            .early_stopping_patience
            .is_some_and(|p| session.state.evals_without_improvement >= p)
        {
            session.stopped_early = true;
        }
        Ok(())
    }

    /// Save a checkpoint (pruned to `keep_last`).
    fn checkpoint(&self, session: &mut Session) -> Result<()> {
        session.last_checkpoint = Some(checkpoint::save(
            &self.output_dir.join("checkpoints"),
            &self.model,
            &self.adapters,
            &session.optim,
            &session.state,
            self.config.keep_last,
        )?);
        Ok(())
    }

    /// Save the final result and report the run.
    pub(super) fn finish(&self, session: Session) -> Result<TrainReport> {
        session.bar.finish_and_clear();
        let elapsed = (session.started.elapsed().as_secs_f64() - session.overhead).max(1e-9);
        let adapter_dir = self.output_dir.join(self.result_folder());
        self.save_result(&adapter_dir)?;
        let state = session.state;
        Ok(TrainReport {
            steps: state.step,
            losses: state.losses,
            last_eval: session.last_eval,
            best: state.best_metric.zip(state.best_step),
            steps_per_sec: (state.step - session.start_step) as f64 / elapsed,
            tokens_per_sec: session.tokens as f64 / elapsed,
            step_seconds: elapsed,
            stopped_early: session.stopped_early,
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
            &self.objective.describe(),
            self.pad_id,
            train,
            eval,
        )
    }
}

fn progress_bar(show: bool, total: u64, position: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("static template"),
    );
    bar.set_position(position);
    bar
}
