//! What the HTTP side hands the scheduler thread, and what comes back.

use std::path::PathBuf;
use std::time::Instant;

use peft_models::Encoding;
use tokio::sync::{mpsc, oneshot};

use crate::api::Sampling;
use crate::error::ApiError;
use crate::registry::AdapterInfo;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a running generation reports, in order: tokens, then one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The next token.
    Token(i64),
    /// Done.
    Finished(FinishReason),
    /// This request failed; others are not affected.
    Failed(ApiError),
}

/// A completion request, checked and tokenized.
#[derive(Debug)]
pub struct GenJob {
    /// The adapter, or [`BASE_ROW`](peft_core::nn::BASE_ROW).
    pub adapter: String,
    /// Prompt token ids (not empty).
    pub prompt: Vec<i64>,
    /// How to pick tokens.
    pub sampling: Sampling,
    /// Where tokens go; closed when the client is gone, which frees the slot.
    pub events: mpsc::UnboundedSender<GenEvent>,
    /// Past this, the request is dropped (the HTTP side has answered 408).
    pub deadline: Instant,
}

/// Which one-forward task an input job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneShotKind {
    /// Sentence embeddings (encoders).
    Embed,
    /// Classification logits.
    Classify,
}

/// An embeddings or classification request: one forward over its inputs.
#[derive(Debug)]
pub struct OneShotJob {
    /// Embed or classify.
    pub kind: OneShotKind,
    /// The adapter, or [`BASE_ROW`](peft_core::nn::BASE_ROW).
    pub adapter: String,
    /// Tokenized inputs.
    pub inputs: Vec<Encoding>,
    /// One vector per input (embedding or logits), or the error.
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, ApiError>>,
    /// Past this, the request is dropped.
    pub deadline: Instant,
}

/// A message to the scheduler thread.
#[derive(Debug)]
pub enum Command {
    /// Generate.
    Generate(GenJob),
    /// Embed or classify.
    OneShot(OneShotJob),
    /// Load a bundle as `name`.
    Load {
        /// Adapter name.
        name: String,
        /// Bundle folder (already checked).
        dir: PathBuf,
        /// The new adapter, or why not.
        reply: oneshot::Sender<Result<AdapterInfo, ApiError>>,
    },
    /// Unload `name` once its running requests finish.
    Unload {
        /// Adapter name.
        name: String,
        /// Answered when it is gone.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Stop the thread.
    Shutdown,
}
