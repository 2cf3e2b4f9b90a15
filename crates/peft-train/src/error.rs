//! Typed errors of training.

use std::path::PathBuf;

/// Errors while training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Adapter handling failed.
    #[error(transparent)]
    Peft(#[from] peft_core::PeftError),
    /// Data could not be read.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// The model refused its inputs (token ids, lengths) or could not run.
    #[error(transparent)]
    Model(peft_models::ModelError),
    /// The loss became NaN or infinite; the last checkpoint on disk is intact.
    #[error("the training loss became {value} at step {step}; stopped. The last good checkpoint is {}. Lower the learning rate or enable clipping (max_grad_norm)", last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(none yet)".into()))]
    NonFiniteLoss {
        /// Optimizer step at which it happened.
        step: u64,
        /// The loss value.
        value: f64,
        /// The newest checkpoint saved before.
        last_checkpoint: Option<PathBuf>,
    },
    /// A step's gradient norm was not finite while its loss was (an infinite gradient makes
    /// the clip factor 0 and the update NaN): the run stopped before the update, and nothing
    /// of this step was written.
    #[error("the gradient norm became {norm} at step {step} (the loss, {loss}, was finite); stopped before the update, nothing of this step was written. The last good checkpoint is {}. Lower the learning rate, or look for extreme values in the data", last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(none yet)".into()))]
    NonFiniteGradient {
        /// Optimizer step at which it happened.
        step: u64,
        /// The gradient norm.
        norm: f64,
        /// The step's (finite) loss.
        loss: f64,
        /// The newest checkpoint saved before.
        last_checkpoint: Option<PathBuf>,
    },
    /// A trainable parameter is not finite at a save: nothing was written (no checkpoint or
    /// bundle ever holds a non-finite tensor).
    #[error("trainable parameter `{parameter}` holds a non-finite value{}; not saved. The last good checkpoint is {}. Lower the learning rate or enable clipping (max_grad_norm)", step.map(|s| format!(" at step {s}")).unwrap_or_default(), last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(none yet)".into()))]
    NonFiniteParameter {
        /// Optimizer step at which it was found, when known.
        step: Option<u64>,
        /// The parameter's module path (or optimizer state name).
        parameter: String,
        /// The newest checkpoint saved before.
        last_checkpoint: Option<PathBuf>,
    },
    /// The output folder belongs to another run (or holds this run's checkpoints, which a
    /// fresh start would mix with).
    #[error("output folder {}: {reason}", dir.display())]
    OutputInUse {
        /// The output folder.
        dir: PathBuf,
        /// What it holds and what to do.
        reason: String,
    },
    /// A checkpoint is unusable.
    #[error("{}: cannot resume: {reason}", dir.display())]
    Checkpoint {
        /// The checkpoint folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing the fully fine-tuned model failed (the previous folder is intact).
    #[error("{}: cannot write the model: {reason}", dir.display())]
    Export {
        /// The output folder.
        dir: PathBuf,
        /// The cause.
        reason: String,
    },
    /// The configuration is invalid.
    #[error("invalid training config: `{key}`: {reason}")]
    Config {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

impl TrainError {
    /// Whether the error comes from the user's input (config, data, adapter, checkpoint) rather
    /// than from the run itself (I/O, a diverging loss).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Peft(_)
                | Self::Data(_)
                | Self::Model(_)
                | Self::Config { .. }
                | Self::Checkpoint { .. }
                | Self::OutputInUse { .. }
        )
    }
}

impl From<peft_core::atomic::IoAt> for TrainError {
    fn from(e: peft_core::atomic::IoAt) -> Self {
        TrainError::Io {
            file: e.path,
            source: e.source,
        }
    }
}

/// Result alias for training.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
