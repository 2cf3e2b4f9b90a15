//! The shared trainer of burn-peft: a frozen base model, optimization of adapter parameters
//! only, evaluation, checkpoints that resume bit for bit, TensorBoard logging and a progress
//! bar. It never names a method (anything implementing `PeftMethod` trains through it) nor a
//! model: any `Adaptable` model with an [`Objective`] does ([`Trainer`]); the model zoo's
//! objectives are its heads ([`Task`]).

#![warn(missing_docs)]

pub mod chat_eval;
pub mod checkpoint;
mod config;
pub mod data;
pub mod device;
mod error;
mod eval;
mod loss;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod readout;
pub mod run;
pub mod schedule;
pub mod step;
pub mod tensorboard;
mod trainer;

pub use error::{Result, TrainError};
pub use eval::{EvalReport, ExampleResult, evaluate};
pub use loss::{
    causal_lm_loss, causal_lm_loss_terms, causal_lm_row_sums_chunked, chunk_tokens,
    chunked_causal_lm_loss, classification_loss, objective_loss,
};
pub use objective::Objective;
pub use peft_models::Task;
pub use run::TrainOptions;
pub use trainer::{
    BestMetric, Datasets, FullExport, ModelExport, RESULTS_FILE, RunSummary, TrainConfig,
    TrainReport, Trainer, TrainerBuilder, method_name,
};
