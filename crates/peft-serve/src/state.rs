//! What every handler shares: the scheduler handle, the registry, the metrics, the tokenizer
//! and what the model allows; and the checks every request needs (body size, tokens, length).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, header};
use peft_models::chat::ChatTemplate;
use peft_models::{Encoding, HfTokenizer, Task};

use crate::api::{Input, InputItem};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::scheduler::SchedulerHandle;
use peft_models::generate_limits::{MAX_NEW_TOKENS_WITHOUT_LIMIT, Room, room_for};

/// The endpoint that serves a model of `task`'s head.
fn endpoint(task: Task) -> &'static str {
    match task {
        Task::CausalLm => "/v1/completions",
        Task::SequenceClassification { .. } => "/v1/classify",
        Task::Encoder | Task::Auto => "/v1/embeddings",
    }
}

/// Facts about the base model the handlers check requests against.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `--model` as given (for the operator: logs and the start banner).
    pub source: String,
    /// The model as clients see it: a hub id as given, a local folder by its last component
    /// (the server's paths are not the clients' business).
    pub name: String,
    /// Its head (never `Task::Auto`: the loaded model's own, [`HfModel::task`](peft_models::HfModel::task)).
    pub task: Task,
    /// Positions it allows (prefix, prompt and new tokens together) and where that comes from.
    pub context_limit: Option<(usize, &'static str)>,
    /// Ids a prompt may hold.
    pub vocab_size: usize,
    /// The end-of-sequence ids (`eos_token_id` of config.json): they end a generation and
    /// never show in its text.
    pub eos_token_ids: Vec<i64>,
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
    /// The model's chat template, or why chat is not available (none, or it does not
    /// compile).
    pub chat: Result<Arc<ChatTemplate>, String>,
    /// The tokenizer's special tokens, for adapters' own chat templates.
    pub special_tokens: Vec<(String, String)>,
    /// Facts about the model.
    pub info: ModelInfo,
    /// The API key, when one is required.
    pub api_key: Option<Vec<u8>>,
    /// Time a request may take (at most [`MAX_TIMEOUT`]).
    pub timeout: Duration,
    /// Largest body accepted, in bytes.
    pub body_limit: usize,
    /// Time a body may take to arrive.
    pub body_timeout: Duration,
    /// Inputs one embeddings or classification request may hold.
    pub max_inputs: usize,
    /// Adapters loaded at most.
    pub max_adapters: usize,
}

/// The longest time limit the server keeps (ten years): `Instant + Duration` panics past
/// what an `Instant` can hold, so a longer limit (`--request-timeout 18446744073709551615`
/// used to panic every handler) means this one, which is no limit in practice.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Limits of a request the handlers enforce.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Time a request may take.
    pub timeout: Duration,
    /// Largest body, in bytes.
    pub body_limit: usize,
    /// Time a body may take to arrive.
    pub body_timeout: Duration,
    /// Inputs per embeddings or classification request.
    pub max_inputs: usize,
    /// Adapters loaded at most.
    pub max_adapters: usize,
}

/// The most tokens one request may generate from a model that states no context limit.
pub const MAX_TOKENS_WITHOUT_LIMIT: usize = MAX_NEW_TOKENS_WITHOUT_LIMIT;

/// A fresh random id: 128 bits in hex, unique across requests and restarts.
pub fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The client-facing name of a model given as `source`: a local folder or file (a GGUF model)
/// by its last component, so clients never see server paths; a hub id as it is.
pub fn shown_model_name(source: &str) -> String {
    let path = std::path::Path::new(source);
    if path.exists()
        && let Some(name) = path.file_name()
    {
        return name.to_string_lossy().into_owned();
    }
    source.to_string()
}

impl AppState {
    /// Shared state from its parts; a timeout beyond [`MAX_TIMEOUT`] is that.
    pub fn new(
        scheduler: SchedulerHandle,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        tokenizer: Option<Arc<HfTokenizer>>,
        info: ModelInfo,
        api_key: Option<Vec<u8>>,
        limits: RequestLimits,
    ) -> Self {
        Self {
            scheduler,
            registry,
            metrics,
            tokenizer,
            chat: Err("the model has no chat template: use /v1/completions".into()),
            special_tokens: Vec::new(),
            info,
            api_key,
            timeout: limits.timeout.min(MAX_TIMEOUT),
            body_limit: limits.body_limit,
            body_timeout: limits.body_timeout.min(MAX_TIMEOUT),
            max_inputs: limits.max_inputs,
            max_adapters: limits.max_adapters,
        }
    }

