//! Training hyper-parameters: the `train:` block of a run config, and their checks.

use serde::{Deserialize, Serialize};

use crate::optim::AdamWSettings;
use crate::schedule::Schedule;

/// Training hyper-parameters (the `train:` block of a config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training data.
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs` when reached first).
    pub max_steps: Option<u64>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// Warmup steps (takes precedence over `warmup_ratio`).
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of all steps.
    pub warmup_ratio: f64,
    /// AdamW settings (PyTorch defaults).
    pub adamw: AdamWSettings,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f64>,
    /// Evaluate every this many steps (and always at epoch end).
    pub eval_every: Option<u64>,
    /// Checkpoint every this many steps (and at epoch end).
    pub save_every: Option<u64>,
    /// Checkpoints to keep.
    pub keep_last: usize,
    /// Metric that picks the best adapter: `accuracy`, `macro_f1`, `loss`, `perplexity`.
    pub metric: Option<String>,
    /// Stop after this many evaluations without improvement.
    pub early_stopping_patience: Option<usize>,
    /// Seed of data order, dropout and initialization.
    pub seed: u64,
    /// Examples per evaluation batch (default: `batch_size`).
    pub eval_batch_size: Option<usize>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            max_steps: None,
            batch_size: 16,
            grad_accum: 1,
            learning_rate: 5e-4,
            schedule: Schedule::Linear,
            warmup_steps: None,
            warmup_ratio: 0.0,
            adamw: AdamWSettings::default(),
            max_grad_norm: Some(1.0),
            eval_every: None,
            save_every: None,
            keep_last: 2,
            metric: None,
            early_stopping_patience: None,
            seed: 42,
            eval_batch_size: None,
            progress: true,
        }
    }
}

impl TrainConfig {
    /// The optimizer steps a run of `examples` training examples (rows, when packed) takes:
    /// `max_steps`, else `epochs` times the batches of an epoch over `grad_accum`; at least 1.
    ///
    /// ```
    /// use peft_train::TrainConfig;
    ///
    /// let c = TrainConfig { batch_size: 8, grad_accum: 2, epochs: 3, ..Default::default() };
    /// assert_eq!(c.total_steps(100), 3 * 7); // 13 batches an epoch, 7 steps
    /// ```
    pub fn total_steps(&self, examples: usize) -> u64 {
        let batches_per_epoch = examples.div_ceil(self.batch_size.max(1));
        let steps_per_epoch = batches_per_epoch.div_ceil(self.grad_accum.max(1)) as u64;
        self.max_steps
            .unwrap_or(steps_per_epoch * self.epochs as u64)
            .max(1)
    }

    /// Check the settings: `Err((key, reason))` for one that would break the update (NaN,
    /// a flipped sign, a division by zero) or never let the run stop, with the key as the
    /// `train:` block of a run config spells it (`adamw.eps`).
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        let bad = |key: &str, reason: String| Err((key.to_string(), reason));
        let at_least_one = [
            ("batch_size", Some(self.batch_size)),
            ("grad_accum", Some(self.grad_accum)),
            ("keep_last", Some(self.keep_last)),
            ("early_stopping_patience", self.early_stopping_patience),
            ("eval_batch_size", self.eval_batch_size),
        ];
        for (key, value) in at_least_one {
            if value == Some(0) {
                return bad(key, "must be at least 1".into());
            }
        }
        for (key, value) in [
            ("eval_every", self.eval_every),
            ("save_every", self.save_every),
        ] {
            if value == Some(0) {
                return bad(key, "must be at least 1 (steps between two)".into());
            }
        }
        let lr = self.learning_rate;
        if !lr.is_finite() || lr < 0.0 {
            return bad(
                "learning_rate",
                format!("must be a finite number >= 0, found {lr}"),
            );
        }
        let ratio = self.warmup_ratio;
        if !(0.0..=1.0).contains(&ratio) {
            return bad("warmup_ratio", format!("must be in [0, 1], found {ratio}"));
        }
        if let Some(max) = self.max_grad_norm
            && !(max.is_finite() && max > 0.0)
        {
            return bad(
                "max_grad_norm",
                format!(
                    "must be a finite number > 0 (a clip to {max} would flip or void the \
                     update); leave it out to clip nothing"
                ),
            );
        }
        let a = &self.adamw;
        for (key, beta) in [("adamw.beta1", a.beta1), ("adamw.beta2", a.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(
                    key,
                    format!(
                        "must be in [0, 1), found {beta} (at 1 the bias correction divides by 0)"
                    ),
                );
            }
        }
        if !(a.eps.is_finite() && a.eps > 0.0) {
            return bad(
                "adamw.eps",
                format!(
                    "must be a finite number > 0, found {} (it keeps the update's denominator \
                     away from 0)",
                    a.eps
                ),
            );
        }
        if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
            return bad(
                "adamw.weight_decay",
                format!("must be a finite number >= 0, found {}", a.weight_decay),
            );
        }
        Ok(())
    }
}
