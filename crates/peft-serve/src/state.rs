//! What every handler shares: the scheduler handle, the registry, the metrics, the tokenizer
//! and what the model allows; and the checks every request needs (body size, tokens, length).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use peft_models::{Encoding, HfTokenizer};

use crate::api::{Input, InputItem};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::scheduler::SchedulerHandle;

/// What the loaded model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Next-token logits: `/v1/completions`.
    CausalLm,
    /// Sentence embeddings: `/v1/embeddings`.
    Encoder,
    /// Sequence classification: `/v1/classify`.
    Classifier,
}

impl ModelKind {
    fn endpoint(self) -> &'static str {
        match self {
            ModelKind::CausalLm => "/v1/completions",
            ModelKind::Encoder => "/v1/embeddings",
            ModelKind::Classifier => "/v1/classify",
        }
    }
}

/// Facts about the base model the handlers check requests against.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `--model` as given.
    pub source: String,
    /// Its task.
    pub kind: ModelKind,
    /// Positions it allows (prefix, prompt and new tokens together) and where that comes from.
    pub context_limit: Option<(usize, &'static str)>,
    /// Ids a prompt may hold.
    pub vocab_size: usize,
    /// Label names of a classifier.
    pub labels: Vec<String>,
    /// Unix seconds when the server started.
    pub created: u64,
}

/// The shared state of the handlers.
pub struct AppState {
    /// Reaches the scheduler thread.
    pub scheduler: SchedulerHandle,
    /// Adapters loaded.
    pub registry: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The model's tokenizer, if its folder has one.
    pub tokenizer: Option<Arc<HfTokenizer>>,
    /// Facts about the model.
    pub info: ModelInfo,
    /// The API key, when one is required.
    pub api_key: Option<Vec<u8>>,
    /// Time a request may take.
    pub timeout: Duration,
    /// Largest body accepted, in bytes.
    pub body_limit: usize,
    next_id: AtomicU64,
}

impl AppState {
    /// Shared state from its parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        scheduler: SchedulerHandle,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        tokenizer: Option<Arc<HfTokenizer>>,
        info: ModelInfo,
        api_key: Option<Vec<u8>>,
        timeout: Duration,
        body_limit: usize,
    ) -> Self {
        Self {
            scheduler,
            registry,
            metrics,
            tokenizer,
            info,
            api_key,
            timeout,
            body_limit,
            next_id: AtomicU64::new(1),
        }
    }

    /// A fresh response id, `prefix-N`.
    pub fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// 400 unless the model does `kind`, saying which endpoint it serves instead.
    pub fn require(&self, kind: ModelKind, what: &str) -> Result<(), ApiError> {
        if self.info.kind == kind {
            return Ok(());
        }
        Err(ApiError::bad_request(format!(
            "{what} needs a {kind:?} model; this server's model (`{}`) is a {:?}: use {}",
            self.info.source,
            self.info.kind,
            self.info.kind.endpoint()
        )))
    }

    /// The body, at most `body_limit` bytes (413 beyond).
    pub async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.body_limit) {
            return Err(ApiError::too_large(self.body_limit));
        }
        match axum::body::to_bytes(body, self.body_limit).await {
            Ok(bytes) => Ok(bytes.to_vec()),
            Err(e) => {
                let mut source: Option<&dyn std::error::Error> = Some(&e);
                while let Some(s) = source {
                    if s.is::<http_body_util::LengthLimitError>() {
                        return Err(ApiError::too_large(self.body_limit));
                    }
                    source = s.source();
                }
                Err(ApiError::bad_request(format!(
                    "reading the body failed: {e}"
                )))
            }
        }
    }

    /// Tokenize each text of `input` (or check the token ids given); `field` names it in errors.
    pub fn encode(&self, input: &Input, field: &str) -> Result<Vec<Encoding>, ApiError> {
        let items = input.items();
        if items.is_empty() {
            return Err(ApiError::bad_field(field, format!("`{field}` is empty")));
        }
        let many = items.len() > 1;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let at = if many {
                    format!("{field}[{i}]")
                } else {
                    field.to_string()
                };
                let encoding = match item {
                    InputItem::Text(text) => {
                        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| {
                            ApiError::bad_field(
                                &at,
                                format!(
                                    "the model `{}` has no tokenizer.json: send token ids",
                                    self.info.source
                                ),
                            )
                        })?;
                        tokenizer
                            .encode(text, None, usize::MAX)
                            .map_err(|e| ApiError::bad_field(&at, e.to_string()))?
                    }
                    InputItem::Tokens(ids) => Encoding {
                        ids: ids.to_vec(),
                        type_ids: vec![0; ids.len()],
                    },
                };
                if encoding.ids.is_empty() {
                    return Err(ApiError::bad_field(&at, format!("`{at}` has no tokens")));
                }
                let vocab = self.info.vocab_size as i64;
                if let Some(bad) = encoding.ids.iter().find(|&&t| t < 0 || t >= vocab) {
                    return Err(ApiError::bad_field(
                        &at,
                        format!("token id {bad} is outside the vocabulary (0..{vocab})"),
                    ));
                }
                Ok(encoding)
            })
            .collect()
    }

    /// 400 unless `tokens` plus a prefix of `prefix` plus `new` generated tokens fit the model;
    /// names `prompt` (or `field`) when the prompt alone is too long, else `max_tokens`.
    pub fn check_length(
        &self,
        field: &str,
        tokens: usize,
        prefix: usize,
        new: usize,
    ) -> Result<(), ApiError> {
        let Some((limit, key)) = self.info.context_limit else {
            return Ok(());
        };
        let with_prefix = if prefix > 0 {
            format!(" (after the adapter's {prefix} virtual tokens)")
        } else {
            String::new()
        };
        if tokens + prefix > limit || (new > 0 && tokens + prefix >= limit) {
            return Err(ApiError::bad_field(
                field,
                format!(
                    "`{field}` has {tokens} tokens{with_prefix}; the model allows {limit} \
                     positions (`{key}` in config.json): shorten it"
                ),
            ));
        }
        if tokens + prefix + new > limit {
            return Err(ApiError::bad_field(
                "max_tokens",
                format!(
                    "{tokens} prompt tokens{with_prefix} plus max_tokens = {new} need {} \
                     positions; the model allows {limit} (`{key}` in config.json): ask for at \
                     most {} tokens",
                    tokens + prefix + new,
                    limit - tokens - prefix
                ),
            ));
        }
        Ok(())
    }
}
