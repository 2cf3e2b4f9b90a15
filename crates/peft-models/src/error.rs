//! Typed errors of model loading and running.

use std::path::PathBuf;

/// Errors while resolving, loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is malformed or lacks a field.
    #[error("{}: {reason}", file.display())]
    InvalidConfig {
        /// The config file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The architecture is not one we implement.
    #[error("{}: unsupported architecture `{found}`; supported model_type values: {supported}", file.display())]
    UnsupportedArchitecture {
        /// The config file.
        file: PathBuf,
        /// The `model_type` found.
        found: String,
        /// The `model_type` values of the registered architectures, comma-separated.
        supported: String,
    },
    /// An option of the config changes the math in a way we do not implement.
    #[error("{}: `{key}` = {found} is not supported ({reason})", file.display())]
    UnsupportedOption {
        /// The config file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The value.
        found: String,
        /// Why.
        reason: String,
    },
    /// The weights file lacks tensors the model needs, or holds wrongly shaped ones.
    #[error("{}: {reason}", file.display())]
    Weights {
        /// The weights file.
        file: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// A model could not be found locally or in the Hugging Face cache.
    #[error("model `{id}` not found: {reason}")]
    NotFound {
        /// The hub id or folder asked for.
        id: String,
        /// Where we looked and what to do.
        reason: String,
    },
    /// The tokenizer could not be loaded or run.
    #[error("{}: tokenizer error: {reason}", file.display())]
    Tokenizer {
        /// The tokenizer file.
        file: PathBuf,
        /// The cause.
        reason: String,
    },
    /// A model folder could not be written (or would overwrite something that is not a model).
    #[error("{}: {reason}", file.display())]
    Save {
        /// The file or folder involved.
        file: PathBuf,
        /// What went wrong and what to do.
        reason: String,
    },
    /// A GGUF file is malformed, truncated, or holds something not read here (an unknown
    /// tensor type, architecture or tokenizer model).
    #[error("{}: {reason}", file.display())]
    Gguf {
        /// The GGUF file.
        file: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A chat template failed to compile or render (a `raise_exception` of the template, an
    /// undefined value, a syntax error), or cannot be used as asked.
    #[error("chat template {template}: {}{reason}", message.map(|m| format!("at message {m}: ")).unwrap_or_default())]
    ChatTemplate {
        /// Which template: the file and key it came from.
        template: String,
        /// The index of the message being rendered when it failed, where one was.
        message: Option<usize>,
        /// What went wrong (the template's own message for `raise_exception`) and where.
        reason: String,
    },
    /// Inputs have the wrong shape or values.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An input is outside what the model accepts (a token id beyond the vocabulary, a
    /// sequence longer than the position table, a mask of the wrong shape).
    #[error("invalid input `{input}`: {found}, but {limit}; {fix}")]
    InputOutOfRange {
        /// The input (`input_ids`, `attention_mask`, ...).
        input: String,
        /// What was given.
        found: String,
        /// What the model accepts.
        limit: String,
        /// What to do.
        fix: String,
    },
    /// A PEFT bundle could not be loaded onto its base model.
    #[error("{}: {source}", dir.display())]
    Adapter {
        /// The bundle's folder.
        dir: PathBuf,
        /// The cause (boxed: `PeftError` is large and this is a rare path).
        #[source]
        source: Box<peft_core::PeftError>,
    },
}

impl From<peft_core::atomic::IoAt> for ModelError {
    fn from(e: peft_core::atomic::IoAt) -> Self {
        ModelError::Io {
            file: e.path,
            source: e.source,
        }
    }
}

/// Result alias for model operations.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