    /// The model's chat template and special tokens (`template`: the compiled template, or
    /// why there is none).
    pub fn with_chat(
        mut self,
        template: Result<Arc<ChatTemplate>, String>,
        special_tokens: Vec<(String, String)>,
    ) -> Self {
        self.chat = template;
        self.special_tokens = special_tokens;
        self
    }

    /// A fresh response id, `prefix-<32 hex digits>`: unique, also across restarts (a counter
    /// restarted at 1 with every server).
    pub fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", random_id())
    }

    /// When a request that starts now must be answered.
    pub fn deadline(&self) -> Instant {
        // `timeout` is at most ten years, which an `Instant` holds.
        Instant::now() + self.timeout
    }

    /// 400 unless the model has `head`'s kind of head ([`Task::same_head`]: class counts do
    /// not matter), saying which endpoint it serves instead.
    pub fn require(&self, head: Task, what: &str) -> Result<(), ApiError> {
        if self.info.task.same_head(&head) {
            return Ok(());
        }
        Err(ApiError::bad_request(format!(
            "{what} needs a {head} model; this server's model (`{}`) is a {}: use {}",
            self.info.name,
            self.info.task,
            endpoint(self.info.task)
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
        let read = tokio::time::timeout(
            self.body_timeout,
            axum::body::to_bytes(body, self.body_limit),
        );
        let Ok(read) = read.await else {
            return Err(ApiError::timeout_reading_body(self.body_timeout));
        };
        match read {
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

    /// Tokenize each text of `input` (or check the token ids given) on a blocking thread:
    /// tokenizing up to a body's worth of text is CPU work that would stall the runtime's
    /// workers (and every other connection with them). At most `max_inputs` inputs; `field`
    /// names the input in errors.
    pub async fn encode(
        self: &Arc<Self>,
        input: Input,
        field: &'static str,
        max_inputs: usize,
    ) -> Result<Vec<Encoding>, ApiError> {
        let count = input.items().len();
        if count > max_inputs {
            return Err(ApiError::bad_field(
                field,
                format!(
                    "`{field}` holds {count} inputs; this server takes at most {max_inputs} per \
                     request (--max-inputs): send them in several requests"
                ),
            ));
        }
        let state = self.clone();
        tokio::task::spawn_blocking(move || state.encode_now(&input, field))
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("tokenizing failed: {e}"))))
    }

    /// [`encode`](Self::encode) on this thread.
    fn encode_now(&self, input: &Input, field: &str) -> Result<Vec<Encoding>, ApiError> {
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
                                    self.info.name
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
    /// names `prompt` (or `field`) when the prompt alone is too long, else `max_tokens`. The
    /// sizes come from a request, so no sum is formed that could overflow: `max_tokens` near
    /// `u64::MAX` used to wrap the sum past the check in release builds.
    pub fn check_length(
        &self,
        field: &str,
        tokens: usize,
        prefix: usize,
        new: usize,
    ) -> Result<(), ApiError> {
        let limit = self.info.context_limit;
        let with_prefix = if prefix > 0 {
            format!(" (after the adapter's {prefix} virtual tokens)")
        } else {
            String::new()
        };
        let (limit_n, key) = limit.unwrap_or((0, ""));
        // The rule `burn-peft generate` applies too (`peft_models::generate_limits`).
        match room_for(limit.map(|(n, _)| n), prefix, tokens, new) {
            Room::Fits => Ok(()),
            Room::OverDefaultCap => Err(ApiError::bad_field(
                "max_tokens",
                format!(
                    "is {new}; this model states no context limit, and the server generates \
                     at most {MAX_TOKENS_WITHOUT_LIMIT} tokens per request"
                ),
            )),
            Room::PromptTooLong => Err(ApiError::bad_field(
                field,
                format!(
                    "`{field}` has {tokens} tokens{with_prefix}; the model allows {limit_n} \
                     positions (`{key}` in config.json): shorten it"
                ),
            )),
            Room::TooManyNew { room } => Err(ApiError::bad_field(
                "max_tokens",
                format!(
                    "{tokens} prompt tokens{with_prefix} plus max_tokens = {new} do not fit: the \
                     model allows {limit_n} positions (`{key}` in config.json): ask for at most \
                     {room} tokens"
                ),
            )),
        }
    }
}
