//! A whole run, as `burn-peft train` does it and a library user gets it too: training, the
//! label map, the held-out test scored with the best adapter, and `results.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use peft_core::{Adaptable, PeftModel};
use serde::Serialize;
use serde_json::{Map, Value};

use super::Trainer;
use crate::checkpoint;
use crate::data::{Example, LABEL_MAP_FILE, LabelMap};
use crate::error::{Result, TrainError};
use crate::eval::EvalReport;
use crate::run::TrainOptions;

/// The file [`Trainer::fit`] writes its [`RunSummary`] to, in the output folder.
pub const RESULTS_FILE: &str = "results.json";

/// The examples of a run.
#[derive(Debug, Clone, Default)]
pub struct Datasets {
    /// Trained on.
    pub train: Vec<Example>,
    /// Evaluated during training; picks the best adapter.
    pub eval: Option<Vec<Example>>,
    /// Held out: evaluated once at the end, with the best adapter.
    pub test: Option<Vec<Example>>,
    /// The class names (classification), saved as `label_map.json`.
    pub labels: Option<LabelMap>,
}

/// What [`Trainer::fit`] did; written as `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// `LORA`, `LORA + PREFIX_TUNING` for adapters trained together, or `FULL`.
    pub method: String,
    /// The adapters trained.
    pub adapters: Vec<String>,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// All parameters.
    pub all_params: usize,
    /// Optimizer steps done.
    pub steps: u64,
    /// Seconds of the whole run (training, evaluation, checkpoints, the test).
    pub train_seconds: f64,
    /// Seconds of training steps only.
    pub step_seconds: f64,
    /// Optimizer steps per second (steps only).
    pub steps_per_sec: f64,
    /// Training tokens per second (steps only).
    pub tokens_per_sec: f64,
    /// The best evaluation metric and its step.
    pub best: Option<BestMetric>,
    /// The last evaluation.
    pub eval: Option<EvalReport>,
    /// The held-out test, scored with the best adapter (the final one without evaluation).
    pub test: Option<EvalReport>,
    /// The final result: `adapter/` or, for full fine-tuning, `model/`.
    pub result_dir: PathBuf,
    /// `best/`, when this run evaluated.
    pub best_dir: Option<PathBuf>,
}

/// The best evaluation of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BestMetric {
    /// The metric's value.
    pub value: f64,
    /// The optimizer step it was reached at.
    pub step: u64,
}

impl RunSummary {
    /// Write the summary, with `extra` top-level entries first, to `dir/results.json`.
    pub fn write(&self, dir: &Path, extra: &[(String, Value)]) -> Result<PathBuf> {
        let mut out = Map::new();
        for (key, value) in extra {
            out.insert(key.clone(), value.clone());
        }
        if let Value::Object(fields) = serde_json::to_value(self).expect("a summary serializes") {
            out.extend(fields);
        }
        let file = dir.join(RESULTS_FILE);
        let bytes = serde_json::to_vec_pretty(&Value::Object(out)).expect("JSON serializes");
        peft_core::atomic::write_file(&file, &bytes).map_err(|e| TrainError::Io {
            file: e.path,
            source: e.source,
        })?;
        Ok(file)
    }
}

impl<M: Adaptable + Module> Trainer<M> {
    /// A whole run: train on `data.train` (evaluating on `data.eval`, resuming from `resume`),
    /// save the label map (`label_map.json` in the output folder and beside every bundle),
    /// score `data.test` with the best adapter (the final one when nothing was evaluated),
    /// and write `results.json` ([`RunSummary`], with the builder's
    /// [`summary_field`](super::TrainerBuilder::summary_field)s).
    ///
    /// The model ends with the adapter the test was scored with.
    pub fn fit(
        &mut self,
        data: &Datasets,
        resume: Option<&Path>,
        options: TrainOptions,
    ) -> Result<RunSummary> {
        let started = Instant::now();
        if let Some(labels) = &data.labels {
            let json = labels.to_json_bytes();
            self.bundle_files.retain(|(name, _)| name != LABEL_MAP_FILE);
            self.bundle_files.push((LABEL_MAP_FILE.into(), json));
        }
        let summary_file = self.output_dir.join(RESULTS_FILE);
        let keep_best = data.test.is_some();
        let mut session = self.begin(
            &data.train,
            data.eval.as_deref(),
            resume,
            options,
            keep_best,
        )?;
        // The folder is this run's now: an old run's summary must not outlive it if this one
        // fails, and the label map is this run's.
        if summary_file.is_file() {
            std::fs::remove_file(&summary_file).map_err(|source| TrainError::Io {
                file: summary_file.clone(),
                source,
            })?;
        }
        if let Some(labels) = &data.labels {
            labels.save(&self.output_dir.join(LABEL_MAP_FILE))?;
        }
        self.run_epochs(&mut session, &data.train, data.eval.as_deref())?;
        let best_params = session.best_params.take();
        let report = self.finish(session)?;
        let best_dir = self.output_dir.join("best");
        let has_best = report.best.is_some() && best_dir.is_dir();
        let test = match &data.test {
            Some(test) => {
                // The held-out score is the best adapter's, as a user would ship it.
                if let Some(params) = &best_params {
                    checkpoint::restore_params(&mut self.model, params, &best_dir)?;
                }
                Some(self.evaluate(test)?)
            }
            None => None,
        };
        let trainable = self.model.trainable_report();
        let summary = RunSummary {
            method: self.method_name(),
            adapters: self.adapters.clone(),
            trainable_params: trainable.trainable,
            all_params: trainable.all,
            steps: report.steps,
            train_seconds: started.elapsed().as_secs_f64(),
            step_seconds: report.step_seconds,
            steps_per_sec: report.steps_per_sec,
            tokens_per_sec: report.tokens_per_sec,
            best: report.best.map(|(value, step)| BestMetric { value, step }),
            eval: report.last_eval,
            test,
            result_dir: report.adapter_dir,
            best_dir: has_best.then_some(best_dir),
        };
        summary.write(&self.output_dir, &self.summary_fields)?;
        Ok(summary)
    }

    /// `LORA`, `LORA + PREFIX_TUNING` for several adapters trained together, `FULL` for full
    /// fine-tuning ([`method_name`]).
    pub fn method_name(&self) -> String {
        method_name(&self.model, &self.adapters)
    }
}

/// `LORA`, or `LORA + PREFIX_TUNING` for the `adapters` of `model` trained together; `FULL` when
/// none of them is an adapter of the model (full fine-tuning).
pub fn method_name<M: Adaptable + Module>(model: &PeftModel<M>, adapters: &[String]) -> String {
    let names: Vec<&str> = adapters
        .iter()
        .filter_map(|a| model.adapter_config(a))
        .map(peft_core::peft_type_of)
        .collect();
    if names.is_empty() {
        "FULL".into()
    } else {
        names.join(" + ")
    }
}
